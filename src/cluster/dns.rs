//! `strict_dns` discovery: resolve every `host:port` on an interval; keep the last good answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Cluster;

/// Resolves now and then every `refresh`, until the cluster is dropped. The returned channel
/// fires after the first round, so startup can wait for endpoints before reporting ready.
pub fn spawn(
    cluster: Weak<Cluster>,
    targets: Vec<(String, u32)>,
    refresh: Duration,
) -> oneshot::Receiver<()> {
    let (first_done, first) = oneshot::channel();
    tokio::spawn(async move {
        let mut first_done = Some(first_done);
        let mut last_good: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        loop {
            for (target, _) in &targets {
                match tokio::net::lookup_host(target.as_str()).await {
                    Ok(addrs) => {
                        let mut addrs: Vec<SocketAddr> = addrs.collect();
                        addrs.sort();
                        addrs.dedup();
                        last_good.insert(target.clone(), addrs);
                    }
                    Err(error) => {
                        tracing::warn!(%target, %error, "DNS lookup failed; keeping the last answer");
                    }
                }
            }
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            let mut endpoints: Vec<(SocketAddr, u32)> = Vec::new();
            for (target, weight) in &targets {
                for addr in last_good.get(target).into_iter().flatten() {
                    if !endpoints.iter().any(|(a, _)| a == addr) {
                        endpoints.push((*addr, *weight));
                    }
                }
            }
            let changed = {
                let now = cluster.members();
                now.endpoints.len() != endpoints.len()
                    || now
                        .endpoints
                        .iter()
                        .zip(&endpoints)
                        .any(|(e, (a, w))| e.address != *a || e.weight != *w)
            };
            if changed {
                tracing::info!(cluster = %cluster.name, endpoints = endpoints.len(), "DNS answer changed");
                cluster.set_endpoints(endpoints);
            }
            drop(cluster);
            if let Some(tx) = first_done.take() {
                let _ = tx.send(());
            }
            tokio::time::sleep(refresh).await;
        }
    });
    first
}
