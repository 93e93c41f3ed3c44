//! The upstream client: pooled HTTP/1.1 keep-alive connections and one multiplexed h2c
//! connection per endpoint, opened on demand with the cluster's connect timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::IntGauge;
use tokio::net::TcpStream;

use crate::body::{self, Body, BoxError};
use crate::cluster::breaker::{Permit, Resource};
use crate::cluster::pool::{Pool, HTTP1, HTTP2, UNKNOWN};
use crate::cluster::{Cluster, Endpoint};
use crate::config::raw::UpstreamProtocol;

/// Why a request got no response from an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("upstream {addr} reset the request before a response")]
    Reset {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("circuit breaker `max_{}` reached", .0.label())]
    Overflow(Resource),
    #[error("upstream {addr} switched to a protocol the route does not allow")]
    UnexpectedUpgrade { addr: SocketAddr },
    #[error("the request to {addr} cannot be written as HTTP/2")]
    Invalid {
        addr: SocketAddr,
        #[source]
        source: http::Error,
    },
    #[error("TLS to {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl UpstreamError {
    /// True when the upstream said it did not process the request: an HTTP/2
    /// REFUSED_STREAM, or a graceful GOAWAY whose last stream id is below the request's
    /// (RFC 9113 §6.8). Such a request is safe to send again, whatever its method.
    pub fn is_unprocessed(&self) -> bool {
        self.h2_error().is_some_and(|h2| {
            h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
        })
    }

    fn h2_error(&self) -> Option<&h2::Error> {
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return Some(h2);
            }
            source = e.source();
        }
        None
    }

    /// True when hyper refused to send the request as it was (an invalid request, or the
    /// request body failing): nothing the upstream did.
    pub fn is_local(&self) -> bool {
        matches!(self, UpstreamError::Reset { source, .. } if source.is_user())
            || matches!(self, UpstreamError::Invalid { .. })
    }

    /// True when the endpoint's response head was over `max_response_headers_bytes`.
    pub fn is_response_head_too_large(&self) -> bool {
        matches!(self, UpstreamError::Reset { source, .. } if source.is_parse_too_large())
    }

    /// True when the endpoint answered something that is not an HTTP response (over HTTP/2:
    /// a response h2 itself refused, e.g. headers over the limit).
    pub fn is_malformed_response(&self) -> bool {
        matches!(self, UpstreamError::Reset { source, .. } if source.is_parse())
            || self.h2_error().is_some_and(|h2| {
                h2.is_library() && h2.reason() == Some(h2::Reason::PROTOCOL_ERROR)
            })
    }

    /// True when a connection closed before any byte of the response came back, which is
    /// what an upstream closing an idle keep-alive connection looks like.
    fn closed_before_response(&self) -> bool {
        let UpstreamError::Reset { source, .. } = self else {
            return false;
        };
        if source.is_incomplete_message() || source.is_canceled() {
            return true;
        }
        let mut cause = std::error::Error::source(source);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return matches!(
                    io.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                );
            }
            cause = e.source();
        }
        false
    }

    /// True when the request cannot have reached the upstream application.
    pub fn is_connect_failure(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
                | UpstreamError::Handshake { .. }
                | UpstreamError::Tls { .. }
        )
    }
}

/// Sends `req` to `ep` and returns its response headers; the body streams afterwards.
///
/// A request that an upstream provably did not take is sent once more on a fresh
/// connection, whatever the method: one handed to a pooled connection found closed (hyper
/// gives it back unsent), or one the upstream refused by HTTP/2 GOAWAY or REFUSED_STREAM.
/// A body-less idempotent request on a long-idle pooled HTTP/1.1 connection that closes
/// before any response byte (the keep-alive race) is sent once more too.
pub async fn send(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    match cluster.protocol {
        UpstreamProtocol::Http1 => send_h1(cluster, ep, req).await,
        UpstreamProtocol::Http2 => send_h2(cluster, ep, req).await,
        UpstreamProtocol::Auto => {
            if speaks_h2(cluster, ep).await? {
                let req = as_h2(req).map_err(|source| UpstreamError::Invalid {
                    addr: ep.address,
                    source,
                })?;
                send_h2(cluster, ep, req).await
            } else {
                let sent = send_h1(cluster, ep, req).await;
                if let Err(UpstreamError::Tls { .. }) = &sent {
                    // Perhaps the endpoint now speaks h2 only: learn again next time.
                    ep.state.pool.chosen.store(UNKNOWN, Ordering::Relaxed);
                }
                sent
            }
        }
    }
}

