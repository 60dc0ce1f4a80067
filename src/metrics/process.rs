//! The service's own families (docs/behaviour.md §4): its build, the label values it cut,
//! the log lines it dropped, and the standard `process_*` metrics, read from /proc at
//! scrape time (Linux; elsewhere the process family set is simply empty).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use super::label_cuts::LabelCutsFamily;
use crate::flows::label_value::LabelCuts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// `flowmetrics_build_info`, `flowmetrics_label_values_truncated_total`, and the
/// collectors read at scrape time.
pub(super) fn register(registry: &mut Registry, label_cuts: &Arc<LabelCuts>) {
    let build_info = Family::<VersionLabel, Gauge>::default();
    let version = env!("CARGO_PKG_VERSION");
    build_info.get_or_create(&VersionLabel { version }).set(1);
    registry.register(
        "flowmetrics_build_info",
        "Build identity of this flowmetrics (always 1)",
        build_info,
    );
    registry.register(
        "flowmetrics_label_values_truncated",
        "Label values from client data (dimensions, network dimensions) cut to \
         limits.max_label_value_bytes, by the label whose value was cut",
        LabelCutsFamily(label_cuts.clone()),
    );
    registry.register_collector(Box::new(ProcessCollector));
    registry.register_collector(Box::new(LogCollector));
}

/// A family's name (less its unit), help and unit.
type Descriptor = (&'static str, &'static str, Option<Unit>);

/// Writes one metric with its descriptor.
fn describe(
    encoder: &mut DescriptorEncoder,
    (name, help, unit): Descriptor,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, unit.as_ref(), metric.metric_type())?)
}

/// `process_cpu_seconds_total`.
const CPU: Descriptor = (
    "process_cpu",
    "Total user and system CPU time spent in seconds.",
    Some(Unit::Seconds),
);
/// `process_start_time_seconds`: a gauge in seconds (a float), unlike the others.
const START_TIME: Descriptor = (
    "process_start_time",
    "Start time of the process since unix epoch in seconds.",
    Some(Unit::Seconds),
);
/// Written by [`LogCollector`].
const LOG_LINES_DROPPED: Descriptor = (
    "flowmetrics_log_lines_dropped",
    "Log lines dropped rather than wait for stderr (its reader slow, stuck or gone)",
    None,
);

#[derive(Debug, Default)]
struct ProcessCollector;

struct Sample {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    start_time_seconds: f64,
    threads: i64,
    open_fds: i64,
    max_fds: i64,
}

/// A value the kernel reports through `sysconf` (page size, clock ticks per second):
/// 16 KiB and 64 KiB pages exist (arm64, ppc64), so it is asked, not assumed.
fn system_value(name: libc::c_int, fallback: f64) -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let v = unsafe { libc::sysconf(name) };
    if v > 0 {
        v as f64
    } else {
        fallback
    }
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start after ") ".
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // /proc/[pid]/stat numbering: field 3 is fields[0] here.
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    let ticks = system_value(libc::_SC_CLK_TCK, 100.0);
    let page = system_value(libc::_SC_PAGESIZE, 4096.0);
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as i64)
        .unwrap_or(0);
    Some(Sample {
        cpu_seconds: (field(14)? + field(15)?) / ticks,
        virtual_bytes: field(23)? as i64,
        resident_bytes: (field(24)? * page) as i64,
        start_time_seconds: boot_time + field(22)? / ticks,
        threads: field(20)? as i64,
        open_fds,
        max_fds,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = sample() else {
            return Ok(());
        };
        describe(&mut encoder, CPU, &ConstCounter::new(s.cpu_seconds))?;
        let gauges: [(&str, &str, Option<Unit>, i64); 5] = [
            (
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                s.resident_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(Unit::Bytes),
                s.virtual_bytes,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                s.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                None,
                s.threads,
            ),
        ];
        for (name, help, unit, value) in gauges {
            describe(&mut encoder, (name, help, unit), &ConstGauge::new(value))?;
        }
        describe(
            &mut encoder,
            START_TIME,
            &ConstGauge::new(s.start_time_seconds),
        )
    }
}

/// `flowmetrics_log_lines_dropped_total`: log lines the lossy log writer dropped (its
/// queue full behind a slow stderr reader, or stderr refusing them), read at scrape time.
#[derive(Debug, Default)]
struct LogCollector;

impl Collector for LogCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let dropped = ConstCounter::new(crate::logging::lines_dropped());
        describe(&mut encoder, LOG_LINES_DROPPED, &dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_whole_pages_of_the_systems_own_size() {
        let page = system_value(libc::_SC_PAGESIZE, 0.0);
        assert!(page >= 4096.0, "page size {page}");
        let s = sample().expect("/proc is readable");
        assert!(s.resident_bytes > 0);
        assert_eq!(s.resident_bytes % page as i64, 0);
        assert!(s.threads >= 1 && s.open_fds >= 1);
    }
}
