//! One client connection: protocol detection, HTTP/1.1 or h2c serving, the request-headers
//! timeout, the idle timeout, graceful close on drain and hard close at the drain timeout.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::ConnectionPermit;
use crate::config::raw::ListenerProtocol;
use crate::downstream::{ConnState, InFlight, Phase};
use crate::forward::Client;
use crate::proxy::{self, ListenerContext};
use crate::tls::Peer;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Longest time a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest wait, after an idle connection was asked to close, before it is closed hard.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// Serves one connection until it closes, times out, or is drained. The connection keeps
/// the limits of `ctx`, the listener's settings when it was accepted; each request takes
/// the listener's settings as they are then (`current`), so a rename or a new route config
/// applies to open connections too.
pub async fn serve(
    current: Arc<ArcSwap<ListenerContext>>,
    ctx: Arc<ListenerContext>,
    stream: TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
    phase: watch::Receiver<Phase>,
) {
    let settings = &ctx.settings;
    let gauge = settings.metrics.connections_active.clone();
    gauge.inc();
    let state = Arc::new(ConnState::new(permit, gauge, phase.clone()));
    let limit = settings
        .request_headers_timeout
        .unwrap_or(Duration::from_secs(3600));
    if let Some((acceptor, by)) = &ctx.tls {
        // HTTPS: the handshake within the request-headers timeout; ALPN picks the protocol.
        // The handshake has a bound even when the headers timeout is off.
        let handshake = settings
            .request_headers_timeout
            .unwrap_or(TLS_HANDSHAKE_TIMEOUT)
            .min(TLS_HANDSHAKE_TIMEOUT);
        let tls = match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = crate::tls::failure_reason(&error);
                settings.metrics.tls_handshake_failure(reason);
                tracing::debug!(%peer, %error, reason, "TLS handshake failed");
                return;
            }
            Err(_) => {
                settings.metrics.tls_handshake_failure("timeout");
                return;
            }
        };
        settings.metrics.tls_ok.inc();
        let (_, session) = tls.get_ref();
        let alpn_h2 = session.alpn_protocol() == Some(b"h2");
        let identity = session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|leaf| Arc::new(Peer::new(leaf, by.as_deref())));
        let protocol = match settings.protocol {
            ListenerProtocol::Http1 => Protocol::Http1,
            ListenerProtocol::Http2 => Protocol::Http2,
            ListenerProtocol::Auto if alpn_h2 => Protocol::Http2,
            ListenerProtocol::Auto => Protocol::Http1,
        };
        let client = Client::new(peer).over_tls(identity);
        serve_http(current, &ctx, tls, protocol, client, state, phase).await;
        return;
    }
    let protocol = match settings.protocol {
        ListenerProtocol::Http1 => Some(Protocol::Http1),
        ListenerProtocol::Http2 => Some(Protocol::Http2),
        ListenerProtocol::Auto => tokio::time::timeout(limit, detect(&stream))
            .await
            .ok()
            .flatten(),
    };
    let Some(protocol) = protocol else {
        return;
    };
    serve_http(
        current,
        &ctx,
        stream,
        protocol,
        Client::new(peer),
        state,
        phase,
    )
    .await;
}

/// Serves HTTP on an accepted (and for HTTPS, handshaken) connection.
async fn serve_http<IO>(
    current: Arc<ArcSwap<ListenerContext>>,
    ctx: &ListenerContext,
    stream: IO,
    protocol: Protocol,
    client: Client,
    state: Arc<ConnState>,
    phase: watch::Receiver<Phase>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = &ctx.settings;
    let io = TokioIo::new(Watched {
        inner: stream,
        state: state.clone(),
        heads: protocol == Protocol::Http1,
    });
    let service = {
        let state = state.clone();
        service_fn(move |req| {
            proxy::handle(
                current.load_full(),
                client.clone(),
                InFlight::begin(&state),
                req,
            )
        })
    };
    let limits = Limits {
        headers_timeout: settings.request_headers_timeout,
        idle_timeout: settings.idle_timeout,
        stream_idle_timeout: settings.stream_idle_timeout,
    };
    match protocol {
        Protocol::Http1 => {
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(None)
                .keep_alive(true)
                .max_header_size(settings.max_request_headers_bytes);
            if settings.max_request_headers_count != 100 {
                b.max_headers(settings.max_request_headers_count);
            }
            let conn = b.serve_connection(io, service).with_upgrades();
            drive(conn, |c| c.graceful_shutdown(), &state, limits, phase, true).await;
        }
        Protocol::Http2 => {
            let conn = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(settings.max_request_headers_bytes as u32)
                .serve_connection(io, service);
            drive(
                conn,
                |c| c.graceful_shutdown(),
                &state,
                limits,
                phase,
                false,
            )
            .await;
        }
    }
}

