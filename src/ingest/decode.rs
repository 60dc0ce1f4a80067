//! Request bytes (+ media type, + content encoding) → OTLP request messages.

use std::io::Read;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde::de::DeserializeOwned;

use crate::model::IdField;

/// Body formats of OTLP/HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaType {
    /// `application/x-protobuf` (also `application/protobuf`).
    Protobuf,
    /// `application/json` (OTLP/JSON).
    Json,
}

impl MediaType {
    /// Parses a `Content-Type` header; parameters (`; charset=utf-8`) are ignored.
    pub fn from_header(value: Option<&str>) -> Option<MediaType> {
        let essence = value?.split(';').next()?.trim();
        if essence.eq_ignore_ascii_case("application/x-protobuf")
            || essence.eq_ignore_ascii_case("application/protobuf")
        {
            Some(MediaType::Protobuf)
        } else if essence.eq_ignore_ascii_case("application/json") {
            Some(MediaType::Json)
        } else {
            None
        }
    }

    /// The `Content-Type` of an answer in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            MediaType::Protobuf => "application/x-protobuf",
            MediaType::Json => "application/json",
        }
    }
}

/// `Content-Encoding`s of OTLP/HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentEncoding {
    /// Not compressed.
    Identity,
    /// gzip (also `x-gzip`).
    Gzip,
    /// deflate: zlib-wrapped or raw.
    Deflate,
    /// Zstandard.
    Zstd,
}

impl ContentEncoding {
    /// Parses a `Content-Encoding` header; none (or empty) is identity, an unknown one `None`.
    pub fn from_header(value: Option<&str>) -> Option<ContentEncoding> {
        match value.map(str::trim) {
            None | Some("") => Some(ContentEncoding::Identity),
            Some(v) if v.eq_ignore_ascii_case("identity") => Some(ContentEncoding::Identity),
            Some(v) if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") => {
                Some(ContentEncoding::Gzip)
            }
            Some(v) if v.eq_ignore_ascii_case("deflate") => Some(ContentEncoding::Deflate),
            Some(v) if v.eq_ignore_ascii_case("zstd") => Some(ContentEncoding::Zstd),
            Some(_) => None,
        }
    }
}

/// Why a body could not be turned into a request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Larger than the limit after decompression.
    #[error("body over {limit} bytes once decompressed")]
    TooLarge {
        /// The limit, bytes.
        limit: usize,
    },
    /// Not valid for its encoding or media type.
    #[error(transparent)]
    Invalid(#[from] InvalidBody),
    /// The buffered-bytes budget ran out while decompressing.
    #[error("the buffered-bytes budget ran out while decompressing")]
    Busy,
}

/// What is wrong with a body, and where: the text the client reads.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBody {
    /// The zstd decoder could not start on the body.
    #[error("zstd body: {0}")]
    Zstd(String),
    /// gzip, deflate or zstd data that does not decompress.
    #[error("compressed body: {0}")]
    Compressed(String),
    /// Protobuf that does not decode as the request message.
    #[error("protobuf body: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// JSON that does not decode as the request message.
    #[error("JSON body: {0}")]
    Json(String),
    /// Keys written as in the .proto files: they would decode as an empty request.
    #[error("JSON body uses the snake_case key {0}: OTLP/JSON keys are lowerCamelCase")]
    SnakeCaseJson(&'static str),
    /// A trace or span id of the wrong length (set ids must have their full length).
    #[error("{} must be {} bytes, got {got}", .field.name(), .field.bytes())]
    IdLength {
        /// Which id.
        field: IdField,
        /// Its length, bytes.
        got: usize,
    },
}

/// Decompresses `body`, refusing to produce more than `limit` bytes (a gzip bomb stops
/// at the limit, it never allocates its full size).
pub fn decompress(
    body: Bytes,
    encoding: ContentEncoding,
    limit: usize,
) -> Result<Bytes, DecodeError> {
    decompress_within(body, encoding, limit, &mut |_| true)
}

