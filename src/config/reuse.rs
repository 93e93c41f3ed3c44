//! Reads a changed config text without reading again what did not change: each virtual host
//! whose text is the text of one running now (and whose clusters will be carried over) is
//! read as a placeholder, and compiling carries the running one over. For a big mesh, a
//! reload that changes one cluster or one virtual host then parses a small part of the text.
//!
//! Anything unusual falls back to the whole read, which also gives every problem its place:
//! a text that does not split (`items`), a skeleton that does not read as the split says, a
//! placeholder that could not be carried over and whose own text does not read alone, or
//! any problem at all in the result.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::items;
use super::raw::{RawCluster, RawVirtualHost, ReadFrom};
use super::{validate, xds::Dynamic, ConfigErrors, RawConfig};
use crate::router::{Action, ClusterRef, VirtualHost};
use crate::snapshot::Snapshot;

/// [`super::parse_with`], reusing what `current` already runs where it can.
pub fn parse(
    text: &str,
    file: &str,
    dynamic: Option<&Dynamic>,
    current: &Snapshot,
) -> Result<RawConfig, ConfigErrors> {
    match incremental(text, dynamic, current) {
        Some(raw) => Ok(raw),
        None => super::parse_with(text, file, dynamic),
    }
}

fn incremental(text: &str, dynamic: Option<&Dynamic>, current: &Snapshot) -> Option<RawConfig> {
    let split = items::virtual_hosts(text)?;
    // The running virtual hosts by route config and key.
    let mut running: HashMap<(&str, u64), &Arc<VirtualHost>> = HashMap::new();
    for t in current.route_tables() {
        for v in t.virtual_hosts() {
            running.insert((&*t.name, v.source), v);
        }
    }
    let keys: HashSet<u64> = running.keys().map(|(_, key)| *key).collect();
    if !split.items.iter().any(|i| keys.contains(&i.key)) {
        return None;
    }
    let mut raw = items::skeleton(text, &split)?;
    let static_route_configs = raw.route_configs.len();
    if let Some(d) = dynamic {
        super::add_dynamic(&mut raw, d);
    }
    let clusters: HashMap<&str, &RawCluster> =
        raw.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
    // Whether each cluster is carried over, decided once (TLS files are read for it).
    let mut kept: HashMap<Arc<str>, bool> = HashMap::new();
    let mut filled = Vec::with_capacity(split.items.len());
    for item in &split.items {
        let rc = raw.route_configs[item.route_config].name.as_str();
        let carried = running
            .get(&(rc, item.key))
            .filter(|v| carried_over(v, &clusters, &mut kept, current));
        let vhost = match carried {
            Some(v) => placeholder(v, item),
            None => items::read_alone(text, item)?,
        };
        filled.push((item.route_config, item.index, vhost));
    }
    drop(clusters);
    for (rc, index, vhost) in filled {
        raw.route_configs[rc].virtual_hosts[index] = vhost;
    }
    let problems = validate::validate(&raw, static_route_configs, validate::TlsFiles::Load);
    problems.is_empty().then_some(raw)
}

/// Whether compiling will carry `v` over: every cluster it names is kept as it runs (the
/// same config, the same TLS files), and every one it names that does not exist still does
/// not. (The rule is `compile`'s.) `kept` remembers the answer for each cluster.
fn carried_over(
    v: &VirtualHost,
    clusters: &HashMap<&str, &RawCluster>,
    kept: &mut HashMap<Arc<str>, bool>,
    current: &Snapshot,
) -> bool {
    let mut same = |r: &ClusterRef| match r {
        ClusterRef::Known(c) => *kept.entry(c.name.clone()).or_insert_with(|| {
            clusters.get(&*c.name).is_some_and(|raw| {
                current
                    .clusters
                    .get(&*c.name)
                    .is_some_and(|running| Arc::ptr_eq(running, c))
                    && c.raw == **raw
                    && c.tls_digest == super::compile::tls_digest(raw)
            })
        }),
        ClusterRef::Missing(name) => !clusters.contains_key(&**name),
    };
    v.routes.iter().all(|r| match &r.action {
        Action::Cluster(c) => same(c),
        Action::Weighted(w) => w.clusters.iter().all(&mut same),
        Action::Direct { .. } => true,
    })
}

