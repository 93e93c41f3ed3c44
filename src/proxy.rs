//! The request path, in order: load snapshot → route → admit (breaker) → pick endpoint →
//! send (with retries) → answer → record.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::access_log::{self, AccessLog, Entry};
use crate::body::{self, Body, BoxError};
use crate::cluster::balance::hash_bytes;
use crate::cluster::breaker::{Permit, Resource};
use crate::cluster::outlier::Observation;
use crate::cluster::{Cluster, Endpoint};
use crate::config::raw::LbPolicy;
use crate::error::ProxyError;
use crate::forward::{self, Client, Downstream};
use crate::listener::InFlight;
use crate::retry::{Failure, Replay};
use crate::router::{Action, Route};
use crate::snapshot::{ListenerSettings, SnapshotStore};
use crate::upstream::{self, UpstreamError};

/// What every request on one listener shares.
pub struct ListenerContext {
    pub settings: ListenerSettings,
    pub store: Arc<SnapshotStore>,
    pub access_log: Option<AccessLog>,
}

/// Serves one request. Never fails: errors become local replies (see `error.rs`).
pub async fn handle(
    ctx: Arc<ListenerContext>,
    client: Client,
    in_flight: InFlight,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut record = Record::start(ctx.clone(), &req, in_flight);
    let resp = match proxy(&ctx, &client, req, &mut record).await {
        Ok(resp) => resp,
        Err(err) => {
            let (_, marker) = err.status_and_marker();
            tracing::debug!(listener = %ctx.settings.name, error = %err, "local reply");
            ctx.settings.metrics.local_reply(marker);
            record.error = Some(marker);
            err.to_response()
        }
    };
    record.status = resp.status().as_u16();
    Ok(resp.map(|inner| {
        RecordedBody {
            inner,
            record: Some(record),
        }
        .boxed_unsync()
    }))
}

async fn proxy(
    ctx: &ListenerContext,
    client: &Client,
    req: Request<Incoming>,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    // 1. One snapshot for the whole request, whatever reloads happen meanwhile.
    let snapshot = ctx.store.load();
    let routes = snapshot
        .routes(&ctx.settings.name)
        .ok_or(ProxyError::NoRoute)?;

    // 2. Route.
    let (mut parts, body) = req.into_parts();
    // Cheap clones (shared bytes) so the authority can outlive `parts` being handed on.
    let (uri, host) = (parts.uri.clone(), parts.headers.get(header::HOST).cloned());
    let authority = authority(&uri, host.as_ref(), parts.version)
        .ok_or(ProxyError::BadRequest("missing Host header"))?;
    let (_, route) = routes
        .find(authority, &parts.method, parts.uri.path(), &parts.headers)
        .ok_or(ProxyError::NoRoute)?;
    record.route = Some(route.name.clone());
    let cluster = match &route.action {
        Action::Direct { status, body } => return Ok(direct(route, *status, body.clone())),
        action => action.pick_cluster().expect("cluster action"),
    };
    record.cluster = Some(cluster.name.clone());

    // 3. Admit: when the cluster's request breaker is full, fail fast.
    let permit = cluster
        .breakers
        .try_acquire(Resource::Requests)
        .ok_or_else(|| {
            cluster.metrics.overflow(Resource::Requests.label());
            ProxyError::Overflow {
                cluster: cluster.name.clone(),
                resource: Resource::Requests,
            }
        })?;
    record.request_permit = Some(permit);

    // 4. Pick an endpoint and send (retrying per the route's policy), within the route's
    //    timeout, which covers every attempt and the backoff between them.
    let hash = request_hash(cluster, &parts, client.addr);
    let upgrade = forward::is_upgrade(&parts);
    let on_client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let down = Downstream {
        client,
        scheme: "http",
        authority,
        upgrade,
    };
    let upstream_req =
        forward::upstream_request(parts, body::incoming(body), route, &down, cluster.protocol);
    if ctx.access_log.is_some() {
        record.request_id = upstream_req
            .headers()
            .get(&forward::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
    let exchange = async {
        match on_client_upgrade {
            Some(client_io) => {
                let endpoint = pick(cluster, hash, &[], record)?;
                Ok(upgrade_exchange(cluster, &endpoint, upstream_req, client_io).await?)
            }
            None => send_with_retries(cluster, route, upstream_req, hash, record).await,
        }
    };
    let resp = match route.timeout {
        Some(limit) => tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ProxyError::Timeout(limit))??,
        None => exchange.await?,
    };

    // 5. Answer.
    Ok(forward::downstream_response(resp, route))
}

/// Picks an endpoint, preferring ones not in `avoid`, and notes it on the record.
fn pick(
    cluster: &Cluster,
    hash: u64,
    avoid: &[SocketAddr],
    record: &mut Record,
) -> Result<Arc<Endpoint>, ProxyError> {
    let endpoint = cluster
        .pick(hash, avoid)
        .ok_or_else(|| ProxyError::NoHealthyUpstream {
            cluster: cluster.name.clone(),
        })?;
    record.upstream = Some(endpoint.address);
    record.track(endpoint.clone());
    Ok(endpoint)
}

/// Sends the request; with a retry policy, sends it again to another endpoint when the
/// policy, the request's method, the replay buffer, the retry budget and the retry breaker
/// all allow, after a jittered backoff. When a retry is not allowed, the last answer (or
/// error) goes back to the client.
async fn send_with_retries(
    cluster: &Cluster,
    route: &Route,
    req: Request<Body>,
    hash: u64,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    cluster.retry_budget.deposit();
    let Some(policy) = &route.retry_policy else {
        let endpoint = pick(cluster, hash, &[], record)?;
        return attempt(cluster, &endpoint, req, None).await;
    };
    let (parts, body) = req.into_parts();
    let replay = Replay::new(body, policy.replay_limit);
    let mut tried = Vec::new();
    let mut _retry_permit = None;
    let mut retry = 0;
    loop {
        let endpoint = pick(cluster, hash, &tried, record)?;
        tried.push(endpoint.address);
        let req = again(&parts, replay.body(), retry + 1);
        let result = attempt(cluster, &endpoint, req, policy.per_try_timeout).await;
        let failure = match &result {
            Ok(resp) => Failure::of_response(resp.status(), resp.headers()),
            Err(e) => failure_of(e),
        };
        let Some(reason) = failure.and_then(|f| policy.retriable(f, &parts.method)) else {
            return result;
        };
        if retry >= policy.num_retries {
            return result;
        }
        if !replay.can_replay() {
            cluster.metrics.body_too_large.inc();
            return result;
        }
        if !cluster.retry_budget.try_withdraw() {
            cluster.metrics.budget_exhausted.inc();
            return result;
        }
        let Some(permit) = cluster.breakers.try_acquire(Resource::Retries) else {
            cluster.metrics.budget_exhausted.inc();
            cluster.metrics.overflow(Resource::Retries.label());
            return result;
        };
        _retry_permit = Some(permit);
        cluster.metrics.retry(reason);
        drop(result);
        tokio::time::sleep(policy.backoff(retry)).await;
        retry += 1;
    }
}

/// The request for attempt number `attempt` (1-based), with the same head.
fn again(parts: &http::request::Parts, body: Body, attempt: u32) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.headers_mut()
        .insert(ATTEMPT_COUNT.clone(), HeaderValue::from(attempt));
    req
}

