//! The ADS state-of-the-world server behind `remora control-plane`: one snapshot per node
//! group, checked for consistency before it is served, pushed to every stream of the group
//! type by type in make-before-break order, and never resent at a version a client NACKed.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use futures_core::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::resources::{assignment_name, rds_names, Named, Resources, TypeUrl};

/// What one node group is served.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Per type: the version (a hash of its resources) and the encoded resources.
    types: HashMap<TypeUrl, (String, Vec<Named>)>,
}

impl Snapshot {
    /// Builds a snapshot after checking that it holds together: every EDS cluster has its
    /// ClusterLoadAssignment and every listener's RDS name its RouteConfiguration (a client
    /// would otherwise wait for them for ever). Errors name what is missing.
    pub fn new(resources: &Resources) -> Result<Snapshot, Vec<String>> {
        let mut errors = Vec::new();
        let assignments: BTreeSet<&str> = resources
            .endpoints
            .iter()
            .map(|e| e.cluster_name.as_str())
            .collect();
        for c in &resources.clusters {
            if let Some(wanted) = assignment_name(c) {
                if !assignments.contains(wanted.as_str()) {
                    errors.push(format!(
                        "cluster `{}`: no ClusterLoadAssignment `{wanted}`",
                        c.name
                    ));
                }
            }
        }
        let routes: BTreeSet<&str> = resources
            .route_configs
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        for l in &resources.listeners {
            for name in rds_names(l) {
                if !routes.contains(name.as_str()) {
                    errors.push(format!(
                        "listener `{}`: no RouteConfiguration `{name}`",
                        l.name
                    ));
                }
            }
        }
        for kind in TypeUrl::ALL {
            let mut seen = BTreeSet::new();
            for r in resources.encoded(kind) {
                if !seen.insert(r.name.clone()) {
                    errors.push(format!("{}: duplicate name `{}`", kind.label(), r.name));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let types = TypeUrl::ALL
            .into_iter()
            .map(|kind| {
                let encoded = resources.encoded(kind);
                (kind, (version_of(&encoded), encoded))
            })
            .collect();
        Ok(Snapshot { types })
    }
}

/// A version string for one type's resources: the same resources give the same version,
/// so an unchanged type is not sent again.
fn version_of(resources: &[Named]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in resources {
        for b in r.name.bytes().chain(r.any.value.iter().copied()) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h = h.rotate_left(5);
    }
    format!("{h:016x}")
}

/// The snapshots by node group, and a signal when one changes.
pub struct Cache {
    groups: Mutex<HashMap<String, Arc<Snapshot>>>,
    changed: watch::Sender<u64>,
    /// NACKs received, over all streams.
    pub nacks: AtomicU64,
    /// Streams open now.
    pub streams: AtomicU64,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            groups: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
            nacks: AtomicU64::new(0),
            streams: AtomicU64::new(0),
        }
    }
}

impl Cache {
    /// Serves `snapshot` to the node group `group` from now on.
    pub fn set(&self, group: &str, snapshot: Snapshot) {
        self.groups
            .lock()
            .expect("cache lock")
            .insert(group.to_string(), Arc::new(snapshot));
        self.changed.send_modify(|n| *n += 1);
    }

    fn get(&self, group: &str) -> Option<Arc<Snapshot>> {
        self.groups.lock().expect("cache lock").get(group).cloned()
    }
}

/// Which node group a node belongs to.
pub type GroupOf = Arc<dyn Fn(&Node) -> String + Send + Sync>;

/// The ADS service.
#[derive(Clone)]
pub struct AdsServer {
    cache: Arc<Cache>,
    group_of: GroupOf,
}

impl AdsServer {
    pub fn new(cache: Arc<Cache>, group_of: GroupOf) -> AdsServer {
        AdsServer { cache, group_of }
    }

