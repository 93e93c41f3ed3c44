//! A cluster at run time: its endpoints (each with a connection pool and health), how one is
//! picked, and the resilience state around them (breakers, retry budget, outlier detection,
//! health checks).

pub mod balance;
pub mod breaker;
pub mod budget;
mod dns;
pub mod health;
pub mod outlier;
pub mod pool;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderName;
use rustls::pki_types::ServerName;

use self::balance::{Cumulative, Ring, Schedule};
use self::breaker::CircuitBreakers;
use self::budget::RetryBudget;
use self::health::HealthCheckConfig;
use self::outlier::{Breaker, BreakerState, Observation, OutlierConfig, Transition};
use self::pool::Pool;
use crate::config::raw::{DiscoveryType, LbPolicy, RawCluster, UpstreamProtocol};
use crate::metrics::{ClusterMetrics, ENDPOINT_STATES};

/// Default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default upstream pool `idle_timeout`.
/// Default `max_response_headers_bytes`: 60 KiB, as Envoy's `max_response_headers_kb`.
pub const DEFAULT_MAX_RESPONSE_HEADERS: usize = 60 * 1024;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `dns_refresh_rate`.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(5);
/// Default `panic_threshold`, in percent.
pub const DEFAULT_PANIC_THRESHOLD: u32 = 50;

/// One upstream address with its weight, and its state.
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    /// Survives reloads and re-resolution while the address remains in the cluster.
    pub state: Arc<EndpointState>,
}

/// What an endpoint keeps across config changes: connections, counters, health.
pub struct EndpointState {
    /// Requests in flight to this endpoint (for `least_request` and `/clusters`).
    pub active_requests: AtomicUsize,
    pub pool: Pool,
    /// Active health: false after `unhealthy_threshold` failed checks.
    healthy: AtomicBool,
    /// Passive health: the outlier-detection breaker.
    pub breaker: Breaker,
    /// Every cluster that holds this endpoint (a reload builds a new cluster sharing the
    /// state; a rejected reload's cluster never takes over): rebuilt when the breaker
    /// changes on a timer, whichever of them still lives.
    owners: Mutex<Vec<Weak<Cluster>>>,
}

impl Default for EndpointState {
    fn default() -> Self {
        EndpointState {
            active_requests: AtomicUsize::new(0),
            pool: Pool::new(),
            healthy: AtomicBool::new(true),
            breaker: Breaker::default(),
            owners: Mutex::new(Vec::new()),
        }
    }
}

impl EndpointState {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Healthy and not ejected.
    pub fn is_usable(&self) -> bool {
        self.is_healthy() && !self.breaker.is_open()
    }

    /// Notes `cluster` as holding this endpoint, forgetting clusters that are gone.
    fn adopt(&self, cluster: &Weak<Cluster>) {
        let mut owners = self.owners.lock().expect("owners lock");
        owners.retain(|o| o.strong_count() > 0);
        if !owners.iter().any(|o| o.ptr_eq(cluster)) {
            owners.push(cluster.clone());
        }
    }

    /// The live clusters that hold this endpoint.
    fn owners(&self) -> Vec<Arc<Cluster>> {
        let owners = self.owners.lock().expect("owners lock");
        owners.iter().filter_map(Weak::upgrade).collect()
    }

    /// The endpoint's state for `/clusters` and metrics.
    pub fn label(&self) -> &'static str {
        match self.breaker.state() {
            BreakerState::Open(_) => "ejected",
            _ if !self.is_healthy() => "unhealthy",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Closed => "healthy",
        }
    }
}

/// An endpoint chosen for one attempt.
pub struct Pick {
    pub endpoint: Arc<Endpoint>,
    /// The attempt holds one of the endpoint's half-open probe slots: its outcome decides
    /// the breaker, and an attempt that ends without one must give the slot back.
    pub probe: bool,
}

impl Pick {
    fn plain(ep: &Arc<Endpoint>) -> Pick {
        Pick {
            endpoint: ep.clone(),
            probe: false,
        }
    }
}

