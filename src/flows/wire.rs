//! A minimal protobuf wire-format reader for selective decoding.
//!
//! flowmetrics needs a handful of fields out of a trace export: event names, a few
//! attributes, timestamps, ids, the span status. Decoding the whole message (every
//! attribute of every span into owned strings) costs more than all the rest of the
//! pipeline; walking the bytes and borrowing only what is needed does not.

/// One field's value as it sits on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    /// Wire type 0: an integer, enum or bool.
    Varint(u64),
    /// Wire type 1: eight little-endian bytes (`fixed64`, `double`, ...).
    Fixed64(u64),
    /// Wire type 5: four little-endian bytes (`fixed32`, `float`, ...).
    Fixed32(u32),
    /// Wire type 2: a string, bytes or a nested message, borrowed.
    Bytes(&'a [u8]),
    /// A group (deprecated, never written by OTLP): skipped whole, as prost skips it.
    Group,
}

impl Value<'_> {
    /// The wire type this value came as.
    pub fn wire_type(&self) -> u8 {
        match self {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) => 2,
            Value::Group => 3,
            Value::Fixed32(_) => 5,
        }
    }
}

/// Checks `value` against `expected(number)` (the schema of the message being read; `None`
/// for fields it does not have).
#[inline]
pub fn check_wire(
    number: u32,
    value: &Value<'_>,
    expected: fn(u32) -> Option<u8>,
) -> Result<(), WireError> {
    match expected(number) {
        Some(w) if w != value.wire_type() => Err(WireError::WrongWireType),
        _ => Ok(()),
    }
}

/// Why bytes are not a valid protobuf message (each one prost refuses too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A length or fixed-size value runs past the end of its message.
    #[error("field runs past the end of its message")]
    PastTheEnd,
    /// A known field sent with another wire type than its own.
    #[error("field with the wrong wire type")]
    WrongWireType,
    /// A field number above 2^29 - 1.
    #[error("field number out of range")]
    FieldNumberOutOfRange,
    /// A field numbered 0.
    #[error("field number 0")]
    FieldNumberZero,
    /// A wire type that does not exist (6 or 7).
    #[error("invalid wire type")]
    InvalidWireType,
    /// An end-group tag with no group open.
    #[error("end of a group that was not started")]
    UnstartedGroupEnd,
    /// A group still open at the end of its message.
    #[error("group without its end")]
    UnendedGroup,
    /// Groups nested deeper than the reader follows.
    #[error("groups nested too deeply")]
    GroupsTooDeep,
    /// A varint longer than 10 bytes, or over 64 bits.
    #[error("varint longer than 10 bytes or 64 bits")]
    VarintTooLong,
    /// The message ends inside a varint.
    #[error("truncated varint")]
    TruncatedVarint,
    /// A string field that is not valid UTF-8.
    #[error("string field is not valid UTF-8")]
    InvalidUtf8,
}

