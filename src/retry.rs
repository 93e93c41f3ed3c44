//! Retry policy: which failures are retried, the backoff between attempts, and the replay
//! buffer that lets a request body be sent again.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::body::{Body, BoxError};
use crate::config::raw::RawRetryPolicy;

/// Default backoff base and cap.
pub const DEFAULT_BASE_INTERVAL: Duration = Duration::from_millis(25);
pub const DEFAULT_MAX_INTERVAL: Duration = Duration::from_millis(250);
/// Default replay buffer.
pub const DEFAULT_REPLAY_BUFFER_BYTES: usize = 64 * 1024;

const FIVE_XX: u32 = 1;
const GATEWAY_ERROR: u32 = 1 << 1;
const CONNECT_FAILURE: u32 = 1 << 2;
const RESET: u32 = 1 << 3;
const REFUSED_STREAM: u32 = 1 << 4;
const RETRIABLE_4XX: u32 = 1 << 5;
const STATUS_CODES: u32 = 1 << 6;
const GRPC_CANCELLED: u32 = 1 << 7;
const GRPC_DEADLINE_EXCEEDED: u32 = 1 << 8;
const GRPC_INTERNAL: u32 = 1 << 9;
const GRPC_RESOURCE_EXHAUSTED: u32 = 1 << 10;
const GRPC_UNAVAILABLE: u32 = 1 << 11;

/// The `retry_on` names and their flags.
const CONDITIONS: [(&str, u32); 12] = [
    ("5xx", FIVE_XX),
    ("gateway-error", GATEWAY_ERROR),
    ("connect-failure", CONNECT_FAILURE),
    ("reset", RESET),
    ("refused-stream", REFUSED_STREAM),
    ("retriable-4xx", RETRIABLE_4XX),
    ("retriable-status-codes", STATUS_CODES),
    ("cancelled", GRPC_CANCELLED),
    ("deadline-exceeded", GRPC_DEADLINE_EXCEEDED),
    ("internal", GRPC_INTERNAL),
    ("resource-exhausted", GRPC_RESOURCE_EXHAUSTED),
    ("unavailable", GRPC_UNAVAILABLE),
];

/// Every valid `retry_on` name (for validation and did-you-mean).
pub fn condition_names() -> impl Iterator<Item = &'static str> {
    CONDITIONS.iter().map(|(n, _)| *n)
}

fn condition(name: &str) -> Option<u32> {
    CONDITIONS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// How an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A response; `grpc` is the `grpc-status` from its headers, if any.
    Response { status: u16, grpc: Option<u32> },
    /// No connection: the request never left remora.
    ConnectFailure,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    RefusedStream,
    /// The connection or stream broke before a response.
    Reset,
    /// The per-try timeout passed.
    Timeout,
}

impl Failure {
    /// The failure a response represents, if any (a 4xx/5xx or a gRPC error status).
    pub fn of_response(status: StatusCode, headers: &HeaderMap) -> Option<Failure> {
        let grpc = headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .filter(|code| *code != 0);
        (status.as_u16() >= 400 || grpc.is_some()).then_some(Failure::Response {
            status: status.as_u16(),
            grpc,
        })
    }
}

/// A route's compiled retry policy.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    on: u32,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    statuses: Vec<u16>,
    base: Duration,
    max: Duration,
    non_idempotent: bool,
    pub replay_limit: usize,
}

impl RetryPolicy {
    /// From a validated raw policy.
    pub fn new(raw: &RawRetryPolicy) -> RetryPolicy {
        let backoff = raw.backoff.clone().unwrap_or_default();
        RetryPolicy {
            on: raw
                .retry_on
                .iter()
                .filter_map(|c| condition(c))
                .fold(0, |a, f| a | f),
            num_retries: raw.num_retries.unwrap_or(1),
            per_try_timeout: raw.per_try_timeout.map(|d| d.0).filter(|d| !d.is_zero()),
            statuses: raw.retriable_status_codes.clone(),
            base: backoff.base_interval.map_or(DEFAULT_BASE_INTERVAL, |d| d.0),
            max: backoff.max_interval.map_or(DEFAULT_MAX_INTERVAL, |d| d.0),
            non_idempotent: raw.retry_non_idempotent,
            replay_limit: raw
                .replay_buffer_bytes
                .unwrap_or(DEFAULT_REPLAY_BUFFER_BYTES),
        }
    }

    fn has(&self, flag: u32) -> bool {
        self.on & flag != 0
    }

