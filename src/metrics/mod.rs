//! Every public metric family (docs/behaviour.md §4) in one prometheus-client [`Registry`], the
//! correlation store's sink, and the exposition (written by prometheus-client's text
//! encoder).
//!
//! The flow families are [`LimitedFamily`]s (a series limit, per-flow buckets) holding
//! prometheus-client's own metrics; the service's own families are plain `Family`s
//! whose fixed series are resolved once and kept.

mod duration;
mod exemplar;
mod exposition;
mod family;
mod label_cuts;
pub mod network;
mod objectives;
mod process;
mod step_totals;
mod steps;
mod text004;
mod totals;

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::CounterWithExemplar;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::flows::event::{DimValues, Outcome, Source};
use crate::flows::label_value::LabelCuts;
use crate::flows::store::{EndRecord, FlowSink, Report, StoreProbe};
use crate::flows::EventKind;
use crate::model::{Rejection, Signal, Transport};
use duration::DurationSeries;
pub use duration::{HistogramMode, HistogramShape};
pub use exemplar::TraceExemplar;
pub use exposition::{ExpositionError, ExpositionFormat};
use family::{Layout, LimitedFamily, OverflowReporter, SeriesRef};
pub use objectives::{FlowObjective, ObjectiveSettings};
pub use totals::{FlowTotals, StepTotals};

type Pair = [(&'static str, &'static str); 1];
type Pairs2 = [(&'static str, &'static str); 2];
type Pairs3 = [(&'static str, &'static str); 3];

type ExemplarCounter = CounterWithExemplar<TraceExemplar>;

/// What the metrics need to know (built from `dimensions`, `flows.*.buckets` and
/// `limits` by the app).
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// `limits.max_series_per_metric`.
    pub max_series_per_metric: usize,
    /// Label names of the start and end dimensions (already valid label names).
    pub start_dim_labels: Vec<String>,
    pub end_dim_labels: Vec<String>,
    pub default_buckets: Vec<f64>,
    /// Flows with their own duration buckets.
    pub per_flow_buckets: HashMap<String, Vec<f64>>,
    /// Classic, native or both buckets (`flows.*.histogram`): the default, and flows
    /// with their own.
    pub default_histogram: HistogramShape,
    pub per_flow_histogram: HashMap<String, HistogramShape>,
    /// Label values cut to `limits.max_label_value_bytes`, per label: exposed as
    /// `flowmetrics_label_values_truncated_total`.
    pub label_cuts: Arc<LabelCuts>,
    /// `limits.max_in_flight`, exposed as `flowmetrics_in_flight_capacity`.
    pub in_flight_capacity: u64,
    /// Label names of `network_flows.dimensions`; `None`: network flows are off.
    pub network_labels: Option<Vec<String>>,
    /// `limits.series_idle_timeout`: label sets without a recording this long go.
    pub series_idle_timeout: Option<Duration>,
    /// The longest flow timeout: an instance can stay open this long without a
    /// recording, so no label set is idle sooner.
    pub longest_flow_timeout: Duration,
    /// `correlation.store: redis`: the store's errors and latency are exposed.
    pub shared_store: bool,
    /// `state.path` is set (memory store): failed state writes are exposed.
    pub state_file: bool,
    /// Flows with declared steps (`flows.per_flow.*.steps`), in order.
    pub declared_steps: HashMap<String, Vec<String>>,
    /// `flows.*.objective` (docs/behaviour.md §10).
    pub objectives: ObjectiveSettings,
}

pub struct Metrics {
    registry: Registry,
    /// Makes each report atomic to a scrape (the invariant of docs/behaviour.md §3 holds in every
    /// exposition): reports hold one stripe for reading, a scrape holds all for writing.
    gate: ScrapeGate,
    /// Held for the whole of an encode: one at a time.
    encoding: std::sync::Mutex<()>,
    /// Length of the last `/metrics` body, to size the next one.
    last_encoded_len: AtomicUsize,
    /// No dimension values (families without start or end dimensions).
    no_dims: DimValues,
    /// One empty value per end dimension: series whose instance had no end.
    empty_end_dims: DimValues,
    has_end_dims: bool,
    /// Seconds since start, advanced by [`Metrics::housekeeping`]; families stamp each
    /// series with it when they record.
    clock: Arc<AtomicU64>,
    started_at: Instant,
    /// Seconds a label set may go without a recording (none: never removed).
    idle_secs: Option<u64>,
    last_prune: AtomicU64,

