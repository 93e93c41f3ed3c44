//! The config as `/config` shows it: JSON, credentials redacted, unset fields left out;
//! read again from the config as written on each request, so the running snapshot keeps
//! neither the parsed route configs nor a rendering of them.

use serde_json::value::RawValue;

use super::raw::{RawHeaderMatcher, RawHeaderValue};
use super::{ConfigErrors, Written};

/// What a redacted header value reads as.
pub const REDACTED: &str = "[redacted]";

/// The config in force as compact JSON, with the values of credential-bearing headers
/// hidden wherever a header name comes with a value (headers to add, header matchers), as
/// Envoy's config dump hides secrets: `/config` is unauthenticated and may be reachable from
/// the pod network. Costs a parse of the config: call it off the request path.
pub fn render(written: &Written) -> Result<Box<RawValue>, ConfigErrors> {
    let mut raw = super::reread(written)?;
    for route in raw
        .route_configs
        .iter_mut()
        .flat_map(|rc| rc.virtual_hosts.iter_mut())
        .flat_map(|vh| vh.routes.iter_mut())
    {
        route
            .route_match
            .headers
            .iter_mut()
            .for_each(redact_matcher);
        route
            .request_headers_to_add
            .iter_mut()
            .for_each(redact_value);
        route
            .response_headers_to_add
            .iter_mut()
            .for_each(redact_value);
    }
    let text = serde_json::to_string(&raw).expect("config is JSON");
    Ok(RawValue::from_string(text).expect("serde_json wrote JSON"))
}

fn redact_matcher(m: &mut RawHeaderMatcher) {
    if is_sensitive_header(&m.name) {
        let values = [
            &mut m.exact,
            &mut m.prefix,
            &mut m.suffix,
            &mut m.contains,
            &mut m.regex,
        ];
        for v in values.into_iter().flatten() {
            *v = REDACTED.into();
        }
    }
}

fn redact_value(h: &mut RawHeaderValue) {
    if is_sensitive_header(&h.name) {
        h.value = REDACTED.into();
    }
}

/// Header names whose values are credentials.
pub(crate) fn is_sensitive_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "set-cookie"
    ) || [
        "token",
        "secret",
        "password",
        "key",
        "auth",
        "session",
        "jwt",
        "credential",
        "signature",
        "bearer",
    ]
    .iter()
    .any(|word| name.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names the README promises to redact (the list had drifted from the code).
    #[test]
    fn credential_header_names_are_sensitive() {
        for name in [
            "Authorization",
            "proxy-authorization",
            "cookie",
            "set-cookie",
            "x-api-key",
            "x-auth-token",
            "x-session-id",
            "x-jwt-assertion",
            "x-client-credential",
            "x-amz-signature",
            "x-bearer",
            "x-db-password",
            "x-secret",
        ] {
            assert!(is_sensitive_header(name), "{name}");
        }
        for name in ["x-tenant", "content-type", "x-request-id", "user-agent"] {
            assert!(!is_sensitive_header(name), "{name}");
        }
    }
}