    /// Why this failure may be retried (the `reason` label), or `None`. A request with a
    /// non-idempotent method is retried only when it provably never reached the upstream,
    /// unless the policy says `retry_non_idempotent`.
    pub fn retriable(&self, failure: Failure, method: &Method) -> Option<&'static str> {
        let may_repeat = self.non_idempotent || is_idempotent(method);
        match failure {
            Failure::ConnectFailure => {
                (self.has(CONNECT_FAILURE | FIVE_XX | GATEWAY_ERROR)).then_some("connect_failure")
            }
            Failure::RefusedStream => {
                (self.has(REFUSED_STREAM | FIVE_XX)).then_some("refused_stream")
            }
            _ if !may_repeat => None,
            Failure::Reset => (self.has(RESET | FIVE_XX | GATEWAY_ERROR)).then_some("reset"),
            Failure::Timeout => (self.has(FIVE_XX | GATEWAY_ERROR)).then_some("per_try_timeout"),
            Failure::Response { status, grpc } => {
                if let Some(code) = grpc {
                    let flag = match code {
                        1 => GRPC_CANCELLED,
                        4 => GRPC_DEADLINE_EXCEEDED,
                        8 => GRPC_RESOURCE_EXHAUSTED,
                        13 => GRPC_INTERNAL,
                        14 => GRPC_UNAVAILABLE,
                        _ => 0,
                    };
                    if self.has(flag) {
                        return Some("grpc");
                    }
                }
                if self.has(FIVE_XX) && status >= 500 {
                    Some("5xx")
                } else if self.has(GATEWAY_ERROR) && (502..=504).contains(&status) {
                    Some("gateway_error")
                } else if self.has(RETRIABLE_4XX) && status == 409 {
                    Some("retriable_4xx")
                } else if self.has(STATUS_CODES) && self.statuses.contains(&status) {
                    Some("retriable_status_code")
                } else {
                    None
                }
            }
        }
    }

    /// The wait before retry number `retry` (0 for the first): fully jittered exponential,
    /// uniform in `[0, min(max, base × 2^retry)]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE may be repeated (RFC 9110).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

// === impl Replay ===

/// Keeps a copy of a request body, up to a limit, so another attempt can send it again.
/// Attempts run one after another; each reads the copy first, then the rest of the source.
/// Once a newer attempt's body exists, an older one fails when polled: an abandoned attempt
/// (its connection may still be uploading after an early answer) must not take frames of
/// the source away from the attempt that replaced it.
#[derive(Clone)]
pub struct Replay {
    shared: Arc<Mutex<Shared>>,
}

struct Shared {
    source: Option<Body>,
    frames: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    limit: usize,
    /// The body outgrew the limit: what was read is not all kept, so it cannot be replayed.
    overflow: bool,
    /// The source has ended.
    done: bool,
    size_hint: SizeHint,
    /// The newest attempt's number; only its body may read on.
    attempt: u64,
}

impl Replay {
    pub fn new(source: Body, limit: usize) -> Replay {
        let size_hint = source.size_hint();
        let done = source.is_end_stream();
        Replay {
            shared: Arc::new(Mutex::new(Shared {
                source: Some(source),
                frames: Vec::new(),
                trailers: None,
                buffered: 0,
                limit,
                overflow: false,
                done,
                size_hint,
                attempt: 0,
            })),
        }
    }

    /// Whether another attempt can send the whole body again.
    pub fn can_replay(&self) -> bool {
        !self.shared.lock().expect("replay lock").overflow
    }

    /// If the body can still be sent again whole, stops every attempt's body (an abandoned
    /// attempt's connection must not read on) and says so; otherwise changes nothing.
    pub fn retire_if_replayable(&self) -> bool {
        let mut s = self.shared.lock().expect("replay lock");
        if s.overflow {
            return false;
        }
        s.attempt += 1;
        true
    }

    /// A body for the next attempt; every earlier attempt's body stops.
    pub fn body(&self) -> Body {
        let attempt = {
            let mut s = self.shared.lock().expect("replay lock");
            s.attempt += 1;
            s.attempt
        };
        ReplayBody {
            shared: self.shared.clone(),
            next: 0,
            trailers_sent: false,
            attempt,
        }
        .boxed_unsync()
    }
}

struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    next: usize,
    trailers_sent: bool,
    attempt: u64,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut s = this.shared.lock().expect("replay lock");
        if s.attempt != this.attempt {
            return Poll::Ready(Some(Err(
                "request body superseded by a newer attempt".into()
            )));
        }
        if this.next < s.frames.len() {
            this.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.frames[this.next - 1].clone()))));
        }
        if s.done {
            if !this.trailers_sent {
                this.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                this.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflow && s.buffered + data.len() <= s.limit {
                        s.buffered += data.len();
                        s.frames.push(data.clone());
                        this.next = s.frames.len();
                    } else if !s.overflow {
                        s.overflow = true;
                        s.frames = Vec::new();
                        this.next = 0;
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().expect("replay lock");
        s.done && self.next >= s.frames.len() && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.lock().expect("replay lock").size_hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body;

    fn policy(on: &[&str]) -> RetryPolicy {
        RetryPolicy::new(&RawRetryPolicy {
            retry_on: on.iter().map(|s| s.to_string()).collect(),
            retriable_status_codes: vec![429],
            ..Default::default()
        })
    }

    #[test]
    fn conditions_follow_envoy() {
        let p = policy(&["5xx"]);
        let resp = |status| Failure::Response { status, grpc: None };
        assert_eq!(p.retriable(resp(503), &Method::GET), Some("5xx"));
        assert_eq!(p.retriable(resp(404), &Method::GET), None);
        assert_eq!(p.retriable(Failure::Reset, &Method::GET), Some("reset"));
        assert_eq!(
            p.retriable(Failure::Timeout, &Method::GET),
            Some("per_try_timeout")
        );
        // POST: only when the request never reached the upstream.
        assert_eq!(p.retriable(resp(503), &Method::POST), None);
        assert_eq!(p.retriable(Failure::Reset, &Method::POST), None);
        assert_eq!(
            p.retriable(Failure::ConnectFailure, &Method::POST),
            Some("connect_failure")
        );
        assert_eq!(
            p.retriable(Failure::RefusedStream, &Method::POST),
            Some("refused_stream")
        );

        let p = policy(&["gateway-error", "retriable-4xx", "retriable-status-codes"]);
        assert_eq!(p.retriable(resp(500), &Method::GET), None);
        assert_eq!(p.retriable(resp(504), &Method::GET), Some("gateway_error"));
        assert_eq!(p.retriable(resp(409), &Method::GET), Some("retriable_4xx"));
        assert_eq!(
            p.retriable(resp(429), &Method::GET),
            Some("retriable_status_code")
        );

        let p = policy(&["unavailable"]);
        let grpc = |code| Failure::Response {
            status: 200,
            grpc: Some(code),
        };
        assert_eq!(
            p.retriable(grpc(14), &Method::POST),
            None,
            "gRPC calls are POSTs"
        );
        let mut p = p;
        p.non_idempotent = true;
        assert_eq!(p.retriable(grpc(14), &Method::POST), Some("grpc"));
        assert_eq!(p.retriable(grpc(13), &Method::POST), None);
    }

    #[test]
    fn backoff_stays_within_the_jitter_bounds() {
        let p = policy(&["5xx"]);
        for retry in 0..8u32 {
            let ceiling = (DEFAULT_BASE_INTERVAL * (1 << retry)).min(DEFAULT_MAX_INTERVAL);
            let samples: Vec<Duration> = (0..2000).map(|_| p.backoff(retry)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "retry {retry}");
            // Full jitter spreads over the whole range.
            assert!(samples.iter().any(|d| *d < ceiling / 4));
            assert!(samples.iter().any(|d| *d > ceiling * 3 / 4));
        }
    }

    #[tokio::test]
    async fn replay_sends_the_same_body_again_unless_it_outgrew_the_buffer() {
        let small = Replay::new(body::full("hello world"), 64);
        let first = small.body().collect().await.unwrap().to_bytes();
        let second = small.body().collect().await.unwrap().to_bytes();
        assert_eq!(first, "hello world");
        assert_eq!(second, "hello world");
        assert!(small.can_replay());

        let big = Replay::new(body::full(vec![7u8; 100]), 64);
        let first = big.body().collect().await.unwrap().to_bytes();
        assert_eq!(first.len(), 100, "streams through once");
        assert!(!big.can_replay());
    }

    #[tokio::test]
    async fn an_older_attempts_body_stops_once_a_newer_one_exists() {
        // A source that is still uploading: one frame now, the rest later.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"part1"))))
            .await
            .unwrap();
        let source =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
                .boxed_unsync();
        let replay = Replay::new(source, 1024);
        let mut old = replay.body();
        let first = old.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "part1");
        let mut new = replay.body();
        tx.send(Ok(Frame::data(Bytes::from_static(b"part2"))))
            .await
            .unwrap();
        drop(tx);
        assert!(
            old.frame().await.unwrap().is_err(),
            "the old attempt must not read part2"
        );
        let all = (&mut new).collect().await.unwrap().to_bytes();
        assert_eq!(all, "part1part2", "the new attempt gets every frame");
    }
}