    /// The tonic service to add to a server.
    pub fn service(self) -> AggregatedDiscoveryServiceServer<AdsServer> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let stream = StreamState {
            cache: self.cache.clone(),
            group_of: self.group_of.clone(),
            group: None,
            types: HashMap::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        Err(Status::unimplemented(
            "remora control-plane serves state-of-the-world ADS only",
        ))
    }
}

/// One type's state on one stream.
#[derive(Default)]
struct TypeState {
    /// The client asked for this type at all.
    subscribed: bool,
    /// Names asked for (RDS, EDS); LDS and CDS are wildcard.
    names: BTreeSet<String>,
    /// The names the last response was made for.
    sent_names: Option<BTreeSet<String>>,
    /// The version last sent, and its nonce.
    sent_version: Option<String>,
    nonce: String,
    /// A version the client refused: not sent again.
    nacked_version: Option<String>,
}

struct StreamState {
    cache: Arc<Cache>,
    group_of: GroupOf,
    group: Option<String>,
    types: HashMap<TypeUrl, TypeState>,
    nonce: u64,
}

impl StreamState {
    async fn run(
        mut self,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        self.cache.streams.fetch_add(1, Ordering::Relaxed);
        let mut changed = self.cache.changed.subscribe();
        loop {
            tokio::select! {
                request = inbound.message() => match request {
                    Ok(Some(req)) => self.on_request(req),
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(%status, "ADS stream ended");
                        break;
                    }
                },
                result = changed.changed() => {
                    if result.is_err() {
                        break;
                    }
                }
            }
            if !self.push(&tx).await {
                break;
            }
        }
        self.cache.streams.fetch_sub(1, Ordering::Relaxed);
    }

    fn on_request(&mut self, req: DiscoveryRequest) {
        if self.group.is_none() {
            let node = req.node.clone().unwrap_or_default();
            self.group = Some((self.group_of)(&node));
            tracing::info!(node = %node.id, cluster = %node.cluster, group = ?self.group, "ADS stream opened");
        }
        let Some(kind) = TypeUrl::parse(&req.type_url) else {
            tracing::debug!(type_url = %req.type_url, "request for a type not served");
            return;
        };
        let state = self.types.entry(kind).or_default();
        // A request answering an older response than the last one sent is stale: the client
        // will answer the newest one too.
        if !req.response_nonce.is_empty() && req.response_nonce != state.nonce {
            return;
        }
        if let Some(error) = &req.error_detail {
            self.cache.nacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                kind = kind.label(),
                version = ?state.sent_version,
                error = %error.message,
                "client NACKed a response; not sending that version again"
            );
            state.nacked_version = state.sent_version.clone();
        }
        state.subscribed = true;
        state.names = req.resource_names.into_iter().collect();
    }

    /// Sends every type whose content or subscription changed, in make-before-break order.
    /// Returns false when the client has gone.
    async fn push(&mut self, tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>) -> bool {
        let Some(snapshot) = self.group.as_ref().and_then(|g| self.cache.get(g)) else {
            return true;
        };
        for kind in TypeUrl::ALL {
            let Some(state) = self.types.get_mut(&kind) else {
                continue;
            };
            let Some((version, resources)) = snapshot.types.get(&kind) else {
                continue;
            };
            if !state.subscribed {
                continue;
            }
            let names_changed = kind.by_name() && state.sent_names.as_ref() != Some(&state.names);
            let fresh = state.sent_version.as_ref() != Some(version);
            if !fresh && !names_changed {
                continue;
            }
            if state.nacked_version.as_ref() == Some(version) && !names_changed {
                continue;
            }
            let chosen: Vec<_> = resources
                .iter()
                .filter(|r| !kind.by_name() || state.names.contains(&r.name))
                .map(|r| r.any.clone())
                .collect();
            self.nonce += 1;
            state.nonce = self.nonce.to_string();
            state.sent_version = Some(version.clone());
            state.sent_names = Some(state.names.clone());
            let response = DiscoveryResponse {
                version_info: version.clone(),
                resources: chosen,
                type_url: kind.as_str(),
                nonce: state.nonce.clone(),
                ..Default::default()
            };
            if tx.send(Ok(response)).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Serves ADS on `listener` (h2c gRPC) until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: AdsServer,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(server.service())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await
}
