//! Startup and shutdown: compile the first snapshot, start clusters, bind the admin server
//! and the listeners, hand them to the reloader; on SIGHUP reload; on SIGTERM/SIGINT drain
//! and stop.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use crate::admin::{self, AdminState};
use crate::config::compile::{compile, Origin};
use crate::config::RawConfig;
use crate::listener;
use crate::metrics::Metrics;
use crate::reloader::{Command, Outcome, Reloader, Trigger, DNS_WARMUP};
use crate::snapshot::SnapshotStore;

/// Default time between SIGTERM and closing the listeners, while `/ready` says 503.
pub const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
/// Default time in-flight requests get to finish after the listeners close.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// Where the config came from.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    /// A file: watched and re-read on reload.
    File(PathBuf),
    /// Text with a name to report it by (`demo`, tests); changed only through [`App::apply`].
    Inline(String),
}

impl ConfigSource {
    pub fn name(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Inline(n) => n.clone(),
        }
    }
}

/// A running remora.
pub struct App {
    pub store: Arc<SnapshotStore>,
    pub metrics: Arc<Metrics>,
    pub admin: Arc<AdminState>,
    pub admin_address: SocketAddr,
    source: ConfigSource,
    control: mpsc::Sender<Command>,
    addresses: watch::Receiver<HashMap<String, SocketAddr>>,
}

/// How often the TLS files of the config in force are looked at for a rotation.
const TLS_FILES_POLL: Duration = Duration::from_secs(1);

