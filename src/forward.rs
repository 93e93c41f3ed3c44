//! Rewrites a request for its upstream and a response for its client: hop-by-hop headers,
//! `x-forwarded-*`, `x-request-id`, authority, path rewrite and the route's header edits.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Request, Response, StatusCode, Uri, Version};

use crate::body::Body;
use crate::config::raw::UpstreamProtocol;
use crate::error::ProxyError;
use crate::router::{HeaderOp, PathMatch, Route};
use crate::tls::Peer;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Generated when absent, passed through when present.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether `Connection` names `upgrade` (with an `Upgrade` header present).
pub fn asks_to_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The protocol names in every `Upgrade` header (`websocket`, `h2c`, ...: without their
/// `/version`), or `None` when there are none or one is not readable.
pub fn upgrade_protocols(headers: &HeaderMap) -> Option<Vec<&str>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::UPGRADE) {
        for protocol in value.to_str().ok()?.split(',') {
            let name = protocol.split('/').next()?.trim();
            if name.is_empty() {
                return None;
            }
            names.push(name);
        }
    }
    (!names.is_empty()).then_some(names)
}

/// The comma-separated tokens of every `Connection` header, trimmed. Split as bytes, so
/// that one non-ASCII token cannot hide the others in the same value.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| std::str::from_utf8(t).ok())
        .map(str::trim)
}

/// The hop-by-hop headers that never cross the proxy (RFC 9110 §7.6.1), besides any named in
/// `Connection`. `te` is among them but may stay as `te: trailers`. `http2-settings` belongs
/// to the h2c upgrade (RFC 7540 §3.2), which is never passed on. `trailer` is end-to-end (it
/// names the trailer fields, which HTTP/1.1 needs declared to send them).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "http2-settings",
];

/// Removes hop-by-hop headers: the standard ones and any named in `Connection`. `te` stays
/// only as `te: trailers` (gRPC needs it). An upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the (few) names first: most messages carry none of these, or only
    // `Connection: keep-alive`, and a scan is much cheaper than seven hashed removals.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| *h == name.as_str()) {
            present[i] = true;
        }
    }
    if !present.contains(&true) {
        return;
    }
    // A message framed by Transfer-Encoding: its Content-Length is not the body's length and
    // must not pass on (RFC 9112 §6.3 (3)); the next hop frames the body itself.
    let chunked = HOP_BY_HOP
        .iter()
        .zip(present)
        .any(|(name, p)| p && *name == "transfer-encoding");
    if chunked {
        headers.remove(header::CONTENT_LENGTH);
    }
    let named: Vec<HeaderName> = connection_tokens(headers)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    let keep_te = headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        let keep = (upgrade && *name == "upgrade") || (keep_te && *name == "te");
        if !keep {
            headers.remove(*name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
                                         // 8-4-4-4-12 hex digits, written directly (this runs on every request).
    let mut out = [b'-'; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xf)];
        at += 2;
    }
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}

/// The client end of a downstream connection, worked out once per connection.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    /// The client's IP as a header value, for `x-forwarded-for`.
    pub ip_header: HeaderValue,
    /// `http`, or `https` on a TLS listener.
    pub scheme: &'static str,
    /// The verified client certificate's identity (mTLS).
    pub peer: Option<Arc<Peer>>,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Client {
        let ip_header = HeaderValue::from_str(&addr.ip().to_string())
            .expect("an IP address is a valid header value");
        Client {
            addr,
            ip_header,
            scheme: "http",
            peer: None,
        }
    }

    /// The same client, over TLS, with the identity its certificate proved, if any.
    pub fn over_tls(mut self, peer: Option<Arc<Peer>>) -> Client {
        self.scheme = "https";
        self.peer = peer;
        self
    }

    /// The principal of the client's certificate.
    pub fn principal(&self) -> Option<&str> {
        self.peer.as_ref().and_then(|p| p.principal.as_deref())
    }
}

