//! How a configuration error reads: figment's errors turned into [`ReadError`]s in the
//! one key notation, where each value came from ([`Origin`]), and serde's wording put
//! as a reader would (no backticks, no Rust type names, no parser offsets).

use figment::error::{Actual, Kind};
use figment::value::Value;
use figment::Figment;

use super::error::{Key, KeySeg, Origin, ReadError, ReadProblem};

/// Every problem at once, e.g. `flows.default.timeout from environment variable
/// FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT: "soon" is not a duration (…)` or
/// `dimensions[0].labl in config file fm.yaml: unknown key; expected one of: label,
/// attribute, from, default`.
pub(super) fn read_errors(err: figment::Error, figment: &Figment) -> Vec<ReadError> {
    err.into_iter().map(|e| read_error(&e, figment)).collect()
}

fn read_error(e: &figment::Error, figment: &Figment) -> ReadError {
    let mut key = key_path(figment, &e.path);
    let origin = match &e.metadata {
        Some(m) => describe_origin(m, &key),
        None => origin_of(figment, &key),
    };
    let problem = match &e.kind {
        Kind::MissingField(field) => {
            key.0.push(KeySeg::Key(field.to_string()));
            ReadProblem::Required
        }
        kind => ReadProblem::Invalid(kind.clone()),
    };
    if !key.0.is_empty() {
        return ReadError::Value {
            key,
            origin,
            problem,
        };
    }
    // Nothing was read: the file itself is the problem (YAML syntax).
    let file = e
        .metadata
        .as_ref()
        .and_then(|m| m.source.as_ref())
        .and_then(figment::Source::file_path);
    match file {
        Some(p) => ReadError::NotYaml {
            file: p.to_path_buf(),
            problem,
        },
        None => ReadError::Whole { origin, problem },
    }
}

/// What went wrong, in words, without serde's backticks.
pub(super) fn describe_kind(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.clone(),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!(
                "{} is not {}",
                describe_actual(actual),
                describe_expected(expected)
            )
        }
        Kind::InvalidLength(n, expected) => format!("has {n} items, expected {expected}"),
        Kind::UnknownVariant(found, expected) => {
            format!("{found:?} is not one of: {}", expected.join(", "))
        }
        Kind::UnknownField(_, &[]) => "unknown key".into(),
        Kind::UnknownField(_, expected) => {
            format!("unknown key; expected one of: {}", expected.join(", "))
        }
        Kind::MissingField(field) => format!("{field} is required"),
        Kind::DuplicateField(field) => format!("{field} is given twice"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "is out of range".into(),
        Kind::Unsupported(actual) => format!("{} is not supported here", describe_actual(actual)),
        Kind::UnsupportedKey(actual, _) => {
            format!("{} cannot be a key", describe_actual(actual))
        }
    }
}

fn describe_actual(actual: &Actual) -> String {
    match actual {
        Actual::Bool(b) => b.to_string(),
        Actual::Unsigned(n) => n.to_string(),
        Actual::Signed(n) => n.to_string(),
        Actual::Float(f) => f.to_string(),
        Actual::Char(c) => format!("{:?}", c.to_string()),
        Actual::Str(s) => format!("{s:?}"),
        Actual::Bytes(_) => "a byte string".into(),
        Actual::Unit | Actual::Option => "an empty value".into(),
        Actual::Seq => "a list".into(),
        Actual::Map => "a mapping".into(),
        Actual::Other(o) => o.clone(),
        _ => "this value".into(),
    }
}

/// serde's "expected" (a Rust type name, often) as a reader would put it.
fn describe_expected(expected: &str) -> String {
    let e = expected.trim_matches('`');
    match e {
        "f32" | "f64" => "a number".into(),
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)".into(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number".into(),
        "bool" | "a boolean" => "true or false".into(),
        "a string" | "string" | "a borrowed string" => "a string".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        _ if e.starts_with("struct ") || e.starts_with("a map") => "a mapping (nested keys)".into(),
        _ if e.starts_with("enum ") => "one of the allowed values".into(),
        _ => e.replace('`', ""),
    }
}

/// figment's error path (all strings) with list indices told apart from mapping keys by
/// looking at the merged value.
fn key_path(figment: &Figment, raw: &[String]) -> Key {
    let mut value = raw.first().and_then(|first| figment.find_value(first).ok());
    let mut path = Vec::new();
    for (i, seg) in raw.iter().enumerate() {
        let index = (i > 0 && matches!(value, Some(Value::Array(..))))
            .then(|| seg.parse::<usize>().ok())
            .flatten();
        if i > 0 {
            value = match (value, index) {
                (Some(Value::Array(_, items)), Some(n)) => items.into_iter().nth(n),
                (Some(Value::Dict(_, mut dict)), None) => dict.remove(seg),
                _ => None,
            };
        }
        path.push(match index {
            Some(n) => KeySeg::Index(n),
            None => KeySeg::Key(seg.clone()),
        });
    }
    Key(path)
}

/// Where the value at `key` came from: the deepest value along the path that the
/// merged configuration holds (a list element reports its list's source).
pub(super) fn origin_of(figment: &Figment, key: &Key) -> Origin {
    let Some(KeySeg::Key(first)) = key.0.first() else {
        return Origin::Defaults;
    };
    let Ok(mut value) = figment.find_value(first) else {
        return Origin::Defaults;
    };
    let mut tag = value.tag();
    for seg in &key.0[1..] {
        let next = match (value, seg) {
            (Value::Dict(_, mut dict), KeySeg::Key(k)) => dict.remove(k),
            (Value::Array(_, items), KeySeg::Index(i)) => items.into_iter().nth(*i),
            _ => None,
        };
        match next {
            Some(v) => {
                tag = v.tag();
                value = v;
            }
            None => break,
        }
    }
    match figment.get_metadata(tag) {
        Some(m) => describe_origin(m, key),
        None => Origin::Defaults,
    }
}

/// A config file, an environment variable (the one `key` is read from), or the
/// built-in defaults.
fn describe_origin(m: &figment::Metadata, key: &Key) -> Origin {
    match &m.source {
        Some(figment::Source::File(p)) => Origin::File(p.clone()),
        Some(_) => Origin::Defaults,
        None => {
            let keys: Vec<String> = key
                .0
                .iter()
                .map(|s| match s {
                    KeySeg::Key(k) => k.clone(),
                    KeySeg::Index(i) => i.to_string(),
                })
                .collect();
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            Origin::Env(m.interpolate(&figment::Profile::Default, &keys))
        }
    }
}
