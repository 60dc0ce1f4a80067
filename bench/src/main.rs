//! flowmetrics-bench: the numbers of `BENCHMARKS.md`.
//!
//! ```text
//! cargo run --release -p flowmetrics-bench -- [--quick] [--json PATH] [--only LIST]
//!     [--server PATH] [--steady SECS] [--profile-pipeline BATCHES]
//!     [--profile-sparse BATCHES] [--profile-network BATCHES] [--profile-steps BATCHES]
//!     [--profile-scan BODIES] [--profile-moka BATCHES]
//! ```
//!
//! Prints one table and writes it as JSON. Every throughput is also given as a ratio to
//! the baseline measured in the same run (`prost` decode of the same bytes, one thread),
//! because timings on shared machines are noisy. End-to-end rows run the real
//! `flowmetrics` binary as a child process pinned to CPU 0, the load generator pinned to
//! CPU 1. Only 127.0.0.1 is used. Every loop is bounded in count and in time.

mod inproc;
mod load;
mod objectives;
mod scrape_load;
mod server;
mod sink;
mod state;
mod workload;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use serde_json::{json, Value};

use inproc::Budget;
use load::{Load, LoadResult, Wire};
use server::{metric_sum, metric_sum_where, Server};
use workload::{Shape, Template, LAG, SPANS_PER_BATCH};

/// flowmetrics-bench: throughput, latency, memory, scrape and timeliness of flowmetrics.
#[derive(Parser)]
#[command(name = "flowmetrics-bench")]
struct Args {
    /// Small sizes, seconds (CI)
    #[arg(long)]
    quick: bool,
    /// Where to write the results [default: target/flowmetrics-bench.json]
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Comma-separated sections: pipeline,e2e,memory,scrape,timeliness,network (the
    /// baseline always runs); `state` (the state file, on its own: only when named) runs
    /// alone, as does `objectives` (the cost of counting overdue instances at 1M open)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    only: Option<Vec<String>>,
    /// The flowmetrics binary to start [default: built next to this one]
    #[arg(long, value_name = "PATH")]
    server: Option<PathBuf>,
    /// Length of the steady-load RSS run in seconds (full: 600, quick: 2)
    #[arg(long, value_name = "SECS")]
    steady: Option<u64>,
    /// Run only N batches through the in-process pipeline (for valgrind
    /// --tool=callgrind --toggle-collect='*measured_batch*')
    #[arg(long, value_name = "N")]
    profile_pipeline: Option<u64>,
    /// The same with the sparse workload (1 span in 10 with an event)
    #[arg(long, value_name = "N")]
    profile_sparse: Option<u64>,
    /// The same with every span a network Flow Span
    #[arg(long, value_name = "N")]
    profile_network: Option<u64>,
    /// The same with the steps workload (start, 4 steps, end per instance)
    #[arg(long, value_name = "N")]
    profile_steps: Option<u64>,
    /// Only the scan (the walk that finds flow events, nothing applied) of the rare
    /// workload's body, N times, timed (valgrind --toggle-collect='*measured_scan*')
    #[arg(long, value_name = "N")]
    profile_scan: Option<u64>,
    /// Only the moka-alone baseline for N batches (valgrind --toggle-collect='*moka_batch*':
    /// the cache's operations alone, 500 per warm-up batch and 1,000 per batch after)
    #[arg(long, value_name = "N")]
    profile_moka: Option<u64>,
    /// Serve as the transport-only server of the ceiling row (the harness starts its
    /// own binary so)
    #[arg(long, hide = true)]
    sink_server: bool,
    /// Ignored: the ceiling server is started as `flowmetrics` is, with a config file
    #[arg(long, hide = true, value_name = "PATH")]
    config: Option<PathBuf>,
}

impl Args {
    /// Whether `--only` names `section`.
    fn names(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_some_and(|o| o.iter().any(|s| s.trim() == section))
    }

    /// Whether `section` runs: named by `--only`, or no `--only` at all.
    fn wants(&self, section: &str) -> bool {
        self.only.is_none() || self.names(section)
    }

    /// The `--profile-*` run asked for: the workload and its batches.
    fn profile(&self) -> Option<(Shape, u64)> {
        [
            (self.profile_pipeline, Shape::Flow),
            (self.profile_sparse, Shape::Sparse),
            (self.profile_network, Shape::NetworkAll),
            (self.profile_steps, Shape::Steps),
        ]
        .into_iter()
        .find_map(|(batches, shape)| Some((shape, batches?)))
    }
}

/// Sizes and durations of one mode.
struct Sizes {
    inproc: Budget,
    warmup: Duration,
    measure: Duration,
    gzip_bodies: u64,
    memory: [u64; 2],
    steady: Duration,
    encode_reps: usize,
    timeliness: usize,
    timeliness_spread: Duration,
}

impl Sizes {
    fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                inproc: Budget {
                    max_batches: 300,
                    max_time: Duration::from_millis(500),
                },
                warmup: Duration::from_millis(300),
                measure: Duration::from_secs(1),
                gzip_bodies: 200,
                memory: [10_000, 50_000],
                steady: Duration::from_secs(2),
                encode_reps: 3,
                timeliness: 2_000,
                timeliness_spread: Duration::from_millis(200),
            }
        } else {
            Sizes {
                inproc: Budget {
                    max_batches: 50_000,
                    max_time: Duration::from_secs(5),
                },
                warmup: Duration::from_secs(2),
                measure: Duration::from_secs(10),
                // Enough for warm-up plus the measured 10 s at ~1,000 requests/s.
                gzip_bodies: 15_000,
                memory: [100_000, 1_000_000],
                // The issue's target: flat RSS over ten minutes of steady load.
                steady: Duration::from_secs(600),
                encode_reps: 20,
                timeliness: 100_000,
                timeliness_spread: Duration::from_secs(2),
            }
        }
    }
}

/// One line of the table.
struct Row {
    section: u8,
    id: &'static str,
    name: String,
    value: f64,
    unit: &'static str,
    ratio: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    notes: String,
    extra: Value,
}