impl Drop for Pick {
    /// A pick that ends without its outcome reaching outlier detection (the client went
    /// away, the route timed out in a backoff) gives its probe slot back.
    fn drop(&mut self) {
        if self.probe {
            self.endpoint.state.breaker.release_probe();
        }
    }
}

/// The endpoints a cluster knows, and the balancer over those it may use now.
pub struct Members {
    /// Every endpoint, usable or not.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// What the balancer picks from: the usable endpoints, or all of them in panic mode.
    chosen: Vec<Arc<Endpoint>>,
    /// Fewer than `panic_threshold` percent were usable, so all are balanced over.
    pub panic: bool,
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
    /// The response head bound (`max_response_headers_bytes`).
    pub max_response_headers: usize,
    pub lb_policy: LbPolicy,
    /// For `ring_hash` on a header.
    pub hash_header: Option<HeaderName>,
    pub metrics: ClusterMetrics,
    /// TLS to the endpoints: the connector and the server name (SNI), or why the cluster's
    /// TLS files could not be loaded (every connection then fails as a connect failure).
    pub tls: Option<Result<UpstreamTls, String>>,
    /// A digest of the TLS files the connector was made from: rotated files rebuild the
    /// cluster on the next reload.
    pub tls_digest: u64,
    pub breakers: Arc<CircuitBreakers>,
    pub retry_budget: RetryBudget,
    outlier: Option<OutlierConfig>,
    health_check: Option<HealthCheckConfig>,
    panic_threshold: u32,
    members: ArcSwap<Members>,
    /// Held while the balancer is rebuilt: rebuilds come from requests, health checks,
    /// timers and DNS, and one that read older endpoint states must not store after a newer.
    rebuilding: Mutex<()>,
    /// A rebuild is queued off the request path and has not started yet.
    rebuild_queued: AtomicBool,
    /// When the leaf certificate of its TLS client pair expires (Unix seconds).
    certificate_expiry: Option<i64>,
    /// Started, so its gauges are its own to set: a cluster built for a reload shares the
    /// running one's series, which must describe the running one until the new one starts.
    publishing: AtomicBool,
    weak_self: Weak<Cluster>,
}

/// How many endpoints are in each of [`ENDPOINT_STATES`].
fn endpoint_counts(endpoints: &[Arc<Endpoint>]) -> [i64; 4] {
    let mut counts = [0i64; 4];
    for e in endpoints {
        let label = e.state.label();
        if let Some(i) = ENDPOINT_STATES.iter().position(|s| *s == label) {
            counts[i] += 1;
        }
    }
    counts
}