/// Reads (without consuming) enough of the first bytes to tell h2c from HTTP/1.1.
async fn detect(stream: &TcpStream) -> Option<Protocol> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // A partial preface: wait for the rest to arrive.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Limits {
    headers_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    /// Here: how long a client may leave what is written to it unread (the stream-level
    /// bound cannot see that: a full socket stops the response body from being polled).
    stream_idle_timeout: Option<Duration>,
}

/// Runs a connection to completion, enforcing the timeouts and honouring drain: graceful
/// close when it begins, hard close when the drain timeout has passed.
async fn drive<C, E>(
    conn: C,
    shutdown: impl Fn(Pin<&mut C>),
    state: &ConnState,
    limits: Limits,
    mut phase: watch::Receiver<Phase>,
    watch_heads: bool,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let headers_timeout = limits.headers_timeout.filter(|_| watch_heads);
    // Check a few times per header timeout; precise enough, and cheap for idle connections.
    let tick = [
        headers_timeout,
        limits.idle_timeout,
        limits.stream_idle_timeout,
    ]
    .into_iter()
    .flatten()
    .min()
    .map_or(Duration::from_secs(3600), |t| {
        (t / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
    });
    tokio::pin!(conn);
    // Both futures live as long as the connection: building a timer or a watch wait anew on
    // every wake-up (several per request) would cost more than the request's own parsing.
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    // When an idle connection was asked to close; a client that ignores it (an HTTP/2 peer
    // that never answers GOAWAY) is closed hard after a grace period.
    let mut idle_close_asked: Option<Instant> = None;
    let grace = limits
        .idle_timeout
        .map(|t| t.min(IDLE_CLOSE_GRACE))
        .unwrap_or(IDLE_CLOSE_GRACE);
    loop {
        tokio::select! {
            // The connection first: it is what wakes this task almost every time.
            biased;
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            changed = phase.changed() => {
                let now = *phase.borrow_and_update();
                // The listener gone (sender dropped) or past its drain timeout: close now.
                if changed.is_err() || now == Phase::Closing {
                    tracing::debug!("drain timeout reached; closing the connection");
                    return;
                }
                if now == Phase::Draining && !closing {
                    closing = true;
                    shutdown(conn.as_mut());
                }
            }
            _ = ticks.tick() => {
                if headers_timeout.is_some_and(|t| state.head_overdue(t)) {
                    tracing::debug!("request headers not received in time; closing");
                    return;
                }
                if limits.stream_idle_timeout.is_some_and(|t| state.write_blocked_for() >= t) {
                    tracing::debug!("the client took nothing for stream_idle_timeout; closing");
                    return;
                }
                if !closing && limits.idle_timeout.is_some_and(|t| state.idle_for() >= t) {
                    closing = true;
                    idle_close_asked = Some(Instant::now());
                    shutdown(conn.as_mut());
                }
                if idle_close_asked.is_some_and(|at| at.elapsed() >= grace)
                    && state.in_flight.load(Ordering::Relaxed) == 0
                {
                    tracing::debug!("idle connection did not close after GOAWAY; closing it");
                    return;
                }
            }
        }
    }
}

/// The client socket, noting when bytes arrive between requests (`heads`: HTTP/1.1 only)
/// and when writes to the client stop going through.
struct Watched<IO> {
    inner: IO,
    state: Arc<ConnState>,
    heads: bool,
}

impl<IO> Watched<IO> {
    fn noted<T>(
        &self,
        polled: Poll<io::Result<T>>,
        moved: impl Fn(&T) -> bool,
    ) -> Poll<io::Result<T>> {
        match &polled {
            Poll::Pending => self.state.on_write(true),
            Poll::Ready(Ok(v)) if moved(v) => self.state.on_write(false),
            Poll::Ready(_) => {}
        }
        polled
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_bytes_in();
            if self.heads {
                self.state.on_read();
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.noted(polled, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.noted(polled, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.noted(polled, |_| true)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