impl Row {
    fn new(
        section: u8,
        id: &'static str,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            section,
            id,
            name: name.into(),
            value,
            unit,
            ratio: None,
            p50_ms: None,
            p99_ms: None,
            notes: String::new(),
            extra: Value::Null,
        }
    }

    fn json(&self) -> Value {
        json!({
            "section": self.section,
            "id": self.id,
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "ratio_to_baseline": self.ratio,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "notes": self.notes,
            "extra": self.extra,
        })
    }
}

struct Baselines {
    flow: f64,
    sparse: f64,
    rare: f64,
}

impl Baselines {
    fn for_shape(&self, shape: Shape) -> f64 {
        match shape {
            Shape::Sparse | Shape::NetworkSparse => self.sparse,
            Shape::Rare => self.rare,
            _ => self.flow,
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.sink_server {
        if let Err(e) = sink::serve_from_env() {
            eprintln!("flowmetrics-bench --sink-server: {e}");
            std::process::exit(1);
        }
        return;
    }
    if run_profile(&args) || run_alone(&args) {
        return;
    }
    let started = Instant::now();
    let machine = machine();
    let (run, mut rows) = Run::new(&args, &machine);
    if args.wants("pipeline") {
        rows.extend(pipeline_rows(&run));
    }
    let binary = binary_if_needed(&args);
    let mut e2e_protobuf = None;
    if let (true, Some(bin)) = (args.wants("e2e"), &binary) {
        let (e2e, protobuf) = e2e_rows(&run, bin);
        rows.extend(e2e);
        e2e_protobuf = protobuf;
    }
    if let (true, Some(bin)) = (args.wants("memory"), &binary) {
        rows.extend(memory_rows(&run, bin));
    }
    if args.wants("scrape") {
        rows.extend(scrape_rows(&run, binary.as_deref(), e2e_protobuf));
    }
    if let (true, Some(bin)) = (args.wants("network"), &binary) {
        network_rows(bin, &run.sizes, run.inproc_cpu, &mut rows);
    }
    if args.wants("timeliness") {
        rows.extend(timeliness_rows(&run.sizes));
    }
    println!("{}", render(&rows));
    write_results(&args, &run, machine, &rows, started);
}

/// `--profile-*`: one in-process workload for a profiler, and nothing else. Whether one
/// ran.
fn run_profile(args: &Args) -> bool {
    if let Some((shape, batches)) = args.profile() {
        profile(shape, batches);
        return true;
    }
    if let Some(batches) = args.profile_scan {
        inproc::scan_alone(&Template::new(Shape::Rare), batches);
        return true;
    }
    let Some(batches) = args.profile_moka else {
        return false;
    };
    let t = Template::new(Shape::Flow);
    let budget = inproc::Budget {
        max_batches: batches,
        max_time: Duration::from_secs(3600),
    };
    let r = inproc::moka_alone(&t, budget);
    eprintln!("profiled moka alone: {} batches", r.batches);
    true
}

/// The sections that run alone, only when named: `state`, `objectives`. Whether one ran.
fn run_alone(args: &Args) -> bool {
    let rows = if args.names("state") {
        progress("state file");
        state::run(args.quick)
    } else if args.names("objectives") {
        progress("objectives: overdue instances");
        objectives::run(args.quick)
    } else {
        return false;
    };
    println!("{}", serde_json::Value::Array(rows));
    true
}

/// What every section of a run shares: its sizes, its workloads, and the baselines
/// measured first.
struct Run {
    quick: bool,
    sizes: Sizes,
    flow: Arc<Template>,
    sparse: Arc<Template>,
    rare: Arc<Template>,
    starts: Arc<Template>,
    steps: Arc<Template>,
    starts_with_steps: Arc<Template>,
    /// The core the in-process measurements run on.
    inproc_cpu: usize,
    baselines: Baselines,
    moka_events_per_sec: f64,
}

impl Run {
    /// The workloads, and the baselines (section 2) measured: their rows.
    fn new(args: &Args, machine: &Value) -> (Run, Vec<Row>) {
        let mut sizes = Sizes::new(args.quick);
        if let Some(secs) = args.steady {
            sizes.steady = Duration::from_secs(secs);
        }
        let template = |shape| Arc::new(Template::new(shape));
        let (flow, sparse, rare) = (
            template(Shape::Flow),
            template(Shape::Sparse),
            template(Shape::Rare),
        );
        eprintln!(
            "flowmetrics-bench ({} mode) on {} CPUs, {}",
            if args.quick { "quick" } else { "full" },
            machine["cpus"],
            machine["cpu_model"].as_str().unwrap_or("?")
        );
        let inproc_cpu = std::env::var("BENCH_INPROC_CPU")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(server::LOAD_CPU);
        let (baselines, mut rows) = baseline_rows([&flow, &sparse, &rare], &sizes, inproc_cpu);
        let (moka_events_per_sec, moka) = moka_row(&flow, &sizes, inproc_cpu);
        rows.push(moka);
        let run = Run {
            quick: args.quick,
            sizes,
            flow,
            sparse,
            rare,
            starts: template(Shape::StartsOnly),
            steps: template(Shape::Steps),
            starts_with_steps: template(Shape::StartsWithSteps),
            inproc_cpu,
            baselines,
            moka_events_per_sec,
        };
        (run, rows)
    }
}

/// (2) Baseline: prost decode of the flow, sparse and rare workloads, same process and
/// run.
fn baseline_rows(
    templates: [&Arc<Template>; 3],
    sizes: &Sizes,
    inproc_cpu: usize,
) -> (Baselines, Vec<Row>) {
    progress("baseline: prost decode");
    let [flow, sparse, rare] =
        templates.map(|t| on_worker(inproc_cpu, || inproc::baseline(t, sizes.inproc)));
    let baselines = Baselines {
        flow: flow.spans_per_sec,
        sparse: sparse.spans_per_sec,
        rare: rare.spans_per_sec,
    };
    let ids = ["baseline_flow", "baseline_sparse", "baseline_rare"];
    let rows = templates
        .iter()
        .zip([&flow, &sparse, &rare])
        .zip(ids)
        .map(|((t, b), id)| baseline_row(2, id, t, b))
        .collect();
    (baselines, rows)
}

/// A baseline row: prost decode of the workload `t`, one thread.
fn baseline_row(section: u8, id: &'static str, t: &Template, b: &inproc::Throughput) -> Row {
    let mut row = Row::new(
        section,
        id,
        format!("baseline: prost decode, 1 thread [{}]", t.shape.label()),
        b.spans_per_sec,
        "spans/s",
    );
    row.ratio = Some(1.0);
    row.notes = format!("{} batches in {:.2} s", b.batches, b.secs);
    row
}

/// (2b) moka alone: the store's exact cache, one insert per start, one remove per end.
/// The flow workload's correlation cost can be no lower than this.
fn moka_row(flow: &Template, sizes: &Sizes, inproc_cpu: usize) -> (f64, Row) {
    progress("baseline: moka alone");
    let moka = on_worker(inproc_cpu, || inproc::moka_alone(flow, sizes.inproc));
    let mut row = Row::new(
        2,
        "baseline_moka_alone",
        "baseline: moka alone (the store's cache, 1 insert/start, 1 remove/end), 1 thread",
        moka.events_per_sec,
        "events/s",
    );
    row.ratio = Some(1.0);
    row.notes = format!("{} batches in {:.2} s", moka.batches, moka.secs);
    (moka.events_per_sec, row)
}

/// (3) Pipeline in process.
fn pipeline_rows(run: &Run) -> Vec<Row> {
    progress("pipeline in process");
    let mut rows = Vec::new();
    let mut flow_events_per_sec = None;
    for (t, id) in [
        (&run.flow, "pipeline_flow"),
        (&run.sparse, "pipeline_sparse"),
        (&run.rare, "pipeline_rare"),
        (&run.steps, "pipeline_steps"),
    ] {
        let p = on_worker(run.inproc_cpu, || inproc::pipeline(t, run.sizes.inproc));
        let (value, unit) = rate_for(t, p.events_per_sec, p.spans_per_sec);
        let mut row = Row::new(
            3,
            id,
            format!("pipeline in process, 1 thread [{}]", t.shape.label()),
            value,
            unit,
        );
        row.ratio = Some(p.spans_per_sec / run.baselines.for_shape(t.shape));
        let vs_moka = match (t.shape, flow_events_per_sec) {
            (Shape::Flow, _) => {
                flow_events_per_sec = Some(p.events_per_sec);
                format!(
                    "; {:.2}x moka alone",
                    p.events_per_sec / run.moka_events_per_sec
                )
            }
            // The steps workload against the pairs workload of this run.
            (Shape::Steps, Some(pairs)) => {
                format!("; {:.2}x the flow workload", p.events_per_sec / pairs)
            }
            _ => String::new(),
        };
        row.notes = format!(
            "{:.0} spans/s{vs_moka}; store housekeeping {:.0}% of time; {} batches",
            p.spans_per_sec,
            p.housekeeping_share * 100.0,
            p.batches
        );
        row.extra = json!({"spans_per_sec": p.spans_per_sec, "events_per_sec": p.events_per_sec,
            "housekeeping_share": p.housekeeping_share, "batches": p.batches, "secs": p.secs});
        rows.push(row);
    }
    rows
}

/// The binary to start, when a section that starts one is wanted; exits when there is
/// none.
fn binary_if_needed(args: &Args) -> Option<PathBuf> {
    let needs_server = ["e2e", "memory", "scrape", "network"]
        .iter()
        .any(|s| args.wants(s));
    if !needs_server {
        return None;
    }
    match server_binary(args) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("flowmetrics-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// The load of an end-to-end row: 4 connections over the run's warm-up and measured
/// window, no scrapes.
fn e2e_load(sizes: &Sizes, wire: Wire, template: Arc<Template>) -> Load {
    Load {
        wire,
        template,
        connections: 4,
        warmup: sizes.warmup,
        measure: sizes.measure,
        max_requests: 10_000_000,
        scrape_every: None,
        rss_every: None,
        first_batch: 0,
    }
}

/// (4) End to end, on every wire; also the HTTP/protobuf flow rate (for later rows).
fn e2e_rows(run: &Run, bin: &Path) -> (Vec<Row>, Option<f64>) {
    let default_config = base_config("", "");
    let runs: [(&'static str, &str, Wire, &Arc<Template>); 5] = [
        (
            "e2e_http_protobuf",
            "HTTP/protobuf",
            Wire::Protobuf,
            &run.flow,
        ),
        (
            "e2e_http_protobuf_sparse",
            "HTTP/protobuf",
            Wire::Protobuf,
            &run.sparse,
        ),
        (
            "e2e_http_protobuf_rare",
            "HTTP/protobuf",
            Wire::Protobuf,
            &run.rare,
        ),
        (
            "e2e_http_gzip",
            "HTTP/protobuf+gzip",
            Wire::Protobuf,
            &run.flow,
        ),
        ("e2e_grpc", "gRPC", Wire::Grpc, &run.flow),
    ];
    let mut rows = Vec::new();
    let mut e2e_protobuf = None;
    for (id, label, wire, t) in runs {
        let (wire, body_note) = if id == "e2e_http_gzip" {
            gzip_wire(t, &run.sizes)
        } else {
            (wire, format!("{} KiB bodies", t.bytes.len() / 1024))
        };
        let max_requests = match &wire {
            Wire::Gzip(pool) => pool.len() as u64,
            _ => 10_000_000,
        };
        progress(&format!("end to end: {label} [{}]", t.shape.label()));
        let server = start(bin, &default_config);
        let load = Load {
            max_requests,
            ..e2e_load(&run.sizes, wire, (*t).clone())
        };
        let r = load::run(&server, load);
        let counted = server.scrape();
        let name = format!("end to end {label}, 4 conns, server 1 core");
        let mut row = e2e_row(4, id, &name, t, &r, &run.baselines, &counted);
        row.notes = format!("{}; {body_note}", row.notes);
        if id == "e2e_http_protobuf" {
            e2e_protobuf = Some(r.events_per_sec);
            row.notes = format!(
                "{}; {:.2}x moka alone",
                row.notes,
                r.events_per_sec / run.moka_events_per_sec
            );
        }
        rows.push(row);
        if id == "e2e_http_protobuf_rare" {
            // Right after the rare row, on the same machine state.
            rows.push(ceiling_row(run, &rows));
        }
    }
    (rows, e2e_protobuf)
}

/// (4) The transport ceiling ([`sink`]): the rare workload's bodies sent as in row 4 to
/// a server that reads them and decodes nothing; the rare row as a share of it.
fn ceiling_row(run: &Run, e2e: &[Row]) -> Row {
    let t = &run.rare;
    progress(&format!(
        "end to end: transport ceiling, nothing decoded [{}]",
        t.shape.label()
    ));
    let exe = std::env::current_exe().unwrap_or_else(|e| {
        eprintln!("flowmetrics-bench: own binary: {e}");
        std::process::exit(1);
    });
    let sink = Server::start_with(&exe, &["--sink-server"], "").unwrap_or_else(|e| {
        eprintln!("flowmetrics-bench: {e}");
        std::process::exit(1);
    });
    let r = load::run(&sink, e2e_load(&run.sizes, Wire::Protobuf, (*t).clone()));
    let name =
        "transport ceiling: HTTP/protobuf bodies read whole and dropped, 4 conns, server 1 core";
    let mut row = e2e_row(4, "e2e_transport_ceiling", name, t, &r, &run.baselines, "");
    let rare = e2e
        .iter()
        .find(|row| row.id == "e2e_http_protobuf_rare")
        .and_then(|row| row.extra["spans_per_sec"].as_f64());
    if let Some(rare) = rare {
        let share = rare / r.spans_per_sec.max(1e-9);
        row.notes = format!("{}; rare row {share:.2}x of it", row.notes);
        row.extra["rare_share"] = json!(share);
    }
    row
}

/// Gzip'd bodies compressed ahead of the run, and a note on their sizes.
fn gzip_wire(t: &Template, sizes: &Sizes) -> (Wire, String) {
    progress("gzip: compressing request bodies ahead of the run");
    let pool = gzip_pool(t, sizes.gzip_bodies);
    let avg = pool.iter().map(|b| b.len()).sum::<usize>() / pool.len().max(1);
    let note = format!(
        "{} KiB bodies, {} KiB gzipped",
        t.bytes.len() / 1024,
        avg / 1024
    );
    (Wire::Gzip(pool), note)
}

/// (5) Memory per open instance; flat RSS under steady load.
fn memory_rows(run: &Run, bin: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for dims in [false, true] {
        for n in run.sizes.memory {
            progress(&format!(
                "memory: {n} open instances, {} dimensions",
                if dims { 3 } else { 0 }
            ));
            rows.push(memory(bin, &run.starts, n, dims));
        }
    }
    for n in run.sizes.memory {
        progress(&format!("memory: {n} open instances with 4 steps each"));
        rows.push(memory(bin, &run.starts_with_steps, n, false));
    }
    progress("memory: RSS under steady load");
    rows.push(steady(bin, &run.flow, &run.sizes, &run.baselines));
    rows
}

/// (6) Scrape: encoding, bodies by format, and with a server, ingest while scraped and
/// many scrapers at once.
fn scrape_rows(run: &Run, binary: Option<&Path>, e2e_protobuf: Option<f64>) -> Vec<Row> {
    progress("scrape: encoding /metrics");
    let mut rows = encode_rows(&run.sizes);
    progress("scrape: /metrics bodies by format");
    rows.extend(exposition_rows(&run.sizes));
    if let Some(bin) = binary {
        rows.extend(scraped_ingest_rows(run, bin, e2e_protobuf));
        rows.push(scrape_storm_row(bin));
    }
    rows
}

fn encode_rows(sizes: &Sizes) -> Vec<Row> {
    let mut rows = Vec::new();
    for (flows, id, what) in [
        // 8 series per flow: started, in_progress, duration, and completed x 3 and
        // errors x 2 (created at 0 with the flow).
        (
            1_250,
            "encode_10k_series",
            "10k series (1,250 flows x 8 series)",
        ),
        (
            10_000,
            "encode_10k_flows",
            "10k flows (up to 10,001 series per family)",
        ),
    ] {
        let e = inproc::encode(flows, sizes.encode_reps);
        rows.push(encode_row(
            id,
            format!("/metrics encode, {what}"),
            &e,
            sizes,
        ));
    }
    rows
}

/// A row of section 6: the time to encode `/metrics` (p50), the body's size.
fn encode_row(id: &'static str, name: String, e: &inproc::Encode, sizes: &Sizes) -> Row {
    let mut row = Row::new(6, id, name, e.p50_ms, "ms");
    row.p50_ms = Some(e.p50_ms);
    row.notes = format!(
        "{} series, {} KiB body, max {:.1} ms over {} runs",
        e.series,
        e.bytes / 1024,
        e.max_ms,
        sizes.encode_reps
    );
    row.extra = json!({"flows": e.flows, "series": e.series, "bytes": e.bytes, "max_ms": e.max_ms});
    row
}

/// One load run on the seeded server, from batch `first_batch` (so runs never reuse
/// ids), scraped every `scrape_every` when given.
fn seeded_load(
    server: &Server,
    run: &Run,
    scrape_every: Option<Duration>,
    first_batch: u64,
) -> LoadResult {
    let load = Load {
        scrape_every,
        first_batch,
        ..e2e_load(&run.sizes, Wire::Protobuf, run.flow.clone())
    };
    load::run(server, load)
}

/// Ingest on one server holding 10k series: not scraped, scraped every second, and
/// while 4 clients scrape in a loop. The same seeded server with and without scrapes:
/// the difference is the scrapes' cost, not that of recording into a registry of 10k
/// series.
fn scraped_ingest_rows(run: &Run, bin: &Path, e2e_protobuf: Option<f64>) -> Vec<Row> {
    progress("scrape: ingest with 10k series, not scraped, then scraped every second");
    let server = start(bin, &base_config("", ""));
    seed_server(&server, workload::seed_request(1_250));
    let quiet = seeded_load(&server, run, None, 0);
    let counted = server.scrape();
    let quiet_row = e2e_row(
        6,
        "e2e_http_protobuf_seeded",
        "end to end HTTP/protobuf, 10k series held, not scraped",
        &run.flow,
        &quiet,
        &run.baselines,
        &counted,
    );
    // New batch numbers: ids that do not repeat the first run's.
    let r = seeded_load(&server, run, Some(Duration::from_secs(1)), 100_000_000);
    let counted = server.scrape();
    let mut row = e2e_row(
        6,
        "e2e_http_protobuf_scraped",
        "end to end HTTP/protobuf, 10k series held, /metrics scraped every 1 s",
        &run.flow,
        &r,
        &run.baselines,
        &counted,
    );
    // Unscraped once more: the scraped run is compared with the mean of the runs before
    // and after it, so that what the server accumulates from run to run (retry
    // fingerprints, cache state) is not charged to the scrapes.
    let after = seeded_load(&server, run, None, 200_000_000);
    let quiet_mean = (quiet.events_per_sec + after.events_per_sec) / 2.0;
    let mut scrapes = r.scrape_ms.clone();
    scrapes.sort_by(f64::total_cmp);
    let vs = r.events_per_sec / quiet_mean;
    row.notes = format!(
        "{}; {} scrapes, p50 {:.1} ms, max {:.1} ms; {:.2}x the same server unscraped \
         (mean of the runs before and after: {:.0} and {:.0} events/s){}",
        row.notes,
        scrapes.len(),
        load::percentile(&scrapes, 0.5),
        scrapes.last().copied().unwrap_or(0.0),
        vs,
        quiet.events_per_sec,
        after.events_per_sec,
        e2e_protobuf
            .map(|base| format!(", {:.2}x the fresh server", r.events_per_sec / base))
            .unwrap_or_default()
    );
    row.extra["scrape_ms"] = json!(scrapes);
    row.extra["vs_unscraped"] = json!(vs);
    let looped = scrape_loop_row(run, &server, after.events_per_sec);
    vec![quiet_row, row, looped]
}

/// Ingest while 4 clients scrape /metrics in a loop, against the unscraped runs before
/// (`before` events/s) and after it.
fn scrape_loop_row(run: &Run, server: &Server, before: f64) -> Row {
    progress("scrape: ingest while 4 clients scrape /metrics in a loop");
    let looping = scrape_load::LoopScrapers::start(server.metrics, 4);
    let r = seeded_load(server, run, None, 300_000_000);
    let loop_scrapes = looping.scrapes.load(std::sync::atomic::Ordering::Relaxed);
    drop(looping);
    let after = seeded_load(server, run, None, 400_000_000);
    let quiet_mean = (before + after.events_per_sec) / 2.0;
    let vs = r.events_per_sec / quiet_mean;
    let counted = server.scrape();
    let mut row = e2e_row(
        6,
        "e2e_http_protobuf_scrape_loop",
        "end to end HTTP/protobuf, 10k series held, 4 clients scraping /metrics in a loop",
        &run.flow,
        &r,
        &run.baselines,
        &counted,
    );
    row.notes = format!(
        "{}; {loop_scrapes} scrapes answered; {vs:.2}x the same server unscraped (runs \
         before and after: {:.0} and {:.0} events/s)",
        row.notes, before, after.events_per_sec
    );
    row.extra["vs_unscraped"] = json!(vs);
    row.extra["loop_scrapes"] = json!(loop_scrapes);
    row
}

/// Peak RSS with 500 concurrent and 200 slow scrapers, 10k series held.
fn scrape_storm_row(bin: &Path) -> Row {
    progress("scrape: 500 concurrent and 200 slow scrapers, 10k series held");
    let server = start(bin, &base_config("  response_write_timeout: 10s\n", ""));
    seed_server(&server, workload::seed_request(1_250));
    let body = server.scrape().len();
    let before = server.rss_bytes();
    let s = scrape_load::storm(server.metrics, server.pid, 500, 200);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut row = Row::new(
        6,
        "scrape_storm_peak_rss",
        "peak RSS, 500 concurrent + 200 slow (1 B/s) scrapers, 10k series held",
        mib(s.peak_rss),
        "MiB",
    );
    row.notes = format!(
        "body {} KiB; RSS {:.0} MiB before; {} of 500 scrapes complete, {} of 200 slow \
         readers cut off (limits.response_write_timeout 10s), {:.1} s",
        body / 1024,
        mib(before),
        s.complete,
        s.slow_cut,
        s.secs
    );
    row.extra = json!({"peak_rss_bytes": s.peak_rss, "rss_before": before,
        "complete": s.complete, "slow_cut": s.slow_cut, "body_bytes": body});
    row
}

/// (7) Timeliness of time-outs: every flow with the longest timeout (moka's exact
/// time-to-live), a flow whose timeout is shorter than another's, and instances written
/// again by a step (batches of 50 ms of starts, one moka cache per distinct timeout).
fn timeliness_rows(sizes: &Sizes) -> Vec<Row> {
    progress("timeliness: how late incomplete flows are counted");
    let mut rows = Vec::new();
    for (id, name, longest, step, how) in [
        ("timeout_lateness", "1 s timeout", 1, false, "time-to-live"),
        (
            "timeout_lateness_per_entry",
            "1 s timeout, another flow 10 s",
            10,
            false,
            "time-to-live of the 1 s timeout's batches",
        ),
        (
            "timeout_lateness_stepped",
            "1 s timeout, a step each",
            1,
            true,
            "time-to-live of the 1 s timeout's batches",
        ),
    ] {
        let l = inproc::timeliness(
            sizes.timeliness,
            sizes.timeliness_spread,
            Duration::from_secs(1),
            Duration::from_secs(longest),
            step,
        );
        let mut row = Row::new(
            7,
            id,
            format!(
                "incomplete counted after deadline ({} instances, {name})",
                l.instances
            ),
            l.p99_ms,
            "ms p99",
        );
        row.p50_ms = Some(l.p50_ms);
        row.p99_ms = Some(l.p99_ms);
        row.notes = format!(
            "moka {how} + 20 ms maintenance thread; max {:.0} ms; {}/{} counted",
            l.max_ms, l.counted, l.instances
        );
        row.extra = json!({"instances": l.instances, "counted": l.counted, "max_ms": l.max_ms});
        rows.push(row);
    }
    rows
}

/// The results as JSON, at `--json` or under target/.
fn write_results(args: &Args, run: &Run, machine: Value, rows: &[Row], started: Instant) {
    let (flow, sparse) = (&run.flow, &run.sparse);
    let result = json!({
        "mode": if run.quick { "quick" } else { "full" },
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine,
        "workload": {
            "spans_per_batch": SPANS_PER_BATCH,
            "flow_batch_bytes": flow.bytes.len(),
            "sparse_batch_bytes": sparse.bytes.len(),
            "flow_events_per_batch": flow.events,
            "sparse_events_per_batch": sparse.events,
            "steady_state_open_instances": LAG * flow.events / 2,
            "resource_attributes": 6, "span_attributes": 6, "event_attributes": 2,
        },
        "baseline_spans_per_sec": {"flow": run.baselines.flow, "sparse": run.baselines.sparse},
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "elapsed_secs": started.elapsed().as_secs_f64(),
    });
    let path = args.json.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/flowmetrics-bench.json")
    });
    match std::fs::write(
        &path,
        serde_json::to_string_pretty(&result).unwrap_or_default(),
    ) {
        Ok(()) => eprintln!(
            "wrote {} ({:.0} s in all)",
            path.display(),
            started.elapsed().as_secs_f64()
        ),
        Err(e) => {
            eprintln!("flowmetrics-bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}

/// Flow Span workloads (every span, and 1 in 10): in process and end to end over
/// HTTP/protobuf on one server core, each with the prost-decode baseline of its own bytes.
fn network_rows(bin: &Path, sizes: &Sizes, inproc_cpu: usize, rows: &mut Vec<Row>) {
    let all = Arc::new(Template::new(Shape::NetworkAll));
    let sparse = Arc::new(Template::new(Shape::NetworkSparse));
    progress("network: prost decode baselines of the Flow Span workloads");
    let b_all = on_worker(inproc_cpu, || inproc::baseline(&all, sizes.inproc));
    let b_sparse = on_worker(inproc_cpu, || inproc::baseline(&sparse, sizes.inproc));
    let baselines = Baselines {
        flow: b_all.spans_per_sec,
        sparse: b_sparse.spans_per_sec,
        rare: b_sparse.spans_per_sec,
    };
    for (t, b, id) in [
        (&all, &b_all, "baseline_network_all"),
        (&sparse, &b_sparse, "baseline_network_10"),
    ] {
        let mut row = baseline_row(8, id, t, b);
        row.notes = format!("{}; {} KiB bodies", row.notes, t.bytes.len() / 1024);
        rows.push(row);
    }
    for (t, id) in [
        (&all, "pipeline_network_all"),
        (&sparse, "pipeline_network_10"),
    ] {
        progress(&format!(
            "network: pipeline in process [{}]",
            t.shape.label()
        ));
        let p = on_worker(inproc_cpu, || inproc::pipeline(t, sizes.inproc));
        let mut row = Row::new(
            8,
            id,
            format!("pipeline in process, 1 thread [{}]", t.shape.label()),
            p.spans_per_sec,
            "spans/s",
        );
        row.ratio = Some(p.spans_per_sec / baselines.for_shape(t.shape));
        row.notes = format!("{} batches", p.batches);
        rows.push(row);
    }
    for (t, id) in [(&all, "e2e_network_all"), (&sparse, "e2e_network_10")] {
        progress(&format!(
            "network: end to end HTTP/protobuf [{}]",
            t.shape.label()
        ));
        let server = start(bin, &base_config("", ""));
        let r = load::run(&server, e2e_load(sizes, Wire::Protobuf, t.clone()));
        let counted = server.scrape();
        let mut row = e2e_row(
            8,
            id,
            "end to end HTTP/protobuf, 4 conns, server 1 core",
            t,
            &r,
            &baselines,
            &counted,
        );
        let records = metric_sum(&counted, "flowmetrics_network_flow_records_total");
        row.notes = format!(
            "{}; {} Flow Span records counted; {} KiB bodies",
            row.notes,
            thousands(records),
            t.bytes.len() / 1024
        );
        row.extra["server_counted_records"] = json!(records);
        rows.push(row);
    }
}

/// Runs `f` on a thread of its own pinned to `cpu`, as the service runs its pipeline on
/// a tokio worker thread (not the main thread: glibc's main-thread heap behaves
/// differently from the per-thread arenas every worker uses).
fn on_worker<R: Send>(cpu: usize, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                server::pin_to_cpu(cpu);
                f()
            })
            .join()
            .expect("measurement thread")
    })
}

fn progress(what: &str) {
    eprintln!("  .. {what}");
    let _ = std::io::stderr().flush();
}

/// events/s for workloads with events on every span, spans/s for the sparse one.
fn rate_for(t: &Template, events: f64, spans: f64) -> (f64, &'static str) {
    match t.shape {
        Shape::Sparse | Shape::Rare | Shape::NetworkAll | Shape::NetworkSparse => {
            (spans, "spans/s")
        }
        _ => (events, "events/s"),
    }
}

fn e2e_row(
    section: u8,
    id: &'static str,
    name: &str,
    t: &Template,
    r: &LoadResult,
    baselines: &Baselines,
    metrics: &str,
) -> Row {
    let (value, unit) = rate_for(t, r.events_per_sec, r.spans_per_sec);
    let mut row = Row::new(
        section,
        id,
        format!("{name} [{}]", t.shape.label()),
        value,
        unit,
    );
    row.ratio = Some(r.spans_per_sec / baselines.for_shape(t.shape));
    row.p50_ms = Some(r.p50_ms);
    row.p99_ms = Some(r.p99_ms);
    let server_events = metric_sum(metrics, "flowmetrics_flow_events_total");
    let server_spans = metric_sum(metrics, "flowmetrics_otlp_spans_total");
    let completed = metric_sum(metrics, "flowmetrics_flows_completed_total");
    let per_cpu = value / r.server_cpu.max(1e-9);
    row.notes = format!(
        "{} {unit} per server CPU-second; server CPU {:.0}%, load gen CPU {:.0}%; {} ok / {} failed",
        thousands(per_cpu),
        r.server_cpu * 100.0,
        r.load_cpu * 100.0,
        r.ok,
        r.failed
    );
    if let Some(e) = &r.first_error {
        row.notes.push_str(&format!("; first error: {e}"));
    }
    row.extra = json!({
        "spans_per_sec": r.spans_per_sec, "events_per_sec": r.events_per_sec,
        "window_secs": r.window_secs, "ok": r.ok, "failed": r.failed,
        "server_cpu_cores": r.server_cpu, "load_cpu_cores": r.load_cpu,
        "per_server_cpu_second": per_cpu,
        "server_counted_events": server_events, "server_counted_spans": server_spans,
        "server_completed_flows": completed, "batches_sent": r.batches_used,
        "first_error": r.first_error,
    });
    row
}

fn start(bin: &Path, config: &str) -> Server {
    match Server::start(bin, config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("flowmetrics-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// YAML for the child: quiet logs, plus `extra` top-level keys.
fn base_config(limits: &str, extra: &str) -> String {
    let mut y = String::from("log:\n  level: warn\n");
    if !limits.is_empty() {
        y.push_str("limits:\n");
        y.push_str(limits);
    }
    y.push_str(extra);
    y
}

const THREE_DIMENSIONS: &str = "dimensions:
  - { label: service, attribute: service.name }
  - { label: environment, attribute: deployment.environment }
  - { label: route, attribute: http.route }
";

fn memory(bin: &Path, starts: &Arc<Template>, n: u64, dims: bool) -> Row {
    let limits = format!("  max_in_flight: {}\n", n + n / 10 + 10_000);
    let extra = format!(
        "flows:\n  default:\n    timeout: 1h\n{}",
        if dims { THREE_DIMENSIONS } else { "" }
    );
    let with_steps = starts.shape == Shape::StartsWithSteps;
    let server = start(bin, &base_config(&limits, &extra));
    std::thread::sleep(Duration::from_millis(300));
    let before = server.rss_bytes();
    let batches = n.div_ceil(starts.instances());
    let r = load::run(
        &server,
        Load {
            wire: Wire::Protobuf,
            template: starts.clone(),
            connections: 4,
            warmup: Duration::ZERO,
            measure: Duration::from_secs(600),
            max_requests: batches,
            scrape_every: None,
            rss_every: None,
            first_batch: 0,
        },
    );
    let opened = batches * starts.instances();
    // The last requests may still be in flight when the load generator returns.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut entries = 0.0;
    while Instant::now() < deadline {
        entries = metric_sum(&server.scrape(), "flowmetrics_in_flight_entries");
        if entries >= opened as f64 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = server.rss_bytes();
    let per = (after.saturating_sub(before)) as f64 / opened as f64;
    let dims_label = if dims {
        "3 dimensions"
    } else {
        "no dimensions"
    };
    let mut row = Row::new(
        5,
        match (n >= 1_000_000, dims, with_steps) {
            (true, _, true) => "rss_per_instance_1m_4steps",
            (false, _, true) => "rss_per_instance_small_4steps",
            (true, false, _) => "rss_per_instance_1m",
            (true, true, _) => "rss_per_instance_1m_dims",
            (false, false, _) => "rss_per_instance_small",
            (false, true, _) => "rss_per_instance_small_dims",
        },
        format!(
            "RSS per open instance, {} open, {dims_label}{}",
            thousands(opened as f64),
            if with_steps { ", 4 steps each" } else { "" }
        ),
        per,
        "bytes/instance",
    );
    row.notes = format!(
        "RSS {:.1} -> {:.1} MiB; table entries {}; {} failed requests",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        entries,
        r.failed
    );
    row.extra = json!({"open": opened, "rss_before": before, "rss_after": after,
        "table_entries": entries, "dimensions": if dims { 3 } else { 0 }, "failed": r.failed});
    row
}

fn steady(bin: &Path, flow: &Arc<Template>, sizes: &Sizes, baselines: &Baselines) -> Row {
    let server = start(bin, &base_config("", ""));
    let every = if sizes.steady >= Duration::from_secs(10) {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(250)
    };
    let r = load::run(
        &server,
        Load {
            wire: Wire::Protobuf,
            template: flow.clone(),
            connections: 4,
            warmup: Duration::ZERO,
            measure: sizes.steady,
            max_requests: 100_000_000,
            scrape_every: None,
            rss_every: Some(every),
            first_batch: 0,
        },
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    let half = sizes.steady.as_secs_f64() / 2.0;
    let at_half = r
        .rss
        .iter()
        .find(|(t, _)| *t >= half)
        .map_or(0, |(_, b)| *b);
    let last = r.rss.last().map_or(0, |(_, b)| *b);
    let max = r.rss.iter().map(|(_, b)| *b).max().unwrap_or(0);
    let growth = last as f64 - at_half as f64;
    let mut row = Row::new(
        5,
        "rss_steady_growth",
        format!(
            "RSS growth over the 2nd half of a {:.0} s steady load [{}]",
            sizes.steady.as_secs_f64(),
            flow.shape.label()
        ),
        growth / 1048576.0,
        "MiB",
    );
    row.notes = format!(
        "RSS at {:.0} s {:.1} MiB, at end {:.1} MiB, max {:.1} MiB; {:.0} events/s ({:.2}x baseline)",
        half,
        mib(at_half),
        mib(last),
        mib(max),
        r.events_per_sec,
        r.spans_per_sec / baselines.flow
    );
    row.extra = json!({"rss_samples": r.rss, "events_per_sec": r.events_per_sec});
    row
}

fn seed_server(server: &Server, body: Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let addr = server.http;
    let sent = rt.block_on(async move {
        use http_body_util::{BodyExt, Full};
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::post("/v1/traces")
            .header("host", addr.to_string())
            .header("content-type", "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(30), sender.send_request(req))
            .await
            .ok()?
            .ok()?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        Some(status.as_u16())
    });
    if sent != Some(200) {
        eprintln!("  !! seeding /metrics series failed: {sent:?}");
    }
    let body = server.scrape();
    let series = metric_sum_where(&body, "flowmetrics_flows_started_total", "seed-");
    eprintln!("  .. seeded {series} flows");
}

/// Request bodies gzip-compressed ahead of time, on both cores (nothing else runs yet).
fn gzip_pool(t: &Template, n: u64) -> Arc<Vec<Bytes>> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let mut parts: Vec<Vec<Bytes>> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                scope.spawn(move || {
                    let lo = n * w / workers;
                    let hi = n * (w + 1) / workers;
                    let mut body = t.bytes.clone();
                    (lo..hi)
                        .map(|b| {
                            t.patch(&mut body, b);
                            let mut gz = flate2::write::GzEncoder::new(
                                Vec::with_capacity(body.len() / 4),
                                flate2::Compression::fast(),
                            );
                            gz.write_all(&body).expect("compress");
                            Bytes::from(gz.finish().expect("compress"))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            parts.push(h.join().expect("gzip worker"));
        }
    });
    Arc::new(parts.into_iter().flatten().collect())
}

/// `/metrics` bodies at 10k and 50k series: OpenMetrics text, gzip'd text, protobuf
/// (classic histograms, and with `histogram: both` its native buckets too).
fn exposition_rows(sizes: &Sizes) -> Vec<Row> {
    use flowmetrics::config::HistogramKind::{Both, Classic};
    use flowmetrics::metrics::ExpositionFormat::{OpenMetrics, Protobuf};
    use inproc::Exposition;
    let mut rows = Vec::new();
    for (flows, size) in [(1_250, "10k"), (6_250, "50k")] {
        for (id, what, how) in [
            (
                "text",
                "OpenMetrics text",
                Exposition {
                    format: OpenMetrics,
                    gzip: false,
                    histogram: Classic,
                },
            ),
            (
                "text_gzip",
                "OpenMetrics text, gzip",
                Exposition {
                    format: OpenMetrics,
                    gzip: true,
                    histogram: Classic,
                },
            ),
            (
                "protobuf",
                "protobuf",
                Exposition {
                    format: Protobuf,
                    gzip: false,
                    histogram: Classic,
                },
            ),
            (
                "protobuf_gzip",
                "protobuf, gzip",
                Exposition {
                    format: Protobuf,
                    gzip: true,
                    histogram: Classic,
                },
            ),
            (
                "protobuf_both",
                "protobuf, histogram: both",
                Exposition {
                    format: Protobuf,
                    gzip: false,
                    histogram: Both,
                },
            ),
        ] {
            let e = inproc::encode_exposition(flows, sizes.encode_reps, how);
            let id: &'static str = Box::leak(format!("exposition_{size}_{id}").into_boxed_str());
            let name = format!("/metrics body, {size} series, {what}");
            let row = encode_row(id, name, &e, sizes);
            rows.push(row);
        }
    }
    rows
}

/// The `flowmetrics` binary: `--server`, else the one next to this executable, rebuilt
/// first when running under cargo (so the numbers are never of a stale build).
fn server_binary(args: &Args) -> Result<PathBuf, String> {
    if let Some(p) = &args.server {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().ok_or("no executable directory")?;
    let bin = dir.join("flowmetrics");
    if let Ok(cargo) = std::env::var("CARGO") {
        progress("building the flowmetrics binary (cargo build -p flowmetrics)");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["build", "-q", "-p", "flowmetrics", "--bin", "flowmetrics"]);
        if !cfg!(debug_assertions) {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
        if !status.success() {
            return Err("cargo build -p flowmetrics failed".into());
        }
    }
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release -p flowmetrics` or pass --server",
            bin.display()
        ))
    }
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "mem_total_gib": mem_kb as f64 / 1048576.0,
        "source": Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn thousands(v: f64) -> String {
    let n = v.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn fmt_value(v: f64, unit: &str) -> String {
    if unit.ends_with("/s") {
        format!("{} {unit}", thousands(v))
    } else if unit.starts_with("ms") || unit == "MiB" {
        format!("{v:.1} {unit}")
    } else {
        format!("{v:.0} {unit}")
    }
}

/// The table, as Markdown (readable in a terminal, pasteable into BENCHMARKS.md).
fn render(rows: &[Row]) -> String {
    let opt = |v: Option<f64>, digits: usize| v.map_or("".into(), |v| format!("{v:.digits$}"));
    let mut out = String::from(
        "| # | measurement | result | ratio to baseline | p50 ms | p99 ms | notes |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.section,
            r.name,
            fmt_value(r.value, r.unit),
            r.ratio.map_or(String::new(), |v| format!("{v:.2}x")),
            opt(r.p50_ms, 2),
            opt(r.p99_ms, 2),
            r.notes
        ));
    }
    out
}

/// `--profile-pipeline` / `--profile-sparse` / `--profile-network` / `--profile-steps`: only the in-process
/// pipeline, for callgrind.
fn profile(shape: Shape, batches: u64) {
    let t = Template::new(shape);
    // FLOWMETRICS_* variables apply (e.g. FLOWMETRICS_NETWORK_FLOWS__ENABLED=false).
    let config = flowmetrics::config::Config::load(None, std::env::vars()).unwrap_or_else(|e| {
        eprintln!("flowmetrics-bench: {e}");
        std::process::exit(2)
    });
    let (pipeline, table, _metrics) = inproc::pipeline_for(&config);
    let mut body = t.bytes.clone();
    for b in 0..batches {
        t.patch(&mut body, b);
        inproc::measured_batch(&pipeline, &body);
        if (b + 1).is_multiple_of(50) {
            flowmetrics::flows::CorrelationStore::run_pending_tasks(&*table);
        }
    }
    eprintln!(
        "profiled {batches} batches; the store holds {} entries",
        flowmetrics::flows::CorrelationStore::entries(&*table)
    );
}
