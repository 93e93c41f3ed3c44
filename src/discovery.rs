//! The xDS feed at the sidecar: ADS responses become reloads through the one reloader, each
//! answered with an ACK or a NACK that names what is wrong; the resources that listeners and
//! clusters reference are subscribed to as they change.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use remora_xds::client::{self, Event, Subscriptions};
use remora_xds::envoy_types::pb::envoy::config::core::v3::Node;
use remora_xds::envoy_types::pb::envoy::config::listener::v3::Listener;
use remora_xds::{assignment_name, rds_names, Resources, TypeUrl};
use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::AdminState;
use crate::config::raw::RawXds;
use crate::config::xds::{endpoints_from, from_envoy, Dynamic};
use crate::config::RawConfig;
use crate::metrics::Metrics;
use crate::reloader::{Command, Outcome};

/// How often an update that could not be applied for a passing reason is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(5);

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
        address: control_plane_address(raw, xds),
        node: Node {
            id: node.id.unwrap_or_else(hostname),
            cluster: node.cluster.unwrap_or_default(),
            user_agent_name: "remora".into(),
            ..Default::default()
        },
    };
    let static_eds: BTreeSet<String> = raw
        .clusters
        .iter()
        .filter(|c| c.discovery == crate::config::raw::DiscoveryType::Eds)
        .map(|c| c.name.clone())
        .collect();
    let (subscriptions_tx, subscriptions) = watch::channel(Subscriptions {
        routes: BTreeSet::new(),
        endpoints: static_eds.clone(),
    });
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
        in_force: None,
        static_eds,
        warming: 0,
        retry: None,
    };
    tokio::spawn(feed.run(events));
}

/// The control plane's `host:port`: the `address`, or the first endpoint of the named
/// static cluster (validated to exist).
fn control_plane_address(raw: &RawConfig, xds: &RawXds) -> String {
    xds.address.clone().unwrap_or_else(|| {
        raw.clusters
            .iter()
            .find(|c| Some(&c.name) == xds.cluster.as_ref())
            .and_then(|c| c.endpoints.first())
            .map(|e| e.address.clone())
            .unwrap_or_default()
    })
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
    /// What is in force when it differs from `accepted`: the accepted resources, with the
    /// previous version of a listener whose new route config has not come yet. `None` most
    /// of the time: a big mesh's resources are not kept twice.
    in_force: Option<Resources>,
    /// The static config's `type: eds` clusters, fed by EDS too.
    static_eds: BTreeSet<String>,
    /// Where accepted resources are kept for the next start.
    cache_file: Option<PathBuf>,
    /// Listeners waiting for their route config and EDS clusters for their assignment.
    warming: usize,
    /// A valid response that could not be applied yet (its type, version and resources),
    /// tried again on a timer on top of what is accepted then.
    retry: Option<(
        TypeUrl,
        String,
        Vec<remora_xds::envoy_types::pb::google::protobuf::Any>,
    )>,
}

impl Feed {
    /// The resources in force (see `in_force`).
    fn in_force(&self) -> &Resources {
        self.in_force.as_ref().unwrap_or(&self.accepted)
    }