/// Whether an `auto` endpoint speaks HTTP/2: what it chose by ALPN on an earlier
/// connection, else on a new one, which is then pooled for the request to use.
async fn speaks_h2(cluster: &Cluster, ep: &Endpoint) -> Result<bool, UpstreamError> {
    let pool = &ep.state.pool;
    match pool.chosen.load(Ordering::Relaxed) {
        HTTP1 => return Ok(false),
        HTTP2 => return Ok(true),
        _ => {}
    }
    // One connection learns it; the other requests wait (pending: counted against
    // `max_pending_requests`) and share the answer.
    let _pending = acquire(cluster, Resource::PendingRequests)?;
    let _connecting = pool.h2_connecting.lock().await;
    match pool.chosen.load(Ordering::Relaxed) {
        HTTP1 => return Ok(false),
        HTTP2 => return Ok(true),
        _ => {}
    }
    let addr = ep.address;
    let permit = acquire(cluster, Resource::Connections)?;
    let stream = connect_io(cluster, addr, Alpn::Cluster).await?;
    let h2 = stream.negotiated_h2();
    if h2 {
        install_h2(cluster, ep, stream, permit).await?;
    } else {
        let (sender, _) = handshake_h1(cluster, addr, stream, permit, false).await?;
        pool.put_h1(sender);
    }
    pool.chosen
        .store(if h2 { HTTP2 } else { HTTP1 }, Ordering::Relaxed);
    tracing::debug!(cluster = %cluster.name, %addr, h2, "endpoint chose its protocol by ALPN");
    Ok(h2)
}

/// An HTTP/1.1-shaped request (origin form, `Host`) as HTTP/2 over TLS (`:scheme https`,
/// `:authority` from the URI or `Host`).
fn as_h2(req: Request<Body>) -> Result<Request<Body>, http::Error> {
    let (mut parts, body) = req.into_parts();
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    };
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = http::Uri::builder()
        .scheme("https")
        .authority(authority)
        .path_and_query(path)
        .build()?;
    parts.headers.remove(http::header::HOST);
    parts.version = http::Version::HTTP_2;
    Ok(Request::from_parts(parts, body))
}

/// A pooled connection idle at least this long may have been closed by the upstream's own
/// keep-alive timer just as a request is written (upstreams use seconds to minutes).
const RACE_PRONE_IDLE: Duration = Duration::from_secs(1);

async fn send_h1(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    let addr = ep.address;
    let (mut sender, idle) = match ep.state.pool.take_h1(cluster.idle_timeout).await {
        Some((s, idle)) => (s, Some(idle)),
        None => {
            // Waiting for a new connection: a pending request.
            let _pending = acquire(cluster, Resource::PendingRequests)?;
            (connect_h1(cluster, addr, false).await?.0, None)
        }
    };
    let resend_copy = idle
        .filter(|idle| *idle >= RACE_PRONE_IDLE)
        .and_then(|_| Head::of_resendable(&req));
    // The connection goes back to the pool only once the request, too, has been sent whole
    // (RFC 9112 §9.3): an upstream may answer before reading the whole body.
    let (req, sent_whole) = watch_request_end(req);
    let req = match sender.try_send_request(req).await {
        Ok(resp) => return Ok(pooled_response(resp, sender, ep.clone(), sent_whole)),
        Err(mut e) => match e.take_message() {
            Some(req) if idle.is_some() => req,
            _ => {
                let error = UpstreamError::Reset {
                    addr,
                    source: e.into_error(),
                };
                match resend_copy {
                    Some(head) if error.closed_before_response() => head.rebuild(),
                    _ => return Err(error),
                }
            }
        },
    };
    tracing::debug!(%addr, "pooled connection was closed; sending on a fresh one");
    let mut sender = connect_h1(cluster, addr, false).await?.0;
    let (req, sent_whole) = watch_request_end(req);
    match sender.send_request(req).await {
        Ok(resp) => Ok(pooled_response(resp, sender, ep.clone(), sent_whole)),
        Err(source) => Err(UpstreamError::Reset { addr, source }),
    }
}

