//! Turns a validated [`RawConfig`] into a runtime [`Snapshot`]: defaults applied, regexes and
//! domain maps built, cluster references resolved to `Arc`s.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode};

use super::raw::*;
use crate::cluster::balance::Schedule;
use crate::cluster::Cluster;
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::router::{
    full_match_regex, Action, ClusterRef, HeaderMatch, HeaderMatcher, HeaderOp, PathMatch, Route,
    RouteTable, VirtualHost, WeightedClusters,
};
use crate::snapshot::{ListenerSettings, Snapshot, DEFAULT_ADMIN_ADDRESS};

/// Default route `timeout`.
pub const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default listener limits.
pub const DEFAULT_MAX_REQUEST_HEADERS_BYTES: usize = 60 * 1024;
pub const DEFAULT_MAX_REQUEST_HEADERS_COUNT: usize = 100;
pub const DEFAULT_REQUEST_HEADERS_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Envoy's default `stream_idle_timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;

/// Where a config came from and which version it becomes.
pub struct Origin {
    pub version: u64,
    pub source: String,
    pub hash: String,
    /// The config as written, which `raw` was read from.
    pub written: super::Written,
}

/// Compiles `raw`, which must have passed validation. A cluster whose config is unchanged
/// from `previous` is carried over whole (pools, endpoints and all).
pub fn compile(
    mut raw: RawConfig,
    origin: Origin,
    metrics: &Metrics,
    previous: Option<&Snapshot>,
) -> Snapshot {
    let mut clusters = BTreeMap::new();
    for c in &raw.clusters {
        let old = previous.and_then(|p| p.clusters.get(&c.name));
        let cluster = match old {
            // Unchanged, TLS files included: kept whole.
            Some(old) if old.raw == *c && old.tls_digest == tls_digest(c) => old.clone(),
            // Changed: rebuilt, with the same series (counters go on, and removal finds every
            // series the cluster made under any of its versions).
            _ => {
                let series = old.map_or_else(|| metrics.cluster(&c.name), |o| o.metrics.clone());
                Cluster::new(c, series, old.map(|o| &**o))
            }
        };
        clusters.insert(c.name.clone(), cluster);
    }
    let route_tables: HashMap<String, Arc<RouteTable>> = raw
        .route_configs
        .iter()
        .map(|rc| {
            let before = previous.and_then(|p| p.route_table(&rc.name));
            let text = &origin.written.text;
            (rc.name.clone(), route_table(rc, &clusters, before, text))
        })
        .collect();
    let listeners = raw.listeners.iter().map(|l| listener(l, metrics)).collect();
    let admin_address = raw
        .admin
        .as_ref()
        .map_or(DEFAULT_ADMIN_ADDRESS, |a| a.address.as_str())
        .parse()
        .expect("validated admin address");
    let workers = raw.workers;
    // Compiled, and read again from `origin.written` for `/config`: not kept twice.
    raw.route_configs = Vec::new();
    Snapshot::new(
        origin.version,
        origin.source,
        origin.hash,
        raw,
        origin.written,
        admin_address,
        workers,
        listeners,
        clusters,
        route_tables,
    )
}

/// A digest of a cluster's TLS files (0 without TLS).
pub fn tls_digest(c: &RawCluster) -> u64 {
    c.tls.as_ref().map_or(0, |t| files_digest(t.paths()))
}

fn listener(l: &RawListener, metrics: &Metrics) -> ListenerSettings {
    let nonzero = |d: Option<super::duration::Dur>, default: Duration| {
        let d = d.map_or(default, |d| d.0);
        (!d.is_zero()).then_some(d)
    };
    ListenerSettings {
        name: l.name.as_str().into(),
        address: l.address.parse().expect("validated listener address"),
        protocol: l.protocol,
        route_config: l.route_config.clone(),
        max_request_headers_bytes: l
            .max_request_headers_bytes
            .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS_BYTES),
        max_request_headers_count: l
            .max_request_headers_count
            .unwrap_or(DEFAULT_MAX_REQUEST_HEADERS_COUNT),
        request_headers_timeout: nonzero(
            l.request_headers_timeout,
            DEFAULT_REQUEST_HEADERS_TIMEOUT,
        ),
        idle_timeout: nonzero(l.idle_timeout, DEFAULT_IDLE_TIMEOUT),
        stream_idle_timeout: nonzero(l.stream_idle_timeout, DEFAULT_STREAM_IDLE_TIMEOUT),
        max_connections: l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        normalize_path: l.normalize_path,
        merge_slashes: l.merge_slashes,
        access_log: l.access_log.as_ref().map(|a| a.path.clone().into()),
        tls: l.tls.clone(),
        metrics: metrics.listener(&l.name),
    }
}