    async fn run(mut self, mut events: mpsc::Receiver<Event>) {
        self.load_cache().await;
        let mut retry_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + RETRY_EVERY, RETRY_EVERY);
        retry_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(e) => e,
                    None => return,
                },
                _ = retry_timer.tick(), if self.retry.is_some() => {
                    self.retry_pending().await;
                    continue;
                }
            };
            match event {
                Event::Connected(up) => self.metrics.xds_connected.set(up as i64),
                Event::Refused { kind, reason } => {
                    tracing::warn!(kind = kind.label(), %reason, "xDS update refused");
                    self.metrics
                        .xds_updates
                        .with_label_values(&[kind.label(), "nack"])
                        .inc();
                }
                Event::Update {
                    kind,
                    version,
                    resources,
                    verdict,
                } => {
                    let started = std::time::Instant::now();
                    let result = self.apply(kind, &version, &resources).await;
                    self.metrics
                        .xds_apply_duration
                        .with_label_values(&[kind.label()])
                        .observe(started.elapsed().as_secs_f64());
                    let label = if result.is_ok() { "ack" } else { "nack" };
                    self.metrics
                        .xds_updates
                        .with_label_values(&[kind.label(), label])
                        .inc();
                    if let Err(reason) = &result {
                        tracing::warn!(kind = kind.label(), %version, %reason, "xDS update refused");
                    } else {
                        self.note_accepted(kind, &version);
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
                if self.warming == 0 {
                    self.admin.ready.store(true, Ordering::Relaxed);
                }
            }
            Err(Refusal::Invalid(error) | Refusal::Transient(error)) => {
                tracing::warn!(path = %path.display(), %error, "xDS cache not applied")
            }
        }
    }

    /// Writes the accepted resources to the cache file (atomically: a crash leaves the old).
    async fn save_cache(&self) {
        let Some(path) = &self.cache_file else {
            return;
        };
        // What is in force, not what was accepted: a listener still warming has its previous
        // version there, which a restart can serve at once.
        let (path, bytes) = (path.clone(), self.in_force().to_bytes());
        // On a blocking thread (a big config is megabytes), and finished before the update is
        // answered: the cache never lags behind what was acknowledged.
        let write = tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("tmp");
            let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(error) = written {
                tracing::warn!(path = %path.display(), %error, "cannot write the xDS cache");
            }
        });
        let _ = write.await;
    }

    /// Applies one response with the rest as accepted. LDS and CDS responses are the whole
    /// state of the world; RDS and EDS responses may carry only some names (the others stay),
    /// and what no listener or cluster references any more is dropped.
    async fn apply(
        &mut self,
        kind: TypeUrl,
        version: &str,
        resources: &[remora_xds::envoy_types::pb::google::protobuf::Any],
    ) -> Result<(), String> {
        let mut next = self.accepted.clone();
        if kind.by_name() {
            let mut update = Resources::default();
            update.decode_into(kind, resources)?;
            merge_by_name(&mut next, update);
        } else {
            next.decode_into(kind, resources)?;
        }
        // A newer response of a type replaces any retry of an older one.
        if self.retry.as_ref().is_some_and(|(k, _, _)| *k == kind) {
            self.retry = None;
        }
        match self.install(next).await {
            Ok(()) => {}
            Err(Refusal::Transient(reason)) => {
                // Valid, but it could not be applied now (an address still held): tried again
                // here, on top of whatever is accepted then, since the control plane will not
                // resend a version we refused.
                self.retry = Some((kind, version.to_string(), resources.to_vec()));
                return Err(reason);
            }
            Err(Refusal::Invalid(reason)) => return Err(reason),
        }
        self.applied.insert(kind);
        self.update_readiness();
        self.save_cache().await;
        Ok(())
    }

    /// Puts `next` in force through the reloader; on success it is the accepted state and the
    /// subscriptions follow it. Every resource is converted (so that an error in a listener
    /// still warming is reported now); then, as Envoy warms: a new listener waits for its
    /// route config, and a changed one keeps serving its previous version until the new route
    /// config arrives.
    async fn install(&mut self, next: Resources) -> Result<(), Refusal> {
        convert(&next).map_err(Refusal::Invalid)?;
        let routes: BTreeSet<String> = next.route_configs.iter().map(|r| r.name.clone()).collect();
        let ready = |l: &Listener| rds_names(l).iter().all(|n| routes.contains(n));
        let mut serving = next.clone();
        serving.listeners = next
            .listeners
            .iter()
            .filter_map(|l| {
                if ready(l) {
                    return Some(l.clone());
                }
                self.in_force()
                    .listeners
                    .iter()
                    .find(|old| old.name == l.name && ready(old))
                    .cloned()
            })
            .collect();
        // Route configs no listener (new or still serving) names are left out: RDS responses
        // may leave names out, so removal is by reference.
        let named: BTreeSet<String> = next
            .listeners
            .iter()
            .chain(serving.listeners.iter())
            .flat_map(rds_names)
            .collect();
        let mut next = next;
        next.route_configs.retain(|r| named.contains(&r.name));
        serving.route_configs.retain(|r| named.contains(&r.name));
        let mut dynamic = convert(&serving).map_err(Refusal::Invalid)?;
        // A route naming a cluster CDS removed (or has not brought yet) answers 503
        // `cluster_not_found` until the routes change, as in Envoy.
        for name in &self.static_eds {
            if let Some(cla) = next.endpoints.iter().find(|e| &e.cluster_name == name) {
                let endpoints = endpoints_from(cla).map_err(|e| Refusal::Invalid(e.join("; ")))?;
                dynamic.assignments.insert(name.clone(), endpoints);
            }
        }
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Command::Dynamic { dynamic, reply })
            .await
            .map_err(|_| Refusal::Invalid("remora is shutting down".into()))?;
        match answer.await {
            Ok(Outcome::Applied { .. } | Outcome::Unchanged) => {}
            Ok(Outcome::Rejected(errors)) => return Err(Refusal::Invalid(errors.join("; "))),
            Ok(Outcome::Failed(errors)) => return Err(Refusal::Transient(errors.join("; "))),
            Err(_) => return Err(Refusal::Invalid("remora is shutting down".into())),
        }
        self.warming = next.listeners.len() - serving.listeners.iter().filter(|l| ready(l)).count()
            + next
                .clusters
                .iter()
                .filter(|c| {
                    assignment_name(c)
                        .is_some_and(|n| !next.endpoints.iter().any(|e| e.cluster_name == n))
                })
                .count();
        // Assignments no EDS cluster (new or still serving) names are dropped likewise.
        let mut keep = self.wanted(&next);
        let serving_wants = self.wanted(&serving);
        keep.routes.extend(serving_wants.routes);
        keep.endpoints.extend(serving_wants.endpoints);
        next.endpoints
            .retain(|e| keep.endpoints.contains(&e.cluster_name));
        serving
            .endpoints
            .retain(|e| keep.endpoints.contains(&e.cluster_name));
        // Route configs and assignments were kept alike in both: only listeners can differ.
        self.in_force = (serving.listeners != next.listeners).then_some(serving);
        self.accepted = next;
        self.subscriptions.send_replace(keep);
        Ok(())
    }

    /// The route configs the listeners ask for and the assignments the EDS clusters (and the
    /// static config's `type: eds` clusters) do.
    fn wanted(&self, res: &Resources) -> Subscriptions {
        let mut w = wanted(res);
        w.endpoints.extend(self.static_eds.iter().cloned());
        w
    }

    /// Ready once listeners and clusters have come and nothing is warming (every listener's
    /// route config and every EDS cluster's assignment is there); the initial fetch timeout
    /// makes it ready anyway.
    fn update_readiness(&self) {
        if self.warming > 0 {
            tracing::info!(warming = self.warming, "xDS resources still warming");
            return;
        }
        if self.applied.contains(&TypeUrl::Listener) && self.applied.contains(&TypeUrl::Cluster) {
            self.admin.ready.store(true, Ordering::Relaxed);
        }
    }

    /// Tries a response that failed for a passing reason again.
    async fn retry_pending(&mut self) {
        let Some((kind, version, resources)) = self.retry.take() else {
            return;
        };
        match self.apply(kind, &version, &resources).await {
            Ok(()) => {
                tracing::info!(kind = kind.label(), %version, "an xDS update that could not be applied earlier is in force");
                self.note_accepted(kind, &version);
            }
            Err(reason) if self.retry.is_some() => {
                tracing::debug!(%reason, "xDS update still cannot be applied")
            }
            Err(reason) => tracing::warn!(%reason, "an xDS update retried is now refused"),
        }
    }

    /// Records that `version` of `kind` is in force (for `/config` and the metrics).
    fn note_accepted(&self, kind: TypeUrl, version: &str) {
        self.admin
            .xds_versions
            .lock()
            .expect("admin lock")
            .insert(kind.label(), version.to_string());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .xds_last_update
            .with_label_values(&[kind.label()])
            .set(now.as_secs_f64());
    }
}

