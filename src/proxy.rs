//! The request path, in order: load snapshot → route → admit (breaker) → pick endpoint →
//! send (with retries) → answer → record.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::access_log::{self, AccessLog, Entry};
use crate::activity::Activity;
use crate::body::{self, Body, BoxError};
use crate::cluster::breaker::{Permit, Resource};
use crate::cluster::outlier::Observation;
use crate::cluster::{Cluster, Endpoint, Pick};
use crate::config::raw::LbPolicy;
use crate::downstream::{ConnectionHold, InFlight};
use crate::error::ProxyError;
use crate::forward::{self, Client, Downstream};
use crate::hash::hash_bytes;
use crate::path;
use crate::retry::{Failure, Replay};
use crate::router::{Action, Route};
use crate::snapshot::{ListenerSettings, SnapshotStore};
use crate::stream_idle;
use crate::tunnel;
use crate::upstream::{self, UpstreamError};

/// What every request on one listener shares.
pub struct ListenerContext {
    pub settings: ListenerSettings,
    pub store: Arc<SnapshotStore>,
    pub access_log: Option<AccessLog>,
    /// The TLS acceptor of an HTTPS listener, and its own URI SAN (the `By=` of XFCC).
    pub tls: Option<(tokio_rustls::TlsAcceptor, Option<String>)>,
    /// When its certificate expires (Unix seconds), published once the context is in use.
    pub certificate_expiry: Option<i64>,
}

impl ListenerContext {
    /// Sets the gauges that describe this context, as it takes effect.
    pub fn publish(&self) {
        if let Some(at) = self.certificate_expiry {
            self.settings.metrics.certificate_expires(at);
        }
    }
}

