//! The metrics of the flow families, and their OpenMetrics text.
//!
//! prometheus-client's text encoder formats every `le` bound on every scrape, looks up
//! each bucket's exemplar in a map and writes each fragment through a `dyn Write`; with
//! 10k flow series that was most of a scrape. These types keep their state where
//! [`FlowMetric::encode`] can read it, and it writes straight into the body from text
//! prepared once: the series' labels (when a series is created) and the `le` labels (per
//! bucket layout). Numbers are formatted with `itoa`/`dtoa`, as prometheus-client does,
//! so the text is the same.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::flows::event::TraceRef;

/// A series' metric in a [`LimitedFamily`](super::series::LimitedFamily).
pub trait FlowMetric {
    /// As in `# TYPE`.
    const TYPE: &'static str;
    /// What the sample name adds to the family name (`_total` for counters).
    const SUFFIX: &'static str;

    /// Appends the series' samples. `name` is the sample name (with [`Self::SUFFIX`]);
    /// `labels` the series' rendered labels (`flow="a",…`, may be empty).
    fn encode(&self, out: &mut String, name: &str, labels: &str, scratch: &mut Scratch);
}

/// Buffers reused across the series of one scrape, so a histogram is copied out of its
/// lock without allocating and formatted after releasing it.
#[derive(Default)]
pub struct Scratch {
    counts: Vec<u64>,
    exemplars: Vec<Option<Exemplar>>,
}

/// A poisoned lock still holds consistent numbers: nothing in these types panics while
/// holding one.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `name{labels} ` (or `name ` without labels).
fn sample(out: &mut String, name: &str, suffix: &str, labels: &str) {
    out.push_str(name);
    out.push_str(suffix);
    if !labels.is_empty() {
        out.push('{');
        out.push_str(labels);
        out.push('}');
    }
    out.push(' ');
}

