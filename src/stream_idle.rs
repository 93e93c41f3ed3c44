//! The stream idle timeout: a request whose bytes stop moving, both ways, for too long ends
//! (Envoy's `stream_idle_timeout`), so a stalled upstream or client cannot hold a connection
//! and a breaker slot forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::activity::Activity;
use crate::body::{Body, BoxError};

/// The error a stalled response body ends with (the client sees a reset or a close).
#[derive(Debug, thiserror::Error)]
#[error("no progress on the stream for {0:?} (stream_idle_timeout)")]
pub struct StreamIdle(pub Duration);

/// Resolves once `activity` has seen no progress for `limit`.
pub async fn expired(activity: &Activity, limit: Duration) {
    loop {
        let idle = activity.idle_for();
        if idle >= limit {
            return;
        }
        tokio::time::sleep(limit - idle).await;
    }
}

/// Wraps a response body so that it fails with [`StreamIdle`] once neither it nor anything
/// else noted on `activity` (the request body) has moved for `limit`.
pub fn bound(body: Body, activity: Arc<Activity>, limit: Duration) -> Body {
    Bounded {
        inner: body,
        timer: Box::pin(tokio::time::sleep(limit)),
        activity,
        limit,
    }
    .boxed_unsync()
}

struct Bounded {
    inner: Body,
    timer: Pin<Box<tokio::time::Sleep>>,
    activity: Arc<Activity>,
    limit: Duration,
}

impl HttpBody for Bounded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if !polled.is_pending() {
            // Progress: the timer, when it fires, finds it and waits out the rest.
            self.activity.touch();
            return polled;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            // The request body may have moved meanwhile: then wait out the rest.
            let idle = self.activity.idle_for();
            if idle >= self.limit {
                return Poll::Ready(Some(Err(Box::new(StreamIdle(self.limit)))));
            }
            let at = tokio::time::Instant::now() + (self.limit - idle);
            self.timer.as_mut().reset(at);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