/// A body-less request's head, kept to send it again when the upstream provably did not
/// take it (copied only where that can happen, not on every request).
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Head {
    /// For a body-less request whose method may be repeated.
    fn of_resendable(req: &Request<Body>) -> Option<Head> {
        crate::retry::is_idempotent(req.method())
            .then(|| Head::of_bodyless(req))
            .flatten()
    }

    fn of_bodyless(req: &Request<Body>) -> Option<Head> {
        req.body().is_end_stream().then(|| Head {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn rebuild(self) -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// Wraps a request body that is still to be sent so that its end is known; `None` for a
/// body-less request, which is sent whole with its head.
fn watch_request_end(req: Request<Body>) -> (Request<Body>, Option<Arc<body::Progress>>) {
    if req.body().is_end_stream() {
        return (req, None);
    }
    let (parts, b) = req.into_parts();
    let (b, progress) = body::watch(b, None);
    (Request::from_parts(parts, b), Some(progress))
}

/// Sends an upgrade request (WebSocket) on a connection of its own, which the upgrade takes
/// over; the connection's cluster slot comes back with the response, for the tunnel to hold.
pub async fn send_upgrade(
    cluster: &Cluster,
    ep: &Endpoint,
    req: Request<Body>,
) -> Result<(Response<Incoming>, Arc<ConnectionSlot>), UpstreamError> {
    let addr = ep.address;
    let (mut sender, slot) = connect_h1(cluster, addr, true).await?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|source| UpstreamError::Reset { addr, source })?;
    Ok((resp, slot))
}

async fn send_h2(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    let addr = ep.address;
    let (conn_id, mut sender) = h2_sender(cluster, ep).await?;
    // Kept for a resend if the upstream turns the stream away unprocessed (GOAWAY during a
    // graceful restart); a request with a body is resent by a retry policy instead.
    let resend_copy = Head::of_bodyless(&req);
    let req = match sender.try_send_request(req).await {
        Ok(resp) => return Ok(resp.map(body::incoming)),
        Err(mut e) => match e.take_message() {
            Some(req) => req,
            None => {
                let error = UpstreamError::Reset {
                    addr,
                    source: e.into_error(),
                };
                match resend_copy {
                    Some(head) if error.is_unprocessed() => head.rebuild(),
                    _ => return Err(error),
                }
            }
        },
    };
    tracing::debug!(%addr, "h2 connection refused the request unprocessed; sending on a fresh one");
    {
        let mut pooled = ep.state.pool.h2.lock().expect("pool lock");
        if pooled.as_ref().is_some_and(|(id, _)| *id == conn_id) {
            pooled.take();
        }
    }
    let (_, mut sender) = h2_sender(cluster, ep).await?;
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp.map(body::incoming)),
        Err(source) => Err(UpstreamError::Reset { addr, source }),
    }
}

/// The endpoint's h2c connection and its number, opened if there is none that is open.
async fn h2_sender(
    cluster: &Cluster,
    ep: &Endpoint,
) -> Result<(u64, http2::SendRequest<Body>), UpstreamError> {
    let live = |pool: &Pool| {
        pool.h2
            .lock()
            .expect("pool lock")
            .as_ref()
            .filter(|(_, s)| !s.is_closed())
            .cloned()
    };
    if let Some(s) = live(&ep.state.pool) {
        return Ok(s);
    }
    // One connection attempt at a time; the others wait and share it.
    let _connecting = ep.state.pool.h2_connecting.lock().await;
    if let Some(s) = live(&ep.state.pool) {
        return Ok(s);
    }
    let addr = ep.address;
    let permit = acquire(cluster, Resource::Connections)?;
    let stream = connect_io(cluster, addr, Alpn::Cluster).await?;
    if cluster.protocol == UpstreamProtocol::Auto && !stream.negotiated_h2() {
        // The endpoint no longer chooses h2: learn again on the next request.
        ep.state.pool.chosen.store(UNKNOWN, Ordering::Relaxed);
        return Err(UpstreamError::Tls {
            addr,
            source: io::Error::other("the endpoint no longer negotiates h2 by ALPN"),
        });
    }
    install_h2(cluster, ep, stream, permit).await
}

/// Opens HTTP/2 on `stream` and makes it the endpoint's shared connection.
async fn install_h2(
    cluster: &Cluster,
    ep: &Endpoint,
    stream: UpstreamIo,
    permit: Permit,
) -> Result<(u64, http2::SendRequest<Body>), UpstreamError> {
    let addr = ep.address;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .max_header_list_size(u32::try_from(cluster.max_response_headers).unwrap_or(u32::MAX))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    let slot = ConnectionSlot::new(cluster, permit);
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "upstream h2 connection ended");
        }
        drop(slot);
    });
    let id = ep
        .state
        .pool
        .h2_opened
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    *ep.state.pool.h2.lock().expect("pool lock") = Some((id, sender.clone()));
    Ok((id, sender))
}

