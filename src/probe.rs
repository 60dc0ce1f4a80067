//! `flowmetrics probe [URL]`: one GET, exit status 0 on 200 and 1 otherwise. A
//! container healthcheck for an image without curl or wget (the runtime image is Debian
//! slim with only the binaries), as distroless images need; by default it asks the
//! service's own `/readyz`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, StatusCode, Uri};

/// What the probe asks when given no URL: the metrics listener's default address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9464/readyz";

/// The whole probe (connect, request, answer) ends within this.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Why a probe did not see a 200.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The URL is not `http` with a host (and a port, or 80).
    #[error("{0:?} is not a URL this probe can ask: use http://HOST:PORT/PATH")]
    BadUrl(String),
    /// The connection could not be made.
    #[error("{url}: {source}")]
    Io {
        /// The URL asked.
        url: String,
        /// What connecting said.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("{url}: {source}")]
    Http {
        /// The URL asked.
        url: String,
        /// What hyper said.
        source: hyper::Error,
    },
    /// No answer within the probe's time limit.
    #[error("{url}: no answer within {}s", TIMEOUT.as_secs())]
    Timeout {
        /// The URL asked.
        url: String,
    },
    /// An answer other than 200.
    #[error("{url}: answered {status}")]
    NotOk {
        /// The URL asked.
        url: String,
        /// The status it answered.
        status: StatusCode,
    },
}

/// The URL, checked: `http` with a host and a port (or port 80).
pub fn parse(url: &str) -> Result<Uri, ProbeError> {
    let bad = || ProbeError::BadUrl(url.to_string());
    let uri: Uri = url.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(bad());
    }
    Ok(uri)
}

/// Asks `uri` once; `Ok` on a 200.
pub async fn probe(uri: &Uri) -> Result<(), ProbeError> {
    let url = uri.to_string();
    match tokio::time::timeout(TIMEOUT, get(uri, &url)).await {
        Ok(Ok(StatusCode::OK)) => Ok(()),
        Ok(Ok(status)) => Err(ProbeError::NotOk { url, status }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ProbeError::Timeout { url }),
    }
}

async fn get(uri: &Uri, url: &str) -> Result<StatusCode, ProbeError> {
    let host = uri.host().unwrap_or("127.0.0.1");
    let port = uri.port_u16().unwrap_or(80);
    let io = |source| ProbeError::Io {
        url: url.to_string(),
        source,
    };
    let http = |source| ProbeError::Http {
        url: url.to_string(),
        source,
    };
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(io)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(http)?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(
            hyper::header::HOST,
            uri.authority().map_or(host, |a| a.as_str()),
        )
        .body(Empty::<Bytes>::new())
        .expect("a GET with a checked path is a valid request");
    let response = sender.send_request(request).await.map_err(http)?;
    Ok(response.status())
}
