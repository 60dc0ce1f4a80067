//! Every public metric family (SPEC §4), the flow table's sink, and encoding.

mod instruments;
pub mod network;
mod process;
pub mod series;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::{sanitize_label_name, Config, DimensionSource};
use crate::flows::event::{DimValues, Outcome, Rejection, Source};
use crate::flows::table::{EndRecord, FlowSink, Report};
use crate::flows::EventKind;
use instruments::{Buckets, ExemplarCounter, ExemplarHistogram};
pub use series::OVERFLOW_LABEL;
use series::{Descriptor, Layout, LimitedFamily, OverflowReporter, SeriesRef};

type Pair = [(&'static str, &'static str); 1];
type Pairs2 = [(&'static str, &'static str); 2];
type Pairs3 = [(&'static str, &'static str); 3];

/// Which OTLP transport a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    Grpc,
}

impl Transport {
    pub fn label(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::Grpc => "grpc",
        }
    }
}

/// The OTLP signal of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Logs,
    Metrics,
}

impl Signal {
    pub fn label(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Logs => "logs",
            Signal::Metrics => "metrics",
        }
    }
}

/// The exposition is `overflow_registry`, the flow families (which write their own
/// text), then `registry`: the order the families had in one registry.
pub struct Metrics {
    overflow_registry: Registry,
    registry: Registry,
    /// Length of the last `/metrics` body, to size the next one.
    last_encoded_len: AtomicUsize,
    /// No dimension values (families without start or end dimensions).
    no_dims: DimValues,
    /// One empty value per end dimension: series whose instance had no end.
    empty_end_dims: DimValues,

    flows_started: LimitedFamily<instruments::Counter>,
    flows_completed: LimitedFamily<ExemplarCounter>,
    flow_errors: LimitedFamily<instruments::Counter>,
    flow_duration: LimitedFamily<ExemplarHistogram>,
    flows_in_progress: LimitedFamily<instruments::Gauge>,
    flows_dropped: LimitedFamily<instruments::Counter>,
    unmatched_ends: LimitedFamily<instruments::Counter>,
    negative_durations: LimitedFamily<instruments::Counter>,

    /// flow_events_total by [source][kind].
    accepted: [[Counter; 2]; 2],
    events_rejected: Family<Pair, Counter>,
    /// flow_events_duplicate_total by kind.
    duplicates: [Counter; 2],
    otlp_requests: Family<Pairs3, Counter>,
    otlp_spans: Family<Pair, Counter>,
    otlp_log_records: Family<Pair, Counter>,
    in_flight_entries: Gauge,
    network: Option<network::NetworkMetrics>,
}

impl Metrics {
    pub fn new(config: &Config) -> Self {
        let mut overflow_registry = Registry::default();
        let mut registry = Registry::default();
        let max = config.limits.max_series_per_metric;

        let overflow_family = Family::<Pair, Counter>::default();
        overflow_registry.register(
            "flowmetrics_series_overflow",
            "Recordings folded into a family's otel_metric_overflow=\"true\" series because \
             the family reached limits.max_series_per_metric",
            overflow_family.clone(),
        );
        let overflow_family_handle = overflow_family.clone();
        let overflow = Arc::new(OverflowReporter::new(move |metric| {
            overflow_family.get_or_create(&[("metric", metric)]).clone()
        }));

        let dim_names = |side| {
            config
                .dimensions
                .iter()
                .filter(|d| d.from == side)
                .map(|d| Box::from(sanitize_label_name(&d.label)))
                .collect::<Arc<[Box<str>]>>()
        };
        let (start_dims, end_dims) = (
            dim_names(DimensionSource::Start),
            dim_names(DimensionSource::End),
        );
        let flow_only = Layout::default();
        let with_dims = |extra| Layout {
            extra,
            start_dims: start_dims.clone(),
            end_dims: end_dims.clone(),
        };
        let family = |name, help| Descriptor {
            name,
            help,
            unit: None,
        };
        let counter = |descriptor, layout| {
            LimitedFamily::new(descriptor, max, layout, overflow.clone(), |_| {
                instruments::Counter::default()
            })
        };

        let flows_started = counter(
            family(
                "flowmetrics_flows_started_total",
                "Flow instances opened by a start event",
            ),
            Layout {
                start_dims: start_dims.clone(),
                ..Layout::default()
            },
        );
        let flows_completed = LimitedFamily::new(
            family(
                "flowmetrics_flows_completed_total",
                "Flow instances closed by an end event, by outcome (success, failure, \
                 cancelled)",
            ),
            max,
            with_dims(Some("outcome")),
            overflow.clone(),
            |_| ExemplarCounter::default(),
        );
        let flow_errors = counter(
            family(
                "flowmetrics_flow_errors_total",
                "Failed flows: error_reason=\"failure\" for failure ends, \"incomplete\" for \
                 instances whose timeout passed without an end",
            ),
            with_dims(Some("error_reason")),
        );
        // One bucket layout per configuration, shared by its series.
        let default_buckets = Buckets::new(&config.flows.default.buckets);
        let per_flow: std::collections::HashMap<String, Arc<Buckets>> = config
            .flows
            .per_flow
            .iter()
            .filter_map(|(name, o)| Some((name.clone(), Buckets::new(o.buckets.as_ref()?))))
            .collect();
        let flow_duration = LimitedFamily::new(
            Descriptor {
                unit: Some("seconds"),
                ..family(
                    "flowmetrics_flow_duration_seconds",
                    "Start-to-end duration of successful flows, from the two events' \
                     timestamps",
                )
            },
            max,
            with_dims(None),
            overflow.clone(),
            move |flow: Option<&str>| {
                let buckets = flow
                    .and_then(|f| per_flow.get(f))
                    .unwrap_or(&default_buckets);
                ExemplarHistogram::new(buckets.clone())
            },
        );
        let flows_in_progress = LimitedFamily::new(
            family(
                "flowmetrics_flows_in_progress",
                "Flow instances open now (started, not yet ended, timed out or dropped)",
            ),
            max,
            flow_only.clone(),
            overflow.clone(),
            |_| instruments::Gauge::default(),
        );
        let flows_dropped = counter(
            family(
                "flowmetrics_flows_dropped_total",
                "Open flow instances dropped before they ended; reason=\"capacity\": the \
                 correlation table was full (limits.max_in_flight)",
            ),
            Layout {
                extra: Some("reason"),
                ..Layout::default()
            },
        );
        let unmatched_ends = counter(
            family(
                "flowmetrics_flow_unmatched_ends_total",
                "End events whose start never arrived within the flow's timeout (or that \
                 were evicted from a full table while waiting)",
            ),
            flow_only.clone(),
        );
        let negative_durations = counter(
            family(
                "flowmetrics_flow_negative_durations_total",
                "Successful flows whose end timestamp is earlier than their start (clock \
                 skew); not observed in the duration histogram",
            ),
            flow_only,
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
            "Entries in the correlation table now: open instances plus ends waiting for \
             their start",
            in_flight_entries.clone(),
        );
        let network = network::NetworkMetrics::new(
            config,
            &mut registry,
            &overflow_family_handle,
            &events_rejected,
        );
        let build_info = Family::<Pair, Gauge>::default();
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        registry.register(
            "flowmetrics_build_info",
            "Build identity of this flowmetrics (always 1)",
            build_info,
        );
        registry.register_collector(Box::new(process::ProcessCollector));

        // Self-metric series exist from the start (at 0), so rates and alerts work
        // before the first event; their handles skip the family lookup per event.
        let accepted = [Source::SpanEvent, Source::Log].map(|source| {
            ["start", "end"].map(|kind| {
                events
                    .get_or_create(&[("kind", kind), ("source", source.label())])
                    .clone()
            })
        });
        let duplicates =
            ["start", "end"].map(|kind| events_duplicate.get_or_create(&[("kind", kind)]).clone());
        for reason in Rejection::REASONS {
            let _ = events_rejected.get_or_create(&[("reason", reason)]);
        }
        Self {
            overflow_registry,
            registry,
            last_encoded_len: AtomicUsize::new(0),
            no_dims: Arc::from([]),
            empty_end_dims: end_dims.iter().map(|_| Arc::from("")).collect(),
            flows_started,
            flows_completed,
            flow_errors,
            flow_duration,
            flows_in_progress,
            flows_dropped,
            unmatched_ends,
            negative_durations,
            accepted,
            events_rejected,
            duplicates,
            otlp_requests,
            otlp_spans,
            otlp_log_records,
            in_flight_entries,
            network,
        }
    }