/// Header telling the upstream which attempt this is (with a retry policy).
static ATTEMPT_COUNT: http::HeaderName = http::HeaderName::from_static("x-remora-attempt-count");

/// One attempt at one endpoint, its outcome recorded for metrics and outlier detection.
async fn attempt(
    cluster: &Cluster,
    endpoint: &Arc<Endpoint>,
    req: Request<Body>,
    per_try_timeout: Option<std::time::Duration>,
) -> Result<Response<Body>, ProxyError> {
    let sent = Instant::now();
    let send = upstream::send(cluster, endpoint, req);
    let result = match per_try_timeout {
        Some(limit) => match tokio::time::timeout(limit, send).await {
            Ok(r) => r.map_err(ProxyError::from),
            Err(_) => Err(ProxyError::PerTryTimeout(limit)),
        },
        None => send.await.map_err(ProxyError::from),
    };
    match &result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            cluster
                .metrics
                .response(status, sent.elapsed().as_secs_f64());
            cluster.observe(endpoint, Observation::Status(status));
        }
        Err(ProxyError::Upstream(UpstreamError::Overflow(_))) => {}
        Err(ProxyError::Upstream(e)) if e.is_connect_failure() => {
            cluster.observe(endpoint, Observation::ConnectFailure)
        }
        Err(_) => cluster.observe(endpoint, Observation::NoResponse),
    }
    result
}

fn failure_of(e: &ProxyError) -> Option<Failure> {
    match e {
        ProxyError::Upstream(UpstreamError::Overflow(_)) => None,
        ProxyError::Upstream(u) if u.is_connect_failure() => Some(Failure::ConnectFailure),
        ProxyError::Upstream(u) if u.is_refused_stream() => Some(Failure::RefusedStream),
        ProxyError::Upstream(_) => Some(Failure::Reset),
        ProxyError::PerTryTimeout(_) => Some(Failure::Timeout),
        _ => None,
    }
}

/// Sends an upgrade request on its own connection; on `101` splices the two upgraded
/// connections together in a task of their own.
async fn upgrade_exchange(
    cluster: &Cluster,
    endpoint: &Endpoint,
    req: Request<Body>,
    client_io: hyper::upgrade::OnUpgrade,
) -> Result<Response<Body>, upstream::UpstreamError> {
    let mut resp = upstream::send_upgrade(cluster, endpoint, req).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_io = hyper::upgrade::on(&mut resp);
        let addr = endpoint.address;
        tokio::spawn(async move {
            let (client_io, upstream_io) = match tokio::try_join!(client_io, upstream_io) {
                Ok(both) => both,
                Err(error) => {
                    tracing::debug!(%addr, %error, "upgrade did not complete");
                    return;
                }
            };
            let (mut a, mut b) = (TokioIo::new(client_io), TokioIo::new(upstream_io));
            if let Err(error) = tokio::io::copy_bidirectional(&mut a, &mut b).await {
                tracing::debug!(%addr, %error, "upgraded connection ended");
            }
        });
    }
    Ok(resp.map(body::incoming))
}