    flows_started: LimitedFamily<Counter>,
    flows_restored: LimitedFamily<Counter>,
    flows_completed: LimitedFamily<ExemplarCounter>,
    flow_errors: LimitedFamily<Counter>,
    flow_duration: LimitedFamily<DurationSeries>,
    flows_in_progress: LimitedFamily<Gauge>,
    flows_dropped: LimitedFamily<Counter>,
    unmatched_ends: LimitedFamily<Counter>,
    negative_durations: LimitedFamily<Counter>,
    steps: steps::StepMetrics,

    /// flow_events_total by [source][kind].
    accepted: [[Counter; 3]; 2],
    events_rejected: Family<Pair, Counter>,
    /// flow_events_duplicate_total by kind.
    duplicates: [Counter; 3],
    otlp_requests: Family<Pairs3, Counter>,
    otlp_spans: Family<Pair, Counter>,
    otlp_log_records: Family<Pair, Counter>,
    in_flight_entries: Gauge,
    network: Option<network::NetworkMetrics>,
    store_errors: Family<Pair, Counter>,
    store_latency: Family<Pair, Histogram, fn() -> Histogram>,
    /// flowmetrics_state_write_errors_total by write: checkpoint, final.
    state_write_errors: [Counter; 2],
    label_cuts: Arc<LabelCuts>,
    objectives: objectives::ObjectiveMetrics,
}

/// Round trips to a shared store: 0.25 ms to 2.5 s.
fn store_latency_histogram() -> Histogram {
    Histogram::new([
        0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ])
}