/// Compiles a route config. A virtual host whose config is unchanged from `before`'s, and
/// whose clusters are the same ones, is carried over as it is; when every one is, so is the
/// table. A reload that changes one cluster or one virtual host of a big mesh thus rebuilds
/// only the virtual hosts it touches. `text` is the config text placeholders were read from.
fn route_table(
    rc: &RawRouteConfig,
    clusters: &BTreeMap<String, Arc<Cluster>>,
    before: Option<&Arc<RouteTable>>,
    text: &str,
) -> Arc<RouteTable> {
    let old: HashMap<u64, &Arc<VirtualHost>> = before
        .map(|t| t.virtual_hosts().iter().map(|v| (v.source, v)).collect())
        .unwrap_or_default();
    let known = |name: &str| clusters.get(name).cloned();
    let mut all_kept = before.is_some_and(|t| t.virtual_hosts().len() == rc.virtual_hosts.len());
    let vhosts: Vec<_> = rc
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(at, vh)| {
            let source = vh
                .read_from
                .text_key
                .unwrap_or_else(|| crate::hash::digest(vh));
            let kept = old
                .get(&source)
                .filter(|v| v.resolves_as_before(known))
                .map(|v| Arc::clone(v));
            // A placeholder is made only where `config::reuse` saw the running host would be
            // carried over; if a cluster changed since (a TLS file rotated meanwhile), its
            // lines are read now.
            let read_now;
            let vh = match vh.read_from.placeholder {
                Some((from, to)) if kept.is_none() => {
                    read_now = super::items::read_lines(&text[from..to], source)
                        .expect("a placeholder's lines read on their own");
                    &read_now
                }
                _ => vh,
            };
            let in_place = before.and_then(|t| t.virtual_hosts().get(at));
            all_kept &= kept
                .as_ref()
                .zip(in_place)
                .is_some_and(|(k, old)| Arc::ptr_eq(k, old));
            let compiled = kept.unwrap_or_else(|| {
                let inherited = vh
                    .retry_policy
                    .as_ref()
                    .map(|p| Arc::new(RetryPolicy::new(p)));
                let routes = vh
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| route(vh, &inherited, i, r, clusters))
                    .collect();
                Arc::new(VirtualHost {
                    name: vh.name.as_str().into(),
                    domains: vh.domains.clone(),
                    routes,
                    source,
                })
            });
            (compiled, vh.domains.clone())
        })
        .collect();
    match before {
        Some(table) if all_kept && *table.name == *rc.name => Arc::clone(table),
        _ => Arc::new(RouteTable::new(&rc.name, vhosts)),
    }
}

