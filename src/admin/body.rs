//! The response body of the metrics listener: a shared buffer handed to hyper in slices.
//!
//! A body is one [`Bytes`] shared by every response that carries it (no copy per
//! scrape). It goes out in [`CHUNK`]-sized slices, so hyper asks for the next one only
//! as the connection drains: the body stays alive (and with it the write deadline, see
//! `server::DeadlineBody`) until hyper holds no more than its own small write queue. The
//! last [`TAIL`] bytes are copies: once hyper has the last frame, a slow reader keeps
//! that much alive, not the whole shared buffer.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Bytes per frame.
const CHUNK: usize = 64 * 1024;
/// The end of a body sent as copies. hyper's HTTP/1 write queue holds at most 16
/// buffers (h2: at most the stream's window), so 16 chunks cover it.
const TAIL: usize = 16 * CHUNK;

/// A response body over shared bytes: sent in chunks that borrow them, the tail as copies.
pub struct SharedBody {
    rest: Bytes,
}

impl SharedBody {
    /// A body that sends `bytes`.
    pub fn new(bytes: Bytes) -> Self {
        Self { rest: bytes }
    }
}

impl Body for SharedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let rest = &mut self.rest;
        if rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = rest.len().min(CHUNK);
        let chunk = if rest.len() <= TAIL {
            Bytes::copy_from_slice(&rest[..n])
        } else {
            rest.slice(..n)
        };
        *rest = rest.slice(n..);
        if rest.is_empty() {
            // Let the shared buffer go now, not when hyper drops the body.
            *rest = Bytes::new();
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn slices_then_copies_and_keeps_the_bytes() {
        let data: Vec<u8> = (0..(TAIL + 3 * CHUNK + 5)).map(|i| i as u8).collect();
        let shared = Bytes::from(data.clone());
        let mut body = SharedBody::new(shared.clone());
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= CHUNK);
            got.extend_from_slice(&chunk);
            frames += 1;
        }
        assert_eq!(got, data);
        assert_eq!(frames, 16 + 4);
        assert!(body.is_end_stream());
    }
}
