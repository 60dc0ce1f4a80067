//! How values are written: durations (`90s`, `5m`, a number of seconds), byte sizes
//! (`512MiB`), `off`, listen addresses, strings that the environment's type sniffing
//! turned into numbers, lists given as one item, and counts that must be at least 1.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::error::Problem;

/// Accepts `host:port`, a bare port (`9464`, number or string: figment sniffs env values
/// into numbers) meaning 127.0.0.1:port, `:port` meaning all interfaces, or "" (disabled).
pub(super) fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = string_like(d)?;
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if let Ok(port) = trimmed.parse::<u16>() {
        return Ok(format!("127.0.0.1:{port}"));
    }
    if let Some(port) = trimmed.strip_prefix(':') {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(format!("0.0.0.0:{port}"));
        }
    }
    if trimmed.parse::<SocketAddr>().is_err() {
        return Err(serde::de::Error::custom(Problem::NotAnAddress(
            trimmed.to_string(),
        )));
    }
    Ok(trimmed.to_string())
}

/// A string that figment may have sniffed into a number or bool (env values).
pub(super) fn string_like<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    let raw =
        Raw::deserialize(d).map_err(|_: D::Error| serde::de::Error::custom("expected a string"))?;
    Ok(match raw {
        Raw::S(s) => s,
        Raw::I(i) => i.to_string(),
        Raw::U(u) => u.to_string(),
        Raw::F(f) => f.to_string(),
        Raw::B(b) => b.to_string(),
    })
}

pub(super) fn opt_string_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<String>>, D::Error> {
    string_list(d).map(Some)
}

/// A URL, or a list of them (a cluster's nodes), kept comma-separated as a string may
/// give them (read by [`super::RedisSection::target`]).
pub(super) fn url_or_nodes<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    string_list(d)
        .map(|urls| urls.join(","))
        .map_err(|_: D::Error| serde::de::Error::custom("expected a URL or a list of URLs"))
}

pub(super) fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Item {
        S(String),
        I(i64),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<Item>),
        One(Item),
    }
    let raw = Raw::deserialize(d)
        .map_err(|_: D::Error| serde::de::Error::custom("expected a list of strings"))?;
    let items = match raw {
        Raw::List(v) => v,
        Raw::One(i) => vec![i],
    };
    Ok(items
        .into_iter()
        .map(|i| match i {
            Item::S(s) => s,
            Item::I(i) => i.to_string(),
        })
        .collect())
}

/// A count of at least 1: read as the plain integer (so that a word is "not a whole
/// number"), then 0 refused.
fn at_least_one<'de, D, T, N>(d: D) -> Result<N, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
    N: TryFrom<T>,
{
    N::try_from(T::deserialize(d)?).map_err(|_| serde::de::Error::custom(Problem::AtLeastOne))
}

pub(super) fn nonzero_usize<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroUsize, D::Error> {
    at_least_one::<D, usize, _>(d)
}

pub(super) fn nonzero_u32<'de, D: Deserializer<'de>>(d: D) -> Result<NonZeroU32, D::Error> {
    at_least_one::<D, u32, _>(d)
}

pub(super) fn opt_nonzero_u32<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<NonZeroU32>, D::Error> {
    nonzero_u32(d).map(Some)
}

/// Durations: human-readable strings (`90s`, `5m`), or a plain number of seconds.
pub(super) mod duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            U(u64),
            F(f64),
        }
        let raw = Raw::deserialize(d).map_err(|_: D::Error| {
            serde::de::Error::custom("expected a duration like 90s, 5m or 1h30m")
        })?;
        match raw {
            Raw::S(s) => humantime::parse_duration(s.trim()).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a duration ({}); write a number and a unit, like 90s, 5m or 1h30m",
                    duration_problem(&e)
                ))
            }),
            Raw::U(u) => Ok(Duration::from_secs(u)),
            // `try_`: a huge number (1e300) is an error, not a panic.
            Raw::F(f) => Duration::try_from_secs_f64(f)
                .map_err(|_| serde::de::Error::custom(format!("{f} is not a duration"))),
        }
    }
}

/// humantime's error without its character offsets.
fn duration_problem(e: &humantime::DurationError) -> String {
    use humantime::DurationError as E;
    match e {
        E::InvalidCharacter(_) => "unexpected character".into(),
        E::NumberExpected(_) => "a number is missing".into(),
        E::UnknownUnit { unit, .. } => format!("unknown unit {unit:?}"),
        E::NumberOverflow => "too long".into(),
        E::Empty => "empty".into(),
    }
}

/// Byte sizes: a plain number of bytes, or a number with a unit (`512MiB`, `64 MB`, `1g`).
pub(super) mod byte_size {
    use super::*;

    pub fn serialize<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        const MIB: u64 = 1024 * 1024;
        if *n >= MIB && n.is_multiple_of(MIB) {
            s.serialize_str(&format!("{}MiB", n / MIB))
        } else {
            s.serialize_u64(*n)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let raw = string_like(d)?;
        parse(&raw).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{raw:?} is not a size like 512MiB, 64MB or a number of bytes"
            ))
        })
    }

    pub fn parse(raw: &str) -> Option<u64> {
        let raw = raw.trim();
        let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
        let (number, unit) = raw.split_at(split);
        let number: u64 = number.parse().ok()?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "t" | "tb" => 1000 * 1000 * 1000 * 1000,
            "tib" => 1 << 40,
            _ => return None,
        };
        number.checked_mul(factor)
    }
}

/// An optional duration: written as one when set, left out when not.
pub(super) mod opt_duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// `off` (also `false`, `none`, `""`) or a duration.
pub(super) mod off_or_duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Off(bool),
            S(String),
            Other(serde_yaml::Value),
        }
        match Raw::deserialize(d)? {
            Raw::Off(false) => Ok(None),
            Raw::Off(true) => Err(serde::de::Error::custom(
                "expected off or a duration like 1h",
            )),
            Raw::S(s) if matches!(s.trim().to_ascii_lowercase().as_str(), "off" | "none" | "") => {
                Ok(None)
            }
            Raw::S(s) => {
                super::duration::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&s))
                    .map(Some)
            }
            Raw::Other(v) => super::duration::deserialize(v)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}
