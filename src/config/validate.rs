//! Semantic checks on a schema-valid config: names, references, addresses, regexes, weights.
//! Collects every problem; compile may assume a config that passed here.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Method};

use super::did_you_mean;
use super::locate::Seg;
use super::raw::*;
use crate::router::full_match_regex;

/// One semantic problem, located by field path.
pub struct Problem {
    pub path: Vec<Seg>,
    pub message: String,
    pub did_you_mean: Option<String>,
}

/// Builds field paths without noise: `p!["clusters", 2, "name"]`.
macro_rules! p {
    ($($seg:expr),* $(,)?) => { vec![$(Seg::from($seg)),*] };
}

impl From<&str> for Seg {
    fn from(k: &str) -> Seg {
        Seg::Key(k.to_string())
    }
}
impl From<usize> for Seg {
    fn from(i: usize) -> Seg {
        Seg::Index(i)
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: Vec<Seg>, message: impl Into<String>) {
        self.0.push(Problem {
            path,
            message: message.into(),
            did_you_mean: None,
        });
    }
    fn unknown<'a>(
        &mut self,
        path: Vec<Seg>,
        what: &str,
        name: &str,
        known: impl Iterator<Item = &'a str>,
    ) {
        self.0.push(Problem {
            path,
            message: format!("unknown {what} `{name}`"),
            did_you_mean: did_you_mean(name, known),
        });
    }
}

/// Whether validation loads the TLS files a config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFiles {
    /// Load them (a sidecar: a config that validates has loadable TLS).
    Load,
    /// Only check that they are named (the control plane: the files live on the sidecars,
    /// and each sidecar refuses, NACKs, what it cannot load).
    NameOnly,
}

/// Every problem in `raw`, in file order. Route configs from index `dynamic_from` on came
/// from the control plane: they may name clusters it has not delivered yet (503
/// `cluster_not_found` until it does, as in Envoy); the file's own must name known ones
/// (Envoy's `validate_clusters`, on for static route configs).
/// `files` says whether the TLS files it names are loaded.
pub fn validate(raw: &RawConfig, dynamic_from: usize, files: TlsFiles) -> Vec<Problem> {
    let mut out = Problems::default();
    if let Some(admin) = &raw.admin {
        if socket_addr(&admin.address).is_none() {
            out.add(p!["admin", "address"], bad_socket(&admin.address));
        }
    }
    if let Some(x) = &raw.xds {
        match (&x.address, &x.cluster) {
            (Some(address), None) => {
                let ok = address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
                if !ok {
                    out.add(
                        p!["xds", "address"],
                        format!("`{address}` is not a `host:port` address"),
                    );
                }
            }
            (None, Some(name)) => {
                let found = raw.clusters.iter().find(|c| &c.name == name);
                if found.is_none_or(|c| c.endpoints.is_empty()) {
                    out.unknown(
                        p!["xds", "cluster"],
                        "static cluster with an endpoint",
                        name,
                        raw.clusters.iter().map(|c| c.name.as_str()),
                    );
                }
            }
            _ => out.add(
                p!["xds"],
                "needs exactly one of `address` and `cluster` (a static cluster)",
            ),
        }
    }
    if let Some(w) = raw.workers {
        if !(1..=1024).contains(&w) {
            out.add(p!["workers"], "must be between 1 and 1024");
        }
    }
    let route_names = unique_names(
        &mut out,
        "route_configs",
        raw.route_configs.iter().map(|r| r.name.as_str()),
    );
    let cluster_names = unique_names(
        &mut out,
        "clusters",
        raw.clusters.iter().map(|c| c.name.as_str()),
    );
    unique_names(
        &mut out,
        "listeners",
        raw.listeners.iter().map(|l| l.name.as_str()),
    );
    check_listeners(&mut out, raw, &route_names, files);
    for (i, rc) in raw.route_configs.iter().enumerate() {
        // With a control plane, a route may name a cluster that has not come yet: it answers
        // 503 `cluster_not_found` until the cluster exists, as in Envoy.
        let known = (raw.xds.is_none() || i < dynamic_from).then_some(&cluster_names);
        check_route_config(&mut out, i, rc, known);
    }
    for (i, c) in raw.clusters.iter().enumerate() {
        check_cluster(&mut out, i, c, files);
    }
    out.0
}

