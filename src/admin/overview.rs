//! The live overview behind `/` and `/api/flows`: per-flow totals, a short in-process
//! history sampled every few seconds (for rates, windowed percentiles and sparklines), and
//! the JSON the page polls.
//!
//! The totals come from [`flow_totals`], the one place that reads the metrics; everything
//! else here works on [`FlowTotals`] snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// How often the history takes a sample.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: with [`SAMPLE_INTERVAL`], the last five minutes.
pub const MAX_SAMPLES: usize = 60;
/// Flows kept in the history (those with the most starts); the table still lists more.
pub const MAX_HISTORY_FLOWS: usize = 100;
/// Flows listed in one `/api/flows` answer (those with the most starts).
pub const MAX_LISTED_FLOWS: usize = 1000;
/// The window of the started/s column.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// One flow's counters, summed over its dimension labels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FlowTotals {
    pub flow: String,
    pub started: u64,
    pub completed_success: u64,
    pub completed_failure: u64,
    pub completed_cancelled: u64,
    pub incomplete: u64,
    pub in_progress: i64,
    pub dropped: u64,
    pub unmatched: u64,
    /// Cumulative duration buckets: (upper bound in seconds, count), ascending, ending
    /// with `+Inf`.
    pub duration_buckets: Vec<(f64, u64)>,
    pub duration_count: u64,
    pub duration_sum: f64,
}

impl FlowTotals {
    fn ended(&self) -> u64 {
        self.completed_success + self.completed_failure + self.completed_cancelled + self.incomplete
    }

    fn errors(&self) -> u64 {
        self.completed_failure + self.incomplete
    }
}

/// Every flow's totals, sorted by flow name.
///
/// Reads the metrics through their own OpenMetrics exposition (the families' internals are
/// not a stable interface); series folded into `otel_metric_overflow` belong to no flow
/// and are skipped.
pub fn flow_totals(metrics: &Metrics, entries: u64) -> Vec<FlowTotals> {
    totals_from_exposition(&metrics.encode(entries))
}

/// Parses our own exposition text into per-flow totals.
pub fn totals_from_exposition(text: &str) -> Vec<FlowTotals> {
    let mut flows: BTreeMap<String, FlowTotals> = BTreeMap::new();
    // Per flow: bucket upper bound (as written) → (bound, cumulative count).
    let mut buckets: HashMap<String, BTreeMap<String, (f64, u64)>> = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some(sample) = parse_sample(line) else {
            continue;
        };
        if sample.label("otel_metric_overflow").is_some() {
            continue;
        }
        let Some(flow) = sample.label("flow") else {
            continue;
        };
        let count = || to_count(sample.value);
        let totals = flows.entry(flow.to_string()).or_insert_with(|| FlowTotals {
            flow: flow.to_string(),
            ..Default::default()
        });
        match sample.name {
            "flowmetrics_flows_started_total" => totals.started += count(),
            "flowmetrics_flows_completed_total" => match sample.label("outcome") {
                Some("success") => totals.completed_success += count(),
                Some("failure") => totals.completed_failure += count(),
                Some("cancelled") => totals.completed_cancelled += count(),
                _ => {}
            },
            "flowmetrics_flow_errors_total"
                if sample.label("error_reason") == Some("incomplete") =>
            {
                totals.incomplete += count();
            }
            "flowmetrics_flows_in_progress" => totals.in_progress += sample.value as i64,
            "flowmetrics_flows_dropped_total" => totals.dropped += count(),
            "flowmetrics_flow_unmatched_ends_total" => totals.unmatched += count(),
            "flowmetrics_flow_duration_seconds_count" => totals.duration_count += count(),
            "flowmetrics_flow_duration_seconds_sum" => totals.duration_sum += sample.value,
            "flowmetrics_flow_duration_seconds_bucket" => {
                if let Some(le) = sample.label("le") {
                    if let Some(bound) = parse_number(le) {
                        let slot = buckets
                            .entry(flow.to_string())
                            .or_default()
                            .entry(le.to_string())
                            .or_insert((bound, 0));
                        slot.1 += count();
                    }
                }
            }
            _ => {}
        }
    }
    for (flow, by_le) in buckets {
        if let Some(totals) = flows.get_mut(&flow) {
            let mut list: Vec<(f64, u64)> = by_le.into_values().collect();
            list.sort_by(|a, b| a.0.total_cmp(&b.0));
            totals.duration_buckets = list;
        }
    }
    flows.into_values().collect()
}

