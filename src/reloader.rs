//! The one writer: every config change (file watcher, SIGHUP, API) goes through this task:
//! parse → validate → compile → bind new listeners → swap → retarget or drain listeners.
//! On any error the running config stays, and the attempt is logged, counted and shown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{AdminState, Rejection};
use crate::config::compile::{compile, Origin};
use crate::config::locate::{Seg, SourceMap};
use crate::config::xds::Dynamic;
use crate::config::{self, ConfigError, RawConfig};
use crate::listener::{self, Listener, Prepared};
use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, SnapshotStore, DEFAULT_ADMIN_ADDRESS};

/// How long a reload waits for a new `strict_dns` cluster's first answer.
pub const DNS_WARMUP: Duration = Duration::from_secs(5);
/// How long a listener removed by a reload gets to finish its connections.
const REMOVED_LISTENER_DRAIN: Duration = Duration::from_secs(25);

/// What asked for a reload; the `source` label of `remora_config_reloads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The file watcher saw the file change.
    File,
    /// SIGHUP.
    Signal,
    /// Config pushed by a caller (tests, the API).
    Api,
    /// Resources from the control plane.
    Xds,
}

impl Trigger {
    pub fn label(self) -> &'static str {
        match self {
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Api => "api",
            Trigger::Xds => "xds",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new version is in force.
    Applied { version: u64 },
    /// The content hash equals the running one; nothing to do.
    Unchanged,
    /// Kept the running config; these are the reasons, one per line.
    Rejected(Vec<String>),
    /// The config is valid but could not be applied now (an address in use, a file that
    /// cannot be read or opened); the running config stays, and trying again may work.
    Failed(Vec<String>),
}

pub(crate) enum Command {
    Reload {
        trigger: Trigger,
        /// Config text and the name to report it by; `None` reads the config file again.
        text: Option<(Arc<str>, String)>,
        reply: oneshot::Sender<Outcome>,
    },
    /// The config in force again, because a TLS file it names changed.
    RefreshTls { reply: oneshot::Sender<Outcome> },
    /// New resources from the control plane, to apply with the static config in force.
    Dynamic {
        dynamic: Dynamic,
        reply: oneshot::Sender<Outcome>,
    },
    Shutdown {
        timeout: Duration,
        reply: oneshot::Sender<usize>,
    },
}

pub(crate) struct Reloader {
    pub store: Arc<SnapshotStore>,
    pub metrics: Arc<Metrics>,
    pub admin: Arc<AdminState>,
    pub listeners: Vec<Listener>,
    pub file: Option<PathBuf>,
    /// The static config text in force and its name (dynamic resources are added to it);
    /// the text is the snapshot's own.
    pub static_text: (Arc<str>, String),
    /// The resources from the control plane in force, if any.
    pub dynamic: Option<Arc<Dynamic>>,
    /// Bound addresses by listener name, for callers that bind port 0.
    pub addresses: watch::Sender<HashMap<String, SocketAddr>>,
}

/// After a load that took effect, the memory it freed goes back to the OS (the old snapshot
/// and the parse are gone by then, or soon after).
fn trim_after(outcome: &Outcome) {
    if matches!(outcome, Outcome::Applied { .. }) {
        crate::memory::release_freed_soon();
    }
}

impl Reloader {
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        self.publish_addresses();
        while let Some(cmd) = commands.recv().await {
            match cmd {
                Command::Reload {
                    trigger,
                    text,
                    reply,
                } => {
                    let outcome = self.reload(trigger, text, None).await;
                    trim_after(&outcome);
                    let _ = reply.send(outcome);
                }
                Command::RefreshTls { reply } => {
                    let text = Some(self.static_text.clone());
                    let outcome = self.reload(Trigger::File, text, None).await;
                    trim_after(&outcome);
                    let _ = reply.send(outcome);
                }
                Command::Dynamic { dynamic, reply } => {
                    let text = Some(self.static_text.clone());
                    let outcome = self
                        .reload(Trigger::Xds, text, Some(Arc::new(dynamic)))
                        .await;
                    trim_after(&outcome);
                    let _ = reply.send(outcome);
                }
                Command::Shutdown { timeout, reply } => {
                    let drains: Vec<_> = self
                        .listeners
                        .drain(..)
                        .map(|l| tokio::spawn(l.drain(timeout)))
                        .collect();
                    let mut left = 0;
                    for d in drains {
                        left += d.await.unwrap_or(0);
                    }
                    let _ = reply.send(left);
                    return;
                }
            }
        }
    }

