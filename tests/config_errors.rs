//! How configuration errors read: one notation for keys (`a.b`, `list[0].c`,
//! `map["x.y"]`), one way to name the source (`in config file PATH`, `from environment
//! variable NAME`), no serde backticks, no parser offsets.

use std::path::{Path, PathBuf};

use flowmetrics::config::Config;

struct Yaml(PathBuf);

impl Yaml {
    fn new(name: &str, text: &str) -> Yaml {
        let dir = std::env::temp_dir().join(format!("fm-config-errors-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Yaml(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn err(&self) -> String {
        error(Some(self.path()), &[])
    }

    fn named(&self) -> String {
        format!("in config file {}", self.0.display())
    }
}

impl Drop for Yaml {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn error(file: Option<&Path>, env: &[(&str, &str)]) -> String {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load(file, env)
        .expect_err("the config is invalid")
        .to_string()
}

#[test]
fn no_backticks_doubled_or_otherwise() {
    let cases = [
        Yaml::new(
            "unknown-field.yaml",
            "flows:\n  default:\n    timeoutt: 5m\n",
        ),
        Yaml::new("unknown-variant.yaml", "log:\n  format: xml\n"),
        Yaml::new("wrong-type.yaml", "flows:\n  default: 5\n"),
        Yaml::new(
            "list-field.yaml",
            "dimensions:\n  - { labl: x, attribute: y }\n",
        ),
    ];
    let errs: Vec<String> = cases.iter().map(Yaml::err).collect();
    for err in &errs {
        assert!(!err.contains('`'), "{err}");
    }
    assert!(
        errs[0].starts_with(&format!("flows.default.timeoutt {}:", cases[0].named())),
        "{}",
        errs[0]
    );
    assert!(
        errs[3].starts_with(&format!("dimensions[0].labl {}:", cases[3].named())),
        "{}",
        errs[3]
    );
    assert!(
        errs[0].contains("unknown key; expected one of: timeout, buckets"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].contains(r#""xml" is not one of: text, json"#),
        "{}",
        errs[1]
    );
    assert!(errs[2].contains("5 is not a mapping"), "{}", errs[2]);
}

#[test]
fn no_parser_positions() {
    // humantime says "expected number at 0" and "unknown time unit "x", supported
    // units: ..." with offsets; neither offsets nor its wording reach the user.
    let err = error(None, &[("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "soon")]);
    assert!(!err.contains(" at "), "{err}");
    assert!(
        err.contains(r#""soon" is not a duration (a number is missing)"#),
        "{err}"
    );
    let f = Yaml::new("unit.yaml", "flows:\n  default:\n    timeout: 25x\n");
    let err = f.err();
    assert!(!err.contains(" at "), "{err}");
    assert!(
        err.contains(r#""25x" is not a duration (unknown unit "x")"#),
        "{err}"
    );
}

#[test]
fn keys_inside_lists_are_attributed_to_their_file() {
    let f = Yaml::new(
        "dims.yaml",
        "dimensions:\n  - { label: outcome, attribute: x }\n",
    );
    let err = f.err();
    assert!(
        err.starts_with(&format!("dimensions[0].label {}:", f.named())),
        "{err}"
    );
    assert!(!err.contains("default"), "{err}");
    // The second element, and a key missing there.
    let f = Yaml::new(
        "dims2.yaml",
        "dimensions:\n  - { label: a, attribute: x }\n  - { label: b }\n",
    );
    let err = f.err();
    assert!(
        err.starts_with(&format!(
            "dimensions[1].attribute {}: is required",
            f.named()
        )),
        "{err}"
    );
}

#[test]
fn environment_variables_are_named_in_validation_errors_as_in_type_errors() {
    let validation = error(None, &[("FLOWMETRICS_LIMITS__MAX_IN_FLIGHT", "0")]);
    let type_error = error(None, &[("FLOWMETRICS_LIMITS__MAX_IN_FLIGHT", "lots")]);
    let named = "limits.max_in_flight from environment variable FLOWMETRICS_LIMITS__MAX_IN_FLIGHT:";
    assert!(validation.starts_with(named), "{validation}");
    assert!(type_error.starts_with(named), "{type_error}");
    assert!(validation.ends_with("must be at least 1"), "{validation}");
    assert!(
        type_error.ends_with(r#""lots" is not a whole number (0 or more)"#),
        "{type_error}"
    );
}

#[test]
fn one_path_notation_and_one_way_to_name_a_file() {
    // A figment (type) error and a validation error inside the same list.
    let typed = Yaml::new("typed.yaml", "flows:\n  default:\n    buckets: [1, x]\n");
    let checked = Yaml::new("checked.yaml", "flows:\n  default:\n    buckets: [2, 1]\n");
    let typed_err = typed.err();
    let checked_err = checked.err();
    assert!(
        typed_err.starts_with(&format!("flows.default.buckets[1] {}:", typed.named())),
        "{typed_err}"
    );
    assert!(
        checked_err.starts_with(&format!("flows.default.buckets {}:", checked.named())),
        "{checked_err}"
    );
    // Flow names with dots are quoted, not split.
    let f = Yaml::new(
        "per-flow.yaml",
        "flows:\n  per_flow:\n    checkout.pay: { timeout: 0s }\n",
    );
    let err = f.err();
    assert!(
        err.starts_with(&format!(
            r#"flows.per_flow["checkout.pay"].timeout {}:"#,
            f.named()
        )),
        "{err}"
    );
    // A missing file and a broken one are named the same way.
    let missing = error(Some(Path::new("/nonexistent/fm.yaml")), &[]);
    assert_eq!(missing, "config file /nonexistent/fm.yaml: does not exist");
    let broken = Yaml::new("broken.yaml", "listen: [\n");
    let err = broken.err();
    assert!(
        err.starts_with(&format!(
            "config file {}: not valid YAML: ",
            broken.path().display()
        )),
        "{err}"
    );
}

#[test]
fn the_shared_store_is_checked_at_start() {
    let e = error(
        None,
        &[
            ("FLOWMETRICS_CORRELATION__STORE", "redis"),
            ("FLOWMETRICS_CORRELATION__REDIS__URL", "127.0.0.1:6379"),
        ],
    );
    assert!(e.contains("correlation.redis.url"), "{e}");
    let e = error(None, &[("FLOWMETRICS_CORRELATION__STORE", "memcached")]);
    assert!(e.contains("correlation.store"), "{e}");
    let ok = Config::load(
        None,
        [(
            "FLOWMETRICS_CORRELATION__STORE".to_string(),
            "redis".to_string(),
        )],
    )
    .expect("the defaults name a local Redis");
    assert_eq!(ok.correlation.redis.key_prefix, "flowmetrics:");
}

/// `network_flows.dimensions` may not take a label of the flow families (`flow`,
/// `outcome`, …) any more than one of the network families (`direction`): each would
/// put rows that are not flows on the overview page.
#[test]
fn network_dimensions_refuse_the_labels_flow_and_network_families_use() {
    for label in ["flow", "outcome", "error_reason", "le", "direction"] {
        let f = Yaml::new(
            &format!("network-dim-{label}.yaml"),
            &format!("network_flows:\n  dimensions:\n    - {{ label: {label}, attribute: x }}\n"),
        );
        let err = f.err();
        assert!(
            err.contains("network_flows.dimensions[0].label") && err.contains("reserved"),
            "{label}: {err}"
        );
    }
}

#[test]
fn objective_errors_name_the_key_and_the_source() {
    let f = Yaml::new(
        "objective-target.yaml",
        "flows:\n  per_flow:\n    checkout:\n      objective: { target: 1.0, within: 30s }\n",
    );
    let err = f.err();
    assert!(
        err.starts_with(&format!(
            "flows.per_flow.checkout.objective.target {}:",
            f.named()
        )),
        "{err}"
    );
    assert!(err.contains("strictly between 0 and 1"), "{err}");
    let f = Yaml::new(
        "objective-within.yaml",
        "flows:\n  default:\n    objective: { target: 0.99, within: 0s }\n",
    );
    let err = f.err();
    assert!(
        err.starts_with(&format!("flows.default.objective.within {}:", f.named())),
        "{err}"
    );
    assert!(err.ends_with("must be longer than 0s"), "{err}");
    let err = error(None, &[("FLOWMETRICS_FLOWS__DEFAULT__OVERDUE_AFTER", "0s")]);
    assert!(
        err.starts_with(
            "flows.default.overdue_after from environment variable FLOWMETRICS_FLOWS__DEFAULT__OVERDUE_AFTER:"
        ),
        "{err}"
    );
    let err = error(
        None,
        &[("FLOWMETRICS_FLOWS__DEFAULT__OBJECTIVE__TARGET", "0")],
    );
    assert!(
        err.starts_with("flows.default.objective"),
        "a target without the rest, or out of range, is named: {err}"
    );
    let f = Yaml::new(
        "objective-key.yaml",
        "flows:\n  default:\n    objective: { target: 0.9, whithin: 1s }\n",
    );
    let err = f.err();
    assert!(
        err.starts_with(&format!("flows.default.objective.whithin {}:", f.named())),
        "{err}"
    );
}
