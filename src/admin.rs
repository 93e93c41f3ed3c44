//! The admin server: `/metrics`, `/ready`, `/live`, `/config`, `/clusters`. Loopback by default.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;

use crate::access_log::rfc3339;
use crate::body::{self, Body};
use crate::metrics::Metrics;
use crate::reloader::Rejection;
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
}

/// Binds the admin address and serves it until the process ends.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<SocketAddr> {
    let socket = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin: cannot bind {addr}: {e}")))?;
    let local = socket.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = socket.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, req)) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    tracing::info!(address = %local, "admin listening");
    Ok(local)
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
            } else if state.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
            }
        }
        "/config" => {
            let snap = state.store.load();
            json_response(json!({
                "version": snap.version,
                "source": snap.source,
                "hash": snap.hash,
                "loaded_at": rfc3339(snap.loaded_at),
                "config": snap.raw,
                "last_rejected": *state.last_rejected.lock().expect("admin lock"),
            }))
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
            json_response(json!({ "clusters": clusters }))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin endpoints: /metrics /ready /live /config /clusters\n".into(),
        ),
    }
}

fn text(status: StatusCode, body_text: String) -> Response<Body> {
    let mut resp = Response::new(body::full(body_text));
    *resp.status_mut() = status;
    resp
}

fn json_response(value: serde_json::Value) -> Response<Body> {
    let mut data = serde_json::to_vec_pretty(&value).expect("json");
    data.push(b'\n');
    let mut resp = Response::new(body::full(data));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
