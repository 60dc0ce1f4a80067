//! One flowmetrics for every input: the pipeline of a running App (listeners on
//! ephemeral loopback ports), its limits, its extractor configuration.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, OnceLock};

use flowmetrics::config::{Config, Dimension, DimensionSource};
use flowmetrics::flows::Extractor;
use flowmetrics::ingest::limits::Limits;
use flowmetrics::pipeline::Pipeline;

pub struct World {
    pub pipeline: Arc<Pipeline>,
    pub limits: Limits,
    // Kept here (reachable, so not a leak to LeakSanitizer) for the whole run.
    _app: Mutex<flowmetrics::RunningApp>,
    _runtime: tokio::runtime::Runtime,
}

/// The extractor alone (the scanner target needs no service).
pub fn extractor() -> &'static Extractor {
    static EXTRACTOR: OnceLock<Extractor> = OnceLock::new();
    EXTRACTOR.get_or_init(|| Extractor::new(flowmetrics::settings::extractor(&config())))
}

pub fn config() -> Config {
    let mut c = Config::default();
    c.listen.otlp_http = "127.0.0.1:0".into();
    c.listen.otlp_grpc = "127.0.0.1:0".into();
    c.listen.metrics = "127.0.0.1:0".into();
    // Small, so that a long run stays small.
    c.limits.max_in_flight = 10_000;
    c.limits.max_series_per_metric = 100;
    c.limits.max_request_body_bytes = 1024 * 1024;
    c.limits.max_buffered_bytes = 64 * 1024 * 1024;
    // Steps: one flow with a declared list (`unknown_step`), a small cap for the others
    // (`too_many_steps`), so both extraction paths meet every step verdict.
    c.limits.max_steps_per_flow = 4;
    c.flows.per_flow.insert(
        "order".into(),
        flowmetrics::config::FlowOverride {
            steps: Some(vec!["placed".into(), "paid".into(), "shipped".into()]),
            ..Default::default()
        },
    );
    c.dimensions = vec![
        Dimension {
            label: "tier".into(),
            attribute: "tier".into(),
            from: DimensionSource::Start,
            default: Some("none".into()),
        },
        Dimension {
            label: "service".into(),
            attribute: "service.name".into(),
            from: DimensionSource::End,
            default: None,
        },
    ];
    c
}

pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let config = config();
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let app = runtime
            .block_on(flowmetrics::App::new(config.clone()).start())
            .expect("flowmetrics starts");
        World {
            pipeline: app.pipeline.clone(),
            limits: Limits::new(flowmetrics::settings::limits(&config)),
            _app: Mutex::new(app),
            _runtime: runtime,
        }
    })
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn deflate(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 1).unwrap()
}
