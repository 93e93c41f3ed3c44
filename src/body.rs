//! The one body type that flows through the proxy, small constructors for it, and wrappers
//! that tell when a body ended or failed.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;

use crate::activity::Activity;
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

/// What is known of a body as it is read: whether it was read to its end, or failed.
#[derive(Default)]
pub struct Progress {
    ended: AtomicBool,
    failed: AtomicBool,
    /// The last read found nothing yet: the reader is waiting on the body's sender.
    waiting: AtomicBool,
}

impl Progress {
    /// Read to its end: every byte was handed on.
    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// The body broke off; for a client's request body: the client went away mid-upload.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Not ended, and the reader is waiting for the sender's next bytes: for a client's
    /// request body, the client is slow (or has paused a stream), not the reader.
    pub fn waiting_on_sender(&self) -> bool {
        !self.ended() && self.waiting.load(Ordering::Acquire)
    }
}

/// Wraps a body so that its [`Progress`] can be read while others read the body; each frame
/// read also counts as progress on `activity`, when given (the stream idle timeout's).
pub fn watch(body: Body, activity: Option<Arc<Activity>>) -> (Body, Arc<Progress>) {
    let progress = Arc::new(Progress::default());
    let watched = Watched {
        inner: body,
        progress: progress.clone(),
        activity,
    };
    (watched.boxed_unsync(), progress)
}

/// A body that records its [`Progress`].
struct Watched {
    inner: Body,
    progress: Arc<Progress>,
    activity: Option<Arc<Activity>>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.progress
            .waiting
            .store(polled.is_pending(), Ordering::Release);
        if let (Poll::Ready(Some(Ok(_))), Some(activity)) = (&polled, &self.activity) {
            activity.touch();
        }
        let flag = match &polled {
            Poll::Ready(None) => Some(&self.progress.ended),
            // Readers stop polling once a body says it has ended.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => Some(&self.progress.ended),
            Poll::Ready(Some(Err(_))) => Some(&self.progress.failed),
            _ => None,
        };
        if let Some(flag) = flag {
            flag.store(true, Ordering::Release);
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
