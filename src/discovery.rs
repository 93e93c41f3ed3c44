//! The xDS feed at the sidecar: ADS responses become reloads through the one reloader, each
//! answered with an ACK or a NACK that names what is wrong; the resources that listeners and
//! clusters reference are subscribed to as they change.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use remora_xds::client::{self, Event, Subscriptions};
use remora_xds::envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType,
};
use remora_xds::envoy_types::pb::envoy::config::core::v3::Node;
use remora_xds::server::rds_names;
use remora_xds::{Resources, TypeUrl};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::AdminState;
use crate::config::raw::RawXds;
use crate::config::xds::from_envoy;
use crate::config::RawConfig;
use crate::metrics::Metrics;
use crate::reloader::{Command, Outcome};

/// Default `xds.initial_fetch_timeout`.
pub const DEFAULT_INITIAL_FETCH_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts the client and the task that turns its updates into reloads. `/ready` turns 200
/// once listeners and clusters have arrived and been applied, or after the initial fetch
/// timeout with whatever there is.
pub(crate) fn spawn(
    raw: &RawConfig,
    xds: &RawXds,
    control: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
) {
    let node = raw.node.clone().unwrap_or_default();
    let config = client::Config {
        address: xds.address.clone(),
        node: Node {
            id: node.id.unwrap_or_else(hostname),
            cluster: node.cluster.unwrap_or_default(),
            user_agent_name: "remora".into(),
            ..Default::default()
        },
    };
    let (subscriptions_tx, subscriptions) = watch::channel(Subscriptions::default());
    let (events_tx, events) = mpsc::channel(16);
    tokio::spawn(client::run(config, subscriptions, events_tx));
    let initial = xds
        .initial_fetch_timeout
        .map_or(DEFAULT_INITIAL_FETCH_TIMEOUT, |d| d.0);
    {
        let admin = admin.clone();
        tokio::spawn(async move {
            tokio::time::sleep(initial).await;
            if !admin.ready.swap(true, Ordering::Relaxed) {
                tracing::warn!(timeout = ?initial, "no complete config from the control plane yet; ready with what there is");
            }
        });
    }
    let feed = Feed {
        accepted: Resources::default(),
        applied: BTreeSet::new(),
        control,
        metrics,
        admin,
        subscriptions: subscriptions_tx,
        cache_file: xds.cache_file.as_ref().map(PathBuf::from),
    };
    tokio::spawn(feed.run(events));
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "remora".into())
}

struct Feed {
    /// The resources in force, per type (state of the world).
    accepted: Resources,
    /// The types accepted at least once.
    applied: BTreeSet<TypeUrl>,
    control: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
    subscriptions: watch::Sender<Subscriptions>,
    /// Where accepted resources are kept for the next start.
    cache_file: Option<PathBuf>,
}

impl Feed {
    async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        self.load_cache().await;
        while let Some(event) = events.recv().await {
            match event {
                Event::Connected(up) => self.metrics.xds_connected.set(up as i64),
                Event::Update {
                    kind,
                    version,
                    resources,
                    verdict,
                } => {
                    let result = self.apply(kind, &resources).await;
                    let label = if result.is_ok() { "ack" } else { "nack" };
                    self.metrics
                        .xds_updates
                        .with_label_values(&[kind.label(), label])
                        .inc();
                    if let Err(reason) = &result {
                        tracing::warn!(kind = kind.label(), %version, %reason, "xDS update refused");
                    } else {
                        let now = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default();
                        self.metrics
                            .xds_last_update
                            .with_label_values(&[kind.label()])
                            .set(now.as_secs_f64());
                    }
                    let _ = verdict.send(result);
                }
            }
        }
    }

    /// Serves the resources a previous run accepted, before the control plane answers (a
    /// restart while it is down). A cache that cannot be read or applied is ignored.
    async fn load_cache(&mut self) {
        let Some(path) = self.cache_file.clone() else {
            return;
        };
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let cached = match Resources::from_bytes(&bytes) {
            Ok(c) => c,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "xDS cache not used");
                return;
            }
        };
        match self.install(cached).await {
            Ok(()) => {
                tracing::info!(path = %path.display(), "serving the cached xDS config until the control plane answers");
                self.admin.ready.store(true, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(path = %path.display(), %error, "xDS cache not applied"),
        }
    }

    /// Writes the accepted resources to the cache file (atomically: a crash leaves the old).
    fn save_cache(&self) {
        let Some(path) = &self.cache_file else {
            return;
        };
        let tmp = path.with_extension("tmp");
        let written = std::fs::write(&tmp, self.accepted.to_bytes())
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot write the xDS cache");
        }
    }

    /// Applies one type's new state of the world with the rest as accepted; on success it
    /// becomes the accepted state and the subscriptions follow it.
    async fn apply(
        &mut self,
        kind: TypeUrl,
        resources: &[remora_xds::envoy_types::pb::google::protobuf::Any],
    ) -> Result<(), String> {
        let mut next = self.accepted.clone();
        next.decode_into(kind, resources)?;
        self.install(next).await?;
        self.applied.insert(kind);
        if self.applied.contains(&TypeUrl::Listener) && self.applied.contains(&TypeUrl::Cluster) {
            self.admin.ready.store(true, Ordering::Relaxed);
        }
        self.save_cache();
        Ok(())
    }

    /// Puts `next` in force through the reloader; on success it is the accepted state and
    /// the subscriptions follow it.
    async fn install(&mut self, next: Resources) -> Result<(), String> {
        // Warming, as Envoy: a listener waits for its route config (it is left out until it
        // arrives rather than refused).
        let routes: BTreeSet<&str> = next.route_configs.iter().map(|r| r.name.as_str()).collect();
        let mut serving = next.clone();
        serving
            .listeners
            .retain(|l| rds_names(l).iter().all(|n| routes.contains(n.as_str())));
        let dynamic = from_envoy(&serving).map_err(|errors| errors.join("; "))?;
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Command::Dynamic { dynamic, reply })
            .await
            .map_err(|_| "remora is shutting down".to_string())?;
        match answer.await {
            Ok(Outcome::Applied { .. } | Outcome::Unchanged) => {}
            Ok(Outcome::Rejected(errors) | Outcome::Failed(errors)) => {
                return Err(errors.join("; "))
            }
            Err(_) => return Err("remora is shutting down".into()),
        }
        self.accepted = next;
        self.subscriptions.send_replace(wanted(&self.accepted));
        Ok(())
    }
}

/// The route configs the accepted listeners ask for and the assignments the EDS clusters do.
fn wanted(res: &Resources) -> Subscriptions {
    Subscriptions {
        routes: res.listeners.iter().flat_map(rds_names).collect(),
        endpoints: res
            .clusters
            .iter()
            .filter(|c| {
                c.cluster_discovery_type
                    == Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
            })
            .map(|c| {
                c.eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| c.name.clone())
            })
            .collect(),
    }
}
