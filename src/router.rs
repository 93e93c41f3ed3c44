//! Route matching: virtual host by authority, then the first route whose match holds.
//! Pure and allocation-free in the common case; everything is compiled ahead of time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;

use crate::cluster::balance::Schedule;
use crate::cluster::Cluster;
use crate::retry::RetryPolicy;

/// The compiled form of one route config.
pub struct RouteTable {
    pub name: Arc<str>,
    /// Shared with the next version's table where a virtual host did not change.
    vhosts: Vec<Arc<VirtualHost>>,
    exact: HashMap<String, usize>,
    /// `*.example.com` stored as `.example.com`, longest first.
    suffixes: Vec<(String, usize)>,
    /// `orders.*` stored as `orders.`, longest first.
    prefixes: Vec<(String, usize)>,
    any: Option<usize>,
}

pub struct VirtualHost {
    pub name: Arc<str>,
    /// As configured (the route table keeps them lowercased in its maps).
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
    /// The key of the config it was compiled from, to tell an unchanged one on reload: the
    /// hash of its text when read from text, else a digest of its parsed config.
    pub source: u64,
}

impl VirtualHost {
    /// Every cluster reference would resolve as it did: to the same cluster where it named a
    /// known one, to none where it named a missing one. `known` is the new cluster set.
    pub fn resolves_as_before(&self, known: impl Fn(&str) -> Option<Arc<Cluster>>) -> bool {
        let same = |r: &ClusterRef| match r {
            ClusterRef::Known(c) => known(&c.name).is_some_and(|n| Arc::ptr_eq(&n, c)),
            ClusterRef::Missing(name) => known(name).is_none(),
        };
        self.routes.iter().all(|r| match &r.action {
            Action::Cluster(c) => same(c),
            Action::Weighted(w) => w.clusters.iter().all(same),
            Action::Direct { .. } => true,
        })
    }
}

pub struct Route {
    /// The route's name, or `<virtual host>/<index>`.
    pub name: Arc<str>,
    pub path: PathMatch,
    /// Empty: any method.
    pub methods: Vec<Method>,
    pub headers: Vec<HeaderMatcher>,
    pub action: Action,
    pub prefix_rewrite: Option<String>,
    /// Boxed, as most routes have none (a big mesh has tens of thousands of routes).
    pub host_rewrite: Option<Box<HeaderValue>>,
    pub request_headers_to_add: Vec<HeaderOp>,
    pub request_headers_to_remove: Vec<HeaderName>,
    pub response_headers_to_add: Vec<HeaderOp>,
    pub response_headers_to_remove: Vec<HeaderName>,
    /// `None`: no timeout.
    pub timeout: Option<Duration>,
    /// The route's, else its virtual host's (shared by the routes that inherit it).
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// Upgrade protocols (lowercase) this route enables or disables; `websocket` is enabled
    /// unless listed as disabled, every other protocol only when listed as enabled.
    pub upgrades: Vec<(String, bool)>,
    /// The principals admitted (the route's, else its virtual host's); `None`: anyone.
    pub principals: Option<Arc<[String]>>,
}

impl Route {
    /// Whether an upgrade to `protocol` is tunnelled on this route.
    pub fn allows_upgrade(&self, protocol: &str) -> bool {
        if protocol.eq_ignore_ascii_case("h2c") {
            // Upgrading to h2c would hand the client a raw HTTP/2 pipe past routing.
            return false;
        }
        self.upgrades
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(protocol))
            .map_or(protocol.eq_ignore_ascii_case("websocket"), |(_, on)| *on)
    }
}

pub enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

pub struct HeaderMatcher {
    pub name: HeaderName,
    pub kind: HeaderMatch,
    pub invert: bool,
}

pub enum HeaderMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    Regex(Regex),
    Present(bool),
}

pub struct HeaderOp {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub append: bool,
}

pub enum Action {
    Cluster(ClusterRef),
    Weighted(WeightedClusters),
    Direct { status: StatusCode, body: Bytes },
}

/// A cluster a route names: known, or (with a control plane) not delivered yet.
pub enum ClusterRef {
    Known(Arc<Cluster>),
    /// Requests get 503 `cluster_not_found` until a reload brings the cluster.
    Missing(Arc<str>),
}

/// Clusters sharing a route's traffic by weight, in exact proportions per cycle.
pub struct WeightedClusters {
    pub clusters: Vec<ClusterRef>,
    pub schedule: Schedule,
}