impl Metrics {
    pub fn new(settings: MetricsSettings) -> Self {
        let mut registry = Registry::default();
        let max = settings.max_series_per_metric;

        let overflow_family = Family::<Pair, Counter>::default();
        registry.register(
            "flowmetrics_series_overflow",
            "Recordings folded into a family's otel_metric_overflow=\"true\" series because \
             the family reached limits.max_series_per_metric",
            overflow_family.clone(),
        );
        let overflow = Arc::new(OverflowReporter::new(move |metric| {
            overflow_family.get_or_create(&[("metric", metric)]).clone()
        }));

        let label_names = |names: &[String]| {
            names
                .iter()
                .map(|n| Box::from(n.as_str()))
                .collect::<Arc<[Box<str>]>>()
        };
        let (start_dims, end_dims) = (
            label_names(&settings.start_dim_labels),
            label_names(&settings.end_dim_labels),
        );
        let flow_only = Layout::default();
        let with_dims = |extra| Layout {
            extra,
            step: None,
            start_dims: start_dims.clone(),
            end_dims: end_dims.clone(),
        };
        let clock = Arc::new(AtomicU64::new(0));
        let counter = |name, layout| {
            LimitedFamily::new(name, max, layout, overflow.clone(), clock.clone(), |_| {
                Counter::default()
            })
        };

        let flows_started = counter(
            "flowmetrics_flows_started_total",
            Layout {
                start_dims: start_dims.clone(),
                ..Layout::default()
            },
        );
        registry.register(
            "flowmetrics_flows_started",
            "Flow instances opened by a start event",
            flows_started.clone(),
        );
        let flows_restored = counter(
            "flowmetrics_flows_restored_total",
            Layout {
                start_dims: start_dims.clone(),
                ..Layout::default()
            },
        );
        registry.register(
            "flowmetrics_flows_restored",
            "Open flow instances read back from the state file at start (state.path); \
             they count here instead of in flowmetrics_flows_started_total",
            flows_restored.clone(),
        );
        let flows_completed = LimitedFamily::new(
            "flowmetrics_flows_completed_total",
            max,
            with_dims(Some("outcome")),
            overflow.clone(),
            clock.clone(),
            |_| ExemplarCounter::default(),
        );
        registry.register(
            "flowmetrics_flows_completed",
            "Flow instances closed by an end event, by outcome (success, failure, \
             cancelled)",
            flows_completed.clone(),
        );
        let flow_errors = counter(
            "flowmetrics_flow_errors_total",
            with_dims(Some("error_reason")),
        );
        registry.register(
            "flowmetrics_flow_errors",
            "Failed flows: error_reason=\"failure\" for failure ends, \"incomplete\" for \
             instances whose timeout passed without an end",
            flow_errors.clone(),
        );
        // As prometheus-client keeps them: finite bounds (`+Inf` is implicit).
        let finite =
            |b: &[f64]| -> Arc<[f64]> { b.iter().copied().filter(|b| b.is_finite()).collect() };
        let default_buckets = finite(&settings.default_buckets);
        let per_flow: HashMap<String, Arc<[f64]>> = settings
            .per_flow_buckets
            .iter()
            .map(|(flow, b)| (flow.clone(), finite(b)))
            .collect();
        let default_shape = settings.default_histogram;
        let per_flow_shape = settings.per_flow_histogram.clone();
        let native_family = std::iter::once(&default_shape)
            .chain(per_flow_shape.values())
            .any(|s| s.mode != HistogramMode::Classic);
        let flow_duration = LimitedFamily::new(
            "flowmetrics_flow_duration_seconds",
            max,
            with_dims(None),
            overflow.clone(),
            clock.clone(),
            move |flow: Option<&str>| {
                let buckets = flow
                    .and_then(|f| per_flow.get(f))
                    .unwrap_or(&default_buckets);
                let shape = flow
                    .and_then(|f| per_flow_shape.get(f))
                    .unwrap_or(&default_shape);
                DurationSeries::new(buckets.clone(), *shape, native_family)
            },
        );
        registry.register_with_unit(
            "flowmetrics_flow_duration",
            "Start-to-end duration of successful flows, from the two events' timestamps",
            Unit::Seconds,
            flow_duration.clone(),
        );
        let flows_in_progress = LimitedFamily::new(
            "flowmetrics_flows_in_progress",
            max,
            flow_only.clone(),
            overflow.clone(),
            clock.clone(),
            |_| Gauge::default(),
        );
        registry.register(
            "flowmetrics_flows_in_progress",
            "Flow instances open now (started, not yet ended, timed out or dropped)",
            flows_in_progress.clone(),
        );
        let flows_dropped = counter(
            "flowmetrics_flows_dropped_total",
            Layout {
                extra: Some("reason"),
                ..Layout::default()
            },
        );
        registry.register(
            "flowmetrics_flows_dropped",
            "Open flow instances dropped before they ended; reason=\"capacity\": the \
             correlation store was full (limits.max_in_flight); reason=\"config_changed\": \
             restored from the state file for a flow the configuration no longer tracks",
            flows_dropped.clone(),
        );
        let unmatched_ends = counter("flowmetrics_flow_unmatched_ends_total", flow_only.clone());
        registry.register(
            "flowmetrics_flow_unmatched_ends",
            "End events whose start never arrived within the flow's timeout (or that \
             were evicted from a full store while waiting)",
            unmatched_ends.clone(),
        );
        let negative_durations = counter("flowmetrics_flow_negative_durations_total", flow_only);
        registry.register(
            "flowmetrics_flow_negative_durations",
            "Successful flows whose end timestamp is earlier than their start (clock \
             skew); not observed in the duration histogram",
            negative_durations.clone(),
        );

        let steps = steps::StepMetrics::new(
            steps::StepFamiliesSettings {
                max_series: max,
                start_dims: start_dims.clone(),
                default_buckets: settings.default_buckets.clone(),
                per_flow_buckets: settings.per_flow_buckets.clone(),
                declared: &settings.declared_steps,
                overflow: &overflow,
                clock: &clock,
            },
            &mut registry,
        );

        let events = Family::<Pairs2, Counter>::default();
        registry.register(
            "flowmetrics_flow_events",
            "Flow events accepted, by kind (start, end) and source (span_event, log)",
            events.clone(),
        );
        let events_rejected = Family::<Pair, Counter>::default();
        registry.register(
            "flowmetrics_flow_events_rejected",
            "Flow events refused, by reason",
            events_rejected.clone(),
        );
        let events_duplicate = Family::<Pair, Counter>::default();
        registry.register(
            "flowmetrics_flow_events_duplicate",
            "Flow events ignored as duplicates (a second start or end of an instance, or \
             a retried export within limits.dedup_window)",
            events_duplicate.clone(),
        );
        let otlp_requests = Family::<Pairs3, Counter>::default();
        registry.register(
            "flowmetrics_otlp_requests",
            "OTLP export requests, by transport, signal and response code (HTTP status or \
             gRPC code name)",
            otlp_requests.clone(),
        );
        let otlp_spans = Family::<Pair, Counter>::default();
        registry.register(
            "flowmetrics_otlp_spans",
            "Spans received in OTLP trace exports",
            otlp_spans.clone(),
        );
        let otlp_log_records = Family::<Pair, Counter>::default();
        registry.register(
            "flowmetrics_otlp_log_records",
            "Log records received in OTLP log exports",
            otlp_log_records.clone(),
        );
        let in_flight_entries = Gauge::default();
        registry.register(
            "flowmetrics_in_flight_entries",
            "Entries in the correlation store now: open instances plus ends waiting for \
             their start",
            in_flight_entries.clone(),
        );
        let in_flight_capacity = Gauge::<i64>::default();
        in_flight_capacity.set(i64::try_from(settings.in_flight_capacity).unwrap_or(i64::MAX));
        registry.register(
            "flowmetrics_in_flight_capacity",
            "Entries the correlation store holds at most (limits.max_in_flight); the \
             oldest are evicted beyond it",
            in_flight_capacity,
        );
        let network = network::NetworkMetrics::new(
            settings.network_labels.as_deref(),
            max,
            &mut registry,
            &overflow,
            &events_rejected,
        );
        let objectives =
            objectives::ObjectiveMetrics::new(&mut registry, settings.objectives.clone(), max);
        let build_info = Family::<Pair, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register(
            "flowmetrics_build_info",
            "Build identity of this flowmetrics (always 1)",
            build_info,
        );
        registry.register(
            "flowmetrics_label_values_truncated",
            "Label values from client data (dimensions, network dimensions) cut to \
             limits.max_label_value_bytes, by the label whose value was cut",
            label_cuts::LabelCutsFamily(settings.label_cuts.clone()),
        );
        registry.register_collector(Box::new(process::ProcessCollector));
        registry.register_collector(Box::new(process::LogCollector));
        let state_errors = Family::<Pair, Counter>::default();
        if settings.state_file {
            registry.register(
                "flowmetrics_state_write_errors",
                "Writes of the state file that failed, by write: checkpoint (the previous \
                 file stays) or final (at shutdown: the previous file is set aside, its open \
                 flows are lost)",
                state_errors.clone(),
            );
        }
        let state_write_errors = ["checkpoint", "final"]
            .map(|write| state_errors.get_or_create(&[("write", write)]).clone());
        let store_errors = Family::<Pair, Counter>::default();
        let store_latency: Family<Pair, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(store_latency_histogram);
        if settings.shared_store {
            registry.register(
                "flowmetrics_store_errors",
                "Calls to the shared correlation store that failed (unreachable, timed \
                 out), by operation: apply (an export's events) or sweep (time-outs)",
                store_errors.clone(),
            );
            registry.register_with_unit(
                "flowmetrics_store_latency",
                "Round trip of calls to the shared correlation store, by operation",
                Unit::Seconds,
                store_latency.clone(),
            );
            for op in ["apply", "sweep"] {
                let _ = store_errors.get_or_create(&[("op", op)]);
            }
        }

        // Self-metric series exist from the start (at 0), so rates and alerts work
        // before the first event; their handles skip the family lookup per event.
        let accepted = [Source::SpanEvent, Source::Log].map(|source| {
            EventKind::LABELS.map(|kind| {
                events
                    .get_or_create(&[("kind", kind), ("source", source.label())])
                    .clone()
            })
        });
        let duplicates =
            EventKind::LABELS.map(|kind| events_duplicate.get_or_create(&[("kind", kind)]).clone());
        for reason in Rejection::REASONS {
            let _ = events_rejected.get_or_create(&[("reason", reason)]);
        }
        Self {
            registry,
            gate: ScrapeGate::default(),
            encoding: std::sync::Mutex::new(()),
            last_encoded_len: AtomicUsize::new(0),
            no_dims: Arc::from([]),
            empty_end_dims: end_dims.iter().map(|_| Arc::from("")).collect(),
            has_end_dims: !end_dims.is_empty(),
            clock,
            started_at: Instant::now(),
            idle_secs: settings
                .series_idle_timeout
                .map(|t| t.max(settings.longest_flow_timeout).as_secs().max(1)),
            last_prune: AtomicU64::new(0),
            flows_started,
            flows_restored,
            flows_completed,
            flow_errors,
            flow_duration,
            flows_in_progress,
            flows_dropped,
            unmatched_ends,
            negative_durations,
            steps,
            accepted,
            events_rejected,
            duplicates,
            otlp_requests,
            otlp_spans,
            otlp_log_records,
            in_flight_entries,
            network,
            store_errors,
            store_latency,
            state_write_errors,
            label_cuts: settings.label_cuts,
            objectives,
        }
    }