    /// Applies `text` (or the file) with `dynamic` (or the dynamic resources in force).
    async fn reload(
        &mut self,
        trigger: Trigger,
        text: Option<(Arc<str>, String)>,
        dynamic: Option<Arc<Dynamic>>,
    ) -> Outcome {
        let started = std::time::Instant::now();
        let (text, name) = match text {
            Some(t) => t,
            None => match &self.file {
                None => return Outcome::Unchanged,
                Some(path) => match std::fs::read_to_string(path) {
                    Ok(t) => (Arc::from(t), path.display().to_string()),
                    Err(e) => {
                        let error = format!("{}: cannot read config file: {e}", path.display());
                        return self.reject(trigger, String::new(), vec![error], true);
                    }
                },
            },
        };
        let dynamic = dynamic.or_else(|| self.dynamic.clone());
        let current = self.store.load();
        // The TLS files the running config names count too: a rotated certificate is a change.
        let files = current.raw.tls_files_digest();
        let hash = match &dynamic {
            None => crate::config::hash_with_files(&text, files),
            // The resources by their derived hash: formatting them all (as this once did)
            // cost more than the rest of a one-cluster update on a big mesh.
            Some(d) => format!(
                "{}{:016x}",
                crate::config::hash_with_files(&text, files),
                crate::hash::digest(d)
            ),
        };
        if hash == current.hash {
            tracing::debug!(source = trigger.label(), "config unchanged; not reloading");
            return Outcome::Unchanged;
        }
        let applied_static = (text.clone(), name.clone());
        // Parse, validate and compile cannot take the reloader down: a panic there (a bug)
        // rejects this config and leaves the running one, and the reloader, in place.
        let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // What did not change is not read again (`config::reuse`).
            let raw = config::reuse::parse(&text, &name, dynamic.as_deref(), &current)
                .map_err(|errors| errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
            let mut restart = needs_restart(&current, &raw, &text, &name);
            // The static `type: eds` clusters are subscribed to when the feed starts.
            let static_eds = |raw: &RawConfig, d: Option<&Dynamic>| -> Vec<String> {
                raw.clusters
                    .iter()
                    .filter(|c| c.discovery == config::raw::DiscoveryType::Eds)
                    .filter(|c| d.is_none_or(|d| !d.clusters.iter().any(|x| x.name == c.name)))
                    .map(|c| c.name.clone())
                    .collect()
            };
            if raw.xds.is_some()
                && static_eds(&current.raw, self.dynamic.as_deref())
                    != static_eds(&raw, dynamic.as_deref())
            {
                restart.push(format!(
                    "{name}: adding or removing a `type: eds` cluster in the file needs a restart (it is subscribed to at start)"
                ));
            }
            if !restart.is_empty() {
                return Err(restart);
            }
            let origin = Origin {
                version: current.version + 1,
                source: name,
                hash: hash.clone(),
                written: config::Written {
                    text: text.clone(),
                    dynamic: dynamic.clone(),
                },
            };
            Ok(compile(raw, origin, &self.metrics, Some(&current)))
        }));
        let next = match prepared {
            Ok(Ok(next)) => next,
            Ok(Err(errors)) => return self.reject(trigger, hash, errors, false),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let error = format!("internal error while loading the config (a bug): {what}");
                return self.reject(trigger, hash, vec![error], false);
            }
        };
        // A cluster this config brings made its series as it was built; if the config does
        // not take effect, they go (a cluster that never ran has nothing to show).
        let fresh: Vec<_> = next
            .clusters
            .iter()
            .filter(|(name, _)| !current.clusters.contains_key(*name))
            .map(|(_, c)| c.clone())
            .collect();
        match self.swap(next).await {
            Ok(version) => {
                self.static_text = applied_static;
                self.dynamic = dynamic;
                self.metrics
                    .config_reloads
                    .with_label_values(&[trigger.label(), "success"])
                    .inc();
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                self.metrics.config_last_success.set(now.as_secs_f64());
                // From reading the config to the swap: what `bench/scale` reports.
                let took_ms = started.elapsed().as_millis() as u64;
                tracing::info!(source = trigger.label(), version, %hash, took_ms, "config reloaded");
                Outcome::Applied { version }
            }
            Err((errors, transient)) => {
                for c in fresh {
                    c.metrics.remove();
                }
                self.reject(trigger, hash, errors, transient)
            }
        }
    }

    /// Starts the new snapshot's clusters, binds its new listeners, swaps it in, then
    /// retargets kept listeners and drains removed ones.
    /// On failure: the errors, and whether they may pass (a retry could succeed).
    async fn swap(&mut self, next: Snapshot) -> Result<u64, (Vec<String>, bool)> {
        // Pair each new listener with a running one: same name first, then same address.
        let mut old: Vec<Option<Listener>> = self.listeners.drain(..).map(Some).collect();
        let mut plan: Vec<Plan> = Vec::new();
        for settings in &next.listeners {
            let by_name = old.iter().position(|l| {
                l.as_ref()
                    .is_some_and(|l| l.settings().name == settings.name)
            });
            // Port 0 means "any free port": two such listeners never share a socket.
            let by_addr = || {
                old.iter().position(|l| {
                    settings.address.port() != 0
                        && l.as_ref()
                            .is_some_and(|l| l.settings().address == settings.address)
                })
            };
            match by_name.or_else(by_addr) {
                Some(i)
                    if old[i].as_ref().expect("unpaired").settings().address
                        == settings.address =>
                {
                    plan.push(Plan::Keep(
                        old[i].take().expect("unpaired"),
                        settings.clone(),
                    ));
                }
                _ => plan.push(Plan::Bind(settings.clone())),
            }
        }
        // Bind every new address before changing anything; a failure changes nothing.
        let mut errors = Vec::new();
        let mut permanent = false;
        let mut prepared: Vec<Option<Prepared>> = Vec::new();
        for p in &plan {
            match p {
                Plan::Bind(settings) => {
                    match listener::prepare(settings.clone(), self.store.clone()).await {
                        Ok(ready) => prepared.push(Some(ready)),
                        Err(e) => {
                            // Held by one of our own listeners (a listener moved onto an
                            // address overlapping one still bound), or refused for good
                            // (permission, no such local address): trying again cannot help.
                            let ours = old
                                .iter()
                                .flatten()
                                .any(|l| config::overlaps(l.settings().address, settings.address));
                            let fixed = ours || e.kind() != std::io::ErrorKind::AddrInUse;
                            permanent |= fixed;
                            let mut line = e.to_string();
                            if ours {
                                line.push_str(
                                    " (it overlaps a running listener's address, which is released only after this reload: move the listener in two reloads)",
                                );
                            }
                            errors.push(line);
                            prepared.push(None);
                        }
                    }
                }
                Plan::Keep(..) => prepared.push(None),
            }
        }
        // The kept listeners' new contexts (access log, TLS) too: a listener must never run
        // new settings beside an old TLS acceptor.
        let mut contexts = Vec::new();
        for p in &plan {
            match p {
                Plan::Keep(l, settings) => {
                    match l.prepare_update(settings.clone(), self.store.clone()) {
                        Ok(ctx) => contexts.push(Some(ctx)),
                        Err(e) => {
                            permanent = true;
                            errors.push(e.to_string());
                            contexts.push(None);
                        }
                    }
                }
                Plan::Bind(_) => contexts.push(None),
            }
        }
        if !errors.is_empty() {
            self.listeners = plan
                .into_iter()
                .filter_map(|p| match p {
                    Plan::Keep(l, _) => Some(l),
                    Plan::Bind(_) => None,
                })
                .chain(old.into_iter().flatten())
                .collect();
            return Err((errors, !permanent));
        }

        // Only now, with every address bound, do the new clusters start (health checks, DNS,
        // carried-over state): a reload that fails must leave no trace on shared endpoints.
        let current = self.store.load();
        let warmups: Vec<_> = next
            .clusters
            .iter()
            .filter(|(name, c)| {
                current
                    .clusters
                    .get(*name)
                    .is_none_or(|old| !Arc::ptr_eq(old, c))
            })
            .filter_map(|(_, c)| c.start())
            .collect();
        for w in warmups {
            let _ = tokio::time::timeout(DNS_WARMUP, w).await;
        }
        let version = next.version;
        let dropped: Vec<_> = current
            .clusters
            .iter()
            .filter(|(name, _)| !next.clusters.contains_key(*name))
            .map(|(_, c)| c.clone())
            .collect();
        let replaced: Vec<_> = current
            .clusters
            .iter()
            .filter(|(name, c)| next.clusters.get(*name).is_some_and(|n| !Arc::ptr_eq(n, c)))
            .map(|(_, c)| c.clone())
            .collect();
        self.store.store(next);
        for c in replaced {
            c.stop_publishing();
        }
        // A cluster the config dropped leaves `/metrics` with it.
        for c in dropped {
            c.metrics.remove();
        }
        for ((p, ready), ctx) in plan.into_iter().zip(prepared).zip(contexts) {
            match (p, ready) {
                (Plan::Keep(l, _), _) => {
                    l.update(ctx.expect("prepared above"));
                    self.listeners.push(l);
                }
                (Plan::Bind(_), Some(ready)) => self.listeners.push(ready.start()),
                (Plan::Bind(_), None) => unreachable!("bind failures returned above"),
            }
        }
        for removed in old.into_iter().flatten() {
            tracing::info!(listener = %removed.settings().name, "listener removed; draining");
            tokio::spawn(removed.drain(REMOVED_LISTENER_DRAIN));
        }
        self.publish_addresses();
        Ok(version)
    }

    fn reject(
        &self,
        trigger: Trigger,
        hash: String,
        errors: Vec<String>,
        transient: bool,
    ) -> Outcome {
        for e in &errors {
            tracing::error!(source = trigger.label(), error = %e, "config rejected; keeping the running one");
        }
        self.metrics
            .config_reloads
            .with_label_values(&[trigger.label(), "failure"])
            .inc();
        *self.admin.last_rejected.lock().expect("admin lock") = Some(Rejection {
            at: crate::access_log::rfc3339(SystemTime::now()),
            source: trigger.label(),
            hash,
            errors: errors.clone(),
            transient,
        });
        if transient {
            Outcome::Failed(errors)
        } else {
            Outcome::Rejected(errors)
        }
    }

    fn publish_addresses(&self) {
        let map = self
            .listeners
            .iter()
            .map(|l| (l.settings().name.to_string(), l.local_addr))
            .collect();
        self.addresses.send_replace(map);
    }
}