/// Stands for `v`, read from `item`: its name and domains (for validation), no routes.
fn placeholder(v: &VirtualHost, item: &items::VhostItem) -> RawVirtualHost {
    RawVirtualHost {
        name: v.name.to_string(),
        domains: v.domains.clone(),
        routes: Vec::new(),
        retry_policy: None,
        authorization: None,
        read_from: ReadFrom {
            text_key: Some(item.key),
            placeholder: Some((item.range.start, item.range.end)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile::tests::build;
    use crate::router::{PathMatch, RouteTable};

    /// Three virtual hosts (`a`, `b`, `c`, each to the cluster of its name); `b`'s prefix and
    /// weight are given, and cluster `c` may be left out.
    fn text(prefix_b: &str, weight_b: u32, with_c: bool) -> String {
        let c = if with_c {
            "  - { name: c, endpoints: [{ address: 127.0.0.1:4 }] }\n"
        } else {
            ""
        };
        format!(
            "listeners:\n  - {{ name: l, address: 127.0.0.1:0, route_config: rc }}\n\
             route_configs:\n  - name: rc\n    virtual_hosts:\n\
             \x20     - name: a\n        domains: [a]\n        routes:\n\
             \x20         - {{ match: {{ prefix: / }}, cluster: a }}\n\
             \x20     - name: b\n        domains: [b, b.mesh]\n        routes:\n\
             \x20         - {{ match: {{ prefix: {prefix_b} }}, cluster: b }}\n\
             \x20     - name: c\n        domains: [c]\n        routes:\n\
             \x20         - {{ match: {{ prefix: / }}, cluster: c }}\n\
             clusters:\n\
             \x20 - {{ name: a, endpoints: [{{ address: 127.0.0.1:2 }}] }}\n\
             \x20 - {{ name: b, endpoints: [{{ address: 127.0.0.1:3, weight: {weight_b} }}] }}\n{c}"
        )
    }

    /// The first version, read whole from `text`.
    fn running(text: &str) -> Snapshot {
        build(crate::config::parse(text, "t.yaml").unwrap(), 1, None)
    }

    fn table(s: &Snapshot) -> &Arc<RouteTable> {
        s.route_table("rc").expect("rc")
    }

    /// Which virtual hosts were read as placeholders.
    fn placeholders(raw: &RawConfig) -> Vec<&str> {
        raw.route_configs[0]
            .virtual_hosts
            .iter()
            .filter(|v| v.read_from.placeholder.is_some())
            .map(|v| v.name.as_str())
            .collect()
    }

    /// A placeholder whose cluster changed after `reuse` looked (a TLS file rotated between
    /// the two steps) is read from its lines when compiled, and points at the new cluster
    /// (compiling once failed the reload on an assertion).
    #[tokio::test]
    async fn a_placeholder_whose_cluster_changed_meanwhile_is_read_when_compiled() {
        let first = running(&text("/", 1, true));
        let edited = text("/v2/", 1, true);
        let mut raw = incremental(&edited, None, &first).expect("read incrementally");
        assert_eq!(placeholders(&raw), vec!["a", "c"]);
        // Cluster `a` changes under the placeholder for `a`.
        raw.clusters[0].endpoints[0].weight = Some(5);
        let origin = crate::config::compile::Origin {
            version: 2,
            source: "t".into(),
            hash: "2".into(),
            written: crate::config::Written::text(&edited),
        };
        let second = crate::config::compile::compile(
            raw,
            origin,
            &crate::metrics::Metrics::new(),
            Some(&first),
        );
        let a = &table(&second).virtual_hosts()[0];
        let Action::Cluster(ClusterRef::Known(to)) = &a.routes[0].action else {
            panic!("a routes to a known cluster");
        };
        assert!(Arc::ptr_eq(to, &second.clusters["a"]));
        assert!(!Arc::ptr_eq(to, &first.clusters["a"]));
        assert!(Arc::ptr_eq(
            &table(&first).virtual_hosts()[2],
            &table(&second).virtual_hosts()[2]
        ));
    }

    /// Found in review: indentation is not checked inside a quoted scalar, so a line of a
    /// multi-line string can look like a virtual host's first line (and another like the end
    /// of the list). Such a text is read whole, and the reload answers as the text says.
    #[tokio::test]
    async fn a_string_that_looks_like_items_does_not_split_the_text() {
        let mesh = |prefix: &str, body: &str| {
            format!(
                "listeners: [{{name: l, address: 127.0.0.1:1, route_config: rc}}]\n\
                 route_configs:\n  - name: rc\n    virtual_hosts:\n\
                 \x20     - name: a\n        domains: [a]\n        routes:\n\
                 \x20         - match: {{prefix: {prefix}}}\n\
                 \x20           direct_response:\n\
                 \x20             status: 200\n\
                 \x20             body: 'Try:\n\
                 \x20     - /v1/orders\n\
                 \x20   or ask ops.'\n\
                 \x20     - name: b\n        domains: [b]\n        routes:\n\
                 \x20         - {{match: {{prefix: /}}, direct_response: {{status: 200, body: {body}}}}}\n"
            )
        };
        let bodies = |s: &Snapshot| -> Vec<String> {
            table(s)
                .virtual_hosts()
                .iter()
                .map(|v| match &v.routes[0].action {
                    Action::Direct { body, .. } => String::from_utf8_lossy(body).into_owned(),
                    _ => panic!("a direct response"),
                })
                .collect()
        };
        let old = mesh("/", "old");
        let first = running(&old);
        assert_eq!(bodies(&first), ["Try: - /v1/orders or ask ops.", "old"]);
        let new = mesh("/v2/", "new");
        let raw = parse(&new, "t.yaml", None, &first).unwrap();
        let second = build(raw, 2, Some(&first));
        assert_eq!(bodies(&second), ["Try: - /v1/orders or ask ops.", "new"]);
    }

    #[tokio::test]
    async fn a_reload_reads_only_the_virtual_hosts_whose_text_or_clusters_changed() {
        let first = running(&text("/", 1, true));

        // `b`'s route changed: `a` and `c` are not read again, and are carried over.
        let edited = text("/v2/", 1, true);
        let raw = incremental(&edited, None, &first).expect("read incrementally");
        assert_eq!(placeholders(&raw), vec!["a", "c"]);
        let second = build(raw, 2, Some(&first));
        let (before, after) = (
            table(&first).virtual_hosts(),
            table(&second).virtual_hosts(),
        );
        assert!(Arc::ptr_eq(&before[0], &after[0]) && Arc::ptr_eq(&before[2], &after[2]));
        assert!(!Arc::ptr_eq(&before[1], &after[1]));
        assert!(matches!(&after[1].routes[0].path, PathMatch::Prefix(p) if p == "/v2/"));
        assert_eq!(after[1].domains, vec!["b", "b.mesh"]);
        // It routes as the whole read would.
        let whole = build(crate::config::parse(&edited, "t.yaml").unwrap(), 2, None);
        for host in ["a", "b", "b.mesh", "c"] {
            let name = |s: &Snapshot| {
                table(s)
                    .virtual_hosts()
                    .iter()
                    .position(|v| v.domains.iter().any(|d| d == host))
            };
            assert_eq!(name(&second), name(&whole), "{host}");
        }

        // Cluster `b` changed (a weight): `b`'s unchanged text is read again, as its routes
        // must point at the new cluster; `a` and `c` are still placeholders.
        let reweighted = text("/v2/", 2, true);
        let raw = incremental(&reweighted, None, &second).expect("read incrementally");
        assert_eq!(placeholders(&raw), vec!["a", "c"]);
        let third = build(raw, 3, Some(&second));
        let b = &table(&third).virtual_hosts()[1];
        let Action::Cluster(ClusterRef::Known(to)) = &b.routes[0].action else {
            panic!("b routes to a known cluster");
        };
        assert!(Arc::ptr_eq(to, &third.clusters["b"]));
        assert!(!Arc::ptr_eq(to, &second.clusters["b"]));

        // Cluster `c` removed while `c` still routes to it: not read incrementally, and the
        // whole read says where the problem is.
        let broken = text("/v2/", 2, false);
        assert!(incremental(&broken, None, &third).is_none());
        let errors = parse(&broken, "t.yaml", None, &third).expect_err("unknown cluster");
        assert!(
            errors.to_string().starts_with("t.yaml:") && errors.to_string().contains("`c`"),
            "{errors}"
        );
    }
}
