//! A minimal protobuf wire-format reader for selective decoding.
//!
//! flowmetrics needs a handful of fields out of a trace export: event names, a few
//! attributes, timestamps, ids, the span status. Decoding the whole message (every
//! attribute of every span into owned strings) costs more than all the rest of the
//! pipeline; walking the bytes and borrowing only what is needed does not.

/// One field's value as it sits on the wire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Why bytes are not a valid protobuf message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub &'static str);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Iterates the fields of one message: `(field number, value)`.
#[derive(Clone)]
pub struct Fields<'a> {
    buf: &'a [u8],
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self
                .buf
                .split_first()
                .ok_or(WireError("truncated varint"))?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(WireError("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError("field runs past the end of its message"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Value<'a>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = (|| {
            let key = self.varint()?;
            let number =
                u32::try_from(key >> 3).map_err(|_| WireError("field number out of range"))?;
            if number == 0 {
                return Err(WireError("field number 0"));
            }
            let value = match key & 7 {
                0 => Value::Varint(self.varint()?),
                1 => Value::Fixed64(u64::from_le_bytes(
                    self.take(8)?.try_into().expect("8 bytes"),
                )),
                2 => {
                    let len = usize::try_from(self.varint()?)
                        .map_err(|_| WireError("length out of range"))?;
                    Value::Bytes(self.take(len)?)
                }
                5 => Value::Fixed32(u32::from_le_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                )),
                _ => {
                    return Err(WireError(
                        "unsupported wire type (groups are not used by OTLP)",
                    ))
                }
            };
            Ok((number, value))
        })();
        if field.is_err() {
            // Stop after the first error.
            self.buf = &[];
        }
        Some(field)
    }
}

/// A length-delimited field as UTF-8 text.
pub fn utf8(bytes: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError("string field is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

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
}