    /// A write of the state file failed (`final`: the one at shutdown).
    pub fn state_write_failed(&self, final_write: bool) {
        self.state_write_errors[usize::from(final_write)].inc();
    }

    /// Where the extraction stages count label values they cut.
    pub fn label_cuts(&self) -> Arc<LabelCuts> {
        self.label_cuts.clone()
    }

    /// The network families; `None` when `network_flows.enabled` is false.
    pub fn network(&self) -> Option<&network::NetworkMetrics> {
        self.network.as_ref()
    }

    /// Every family as one OpenMetrics exposition. `store_entries`: the correlation
    /// store's entries now.
    ///
    /// Reports are held only while the families of the invariant (docs/behaviour.md §3:
    /// started, restored, completed, errors, in progress, dropped) are pinned: a walk
    /// that copies each series' handle and value, about a millisecond at 10,000 label
    /// sets. The text is then written from those copies while reports go on, so every
    /// exposition is one consistent cut and ingest never waits for the encode. The other
    /// families (durations, self-metrics) are written as they are at that moment. One
    /// encode runs at a time (the pinned copies are per family).
    pub fn encode(&self, store_entries: u64) -> String {
        self.encode_text(store_entries)
            .expect("every family encodes as OpenMetrics text")
    }

    fn pin_invariant_families(&self, pin: bool) {
        fn set<M: family::Pinnable>(f: &LimitedFamily<M>, pin: bool) {
            if pin {
                f.pin();
            } else {
                f.unpin();
            }
        }
        set(&self.flows_started, pin);
        set(&self.flows_restored, pin);
        set(&self.flows_completed, pin);
        set(&self.flow_errors, pin);
        set(&self.flows_in_progress, pin);
        set(&self.flows_dropped, pin);
    }

