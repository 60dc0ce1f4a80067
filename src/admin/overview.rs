//! The live overview behind `/` and `/api/flows`: per-flow totals, a short in-process
//! history sampled every few seconds (for rates, windowed percentiles and sparklines), and
//! the JSON the page polls.
//!
//! The totals come from [`flow_totals`], the one place that reads the metrics (typed,
//! from the flow families' own series); everything else here works on [`FlowTotals`]
//! snapshots.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::watch;

mod journey;

use super::objective_status::{objective_cell, ObjectiveCell};
pub use crate::metrics::FlowTotals;
use crate::metrics::{FlowObjective, Metrics};

/// How often the history takes a sample.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept: with [`SAMPLE_INTERVAL`], the last five minutes.
pub const MAX_SAMPLES: usize = 60;
/// Flows kept in the history (those with the most starts); the table still lists more.
pub const MAX_HISTORY_FLOWS: usize = 100;
/// Flows listed in one `/api/flows` answer (those with the most starts).
pub const MAX_LISTED_FLOWS: usize = 1000;
/// How long totals read for the page are reused (it polls every few seconds).
const TOTALS_REUSE: Duration = Duration::from_millis(250);
/// The window of the started/s column.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Every flow's totals, sorted by flow name, read from the families' own series
/// ([`Metrics::flow_totals`]).
pub fn flow_totals(metrics: &Metrics) -> Vec<FlowTotals> {
    metrics.flow_totals()
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
    interval: Duration,
    samples: Mutex<VecDeque<Snapshot>>,
    /// The last totals read, and when: reused for [`TOTALS_REUSE`].
    last: Mutex<Option<(Instant, Arc<Vec<FlowTotals>>)>>,
}

impl Overview {
    /// Takes a first sample now and one every `interval` until `stop` turns true.
    pub fn start(
        metrics: Arc<Metrics>,
        interval: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> Arc<Overview> {
        let overview = Arc::new(Overview {
            metrics,
            interval,
            samples: Mutex::new(VecDeque::with_capacity(MAX_SAMPLES)),
            last: Mutex::new(None),
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

    /// The totals now, or read at most [`TOTALS_REUSE`] ago: reading them holds
    /// reports for a walk over the flow families, so a page polled by many clients
    /// does so a few times a second at most.
    fn current(&self) -> Arc<Vec<FlowTotals>> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, totals)) = &*last {
            if at.elapsed() <= TOTALS_REUSE {
                return totals.clone();
            }
        }
        let totals = Arc::new(flow_totals(&self.metrics));
        *last = Some((Instant::now(), totals.clone()));
        totals
    }

    fn sample(&self) {
        let mut totals = flow_totals(&self.metrics);
        // The journeys are shown since the start, not over the window: the history
        // keeps no steps (at most max_steps_per_flow bucket sets per flow).
        for t in &mut totals {
            t.steps = Vec::new();
        }
        if totals.len() > MAX_HISTORY_FLOWS {
            totals.sort_by(|a, b| b.started.cmp(&a.started).then(a.flow.cmp(&b.flow)));
            totals.truncate(MAX_HISTORY_FLOWS);
        }
        let snapshot = Snapshot {
            at: Instant::now(),
            flows: totals.into_iter().map(|t| (t.flow.clone(), t)).collect(),
        };
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(snapshot);
    }

    /// The `/api/flows` answer, as JSON.
    pub fn json(&self) -> String {
        let current = self.current();
        let samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let objective_for = |flow: &str| self.metrics.objective_for(flow);
        let report = build_report(
            &current,
            &samples,
            Instant::now(),
            self.interval,
            &objective_for,
        );
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
    /// The flow's objective over the window: met, burning, or none.
    objective: ObjectiveCell,
    /// Starts per second and errors per second between consecutive samples (and from
    /// the last sample to now), oldest first.
    spark_started: Vec<f64>,
    spark_errors: Vec<f64>,
    /// The flow's steps in journey order (empty without steps), and the timed-out
    /// instances that reached none.
    steps: Vec<journey::StepRow>,
    stalled_at_start: u64,
}

fn build_report(
    current: &[FlowTotals],
    samples: &VecDeque<Snapshot>,
    now: Instant,
    interval: Duration,
    objective_for: &dyn Fn(&str) -> Option<FlowObjective>,
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
                objective: objective_cell(objective_for(&t.flow), t, &base),
                spark_started,
                spark_errors,
                steps: journey::step_rows(t),
                stalled_at_start: t.stalled_at_start,
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
        let report = build_report(&current, &samples, now, Duration::from_secs(10), &|_| None);
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