/// Whether binding both addresses must fail: the same port (not 0, which picks a free one)
/// on the same IP, on a wildcard and any IP of its family, or on `[::]` and any IPv4 one
/// (a dual-stack socket); an IPv4-mapped IPv6 address is its IPv4 address.
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    use std::net::IpAddr;
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (plain(a.ip()), plain(b.ip())) {
        (x, y) if x == y => true,
        (IpAddr::V4(x), IpAddr::V4(y)) => x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V6(y)) => x.is_unspecified() || y.is_unspecified(),
        (IpAddr::V6(x), IpAddr::V4(_)) | (IpAddr::V4(_), IpAddr::V6(x)) => x.is_unspecified(),
    }
}

/// An `ip:port` address whose port is written plainly (`8080`, not `08080`: the same socket,
/// but a second spelling of it that other parsers may read differently).
fn socket_addr(address: &str) -> Option<SocketAddr> {
    let (_, port) = address.rsplit_once(':')?;
    if !canonical_port(port) {
        return None;
    }
    address.parse().ok()
}

/// A port in plain decimal: digits, no leading zero (but `0` itself), at most 65535.
fn canonical_port(port: &str) -> bool {
    port.parse::<u16>().is_ok_and(|p| p.to_string() == port)
}

/// A host `strict_dns` can resolve: a DNS name (letters, digits, `-`, `_`, dots between
/// non-empty labels), an IPv4 address, or an IPv6 one in brackets.
fn is_dns_host(host: &str) -> bool {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // A zone id (`fe80::1%2`) is allowed, as for static endpoints.
        return format!("[{v6}]:0")
            .parse::<std::net::SocketAddrV6>()
            .is_ok();
    }
    // A fully qualified name may end in a dot.
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn bad_socket(addr: &str) -> String {
    format!("`{addr}` is not an `ip:port` address (e.g. `127.0.0.1:8080` or `[::1]:8080`)")
}

/// Reports empty and duplicate names; returns the set of names.
fn unique_names<'a>(
    out: &mut Problems,
    list: &str,
    names: impl Iterator<Item = &'a str>,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for (i, name) in names.enumerate() {
        if name.is_empty() {
            out.add(p![list, i, "name"], "name must not be empty");
        } else if !seen.insert(name) {
            out.add(p![list, i, "name"], format!("duplicate name `{name}`"));
        }
    }
    seen
}