/// Serves one request. Never fails: errors become local replies (see `error.rs`).
pub async fn handle(
    ctx: Arc<ListenerContext>,
    client: Client,
    in_flight: InFlight,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let mut record = Record::start(ctx.clone(), &req, in_flight);
    let grpc = crate::error::is_grpc(req.headers());
    let h2 = req.version() == http::Version::HTTP_2;
    let mut watch = None;
    let resp = match proxy(&ctx, &client, req, &mut record).await {
        Ok(resp) => {
            // HTTP/2 flow control can stop hyper polling the body: see `stream_idle::watched`.
            watch = record.stream_idle.take().filter(|_| h2);
            resp
        }
        Err(err) => {
            let (_, marker) = err.status_and_marker();
            tracing::debug!(listener = %ctx.settings.name, error = %err, "local reply");
            ctx.settings.metrics.local_reply(marker);
            record.error = Some(marker);
            if matches!(err, ProxyError::DownstreamDisconnect) {
                // Nobody is left to answer: the record keeps status 0, as Envoy's does.
                return Ok(err.to_response());
            }
            if grpc {
                err.to_grpc_response()
            } else {
                err.to_response()
            }
        }
    };
    record.status = resp.status().as_u16();
    Ok(resp.map(|inner| {
        let recorded = RecordedBody {
            inner,
            record: Some(record),
        };
        match watch {
            Some((activity, limit)) if !recorded.is_end_stream() => {
                stream_idle::watched(recorded, activity, limit, RecordedBody::cut_idle)
                    .boxed_unsync()
            }
            _ => recorded.boxed_unsync(),
        }
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
    let routes = snapshot.routes(&ctx.settings).ok_or(ProxyError::NoRoute)?;

    // 2. Route.
    let (mut parts, body) = req.into_parts();
    // hyper enforces the header count on HTTP/1.1 only. HTTP/2 clients may split `cookie`
    // into one field per pair (RFC 9113 §8.2.3): those count as the one header they are.
    let max_headers = ctx.settings.max_request_headers_count;
    if parts.headers.len() > max_headers {
        let cookies = parts.headers.get_all(header::COOKIE).iter().count();
        if parts.headers.len() - cookies.saturating_sub(1) > max_headers {
            return Err(ProxyError::TooManyHeaders);
        }
    }
    let settings = &ctx.settings;
    if (settings.normalize_path || settings.merge_slashes) && path::may_change(parts.uri.path()) {
        normalize_path(
            &mut parts.uri,
            settings.normalize_path,
            settings.merge_slashes,
        )?;
    }
    // Two Host lines could route on one while the upstream acts on the other: 400
    // (RFC 9112 §3.2).
    if parts.headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    // Cheap clones (shared bytes) so the authority can outlive `parts` being handed on.
    let (uri, host) = (parts.uri.clone(), parts.headers.get(header::HOST).cloned());
    let authority = authority(&uri, host.as_ref(), parts.version)?;
    let (_, route) = routes
        .find(authority, &parts.method, parts.uri.path(), &parts.headers)
        .ok_or(ProxyError::NoRoute)?;
    record.route = Some(route.name.clone());
    // Authorization: only the principals the route (or its virtual host) admits.
    if let Some(principals) = &route.principals {
        if !crate::tls::admits(principals, client.principal()) {
            return Err(ProxyError::Forbidden);
        }
    }
    let cluster = match &route.action {
        Action::Direct { status, body } => return Ok(direct(route, *status, body.clone())),
        action => match action.pick_cluster().expect("cluster action") {
            Ok(cluster) => cluster,
            Err(name) => {
                return Err(ProxyError::ClusterNotFound {
                    cluster: name.clone(),
                })
            }
        },
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
    // Every protocol the client offers must be allowed: the upstream picks among them.
    let upgrade = parts.version == http::Version::HTTP_11
        && forward::asks_to_upgrade(&parts.headers)
        && forward::upgrade_protocols(&parts.headers)
            .is_some_and(|protocols| protocols.iter().all(|p| route.allows_upgrade(p)));
    let on_client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let down = Downstream {
        client,
        scheme: client.scheme,
        authority,
        upgrade,
    };
    // A body the client may abandon or stall halfway is watched, so that neither is blamed on
    // the upstream.
    // The stream idle timeout watches both bodies (a tunnel has its own idle timeout).
    let idle = settings
        .stream_idle_timeout
        .filter(|_| !upgrade)
        .map(|limit| (Arc::new(Activity::new()), limit));
    record.stream_idle = idle.clone();
    let (body, upload) = if body.is_end_stream() {
        (body::incoming(body), None)
    } else {
        let activity = idle.as_ref().map(|(activity, _)| activity.clone());
        let (body, progress) = body::watch(body::incoming(body), activity);
        (body, Some(progress))
    };
    let upstream_req = forward::upstream_request(
        parts,
        body,
        route,
        &down,
        cluster.protocol,
        cluster.tls.is_some(),
    )?;
    if ctx.access_log.is_some() {
        record.request_id = upstream_req
            .headers()
            .get(&forward::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
    }
    let target = Target {
        cluster,
        hash: request_hash(cluster, upstream_req.headers(), client.addr),
        deadline: route
            .timeout
            .map(|limit| (tokio::time::Instant::now() + limit, limit)),
        upload,
        idle: idle.clone(),
    };
    let resp = match on_client_upgrade {
        Some(client_io) => {
            let tunnel = tunnel::Limits {
                idle_timeout: ctx.settings.idle_timeout,
                connection: record.connection(),
            };
            upgrade_exchange(&target, route, upstream_req, client_io, tunnel, record).await?
        }
        None => {
            let resp = send_with_retries(&target, route, upstream_req, record).await?;
            match idle {
                Some((activity, limit)) => resp.map(|b| stream_idle::bound(b, activity, limit)),
                None => resp,
            }
        }
    };

    // 5. Answer.
    Ok(forward::downstream_response(resp, route))
}

/// What every attempt of one request needs.
struct Target<'a> {
    cluster: &'a Cluster,
    /// The `ring_hash` key.
    hash: u64,
    /// When the route timeout runs out, and its length (for the error).
    deadline: Option<(tokio::time::Instant, Duration)>,
    /// How far the client's request body has come, when it has one.
    upload: Option<Arc<body::Progress>>,
    /// The stream idle timeout, and where progress either way is noted.
    idle: Option<(Arc<Activity>, Duration)>,
}

impl Target<'_> {
    /// The client went away mid-upload.
    fn client_gone(&self) -> bool {
        self.upload.as_ref().is_some_and(|u| u.failed())
    }

    /// The upstream is waiting for more of the client's body, which the client has not sent:
    /// a timeout now is the client's pace, not the upstream's slowness. (An upstream that
    /// stopped reading leaves the body read up to what the client sent: that one is charged.)
    fn client_stalled(&self) -> bool {
        self.upload.as_ref().is_some_and(|u| u.waiting_on_sender())
    }

    /// Picks an endpoint, preferring ones not in `avoid`, and notes it on the record.
    fn pick(&self, avoid: &[SocketAddr], record: &mut Record) -> Result<Pick, ProxyError> {
        let pick =
            self.cluster
                .pick(self.hash, avoid)
                .ok_or_else(|| ProxyError::NoHealthyUpstream {
                    cluster: self.cluster.name.clone(),
                })?;
        self.note(&pick, record);
        Ok(pick)
    }

    /// Notes the endpoint an attempt goes to on the record (access log, in-flight count).
    fn note(&self, pick: &Pick, record: &mut Record) {
        record.upstream = Some(pick.endpoint.address);
        record.track(pick.endpoint.clone());
    }
}

/// Sends the request; with a retry policy, sends it again to another endpoint when the
/// policy, the request's method, the replay buffer, the retry budget and the retry breaker
/// all allow, after a jittered backoff. When a retry is not allowed, the last answer (or
/// error) goes back to the client.
async fn send_with_retries(
    target: &Target<'_>,
    route: &Route,
    req: Request<Body>,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let cluster = target.cluster;
    cluster.retry_budget.deposit();
    let Some(policy) = &route.retry_policy else {
        let pick = target.pick(&[], record)?;
        return attempt(target, pick, req, None).await;
    };
    let (parts, body) = req.into_parts();
    let replay = Replay::new(body, policy.replay_limit);
    let mut tried = Vec::new();
    let mut _retry_permit = None;
    let mut retry = 0;
    let mut pick = target.pick(&tried, record)?;
    loop {
        tried.push(pick.endpoint.address);
        let req = again(&parts, replay.body(), retry + 1);
        let result = attempt(target, pick, req, policy.per_try_timeout).await;
        let failure = match &result {
            Ok(resp) => Failure::of_response(resp.status(), resp.headers()),
            Err(e) => failure_of(e),
        };
        let Some(reason) = failure.and_then(|f| policy.retriable(f, &parts.method)) else {
            return result;
        };
        // A timeout that waited on the client would only wait on it again.
        if matches!(failure, Some(Failure::Timeout)) && target.client_stalled() {
            return result;
        }
        if retry >= policy.num_retries {
            return result;
        }
        if !replay.can_replay() {
            cluster.metrics.body_too_large();
            return result;
        }
        // Nothing moves while the backoff waits: one the stream idle limit would cut is no
        // retry, and the answer in hand goes back (a 408 would blame the client for it).
        let backoff = policy.backoff(retry);
        if let Some((activity, limit)) = &target.idle {
            if activity.idle_for() + backoff >= *limit {
                return result;
            }
        }
        let Some(permit) = cluster.breakers.try_acquire(Resource::Retries) else {
            cluster.metrics.overflow(Resource::Retries.label());
            return result;
        };
        if !cluster.retry_budget.try_withdraw() {
            cluster.metrics.budget_exhausted();
            return result;
        }
        // No endpoint left to retry on: the last answer stands.
        let Some(next) = cluster.pick(target.hash, &tried) else {
            return result;
        };
        // The abandoned attempt's connection may still be uploading: it must stop reading
        // the body now, or it could read past the replay buffer while the retry waits. If it
        // already has, the body cannot be sent again, and the answer goes back untouched.
        if !replay.retire_if_replayable() {
            cluster.metrics.body_too_large();
            return result;
        }
        _retry_permit = Some(permit);
        cluster.metrics.retry(reason);
        drop(result);
        // The backoff counts against the route timeout like the attempts do: a retry that
        // the route timeout overtakes ends in its 504, as in Envoy.
        let wake = tokio::time::Instant::now() + backoff;
        match target.deadline {
            Some((at, limit)) if at <= wake => {
                tokio::time::sleep_until(at).await;
                return Err(ProxyError::Timeout(limit));
            }
            _ => tokio::time::sleep_until(wake).await,
        }
        // Noted once it is sent: the access log names the endpoints requests reached.
        target.note(&next, record);
        pick = next;
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

/// One attempt at one endpoint, within the per-try timeout and what is left of the route
/// timeout. Its outcome is recorded for metrics and outlier detection.
async fn attempt(
    target: &Target<'_>,
    mut pick: Pick,
    req: Request<Body>,
    per_try_timeout: Option<Duration>,
) -> Result<Response<Body>, ProxyError> {
    let sent = Instant::now();
    let per_try = per_try_timeout.map(|limit| (tokio::time::Instant::now() + limit, limit));
    // Whichever runs out first ends the attempt, with its own error.
    let limit = match (per_try, target.deadline) {
        (Some(p), Some(r)) if r.0 < p.0 => Some((r.0, ProxyError::Timeout(r.1))),
        (Some(p), _) => Some((p.0, ProxyError::PerTryTimeout(p.1))),
        (None, Some(r)) => Some((r.0, ProxyError::Timeout(r.1))),
        (None, None) => None,
    };
    let send = upstream::send(target.cluster, &pick.endpoint, req);
    let timed = async {
        match limit {
            Some((at, on_timeout)) => match tokio::time::timeout_at(at, send).await {
                Ok(r) => r.map_err(ProxyError::from),
                Err(_) => Err(on_timeout),
            },
            None => send.await.map_err(ProxyError::from),
        }
    };
    // The stream idle timeout ends the attempt like a timeout, so its outcome is recorded.
    let result = match &target.idle {
        Some((activity, idle)) => tokio::select! {
            biased;
            result = timed => {
                // A response head is movement, retried or not.
                if result.is_ok() {
                    activity.touch();
                }
                result
            }
            _ = stream_idle::expired(activity, *idle) => Err(ProxyError::StreamIdle(*idle)),
        },
        None => timed.await,
    };
    record_outcome(target, &mut pick, result.as_ref().map(|r| r.status()), sent)?;
    result
}

/// Records an attempt's outcome, sorted by who caused it: only the upstream's failures
/// count against the upstream. A pick dropped without an outcome gives back its probe slot.
fn record_outcome(
    target: &Target<'_>,
    pick: &mut Pick,
    outcome: Result<StatusCode, &ProxyError>,
    sent: Instant,
) -> Result<(), ProxyError> {
    let cluster = target.cluster;
    match outcome {
        Ok(status) => {
            let status = status.as_u16();
            cluster
                .metrics
                .response(status, sent.elapsed().as_secs_f64());
            cluster.observe_pick(pick, Observation::Status(status));
        }
        // The client went away mid-upload: its doing, not the upstream's.
        Err(_) if target.client_gone() => return Err(ProxyError::DownstreamDisconnect),
        // The time ran out while the client was still sending its body: nobody's fault the
        // upstream can be charged with.
        Err(ProxyError::Timeout(_) | ProxyError::PerTryTimeout(_) | ProxyError::StreamIdle(_))
            if target.client_stalled() => {}
        // The stream went idle mostly before this attempt (an earlier one, a backoff): not
        // this endpoint's doing.
        Err(ProxyError::StreamIdle(limit)) if sent.elapsed() < *limit => {}
        // Refused by remora's own breaker, or a request remora could not send as it was:
        // the upstream never saw it.
        Err(ProxyError::Upstream(UpstreamError::Overflow(_))) => {}
        Err(ProxyError::Upstream(e)) if e.is_local() => {}
        Err(ProxyError::Upstream(e)) if e.is_connect_failure() => {
            cluster.observe_pick(pick, Observation::ConnectFailure)
        }
        Err(_) => cluster.observe_pick(pick, Observation::NoResponse),
    }
    Ok(())
}

fn failure_of(e: &ProxyError) -> Option<Failure> {
    match e {
        ProxyError::Upstream(UpstreamError::Overflow(_)) => None,
        ProxyError::Upstream(u) if u.is_local() => None,
        ProxyError::Upstream(u) if u.is_connect_failure() => Some(Failure::ConnectFailure),
        ProxyError::Upstream(u) if u.is_unprocessed() => Some(Failure::RefusedStream),
        ProxyError::Upstream(_) => Some(Failure::Reset),
        ProxyError::PerTryTimeout(_) => Some(Failure::Timeout),
        _ => None,
    }
}

/// Sends an upgrade request on its own connection; on `101` hands the two upgraded
/// connections to a tunnel that holds both connections' slots until it closes.
async fn upgrade_exchange(
    target: &Target<'_>,
    route: &Route,
    req: Request<Body>,
    client_io: hyper::upgrade::OnUpgrade,
    limits: tunnel::Limits,
    record: &mut Record,
) -> Result<Response<Body>, ProxyError> {
    let mut pick = target.pick(&[], record)?;
    let sent = Instant::now();
    let offered: Vec<String> = forward::upgrade_protocols(req.headers())
        .unwrap_or_default()
        .into_iter()
        .map(str::to_ascii_lowercase)
        .collect();
    let send = upstream::send_upgrade(target.cluster, &pick.endpoint, req);
    // The route timeout bounds the handshake; a timeout is the upstream's, and recorded.
    let result = match target.deadline {
        Some((at, limit)) => match tokio::time::timeout_at(at, send).await {
            Ok(r) => r.map_err(ProxyError::from),
            Err(_) => Err(ProxyError::Timeout(limit)),
        },
        None => send.await.map_err(ProxyError::from),
    };
    // A 101 to a protocol the client did not offer, or the route does not allow, is the
    // upstream breaking the protocol: a failure, answered 502.
    let result = result.and_then(|(resp, slot)| {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && !upgrade_answer_allowed(route, &offered, &resp)
        {
            return Err(ProxyError::Upstream(UpstreamError::UnexpectedUpgrade {
                addr: pick.endpoint.address,
            }));
        }
        Ok((resp, slot))
    });
    record_outcome(
        target,
        &mut pick,
        result.as_ref().map(|(resp, _)| resp.status()),
        sent,
    )?;
    let (mut resp, upstream_slot) = result?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_io = hyper::upgrade::on(&mut resp);
        tunnel::spawn(
            client_io,
            upstream_io,
            upstream_slot,
            limits,
            pick.endpoint.address,
        );
    }
    Ok(resp.map(body::incoming))
}

/// Whether the protocol a `101` switches to is one the route allows (an upstream must not
/// pick a protocol the client did not ask for, RFC 9110 §15.2.2).
fn upgrade_answer_allowed(route: &Route, offered: &[String], resp: &Response<Incoming>) -> bool {
    forward::upgrade_protocols(resp.headers())
        .map(|protocols| {
            protocols.iter().all(|p| {
                route.allows_upgrade(p) && offered.iter().any(|o| o.eq_ignore_ascii_case(p))
            })
        })
        .unwrap_or(false)
}

/// Replaces the URI's path with its normalized form (the query stays); the request is routed
/// and forwarded with it.
fn normalize_path(uri: &mut http::Uri, dots: bool, slashes: bool) -> Result<(), ProxyError> {
    let Some(path) = path::normalize(uri.path(), dots, slashes)
        .map_err(|_| ProxyError::BadRequest("invalid percent-encoding in the path"))?
    else {
        return Ok(());
    };
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(
        target
            .parse()
            .map_err(|_| ProxyError::BadRequest("path does not normalize to a valid URI"))?,
    );
    *uri = http::Uri::from_parts(parts)
        .map_err(|_| ProxyError::BadRequest("path does not normalize to a valid URI"))?;
    Ok(())
}

fn direct(route: &Route, status: StatusCode, data: Bytes) -> Response<Body> {
    let mut resp = Response::new(body::full(data));
    *resp.status_mut() = status;
    forward::direct_response(resp, route)
}

/// The request's authority: `:authority` (HTTP/2, absolute-form) or `Host`, which must be
/// a valid authority (RFC 9110 §7.2): anything else is the client's error, a 400.
fn authority<'a>(
    uri: &'a http::Uri,
    host: Option<&'a http::HeaderValue>,
    version: http::Version,
) -> Result<&'a str, ProxyError> {
    if let Some(a) = uri.authority() {
        return Ok(a.as_str());
    }
    match host {
        Some(h) if is_valid_host(h.as_bytes()) => {
            Ok(h.to_str().expect("checked: ASCII graphic bytes"))
        }
        Some(_) => Err(ProxyError::BadRequest("invalid Host header")),
        // HTTP/1.0 may omit Host; it can still match a `*` virtual host.
        None if version < http::Version::HTTP_11 => Ok(""),
        None => Err(ProxyError::BadRequest("missing Host header")),
    }
}

/// Whether a Host header is `host[:port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): reg-name
/// characters, or an IP literal in brackets. Checked in place, without copying (this runs on
/// every HTTP/1.1 request). Empty is allowed: it matches only a `*` virtual host.
fn is_valid_host(host: &[u8]) -> bool {
    let reg_name = |b: &u8| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    };
    let (name, port) = match host.first() {
        Some(b'[') => {
            let Some(end) = host.iter().position(|b| *b == b']') else {
                return false;
            };
            let literal = &host[1..end];
            if literal.is_empty()
                || !literal
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
            {
                return false;
            }
            (&[][..], &host[end + 1..])
        }
        _ => match host.iter().position(|b| *b == b':') {
            Some(colon) => (&host[..colon], &host[colon..]),
            None => (host, &[][..]),
        },
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    port_ok && name.iter().all(reg_name)
}

/// The `ring_hash` key: the configured header's value, else the client's IP.
fn request_hash(cluster: &Cluster, headers: &http::HeaderMap, client: SocketAddr) -> u64 {
    if cluster.lb_policy != LbPolicy::RingHash {
        return 0;
    }
    if let Some(v) = cluster.hash_header.as_ref().and_then(|h| headers.get(h)) {
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
    in_flight: InFlight,
    /// The request's progress and its `stream_idle_timeout`, when one applies.
    stream_idle: Option<(Arc<Activity>, Duration)>,
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
            in_flight,
            stream_idle: None,
        }
    }

    /// Keeps the client connection counted (its listener slot) while an upgraded tunnel that
    /// outlives this request uses it.
    fn connection(&self) -> ConnectionHold {
        self.in_flight.hold_connection()
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
        if self.status == 0 {
            // Dropped before any response: the client went away.
            self.error.get_or_insert("downstream_disconnect");
        }
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

impl RecordedBody {
    /// Marks a body that the stream idle timeout takes away unfinished.
    fn cut_idle(&mut self) {
        if let Some(r) = self.record.as_mut() {
            r.error.get_or_insert("stream_idle_timeout");
        }
    }
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
            Poll::Ready(Some(Err(e))) => {
                let marker = if e.is::<stream_idle::StreamIdle>() {
                    "stream_idle_timeout"
                } else {
                    "upstream_reset"
                };
                if let Some(r) = self.record.as_mut() {
                    r.error.get_or_insert(marker);
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

#[cfg(test)]
mod tests {
    use super::is_valid_host;

    #[test]
    fn host_headers_are_checked_as_authorities() {
        for ok in [
            "svc",
            "svc.ns.svc.cluster.local:8080",
            "10.0.0.1:80",
            "[::1]:443",
            "[::ffff:10.0.0.1]",
            "",
        ] {
            assert!(is_valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "svc bad",
            "svc/x",
            "svc:80x",
            "svc:123456",
            "user@svc",
            "[::1",
            "[zz]",
            "svc?",
            "svc\u{e9}",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
