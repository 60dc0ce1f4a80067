//! The exemplar of a flow recording: the end event's trace and span, kept as bytes (no
//! allocation per recording) and written as lowercase hex by prometheus-client's encoder.

use std::fmt::Write as _;

use prometheus_client::encoding::{
    EncodeLabel, EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};

use crate::flows::TraceRef;

/// `{trace_id="…",span_id="…"}`: 63 characters of names and values (OpenMetrics allows
/// 128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceExemplar(pub TraceRef);

impl EncodeLabelSet for TraceExemplar {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        ("trace_id", Hex(&self.0.trace_id)).encode(encoder.encode_label())?;
        ("span_id", Hex(&self.0.span_id)).encode(encoder.encode_label())
    }
}

/// Up to 16 bytes as lowercase hex.
struct Hex<'a>(&'a [u8]);

impl EncodeLabelValue for Hex<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (pair, b) in text.chunks_exact_mut(2).zip(self.0) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        let len = 2 * self.0.len().min(16);
        encoder.write_str(std::str::from_utf8(&text[..len]).map_err(|_| std::fmt::Error)?)
    }
}