fn direct(route: &Route, status: StatusCode, data: Bytes) -> Response<Body> {
    let mut resp = Response::new(body::full(data));
    *resp.status_mut() = status;
    forward::direct_response(resp, route)
}

/// The request's authority: `:authority` (HTTP/2, absolute-form) or `Host`.
fn authority<'a>(
    uri: &'a http::Uri,
    host: Option<&'a http::HeaderValue>,
    version: http::Version,
) -> Option<&'a str> {
    if let Some(a) = uri.authority() {
        return Some(a.as_str());
    }
    match host {
        Some(h) => h.to_str().ok(),
        // HTTP/1.0 may omit Host; it can still match a `*` virtual host.
        None if version < http::Version::HTTP_11 => Some(""),
        None => None,
    }
}

/// The `ring_hash` key: the configured header's value, else the client's IP.
fn request_hash(cluster: &Cluster, parts: &http::request::Parts, client: SocketAddr) -> u64 {
    if cluster.lb_policy != LbPolicy::RingHash {
        return 0;
    }
    if let Some(v) = cluster
        .hash_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
    {
        return hash_bytes(v.as_bytes());
    }
    match client.ip() {
        std::net::IpAddr::V4(ip) => hash_bytes(&ip.octets()),
        std::net::IpAddr::V6(ip) => hash_bytes(&ip.octets()),
    }
}

/// What is known about a request as it goes; recorded (metrics, access log) when the
/// response body is finished or dropped.
struct Record {
    /// The listener's metrics and access log (one `Arc`, not a copy of each per request).
    ctx: Arc<ListenerContext>,
    started: Instant,
    method: http::Method,
    authority: String,
    path: String,
    status: u16,
    bytes_sent: u64,
    route: Option<Arc<str>>,
    cluster: Option<Arc<str>>,
    upstream: Option<SocketAddr>,
    request_id: Option<String>,
    error: Option<&'static str>,
    endpoint: Option<Arc<Endpoint>>,
    /// The cluster's request breaker slot, held until the response is done.
    request_permit: Option<Permit>,
    _in_flight: InFlight,
}

impl Record {
    fn start(ctx: Arc<ListenerContext>, req: &Request<Incoming>, in_flight: InFlight) -> Record {
        let logging = ctx.access_log.is_some();
        Record {
            ctx,
            started: Instant::now(),
            method: req.method().clone(),
            // Only the access log needs these strings; skip the copies otherwise.
            authority: if logging {
                authority(req.uri(), req.headers().get(header::HOST), req.version())
                    .unwrap_or_default()
                    .to_owned()
            } else {
                String::new()
            },
            path: if logging {
                req.uri().path().to_owned()
            } else {
                String::new()
            },
            status: 0,
            bytes_sent: 0,
            route: None,
            cluster: None,
            upstream: None,
            request_id: None,
            error: None,
            endpoint: None,
            request_permit: None,
            _in_flight: in_flight,
        }
    }

    /// Counts the request as in flight on `endpoint` (instead of the one an earlier attempt
    /// went to) until the record is done.
    fn track(&mut self, endpoint: Arc<Endpoint>) {
        endpoint
            .state
            .active_requests
            .fetch_add(1, Ordering::Relaxed);
        if let Some(previous) = self.endpoint.replace(endpoint) {
            previous
                .state
                .active_requests
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        if let Some(ep) = &self.endpoint {
            ep.state.active_requests.fetch_sub(1, Ordering::Relaxed);
        }
        let elapsed = self.started.elapsed();
        self.ctx
            .settings
            .metrics
            .request(self.status, elapsed.as_secs_f64());
        if let Some(log) = &self.ctx.access_log {
            log.write(&Entry {
                time: access_log::rfc3339(SystemTime::now() - elapsed),
                method: self.method.to_string(),
                authority: std::mem::take(&mut self.authority),
                path: std::mem::take(&mut self.path),
                status: self.status,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                bytes_sent: self.bytes_sent,
                route: self.route.as_deref().map(str::to_owned),
                cluster: self.cluster.as_deref().map(str::to_owned),
                upstream: self.upstream.map(|a| a.to_string()),
                request_id: self.request_id.take(),
                error: self.error,
            });
        }
    }
}

/// The response body, counting bytes; the record is written when it ends or is dropped.
struct RecordedBody {
    inner: Body,
    record: Option<Record>,
}

impl HttpBody for RecordedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(r)) = (frame.data_ref(), self.record.as_mut()) {
                    r.bytes_sent += data.len() as u64;
                }
            }
            Poll::Ready(None) => self.record = None,
            Poll::Ready(Some(Err(_))) => {
                if let Some(r) = self.record.as_mut() {
                    r.error.get_or_insert("upstream_reset");
                }
                self.record = None;
            }
            Poll::Pending => {}
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