/// [`decompress`], asking `reserve` for every byte of output buffer before it is used
/// (the buffered-bytes budget); `false` stops it with [`DecodeError::Busy`].
pub fn decompress_within(
    body: Bytes,
    encoding: ContentEncoding,
    limit: usize,
    reserve: &mut dyn FnMut(usize) -> bool,
) -> Result<Bytes, DecodeError> {
    let reader: Box<dyn Read + '_> = match encoding {
        ContentEncoding::Identity => {
            return if body.len() > limit {
                Err(DecodeError::TooLarge { limit })
            } else {
                Ok(body)
            }
        }
        ContentEncoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        ContentEncoding::Deflate => {
            // "deflate" is zlib-wrapped per RFC 9110, but some clients send raw deflate.
            if looks_like_zlib(&body) {
                Box::new(flate2::read::ZlibDecoder::new(&body[..]))
            } else {
                Box::new(flate2::read::DeflateDecoder::new(&body[..]))
            }
        }
        ContentEncoding::Zstd => Box::new(
            zstd::stream::read::Decoder::new(&body[..])
                .map_err(|e| InvalidBody::Zstd(e.to_string()))?,
        ),
    };
    // One byte past the limit tells "too large" from "exactly the limit"; saturating, so
    // that no limit wraps to 0.
    let mut reader = reader.take((limit as u64).saturating_add(1));
    let mut out: Vec<u8> = Vec::new();
    let mut charged = 0usize;
    let first = body.len().saturating_mul(4).max(64 * 1024).min(limit);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(InvalidBody::Compressed(e.to_string()).into()),
        };
        if out.len() + n > limit {
            return Err(DecodeError::TooLarge { limit });
        }
        if out.len() + n > out.capacity() {
            let target = (out.capacity() * 2)
                .max(out.len() + n)
                .max(first)
                .min(limit);
            // Paid for before it is allocated.
            if !reserve(target.saturating_sub(charged)) {
                return Err(DecodeError::Busy);
            }
            charged = charged.max(target);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
    Ok(Bytes::from(out))
}

fn looks_like_zlib(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] & 0x0f == 8 && (u16::from(b[0]) << 8 | u16::from(b[1])) % 31 == 0
}

/// Message types that can arrive over OTLP/HTTP.
pub trait OtlpRequest: Message + Default + DeserializeOwned {
    /// The top-level JSON key, to spot snake_case bodies that would decode as empty.
    const SNAKE_CASE_KEY: &'static str;
    /// The request holds nothing (no resource spans or logs).
    fn is_empty(&self) -> bool;
    /// Checks what neither prost nor serde checks: trace and span id lengths.
    fn check_ids(&self) -> Result<(), InvalidBody>;
}

/// The first id of the wrong length, if any.
fn check_ids<'a>(ids: impl Iterator<Item = (IdField, &'a [u8])>) -> Result<(), InvalidBody> {
    for (field, id) in ids {
        if !field.fits(id) {
            return Err(InvalidBody::IdLength {
                field,
                got: id.len(),
            });
        }
    }
    Ok(())
}

impl OtlpRequest for ExportTraceServiceRequest {
    const SNAKE_CASE_KEY: &'static str = "\"resource_spans\"";
    fn is_empty(&self) -> bool {
        self.resource_spans.is_empty()
    }
    fn check_ids(&self) -> Result<(), InvalidBody> {
        let spans = self
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans);
        check_ids(spans.flat_map(|s| {
            [
                (IdField::TraceId, &s.trace_id[..]),
                (IdField::SpanId, &s.span_id[..]),
                (IdField::ParentSpanId, &s.parent_span_id[..]),
            ]
        }))
    }
}

impl OtlpRequest for ExportLogsServiceRequest {
    const SNAKE_CASE_KEY: &'static str = "\"resource_logs\"";
    fn is_empty(&self) -> bool {
        self.resource_logs.is_empty()
    }
    fn check_ids(&self) -> Result<(), InvalidBody> {
        let records = self
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .flat_map(|s| &s.log_records);
        check_ids(records.flat_map(|r| {
            [
                (IdField::TraceId, &r.trace_id[..]),
                (IdField::SpanId, &r.span_id[..]),
            ]
        }))
    }
}