fn route(
    vhost: &RawVirtualHost,
    inherited: &Option<Arc<RetryPolicy>>,
    index: usize,
    r: &RawRoute,
    clusters: &BTreeMap<String, Arc<Cluster>>,
) -> Route {
    let m = &r.route_match;
    let path = if let Some(p) = &m.prefix {
        PathMatch::Prefix(p.clone())
    } else if let Some(p) = &m.path {
        PathMatch::Exact(p.clone())
    } else {
        PathMatch::Regex(
            full_match_regex(m.regex.as_deref().unwrap_or_default()).expect("validated regex"),
        )
    };
    let named = |name: &String| match clusters.get(name) {
        Some(c) => ClusterRef::Known(c.clone()),
        None => ClusterRef::Missing(name.as_str().into()),
    };
    let action = if let Some(c) = &r.cluster {
        Action::Cluster(named(c))
    } else if let Some(split) = &r.weighted_clusters {
        let weights: Vec<u32> = split.iter().map(|w| w.weight).collect();
        Action::Weighted(WeightedClusters {
            clusters: split.iter().map(|w| named(&w.name)).collect(),
            schedule: Schedule::new(&weights).expect("validated weights"),
        })
    } else {
        let d = r.direct_response.as_ref().expect("validated action");
        Action::Direct {
            status: StatusCode::from_u16(d.status).expect("validated status"),
            body: Bytes::from(d.body.clone().unwrap_or_default()),
        }
    };
    Route {
        name: r
            .name
            .clone()
            .unwrap_or_else(|| format!("{}/{index}", vhost.name))
            .into(),
        path,
        methods: m
            .methods
            .iter()
            .flatten()
            .map(|s| Method::from_bytes(s.as_bytes()).expect("validated method"))
            .collect(),
        headers: m.headers.iter().map(header_matcher).collect(),
        action,
        prefix_rewrite: r.prefix_rewrite.clone(),
        host_rewrite: r
            .host_rewrite
            .as_ref()
            .map(|h| Box::new(HeaderValue::from_str(h).expect("validated host"))),
        request_headers_to_add: r.request_headers_to_add.iter().map(header_op).collect(),
        request_headers_to_remove: r
            .request_headers_to_remove
            .iter()
            .map(|h| header_name(h))
            .collect(),
        response_headers_to_add: r.response_headers_to_add.iter().map(header_op).collect(),
        response_headers_to_remove: r
            .response_headers_to_remove
            .iter()
            .map(|h| header_name(h))
            .collect(),
        timeout: {
            let t = r.timeout.map_or(DEFAULT_ROUTE_TIMEOUT, |d| d.0);
            (!t.is_zero()).then_some(t)
        },
        retry_policy: match &r.retry_policy {
            Some(own) => Some(Arc::new(RetryPolicy::new(own))),
            None => inherited.clone(),
        },
        principals: r
            .authorization
            .as_ref()
            .or(vhost.authorization.as_ref())
            .map(|a| a.principals.clone().into()),
        upgrades: r
            .upgrade_configs
            .iter()
            .map(|u| (u.upgrade_type.to_ascii_lowercase(), u.enabled))
            .collect(),
    }
}

fn header_name(name: &str) -> HeaderName {
    HeaderName::from_bytes(name.as_bytes()).expect("validated header name")
}

fn header_op(h: &RawHeaderValue) -> HeaderOp {
    HeaderOp {
        name: header_name(&h.name),
        value: HeaderValue::from_str(&h.value).expect("validated header value"),
        append: h.append,
    }
}

