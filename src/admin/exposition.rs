//! `/metrics` content negotiation and compression (docs/behaviour.md §4): the format
//! from `Accept` as Prometheus' client_golang negotiates it (the acceptable media
//! ranges by q-value, the first one served wins; OpenMetrics when none is), gzip when
//! `Accept-Encoding` allows it.

use std::io::Write as _;

use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use hyper::header::{HeaderMap, HeaderValue, ACCEPT, ACCEPT_ENCODING, CONTENT_ENCODING, VARY};
use hyper::StatusCode;

use super::AdminResponse;
use crate::metrics::{ExpositionFormat, Metrics};

/// The `proto` parameter of the Prometheus protobuf media type.
const METRIC_FAMILY: &str = "io.prometheus.client.MetricFamily";

/// gzip level 1: a /metrics body is mostly repeated label text, which the fastest level
/// already shrinks about tenfold, at a fraction of the default level's time.
const GZIP_LEVEL: u32 = 1;

/// The format `headers` ask for, and whether the body may be gzip-compressed.
pub fn negotiate(headers: &HeaderMap) -> (ExpositionFormat, bool) {
    (requested_format(headers), accepts_gzip(headers))
}

/// The acceptable ranges in preference order; the first that names a format served.
fn requested_format(headers: &HeaderMap) -> ExpositionFormat {
    let mut ranges: Vec<(usize, MediaRange<'_>)> = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(MediaRange::parse)
        .filter(|r| r.q > 0.0)
        .enumerate()
        .collect();
    ranges.sort_by(|(ia, a), (ib, b)| {
        b.q.total_cmp(&a.q)
            .then(b.specificity().cmp(&a.specificity()))
            .then(ia.cmp(ib))
    });
    ranges
        .iter()
        .find_map(|(_, r)| r.format())
        .unwrap_or(ExpositionFormat::OpenMetrics)
}

/// One element of an `Accept` header: `type/subtype;param=value;q=0.5`.
#[derive(Debug)]
struct MediaRange<'a> {
    kind: &'a str,
    subtype: &'a str,
    params: Vec<(&'a str, &'a str)>,
    q: f64,
}

impl<'a> MediaRange<'a> {
    fn parse(raw: &'a str) -> Option<Self> {
        let mut parts = raw.split(';');
        let (kind, subtype) = parts.next()?.trim().split_once('/')?;
        let mut range = MediaRange {
            kind: kind.trim(),
            subtype: subtype.trim(),
            params: Vec::new(),
            q: 1.0,
        };
        for param in parts {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim().trim_matches('"'));
            if name.eq_ignore_ascii_case("q") {
                // An unreadable q-value makes the range unacceptable (as goautoneg).
                range.q = value
                    .parse()
                    .ok()
                    .filter(|q: &f64| q.is_finite())
                    .unwrap_or(0.0);
            } else {
                range.params.push((name, value));
            }
        }
        Some(range)
    }

    fn param(&self, name: &str) -> Option<&'a str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// `*/*` < `text/*` < `text/plain`.
    fn specificity(&self) -> u8 {
        u8::from(self.kind != "*") + u8::from(self.subtype != "*")
    }

    /// The format this range asks for, if it is one served here.
    fn format(&self) -> Option<ExpositionFormat> {
        let version = self.param("version");
        let is = |kind: &str, subtype: &str| {
            self.kind.eq_ignore_ascii_case(kind) && self.subtype.eq_ignore_ascii_case(subtype)
        };
        if is("application", "vnd.google.protobuf") {
            let family = self.param("proto") == Some(METRIC_FAMILY);
            let delimited = self.param("encoding") == Some("delimited");
            return (family && delimited).then_some(ExpositionFormat::Protobuf);
        }
        if is("application", "openmetrics-text") {
            return matches!(version, None | Some("1.0.0" | "0.0.1"))
                .then_some(ExpositionFormat::OpenMetrics);
        }
        // 1.0.0 is 0.0.4 with UTF-8 names, which flowmetrics' names never need.
        if is("text", "plain") {
            return matches!(version, None | Some("0.0.4" | "1.0.0"))
                .then_some(ExpositionFormat::Text004);
        }
        if is("text", "*") {
            return Some(ExpositionFormat::Text004);
        }
        if is("*", "*") || is("application", "*") {
            return Some(ExpositionFormat::OpenMetrics);
        }
        None
    }
}