fn check_listeners(
    out: &mut Problems,
    raw: &RawConfig,
    route_names: &HashSet<&str>,
    files: TlsFiles,
) {
    if raw.listeners.is_empty() && raw.xds.is_none() {
        // An empty or truncated file must not reload into a sidecar that listens nowhere.
        out.add(
            p!["listeners"],
            "at least one listener is required (an empty config would stop all traffic), unless `xds` brings them",
        );
    }
    // Every address that will be bound, the admin server's first: two that overlap cannot
    // both be bound, and `run` would fail where `validate` passed.
    let admin = raw
        .admin
        .as_ref()
        .map_or(DEFAULT_ADMIN_ADDRESS, |a| a.address.as_str())
        .parse::<SocketAddr>()
        .ok();
    let mut bound: Vec<(SocketAddr, String)> = admin
        .map(|a| (a, "the admin server".to_string()))
        .into_iter()
        .collect();
    for (i, l) in raw.listeners.iter().enumerate() {
        match socket_addr(&l.address) {
            None => out.add(p!["listeners", i, "address"], bad_socket(&l.address)),
            Some(addr) => {
                if let Some((other, owner)) = bound.iter().find(|(b, _)| overlaps(*b, addr)) {
                    out.add(
                        p!["listeners", i, "address"],
                        format!("address {addr} overlaps {other}, used by {owner}: both cannot be bound"),
                    );
                }
                bound.push((addr, format!("listener `{}`", l.name)));
            }
        }
        if !route_names.contains(l.route_config.as_str()) {
            out.unknown(
                p!["listeners", i, "route_config"],
                "route config",
                &l.route_config,
                route_names.iter().copied(),
            );
        }
        if let Some(n) = l.max_request_headers_bytes {
            if !(1024..=1024 * 1024).contains(&n) {
                out.add(
                    p!["listeners", i, "max_request_headers_bytes"],
                    "must be between 1024 and 1048576",
                );
            }
        }
        if let Some(n) = l.max_request_headers_count {
            if !(1..=10_000).contains(&n) {
                out.add(
                    p!["listeners", i, "max_request_headers_count"],
                    "must be between 1 and 10000",
                );
            }
        }
        if l.max_connections
            .is_some_and(|n| !(1..=MAX_CONNECTIONS_BOUND).contains(&n))
        {
            out.add(
                p!["listeners", i, "max_connections"],
                format!("must be between 1 and {MAX_CONNECTIONS_BOUND}"),
            );
        }
        if let Some(tls) = &l.tls {
            // `validate` reads the files, so a config that validates has loadable TLS.
            let loaded = match files {
                TlsFiles::Load => crate::tls::server_config(&tls.files()).map(drop),
                TlsFiles::NameOnly => Ok(()),
            };
            if let Err(e) = loaded {
                out.add(p!["listeners", i, "tls"], e.to_string());
            }
            if tls.alpn.as_ref().is_some_and(|a| a.is_empty()) {
                out.add(
                    p!["listeners", i, "tls", "alpn"],
                    "must name at least one protocol (leave it out for the default)",
                );
            }
        }
        if let Some(log) = &l.access_log {
            if log.path.is_empty() {
                out.add(
                    p!["listeners", i, "access_log", "path"],
                    "must not be empty",
                );
            }
        }
    }
}

fn check_route_config(
    out: &mut Problems,
    i: usize,
    rc: &RawRouteConfig,
    clusters: Option<&HashSet<&str>>,
) {
    let mut domains: HashMap<String, &str> = HashMap::new();
    let mut vhost_names = HashSet::new();
    for (v, vh) in rc.virtual_hosts.iter().enumerate() {
        let at = |rest: Vec<Seg>| {
            let mut path = p!["route_configs", i, "virtual_hosts", v];
            path.extend(rest);
            path
        };
        if !vhost_names.insert(vh.name.as_str()) {
            out.add(
                at(p!["name"]),
                format!("duplicate virtual host name `{}`", vh.name),
            );
        }
        if vh.domains.is_empty() {
            out.add(
                at(p!["domains"]),
                "needs at least one domain (`*` matches any)",
            );
        }
        for (d, domain) in vh.domains.iter().enumerate() {
            let lower = domain.to_ascii_lowercase();
            if let Some(msg) = domain_problem(&lower) {
                out.add(at(p!["domains", d]), msg);
            } else if let Some(other) = domains.insert(lower, &vh.name) {
                out.add(
                    at(p!["domains", d]),
                    format!("domain `{domain}` is already served by virtual host `{other}`"),
                );
            }
        }
        for (r, route) in vh.routes.iter().enumerate() {
            check_route(out, &at(p!["routes", r]), route, clusters);
        }
        if let Some(policy) = &vh.retry_policy {
            check_retry_policy(out, &at(p!["retry_policy"]), policy);
        }
    }
}

/// One line for a regex error (the regex crate's own message spans several lines).
fn regex_problem(pattern: &str, e: &regex::Error) -> String {
    let text = e.to_string();
    let why = text
        .lines()
        .last()
        .unwrap_or_default()
        .trim_start_matches("error: ");
    format!("invalid regex `{pattern}`: {why}")
}

fn domain_problem(domain: &str) -> Option<String> {
    if domain.is_empty() {
        return Some("domain must not be empty".into());
    }
    if domain == "*" {
        return None;
    }
    let inner = domain.trim_start_matches('*').trim_end_matches('*');
    if inner.contains('*') || (domain.starts_with('*') && domain.ends_with('*')) {
        return Some(format!(
            "domain `{domain}`: `*` may only stand alone, at the start (`*.example.com`) or at the end (`example.*`)"
        ));
    }
    None
}