    /// The network families; `None` when `network_flows.enabled` is false.
    pub fn network(&self) -> Option<&network::NetworkMetrics> {
        self.network.as_ref()
    }

    /// Every family as one OpenMetrics exposition.
    pub fn encode(&self, table_entries: u64) -> String {
        self.in_flight_entries
            .set(i64::try_from(table_entries).unwrap_or(i64::MAX));
        // Sized from the last body (plus room to grow), so the multi-MiB body is not
        // copied through a dozen reallocations.
        let last = self.last_encoded_len.load(Ordering::Relaxed);
        let mut out = String::with_capacity((last + last / 8).max(16 * 1024));
        let fail = "writing to a String cannot fail";
        encode_registry(&mut out, &self.overflow_registry).expect(fail);
        self.flows_started.encode(&mut out);
        self.flows_completed.encode(&mut out);
        self.flow_errors.encode(&mut out);
        self.flow_duration.encode(&mut out);
        self.flows_in_progress.encode(&mut out);
        self.flows_dropped.encode(&mut out);
        self.unmatched_ends.encode(&mut out);
        self.negative_durations.encode(&mut out);
        encode_registry(&mut out, &self.registry).expect(fail);
        encode_eof(&mut out).expect(fail);
        self.last_encoded_len.store(out.len(), Ordering::Relaxed);
        out
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
            start: start_dims,
            end: end_dims.unwrap_or(&self.empty_end_dims),
        }
    }
}

fn kind_index(kind: EventKind) -> usize {
    match kind {
        EventKind::Start => 0,
        EventKind::End(_) => 1,
    }
}

impl FlowSink for Metrics {
    fn report(&self, report: Report<'_>) {
        match report {
            Report::Opened { flow, start_dims } => {
                let started = SeriesRef {
                    flow,
                    extra: None,
                    start: start_dims,
                    end: &self.no_dims,
                };
                self.flows_started.with(started, |c| c.inc());
                self.flows_in_progress
                    .with(self.flow_only(flow), |g| g.inc());
            }
            Report::Completed {
                flow,
                start_dims,
                end,
                duration_secs,
            } => {
                self.completed(flow, start_dims, end, duration_secs);
            }
            Report::TimedOut { flow, start_dims } => {
                let labels = self.with_dims(flow, Some("incomplete"), start_dims, None);
                self.flow_errors.with(labels, |c| c.inc());
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
        }
    }
}

impl Metrics {
    fn completed(
        &self,
        flow: &Arc<str>,
        start_dims: &DimValues,
        end: &EndRecord,
        duration_secs: f64,
    ) {
        let outcome = Some(end.outcome.as_str());
        self.flows_completed.with(
            self.with_dims(flow, outcome, start_dims, Some(&end.dims)),
            |c| c.inc(end.trace),
        );
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
                |h| h.observe(duration_secs, end.trace),
            ),
            Outcome::Cancelled => {}
        }
    }
}

#[cfg(test)]
mod tests;
