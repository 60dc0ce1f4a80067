use super::values::byte_size;
use super::*;
use crate::model::sanitize_label_name;
use std::io::Write;
use std::num::NonZero;
use std::path::Path;
use std::time::Duration;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn yaml_file(text: &str) -> tempfile_lite::TempFile {
    let f = tempfile_lite::TempFile::new("yaml");
    std::fs::File::create(&f.path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    f
}

/// The error `yaml` gives as a config file, and the file's name (which it must name).
fn file_error(yaml: &str) -> (String, String) {
    let f = yaml_file(yaml);
    let err = Config::load(Some(&f.path), env(&[])).unwrap_err();
    let name = f.path.file_name().unwrap().to_str().unwrap();
    (err.to_string(), name.to_string())
}

/// The configuration `yaml` gives as a config file.
fn file_config(yaml: &str) -> Config {
    let f = yaml_file(yaml);
    Config::load(Some(&f.path), env(&[])).unwrap()
}

/// The configuration the given environment variables give.
fn env_config(pairs: &[(&str, &str)]) -> Config {
    Config::load(None, env(pairs)).unwrap()
}

/// The error the given environment variables give.
fn env_error(pairs: &[(&str, &str)]) -> String {
    Config::load(None, env(pairs)).unwrap_err().to_string()
}

/// A tiny self-cleaning temp file, to avoid a dev-dependency for one helper.
mod tempfile_lite {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    pub struct TempFile {
        pub path: PathBuf,
    }
    impl TempFile {
        pub fn new(ext: &str) -> Self {
            let n = N.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("flowmetrics-test-{}-{n}.{ext}", std::process::id()));
            Self { path }
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[test]
fn a_redis_cluster_is_a_list_of_nodes_with_16_shards_by_default() {
    let c = file_config("correlation:\n  store: redis\n  redis:\n    cluster: [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n",);
    assert_eq!(c.correlation.redis.cluster.len(), 2);
    assert_eq!(c.correlation.redis.shard_count(), 16);
    let one = env_config(&[("FLOWMETRICS_CORRELATION__STORE", "redis")]);
    assert_eq!(one.correlation.redis.shard_count(), 1);
    let c = env_config(&[
        ("FLOWMETRICS_CORRELATION__STORE", "redis"),
        (
            "FLOWMETRICS_CORRELATION__REDIS__CLUSTER",
            "[redis://a:1, redis://b:2]",
        ),
        ("FLOWMETRICS_CORRELATION__REDIS__SHARDS", "64"),
    ]);
    assert_eq!(c.correlation.redis.cluster, ["redis://a:1", "redis://b:2"]);
    assert_eq!(c.correlation.redis.shard_count(), 64);
    let tls = env_config(&[
        ("FLOWMETRICS_CORRELATION__STORE", "redis"),
        ("FLOWMETRICS_CORRELATION__REDIS__URL", "rediss://r:6380/0"),
        ("FLOWMETRICS_CORRELATION__REDIS__CA_FILE", "/etc/ca.pem"),
    ]);
    assert_eq!(tls.correlation.redis.ca_file, "/etc/ca.pem");
    // The nodes may also be listed in `url`: a YAML list, or a comma-separated string.
    let c = file_config("correlation:\n  store: redis\n  redis:\n    url: [\"redis://10.0.0.1:6379\", \"redis://10.0.0.2:6379\"]\n",);
    assert_eq!(
        c.correlation.redis.target().urls(),
        ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]
    );
    assert_eq!(c.correlation.redis.shard_count(), 16);
    let c = env_config(&[
        ("FLOWMETRICS_CORRELATION__STORE", "redis"),
        (
            "FLOWMETRICS_CORRELATION__REDIS__URL",
            "redis://a:1, redis://b:2",
        ),
    ]);
    assert_eq!(
        c.correlation.redis.target(),
        RedisTarget::Cluster {
            nodes: vec!["redis://a:1".into(), "redis://b:2".into()],
            listed_in: NodeList::Url
        }
    );
    let bad = env_error(&[
        ("FLOWMETRICS_CORRELATION__STORE", "redis"),
        (
            "FLOWMETRICS_CORRELATION__REDIS__URL",
            "[redis://a:1, http://b:2]",
        ),
    ]);
    assert!(bad.contains("correlation.redis.url[1]"), "{bad}");
}

#[test]
fn a_bad_redis_cluster_setting_fails_naming_the_key() {
    for (pairs, key) in [
        (
            vec![(
                "FLOWMETRICS_CORRELATION__REDIS__CLUSTER",
                "[redis://a:1, http://b:2]",
            )],
            "correlation.redis.cluster[1]",
        ),
        (
            vec![
                ("FLOWMETRICS_CORRELATION__REDIS__CLUSTER", "[redis://a:1]"),
                ("FLOWMETRICS_CORRELATION__REDIS__URL", "redis://c:3"),
            ],
            "correlation.redis.cluster",
        ),
        (
            vec![
                ("FLOWMETRICS_CORRELATION__REDIS__CLUSTER", "[redis://a:1]"),
                ("FLOWMETRICS_CORRELATION__REDIS__KEY_PREFIX", "fm{x}:"),
            ],
            "correlation.redis.key_prefix",
        ),
        (
            vec![("FLOWMETRICS_CORRELATION__REDIS__SHARDS", "0")],
            "correlation.redis.shards",
        ),
        (
            vec![("FLOWMETRICS_CORRELATION__REDIS__CA_FILE", "/etc/ca.pem")],
            "correlation.redis.ca_file",
        ),
        (
            vec![("FLOWMETRICS_CORRELATION__REDIS__URL", "tcp://a:1")],
            "correlation.redis.url",
        ),
        (
            vec![(
                "FLOWMETRICS_CORRELATION__REDIS__URL",
                "rediss://a:1/0#insecure",
            )],
            "correlation.redis.url",
        ),
        (
            vec![("FLOWMETRICS_CORRELATION__REDIS__SHARDS", "1025")],
            "correlation.redis.shards",
        ),
    ] {
        let mut pairs = pairs;
        pairs.push(("FLOWMETRICS_CORRELATION__STORE", "redis"));
        let err = Config::load(None, env(&pairs)).unwrap_err().to_string();
        assert!(err.starts_with(key), "{key}: {err}");
    }
}

#[test]
fn defaults_need_no_file() {
    let c = env_config(&[]);
    assert_eq!(c.listen.otlp_http, "127.0.0.1:4318");
    assert_eq!(c.listen.metrics, "127.0.0.1:9464");
    assert_eq!(c.flows.default.timeout, Duration::from_secs(300));
    assert_eq!(c.flows.default.buckets.len(), 18);
    assert_eq!(c.limits.max_in_flight, 1_000_000);
    assert_eq!(c.limits.dedup_window, Duration::from_secs(300));
}

#[test]
fn histogram_kinds_and_label_value_bound_are_checked() {
    let c = file_config("flows:\n  default: { histogram: native }\n  per_flow:\n    pay: { histogram: both, native_max_buckets: 40 }\nlimits:\n  max_label_value_bytes: 64\n",);
    assert_eq!(c.flows.default.histogram, HistogramKind::Native);
    assert_eq!(c.flows.default.native_bucket_factor, 1.1);
    assert_eq!(c.flows.per_flow["pay"].histogram, Some(HistogramKind::Both));
    assert_eq!(
        c.flows.per_flow["pay"].native_max_buckets.map(NonZero::get),
        Some(40)
    );
    assert_eq!(c.limits.max_label_value_bytes.get(), 64);
    for (yaml, key) in [
        (
            "flows:\n  default: { histogram: sparse }\n",
            "flows.default.histogram",
        ),
        (
            "flows:\n  default: { native_bucket_factor: 1 }\n",
            "flows.default.native_bucket_factor",
        ),
        (
            "flows:\n  per_flow:\n    pay: { native_max_buckets: 0 }\n",
            "flows.per_flow.pay.native_max_buckets",
        ),
        (
            "limits:\n  max_label_value_bytes: 0\n",
            "limits.max_label_value_bytes",
        ),
    ] {
        let (err, _) = file_error(yaml);
        assert!(err.contains(key), "{yaml}: {err}");
    }
}

#[test]
fn env_overrides_file_and_numbers_are_accepted() {
    let f = yaml_file("listen:\n  metrics: 127.0.0.1:1000\nflows:\n  default:\n    timeout: 1m\n");
    let c = Config::load(
        Some(&f.path),
        env(&[
            ("FLOWMETRICS_LISTEN__METRICS", "9465"),
            ("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "10s"),
            ("FLOWMETRICS_LISTEN__OTLP_GRPC", ""),
            ("FLOWMETRICS_EVENTS__PREFIX", "biz."),
            ("FLOWMETRICS_CONFIG", "/ignored/by/load"),
            ("OTHER_VAR", "x"),
        ]),
    )
    .unwrap();
    assert_eq!(c.listen.metrics, "127.0.0.1:9465");
    assert_eq!(c.flows.default.timeout, Duration::from_secs(10));
    assert_eq!(c.listen.otlp_grpc, "");
    assert_eq!(c.events.prefix, "biz.");
}

#[test]
fn file_values_apply() {
    let c = file_config("events:\n  correlation_keys: [order.id]\nflows:\n  per_flow:\n    order_processing: { timeout: 30m }\nlog: { level: debug, format: json }\n",);
    assert_eq!(c.events.correlation_keys, vec!["order.id"]);
    assert_eq!(c.timeout_for("order_processing"), Duration::from_secs(1800));
    assert_eq!(c.timeout_for("other"), Duration::from_secs(300));
    assert_eq!(c.log.format, LogFormat::Json);
}

#[test]
fn unknown_keys_fail_naming_key_and_source() {
    let (err, file) = file_error("listen:\n  metrix: 1.2.3.4:5\n");
    assert!(err.contains("metrix"), "{err}");
    assert!(err.contains(&file), "{err}");

    let err = env_error(&[("FLOWMETRICS_BOGUS", "1")]);
    assert!(err.contains("bogus"), "{err}");
    assert!(err.contains("FLOWMETRICS_"), "{err}");
}

#[test]
fn bad_values_fail_naming_key_and_source() {
    let err = env_error(&[("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "soon")]);
    assert!(err.contains("timeout"), "{err}");
    assert!(err.contains("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT"), "{err}");

    let (err, _) = file_error("listen:\n  otlp_http: not-an-address\n");
    assert!(err.contains("otlp_http"), "{err}");

    let (err, file) = file_error("flows:\n  default:\n    buckets: [1, 0.5]\n");
    assert!(err.contains("flows.default.buckets"), "{err}");
    assert!(err.contains(&file), "{err}");
}

#[test]
fn missing_file_is_an_error() {
    let err = Config::load(Some(Path::new("/nonexistent/fm.yaml")), env(&[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/fm.yaml"), "{err}");
}

#[test]
fn dimension_labels_are_sanitised_and_checked() {
    assert_eq!(sanitize_label_name("service.name"), "service_name");
    assert_eq!(sanitize_label_name("1abc"), "_1abc");
    let (err, _) = file_error("dimensions:\n  - { label: outcome, attribute: x }\n");
    assert!(err.contains("reserved"), "{err}");
    let (err, _) = file_error(
        "dimensions:\n  - { label: a.b, attribute: x }\n  - { label: a_b, attribute: y }\n",
    );
    assert!(err.contains("another dimension"), "{err}");
}

#[test]
fn limits_keys_parse_and_are_range_checked() {
    let c = file_config("limits:\n  max_connections: 12\n  idle_timeout: 1s\n  request_read_timeout: 2s\n  max_buffered_bytes: 128MiB\n",);
    assert_eq!(c.limits.max_connections, MaxConnections::Fixed(12));
    assert_eq!(c.limits.idle_timeout, Duration::from_secs(1));
    assert_eq!(c.limits.request_read_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.max_buffered_bytes, 128 << 20);
    let c = env_config(&[
        ("FLOWMETRICS_LIMITS__MAX_CONNECTIONS", "auto"),
        ("FLOWMETRICS_LIMITS__MAX_BUFFERED_BYTES", "100000000"),
    ]);
    assert_eq!(c.limits.max_connections, MaxConnections::Auto);
    assert_eq!(c.limits.max_buffered_bytes, 100_000_000);
    assert_eq!(byte_size::parse("64 MB"), Some(64_000_000));
    assert_eq!(byte_size::parse("1g"), Some(1_000_000_000));
    assert_eq!(byte_size::parse("99999999999999999999GiB"), None);
    assert_eq!(byte_size::parse("lots"), None);
    // Renders back as it reads.
    let again = yaml_file(&Config::default().to_yaml());
    assert_eq!(
        Config::load(Some(&again.path), env(&[]))
            .unwrap()
            .limits
            .max_buffered_bytes,
        512 << 20
    );

    for (var, value, key) in [
        // limit + 1 used to wrap to 0: every compressed body decoded to nothing.
        (
            "FLOWMETRICS_LIMITS__MAX_REQUEST_BODY_BYTES",
            "18446744073709551615",
            "limits.max_request_body_bytes",
        ),
        (
            "FLOWMETRICS_LIMITS__MAX_REQUEST_BODY_BYTES",
            "3000000000",
            "limits.max_request_body_bytes",
        ),
        (
            "FLOWMETRICS_LIMITS__MAX_BUFFERED_BYTES",
            "1MiB",
            "limits.max_buffered_bytes",
        ),
        (
            "FLOWMETRICS_LIMITS__MAX_BUFFERED_BYTES",
            "4TiB",
            "limits.max_buffered_bytes",
        ),
        (
            "FLOWMETRICS_LIMITS__MAX_CONNECTIONS",
            "0",
            "limits.max_connections",
        ),
        (
            "FLOWMETRICS_LIMITS__MAX_CONNECTIONS",
            "many",
            "limits.max_connections",
        ),
        (
            "FLOWMETRICS_LIMITS__IDLE_TIMEOUT",
            "0s",
            "limits.idle_timeout",
        ),
        (
            "FLOWMETRICS_LIMITS__REQUEST_READ_TIMEOUT",
            "400d",
            "limits.request_read_timeout",
        ),
        (
            "FLOWMETRICS_LIMITS__RESPONSE_WRITE_TIMEOUT",
            "10ms",
            "limits.response_write_timeout",
        ),
    ] {
        let err = env_error(&[(var, value)]);
        assert!(err.contains(key), "{var}={value}: {err}");
        assert!(err.contains(var), "{var}={value}: {err}");
    }
}

#[test]
fn huge_durations_are_errors_not_panics() {
    for (text, key) in [
        ("limits:\n  dedup_window: 1e30\n", "dedup_window"),
        ("flows:\n  default:\n    timeout: 1e300\n", "timeout"),
        (
            "flows:\n  default:\n    timeout: 1e12\n",
            "flows.default.timeout",
        ),
        (
            "flows:\n  per_flow:\n    a: { timeout: 100000000000 }\n",
            "flows.per_flow.a.timeout",
        ),
        ("limits:\n  dedup_window: 999999999y\n", "dedup_window"),
    ] {
        let (err, file) = file_error(text);
        assert!(err.contains(key), "{text}: {err}");
        assert!(err.contains(&file), "{text}: {err}");
    }
}

#[test]
fn step_settings_load_and_bad_ones_name_key_and_source() {
    let c = file_config("events: { step_suffix: .reached, step_key: stage }\nflows:\n  per_flow:\n    order.v2: { steps: [placed, payment_authorized, shipped] }\nlimits: { max_steps_per_flow: 8 }\n",);
    assert_eq!(
        (&*c.events.step_suffix, &*c.events.step_key),
        (".reached", "stage")
    );
    assert_eq!(c.limits.max_steps_per_flow, 8);
    assert_eq!(
        c.flows.per_flow["order.v2"].steps.as_deref(),
        Some(
            &[
                "placed".to_string(),
                "payment_authorized".into(),
                "shipped".into()
            ][..]
        )
    );
    let d = Config::default();
    assert_eq!(
        (&*d.events.step_suffix, &*d.events.step_key),
        (".step", "step")
    );
    assert_eq!(d.limits.max_steps_per_flow, 32);
    let long = "s".repeat(65);
    for (text, key) in [
        (
            "flows:\n  per_flow:\n    o: { steps: [a, b, a] }\n".to_string(),
            "flows.per_flow.o.steps[2]",
        ),
        (
            "flows:\n  per_flow:\n    o: { steps: [a, \"b c\"] }\n".into(),
            "flows.per_flow.o.steps[1]",
        ),
        (
            format!("flows:\n  per_flow:\n    o: {{ steps: [{long}] }}\n"),
            "flows.per_flow.o.steps[0]",
        ),
        (
            "flows:\n  per_flow:\n    o: { steps: [] }\n".into(),
            "flows.per_flow.o.steps",
        ),
        (
            "limits: { max_steps_per_flow: 0 }\n".into(),
            "limits.max_steps_per_flow",
        ),
        (
            "events: { step_suffix: .end }\n".into(),
            "events.step_suffix",
        ),
        ("events: { step_key: \"\" }\n".into(), "events.step_key"),
    ] {
        let (err, file) = file_error(&text);
        assert!(err.contains(key), "{text}: {err}");
        assert!(err.contains(&file), "{text}: {err}");
    }
    let err = env_error(&[("FLOWMETRICS_LIMITS__MAX_STEPS_PER_FLOW", "0")]);
    assert!(
        err.contains("FLOWMETRICS_LIMITS__MAX_STEPS_PER_FLOW"),
        "{err}"
    );
}

#[test]
fn effective_config_renders_and_reloads() {
    let c = env_config(&[]);
    let yaml = c.to_yaml();
    assert!(yaml.contains("timeout: 5m"), "{yaml}");
    let again = file_config(&yaml);
    assert_eq!(again.flows.default.timeout, c.flows.default.timeout);
}

#[test]
fn counts_of_at_least_one_are_typed_and_refuse_0_naming_key_and_source() {
    let c = env_config(&[]);
    assert_eq!(c.correlation.redis.pool_size.get(), 8);
    assert_eq!(c.events.max_correlation_id_bytes.get(), 256);
    assert_eq!(c.flows.default.native_max_buckets.get(), 160);
    for (var, key) in [
        (
            "FLOWMETRICS_CORRELATION__REDIS__POOL_SIZE",
            "correlation.redis.pool_size",
        ),
        (
            "FLOWMETRICS_EVENTS__MAX_CORRELATION_ID_BYTES",
            "events.max_correlation_id_bytes",
        ),
        (
            "FLOWMETRICS_LIMITS__MAX_LABEL_VALUE_BYTES",
            "limits.max_label_value_bytes",
        ),
        (
            "FLOWMETRICS_FLOWS__DEFAULT__NATIVE_MAX_BUCKETS",
            "flows.default.native_max_buckets",
        ),
    ] {
        let err = env_error(&[(var, "0")]);
        assert_eq!(
            err,
            format!("{key} from environment variable {var}: must be at least 1")
        );
        let err = env_error(&[(var, "lots")]);
        assert!(
            err.ends_with(r#""lots" is not a whole number (0 or more)"#),
            "{err}"
        );
    }
}

#[test]
fn errors_are_typed_by_what_went_wrong() {
    let err = Config::load(Some(Path::new("/nonexistent/fm.yaml")), env(&[])).unwrap_err();
    assert!(matches!(
        err,
        ConfigError::File {
            reason: crate::config_checks::ConfigFileError::Missing,
            ..
        }
    ));
    let err = Config::load(None, env(&[("FLOWMETRICS_LIMITS__MAX_IN_FLIGHT", "0")])).unwrap_err();
    let ConfigError::Invalid {
        key,
        origin,
        problem,
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!(key, Key::root("limits").field("max_in_flight"));
    assert_eq!(
        origin,
        Origin::Env("FLOWMETRICS_LIMITS__MAX_IN_FLIGHT".into())
    );
    assert_eq!(problem, Problem::AtLeastOne);
    let err = Config::load(
        None,
        env(&[("FLOWMETRICS_FLOWS__DEFAULT__TIMEOUT", "soon")]),
    )
    .unwrap_err();
    let ConfigError::Unreadable(all) = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(&all[..], [ReadError::Value { key, origin: Origin::Env(_), .. }]
            if *key == Key::root("flows").field("default").field("timeout")),
        "{err}"
    );
}

#[test]
fn keys_render_in_one_notation() {
    let flow = Key::root("flows").field("per_flow").field("checkout.pay");
    assert_eq!(flow.to_string(), r#"flows.per_flow["checkout.pay"]"#);
    assert_eq!(
        flow.field("steps").index(2).to_string(),
        r#"flows.per_flow["checkout.pay"].steps[2]"#
    );
    assert_eq!(
        Key::root("dimensions").index(0).field("label").to_string(),
        "dimensions[0].label"
    );
}

#[test]
fn a_redis_target_is_one_server_or_a_cluster() {
    let mut redis = RedisSection::default();
    assert_eq!(
        redis.target(),
        RedisTarget::Server("redis://127.0.0.1:6379/0".into())
    );
    redis.cluster = vec!["redis://a:1".into()];
    assert_eq!(
        redis.target(),
        RedisTarget::Cluster {
            nodes: vec!["redis://a:1".into()],
            listed_in: NodeList::Cluster
        }
    );
    assert_eq!(redis.shard_count(), 16);
}