/// Why an update was not put in force.
enum Refusal {
    /// It is wrong: NACK.
    Invalid(String),
    /// It could not be applied now, but may later: NACK, and try again here.
    Transient(String),
}

/// Converts resources to remora's config; a panic in the conversion (a bug) is an error,
/// never the end of the feed.
fn convert(res: &Resources) -> Result<Dynamic, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| from_envoy(res)))
        .map_err(|_| "internal error while converting the resources (a bug)".to_string())?
        .map_err(|errors| errors.join("; "))
}

/// Adds or replaces, by name, the route configs and assignments of an RDS or EDS response.
fn merge_by_name(into: &mut Resources, update: Resources) {
    for rc in update.route_configs {
        into.route_configs.retain(|r| r.name != rc.name);
        into.route_configs.push(rc);
    }
    for cla in update.endpoints {
        into.endpoints
            .retain(|e| e.cluster_name != cla.cluster_name);
        into.endpoints.push(cla);
    }
}

/// The route configs the accepted listeners ask for and the assignments the EDS clusters do.
fn wanted(res: &Resources) -> Subscriptions {
    Subscriptions {
        routes: res.listeners.iter().flat_map(rds_names).collect(),
        endpoints: res.clusters.iter().filter_map(assignment_name).collect(),
    }
}