    /// Call about once a second: advances the families' clock and removes label sets
    /// idle for `limits.series_idle_timeout` (checked every tenth of it).
    pub fn housekeeping(&self) {
        let now = self.started_at.elapsed().as_secs();
        self.clock.store(now, Ordering::Relaxed);
        let Some(idle) = self.idle_secs else { return };
        let every = (idle / 10).clamp(1, 60);
        if now.saturating_sub(self.last_prune.load(Ordering::Relaxed)) >= every {
            self.last_prune.store(now, Ordering::Relaxed);
            let removed = self.remove_idle(now.saturating_sub(idle));
            if removed > 0 {
                tracing::debug!(removed, "idle series removed (limits.series_idle_timeout)");
            }
        }
    }

    /// Removes, from every family, the label sets (flow, start dimensions) with no
    /// recording after `cutoff` in any family, then the per-flow series of flows left
    /// with no label set, unless they moved after `cutoff` or instances are open. Each
    /// removal takes a whole label set, so the invariant of docs/behaviour.md §3 still holds; a
    /// label set that comes back starts again from 0 (a counter reset to Prometheus).
    fn remove_idle(&self, cutoff: u64) -> usize {
        let _quiet = self.gate.close();
        let mut active: HashSet<(Arc<str>, DimValues)> = HashSet::new();
        let mut note = |labels: &family::SeriesLabels, touched: u64| {
            if touched > cutoff {
                active.insert((labels.flow().clone(), labels.start().clone()));
            }
        };
        self.flows_started.for_each(&mut note);
        self.flows_completed.for_each(&mut note);
        self.flow_errors.for_each(&mut note);
        self.flow_duration.for_each(&mut note);
        self.steps.for_each_by_label_set(&mut note);
        let keep = |labels: &family::SeriesLabels| {
            active.contains(&(labels.flow().clone(), labels.start().clone()))
        };
        let mut removed = self.flows_started.retain(|l, _, _| keep(l));
        removed += self.flows_completed.retain(|l, _, _| keep(l));
        removed += self.flow_errors.retain(|l, _, _| keep(l));
        removed += self.flow_duration.retain(|l, _, _| keep(l));
        let flows: HashSet<Arc<str>> = active.iter().map(|(flow, _)| flow.clone()).collect();
        let keep_flow =
            |l: &family::SeriesLabels, touched: u64| flows.contains(l.flow()) || touched > cutoff;
        removed += self.steps.retain(&keep, &keep_flow);
        removed += self
            .flows_in_progress
            .retain(|l, t, g| keep_flow(l, t) || g.get() != 0);
        removed += self.flows_dropped.retain(|l, t, _| keep_flow(l, t));
        removed += self.unmatched_ends.retain(|l, t, _| keep_flow(l, t));
        removed += self.negative_durations.retain(|l, t, _| keep_flow(l, t));
        removed
    }