/// The header carrying the client's verified certificate upstream (Envoy's).
pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// What the upstream request needs from the downstream side.
pub struct Downstream<'a> {
    pub client: &'a Client,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The request's authority (Host or `:authority`).
    pub authority: &'a str,
    pub upgrade: bool,
}

/// Turns the client's request into the one sent upstream. An upgrade the route does not
/// allow (`down.upgrade` false) loses its `Upgrade` and `Connection` headers and goes as a
/// plain request. A request whose rewritten target is not a valid URI is a 400, never sent
/// somewhere else.
pub fn upstream_request(
    mut parts: request::Parts,
    body: Body,
    route: &Route,
    down: &Downstream<'_>,
    protocol: UpstreamProtocol,
    tls: bool,
) -> Result<Request<Body>, ProxyError> {
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers, down.upgrade);
    // Only remora vouches for a client certificate: a client-sent XFCC never passes.
    headers.remove(&X_FORWARDED_CLIENT_CERT);
    if let Some(xfcc) = down.client.peer.as_ref().and_then(|p| p.xfcc.clone()) {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), xfcc);
    }

    let xff = match headers.get(&X_FORWARDED_FOR) {
        Some(prev) if !prev.is_empty() => {
            let ip = down.client.ip_header.as_bytes();
            let mut joined = Vec::with_capacity(prev.len() + 2 + ip.len());
            joined.extend_from_slice(prev.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip);
            HeaderValue::from_bytes(&joined).ok()
        }
        _ => Some(down.client.ip_header.clone()),
    };
    if let Some(v) = xff {
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
    let rewritten = match (&route.prefix_rewrite, &route.path) {
        (Some(new_prefix), PathMatch::Prefix(old)) if path_and_query.starts_with(old.as_str()) => {
            Some(format!("{new_prefix}{}", &path_and_query[old.len()..]))
        }
        _ => None,
    };
    let path_and_query = rewritten.as_deref().unwrap_or(path_and_query);
    let authority = route
        .host_rewrite
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .unwrap_or(down.authority);

    match protocol {
        // An `auto` request goes as HTTP/1.1 and is rewritten once an endpoint chose h2.
        UpstreamProtocol::Http1 | UpstreamProtocol::Auto => {
            if parts.version == Version::HTTP_2 {
                join_cookies(&mut parts.headers);
            }
            parts.version = Version::HTTP_11;
            // Most requests arrive in origin form with a Host header and no rewrite: then the
            // head goes upstream as it came, without rebuilding the URI or Host. (An
            // absolute-form URI's authority overrides Host, RFC 9112 §3.2.2.)
            let origin_form = parts.uri.authority().is_none();
            if rewritten.is_some() || !origin_form {
                parts.uri = Uri::try_from(path_and_query)
                    .map_err(|_| ProxyError::BadRequest("the rewritten path is not a valid URI"))?;
            }
            let host_as_sent = route.host_rewrite.is_none()
                && origin_form
                && parts.headers.contains_key(header::HOST);
            if !host_as_sent {
                if let Ok(host) = HeaderValue::from_str(authority) {
                    parts.headers.insert(header::HOST, host);
                }
            }
        }
        UpstreamProtocol::Http2 => {
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
            parts.uri = Uri::builder()
                .scheme(if tls { "https" } else { "http" })
                .authority(authority)
                .path_and_query(path_and_query)
                .build()
                .map_err(|_| ProxyError::BadRequest("no valid upstream URI for this request"))?;
        }
    }
    Ok(Request::from_parts(parts, body))
}

/// HTTP/2 clients may split `cookie` into several fields; HTTP/1.1 allows one, so they are
/// joined with `"; "` (RFC 9113 §8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for v in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
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
        assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(
            s.char_indices()
                .filter(|&(_, c)| c == '-')
                .map(|(i, _)| i)
                .collect::<Vec<_>>(),
            [8, 13, 18, 23]
        );
        assert!(s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
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