impl Cluster {
    /// Builds a cluster; a `static` one has its endpoints at once, a `strict_dns` one once
    /// [`Cluster::start`] has resolved them (until then it serves `previous`'s endpoints).
    /// Endpoints that were in `previous`, the same cluster before a config change, keep
    /// their connections, counters and health.
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
        let certificate_expiry = raw.tls.as_ref().and_then(|tls| {
            tls.cert_file
                .as_deref()
                .and_then(|f| crate::tls::certificates(f).ok())
                .and_then(|c| c.first().and_then(|leaf| crate::tls::not_after(leaf)))
        });
        let tls = raw.tls.as_ref().map(|tls| tls_connector(raw, tls));
        let cluster = Arc::new_cyclic(|weak_self| Cluster {
            name: raw.name.as_str().into(),
            raw: raw.clone(),
            protocol: raw.protocol,
            connect_timeout: raw.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
            idle_timeout: raw.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
            max_response_headers: raw
                .max_response_headers_bytes
                .unwrap_or(DEFAULT_MAX_RESPONSE_HEADERS),
            lb_policy: raw.lb_policy,
            hash_header,
            metrics,
            tls,
            tls_digest: crate::config::compile::tls_digest(raw),
            breakers: CircuitBreakers::new(raw.circuit_breakers.as_ref()),
            retry_budget: RetryBudget::new(raw.retry_budget.as_ref()),
            outlier: raw.outlier_detection.as_ref().map(OutlierConfig::new),
            health_check: raw
                .health_check
                .as_ref()
                .map(|h| HealthCheckConfig::new(h, &raw.name)),
            panic_threshold: raw.panic_threshold.unwrap_or(DEFAULT_PANIC_THRESHOLD),
            members: ArcSwap::from_pointee(Members {
                endpoints: Vec::new(),
                chosen: Vec::new(),
                panic: false,
                balancer: None,
            }),
            rebuilding: Mutex::new(()),
            rebuild_queued: AtomicBool::new(false),
            certificate_expiry,
            publishing: AtomicBool::new(false),
            weak_self: weak_self.clone(),
        });
        // Connections made under other TLS settings or another protocol must not be reused:
        // then the endpoints start afresh (pools, and with them breaker and health state).
        let previous = previous.filter(|p| p.raw.tls == raw.tls && p.raw.protocol == raw.protocol);
        if let Some(previous) = previous {
            cluster.members.store(previous.members());
            let carried = previous
                .members()
                .endpoints
                .iter()
                .map(|e| (e.address, e.weight))
                .collect();
            cluster.set_endpoints(carried);
        }
        if matches!(raw.discovery, DiscoveryType::Static | DiscoveryType::Eds) {
            let addrs = raw
                .endpoints
                .iter()
                .filter_map(|e| Some((e.address.parse().ok()?, e.weight.unwrap_or(1))))
                .collect();
            cluster.set_endpoints(addrs);
        }
        cluster
    }

    /// Leaves the gauges to the cluster that replaced this one (a request may still hold
    /// this one, and its rebuilds must not overwrite the new one's counts).
    pub fn stop_publishing(&self) {
        let _rebuilding = self.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
        self.publishing.store(false, Ordering::Release);
    }

    /// Starts the cluster's background work (DNS refresh, health checks, idle-connection
    /// reaping). The tasks hold a weak reference and end when a reload drops the cluster.
    /// For `strict_dns`, the returned channel fires after the first resolution.
    pub fn start(self: &Arc<Self>) -> Option<tokio::sync::oneshot::Receiver<()>> {
        // Its gauges from now on (see `publishing`).
        if !self.publishing.load(Ordering::Acquire) {
            // Under the rebuild lock, so that no rebuild's counts come between.
            let _rebuilding = self.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
            self.publishing.store(true, Ordering::Release);
            if let Some(at) = self.certificate_expiry {
                self.metrics.certificate_expires(at);
            }
            let members = self.members();
            self.metrics
                .set_endpoint_counts(endpoint_counts(&members.endpoints));
        }
        spawn_reaper(Arc::downgrade(self), self.idle_timeout);
        if self.outlier.is_none() {
            // Outlier detection was removed by a reload: nothing would ever close a breaker
            // carried over. (Done here, once the new config is taking effect, not when it is
            // compiled: a rejected reload must not touch the running endpoints.)
            for ep in self.members().endpoints.iter() {
                ep.state.breaker.reset(Instant::now());
            }
            self.rebuild_now();
        }
        if let Some(cfg) = &self.health_check {
            health::spawn(Arc::downgrade(self), cfg.clone());
        }
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
        let _serial = self.rebuilding.lock().expect("rebuild lock");
        let old = self.members.load();
        let endpoints = addrs
            .into_iter()
            .map(|(address, weight)| {
                let state: Arc<EndpointState> = old
                    .endpoints
                    .iter()
                    .find(|e| e.address == address)
                    .map_or_else(Default::default, |e| e.state.clone());
                state.adopt(&self.weak_self);
                Arc::new(Endpoint {
                    address,
                    weight,
                    state,
                })
            })
            .collect();
        self.rebuild(endpoints);
    }

    /// Rebuilds the balancer over the endpoints usable now. The caller holds `rebuilding`.
    fn rebuild(&self, endpoints: Vec<Arc<Endpoint>>) {
        let usable: Vec<Arc<Endpoint>> = endpoints
            .iter()
            .filter(|e| e.state.is_usable())
            .cloned()
            .collect();
        let panic = !endpoints.is_empty()
            && (usable.len() as u64 * 100) < self.panic_threshold as u64 * endpoints.len() as u64;
        if panic {
            tracing::warn!(
                cluster = %self.name,
                usable = usable.len(),
                total = endpoints.len(),
                "below the panic threshold: balancing over every endpoint"
            );
        }
        let chosen = if panic { endpoints.clone() } else { usable };
        let weights: Vec<u32> = chosen.iter().map(|e| e.weight).collect();
        let balancer = if chosen.is_empty() {
            None
        } else {
            match self.lb_policy {
                LbPolicy::RoundRobin => Schedule::new(&weights).map(Balancer::RoundRobin),
                LbPolicy::LeastRequest => Cumulative::new(&weights).map(Balancer::LeastRequest),
                LbPolicy::Random => Cumulative::new(&weights).map(Balancer::Random),
                LbPolicy::RingHash => {
                    let ids: Vec<String> = chosen.iter().map(|e| e.address.to_string()).collect();
                    Ring::new(&ids, &weights).map(Balancer::RingHash)
                }
            }
        };
        if self.publishing.load(Ordering::Acquire) {
            self.metrics
                .set_endpoint_counts(endpoint_counts(&endpoints));
        }
        self.members.store(Arc::new(Members {
            endpoints,
            chosen,
            panic,
            balancer,
        }));
    }

    fn rebuild_now(&self) {
        let _serial = self.rebuilding.lock().expect("rebuild lock");
        let endpoints = self.members.load().endpoints.clone();
        self.rebuild(endpoints);
    }

    /// Rebuilds soon, off the calling task (a ring has up to a million points); many calls
    /// before it starts make one rebuild, which reads the endpoint states as they are then.
    /// Until it runs, `pick` already steps around ejected endpoints.
    fn rebuild_soon(&self) {
        if self.rebuild_queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = self.weak_self.clone();
        let run = move || {
            if let Some(cluster) = weak.upgrade() {
                // A swap, not a store: it reads the `true` of every caller that relied on
                // this rebuild, so their endpoint changes are visible to it.
                cluster.rebuild_queued.swap(false, Ordering::AcqRel);
                cluster.rebuild_now();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(run)),
            Err(_) => run(),
        }
    }

    /// Picks an endpoint; `hash` is the request's key for `ring_hash`. Prefers endpoints
    /// not in `avoid` (those a retry already tried), never picks an ejected one (outside
    /// panic mode), and lets a half-open endpoint take only its few probes at a time.
    pub fn pick(&self, hash: u64, avoid: &[SocketAddr]) -> Option<Pick> {
        let members = self.members.load();
        let eps = &members.chosen;
        let balancer = members.balancer.as_ref()?;
        let probes = self.outlier.as_ref().map_or(1, |o| o.half_open_probes);
        // In panic mode every endpoint is fair game, as in Envoy.
        let admit = |ep: &Arc<Endpoint>, avoiding: bool| -> Option<Pick> {
            if avoiding && avoid.contains(&ep.address) {
                return None;
            }
            if members.panic {
                return Some(Pick::plain(ep));
            }
            let breaker = &ep.state.breaker;
            if breaker.is_open() {
                return None;
            }
            if breaker.is_half_open() {
                return breaker.try_probe(probes).then(|| Pick {
                    endpoint: ep.clone(),
                    probe: true,
                });
            }
            Some(Pick::plain(ep))
        };
        if let Balancer::RingHash(ring) = balancer {
            // Walk the ring from the key's point to the next distinct endpoint that may take
            // the request: a retry lands on the key's next endpoint, not the same one.
            let first = ring.pick(hash);
            if let Some(p) = admit(&eps[first], true) {
                return Some(p);
            }
            let mut seen = vec![false; eps.len()];
            let mut distinct = 0;
            for i in ring.walk(hash) {
                if std::mem::replace(&mut seen[i], true) {
                    continue;
                }
                distinct += 1;
                if let Some(p) = admit(&eps[i], true) {
                    return Some(p);
                }
                if distinct == eps.len() {
                    break;
                }
            }
            // Every endpoint was tried already or cannot take it: the tried ones, in ring order.
            return ring
                .walk(hash)
                .find_map(|i| admit(&eps[i], false))
                .or_else(|| Some(Pick::plain(&eps[first])));
        }
        for _ in 0..3 {
            let index = match balancer {
                Balancer::RoundRobin(s) => s.next(),
                Balancer::Random(c) => c.pick(),
                Balancer::LeastRequest(c) => {
                    let a = c.pick();
                    let mut b = c.pick();
                    if b == a && eps.len() > 1 {
                        // Two distinct candidates, so one busy endpoint cannot be picked twice.
                        b = (a + 1 + fastrand::usize(..eps.len() - 1)) % eps.len();
                    }
                    // Fewer in-flight requests per unit of weight wins.
                    let load =
                        |i: usize| eps[i].state.active_requests.load(Ordering::Relaxed) as u64;
                    if load(a) * eps[b].weight as u64 <= load(b) * eps[a].weight as u64 {
                        a
                    } else {
                        b
                    }
                }
                Balancer::RingHash(_) => unreachable!("handled above"),
            };
            if let Some(p) = admit(&eps[index], true) {
                return Some(p);
            }
        }
        // The balancer kept landing on endpoints that cannot take the request (tried, or
        // ejected or probing and not yet rebuilt out): take the first that can, from a
        // random start, preferring untried ones.
        let start = fastrand::usize(..eps.len());
        let in_turn = || {
            (0..eps.len())
                .map(|k| &eps[(start + k) % eps.len()])
                .filter(|ep| ep.weight > 0)
        };
        in_turn()
            .find_map(|ep| admit(ep, true))
            .or_else(|| in_turn().find_map(|ep| admit(ep, false)))
            // None can take it (all ejected, or half-open with their probes out): no endpoint
            // is usable, which is panic mode: balance over all of them, as Envoy would.
            .or_else(|| in_turn().next().map(Pick::plain))
    }

    /// Feeds the outcome of the attempt that `pick` made to outlier detection; a probe's
    /// outcome decides the breaker, which uses up its slot.
    pub fn observe_pick(&self, pick: &mut Pick, obs: Observation) {
        if self.outlier.is_some() {
            pick.probe = false;
        }
        self.observe(&pick.endpoint, obs);
    }

    /// Feeds one request's outcome to outlier detection.
    pub fn observe(&self, ep: &Endpoint, obs: Observation) {
        let Some(cfg) = &self.outlier else { return };
        let now = Instant::now();
        // Never more than max_ejection_percent ejected, but one may always go.
        let may_eject = || {
            let members = self.members.load();
            let total = members.endpoints.len() as u64;
            let ejected = members
                .endpoints
                .iter()
                .filter(|e| e.state.breaker.is_open())
                .count() as u64;
            ejected == 0 || (ejected + 1) * 100 <= total * cfg.max_ejection_percent as u64
        };
        if let Some(t) = ep.state.breaker.observe(cfg, obs, may_eject, now) {
            self.transitioned(ep, t);
        }
    }

    /// A health check passed: an ejected endpoint comes back at once.
    pub fn health_check_passed(&self, ep: &Endpoint) {
        if let Some(t) = ep.state.breaker.reset(Instant::now()) {
            self.transitioned(ep, t);
        }
    }

    /// Active health changed.
    pub fn set_health(&self, ep: &Endpoint, healthy: bool) {
        ep.state.healthy.store(healthy, Ordering::Release);
        tracing::warn!(
            cluster = %self.name,
            endpoint = %ep.address,
            from = if healthy { "unhealthy" } else { "healthy" },
            to = if healthy { "healthy" } else { "unhealthy" },
            why = "health_check",
            "endpoint health changed"
        );
        self.rebuild_soon();
    }

    fn transitioned(&self, ep: &Endpoint, t: Transition) {
        tracing::warn!(
            cluster = %self.name,
            endpoint = %ep.address,
            from = t.from.label(),
            to = t.to.label(),
            why = t.reason,
            "endpoint breaker changed"
        );
        if let BreakerState::Open(until) = t.to {
            self.metrics.ejection(t.reason);
            self.spawn_unejection(ep, until);
        }
        self.rebuild_soon();
    }

    /// Moves `ep` from open to half-open at `until`, then rebuilds every live cluster that
    /// holds it: the cluster that ejected it may have been replaced by a reload meanwhile.
    fn spawn_unejection(&self, ep: &Endpoint, until: Instant) {
        let (state, addr) = (ep.state.clone(), ep.address);
        tokio::spawn(async move {
            tokio::time::sleep_until(until.into()).await;
            let owners = state.owners();
            if owners.is_empty() {
                // The endpoint left every cluster; its state goes with this task.
                return;
            }
            if let Some(t) = state.breaker.expire(Instant::now()) {
                tracing::warn!(
                    cluster = %owners[owners.len() - 1].name,
                    endpoint = %addr,
                    from = t.from.label(),
                    to = t.to.label(),
                    why = t.reason,
                    "endpoint breaker changed"
                );
            }
            for cluster in owners {
                cluster.rebuild_soon();
            }
        });
    }
}