    pub fn event_accepted(&self, kind: EventKind, source: Source) {
        self.accepted[source as usize][kind_index(kind)].inc();
    }

    pub fn event_rejected(&self, rejection: &Rejection) {
        self.events_rejected
            .get_or_create(&[("reason", rejection.reason())])
            .inc();
    }

    pub fn request(&self, transport: Transport, signal: Signal, code: &'static str) {
        self.otlp_requests
            .get_or_create(&[
                ("transport", transport.label()),
                ("signal", signal.label()),
                ("code", code),
            ])
            .inc();
    }

    pub fn spans_received(&self, transport: Transport, n: u64) {
        self.otlp_spans
            .get_or_create(&[("transport", transport.label())])
            .inc_by(n);
    }

    pub fn log_records_received(&self, transport: Transport, n: u64) {
        self.otlp_log_records
            .get_or_create(&[("transport", transport.label())])
            .inc_by(n);
    }

    /// Series counts per limited family (for tests and the benchmark).
    pub fn series_counts(&self) -> [(&'static str, usize); 8] {
        [
            ("flows_started", self.flows_started.len()),
            ("flows_completed", self.flows_completed.len()),
            ("flow_errors", self.flow_errors.len()),
            ("flow_duration", self.flow_duration.len()),
            ("flows_in_progress", self.flows_in_progress.len()),
            ("flows_dropped", self.flows_dropped.len()),
            ("unmatched_ends", self.unmatched_ends.len()),
            ("negative_durations", self.negative_durations.len()),
        ]
    }

    // --- label sets -----------------------------------------------------------------

    fn flow_only<'a>(&'a self, flow: &'a Arc<str>) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra: None,
            step: None,
            start: &self.no_dims,
            end: &self.no_dims,
        }
    }

    /// flow, [extra], start dims, end dims (empty values when the instance had no end).
    fn with_dims<'a>(
        &'a self,
        flow: &'a Arc<str>,
        extra: Option<&'static str>,
        start_dims: &'a DimValues,
        end_dims: Option<&'a DimValues>,
    ) -> SeriesRef<'a> {
        SeriesRef {
            flow,
            extra,
            step: None,
            start: start_dims,
            end: end_dims.unwrap_or(&self.empty_end_dims),
        }
    }
}

