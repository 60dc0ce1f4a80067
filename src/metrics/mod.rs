//! Every public metric family (docs/behaviour.md §4) in one prometheus-client [`Registry`], the
//! correlation store's sink, and the exposition (written by prometheus-client's text
//! encoder).
//!
//! Each group of families registers itself in its own module, in exposition order:
//! the series limit's overflow counter ([`family`]), the flow families
//! ([`flow_families`]), steps, ingest ([`events`]), the store's occupancy ([`store`]),
//! network, objectives, the service's own ([`process`]), then the state file's and the
//! shared store's ([`store`]). The flow, step and network families are
//! [`LimitedFamily`](family::LimitedFamily)s (a series limit, per-flow buckets) holding
//! prometheus-client's own metrics; the others are plain `Family`s with derived label
//! sets, whose fixed series are resolved once and kept. A new family is one field and
//! one `register` call in its group's module, and a line in the golden exposition
//! (`testdata/exposition.txt`).

mod duration;
mod events;
mod exemplar;
mod exposition;
mod family;
mod flow_families;
mod label_cuts;
pub mod network;
mod objectives;
mod process;
mod step_totals;
mod steps;
mod store;
mod text004;
mod totals;

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::flows::event::{DimValues, Source};
use crate::flows::label_value::LabelCuts;
use crate::flows::store::{FlowSink, Report};
use crate::flows::EventKind;
use crate::model::{Rejection, Signal, Transport};
pub use duration::{HistogramMode, HistogramShape};
pub use exemplar::TraceExemplar;
pub use exposition::{ExpositionError, ExpositionFormat};
use family::{LimitedFamily, SeriesLimit};
use flow_families::FlowFamilies;
pub use objectives::{FlowObjective, ObjectiveSettings};
pub use totals::{FlowTotals, StepTotals};

/// What the metrics need to know (built from `dimensions`, `flows.*.buckets` and
/// `limits` by the app).
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// `limits.max_series_per_metric`.
    pub max_series_per_metric: usize,
    /// Label names of the start and end dimensions (already valid label names).
    pub start_dim_labels: Vec<String>,
    /// The same for end dimensions.
    pub end_dim_labels: Vec<String>,
    /// Duration buckets of flows without their own (`flows.default.buckets`).
    pub default_buckets: Vec<f64>,
    /// Flows with their own duration buckets.
    pub per_flow_buckets: HashMap<String, Vec<f64>>,
    /// Classic, native or both buckets (`flows.*.histogram`): the default, and flows
    /// with their own.
    pub default_histogram: HistogramShape,
    /// Flows with their own histogram kind.
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

/// The registry and every family flowmetrics exposes; the sink the stages report to.
pub struct Metrics {
    registry: Registry,
    /// Makes each report atomic to a scrape (the invariant of docs/behaviour.md §3 holds in every
    /// exposition): reports hold one stripe for reading, a scrape holds all for writing.
    gate: ScrapeGate,
    /// Held for the whole of an encode: one at a time.
    encoding: std::sync::Mutex<()>,
    /// Length of the last `/metrics` body, to size the next one.
    last_encoded_len: AtomicUsize,
    /// Seconds since start, advanced by [`Metrics::housekeeping`]; families stamp each
    /// series with it when they record.
    clock: Arc<AtomicU64>,
    started_at: Instant,
    /// Seconds a label set may go without a recording (none: never removed).
    idle_secs: Option<u64>,
    last_prune: AtomicU64,

    flows: FlowFamilies,
    steps: steps::StepMetrics,
    events: events::EventMetrics,
    /// `flowmetrics_in_flight_entries`, set at each scrape.
    in_flight_entries: Gauge,
    network: Option<network::NetworkMetrics>,
    objectives: objectives::ObjectiveMetrics,
    label_cuts: Arc<LabelCuts>,
    store: store::StoreMetrics,
}

/// What each group of families registers with: the registry (families are written in
/// the order they are registered), the series limit of the limited families, and the
/// settings.
struct Registrar<'a> {
    registry: Registry,
    limit: SeriesLimit,
    settings: &'a MetricsSettings,
}

impl Registrar<'_> {
    /// A family under the series limit, registered as `name` (the sample name) less its
    /// `_total`, or less its `_seconds` with the unit.
    fn family<M, L>(
        &mut self,
        (name, help): (&'static str, &str),
        layout: L::Layout,
        make: impl Fn(Option<&str>) -> M + Send + Sync + 'static,
    ) -> LimitedFamily<M, L>
    where
        M: family::Pinnable + Send + Sync + 'static,
        L: family::SeriesLabelSet,
    {
        let family = self.limit.family(name, layout, make);
        match name.strip_suffix("_seconds") {
            Some(base) => {
                let unit = prometheus_client::registry::Unit::Seconds;
                self.registry
                    .register_with_unit(base, help, unit, family.clone());
            }
            None => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                self.registry.register(base, help, family.clone());
            }
        }
        family
    }

    /// A flow family of counters, registered.
    fn counters(
        &mut self,
        name_help: (&'static str, &str),
        layout: family::Layout,
    ) -> LimitedFamily<Counter> {
        self.family(name_help, layout, |_| Counter::default())
    }
}

