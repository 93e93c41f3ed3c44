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
/// upstream and the slot go; the task then wakes hyper, whose next poll ends the stream with
/// [`StreamIdle`] (a reset). Data goes out in pieces of at most [`PIECE`] bytes, each one
/// progress: hyper asks for the next piece only once the client has taken most of the last,
/// so a slow client that keeps reading keeps the stream alive. The task ends with the body.
pub fn watched<B>(body: B, activity: Arc<Activity>, limit: Duration, cut: fn(&mut B)) -> Watched<B>
where
    B: HttpBody + Send + Unpin + 'static,
{
    let slot = Arc::new(Mutex::new(Slot {
        body: Some(body),
        waker: None,
    }));
    let (done, ended) = oneshot::channel::<()>();
    let watching = Arc::downgrade(&slot);
    let watched_activity = activity.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = expired(&watched_activity, limit) => {
                let Some(slot) = watching.upgrade() else { return };
                let (taken, waker) = {
                    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
                    (slot.body.take(), slot.waker.take())
                };
                if let Some(mut body) = taken {
                    cut(&mut body);
                }
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
            _ = ended => {}
        }
    });
    Watched {
        slot,
        activity,
        limit,
        rest: Bytes::new(),
        done: Some(done),
    }
}

/// The largest piece of data [`Watched`] hands to hyper at once: HTTP/2's default frame size.
pub const PIECE: usize = 16 * 1024;

struct Slot<B> {
    body: Option<B>,
    /// The task that polled last, woken when the body is taken away.
    waker: Option<std::task::Waker>,
}

/// See [`watched`].
pub struct Watched<B> {
    slot: Arc<Mutex<Slot<B>>>,
    activity: Arc<Activity>,
    limit: Duration,
    /// Data pulled from the body and not handed out yet.
    rest: Bytes,
    /// Dropped when the body ends (or is dropped), which ends the watching task.
    done: Option<oneshot::Sender<()>>,
}

impl<B> Watched<B> {
    /// The next piece of `rest`, as progress.
    fn piece(&mut self) -> Frame<Bytes> {
        let n = self.rest.len().min(PIECE);
        self.activity.touch();
        Frame::data(self.rest.split_to(n))
    }
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
        let slot = this.slot.clone();
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.body.is_none() {
            this.done = None;
            this.rest = Bytes::new();
            return Poll::Ready(Some(Err(Box::new(StreamIdle(this.limit)))));
        }
        if !this.rest.is_empty() {
            return Poll::Ready(Some(Ok(this.piece())));
        }
        match &slot.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => slot.waker = Some(cx.waker().clone()),
        }
        let body = slot.body.as_mut().expect("checked above");
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) if data.len() > PIECE => {
                    this.rest = data;
                    Poll::Ready(Some(Ok(this.piece())))
                }
                Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            polled @ (Poll::Ready(None) | Poll::Ready(Some(Err(_)))) => {
                this.done = None;
                polled
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        self.rest.is_empty() && slot.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let mut hint = slot
            .body
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint());
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}