fn check_route(out: &mut Problems, at: &[Seg], route: &RawRoute, clusters: Option<&HashSet<&str>>) {
    let path = |rest: Vec<Seg>| {
        let mut p = at.to_vec();
        p.extend(rest);
        p
    };
    let m = &route.route_match;
    let kinds = [m.prefix.is_some(), m.path.is_some(), m.regex.is_some()];
    if kinds.iter().filter(|k| **k).count() != 1 {
        out.add(
            path(p!["match"]),
            "needs exactly one of `prefix`, `path` or `regex`",
        );
    }
    for (name, value) in [("prefix", &m.prefix), ("path", &m.path)] {
        if let Some(v) = value {
            if !v.starts_with('/') {
                out.add(
                    path(p!["match", name]),
                    format!("`{v}` must start with `/`"),
                );
            }
        }
    }
    if let Some(re) = &m.regex {
        if let Err(e) = full_match_regex(re) {
            out.add(path(p!["match", "regex"]), regex_problem(re, &e));
        }
    }
    for (k, method) in m.methods.iter().flatten().enumerate() {
        if Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
            out.add(
                path(p!["match", "methods", k]),
                format!("`{method}` is not an HTTP method"),
            );
        }
    }
    for (h, hm) in m.headers.iter().enumerate() {
        let at = |rest: Vec<Seg>| {
            let mut p = path(p!["match", "headers", h]);
            p.extend(rest);
            p
        };
        if HeaderName::from_bytes(hm.name.as_bytes()).is_err() {
            out.add(
                at(p!["name"]),
                format!("`{}` is not a valid header name", hm.name),
            );
        }
        let given = [
            hm.exact.is_some(),
            hm.prefix.is_some(),
            hm.suffix.is_some(),
            hm.contains.is_some(),
            hm.regex.is_some(),
            hm.present.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            out.add(
                at(vec![]),
                "give at most one of `exact`, `prefix`, `suffix`, `contains`, `regex`, `present`",
            );
        }
        if let Some(re) = &hm.regex {
            if let Err(e) = full_match_regex(re) {
                // The pattern a credential must match is as secret as the credential.
                let shown = if super::shown::is_sensitive_header(&hm.name) {
                    super::shown::REDACTED
                } else {
                    re
                };
                out.add(at(p!["regex"]), regex_problem(shown, &e));
            }
        }
    }

    let actions = [
        route.cluster.is_some(),
        route.weighted_clusters.is_some(),
        route.direct_response.is_some(),
    ];
    if actions.iter().filter(|a| **a).count() != 1 {
        out.add(
            at.to_vec(),
            "needs exactly one action: `cluster`, `weighted_clusters` or `direct_response`",
        );
    }
    if let (Some(c), Some(clusters)) = (&route.cluster, clusters) {
        if !clusters.contains(c.as_str()) {
            out.unknown(path(p!["cluster"]), "cluster", c, clusters.iter().copied());
        }
    }
    if let Some(split) = &route.weighted_clusters {
        if split.is_empty() {
            out.add(path(p!["weighted_clusters"]), "needs at least one cluster");
        } else if split.iter().map(|w| u64::from(w.weight)).sum::<u64>() == 0 {
            out.add(
                path(p!["weighted_clusters"]),
                "weights sum to 0; at least one must be positive",
            );
        }
        for (k, w) in split.iter().enumerate() {
            if let Some(clusters) = clusters.filter(|c| !c.contains(w.name.as_str())) {
                out.unknown(
                    path(p!["weighted_clusters", k, "name"]),
                    "cluster",
                    &w.name,
                    clusters.iter().copied(),
                );
            }
            if w.weight > 1_000_000 {
                out.add(
                    path(p!["weighted_clusters", k, "weight"]),
                    "must be at most 1000000",
                );
            }
        }
    }
    if let Some(d) = &route.direct_response {
        if !(200..=599).contains(&d.status) {
            out.add(
                path(p!["direct_response", "status"]),
                "must be between 200 and 599",
            );
        }
    }
    if let Some(policy) = &route.retry_policy {
        check_retry_policy(out, &path(p!["retry_policy"]), policy);
    }
    if route.prefix_rewrite.is_some() && m.prefix.is_none() {
        out.add(
            path(p!["prefix_rewrite"]),
            "only applies to routes that match on `prefix`",
        );
    }
    if let Some(rewrite) = &route.prefix_rewrite {
        // What replaces the prefix starts the upstream path: it must be a path itself.
        let valid = rewrite.starts_with('/')
            && http::uri::PathAndQuery::try_from(rewrite.as_str()).is_ok()
            && !rewrite.contains(['?', '#']);
        if !valid {
            out.add(
                path(p!["prefix_rewrite"]),
                format!("`{rewrite}` is not a path: it must start with `/` (e.g. `/` or `/v2/`) and hold no `?` or `#`"),
            );
        }
    }
    for (j, u) in route.upgrade_configs.iter().enumerate() {
        let at = path(p!["upgrade_configs", j, "upgrade_type"]);
        if u.upgrade_type.is_empty() || u.upgrade_type.contains([' ', ',', '/']) {
            out.add(at, "must be one protocol name, e.g. `websocket`");
        } else if u.upgrade_type.eq_ignore_ascii_case("h2c") && u.enabled {
            out.add(
                at,
                "h2c upgrades are never tunnelled (they would bypass routing); clients should use h2c with prior knowledge",
            );
        }
    }
    if let Some(host) = &route.host_rewrite {
        if host.is_empty() || HeaderValue::from_str(host).is_err() || host.contains(['/', ' ']) {
            out.add(
                path(p!["host_rewrite"]),
                format!("`{host}` is not a valid authority"),
            );
        }
    }
    for list in ["request_headers_to_add", "response_headers_to_add"] {
        let items = if list == "request_headers_to_add" {
            &route.request_headers_to_add
        } else {
            &route.response_headers_to_add
        };
        for (k, h) in items.iter().enumerate() {
            if HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                out.add(
                    path(p![list, k, "name"]),
                    format!("`{}` is not a valid header name", h.name),
                );
            }
            if HeaderValue::from_str(&h.value).is_err() {
                out.add(path(p![list, k, "value"]), "not a valid header value");
            }
        }
    }
    for list in ["request_headers_to_remove", "response_headers_to_remove"] {
        let items = if list == "request_headers_to_remove" {
            &route.request_headers_to_remove
        } else {
            &route.response_headers_to_remove
        };
        for (k, name) in items.iter().enumerate() {
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                out.add(
                    path(p![list, k]),
                    format!("`{name}` is not a valid header name"),
                );
            }
        }
    }
}

