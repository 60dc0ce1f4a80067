//! The bytes the store and its scripts exchange: an instance's value (what [`encode`]
//! writes and [`decode`] reads back), a kept reply (netstrings), and the digest that
//! makes an instance's part of its keys.

use std::sync::Arc;

use crate::flows::event::{DimValues, EventKind, FlowEvent, Outcome, TraceRef};
use crate::flows::store::EndRecord;

/// A stable digest of the instance's identity: the same on every replica and version.
pub(super) fn digest(flow: &str, id: &str) -> u64 {
    // FNV-1a, 64 bits.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in flow.bytes().chain([0xff]).chain(id.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The digest in hex: the instance's part of its keys.
pub(super) fn hex(h: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = b"0123456789abcdef"[((h >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

/// `len:bytes` repeated, as the script keeps its reply.
pub(super) fn parse_netstrings(mut blob: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        let colon = blob.iter().position(|&b| b == b':')?;
        let len: usize = std::str::from_utf8(&blob[..colon]).ok()?.parse().ok()?;
        let rest = &blob[colon + 1..];
        out.push(rest.get(..len)?.to_vec());
        blob = &rest[len..];
    }
    Some(out)
}

/// What an instance's value holds, read back.
pub(super) struct Entry {
    pub(super) flow: Arc<str>,
    pub(super) timestamp_nanos: u64,
    pub(super) dims: DimValues,
    /// Opened by its start (else an end, or only steps, wait for it).
    pub(super) opened: bool,
    /// The waiting end; `None` for an open instance or waiting steps.
    pub(super) end: Option<EndRecord>,
}

/// `state`, the timestamp as 20 digits, then flow, the number of dims, the dims, and
/// for an end its outcome and trace; lengths as u32 little-endian.
pub(super) fn encode(state: u8, event: &FlowEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(state);
    out.extend_from_slice(format!("{:020}", event.timestamp_nanos).as_bytes());
    put_str(&mut out, &event.flow);
    let count = u32::try_from(event.dims.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&count.to_le_bytes());
    for dim in event.dims.iter().take(count as usize) {
        put_str(&mut out, dim);
    }
    if let EventKind::End(outcome) = event.kind {
        out.push(OUTCOME_LETTERS[usize::from(outcome.code())]);
        if let Some(trace) = event.trace {
            out.extend_from_slice(&trace.trace_id);
            out.extend_from_slice(&trace.span_id);
        }
    }
    out
}

/// An outcome in a stored value: its [`Outcome::code`] as a letter, so that values
/// written by earlier versions (and replicas of them sharing the Redis during a rolling
/// upgrade) still read.
const OUTCOME_LETTERS: &[u8; 3] = b"sfc";

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len as usize]);
}

/// Reads what [`encode`] wrote; `None` for anything else.
pub(super) fn decode(raw: &[u8]) -> Option<Entry> {
    let mut r = Reader(raw);
    let state = r.take(1)?[0];
    let timestamp_nanos: u64 = std::str::from_utf8(r.take(20)?).ok()?.parse().ok()?;
    let flow = r.string()?;
    let count = r.u32()? as usize;
    // Each dim takes at least its 4-byte length: a corrupt count cannot allocate much.
    let mut dims = Vec::with_capacity(count.min(r.0.len() / 4));
    for _ in 0..count {
        dims.push(r.string()?);
    }
    let dims: DimValues = dims.into();
    let end = match state {
        b'o' | b'p' => None,
        b'w' => {
            let letter = r.take(1)?[0];
            let code = OUTCOME_LETTERS.iter().position(|&l| l == letter)?;
            let outcome = Outcome::from_code(u8::try_from(code).ok()?)?;
            let trace = match r.0.len() {
                0 => None,
                24 => TraceRef::from_ids(&r.0[..16], &r.0[16..]),
                _ => return None,
            };
            Some(EndRecord {
                outcome,
                timestamp_nanos,
                dims: dims.clone(),
                trace,
            })
        }
        _ => return None,
    };
    Some(Entry {
        flow,
        timestamp_nanos,
        dims,
        opened: state == b'o',
        end,
    })
}

/// The flow and start timestamp of an open instance's value, read without decoding the
/// rest; `None` for any other value.
pub(super) fn open_start(raw: &[u8]) -> Option<(&str, u64)> {
    let mut r = Reader(raw);
    if r.take(1)? != b"o" {
        return None;
    }
    let timestamp_nanos = std::str::from_utf8(r.take(20)?).ok()?.parse().ok()?;
    let len = r.u32()? as usize;
    Some((std::str::from_utf8(r.take(len)?).ok()?, timestamp_nanos))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<Arc<str>> {
        let len = self.u32()? as usize;
        Some(Arc::from(String::from_utf8_lossy(self.take(len)?).as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::event::Source;

    fn event(kind: EventKind, trace: Option<TraceRef>) -> FlowEvent<'static> {
        FlowEvent {
            flow: Arc::from("checkout"),
            correlation_id: "o-1".into(),
            kind,
            timestamp_nanos: 1_700_000_000_123_456_789,
            dims: Arc::from([Arc::from("web"), Arc::from("")]),
            trace,
            source: Source::SpanEvent,
            step: None,
        }
    }

    #[test]
    fn values_read_back_as_written() {
        let open = decode(&encode(b'o', &event(EventKind::Start, None))).unwrap();
        assert_eq!(&*open.flow, "checkout");
        assert_eq!(open.timestamp_nanos, 1_700_000_000_123_456_789);
        assert_eq!(open.dims.len(), 2);
        assert!(open.end.is_none());
        let trace = TraceRef {
            trace_id: [7; 16],
            span_id: [9; 8],
        };
        let end = event(EventKind::End(Outcome::Failure), Some(trace));
        let waiting = decode(&encode(b'w', &end)).unwrap();
        let record = waiting.end.unwrap();
        assert_eq!(record.outcome, Outcome::Failure);
        assert_eq!(record.trace, Some(trace));
        assert_eq!(&*record.dims[0], "web");
        assert!(decode(b"x").is_none());
        assert!(decode(b"o0000000000000000000").is_none());
    }

    #[test]
    fn an_open_value_gives_its_flow_and_start_and_no_other_does() {
        let start = event(EventKind::Start, None);
        assert_eq!(
            open_start(&encode(b'o', &start)),
            Some(("checkout", 1_700_000_000_123_456_789))
        );
        let end = event(EventKind::End(Outcome::Success), None);
        assert_eq!(open_start(&encode(b'w', &end)), None);
        assert_eq!(open_start(&encode(b'p', &start)), None);
        assert_eq!(open_start(b"o0000000000000000000"), None);
        assert_eq!(open_start(b""), None);
    }

    #[test]
    fn the_tag_is_stable_and_tells_flows_apart() {
        assert_eq!(digest("a", "b"), digest("a", "b"));
        assert_ne!(digest("ab", ""), digest("a", "b"));
        assert!(hex(digest("a", "b")).iter().all(u8::is_ascii_hexdigit));
        // Keys written by earlier versions are found: the digest must never change.
        assert_eq!(&hex(digest("checkout", "o-1")), b"18e69ca00a2a0ffd");
    }
}
