//! The one body type that flows through the proxy, and small constructors for it.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Errors carried by bodies: whatever the peer's transport produced.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body, boxed so requests and responses from any source look alike.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Wraps a body read from a hyper connection.
pub fn incoming(body: hyper::body::Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()
}
