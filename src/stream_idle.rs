//! The stream idle timeout: a request whose bytes stop moving, both ways, for too long ends
//! (Envoy's `stream_idle_timeout`), so a stalled upstream or client cannot hold a connection
//! and a breaker slot forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

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

/// A body watched from outside. Over HTTP/2, a client that grants no flow-control window
/// (while still reading the socket) leaves hyper waiting for window, polling the body no
/// more: a check made while polling, as [`bound`]'s, never runs, and the stream would keep
/// its breaker slot and upstream connection for as long as the client likes. A task waits
/// for the limit instead and takes the body away: `cut` marks it, and dropping it lets the
/// upstream and the slot go. The client's stream then ends with [`StreamIdle`] whenever
/// hyper polls it again. The task ends with the body.
pub fn watched<B>(body: B, activity: Arc<Activity>, limit: Duration, cut: fn(&mut B)) -> Watched<B>
where
    B: HttpBody + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Some(body)));
    let (done, ended) = oneshot::channel::<()>();
    let watching = Arc::downgrade(&slot);
    tokio::spawn(async move {
        tokio::select! {
            _ = expired(&activity, limit) => {
                let taken = watching
                    .upgrade()
                    .and_then(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).take());
                if let Some(mut body) = taken {
                    cut(&mut body);
                }
            }
            _ = ended => {}
        }
    });
    Watched {
        slot,
        limit,
        done: Some(done),
    }
}

/// See [`watched`].
pub struct Watched<B> {
    slot: Arc<Mutex<Option<B>>>,
    limit: Duration,
    /// Dropped when the body ends (or is dropped), which ends the watching task.
    done: Option<oneshot::Sender<()>>,
}

impl<B> HttpBody for Watched<B>
where
    B: HttpBody<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut slot = this.slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(body) = slot.as_mut() else {
            this.done = None;
            return Poll::Ready(Some(Err(Box::new(StreamIdle(this.limit)))));
        };
        let polled = Pin::new(body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.done = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}
