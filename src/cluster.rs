//! A cluster at run time: its endpoints (each with a connection pool), and how one is picked.

pub mod balance;
mod dns;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;

use self::balance::{Cumulative, Ring, Schedule};
use crate::config::raw::{DiscoveryType, LbPolicy, RawCluster, UpstreamProtocol};
use crate::metrics::ClusterMetrics;
use crate::upstream::Pool;

/// Default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default upstream pool `idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `dns_refresh_rate`.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);

/// One upstream address with its weight, and its state.
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    /// Survives reloads and re-resolution while the address remains in the cluster.
    pub state: Arc<EndpointState>,
}

/// What an endpoint keeps across config changes: its connections and counters.
#[derive(Default)]
pub struct EndpointState {
    /// Requests in flight to this endpoint (for `least_request` and `/clusters`).
    pub active_requests: AtomicUsize,
    pub pool: Pool,
}

/// The endpoints a cluster balances over, with the balancer built for exactly them.
pub struct Members {
    pub endpoints: Vec<Arc<Endpoint>>,
    balancer: Option<Balancer>,
}

enum Balancer {
    RoundRobin(Schedule),
    LeastRequest(Cumulative),
    Random(Cumulative),
    RingHash(Ring),
}

/// A named group of endpoints with one balancing policy and one upstream protocol.
pub struct Cluster {
    pub name: Arc<str>,
    /// The config it was built from; an identical config on reload keeps this cluster.
    pub raw: RawCluster,
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub lb_policy: LbPolicy,
    /// For `ring_hash` on a header.
    pub hash_header: Option<HeaderName>,
    pub metrics: ClusterMetrics,
    members: ArcSwap<Members>,
}

impl Cluster {
    /// Builds a cluster; a `static` one has its endpoints at once, a `strict_dns` one once
    /// [`Cluster::start`] has resolved them (until then it serves `previous`'s endpoints).
    /// Endpoints that were in `previous`, the same cluster before a config change, keep
    /// their connections and counters.
    pub fn new(
        raw: &RawCluster,
        metrics: ClusterMetrics,
        previous: Option<&Cluster>,
    ) -> Arc<Cluster> {
        let hash_header = raw
            .hash_on
            .as_ref()
            .and_then(|h| h.header.as_ref())
            .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok());
        let cluster = Arc::new(Cluster {
            name: raw.name.as_str().into(),
            raw: raw.clone(),
            protocol: raw.protocol,
            connect_timeout: raw.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            idle_timeout: raw.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            lb_policy: raw.lb_policy,
            hash_header,
            metrics,
            members: ArcSwap::from_pointee(Members {
                endpoints: Vec::new(),
                balancer: None,
            }),
        });
        if let Some(previous) = previous {
            let carried = previous
                .members()
                .endpoints
                .iter()
                .map(|e| (e.address, e.weight))
                .collect();
            cluster.members.store(previous.members());
            cluster.set_endpoints(carried);
        }
        if raw.discovery == DiscoveryType::Static {
            let addrs = raw
                .endpoints
                .iter()
                .filter_map(|e| Some((e.address.parse().ok()?, e.weight.unwrap_or(1))))
                .collect();
            cluster.set_endpoints(addrs);
        }
        cluster
    }

    /// Starts the cluster's background work (DNS refresh, idle-connection reaping). The tasks
    /// hold a weak reference and end when the cluster is dropped by a reload.
    pub fn start(self: &Arc<Self>) -> Option<tokio::sync::oneshot::Receiver<()>> {
        spawn_reaper(Arc::downgrade(self), self.idle_timeout);
        if self.raw.discovery == DiscoveryType::StrictDns {
            let targets = self
                .raw
                .endpoints
                .iter()
                .map(|e| (e.address.clone(), e.weight.unwrap_or(1)))
                .collect();
            let refresh = self
                .raw
                .dns_refresh_rate
                .map_or(DEFAULT_DNS_REFRESH, |d| d.0);
            return Some(dns::spawn(Arc::downgrade(self), targets, refresh));
        }
        None
    }

    /// The current endpoints.
    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    /// Replaces the endpoint list; endpoints whose address remains keep their state.
    pub fn set_endpoints(&self, addrs: Vec<(SocketAddr, u32)>) {
        let old = self.members.load();
        let endpoints: Vec<Arc<Endpoint>> = addrs
            .into_iter()
            .map(|(address, weight)| {
                let state = old
                    .endpoints
                    .iter()
                    .find(|e| e.address == address)
                    .map_or_else(Default::default, |e| e.state.clone());
                Arc::new(Endpoint {
                    address,
                    weight,
                    state,
                })
            })
            .collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let balancer = if endpoints.is_empty() {
            None
        } else {
            match self.lb_policy {
                LbPolicy::RoundRobin => Schedule::new(&weights).map(Balancer::RoundRobin),
                LbPolicy::LeastRequest => Cumulative::new(&weights).map(Balancer::LeastRequest),
                LbPolicy::Random => Cumulative::new(&weights).map(Balancer::Random),
                LbPolicy::RingHash => {
                    let ids: Vec<String> =
                        endpoints.iter().map(|e| e.address.to_string()).collect();
                    Ring::new(&ids, &weights).map(Balancer::RingHash)
                }
            }
        };
        self.metrics.endpoints_healthy.set(endpoints.len() as i64);
        self.members.store(Arc::new(Members {
            endpoints,
            balancer,
        }));
    }

    /// Picks an endpoint; `hash` is the request's key for `ring_hash`.
    pub fn pick(&self, hash: u64) -> Option<Arc<Endpoint>> {
        let members = self.members.load();
        let eps = &members.endpoints;
        let index = match members.balancer.as_ref()? {
            Balancer::RoundRobin(s) => s.next(),
            Balancer::Random(c) => c.pick(),
            Balancer::RingHash(r) => r.pick(hash),
            Balancer::LeastRequest(c) => {
                let a = c.pick();
                let mut b = c.pick();
                if b == a && eps.len() > 1 {
                    // Two distinct candidates, so one busy endpoint cannot be picked twice.
                    b = (a + 1 + fastrand::usize(..eps.len() - 1)) % eps.len();
                }
                // Fewer in-flight requests per unit of weight wins.
                let load = |i: usize| eps[i].state.active_requests.load(Ordering::Relaxed) as u64;
                if load(a) * eps[b].weight as u64 <= load(b) * eps[a].weight as u64 {
                    a
                } else {
                    b
                }
            }
        };
        eps.get(index).cloned()
    }
}

fn spawn_reaper(cluster: Weak<Cluster>, idle: Duration) {
    let every = (idle / 2).max(Duration::from_secs(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(cluster) = cluster.upgrade() else {
                return;
            };
            for e in cluster.members().endpoints.iter() {
                e.state.pool.close_idle_older_than(idle);
            }
        }
    });
}