/// Iterates the fields of one message: `(field number, value)`.
///
/// Built for the hot path: one-byte tags and one-byte lengths/varints (nearly every
/// field OTLP writes) take a few instructions; everything else goes through an
/// out-of-line slow path. Length-delimited fields are never looked into, only sliced, so
/// skipping a field costs the same whatever it holds. After an error the iterator is
/// empty.
#[derive(Clone)]
pub struct Fields<'a> {
    /// What is left of the message.
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    /// Reads the fields of the message `buf`.
    #[inline]
    pub fn new(buf: &'a [u8]) -> Self {
        Self { rest: buf }
    }

    /// Bytes not read yet: `message.len() - remaining()` is the offset of the next field.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// The bytes not read yet.
    #[inline]
    pub fn rest(&self) -> &'a [u8] {
        self.rest
    }

    /// The next field, `Ok(None)` at the end of the message.
    #[inline(always)]
    pub fn next_field(&mut self) -> Result<Option<(u32, Value<'a>)>, WireError> {
        let [tag, ref tail @ ..] = *self.rest else {
            return Ok(None);
        };
        // The most common field of all first: length-delimited, key and length one byte
        // each (number 1–15, under 128 bytes).
        if tag & 0x87 == 2 && tag >= 8 {
            if let [len, ref tail @ ..] = *tail {
                if len < 0x80 {
                    if let Some((bytes, rest)) = tail.split_at_checked(len.into()) {
                        self.rest = rest;
                        return Ok(Some((u32::from(tag >> 3), Value::Bytes(bytes))));
                    }
                }
            }
        }
        // Keys of one byte (fields 1–15) or two (16–2047), number not 0.
        let key = match *self.rest {
            [k, ref tail @ ..] if (8..0x80).contains(&k) => Some((u32::from(k), tail)),
            // A first byte under 0x80 is a whole key (field 0 if under 8): not this arm.
            [k0, k1, ref tail @ ..] if k0 >= 0x80 && k1 < 0x80 && k1 > 0 => {
                Some((u32::from(k0 & 0x7f) | u32::from(k1) << 7, tail))
            }
            _ => None,
        };
        let fast = key.and_then(|(key, tail)| {
            let (value, rest) = match key & 7 {
                2 => match *tail {
                    [len, ref tail @ ..] if len < 0x80 => tail
                        .split_at_checked(len.into())
                        .map(|(b, rest)| (Value::Bytes(b), rest)),
                    [l0, l1, ref tail @ ..] if l1 < 0x80 => tail
                        .split_at_checked(usize::from(l0 & 0x7f) | usize::from(l1) << 7)
                        .map(|(b, rest)| (Value::Bytes(b), rest)),
                    _ => None,
                },
                0 => match *tail {
                    [b, ref rest @ ..] if b < 0x80 => Some((Value::Varint(b.into()), rest)),
                    _ => None,
                },
                1 => tail
                    .split_first_chunk::<8>()
                    .map(|(b, rest)| (Value::Fixed64(u64::from_le_bytes(*b)), rest)),
                5 => tail
                    .split_first_chunk::<4>()
                    .map(|(b, rest)| (Value::Fixed32(u32::from_le_bytes(*b)), rest)),
                _ => None,
            }?;
            Some((key >> 3, value, rest))
        });
        // Everything else (longer keys, lengths, varints) and every error: the slow path,
        // which takes the slice by value so that `self` can live in registers.
        let (number, value, rest) = match fast {
            Some(field) => field,
            None => match read_field(self.rest) {
                Ok(field) => field,
                Err(e) => {
                    self.rest = &[];
                    return Err(e);
                }
            },
        };
        self.rest = rest;
        Ok(Some((number, value)))
    }
}

/// One field at the start of `buf` (which is not empty): number, value, what follows.
#[inline(never)]
fn read_field(buf: &[u8]) -> Result<(u32, Value<'_>, &[u8]), WireError> {
    let (key, rest) = varint(buf)?;
    // Like prost: a key must fit in 32 bits, and field number 0 does not exist.
    let key = u32::try_from(key).map_err(|_| WireError::FieldNumberOutOfRange)?;
    let number = key >> 3;
    if number == 0 {
        return Err(WireError::FieldNumberZero);
    }
    let (value, rest) = match key & 7 {
        0 => {
            let (v, rest) = varint(rest)?;
            (Value::Varint(v), rest)
        }
        2 => {
            let (len, rest) = varint(rest)?;
            let len = usize::try_from(len).map_err(|_| WireError::PastTheEnd)?;
            let (bytes, rest) = rest.split_at_checked(len).ok_or(WireError::PastTheEnd)?;
            (Value::Bytes(bytes), rest)
        }
        1 => {
            let (b, rest) = rest.split_first_chunk::<8>().ok_or(WireError::PastTheEnd)?;
            (Value::Fixed64(u64::from_le_bytes(*b)), rest)
        }
        5 => {
            let (b, rest) = rest.split_first_chunk::<4>().ok_or(WireError::PastTheEnd)?;
            (Value::Fixed32(u32::from_le_bytes(*b)), rest)
        }
        3 => (Value::Group, skip_group(number, rest, 0)?),
        4 => return Err(WireError::UnstartedGroupEnd),
        _ => return Err(WireError::InvalidWireType),
    };
    Ok((number, value, rest))
}

/// Nesting of groups within groups beyond which a message is refused (prost's
/// recursion limit).
const MAX_GROUP_DEPTH: u32 = 100;