impl Metrics {
    /// Registers every group of families, in exposition order.
    pub fn new(settings: MetricsSettings) -> Self {
        let mut registry = Registry::default();
        let limit = SeriesLimit::registered(&mut registry, settings.max_series_per_metric);
        let clock = limit.clock.clone();
        let mut r = Registrar {
            registry,
            limit,
            settings: &settings,
        };
        let flows = FlowFamilies::register(&mut r);
        let steps = steps::StepMetrics::register(&mut r);
        let events = events::EventMetrics::register(&mut r.registry);
        let in_flight_entries =
            store::register_occupancy(&mut r.registry, settings.in_flight_capacity);
        let network = network::NetworkMetrics::register(&mut r, &events);
        let objectives = objectives::ObjectiveMetrics::register(
            &mut r.registry,
            settings.objectives.clone(),
            settings.max_series_per_metric,
        );
        process::register(&mut r.registry, &settings.label_cuts);
        let store = store::StoreMetrics::register(&mut r.registry, &settings);
        Self {
            registry: r.registry,
            gate: ScrapeGate::default(),
            encoding: std::sync::Mutex::new(()),
            last_encoded_len: AtomicUsize::new(0),
            clock,
            started_at: Instant::now(),
            idle_secs: settings
                .series_idle_timeout
                .map(|t| t.max(settings.longest_flow_timeout).as_secs().max(1)),
            last_prune: AtomicU64::new(0),
            flows,
            steps,
            events,
            in_flight_entries,
            network,
            objectives,
            label_cuts: settings.label_cuts,
            store,
        }
    }

    /// A write of the state file failed (`final`: the one at shutdown).
    pub fn state_write_failed(&self, final_write: bool) {
        self.store.state_write_failed(final_write);
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
        self.flows.pin(pin);
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
        self.flows.note_label_sets(&mut note);
        self.steps.for_each_by_label_set(&mut note);
        let keep = |labels: &family::SeriesLabels| {
            active.contains(&(labels.flow().clone(), labels.start().clone()))
        };
        let mut removed = self.flows.retain_label_sets(&keep);
        let flows: HashSet<Arc<str>> = active.iter().map(|(flow, _)| flow.clone()).collect();
        let keep_flow =
            |l: &family::SeriesLabels, touched: u64| flows.contains(l.flow()) || touched > cutoff;
        removed += self.steps.retain(&keep, &keep_flow);
        removed += self.flows.retain_flows(&keep_flow);
        removed
    }

    /// Counts a flow event accepted (`flowmetrics_flow_events_total`).
    pub fn event_accepted(&self, kind: EventKind, source: Source) {
        self.events.accepted(kind, source);
    }

    /// Counts a flow event refused (`flowmetrics_flow_events_rejected_total`).
    pub fn event_rejected(&self, rejection: &Rejection) {
        self.events.refused(rejection);
    }

    /// Counts an answered OTLP request (`flowmetrics_otlp_requests_total`).
    pub fn request(&self, transport: Transport, signal: Signal, code: &'static str) {
        self.events.request(transport, signal, code);
    }

    /// Counts spans received (`flowmetrics_otlp_spans_total`).
    pub fn spans_received(&self, transport: Transport, n: u64) {
        self.events.spans(transport, n);
    }

    /// Counts log records received (`flowmetrics_otlp_log_records_total`).
    pub fn log_records_received(&self, transport: Transport, n: u64) {
        self.events.log_records(transport, n);
    }

    /// Series counts per limited flow family (for tests and the benchmark).
    pub fn series_counts(&self) -> [(&'static str, usize); 8] {
        self.flows.series_counts()
    }
}

impl FlowSink for Metrics {
    fn report(&self, report: Report<'_>) {
        let _open = self.gate.enter();
        match report {
            Report::Opened { flow, start_dims } => self.opened(flow, start_dims, false),
            Report::Restored { flow, start_dims } => self.opened(flow, start_dims, true),
            Report::Discarded { flow, start_dims } => self.flows.discarded(flow, start_dims),
            Report::Completed {
                flow,
                start_dims,
                end,
                duration_secs,
                transits,
            } => {
                self.flows.completed(flow, start_dims, end, duration_secs);
                self.steps.closed(flow, start_dims, transits);
            }
            Report::TimedOut {
                flow,
                start_dims,
                transits,
                last_step,
            } => {
                self.flows.timed_out(flow, start_dims);
                self.steps.closed(flow, start_dims, transits);
                self.steps.stalled(flow, start_dims, last_step);
            }
            Report::Dropped { flow, .. } => self.flows.dropped(flow),
            Report::Unmatched { flow, .. } => self.flows.unmatched_end(flow),
            Report::Duplicate { kind } => self.events.duplicate(kind),
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

impl Metrics {
    /// An instance opened (or restored): a new label set gets its zero series in every
    /// family that knows it from a start (docs/behaviour.md §4).
    fn opened(&self, flow: &Arc<str>, start_dims: &DimValues, restored: bool) {
        if self.flows.opened(flow, start_dims, restored) {
            self.steps.create_zero_series(flow, start_dims);
            self.objectives.flow_seen(flow);
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
        stripe.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn close(&self) -> Vec<std::sync::RwLockWriteGuard<'_, ()>> {
        self.stripes
            .iter()
            .map(|s| s.0.write().unwrap_or_else(PoisonError::into_inner))
            .collect()
    }
}

#[cfg(test)]
mod tests;