/// A TLS cluster's connectors and the server name they send.
pub struct UpstreamTls {
    /// Offers the cluster's protocol by ALPN (`h2`, `http/1.1`, or both for `auto`).
    pub connector: tokio_rustls::TlsConnector,
    /// Offers `http/1.1` only: for upgrades (WebSocket), which need an HTTP/1.1 connection,
    /// and for HTTP/1.1 connections to an `auto` endpoint that chose it.
    pub http1: tokio_rustls::TlsConnector,
    /// `sni`, else the host of the first endpoint as written.
    pub name: ServerName<'static>,
}

fn tls_connector(
    raw: &RawCluster,
    tls: &crate::config::raw::RawClusterTls,
) -> Result<UpstreamTls, String> {
    let alpn: &[&[u8]] = match raw.protocol {
        UpstreamProtocol::Http2 => &[b"h2"],
        UpstreamProtocol::Http1 => &[b"http/1.1"],
        UpstreamProtocol::Auto => &[b"h2", b"http/1.1"],
    };
    let config = crate::tls::client_config(&tls.files(), alpn).map_err(|e| e.to_string())?;
    let http1 = match raw.protocol {
        UpstreamProtocol::Http1 => config.clone(),
        _ => crate::tls::client_config(&tls.files(), &[b"http/1.1"]).map_err(|e| e.to_string())?,
    };
    let host = raw.tls_server_name();
    let name =
        ServerName::try_from(host.clone()).map_err(|e| format!("server name `{host}`: {e}"))?;
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(config),
        http1: tokio_rustls::TlsConnector::from(http1),
        name,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn static_cluster(n: u16) -> Arc<Cluster> {
        let endpoints: Vec<String> = (1..=n)
            .map(|i| format!("{{ address: \"127.0.0.1:{i}\" }}"))
            .collect();
        // ring_hash: the slowest rebuild, so the threads' rebuilds overlap.
        let yaml = format!(
            "name: c\nlb_policy: ring_hash\nendpoints: [{}]\n",
            endpoints.join(", ")
        );
        let raw: RawCluster = serde_yaml_ng::from_str(&yaml).unwrap();
        Cluster::new(&raw, Metrics::new().cluster("c"), None)
    }

    /// Health flips from many threads at once: whatever the interleaving, the balancer ends
    /// up over exactly the endpoints that are healthy at the end (no rebuild that read older
    /// states may store after one that read newer).
    #[test]
    fn concurrent_rebuilds_never_lose_the_last_change() {
        for _ in 0..20 {
            let cluster = static_cluster(8);
            let endpoints = cluster.members().endpoints.clone();
            std::thread::scope(|s| {
                for (i, ep) in endpoints.iter().enumerate() {
                    let cluster = &cluster;
                    s.spawn(move || {
                        for round in 0..200 {
                            cluster.set_health(ep, round % 2 == 1);
                        }
                        // Even endpoints end healthy, odd ones unhealthy.
                        cluster.set_health(ep, i % 2 == 0);
                    });
                }
            });
            let chosen: Vec<u16> = cluster
                .members()
                .chosen
                .iter()
                .map(|e| e.address.port())
                .collect();
            assert_eq!(chosen, [1, 3, 5, 7], "balancer over stale states");
        }
    }
}
