//! Rewrites a request for its upstream and a response for its client: hop-by-hop headers,
//! `x-forwarded-*`, `x-request-id`, authority, path rewrite and the route's header edits.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Request, Response, StatusCode, Uri, Version};

use crate::body::Body;
use crate::config::raw::UpstreamProtocol;
use crate::router::{HeaderOp, PathMatch, Route};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Generated when absent, passed through when present.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a request asks to switch protocols (WebSocket) over HTTP/1.1.
pub fn is_upgrade(parts: &request::Parts) -> bool {
    parts.version == Version::HTTP_11
        && parts.headers.contains_key(header::UPGRADE)
        && connection_has(&parts.headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers: the standard ones and any named in `Connection`. `te` stays
/// only as `te: trailers` (gRPC needs it). An upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    headers.remove(header::CONNECTION);
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::TRAILER);
    if !upgrade {
        headers.remove(header::UPGRADE);
    } else {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if let Some(te) = headers.get(header::TE) {
        if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            headers.remove(header::TE);
        }
    }
}

fn apply_ops(headers: &mut HeaderMap, remove: &[HeaderName], add: &[HeaderOp]) {
    for name in remove {
        headers.remove(name);
    }
    for op in add {
        if op.append {
            headers.append(op.name.clone(), op.value.clone());
        } else {
            headers.insert(op.name.clone(), op.value.clone());
        }
    }
}

/// A fresh random request id in UUID v4 form.
pub fn new_request_id() -> HeaderValue {
    let mut v = fastrand::u128(..);
    v = (v & !(0xf << 76)) | (0x4 << 76);
    v = (v & !(0x3 << 62)) | (0x2 << 62);
    let s = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        (v >> 96) as u32,
        (v >> 80) as u16,
        (v >> 64) as u16,
        (v >> 48) as u16,
        (v & 0xffff_ffff_ffff) as u64
    );
    HeaderValue::from_str(&s).expect("hex is a valid header value")
}

/// What the upstream request needs from the downstream side.
pub struct Downstream<'a> {
    pub client: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The request's authority (Host or `:authority`).
    pub authority: &'a str,
    pub upgrade: bool,
}

/// Turns the client's request into the one sent upstream.
pub fn upstream_request(
    mut parts: request::Parts,
    body: Body,
    route: &Route,
    down: &Downstream<'_>,
    protocol: UpstreamProtocol,
) -> Request<Body> {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, down.upgrade);

    let client_ip = down.client.ip().to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {client_ip}"),
        _ => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(down.scheme),
    );
    if !headers.contains_key(&X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID.clone(), new_request_id());
    }
    apply_ops(
        headers,
        &route.request_headers_to_remove,
        &route.request_headers_to_add,
    );

    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let rewritten;
    let path_and_query = match (&route.prefix_rewrite, &route.path) {
        (Some(new_prefix), PathMatch::Prefix(old)) if path_and_query.starts_with(old.as_str()) => {
            rewritten = format!("{new_prefix}{}", &path_and_query[old.len()..]);
            rewritten.as_str()
        }
        _ => path_and_query,
    };
    let authority = route
        .host_rewrite
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .unwrap_or(down.authority);

    match protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::try_from(path_and_query).unwrap_or_else(|_| Uri::from_static("/"));
            if let Ok(host) = HeaderValue::from_str(authority) {
                parts.headers.insert(header::HOST, host);
            }
        }
        UpstreamProtocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            parts.uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
                .unwrap_or_else(|_| Uri::from_static("/"));
        }
    }
    Request::from_parts(parts, body)
}

/// Turns the upstream's response into the one sent to the client.
pub fn downstream_response(mut resp: Response<Body>, route: &Route) -> Response<Body> {
    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrade);
    apply_ops(
        resp.headers_mut(),
        &route.response_headers_to_remove,
        &route.response_headers_to_add,
    );
    resp
}

/// Applies a route's response header edits to a direct response.
pub fn direct_response(mut resp: Response<Body>, route: &Route) -> Response<Body> {
    apply_ops(
        resp.headers_mut(),
        &route.response_headers_to_remove,
        &route.response_headers_to_add,
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_look_like_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
        assert_ne!(new_request_id(), id);
    }

    #[test]
    fn hop_by_hop_headers_go_and_te_trailers_stays() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-kept"], "1");
    }
}