fn to_count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

fn parse_number(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

impl Sample<'_> {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `name{k="v",...} value [timestamp] [# exemplar]`, label values unescaped.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut s = inner;
        loop {
            s = s.trim_start_matches(',');
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = s.find('=')?;
            let key = &s[..eq];
            let quoted = s[eq + 1..].strip_prefix('"')?;
            let mut chars = quoted.char_indices();
            let mut value = String::new();
            let consumed = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i + 1,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            s = &quoted[consumed..];
        }
    }
    let value_text = rest.trim_start().split([' ', '#']).next()?;
    let value = parse_number(value_text)?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// The `q` quantile (0..=1) of cumulative buckets, as Prometheus' `histogram_quantile`
/// computes it: linear interpolation inside the bucket holding the rank; a rank in the
/// `+Inf` bucket answers the highest finite bound. `None` without observations.
pub fn quantile(q: f64, buckets: &[(f64, u64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 || buckets.len() < 2 && buckets[0].0.is_infinite() {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let i = buckets.iter().position(|&(_, c)| c as f64 >= rank)?;
    let (upper, count) = buckets[i];
    if upper.is_infinite() {
        return Some(buckets[i - 1].0);
    }
    let (lower, below) = if i == 0 {
        if upper <= 0.0 {
            return Some(upper);
        }
        (0.0, 0)
    } else {
        buckets[i - 1]
    };
    let in_bucket = (count - below) as f64;
    if in_bucket == 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below as f64) / in_bucket)
}

/// Cumulative buckets of `now` minus those of `before` (same bounds; a bound missing
/// before counts as 0; a counter that went down — a reset — counts from 0).
fn bucket_delta(now: &[(f64, u64)], before: &[(f64, u64)]) -> Vec<(f64, u64)> {
    now.iter()
        .map(|&(bound, count)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0, |&(_, c)| c);
            (bound, count.checked_sub(old).unwrap_or(count))
        })
        .collect()
}

fn delta(now: u64, before: u64) -> u64 {
    now.checked_sub(before).unwrap_or(now)
}

struct Snapshot {
    at: Instant,
    flows: HashMap<String, FlowTotals>,
}

/// The sampled history and what the page needs from it.
pub struct Overview {
    metrics: Arc<Metrics>,
    /// Entries in the correlation store, for [`Metrics::encode`].
    entries: Box<dyn Fn() -> u64 + Send + Sync>,
    interval: Duration,
    samples: Mutex<VecDeque<Snapshot>>,
}

impl Overview {
    /// Takes a first sample now and one every `interval` until `stop` turns true.
    pub fn start(
        metrics: Arc<Metrics>,
        entries: impl Fn() -> u64 + Send + Sync + 'static,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Arc<Overview> {
        let overview = Arc::new(Overview {
            metrics,
            entries: Box::new(entries),
            interval,
            samples: Mutex::new(VecDeque::with_capacity(MAX_SAMPLES)),
        });
        overview.sample();
        let weak = Arc::downgrade(&overview);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate: sampled above
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = crate::server::stopped(&mut stop) => break,
                }
                match weak.upgrade() {
                    Some(overview) => overview.sample(),
                    None => break,
                }
            }
        });
        overview
    }

    fn current(&self) -> Vec<FlowTotals> {
        flow_totals(&self.metrics, (self.entries)())
    }

    fn sample(&self) {
        let mut totals = self.current();
        if totals.len() > MAX_HISTORY_FLOWS {
            totals.sort_by(|a, b| b.started.cmp(&a.started).then(a.flow.cmp(&b.flow)));
            totals.truncate(MAX_HISTORY_FLOWS);
        }
        let snapshot = Snapshot {
            at: Instant::now(),
            flows: totals.into_iter().map(|t| (t.flow.clone(), t)).collect(),
        };
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(snapshot);
    }

    /// The `/api/flows` answer, as JSON.
    pub fn json(&self) -> String {
        let current = self.current();
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let report = build_report(&current, &samples, Instant::now(), self.interval);
        drop(samples);
        serde_json::to_string(&report).unwrap_or_else(|_| "{}".into())
    }
}