/// What follows the group `number` whose start key was just read: its fields are
/// skipped up to the matching end key.
#[inline(never)]
fn skip_group(number: u32, mut buf: &[u8], depth: u32) -> Result<&[u8], WireError> {
    if depth >= MAX_GROUP_DEPTH {
        return Err(WireError::GroupsTooDeep);
    }
    loop {
        if buf.is_empty() {
            return Err(WireError::UnendedGroup);
        }
        let (key, rest) = varint(buf)?;
        let key = u32::try_from(key).map_err(|_| WireError::FieldNumberOutOfRange)?;
        let inner = key >> 3;
        if inner == 0 {
            return Err(WireError::FieldNumberZero);
        }
        buf = match key & 7 {
            4 if inner == number => return Ok(rest),
            4 => return Err(WireError::UnstartedGroupEnd),
            3 => skip_group(inner, rest, depth + 1)?,
            _ => read_field(buf)?.2,
        };
    }
}

/// A varint, and what follows it.
#[inline(always)]
fn varint(buf: &[u8]) -> Result<(u64, &[u8]), WireError> {
    match *buf {
        [b, ref rest @ ..] if b < 0x80 => Ok((b.into(), rest)),
        [b0, b1, ref rest @ ..] if b1 < 0x80 => {
            Ok((u64::from(b0 & 0x7f) | u64::from(b1) << 7, rest))
        }
        _ => long_varint(buf),
    }
}

/// A varint of 1 to 10 bytes. The tenth byte may only carry the top bit of a `u64`
/// (prost refuses more too).
#[inline(never)]
fn long_varint(buf: &[u8]) -> Result<(u64, &[u8]), WireError> {
    let mut value = 0u64;
    for (i, &byte) in buf.iter().take(10).enumerate() {
        if i == 9 && byte > 1 {
            return Err(WireError::VarintTooLong);
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Ok((value, &buf[i + 1..]));
        }
    }
    Err(WireError::TruncatedVarint)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), WireError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        self.next_field().transpose()
    }
}