fn check_retry_policy(out: &mut Problems, at: &[Seg], r: &RawRetryPolicy) {
    let path = |rest: Vec<Seg>| {
        let mut p = at.to_vec();
        p.extend(rest);
        p
    };
    if r.retry_on.is_empty() {
        out.add(
            path(p!["retry_on"]),
            "name at least one condition, e.g. `[5xx]`",
        );
    }
    for (k, c) in r.retry_on.iter().enumerate() {
        if !crate::retry::condition_names().any(|n| n == c) {
            out.unknown(
                path(p!["retry_on", k]),
                "retry condition",
                c,
                crate::retry::condition_names(),
            );
        }
    }
    if r.num_retries.is_some_and(|n| n > 10) {
        out.add(path(p!["num_retries"]), "must be at most 10");
    }
    for (k, code) in r.retriable_status_codes.iter().enumerate() {
        if !(100..=599).contains(code) {
            out.add(
                path(p!["retriable_status_codes", k]),
                "must be between 100 and 599",
            );
        }
    }
    if let Some(b) = &r.backoff {
        if b.base_interval.is_some_and(|d| d.0.is_zero()) {
            out.add(
                path(p!["backoff", "base_interval"]),
                "must be greater than 0",
            );
        }
        if let (Some(base), Some(max)) = (b.base_interval, b.max_interval) {
            if max.0 < base.0 {
                out.add(
                    path(p!["backoff", "max_interval"]),
                    "must not be less than base_interval",
                );
            }
        }
    }
    if r.replay_buffer_bytes.is_some_and(|n| n > 64 * 1024 * 1024) {
        out.add(
            path(p!["replay_buffer_bytes"]),
            "must be at most 67108864 (64 MiB)",
        );
    }
}