enum Plan {
    Keep(Listener, crate::snapshot::ListenerSettings),
    Bind(crate::snapshot::ListenerSettings),
}

/// Settings that only take effect at startup; a reload that changes them is rejected.
fn needs_restart(current: &Snapshot, next: &RawConfig, text: &str, file: &str) -> Vec<String> {
    let admin = |raw: &RawConfig| {
        raw.admin
            .as_ref()
            .map_or(DEFAULT_ADMIN_ADDRESS.to_string(), |a| a.address.clone())
    };
    let mut problems = Vec::new();
    // Located only when there is something to say: a big config's source map costs more
    // than the rest of a reload.
    let mut source = None;
    let mut complain = |path: Vec<Seg>, message: String| {
        let source = source.get_or_insert_with(|| SourceMap::parse(text));
        problems.push(
            ConfigError {
                file: file.to_string(),
                pos: source.locate(&path),
                path: config::locate::render_path(&path),
                message,
                did_you_mean: None,
            }
            .to_string(),
        );
    };
    let (was, now) = (admin(&current.raw), admin(next));
    if was != now {
        complain(
            vec![Seg::Key("admin".into()), Seg::Key("address".into())],
            format!("changing the admin address ({was} → {now}) needs a restart"),
        );
    } else {
        let limits = |raw: &RawConfig| {
            raw.admin
                .as_ref()
                .map(|a| (a.max_connections, a.idle_timeout, a.request_headers_timeout))
        };
        if limits(&current.raw).unwrap_or_default() != limits(next).unwrap_or_default() {
            complain(
                vec![Seg::Key("admin".into())],
                "changing the admin server's limits needs a restart".to_string(),
            );
        }
    }
    if current.raw.xds != next.xds || current.raw.node != next.node {
        complain(
            vec![Seg::Key("xds".into())],
            "changing `xds` or `node` needs a restart".to_string(),
        );
    }
    if current.raw.workers != next.workers {
        let show = |w: Option<usize>| w.map_or("default".to_string(), |w| w.to_string());
        complain(
            vec![Seg::Key("workers".into())],
            format!(
                "changing the worker count ({} → {}) needs a restart",
                show(current.raw.workers),
                show(next.workers)
            ),
        );
    }
    problems
}