/// A length-delimited field as UTF-8 text.
///
/// Names, ids and outcomes are short ASCII: the word-at-a-time ASCII check costs a
/// quarter of the full validator's byte loop on them (which handles unaligned short
/// strings byte by byte); anything else takes the full validator.
#[inline]
pub fn utf8(bytes: &[u8]) -> Result<&str, WireError> {
    if bytes.is_ascii() {
        // SAFETY: every ASCII byte sequence is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn text_is_checked_as_the_standard_validator_checks_it() {
        let cases: [&[u8]; 12] = [
            b"",
            b"ORD#0000000000000042",
            b"flow.checkout.start",
            "caf\u{e9}-\u{1f600}".as_bytes(),
            "\u{7f}\u{80}\u{7ff}\u{800}\u{ffff}\u{10000}".as_bytes(),
            b"\x80",
            b"ok\xff",
            b"\xc0\xaf",                 // overlong '/'
            b"\xed\xa0\x80",             // a surrogate
            b"0123456789abcdef\xe2\x82", // cut short after a word of ASCII
            b"\xf4\x90\x80\x80",         // past U+10FFFF
            b"abcdefgh\x7f",
        ];
        for bytes in cases {
            assert_eq!(
                utf8(bytes).ok(),
                std::str::from_utf8(bytes).ok(),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn reads_what_prost_writes() {
        use opentelemetry_proto::tonic::trace::v1::span::Event;
        let e = Event {
            time_unix_nano: 42,
            name: "flow.x.start".into(),
            dropped_attributes_count: 7,
            ..Default::default()
        };
        let bytes = e.encode_to_vec();
        let fields: Vec<_> = Fields::new(&bytes).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            fields,
            vec![
                (1, Value::Fixed64(42)),
                (2, Value::Bytes(b"flow.x.start")),
                (4, Value::Varint(7))
            ]
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            &b"\x0a\x05ab"[..],
            b"\x80",
            b"\x0f",
            b"\x00",
            b"\x09\x01",
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
        ] {
            let r: Result<Vec<_>, _> = Fields::new(bad).collect();
            assert!(r.is_err(), "{bad:?}");
        }
    }

    /// A varint the slow way, as a reference.
    fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(number: u32, wire: u32, out: &mut Vec<u8>) {
        encode_varint(u64::from(number << 3 | wire), out);
    }

    #[test]
    fn keys_lengths_and_varints_of_every_size() {
        let long = vec![7u8; 20_000];
        let mut msg = Vec::new();
        let mut want = Vec::new();
        for number in [1, 15, 16, 2047, 2048, 262_143, 262_144, (1 << 29) - 1] {
            for len in [0usize, 1, 127, 128, 16_383, 16_384] {
                key(number, 2, &mut msg);
                encode_varint(len as u64, &mut msg);
                msg.extend_from_slice(&long[..len]);
                want.push((number, Value::Bytes(&long[..len])));
            }
            for v in [
                0,
                1,
                127,
                128,
                16_383,
                16_384,
                u64::from(u32::MAX),
                u64::MAX,
            ] {
                key(number, 0, &mut msg);
                encode_varint(v, &mut msg);
                want.push((number, Value::Varint(v)));
            }
            key(number, 1, &mut msg);
            msg.extend_from_slice(&u64::MAX.to_le_bytes());
            want.push((number, Value::Fixed64(u64::MAX)));
            key(number, 5, &mut msg);
            msg.extend_from_slice(&7u32.to_le_bytes());
            want.push((number, Value::Fixed32(7)));
        }
        let got: Vec<_> = Fields::new(&msg).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, want);
        // Non-minimal encodings are still valid varints.
        let got: Vec<_> = Fields::new(b"\x8a\x00\x81\x00x\x88\x80\x00\x05")
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got, vec![(1, Value::Bytes(b"x")), (1, Value::Varint(5))]);
    }

    #[test]
    fn what_prost_refuses_is_refused() {
        let mut too_long = vec![0x08];
        too_long.extend_from_slice(&[0xff; 9]);
        too_long.push(0x02); // bit 64 and up
        let mut key_too_big = Vec::new();
        encode_varint(u64::from(u32::MAX) + 1, &mut key_too_big);
        key_too_big.push(0);
        for bad in [
            &too_long[..],
            &key_too_big,
            b"\x80\x00\x00",     // field number 0 in a two-byte key
            b"\x02\x01\x00",     // field number 0 (one-byte key), then more bytes
            b"\x0b",             // start group, no end
            b"\x0c",             // end group
            b"\x0b\x14",         // group 1 ended as group 2
            b"\x0e",             // wire type 6
            b"\x0a\x80",         // truncated length
            b"\x0a\x80\x01x",    // length 128, one byte present
            b"\x0d\x01\x02\x03", // fixed32 cut short
            b"\x08",             // varint missing
        ] {
            let r: Result<Vec<_>, _> = Fields::new(bad).collect();
            assert!(r.is_err(), "{bad:?}");
            assert_eq!(
                r.is_err(),
                opentelemetry_proto::tonic::trace::v1::Span::decode(bad).is_err(),
                "prost disagrees on {bad:?}"
            );
        }
    }

    #[test]
    fn groups_are_skipped_as_prost_skips_them() {
        use opentelemetry_proto::tonic::trace::v1::Span;
        // Field 20 as a group holding a varint and a nested group, then field 5 (name).
        let msg = b"\xa3\x01\x08\x01\x1b\x1c\xa4\x01\x2a\x01x";
        let got: Vec<_> = Fields::new(msg).collect::<Result<_, _>>().unwrap();
        assert_eq!(got, vec![(20, Value::Group), (5, Value::Bytes(b"x"))]);
        assert_eq!(Span::decode(&msg[..]).unwrap().name, "x");
        let mut deep = Vec::new();
        for _ in 0..150 {
            deep.push(0xa3);
            deep.push(0x01);
        }
        for _ in 0..150 {
            deep.push(0xa4);
            deep.push(0x01);
        }
        assert!(Fields::new(&deep).collect::<Result<Vec<_>, _>>().is_err());
        assert!(Span::decode(&deep[..]).is_err());
    }

    /// Item 9 (b): `02 01 00` is field 0 to prost; the two-byte-key arm once read it as
    /// field 16 and a body ending so was answered 200.
    #[test]
    fn a_one_byte_key_of_field_0_is_not_a_two_byte_key() {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        let body = b"\x02\x01\x00";
        assert!(ExportTraceServiceRequest::decode(&body[..]).is_err());
        assert!(Fields::new(body).collect::<Result<Vec<_>, _>>().is_err());
    }

    #[test]
    fn an_error_ends_the_iteration() {
        let mut fields = Fields::new(b"\x08\x01\x0a\x05ab\x08\x02");
        assert_eq!(fields.next_field(), Ok(Some((1, Value::Varint(1)))));
        assert!(fields.next_field().is_err());
        assert_eq!(fields.next_field(), Ok(None));
    }
}