/// The largest connection or request limit accepted: far above what one process can hold
/// open, and small enough that no count near it can overflow.
const MAX_CONNECTIONS_BOUND: usize = 10_000_000;

fn check_resilience(out: &mut Problems, i: usize, c: &RawCluster) {
    if let Some(cb) = &c.circuit_breakers {
        for (field, v, least) in [
            ("max_connections", cb.max_connections, 1),
            ("max_pending_requests", cb.max_pending_requests, 1),
            ("max_requests", cb.max_requests, 1),
            ("max_retries", cb.max_retries, 0),
        ] {
            if v.is_some_and(|n| !(least..=MAX_CONNECTIONS_BOUND).contains(&n)) {
                out.add(
                    p!["clusters", i, "circuit_breakers", field],
                    format!("must be between {least} and {MAX_CONNECTIONS_BOUND}"),
                );
            }
        }
    }
    if let Some(b) = &c.retry_budget {
        if b.ratio.is_some_and(|r| !(0.0..=10.0).contains(&r)) {
            out.add(
                p!["clusters", i, "retry_budget", "ratio"],
                "must be between 0 and 10",
            );
        }
        if b.window
            .is_some_and(|w| w.0.as_secs() < 1 || w.0.as_secs() > 300)
        {
            out.add(
                p!["clusters", i, "retry_budget", "window"],
                "must be between 1s and 300s",
            );
        }
    }
    if let Some(o) = &c.outlier_detection {
        for (field, v) in [
            ("consecutive_5xx", o.consecutive_5xx),
            ("consecutive_gateway_failure", o.consecutive_gateway_failure),
            (
                "consecutive_local_origin_failure",
                o.consecutive_local_origin_failure,
            ),
            ("half_open_probes", o.half_open_probes),
        ] {
            if v == Some(0) {
                out.add(
                    p!["clusters", i, "outlier_detection", field],
                    "must be at least 1",
                );
            }
        }
        if o.max_ejection_percent.is_some_and(|p| p > 100) {
            out.add(
                p!["clusters", i, "outlier_detection", "max_ejection_percent"],
                "must be at most 100",
            );
        }
        if o.base_ejection_time.is_some_and(|d| d.0.is_zero()) {
            out.add(
                p!["clusters", i, "outlier_detection", "base_ejection_time"],
                "must be greater than 0",
            );
        }
    }
    if let Some(h) = &c.health_check {
        let at = |f: &str| p!["clusters", i, "health_check", f];
        if h.protocol == HealthCheckProtocol::Tcp
            && (h.path.is_some() || h.host.is_some() || !h.expected_statuses.is_empty())
        {
            out.add(
                at("protocol"),
                "`path`, `host` and `expected_statuses` only apply to `http` checks",
            );
        }
        if h.path.as_ref().is_some_and(|p| !p.starts_with('/')) {
            out.add(at("path"), "must start with `/`");
        }
        for (field, d) in [("interval", h.interval), ("timeout", h.timeout)] {
            if d.is_some_and(|d| d.0.is_zero()) {
                out.add(at(field), "must be greater than 0");
            }
        }
        for (field, v) in [
            ("unhealthy_threshold", h.unhealthy_threshold),
            ("healthy_threshold", h.healthy_threshold),
        ] {
            if v == Some(0) {
                out.add(at(field), "must be at least 1");
            }
        }
    }
    if c.panic_threshold.is_some_and(|p| p > 100) {
        out.add(
            p!["clusters", i, "panic_threshold"],
            "must be between 0 and 100",
        );
    }
}