#[derive(Debug, Serialize)]
struct Report {
    generated_unix_ms: u64,
    sample_interval_seconds: f64,
    /// What the windowed figures (error ratio, percentiles, sparkline) cover.
    window_seconds: f64,
    rate_window_seconds: f64,
    flow_count: usize,
    /// Flows not listed (beyond [`MAX_LISTED_FLOWS`]).
    omitted: usize,
    flows: Vec<FlowRow>,
}

#[derive(Debug, Serialize)]
struct FlowRow {
    flow: String,
    started: u64,
    started_per_second: Option<f64>,
    success: u64,
    failure: u64,
    cancelled: u64,
    incomplete: u64,
    in_progress: i64,
    dropped: u64,
    unmatched: u64,
    error_ratio: Option<f64>,
    p50: Option<f64>,
    p95: Option<f64>,
    p99: Option<f64>,
    /// Starts per second and errors per second between consecutive samples (and from
    /// the last sample to now), oldest first.
    spark_started: Vec<f64>,
    spark_errors: Vec<f64>,
}

fn build_report(
    current: &[FlowTotals],
    samples: &VecDeque<Snapshot>,
    now: Instant,
    interval: Duration,
) -> Report {
    let oldest = samples.front();
    let window = oldest.map_or(Duration::ZERO, |s| now.saturating_duration_since(s.at));
    // The newest sample at least RATE_WINDOW old, else the oldest one.
    let rate_base = samples
        .iter()
        .rev()
        .find(|s| now.saturating_duration_since(s.at) >= RATE_WINDOW)
        .or(oldest);
    let rate_elapsed = rate_base.map_or(Duration::ZERO, |s| now.saturating_duration_since(s.at));

    let mut listed: Vec<&FlowTotals> = current.iter().collect();
    if listed.len() > MAX_LISTED_FLOWS {
        listed.sort_by(|a, b| b.started.cmp(&a.started).then(a.flow.cmp(&b.flow)));
        listed.truncate(MAX_LISTED_FLOWS);
        listed.sort_by(|a, b| a.flow.cmp(&b.flow));
    }
    let empty = FlowTotals::default();
    let flows = listed
        .iter()
        .map(|t| {
            let at = |s: &Snapshot| s.flows.get(&t.flow).unwrap_or(&empty).clone();
            let base = oldest.map(at).unwrap_or_default();
            let ended = delta(t.ended(), base.ended());
            let errors = delta(t.errors(), base.errors());
            let window_buckets = bucket_delta(&t.duration_buckets, &base.duration_buckets);
            let started_per_second = rate_base
                .filter(|_| rate_elapsed >= Duration::from_secs(1))
                .map(|s| delta(t.started, at(s).started) as f64 / rate_elapsed.as_secs_f64());
            let mut points: Vec<(Instant, u64, u64)> = samples
                .iter()
                .map(|s| {
                    let v = at(s);
                    (s.at, v.started, v.errors())
                })
                .collect();
            points.push((now, t.started, t.errors()));
            let mut spark_started = Vec::new();
            let mut spark_errors = Vec::new();
            for pair in points.windows(2) {
                let secs = pair[1].0.saturating_duration_since(pair[0].0).as_secs_f64();
                if secs < 0.5 {
                    continue;
                }
                spark_started.push(delta(pair[1].1, pair[0].1) as f64 / secs);
                spark_errors.push(delta(pair[1].2, pair[0].2) as f64 / secs);
            }
            FlowRow {
                flow: t.flow.clone(),
                started: t.started,
                started_per_second,
                success: t.completed_success,
                failure: t.completed_failure,
                cancelled: t.completed_cancelled,
                incomplete: t.incomplete,
                in_progress: t.in_progress,
                dropped: t.dropped,
                unmatched: t.unmatched,
                error_ratio: (ended > 0).then(|| errors as f64 / ended as f64),
                p50: quantile(0.50, &window_buckets),
                p95: quantile(0.95, &window_buckets),
                p99: quantile(0.99, &window_buckets),
                spark_started,
                spark_errors,
            }
        })
        .collect();
    Report {
        generated_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        sample_interval_seconds: interval.as_secs_f64(),
        window_seconds: window.as_secs_f64(),
        rate_window_seconds: rate_elapsed.as_secs_f64(),
        flow_count: current.len(),
        omitted: current.len() - listed.len(),
        flows,
    }
}

