//! Why a request failed, and the one place that turns a failure into a response.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::cluster::breaker::Resource;
use crate::upstream::UpstreamError;

/// The header that tells clients (and tests) which failure produced a local reply.
pub const ERROR_HEADER: &str = "x-remora-error";
/// Set on circuit-breaker overflows, as Envoy's `x-envoy-overloaded`.
pub const OVERLOADED_HEADER: &str = "x-remora-overloaded";

/// A request remora could not proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matched")]
    NoRoute,
    #[error("cluster `{cluster}` has no healthy endpoint")]
    NoHealthyUpstream { cluster: Arc<str> },
    /// The route names a cluster the control plane has not delivered (yet).
    #[error("cluster `{cluster}` does not exist")]
    ClusterNotFound { cluster: Arc<str> },
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("no upstream response within {0:?}")]
    Timeout(Duration),
    #[error("no upstream response within the per-try timeout of {0:?}")]
    PerTryTimeout(Duration),
    /// Nothing moved either way for the listener's `stream_idle_timeout`.
    #[error("no progress on the stream for {0:?} (stream_idle_timeout)")]
    StreamIdle(Duration),
    #[error("cluster `{cluster}`: circuit breaker `max_{}` reached", .resource.label())]
    Overflow {
        cluster: Arc<str>,
        resource: Resource,
    },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("more request headers than the listener's max_request_headers_count")]
    TooManyHeaders,
    /// The client's principal is not among those the route admits (or it has none).
    #[error("the client's identity is not allowed here")]
    Forbidden,
    /// The client went away before the response (e.g. mid-upload): no one to answer, and
    /// nothing the upstream did.
    #[error("the client went away before the response")]
    DownstreamDisconnect,
}

