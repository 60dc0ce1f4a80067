//! The formats `/metrics` is written in (docs/behaviour.md §4), every one by
//! prometheus-client's encoders from the one registry: OpenMetrics text, the Prometheus
//! text format 0.0.4 (the OpenMetrics text less what 0.0.4 cannot carry, see
//! [`super::text004`]), and the Prometheus protobuf format (length-delimited
//! `io.prometheus.client.MetricFamily` messages), the only one with native histograms.

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use prometheus_client::encoding::{prometheus_protobuf, text};

use super::{text004, Metrics};

/// One exposition format; with a gzip flag, what a `/metrics` body is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpositionFormat {
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text004,
    /// Prometheus protobuf (delimited `MetricFamily` messages); the only one with native histograms.
    Protobuf,
}

impl ExpositionFormat {
    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            ExpositionFormat::OpenMetrics => {
                "application/openmetrics-text; version=1.0.0; charset=utf-8"
            }
            ExpositionFormat::Text004 => "text/plain; version=0.0.4; charset=utf-8",
            ExpositionFormat::Protobuf => {
                "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; \
                 encoding=delimited"
            }
        }
    }
}

/// An exposition that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExpositionError {
    /// The text encoder failed.
    #[error("the text encoder failed")]
    Text(#[from] std::fmt::Error),
    /// The protobuf encoder failed.
    #[error("the protobuf encoder failed: {0}")]
    Protobuf(#[from] prometheus_protobuf::EncodeError),
}

thread_local! {
    /// The format being written on this thread: metrics whose representation differs by
    /// format (the duration histogram) read it while the encoder calls them.
    static WRITING: Cell<ExpositionFormat> = const { Cell::new(ExpositionFormat::OpenMetrics) };
}

/// The format the encoder running on this thread writes.
pub(super) fn current() -> ExpositionFormat {
    WRITING.with(Cell::get)
}

/// Sets [`current`] for the length of one encode, and back after it (also on unwind).
struct Writing(ExpositionFormat);

impl Writing {
    fn start(format: ExpositionFormat) -> Self {
        Writing(WRITING.with(|w| w.replace(format)))
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        WRITING.with(|w| w.set(self.0));
    }
}

impl Metrics {
    /// Every family in `format`. `store_entries`: the correlation store's entries now.
    pub fn encode_format(
        &self,
        format: ExpositionFormat,
        store_entries: u64,
    ) -> Result<Vec<u8>, ExpositionError> {
        match format {
            ExpositionFormat::OpenMetrics => Ok(self.encode_text(store_entries)?.into_bytes()),
            // Converted after the registry is released: a pass over the text.
            ExpositionFormat::Text004 => {
                Ok(text004::from_openmetrics(&self.encode_text(store_entries)?).into_bytes())
            }
            ExpositionFormat::Protobuf => {
                self.set_store_entries(store_entries);
                let _writing = Writing::start(ExpositionFormat::Protobuf);
                let _one = self.encoding.lock().unwrap_or_else(PoisonError::into_inner);
                self.pin_for_encode();
                let body = prometheus_protobuf::encode_to_vec(&self.registry);
                self.pin_invariant_families(false);
                Ok(body?)
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub(super) fn encode_text(&self, store_entries: u64) -> Result<String, std::fmt::Error> {
        self.set_store_entries(store_entries);
        // Sized from the last body (plus room to grow), so the multi-MiB body is not
        // copied through a dozen reallocations.
        let last = self.last_encoded_len.load(Ordering::Relaxed);
        let mut out = String::with_capacity((last + last / 8).max(16 * 1024));
        let _writing = Writing::start(ExpositionFormat::OpenMetrics);
        let _one = self.encoding.lock().unwrap_or_else(PoisonError::into_inner);
        self.pin_for_encode();
        let written = text::encode(&mut out, &self.registry);
        // A family the encoder skipped (no series) left its copy: drop it.
        self.pin_invariant_families(false);
        written?;
        self.last_encoded_len.store(out.len(), Ordering::Relaxed);
        Ok(out)
    }

    /// Reports are held only while the families of the invariant (docs/behaviour.md §3)
    /// are pinned, a walk that copies each series' value; the encode then writes those
    /// copies while reports go on, so every exposition is one consistent cut and ingest
    /// never waits for the encode.
    fn pin_for_encode(&self) {
        let quiet = self.gate.close();
        self.pin_invariant_families(true);
        drop(quiet);
    }

    fn set_store_entries(&self, store_entries: u64) {
        self.in_flight_entries
            .set(i64::try_from(store_entries).unwrap_or(i64::MAX));
    }
}
