//! The upstream client: pooled HTTP/1.1 keep-alive connections and one multiplexed h2c
//! connection per endpoint, opened on demand with the cluster's connect timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::body::{self, Body, BoxError};
use crate::cluster::breaker::{Permit, Resource};
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
}

impl UpstreamError {
    /// True for an HTTP/2 REFUSED_STREAM: the upstream did not process the request.
    pub fn is_refused_stream(&self) -> bool {
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = e.source();
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
        )
    }
}

struct IdleConn {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// An endpoint's connections: idle HTTP/1.1 ones (most recently used first), or one h2c one.
pub struct Pool {
    idle: Mutex<Vec<IdleConn>>,
    h2: Mutex<Option<http2::SendRequest<Body>>>,
    h2_connecting: tokio::sync::Mutex<()>,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::new()
    }
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Idle HTTP/1.1 connections right now (for `/clusters` and tests).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().expect("pool lock").len()
    }

    /// Drops idle connections unused for longer than `max_idle`, which closes them.
    pub fn close_idle_older_than(&self, max_idle: Duration) {
        self.idle
            .lock()
            .expect("pool lock")
            .retain(|c| c.since.elapsed() < max_idle && !c.sender.is_closed());
    }

    fn put_h1(&self, sender: http1::SendRequest<Body>) {
        self.idle.lock().expect("pool lock").push(IdleConn {
            sender,
            since: Instant::now(),
        });
    }

    async fn take_h1(&self, max_idle: Duration) -> Option<http1::SendRequest<Body>> {
        loop {
            let conn = self.idle.lock().expect("pool lock").pop()?;
            if conn.sender.is_closed() || conn.since.elapsed() >= max_idle {
                continue;
            }
            let mut sender = conn.sender;
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }
}

/// Sends `req` to `ep` and returns its response headers; the body streams afterwards.
///
/// A request handed to a pooled connection that turns out to be closed (the keep-alive
/// race: the upstream closed it while idle) comes back unsent from hyper and is sent once
/// more on a fresh connection, whatever the method: it never reached the upstream.
pub async fn send(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    match cluster.protocol {
        UpstreamProtocol::Http1 => send_h1(cluster, ep, req).await,
        UpstreamProtocol::Http2 => send_h2(cluster, ep, req).await,
    }
}

async fn send_h1(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    let addr = ep.address;
    let (mut sender, reused) = match ep.state.pool.take_h1(cluster.idle_timeout).await {
        Some(s) => (s, true),
        None => {
            // Waiting for a new connection: a pending request.
            let _pending = acquire(cluster, Resource::PendingRequests)?;
            (connect_h1(cluster, addr, false).await?, false)
        }
    };
    let req = match sender.try_send_request(req).await {
        Ok(resp) => return Ok(pooled_response(resp, sender, ep.clone())),
        Err(mut e) => match e.take_message() {
            Some(req) if reused => req,
            _ => {
                return Err(UpstreamError::Reset {
                    addr,
                    source: e.into_error(),
                })
            }
        },
    };
    tracing::debug!(%addr, "pooled connection was closed; sending on a fresh one");
    let mut sender = connect_h1(cluster, addr, false).await?;
    match sender.send_request(req).await {
        Ok(resp) => Ok(pooled_response(resp, sender, ep.clone())),
        Err(source) => Err(UpstreamError::Reset { addr, source }),
    }
}

/// Sends an upgrade request (WebSocket) on a connection of its own, which the upgrade takes over.
pub async fn send_upgrade(
    cluster: &Cluster,
    ep: &Endpoint,
    req: Request<Body>,
) -> Result<Response<Incoming>, UpstreamError> {
    let addr = ep.address;
    let mut sender = connect_h1(cluster, addr, true).await?;
    sender
        .send_request(req)
        .await
        .map_err(|source| UpstreamError::Reset { addr, source })
}

async fn send_h2(
    cluster: &Cluster,
    ep: &Arc<Endpoint>,
    req: Request<Body>,
) -> Result<Response<Body>, UpstreamError> {
    let addr = ep.address;
    let mut sender = h2_sender(cluster, ep).await?;
    let req = match sender.try_send_request(req).await {
        Ok(resp) => return Ok(resp.map(body::incoming)),
        Err(mut e) => match e.take_message() {
            Some(req) => req,
            None => {
                return Err(UpstreamError::Reset {
                    addr,
                    source: e.into_error(),
                })
            }
        },
    };
    ep.state.pool.h2.lock().expect("pool lock").take();
    let mut sender = h2_sender(cluster, ep).await?;
    match sender.send_request(req).await {
        Ok(resp) => Ok(resp.map(body::incoming)),
        Err(source) => Err(UpstreamError::Reset { addr, source }),
    }
}

async fn h2_sender(
    cluster: &Cluster,
    ep: &Endpoint,
) -> Result<http2::SendRequest<Body>, UpstreamError> {
    let live = |pool: &Pool| {
        pool.h2
            .lock()
            .expect("pool lock")
            .as_ref()
            .filter(|s| !s.is_closed())
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
    let stream = connect_tcp(cluster, addr).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    let gauge = cluster.metrics.connections_active.clone();
    gauge.inc();
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::debug!(%addr, %error, "upstream h2 connection ended");
        }
        gauge.dec();
        drop(permit);
    });
    *ep.state.pool.h2.lock().expect("pool lock") = Some(sender.clone());
    Ok(sender)
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
        cluster.metrics.connect_failures.inc();
    }
    result
}

async fn connect_h1(
    cluster: &Cluster,
    addr: SocketAddr,
    upgrades: bool,
) -> Result<http1::SendRequest<Body>, UpstreamError> {
    let permit = acquire(cluster, Resource::Connections)?;
    let stream = connect_tcp(cluster, addr).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UpstreamError::Handshake { addr, source })?;
    let gauge = cluster.metrics.connections_active.clone();
    gauge.inc();
    tokio::spawn(async move {
        let result = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(error) = result {
            tracing::debug!(%addr, %error, "upstream connection ended");
        }
        gauge.dec();
        drop(permit);
    });
    Ok(sender)
}

fn pooled_response(
    resp: Response<Incoming>,
    sender: http1::SendRequest<Body>,
    ep: Arc<Endpoint>,
) -> Response<Body> {
    resp.map(|inner| {
        if inner.is_end_stream() {
            ep.state.pool.put_h1(sender);
            return body::incoming(inner);
        }
        PooledBody {
            inner,
            give_back: Some((sender, ep)),
        }
        .boxed_unsync()
    })
}

/// A response body that returns its connection to the pool once read to the end. Dropped
/// early, it closes the connection instead (what is left unread could not be reused).
struct PooledBody {
    inner: Incoming,
    give_back: Option<(http1::SendRequest<Body>, Arc<Endpoint>)>,
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
        if let Some((sender, ep)) = self.give_back.take() {
            ep.state.pool.put_h1(sender);
        }
    }
}