/// ` # {trace_id="…",span_id="…"} value`: the end event's trace and span as lowercase
/// hex (63 characters of names and values; OpenMetrics allows 128).
fn exemplar(out: &mut String, trace: &TraceRef, value: &str) {
    const TEXT: &[u8; 76] =
        br#" # {trace_id="________________________________",span_id="________________"} "#;
    const TRACE_AT: usize = 14;
    const SPAN_AT: usize = 57;
    let mut text = *TEXT;
    hex_into(&trace.trace_id, &mut text[TRACE_AT..TRACE_AT + 32]);
    hex_into(&trace.span_id, &mut text[SPAN_AT..SPAN_AT + 16]);
    out.push_str(std::str::from_utf8(&text).expect("hex digits are ASCII"));
    out.push_str(value);
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl FlowMetric for Counter {
    const TYPE: &'static str = "counter";
    const SUFFIX: &'static str = "_total";

    fn encode(&self, out: &mut String, name: &str, labels: &str, _: &mut Scratch) {
        sample(out, name, "", labels);
        out.push_str(itoa::Buffer::new().format(self.get()));
        out.push('\n');
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl FlowMetric for Gauge {
    const TYPE: &'static str = "gauge";
    const SUFFIX: &'static str = "";

    fn encode(&self, out: &mut String, name: &str, labels: &str, _: &mut Scratch) {
        sample(out, name, "", labels);
        out.push_str(itoa::Buffer::new().format(self.get()));
        out.push('\n');
    }
}

/// A counter whose exemplar is its last increment's trace (none if that had none).
#[derive(Debug, Default)]
pub struct ExemplarCounter(Mutex<(u64, Option<TraceRef>)>);

impl ExemplarCounter {
    pub fn inc(&self, trace: Option<TraceRef>) {
        let mut state = lock(&self.0);
        state.0 += 1;
        state.1 = trace;
    }

    pub fn get(&self) -> (u64, Option<TraceRef>) {
        *lock(&self.0)
    }
}

impl FlowMetric for ExemplarCounter {
    const TYPE: &'static str = "counter";
    const SUFFIX: &'static str = "_total";

    fn encode(&self, out: &mut String, name: &str, labels: &str, _: &mut Scratch) {
        let (value, trace) = self.get();
        sample(out, name, "", labels);
        out.push_str(itoa::Buffer::new().format(value));
        if let Some(trace) = trace {
            // The exemplar's value is the increment, always 1, written as a float.
            exemplar(out, &trace, "1.0");
        }
        out.push('\n');
    }
}

/// A histogram's upper bounds (the last `+Inf`) and their `le` labels, shared by every
/// series with that layout.
#[derive(Debug)]
pub struct Buckets {
    bounds: Box<[f64]>,
    /// `le="0.005"`, …, `le="+Inf"`.
    labels: Box<[Box<str>]>,
}

impl Buckets {
    /// Non-finite bounds are dropped and `+Inf` appended (a second `+Inf` bucket would
    /// be invalid), as prometheus-client's histogram does.
    pub fn new(bounds: &[f64]) -> Arc<Self> {
        let bounds: Box<[f64]> = bounds
            .iter()
            .copied()
            .filter(|b| b.is_finite())
            .chain(std::iter::once(f64::INFINITY))
            .collect();
        let labels = bounds
            .iter()
            .map(|&b| {
                let le = if b == f64::INFINITY {
                    "+Inf"
                } else {
                    &dtoa::Buffer::new().format(b).to_owned()
                };
                format!("le=\"{le}\"").into_boxed_str()
            })
            .collect();
        Arc::new(Self { bounds, labels })
    }
}

#[derive(Clone, Copy, Debug)]
struct Exemplar {
    trace: TraceRef,
    value: f64,
}

/// A histogram with one exemplar per bucket: the last observation in that bucket that
/// had a trace. Sum, count and buckets change together under one lock, so a scrape
/// never sees a count that disagrees with the `+Inf` bucket.
#[derive(Debug)]
pub struct ExemplarHistogram {
    buckets: Arc<Buckets>,
    state: Mutex<HistogramState>,
}

#[derive(Debug)]
struct HistogramState {
    sum: f64,
    count: u64,
    /// Per bucket, not cumulative.
    counts: Box<[u64]>,
    exemplars: Box<[Option<Exemplar>]>,
}

impl ExemplarHistogram {
    pub fn new(buckets: Arc<Buckets>) -> Self {
        let n = buckets.bounds.len();
        Self {
            state: Mutex::new(HistogramState {
                sum: 0.0,
                count: 0,
                counts: vec![0; n].into(),
                exemplars: vec![None; n].into(),
            }),
            buckets,
        }
    }

    pub fn observe(&self, value: f64, trace: Option<TraceRef>) {
        // The first bucket whose bound is at least `value`; NaN goes to `+Inf`.
        let bounds = &self.buckets.bounds;
        let i = bounds
            .iter()
            .position(|&b| b >= value)
            .unwrap_or(bounds.len() - 1);
        let mut state = lock(&self.state);
        state.sum += value;
        state.count += 1;
        state.counts[i] += 1;
        if let Some(trace) = trace {
            state.exemplars[i] = Some(Exemplar { trace, value });
        }
    }
}

impl FlowMetric for ExemplarHistogram {
    const TYPE: &'static str = "histogram";
    const SUFFIX: &'static str = "";

    fn encode(&self, out: &mut String, name: &str, labels: &str, scratch: &mut Scratch) {
        let (sum, count) = {
            let state = lock(&self.state);
            scratch.counts.clear();
            scratch.counts.extend_from_slice(&state.counts);
            scratch.exemplars.clear();
            scratch.exemplars.extend_from_slice(&state.exemplars);
            (state.sum, state.count)
        };
        sample(out, name, "_sum", labels);
        out.push_str(dtoa::Buffer::new().format(sum));
        out.push('\n');
        sample(out, name, "_count", labels);
        out.push_str(itoa::Buffer::new().format(count));
        out.push('\n');

        let mut cumulative = 0;
        let buckets = self.buckets.labels.iter();
        for ((le, n), ex) in buckets.zip(&scratch.counts).zip(&scratch.exemplars) {
            cumulative += n;
            out.push_str(name);
            out.push_str("_bucket{");
            out.push_str(le);
            if !labels.is_empty() {
                out.push(',');
                out.push_str(labels);
            }
            out.push_str("} ");
            out.push_str(itoa::Buffer::new().format(cumulative));
            if let Some(ex) = ex {
                exemplar(out, &ex.trace, dtoa::Buffer::new().format(ex.value));
            }
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &impl FlowMetric, name: &str, labels: &str) -> String {
        let mut out = String::new();
        m.encode(&mut out, name, labels, &mut Scratch::default());
        out
    }

    #[test]
    fn exemplar_text_has_the_ids_in_place() {
        let trace = TraceRef::from_ids(
            &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xa, 0xb, 0xc, 0xd, 0xe, 0xff],
            &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3],
        )
        .unwrap();
        let mut out = String::new();
        exemplar(&mut out, &trace, "0.25");
        assert_eq!(
            out,
            r#" # {trace_id="000102030405060708090a0b0c0d0eff",span_id="deadbeef00010203"} 0.25"#
        );
    }

    #[test]
    fn bounds_are_finite_then_inf_and_nan_counts_in_inf() {
        let h = ExemplarHistogram::new(Buckets::new(&[f64::NAN, 1e-7, 1.0, f64::INFINITY]));
        h.observe(f64::NAN, None);
        h.observe(1.0, None);
        assert_eq!(
            text(&h, "h", ""),
            "h_sum NaN\nh_count 2\nh_bucket{le=\"1e-7\"} 0\nh_bucket{le=\"1.0\"} 1\n\
             h_bucket{le=\"+Inf\"} 2\n"
        );
    }

    #[test]
    fn counters_and_gauges_without_labels() {
        let (c, g) = (Counter::default(), Gauge::default());
        c.inc();
        g.dec();
        assert_eq!(text(&c, "c_total", ""), "c_total 1\n");
        assert_eq!(text(&g, "g", "a=\"b\""), "g{a=\"b\"} -1\n");
    }
}