impl Action {
    /// The cluster this request goes to (for a split, the next one in the cycle), or the
    /// name of a cluster that does not exist (yet). `None` for a direct response.
    pub fn pick_cluster(&self) -> Option<Result<&Arc<Cluster>, &Arc<str>>> {
        let r = match self {
            Action::Cluster(c) => c,
            Action::Weighted(w) => w.clusters.get(w.schedule.next())?,
            Action::Direct { .. } => return None,
        };
        Some(match r {
            ClusterRef::Known(c) => Ok(c),
            ClusterRef::Missing(name) => Err(name),
        })
    }
}

impl RouteTable {
    /// Builds the domain index. Domains were validated (no duplicates, `*` placement).
    pub fn new(name: &str, vhosts: Vec<(Arc<VirtualHost>, Vec<String>)>) -> RouteTable {
        let mut table = RouteTable {
            name: name.into(),
            vhosts: Vec::with_capacity(vhosts.len()),
            exact: HashMap::new(),
            suffixes: Vec::new(),
            prefixes: Vec::new(),
            any: None,
        };
        for (i, (vh, domains)) in vhosts.into_iter().enumerate() {
            for d in domains {
                let d = d.to_ascii_lowercase();
                if d == "*" {
                    table.any = Some(i);
                } else if let Some(suffix) = d.strip_prefix('*') {
                    table.suffixes.push((suffix.to_string(), i));
                } else if let Some(prefix) = d.strip_suffix('*') {
                    table.prefixes.push((prefix.to_string(), i));
                } else {
                    table.exact.insert(d, i);
                }
            }
            table.vhosts.push(vh);
        }
        table
            .suffixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table
            .prefixes
            .sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        table
    }

    /// The virtual hosts, in config order.
    pub fn virtual_hosts(&self) -> &[Arc<VirtualHost>] {
        &self.vhosts
    }

    /// The first route that matches, with its virtual host. `authority` may carry a port.
    pub fn find(
        &self,
        authority: &str,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<(&VirtualHost, &Route)> {
        let vh = &self.vhosts[self.virtual_host(authority)?];
        let route = vh
            .routes
            .iter()
            .find(|r| r.matches(method, path, headers))?;
        Some((vh, route))
    }

    fn virtual_host(&self, authority: &str) -> Option<usize> {
        let mut buf = [0u8; 256];
        let owned;
        let lower: &str = if authority.len() <= buf.len() {
            let buf = &mut buf[..authority.len()];
            buf.copy_from_slice(authority.as_bytes());
            buf.make_ascii_lowercase();
            std::str::from_utf8(buf).ok()?
        } else {
            owned = authority.to_ascii_lowercase();
            &owned
        };
        if let Some(i) = self.exact.get(lower) {
            return Some(*i);
        }
        let host = strip_port(lower);
        if host.len() != lower.len() {
            if let Some(i) = self.exact.get(host) {
                return Some(*i);
            }
        }
        for (suffix, i) in &self.suffixes {
            if host.len() > suffix.len() && host.ends_with(suffix.as_str()) {
                return Some(*i);
            }
        }
        for (prefix, i) in &self.prefixes {
            if host.len() > prefix.len() && host.starts_with(prefix.as_str()) {
                return Some(*i);
            }
        }
        self.any
    }
}

/// `host:port` → `host`; `[::1]:80` → `[::1]`; anything without a port is returned whole.
fn strip_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

impl Route {
    fn matches(&self, method: &Method, path: &str, headers: &HeaderMap) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(re) => re.is_match(path),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.contains(method))
            && self.headers.iter().all(|h| h.matches(headers))
    }
}