/// JSON made safe to sit inside an HTML `<script>` element: no `<` (so no `</script>`
/// or `<!--`), and no U+2028/U+2029.
pub fn json_for_script(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples as the exposition writes them (the parser skips `#` lines, see `# EOF`).
    const TEXT: &str = r#"flowmetrics_flows_started_total{flow="checkout",region="a\"b\\c\nd é}{,="} 1
flowmetrics_flows_started_total{flow="checkout",region="eu"} 1234
flowmetrics_flows_started_total{flow="login",region="eu"} 7
flowmetrics_flows_started_total{otel_metric_overflow="true"} 5
flowmetrics_flows_completed_total{flow="checkout",outcome="cancelled",region="eu"} 1 # {trace_id="07",span_id="de"} 1.0
flowmetrics_flows_completed_total{flow="checkout",outcome="failure",region="eu"} 3
flowmetrics_flows_completed_total{flow="checkout",outcome="success",region="eu"} 6
flowmetrics_flows_completed_total{flow="checkout",outcome="success",region="us"} 4
flowmetrics_flows_completed_total{otel_metric_overflow="true"} 10
flowmetrics_flow_errors_total{flow="checkout",error_reason="failure",region="eu"} 3
flowmetrics_flow_errors_total{flow="checkout",error_reason="incomplete",region="eu"} 2
flowmetrics_flow_duration_seconds_sum{flow="login",region="eu"} 0.5
flowmetrics_flow_duration_seconds_count{flow="login",region="eu"} 4
flowmetrics_flow_duration_seconds_bucket{le="0.1",flow="login",region="eu"} 1
flowmetrics_flow_duration_seconds_bucket{le="1.0",flow="login",region="eu"} 3 # {trace_id="09",span_id="de"} 0.042
flowmetrics_flow_duration_seconds_bucket{le="+Inf",flow="login",region="eu"} 4
flowmetrics_flow_duration_seconds_sum{flow="login",region="us"} 0.1
flowmetrics_flow_duration_seconds_count{flow="login",region="us"} 1
flowmetrics_flow_duration_seconds_bucket{le="0.1",flow="login",region="us"} 1
flowmetrics_flow_duration_seconds_bucket{le="1.0",flow="login",region="us"} 1
flowmetrics_flow_duration_seconds_bucket{le="+Inf",flow="login",region="us"} 1
flowmetrics_flows_in_progress{flow="checkout"} 1219
flowmetrics_flows_dropped_total{flow="login",reason="capacity"} 2
flowmetrics_flow_unmatched_ends_total{flow="login"} 3
flowmetrics_in_flight_entries 9
# EOF
"#;

    #[test]
    fn totals_sum_over_dimensions_and_skip_overflow() {
        let totals = totals_from_exposition(TEXT);
        assert_eq!(totals.len(), 2, "{totals:?}");
        let checkout = &totals[0];
        assert_eq!(checkout.flow, "checkout");
        assert_eq!(checkout.started, 1235);
        assert_eq!(checkout.completed_success, 10);
        assert_eq!(checkout.completed_failure, 3);
        assert_eq!(checkout.completed_cancelled, 1);
        assert_eq!(checkout.incomplete, 2);
        assert_eq!(checkout.in_progress, 1219);
        let login = &totals[1];
        assert_eq!(login.flow, "login");
        assert_eq!(login.started, 7);
        assert_eq!(login.dropped, 2);
        assert_eq!(login.unmatched, 3);
        assert_eq!(login.duration_count, 5);
        assert!((login.duration_sum - 0.6).abs() < 1e-9);
        assert_eq!(
            login.duration_buckets,
            vec![(0.1, 2), (1.0, 4), (f64::INFINITY, 5)]
        );
    }

    #[test]
    fn label_values_are_unescaped() {
        let s = parse_sample(r#"m{a="x\"y\\z\nw",b="}{,="} 2.5 # {t="1"} 1"#).unwrap();
        assert_eq!(s.name, "m");
        assert_eq!(s.label("a"), Some("x\"y\\z\nw"));
        assert_eq!(s.label("b"), Some("}{,="));
        assert_eq!(s.value, 2.5);
        let s = parse_sample("m 1e21").unwrap();
        assert_eq!(s.value, 1e21);
        assert!(s.labels.is_empty());
    }

    #[test]
    fn quantiles_interpolate_like_histogram_quantile() {
        let b = [(1.0, 10), (2.0, 20), (4.0, 40), (f64::INFINITY, 40)];
        // rank 20 of 40: the end of the (1, 2] bucket.
        assert_eq!(quantile(0.5, &b), Some(2.0));
        // rank 5: halfway through the first bucket, which starts at 0.
        assert_eq!(quantile(0.125, &b), Some(0.5));
        // rank 30: halfway through (2, 4].
        assert_eq!(quantile(0.75, &b), Some(3.0));
        // A rank in +Inf answers the highest finite bound.
        let b = [(1.0, 1), (f64::INFINITY, 10)];
        assert_eq!(quantile(0.99, &b), Some(1.0));
        assert_eq!(quantile(0.5, &[(1.0, 0), (f64::INFINITY, 0)]), None);
        assert_eq!(quantile(0.5, &[]), None);
    }

    #[test]
    fn report_rates_windows_and_sparklines() {
        let t0 = Instant::now();
        let flow = |started, success, failure, buckets: Vec<(f64, u64)>| FlowTotals {
            flow: "pay".into(),
            started,
            completed_success: success,
            completed_failure: failure,
            duration_buckets: buckets,
            ..Default::default()
        };
        let snap = |secs, t: FlowTotals| Snapshot {
            at: t0 + Duration::from_secs(secs),
            flows: [(t.flow.clone(), t)].into_iter().collect(),
        };
        let samples: VecDeque<Snapshot> = [
            snap(0, flow(100, 50, 50, vec![(1.0, 50), (f64::INFINITY, 50)])),
            snap(10, flow(120, 60, 50, vec![(1.0, 50), (f64::INFINITY, 60)])),
        ]
        .into();
        let now = t0 + Duration::from_secs(20);
        let current = [flow(160, 90, 60, vec![(1.0, 60), (f64::INFINITY, 90)])];
        let report = build_report(&current, &samples, now, Duration::from_secs(10));
        assert_eq!(report.flow_count, 1);
        let row = &report.flows[0];
        assert_eq!(row.started, 160);
        // No sample is a minute old: the rate is over the whole 20 s.
        assert_eq!(row.started_per_second, Some(3.0));
        assert_eq!(row.spark_started, vec![2.0, 4.0]);
        assert_eq!(row.spark_errors, vec![0.0, 1.0]);
        // Window: 40 success + 10 failure ended, 10 errors.
        assert_eq!(row.error_ratio, Some(0.2));
        // Window buckets: (1.0, 10), (+Inf, 40): p50 rank 20 lies in +Inf → 1.0.
        assert_eq!(row.p50, Some(1.0));
    }

    #[test]
    fn script_json_cannot_close_the_script_element() {
        let json = serde_json::to_string(&"</script><script>alert(1)</script>\u{2028}").unwrap();
        let safe = json_for_script(&json);
        assert!(!safe.contains('<'), "{safe}");
        let back: String = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, "</script><script>alert(1)</script>\u{2028}");
    }
}