fn kind_index(kind: EventKind) -> usize {
    kind.index()
}

impl StoreProbe for Metrics {
    fn store_call(&self, op: &'static str, seconds: f64, ok: bool) {
        self.store_latency
            .get_or_create(&[("op", op)])
            .observe(seconds);
        if !ok {
            self.store_errors.get_or_create(&[("op", op)]).inc();
        }
    }
}

impl FlowSink for Metrics {
    fn report(&self, report: Report<'_>) {
        let _open = self.gate.enter();
        match report {
            Report::Opened { flow, start_dims } => {
                let started = SeriesRef {
                    flow,
                    extra: None,
                    step: None,
                    start: start_dims,
                    end: &self.no_dims,
                };
                let first = self.flows_started.with_created(started, |c| {
                    c.inc();
                });
                if first {
                    self.create_zero_series(flow, start_dims, None);
                    self.objectives.flow_seen(flow);
                }
                self.flows_in_progress
                    .with(self.flow_only(flow), |g| g.inc());
            }
            Report::Restored { flow, start_dims } => {
                let restored = SeriesRef {
                    flow,
                    extra: None,
                    step: None,
                    start: start_dims,
                    end: &self.no_dims,
                };
                let first = self.flows_restored.with_created(restored, |c| {
                    c.inc();
                });
                if first {
                    self.create_zero_series(flow, start_dims, None);
                    self.objectives.flow_seen(flow);
                }
                self.flows_in_progress
                    .with(self.flow_only(flow), |g| g.inc());
            }
            Report::Discarded { flow, start_dims } => {
                let restored = SeriesRef {
                    flow,
                    extra: None,
                    step: None,
                    start: start_dims,
                    end: &self.no_dims,
                };
                self.flows_restored.with(restored, |c| {
                    c.inc();
                });
                let labels = SeriesRef {
                    extra: Some("config_changed"),
                    ..self.flow_only(flow)
                };
                self.flows_dropped.with(labels, |c| c.inc());
            }
            Report::Completed {
                flow,
                start_dims,
                end,
                duration_secs,
                transits,
            } => {
                self.completed(flow, start_dims, end, duration_secs);
                self.steps.closed(flow, start_dims, transits);
            }
            Report::TimedOut {
                flow,
                start_dims,
                transits,
                last_step,
            } => {
                let labels = self.with_dims(flow, Some("incomplete"), start_dims, None);
                self.flow_errors.with(labels, |c| c.inc());
                self.steps.closed(flow, start_dims, transits);
                self.steps.stalled(flow, start_dims, last_step);
                self.flows_in_progress
                    .with(self.flow_only(flow), |g| g.dec());
            }
            Report::Dropped { flow, .. } => {
                let labels = SeriesRef {
                    extra: Some("capacity"),
                    ..self.flow_only(flow)
                };
                self.flows_dropped.with(labels, |c| c.inc());
                self.flows_in_progress
                    .with(self.flow_only(flow), |g| g.dec());
            }
            Report::Unmatched { flow, .. } => {
                self.unmatched_ends.with(self.flow_only(flow), |c| c.inc());
            }
            Report::Duplicate { kind } => {
                self.duplicates[kind_index(kind)].inc();
            }
            Report::StepReached {
                flow,
                start_dims,
                step,
                since_start_secs,
                trace,
            } => self
                .steps
                .reached(flow, start_dims, step, since_start_secs, trace),
            Report::StepUnmatched { flow, reason } => self.steps.unmatched(flow, reason),
            Report::Overdue {
                flow,
                overdue,
                oldest_open_secs,
            } => self.objectives.overdue(flow, overdue, oldest_open_secs),
        }
    }
}