impl HeaderMatcher {
    /// Matches the raw bytes of the value, as Envoy does: a value with obs-text (bytes
    /// 0x80-0xFF, legal in HTTP) is matched as it is, never as an empty string.
    fn matches(&self, headers: &HeaderMap) -> bool {
        let mut values = headers.get_all(&self.name).iter();
        let result = match (&self.kind, values.next()) {
            (HeaderMatch::Present(want), first) => first.is_some() == *want,
            (_, None) => false,
            (kind, Some(first)) => {
                // Several values are matched as one, joined by commas (as Envoy does).
                let joined;
                let value: &[u8] = match values.next() {
                    None => first.as_bytes(),
                    Some(_) => {
                        joined = headers
                            .get_all(&self.name)
                            .iter()
                            .map(|v| v.as_bytes())
                            .collect::<Vec<_>>()
                            .join(&b","[..]);
                        &joined
                    }
                };
                match kind {
                    HeaderMatch::Exact(s) => value == s.as_bytes(),
                    HeaderMatch::Prefix(s) => value.starts_with(s.as_bytes()),
                    HeaderMatch::Suffix(s) => value.ends_with(s.as_bytes()),
                    HeaderMatch::Contains(s) => contains(value, s.as_bytes()),
                    // obs-text reads as U+FFFD, which `.` matches, rather than as nothing.
                    HeaderMatch::Regex(re) => re.is_match(&String::from_utf8_lossy(value)),
                    HeaderMatch::Present(_) => unreachable!("handled above"),
                }
            }
        };
        result != self.invert
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// Compiles a regex that must match the whole input, as Envoy's `safe_regex` does.
pub fn full_match_regex(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vh(name: &str) -> Arc<VirtualHost> {
        Arc::new(VirtualHost {
            name: name.into(),
            domains: Vec::new(),
            routes: vec![Route {
                name: name.into(),
                path: PathMatch::Prefix("/".into()),
                methods: vec![],
                headers: vec![],
                action: Action::Direct {
                    status: StatusCode::OK,
                    body: Bytes::new(),
                },
                prefix_rewrite: None,
                host_rewrite: None,
                request_headers_to_add: vec![],
                request_headers_to_remove: vec![],
                response_headers_to_add: vec![],
                response_headers_to_remove: vec![],
                timeout: None,
                retry_policy: None,
                upgrades: vec![],
                principals: None,
            }],
            source: 0,
        })
    }

    /// A big mesh holds tens of thousands of routes: what most routes do not use is boxed
    /// or shared, and this holds the inline size (it was 464 bytes).
    #[test]
    fn a_route_stays_small() {
        let size = std::mem::size_of::<Route>();
        eprintln!("Route: {size} bytes");
        assert!(size <= 360, "Route grew to {size} bytes");
    }

    #[test]
    fn domains_follow_envoy_precedence() {
        let t = RouteTable::new(
            "t",
            vec![
                (vh("exact"), vec!["orders.svc".into(), "admin:8080".into()]),
                (vh("suffix"), vec!["*.svc".into()]),
                (vh("longer-suffix"), vec!["*.orders.svc".into()]),
                (vh("prefix"), vec!["orders.*".into()]),
                (vh("any"), vec!["*".into()]),
            ],
        );
        let pick = |a: &str| {
            t.find(a, &Method::GET, "/", &HeaderMap::new())
                .map(|(v, _)| v.name.to_string())
                .unwrap()
        };
        assert_eq!(pick("orders.svc"), "exact");
        assert_eq!(pick("ORDERS.svc:80"), "exact");
        assert_eq!(pick("admin:8080"), "exact");
        assert_eq!(pick("admin:9090"), "any");
        assert_eq!(pick("users.svc"), "suffix");
        assert_eq!(pick("v1.orders.svc"), "longer-suffix");
        assert_eq!(pick("orders.example"), "prefix");
        assert_eq!(pick("[::1]:80"), "any");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn header_matchers_and_invert() {
        let mut h = HeaderMap::new();
        h.insert("x-canary", HeaderValue::from_static("1"));
        h.append("x-tags", HeaderValue::from_static("a"));
        h.append("x-tags", HeaderValue::from_static("b"));
        let m = |name: &str, kind, invert| HeaderMatcher {
            name: HeaderName::from_bytes(name.as_bytes()).unwrap(),
            kind,
            invert,
        };
        assert!(m("x-canary", HeaderMatch::Exact("1".into()), false).matches(&h));
        assert!(!m("x-canary", HeaderMatch::Exact("1".into()), true).matches(&h));
        assert!(m("x-tags", HeaderMatch::Exact("a,b".into()), false).matches(&h));
        assert!(m("x-none", HeaderMatch::Present(false), false).matches(&h));
        assert!(!m("x-none", HeaderMatch::Suffix("".into()), false).matches(&h));
        let re = full_match_regex("[0-9]").unwrap();
        assert!(m("x-canary", HeaderMatch::Regex(re), false).matches(&h));
        // obs-text is matched as the bytes it is, not as an empty value.
        h.insert("x-role", HeaderValue::from_bytes(b"admin\xe9").unwrap());
        assert!(m("x-role", HeaderMatch::Contains("admin".into()), false).matches(&h));
        assert!(m("x-role", HeaderMatch::Prefix("adm".into()), false).matches(&h));
        let re = full_match_regex("admin.*").unwrap();
        assert!(m("x-role", HeaderMatch::Regex(re), false).matches(&h));
        h.append("x-role", HeaderValue::from_static("user"));
        assert!(m("x-role", HeaderMatch::Suffix(",user".into()), false).matches(&h));
    }
}