/// `Accept-Encoding` allows gzip: listed with a q-value above 0, or `*` is and gzip is
/// not refused by name.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    let mut named = None;
    let mut any = None;
    for coding in headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = coding.split(';');
        let name = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
            named = Some(q > 0.0);
        } else if name == "*" {
            any = Some(q > 0.0);
        }
    }
    named.or(any).unwrap_or(false)
}

/// gzip-compresses a body.
pub fn gzip(body: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(
        Vec::with_capacity(body.len() / 8 + 64),
        Compression::new(GZIP_LEVEL),
    );
    encoder
        .write_all(body)
        .and_then(|()| encoder.finish())
        .expect("writing to a Vec cannot fail")
}

/// The `/metrics` answer to a request with these headers.
/// The body of one `/metrics` answer: the exposition in `format`, gzip'd when asked.
/// Empty when it could not be written (logged).
pub fn make_body(
    metrics: &Metrics,
    store_entries: u64,
    format: ExpositionFormat,
    gzip_it: bool,
) -> Vec<u8> {
    match metrics.encode_format(format, store_entries) {
        Ok(body) if gzip_it => gzip(&body),
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, ?format, "/metrics could not be written");
            Vec::new()
        }
    }
}

/// The answer carrying a body made by [`make_body`].
pub fn answer(format: ExpositionFormat, gzipped: bool, body: Bytes) -> AdminResponse {
    let mut response = super::respond(StatusCode::OK, format.content_type(), body);
    let headers = response.headers_mut();
    headers.insert(VARY, HeaderValue::from_static("Accept, Accept-Encoding"));
    if gzipped {
        headers.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(accept: &str, encoding: &str) -> (ExpositionFormat, bool) {
        let mut headers = HeaderMap::new();
        if !accept.is_empty() {
            headers.insert(ACCEPT, HeaderValue::from_str(accept).unwrap());
        }
        if !encoding.is_empty() {
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(encoding).unwrap());
        }
        negotiate(&headers)
    }

    use ExpositionFormat::{OpenMetrics, Protobuf, Text004};

    const PROTO: &str =
        "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited";

    #[test]
    fn formats_by_accept_header() {
        for (accept, want) in [
            ("", OpenMetrics),
            ("*/*", OpenMetrics),
            ("application/openmetrics-text", OpenMetrics),
            ("application/openmetrics-text; version=1.0.0", OpenMetrics),
            ("text/plain; version=0.0.4", Text004),
            ("text/plain", Text004),
            ("text/*", Text004),
            (PROTO, Protobuf),
            // Prometheus 2.x, default scrape protocols.
            (
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                 version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                OpenMetrics,
            ),
            // Prometheus 3 with PrometheusProto first (native histograms).
            (
                "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;\
                 encoding=delimited;q=0.5,application/openmetrics-text;version=1.0.0;\
                 escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
                Protobuf,
            ),
            // q-values, not order, decide; ties go to the more specific range.
            ("application/openmetrics-text;q=0.3,text/plain;version=0.0.4;q=0.9", Text004),
            ("*/*;q=0.5,text/plain;version=0.0.4;q=0.5", Text004),
            // Refused or unknown ranges are passed over.
            ("application/openmetrics-text;q=0,text/plain;version=0.0.4", Text004),
            ("text/plain;version=0.0.4;q=0", OpenMetrics),
            ("text/plain;version=9.9", OpenMetrics),
            ("text/html, application/json", OpenMetrics),
            ("application/vnd.google.protobuf;proto=other;encoding=delimited", OpenMetrics),
            ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text", OpenMetrics),
            ("text/plain;version=0.0.4;q=nonsense, application/openmetrics-text;q=0.1", OpenMetrics),
            ("garbage", OpenMetrics),
        ] {
            assert_eq!(with(accept, "").0, want, "Accept: {accept}");
        }
    }

    #[test]
    fn gzip_by_accept_encoding() {
        for (encoding, want) in [
            ("", false),
            ("gzip", true),
            ("GZIP", true),
            ("deflate, gzip;q=0.5", true),
            ("gzip;q=0", false),
            ("identity", false),
            ("*", true),
            ("*, gzip;q=0", false),
            ("br, zstd", false),
        ] {
            assert_eq!(with("", encoding).1, want, "Accept-Encoding: {encoding}");
        }
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read as _;
        let body = b"flowmetrics_build_info{version=\"1\"} 1\n".repeat(100);
        let packed = gzip(&body);
        assert!(packed.len() < body.len() / 5);
        let mut unpacked = Vec::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_end(&mut unpacked)
            .unwrap();
        assert_eq!(unpacked, body);
    }
}