fn header_matcher(h: &RawHeaderMatcher) -> HeaderMatcher {
    let kind = if let Some(v) = &h.exact {
        HeaderMatch::Exact(v.clone())
    } else if let Some(v) = &h.prefix {
        HeaderMatch::Prefix(v.clone())
    } else if let Some(v) = &h.suffix {
        HeaderMatch::Suffix(v.clone())
    } else if let Some(v) = &h.contains {
        HeaderMatch::Contains(v.clone())
    } else if let Some(v) = &h.regex {
        HeaderMatch::Regex(full_match_regex(v).expect("validated regex"))
    } else {
        HeaderMatch::Present(h.present.unwrap_or(true))
    };
    HeaderMatcher {
        name: header_name(&h.name),
        kind,
        invert: h.invert,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Three virtual hosts over three clusters; `weight` is cluster `b`'s endpoint weight and
    /// `prefix` the route prefix of virtual host `z`.
    fn mesh(weight: u32, prefix: &str) -> RawConfig {
        let text = format!(
            "listeners: [{{ name: l, address: 127.0.0.1:1, route_config: rc }}]\n\
             route_configs:\n  - name: rc\n    virtual_hosts:\n\
             \x20     - {{ name: x, domains: [x], routes: [{{ match: {{ prefix: / }}, cluster: a }}] }}\n\
             \x20     - {{ name: y, domains: [y], routes: [{{ match: {{ prefix: / }}, weighted_clusters: [{{ name: a, weight: 1 }}, {{ name: b, weight: 1 }}] }}] }}\n\
             \x20     - {{ name: z, domains: [z], routes: [{{ match: {{ prefix: {prefix} }}, cluster: c }}] }}\n\
             clusters:\n\
             \x20 - {{ name: a, endpoints: [{{ address: 127.0.0.1:2 }}] }}\n\
             \x20 - {{ name: b, endpoints: [{{ address: 127.0.0.1:3, weight: {weight} }}] }}\n\
             \x20 - {{ name: c, endpoints: [{{ address: 127.0.0.1:4 }}] }}\n"
        );
        crate::config::parse(&text, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Compiles `raw` as version `version` after `previous`.
    pub(crate) fn build(raw: RawConfig, version: u64, previous: Option<&Snapshot>) -> Snapshot {
        let origin = Origin {
            version,
            source: "t".into(),
            hash: version.to_string(),
            written: crate::config::Written::text(""),
        };
        compile(raw, origin, &Metrics::new(), previous)
    }

    fn vhosts(s: &Snapshot) -> Vec<Arc<VirtualHost>> {
        s.route_table("rc").expect("rc").virtual_hosts().to_vec()
    }

    /// A reload reuses what did not change: clusters and virtual hosts carried over as they
    /// are (the same allocation), the whole table when nothing in it changed; only what a
    /// change touches is built again, and it points at the new cluster.
    /// A virtual host added in front of the others: they move one place on and are still
    /// carried over (the check of whether the whole table was kept once indexed the old table
    /// past its end, and the reload failed as an internal error).
    #[test]
    fn a_virtual_host_added_in_front_moves_the_others_along() {
        let one = build(mesh(1, "/"), 1, None);
        let mut raw = mesh(1, "/");
        let mut added = raw.route_configs[0].virtual_hosts[0].clone();
        added.name = "w".into();
        added.domains = vec!["w".into()];
        added.read_from = Default::default();
        raw.route_configs[0].virtual_hosts.insert(0, added);
        let two = build(raw, 2, Some(&one));
        let (before, after) = (vhosts(&one), vhosts(&two));
        assert_eq!(after.len(), 4);
        for (old, new) in before.iter().zip(&after[1..]) {
            assert!(Arc::ptr_eq(old, new), "{} carried over", old.name);
        }
    }

    #[test]
    fn a_reload_rebuilds_only_what_changed() {
        let one = build(mesh(1, "/"), 1, None);

        // Nothing changed: every cluster and the table itself carried over.
        let same = build(mesh(1, "/"), 2, Some(&one));
        assert!(Arc::ptr_eq(
            same.route_table("rc").unwrap(),
            one.route_table("rc").unwrap()
        ));
        for (name, c) in &one.clusters {
            assert!(Arc::ptr_eq(c, &same.clusters[name]), "cluster {name}");
        }

        // Cluster `b` changed: only `b` and the virtual host that sends to it (`y`) rebuilt.
        let two = build(mesh(2, "/"), 3, Some(&same));
        assert!(Arc::ptr_eq(&one.clusters["a"], &two.clusters["a"]));
        assert!(!Arc::ptr_eq(&one.clusters["b"], &two.clusters["b"]));
        let (before, after) = (vhosts(&same), vhosts(&two));
        assert!(Arc::ptr_eq(&before[0], &after[0]), "x kept");
        assert!(!Arc::ptr_eq(&before[1], &after[1]), "y rebuilt");
        assert!(Arc::ptr_eq(&before[2], &after[2]), "z kept");
        let Action::Weighted(w) = &after[1].routes[0].action else {
            panic!("a split")
        };
        let ClusterRef::Known(b) = &w.clusters[1] else {
            panic!("b known")
        };
        assert!(Arc::ptr_eq(b, &two.clusters["b"]), "y sends to the new b");

        // Virtual host `z` changed: only `z` rebuilt, the clusters all kept.
        let three = build(mesh(2, "/v2"), 4, Some(&two));
        let after3 = vhosts(&three);
        assert!(Arc::ptr_eq(&after[0], &after3[0]) && Arc::ptr_eq(&after[1], &after3[1]));
        assert!(!Arc::ptr_eq(&after[2], &after3[2]));
        assert!(matches!(&after3[2].routes[0].path, PathMatch::Prefix(p) if p == "/v2"));
        for (name, c) in &two.clusters {
            assert!(Arc::ptr_eq(c, &three.clusters[name]), "cluster {name}");
        }
    }
}