impl ProxyError {
    /// The status and the `x-remora-error` marker, per the table in DESIGN.md.
    pub fn status_and_marker(&self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "no_route"),
            ProxyError::NoHealthyUpstream { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "no_healthy_upstream")
            }
            ProxyError::ClusterNotFound { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "cluster_not_found")
            }
            ProxyError::Overflow { .. } | ProxyError::Upstream(UpstreamError::Overflow(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "overflow")
            }
            ProxyError::Upstream(UpstreamError::UnexpectedUpgrade { .. }) => {
                (StatusCode::BAD_GATEWAY, "upstream_protocol_error")
            }
            // The request could not be sent as it was: the client's or remora's doing.
            ProxyError::Upstream(e) if e.is_local() => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::Upstream(e) if e.is_connect_failure() => {
                (StatusCode::SERVICE_UNAVAILABLE, "upstream_connect_failure")
            }
            ProxyError::Upstream(e) if e.is_response_head_too_large() => (
                StatusCode::BAD_GATEWAY,
                "upstream_response_headers_too_large",
            ),
            ProxyError::Upstream(e) if e.is_malformed_response() => {
                (StatusCode::BAD_GATEWAY, "upstream_protocol_error")
            }
            ProxyError::Upstream(_) => (StatusCode::SERVICE_UNAVAILABLE, "upstream_reset"),
            ProxyError::Timeout(_) | ProxyError::PerTryTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            }
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ProxyError::StreamIdle(_) => (StatusCode::REQUEST_TIMEOUT, "stream_idle_timeout"),
            ProxyError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            ProxyError::TooManyHeaders => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_headers_too_large",
            ),
            ProxyError::DownstreamDisconnect => (StatusCode::BAD_REQUEST, "downstream_disconnect"),
        }
    }

    /// What the client is told: the failure, never an upstream's address or TLS details
    /// (those stay in the log and the access log, which have the whole error).
    pub fn client_text(&self) -> String {
        let ProxyError::Upstream(e) = self else {
            return self.to_string();
        };
        match e {
            UpstreamError::Connect { .. } | UpstreamError::Handshake { .. } => {
                "the upstream connection failed".into()
            }
            UpstreamError::ConnectTimeout { timeout, .. } => {
                format!("the upstream connection timed out after {timeout:?}")
            }
            UpstreamError::Tls { .. } => "the TLS handshake with the upstream failed".into(),
            UpstreamError::Reset { .. } if e.is_response_head_too_large() => {
                "the upstream's response headers are over the cluster's limit".into()
            }
            UpstreamError::Reset { .. } if e.is_malformed_response() => {
                "the upstream's response is not valid HTTP".into()
            }
            UpstreamError::Reset { .. } => {
                "the upstream reset the request before a response".into()
            }
            UpstreamError::UnexpectedUpgrade { .. } => {
                "the upstream switched to a protocol the route does not allow".into()
            }
            UpstreamError::Invalid { .. } => "the request cannot be written as HTTP/2".into(),
            UpstreamError::Overflow(_) => e.to_string(),
        }
    }

    /// The local reply: status, marker header, and [`ProxyError::client_text`] as the body.
    pub fn to_response(&self) -> Response<Body> {
        let (status, marker) = self.status_and_marker();
        let mut text = self.client_text();
        text.push('\n');
        let mut resp = Response::new(body::full(text));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(marker));
        if marker == "overflow" {
            headers.insert(OVERLOADED_HEADER, HeaderValue::from_static("true"));
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }

    /// The local reply to a gRPC request: HTTP 200, trailers-only, with `grpc-status` and
    /// `grpc-message` (the marker and the error), as Envoy answers gRPC clients.
    pub fn to_grpc_response(&self) -> Response<Body> {
        let (status, marker) = self.status_and_marker();
        let code = match status.as_u16() {
            400 | 431 => 13, // INTERNAL
            401 => 16,       // UNAUTHENTICATED
            403 => 7,        // PERMISSION_DENIED
            404 => 12,       // UNIMPLEMENTED
            429 => 8,        // RESOURCE_EXHAUSTED
            408 | 504 => 4,  // DEADLINE_EXCEEDED
            _ => 14,         // UNAVAILABLE (502, 503)
        };
        let mut resp = Response::new(body::empty());
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        // grpc-message is percent-encoded text; the error's own text is ASCII-safe except
        // for what the encoding below covers.
        let message: String = format!("{marker}: {}", self.client_text())
            .bytes()
            .map(|b| match b {
                b' '..=b'~' if b != b'%' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        if let Ok(v) = HeaderValue::from_str(&message) {
            headers.insert("grpc-message", v);
        }
        headers.insert(ERROR_HEADER, HeaderValue::from_static(marker));
        if marker == "overflow" {
            headers.insert(OVERLOADED_HEADER, HeaderValue::from_static("true"));
        }
        resp
    }
}

/// Whether a request is gRPC (its local replies must be gRPC-shaped).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn every_error_maps_to_its_status_and_marker() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases = [
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::Forbidden, 403, "forbidden"),
            (
                ProxyError::ClusterNotFound {
                    cluster: "c".into(),
                },
                503,
                "cluster_not_found",
            ),
            (
                ProxyError::NoHealthyUpstream {
                    cluster: "c".into(),
                },
                503,
                "no_healthy_upstream",
            ),
            (
                ProxyError::Upstream(UpstreamError::Connect {
                    addr,
                    source: refused,
                }),
                503,
                "upstream_connect_failure",
            ),
            (
                ProxyError::Upstream(UpstreamError::ConnectTimeout {
                    addr,
                    timeout: Duration::from_secs(1),
                }),
                503,
                "upstream_connect_failure",
            ),
            (
                ProxyError::Timeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
            ),
            (ProxyError::BadRequest("x"), 400, "bad_request"),
            (
                ProxyError::DownstreamDisconnect,
                400,
                "downstream_disconnect",
            ),
            (
                ProxyError::PerTryTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
            ),
            (
                ProxyError::Overflow {
                    cluster: "c".into(),
                    resource: Resource::Requests,
                },
                503,
                "overflow",
            ),
            (
                ProxyError::Upstream(UpstreamError::Overflow(Resource::Connections)),
                503,
                "overflow",
            ),
        ];
        for (err, status, marker) in cases {
            let resp = err.to_response();
            assert_eq!(resp.status().as_u16(), status, "{err}");
            assert_eq!(resp.headers()[ERROR_HEADER], marker, "{err}");
            assert_eq!(
                resp.headers().contains_key(OVERLOADED_HEADER),
                marker == "overflow",
                "{err}"
            );
        }
    }

    #[test]
    fn local_reply_body_keeps_the_source_chain() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let err = ProxyError::Upstream(UpstreamError::Connect {
            addr,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        });
        let (status, _) = err.status_and_marker();
        assert_eq!(status, 503);
        let text = format!("{}", err);
        assert!(text.contains("127.0.0.1:1"));
    }
}