fn check_cluster(out: &mut Problems, i: usize, c: &RawCluster, files: TlsFiles) {
    check_resilience(out, i, c);
    if c.max_response_headers_bytes
        .is_some_and(|n| !(8192..=1 << 20).contains(&n))
    {
        out.add(
            p!["clusters", i, "max_response_headers_bytes"],
            "must be between 8192 and 1048576",
        );
    }
    if c.protocol == UpstreamProtocol::Auto && c.tls.is_none() {
        out.add(
            p!["clusters", i, "protocol"],
            "`auto` chooses by TLS ALPN: it needs `tls` (plain clusters say http1 or http2)",
        );
    }
    if let Some(tls) = &c.tls {
        if tls.ca_file.is_none() {
            out.add(
                p!["clusters", i, "tls", "ca_file"],
                "is required: the CA that signs the endpoints' certificates",
            );
        } else if tls.cert_file.is_some() != tls.key_file.is_some() {
            out.add(
                p!["clusters", i, "tls"],
                "`cert_file` and `key_file` go together",
            );
        } else if files == TlsFiles::NameOnly {
            // The files are the sidecars'.
        } else if let Err(e) = crate::tls::client_config(&tls.files(), &[b"http/1.1"]) {
            out.add(p!["clusters", i, "tls"], e.to_string());
        }
        // The server name (`sni`, else the first endpoint's host) must be one rustls can
        // send and check; an EDS cluster without endpoints yet has none to check.
        let name = c.tls_server_name();
        let named = tls.sni.is_some() || !c.endpoints.is_empty();
        if named && rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
            let at = if tls.sni.is_some() {
                p!["clusters", i, "tls", "sni"]
            } else {
                p!["clusters", i, "endpoints", 0, "address"]
            };
            out.add(
                at,
                format!("`{name}` is not a valid TLS server name (a DNS name or an IP)"),
            );
        }
    }
    // An EDS cluster may have no endpoint yet (its assignment can be empty): it answers 503.
    if c.endpoints.is_empty() && c.discovery != DiscoveryType::Eds {
        out.add(
            p!["clusters", i, "endpoints"],
            "needs at least one endpoint",
        );
    }
    let mut seen = HashSet::new();
    for (e, ep) in c.endpoints.iter().enumerate() {
        let at = p!["clusters", i, "endpoints", e, "address"];
        match c.discovery {
            DiscoveryType::Static | DiscoveryType::Eds => {
                if socket_addr(&ep.address).is_none() {
                    out.add(at.clone(), bad_socket(&ep.address));
                }
            }
            DiscoveryType::StrictDns => {
                let ok = ep
                    .address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| is_dns_host(host) && canonical_port(port));
                if !ok {
                    out.add(
                        at.clone(),
                        format!("`{}` is not a `host:port` address", ep.address),
                    );
                }
            }
        }
        if !seen.insert(ep.address.as_str()) {
            out.add(at, format!("duplicate endpoint `{}`", ep.address));
        }
        if let Some(w) = ep.weight {
            if !(1..=10_000).contains(&w) {
                out.add(
                    p!["clusters", i, "endpoints", e, "weight"],
                    "must be between 1 and 10000",
                );
            }
        }
    }
    if c.hash_on.is_some() && c.lb_policy != LbPolicy::RingHash {
        out.add(
            p!["clusters", i, "hash_on"],
            "only applies with `lb_policy: ring_hash`",
        );
    }
    if let Some(HashOn { header: Some(h) }) = &c.hash_on {
        if HeaderName::from_bytes(h.as_bytes()).is_err() {
            out.add(
                p!["clusters", i, "hash_on", "header"],
                format!("`{h}` is not a valid header name"),
            );
        }
    }
    if c.dns_refresh_rate.is_some() && c.discovery != DiscoveryType::StrictDns {
        out.add(
            p!["clusters", i, "dns_refresh_rate"],
            "only applies with `type: strict_dns`",
        );
    }
    for (field, value) in [
        ("connect_timeout", c.connect_timeout),
        ("dns_refresh_rate", c.dns_refresh_rate),
    ] {
        if value.is_some_and(|d| d.0.is_zero()) {
            out.add(p!["clusters", i, field], "must be greater than 0");
        }
    }
}