/// Decodes a complete (decompressed) body.
pub fn decode<R: OtlpRequest>(body: &[u8], media: MediaType) -> Result<R, DecodeError> {
    let request = match media {
        MediaType::Protobuf => R::decode(body).map_err(InvalidBody::Protobuf)?,
        MediaType::Json => {
            let request: R =
                super::json::from_slice(body).map_err(|e| InvalidBody::Json(e.to_string()))?;
            if request.is_empty() && contains(body, R::SNAKE_CASE_KEY.as_bytes()) {
                return Err(InvalidBody::SnakeCaseJson(R::SNAKE_CASE_KEY).into());
            }
            request
        }
    };
    request.check_ids()?;
    Ok(request)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn media_types_ignore_parameters_and_case() {
        assert_eq!(
            MediaType::from_header(Some("application/json; charset=utf-8")),
            Some(MediaType::Json)
        );
        assert_eq!(
            MediaType::from_header(Some("Application/X-Protobuf")),
            Some(MediaType::Protobuf)
        );
        assert_eq!(MediaType::from_header(Some("text/plain")), None);
        assert_eq!(MediaType::from_header(None), None);
    }

    #[test]
    fn decompression_is_bounded() {
        let big = vec![0u8; 10 * 1024 * 1024];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&big).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert!(gz.len() < 100 * 1024);
        assert_eq!(
            decompress(gz.clone(), ContentEncoding::Gzip, 1024 * 1024),
            Err(DecodeError::TooLarge { limit: 1024 * 1024 })
        );
        assert_eq!(
            decompress(gz, ContentEncoding::Gzip, 10 * 1024 * 1024)
                .unwrap()
                .len(),
            big.len()
        );
    }

    #[test]
    fn the_largest_limit_does_not_wrap() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"hello").unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        // `limit + 1` once wrapped to 0 here: every compressed body came out empty.
        assert_eq!(
            &decompress(gz, ContentEncoding::Gzip, usize::MAX).unwrap()[..],
            b"hello"
        );
    }

    #[test]
    fn decompression_stops_when_the_budget_is_spent() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&vec![1u8; 1 << 20]).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        let mut left = 256 * 1024usize;
        let mut reserve = |n: usize| {
            let ok = n <= left;
            left = left.saturating_sub(n);
            ok
        };
        assert_eq!(
            decompress_within(gz.clone(), ContentEncoding::Gzip, 4 << 20, &mut reserve),
            Err(DecodeError::Busy)
        );
        let mut total = 0;
        let out = decompress_within(gz, ContentEncoding::Gzip, 4 << 20, &mut |n| {
            total += n;
            true
        })
        .unwrap();
        assert_eq!(out.len(), 1 << 20);
        assert!(total >= out.len() && total <= 4 << 20, "{total}");
    }

    #[test]
    fn deflate_accepts_zlib_and_raw() {
        let data = b"hello hello hello".to_vec();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&data).unwrap();
        let mut raw =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        raw.write_all(&data).unwrap();
        for body in [z.finish().unwrap(), raw.finish().unwrap()] {
            assert_eq!(
                &decompress(Bytes::from(body), ContentEncoding::Deflate, 1000).unwrap()[..],
                &data[..]
            );
        }
    }

    #[test]
    fn corrupt_bodies_are_invalid() {
        let junk = Bytes::from_static(b"\x1f\x8b not really gzip");
        assert!(matches!(
            decompress(junk, ContentEncoding::Gzip, 1000),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode::<ExportTraceServiceRequest>(b"\xff\xff\xff", MediaType::Protobuf),
            Err(DecodeError::Invalid(_))
        ));
    }

    #[test]
    fn json_ids_are_length_checked_and_snake_case_is_refused() {
        let bad = br#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"abcd","spanId":"1111111111111111"}]}]}]}"#;
        let err = decode::<ExportTraceServiceRequest>(bad, MediaType::Json).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Invalid(InvalidBody::IdLength { .. })
        ));
        assert!(err.to_string().contains("traceId"), "{err}");
        let snake = br#"{"resource_spans":[{"scope_spans":[]}]}"#;
        let err = decode::<ExportTraceServiceRequest>(snake, MediaType::Json).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Invalid(InvalidBody::SnakeCaseJson(_))
        ));
        assert!(err.to_string().contains("lowerCamelCase"), "{err}");
    }
}
