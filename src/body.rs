//! The one body type that flows through the proxy, small constructors for it, and wrappers
//! that tell when a body ended or failed.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Errors carried by bodies: whatever the peer's transport produced.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body, boxed so requests and responses from any source look alike.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Wraps a body read from a hyper connection.
pub fn incoming(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}

/// Wraps the client's request body so that its failure (the client went away mid-upload)
/// can be told apart from the upstream's: the flag is set when the body errors.
pub fn watch_client(body: hyper::body::Incoming) -> (Body, Arc<AtomicBool>) {
    let failed = Arc::new(AtomicBool::new(false));
    let watched = Flagged {
        inner: incoming(body),
        ended: None,
        failed: Some(failed.clone()),
    };
    (watched.boxed_unsync(), failed)
}

/// Wraps a body so that the flag is set once it has been read to its end.
pub fn watch_end(body: Body) -> (Body, Arc<AtomicBool>) {
    let ended = Arc::new(AtomicBool::new(false));
    let watched = Flagged {
        inner: body,
        ended: Some(ended.clone()),
        failed: None,
    };
    (watched.boxed_unsync(), ended)
}

/// A body that raises flags at its end or on its failure.
struct Flagged {
    inner: Body,
    ended: Option<Arc<AtomicBool>>,
    failed: Option<Arc<AtomicBool>>,
}

impl HttpBody for Flagged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            // Readers stop polling once a body says it has ended.
            Poll::Ready(Some(Ok(_))) => self.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                if let Some(f) = &self.failed {
                    f.store(true, Ordering::Release);
                }
                false
            }
            Poll::Pending => false,
        };
        if let (true, Some(e)) = (ended, &self.ended) {
            e.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