/// Wait before a config file that failed to apply for a passing reason is tried again;
/// doubled after each further failure, up to the maximum.
const TRANSIENT_RETRY: Duration = Duration::from_secs(5);
const TRANSIENT_RETRY_MAX: Duration = Duration::from_secs(60);

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reloads the config in force when a TLS file it names changes (a rotated certificate or
/// key, written in place or swapped as a Kubernetes Secret volume does): new handshakes get
/// the new pair within about a second; open connections keep theirs. A pair that does not
/// load (mismatched, expired) is rejected like any bad config, and the old one stays.
fn spawn_tls_file_watch(store: Arc<SnapshotStore>, control: mpsc::Sender<Command>) {
    tokio::spawn(async move {
        let mut last = store.load().raw.tls_files_digest();
        loop {
            tokio::time::sleep(TLS_FILES_POLL).await;
            let raw = store.load();
            let now = raw.raw.tls_files_digest();
            if now == last || now == 0 {
                last = now;
                continue;
            }
            last = now;
            tracing::info!("a TLS file changed; reloading");
            let (reply, answer) = oneshot::channel();
            if control.send(Command::RefreshTls { reply }).await.is_err() {
                return;
            }
            let _ = answer.await;
        }
    });
}

/// The config text in force, shared with the snapshot rather than copied.
fn snapshot_text(store: &SnapshotStore) -> Arc<str> {
    store.load().written.text.clone()
}

impl App {
    /// Starts serving a validated config, parsed from `text`.
    pub async fn start(raw: RawConfig, source: ConfigSource, text: &str) -> io::Result<App> {
        let metrics = Arc::new(Metrics::new());
        let origin = Origin {
            version: 1,
            source: source.name(),
            hash: crate::config::hash_with_files(text, raw.tls_files_digest()),
            written: crate::config::Written::text(text),
        };
        let xds = raw.xds.clone().map(|x| (x, raw.clone()));
        let snapshot = compile(raw, origin, &metrics, None);
        let warmups: Vec<_> = snapshot
            .clusters
            .values()
            .filter_map(|c| c.start())
            .collect();
        for w in warmups {
            let _ = tokio::time::timeout(DNS_WARMUP, w).await;
        }
        let admin_wanted = snapshot.admin_address;
        let listener_settings = snapshot.listeners.clone();
        let store = Arc::new(SnapshotStore::new(snapshot));
        // Parsing and compiling freed far more than the snapshot keeps.
        crate::memory::release_freed_soon();
        let admin = Arc::new(AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            ready: false.into(),
            draining: false.into(),
            last_rejected: Default::default(),
            xds_versions: Default::default(),
        });
        let admin_address = admin::serve(admin_wanted, admin.clone()).await?;
        let mut prepared = Vec::new();
        for settings in listener_settings {
            prepared.push(listener::prepare(settings, store.clone()).await?);
        }
        let listeners = prepared.into_iter().map(|p| p.start()).collect();
        let (control, commands) = mpsc::channel(16);
        let (addresses_tx, addresses) = watch::channel(HashMap::new());
        let reloader = Reloader {
            store: store.clone(),
            metrics: metrics.clone(),
            admin: admin.clone(),
            listeners,
            file: match &source {
                ConfigSource::File(p) => Some(p.clone()),
                ConfigSource::Inline(_) => None,
            },
            static_text: (snapshot_text(&store), source.name()),
            dynamic: None,
            addresses: addresses_tx,
        };
        let mut ready_addresses = addresses.clone();
        tokio::spawn(reloader.run(commands));
        let _ = ready_addresses.changed().await;
        metrics
            .config_reloads
            .with_label_values(&["startup", "success"])
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        metrics.config_last_success.set(now.as_secs_f64());
        spawn_tls_file_watch(store.clone(), control.clone());
        match xds {
            // Ready once the control plane's first complete config is in force.
            Some((xds, raw)) => {
                crate::discovery::spawn(&raw, &xds, control.clone(), metrics.clone(), admin.clone())
            }
            None => admin.ready.store(true, Ordering::Relaxed),
        }
        Ok(App {
            store,
            metrics,
            admin,
            admin_address,
            source,
            control,
            addresses,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.addresses.borrow().get(name).copied()
    }

    /// Reads the config file again and applies it if it changed.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        self.command(trigger, None).await
    }

    /// Applies config text from a caller, as a reload would a file.
    pub async fn apply(&self, text: String, name: &str) -> Outcome {
        self.command(Trigger::Api, Some((text.into(), name.to_string())))
            .await
    }

    async fn command(&self, trigger: Trigger, text: Option<(Arc<str>, String)>) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Reload {
            trigger,
            text,
            reply,
        };
        if self.control.send(cmd).await.is_err() {
            return Outcome::Rejected(vec!["shutting down".into()]);
        }
        answer
            .await
            .unwrap_or_else(|_| Outcome::Rejected(vec!["shutting down".into()]))
    }

    /// Reloads whenever the config file's content changes.
    pub fn watch_config_file(&self) {
        let ConfigSource::File(path) = &self.source else {
            return;
        };
        let (tx, mut changes) = mpsc::channel(1);
        let running = self.store.load().hash.clone();
        crate::config::watch::spawn(path.clone(), running, tx);
        let control = self.control.clone();
        tokio::spawn(async move {
            // A file that failed to apply for a passing reason is tried again, backing off,
            // until it applies or the file changes (which asks anyway).
            let mut backoff = TRANSIENT_RETRY;
            let mut retry_at: Option<tokio::time::Instant> = None;
            loop {
                let changed = tokio::select! {
                    got = changes.recv() => {
                        if got.is_none() {
                            return;
                        }
                        true
                    }
                    () = sleep_until_some(retry_at) => false,
                };
                if changed {
                    backoff = TRANSIENT_RETRY;
                }
                retry_at = None;
                let (reply, answer) = oneshot::channel();
                let cmd = Command::Reload {
                    trigger: Trigger::File,
                    text: None,
                    reply,
                };
                if control.send(cmd).await.is_err() {
                    return;
                }
                if let Ok(Outcome::Failed(_)) = answer.await {
                    tracing::info!(retry_in = ?backoff, "config file will be tried again");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(TRANSIENT_RETRY_MAX);
                }
            }
        });
    }

    /// Serves, reloading on SIGHUP, until SIGTERM or SIGINT; then shuts down gracefully:
    /// `/ready` says 503 at once, listeners keep accepting for the drain delay (so the
    /// endpoint can be deregistered), then close, and in-flight requests get up to the
    /// drain timeout. A second SIGTERM/SIGINT exits at once.
    pub async fn run_until_signal(self) -> io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading");
                    self.reload(Trigger::Signal).await;
                }
            }
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::warn!("second signal: exiting now");
            std::process::exit(1);
        });
        let (delay, timeout) = self.drain_times();
        tracing::info!(?delay, ?timeout, "shutting down: draining");
        self.admin.draining.store(true, Ordering::Relaxed);
        tokio::time::sleep(delay).await;
        let left = self.shutdown(timeout).await;
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain timeout reached; closing the rest"
            );
        }
        Ok(())
    }

    /// The drain delay and timeout of the running config.
    pub fn drain_times(&self) -> (Duration, Duration) {
        let snap = self.store.load();
        let s = snap.raw.shutdown.as_ref();
        (
            s.and_then(|s| s.drain_delay)
                .map_or(DEFAULT_DRAIN_DELAY, |d| d.0),
            s.and_then(|s| s.drain_timeout)
                .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
        )
    }

    /// Turns `/ready` to 503, closes the listeners and lets open connections finish their
    /// requests for at most `timeout`. Returns how many connections were still open.
    pub async fn shutdown(self, timeout: Duration) -> usize {
        self.admin.draining.store(true, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        if self
            .control
            .send(Command::Shutdown { timeout, reply })
            .await
            .is_err()
        {
            return 0;
        }
        answer.await.unwrap_or(0)
    }
}