fn acquire(cluster: &Cluster, resource: Resource) -> Result<Permit, UpstreamError> {
    cluster.breakers.try_acquire(resource).ok_or_else(|| {
        cluster.metrics.overflow(resource.label());
        UpstreamError::Overflow(resource)
    })
}

async fn connect_tcp(cluster: &Cluster, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
    let timeout = cluster.connect_timeout;
    let result = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(UpstreamError::ConnectTimeout { addr, timeout }),
        Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
    };
    if result.is_err() {
        cluster.metrics.connect_failure();
    }
    result
}

/// An open upstream connection's place in its cluster's `max_connections` and in
/// `remora_upstream_connections_active`, given back when the last holder lets go: the
/// connection's task, and for an upgraded connection the tunnel made from it.
pub struct ConnectionSlot {
    _permit: Permit,
    gauge: IntGauge,
}

impl ConnectionSlot {
    fn new(cluster: &Cluster, permit: Permit) -> Arc<ConnectionSlot> {
        let gauge = cluster.metrics.connections_active();
        gauge.inc();
        Arc::new(ConnectionSlot {
            _permit: permit,
            gauge,
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A connection to an endpoint: plain TCP, or TLS over it for a TLS cluster.
enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamIo {
    /// True when TLS negotiated `h2` by ALPN.
    fn negotiated_h2(&self) -> bool {
        match self {
            UpstreamIo::Plain(_) => false,
            UpstreamIo::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl tokio::io::AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Which ALPN a new TLS connection offers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alpn {
    /// The cluster's protocol (both `h2` and `http/1.1` for `auto`).
    Cluster,
    /// `http/1.1` only: upgrades, and HTTP/1.1 connections of `auto` clusters.
    Http1,
}

/// Opens a connection to `addr`, with the cluster's TLS if it has one. A failed TLS handshake
/// is a connect failure (the request never left), with the TLS reason.
async fn connect_io(
    cluster: &Cluster,
    addr: SocketAddr,
    alpn: Alpn,
) -> Result<UpstreamIo, UpstreamError> {
    let stream = connect_tcp(cluster, addr).await?;
    let Some(tls) = &cluster.tls else {
        return Ok(UpstreamIo::Plain(stream));
    };
    let failed = |source: io::Error| {
        cluster.metrics.connect_failure();
        let reason = crate::tls::failure_reason(&source);
        cluster.metrics.tls_handshake_failure(reason);
        tracing::warn!(cluster = %cluster.name, %addr, error = %source, reason, "upstream TLS handshake failed");
        UpstreamError::Tls { addr, source }
    };
    let tls = tls
        .as_ref()
        .map_err(|e| failed(io::Error::new(io::ErrorKind::InvalidInput, e.clone())))?;
    let connector = match alpn {
        Alpn::Cluster => &tls.connector,
        Alpn::Http1 => &tls.http1,
    };
    match tokio::time::timeout(
        cluster.connect_timeout,
        connector.connect(tls.name.clone(), stream),
    )
    .await
    {
        Ok(Ok(tls)) => Ok(UpstreamIo::Tls(Box::new(tls))),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(failed(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        ))),
    }
}

async fn connect_h1(
    cluster: &Cluster,
    addr: SocketAddr,
    upgrades: bool,
) -> Result<(http1::SendRequest<Body>, Arc<ConnectionSlot>), UpstreamError> {
    let permit = acquire(cluster, Resource::Connections)?;
    let stream = connect_io(cluster, addr, Alpn::Http1).await?;
    handshake_h1(cluster, addr, stream, permit, upgrades).await
}

/// Opens HTTP/1.1 on `stream`; `upgrades`: the connection may be taken over by an upgrade.
async fn handshake_h1(
    cluster: &Cluster,
    addr: SocketAddr,
    stream: UpstreamIo,
    permit: Permit,
    upgrades: bool,
) -> Result<(http1::SendRequest<Body>, Arc<ConnectionSlot>), UpstreamError> {
    // The read buffer bounds the response head (a longer head fails to parse: 502); hyper's
    // floor is 8192, which validation keeps the setting above.
    let (sender, conn) = http1::Builder::new()
        .max_buf_size(cluster.max_response_headers.max(8192))
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    let slot = ConnectionSlot::new(cluster, permit);
    let held = slot.clone();
    tokio::spawn(async move {
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(error) = result {
            tracing::debug!(%addr, %error, "upstream connection ended");
        }
        drop(held);
    });
    Ok((sender, slot))
}

/// The response, whose connection goes back to the pool once the response has been read
/// to its end, if by then the request was sent whole (`sent_whole` unset or true).
fn pooled_response(
    resp: Response<Incoming>,
    sender: http1::SendRequest<Body>,
    ep: Arc<Endpoint>,
    sent_whole: Option<Arc<body::Progress>>,
) -> Response<Body> {
    resp.map(|inner| {
        let give_back = PoolReturn {
            sender,
            ep,
            sent_whole,
        };
        if inner.is_end_stream() {
            give_back.put();
            return body::incoming(inner);
        }
        PooledBody {
            inner,
            give_back: Some(give_back),
        }
        .boxed_unsync()
    })
}

/// What it takes to return a connection to its endpoint's pool.
struct PoolReturn {
    sender: http1::SendRequest<Body>,
    ep: Arc<Endpoint>,
    sent_whole: Option<Arc<body::Progress>>,
}

impl PoolReturn {
    /// Pools the connection if the request was sent whole; otherwise drops it, which closes
    /// it once hyper is done with the request.
    fn put(self) {
        if self.sent_whole.as_ref().is_none_or(|sent| sent.ended()) {
            self.ep.state.pool.put_h1(self.sender);
        }
    }
}

/// A response body that returns its connection to the pool once read to the end. Dropped
/// early, it closes the connection instead (what is left unread could not be reused).
struct PooledBody {
    inner: Incoming,
    give_back: Option<PoolReturn>,
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.give_back = None,
            _ => {}
        }
        polled.map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some(r) = self.give_back.take() {
            r.put();
        }
    }
}
