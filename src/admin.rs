//! The admin server: `/metrics`, `/ready`, `/live`, `/config`, `/clusters`. Loopback by default,
//! with limits of its own so that a flood of admin connections cannot starve the proxy.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::access_log::rfc3339;
use crate::activity::{Active, Activity};
use crate::body::{self, Body};
use crate::connection_limit::{ConnectionLimit, ConnectionPermit};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotStore;

/// What the admin endpoints report on.
pub struct AdminState {
    pub store: Arc<SnapshotStore>,
    pub metrics: Arc<Metrics>,
    /// Listeners are bound and a config is loaded.
    pub ready: AtomicBool,
    /// Shutting down: `/ready` answers 503.
    pub draining: AtomicBool,
    /// The last config the reloader refused, shown by `/config`.
    pub last_rejected: Mutex<Option<Rejection>>,
    /// The version of each xDS type in force (`lds`, `rds`, `cds`, `eds`), shown by `/config`.
    pub xds_versions: Mutex<std::collections::BTreeMap<&'static str, String>>,
}

/// The last rejected attempt, for `/config`.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub at: String,
    pub source: &'static str,
    pub hash: String,
    pub errors: Vec<String>,
    /// The config itself was fine; applying it failed for a reason that may pass (an
    /// address in use, a log file that cannot be opened yet), so the same file is retried.
    pub transient: bool,
}

/// Default `admin.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;
/// Default `admin.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `admin.request_headers_timeout`.
pub const DEFAULT_HEADERS_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the admin address and serves it until the process ends, within the limits of the
/// config in `state` when it starts (they need a restart to change, like the address).
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<SocketAddr> {
    let socket = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin: cannot bind {addr}: {e}")))?;
    let local = socket.local_addr()?;
    let raw = state.store.load().raw.admin.clone();
    let raw = raw.as_ref();
    let connections = Arc::new(ConnectionLimit::new(
        raw.and_then(|a| a.max_connections)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS),
    ));
    let idle = raw
        .and_then(|a| a.idle_timeout)
        .map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0);
    let headers = raw
        .and_then(|a| a.request_headers_timeout)
        .map_or(DEFAULT_HEADERS_TIMEOUT, |d| d.0);
    tokio::spawn(async move {
        loop {
            let stream = match socket.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(permit) = connections.try_acquire() else {
                tracing::debug!("admin: max_connections reached; closing");
                continue;
            };
            tokio::spawn(serve_connection(
                stream,
                state.clone(),
                permit,
                idle,
                headers,
            ));
        }
    });
    tracing::info!(address = %local, "admin listening");
    Ok(local)
}

/// One admin connection, closed after `idle` with no byte either way.
async fn serve_connection(
    stream: TcpStream,
    state: Arc<AdminState>,
    _permit: ConnectionPermit,
    idle: Duration,
    headers: Duration,
) {
    let service = service_fn(move |req| {
        let state = state.clone();
        async move {
            let resp = match req.uri().path() {
                "/config" if req.method() == Method::GET || req.method() == Method::HEAD => {
                    config(state).await
                }
                _ => route(&state, req),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Active::new(stream, activity.clone()));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(headers)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let every = (idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = ticks.tick() => {
                if activity.idle_for() >= idle {
                    return;
                }
            }
        }
    }
}

fn route(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, state.metrics.render());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" => {
            if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
            } else if state.store.load().listeners.is_empty() {
                text(StatusCode::SERVICE_UNAVAILABLE, "no listener\n".into())
            } else if state.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
            }
        }
        "/clusters" => {
            let snap = state.store.load();
            let clusters: Vec<_> = snap
                .clusters
                .values()
                .map(|c| {
                    let endpoints: Vec<_> = c
                        .members()
                        .endpoints
                        .iter()
                        .map(|e| {
                            json!({
                                "address": e.address.to_string(),
                                "weight": e.weight,
                                "health": e.state.label(),
                                "active_health": if e.state.is_healthy() { "healthy" } else { "unhealthy" },
                                "breaker": e.state.breaker.state().label(),
                                "times_ejected": e.state.breaker.times_ejected(),
                                "active_requests": e.state.active_requests.load(Ordering::Relaxed),
                                "idle_connections": e.state.pool.idle_count(),
                            })
                        })
                        .collect();
                    let members = c.members();
                    json!({
                        "name": &*c.name,
                        "lb_policy": c.lb_policy,
                        "protocol": c.protocol,
                        "panic": members.panic,
                        "endpoints": endpoints,
                    })
                })
                .collect();
            json_response(&json!({ "clusters": clusters }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin endpoints: /metrics /ready /live /config /clusters\n".into(),
        ),
    }
}

/// `/config`: the config in force, read again from its text on a blocking thread (for a
/// big mesh that takes as long as a reload's parse, and must not hold up a worker).
async fn config(state: Arc<AdminState>) -> Response<Body> {
    // One reading at a time: each costs a parse of the config, and `/config` is open to
    // whoever reaches the admin port.
    static READING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _one_at_a_time = READING.lock().await;
    let snap = state.store.load();
    let written = snap.written.clone();
    let rendered = tokio::task::spawn_blocking(move || crate::config::shown::render(&written))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let shown = match rendered {
        Ok(shown) => shown,
        Err(e) => {
            let message = format!("cannot show the config in force: {e}\n");
            return text(StatusCode::INTERNAL_SERVER_ERROR, message);
        }
    };
    let last_rejected = state.last_rejected.lock().expect("admin lock").clone();
    let xds_versions = state.xds_versions.lock().expect("admin lock").clone();
    json_response(&ConfigView {
        version: snap.version,
        source: &snap.source,
        hash: &snap.hash,
        loaded_at: rfc3339(snap.loaded_at),
        config: &shown,
        last_rejected,
        xds_versions,
    })
}

fn text(status: StatusCode, body_text: String) -> Response<Body> {
    let mut resp = Response::new(body::full(body_text));
    *resp.status_mut() = status;
    resp
}

/// The body of `/config`.
#[derive(Serialize)]
struct ConfigView<'a> {
    version: u64,
    source: &'a str,
    hash: &'a str,
    loaded_at: String,
    /// Compact, as [`crate::config::shown::render`] writes it.
    config: &'a serde_json::value::RawValue,
    last_rejected: Option<Rejection>,
    xds_versions: std::collections::BTreeMap<&'static str, String>,
}

fn json_response(value: &impl Serialize) -> Response<Body> {
    let mut data = serde_json::to_vec_pretty(value).expect("json");
    data.push(b'\n');
    let mut resp = Response::new(body::full(data));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