/// A reader-writer lock split into cache-line-sized stripes, so that reports from
/// different threads do not contend on one lock word; a scrape takes every stripe.
#[derive(Default)]
struct ScrapeGate {
    stripes: [Stripe; GATE_STRIPES],
}

const GATE_STRIPES: usize = 16;

#[derive(Default)]
#[repr(align(64))]
struct Stripe(std::sync::RwLock<()>);

thread_local! {
    /// This thread's stripe, assigned round robin.
    static STRIPE: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % GATE_STRIPES
    };
}

impl ScrapeGate {
    fn enter(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        let stripe = &self.stripes[STRIPE.with(|s| *s)].0;
        stripe.read().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) -> Vec<std::sync::RwLockWriteGuard<'_, ()>> {
        self.stripes
            .iter()
            .map(|s| s.0.write().unwrap_or_else(|p| p.into_inner()))
            .collect()
    }
}

const OUTCOMES: [Outcome; 3] = [Outcome::Success, Outcome::Failure, Outcome::Cancelled];

impl Metrics {
    /// A label set's `completed{outcome}` and `errors{error_reason}` series, at 0, so
    /// `rate()` and alerts see them from the first scrape (docs/behaviour.md §4). Called when a
    /// label set is first seen: with `end_dims` `None` (a start) only the series whose
    /// labels a start already knows; with end dimensions configured, the outcomes of a
    /// (start, end) label set are created when its first end arrives.
    fn create_zero_series(&self, flow: &Arc<str>, start: &DimValues, end: Option<&DimValues>) {
        let incomplete = self.with_dims(flow, Some("incomplete"), start, None);
        self.flow_errors.with(incomplete, |_| ());
        if end.is_none() {
            self.steps.create_zero_series(flow, start);
        }
        if end.is_none() && self.has_end_dims {
            return;
        }
        for outcome in OUTCOMES {
            let labels = self.with_dims(flow, Some(outcome.as_str()), start, end);
            self.flows_completed.with(labels, |_| ());
        }
        let failure = self.with_dims(flow, Some("failure"), start, end);
        self.flow_errors.with(failure, |_| ());
    }

    fn completed(
        &self,
        flow: &Arc<str>,
        start_dims: &DimValues,
        end: &EndRecord,
        duration_secs: f64,
    ) {
        let outcome = Some(end.outcome.as_str());
        let exemplar = end.trace.map(TraceExemplar);
        let first = self.flows_completed.with_created(
            self.with_dims(flow, outcome, start_dims, Some(&end.dims)),
            |c| {
                c.inc_by(1, exemplar, None);
            },
        );
        if first && self.has_end_dims {
            self.create_zero_series(flow, start_dims, Some(&end.dims));
        }
        self.flows_in_progress
            .with(self.flow_only(flow), |g| g.dec());
        match end.outcome {
            Outcome::Failure => self.flow_errors.with(
                self.with_dims(flow, Some("failure"), start_dims, Some(&end.dims)),
                |c| {
                    c.inc();
                },
            ),
            Outcome::Success if duration_secs < 0.0 => {
                self.negative_durations.with(self.flow_only(flow), |c| {
                    c.inc();
                })
            }
            Outcome::Success => self.flow_duration.with(
                self.with_dims(flow, None, start_dims, Some(&end.dims)),
                |h| h.observe(duration_secs, exemplar),
            ),
            Outcome::Cancelled => {}
        }
    }
}

#[cfg(test)]
mod tests;
