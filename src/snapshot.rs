//! The running configuration: one immutable [`Snapshot`] behind one `ArcSwap`, replaced whole
//! by the single writer and announced on a watch channel.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::config::raw::{ListenerProtocol, RawConfig};
use crate::config::Written;
use crate::metrics::ListenerMetrics;
use crate::router::RouteTable;

pub use crate::config::raw::DEFAULT_ADMIN_ADDRESS;

/// A listener's settings, defaults applied.
#[derive(Clone)]
pub struct ListenerSettings {
    pub name: Arc<str>,
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
    pub route_config: String,
    /// Bytes; default 60 KiB.
    pub max_request_headers_bytes: usize,
    /// Default 100.
    pub max_request_headers_count: usize,
    /// Default 10s; `None` disables.
    pub request_headers_timeout: Option<Duration>,
    /// Default 300s; `None` disables.
    pub idle_timeout: Option<Duration>,
    /// Default 300s; `None` disables.
    pub stream_idle_timeout: Option<Duration>,
    /// Default 8192.
    pub max_connections: usize,
    /// Normalize paths before routing (RFC 3986 §6.2.2). Default false.
    pub normalize_path: bool,
    /// Merge runs of slashes before routing. Default false.
    pub merge_slashes: bool,
    pub access_log: Option<PathBuf>,
    /// HTTPS, as configured. Default: plain.
    pub tls: Option<crate::config::raw::RawListenerTls>,
    pub metrics: ListenerMetrics,
}

/// Everything a request needs, compiled from one config version.
pub struct Snapshot {
    /// Increases by one with every config that takes effect.
    pub version: u64,
    /// Where it came from: a file path, `demo`, `xds`.
    pub source: String,
    /// Hash of the config text (hex), to tell versions apart and skip no-op reloads.
    pub hash: String,
    pub loaded_at: SystemTime,
    /// The config as read, but for its route configs: those are compiled into the route
    /// tables and not kept (for a big mesh they are most of it). For restart checks and the
    /// TLS files.
    pub raw: RawConfig,
    /// The whole config as written, for `/config` (see [`crate::config::shown`]).
    pub written: Written,
    pub admin_address: SocketAddr,
    pub workers: Option<usize>,
    pub listeners: Vec<ListenerSettings>,
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Route tables by route config name.
    route_tables: HashMap<String, Arc<RouteTable>>,
    /// Route table for each listener, by listener name.
    routes_by_listener: HashMap<Arc<str>, Arc<RouteTable>>,
}

impl Snapshot {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        version: u64,
        source: String,
        hash: String,
        raw: RawConfig,
        written: Written,
        admin_address: SocketAddr,
        workers: Option<usize>,
        listeners: Vec<ListenerSettings>,
        clusters: BTreeMap<String, Arc<Cluster>>,
        route_tables: HashMap<String, Arc<RouteTable>>,
    ) -> Snapshot {
        let routes_by_listener = listeners
            .iter()
            .filter_map(|l| Some((l.name.clone(), route_tables.get(&l.route_config)?.clone())))
            .collect();
        Snapshot {
            version,
            source,
            hash,
            loaded_at: SystemTime::now(),
            raw,
            written,
            admin_address,
            workers,
            listeners,
            clusters,
            route_tables,
            routes_by_listener,
        }
    }

    /// Every route table, in no particular order.
    pub fn route_tables(&self) -> impl Iterator<Item = &Arc<RouteTable>> {
        self.route_tables.values()
    }

    /// The route table compiled from the route config `name`.
    pub fn route_table(&self, name: &str) -> Option<&Arc<RouteTable>> {
        self.route_tables.get(name)
    }

    /// The route table serving a listener: the one this snapshot gives the listener's name,
    /// else the route config the listener names. The second covers a connection still
    /// holding its listener's previous settings: after a rename, or for a moment after a
    /// reload (the snapshot is swapped just before listener settings are).
    pub fn routes(&self, listener: &ListenerSettings) -> Option<&RouteTable> {
        self.routes_by_listener
            .get(&listener.name)
            .or_else(|| self.route_tables.get(&listener.route_config))
            .map(|t| &**t)
    }
}

/// Holds the current snapshot. Readers `load()`; only the reloader calls `store()`.
pub struct SnapshotStore {
    current: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
}

impl SnapshotStore {
    pub fn new(first: Snapshot) -> SnapshotStore {
        let (version, _) = watch::channel(first.version);
        SnapshotStore {
            current: ArcSwap::from_pointee(first),
            version,
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn store(&self, next: Snapshot) {
        let v = next.version;
        self.current.store(Arc::new(next));
        self.version.send_replace(v);
    }

    /// Announces each new version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}
