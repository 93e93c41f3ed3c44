//! Startup and shutdown: compile the first snapshot, start clusters, bind the admin server
//! and the listeners; on SIGTERM/SIGINT, drain and stop.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::admin::{self, AdminState};
use crate::cluster::balance::hash_bytes;
use crate::config::compile::{compile, Origin};
use crate::config::RawConfig;
use crate::listener::{self, Listener};
use crate::metrics::Metrics;
use crate::snapshot::SnapshotStore;

/// How long startup waits for `strict_dns` clusters' first answers before serving anyway.
const DNS_WARMUP: Duration = Duration::from_secs(5);
/// Default time in-flight requests get to finish at shutdown.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(25);

/// A running remora.
pub struct App {
    pub store: Arc<SnapshotStore>,
    pub metrics: Arc<Metrics>,
    pub admin: Arc<AdminState>,
    pub admin_address: SocketAddr,
    listeners: Vec<Listener>,
}

/// Hex hash of config text, shown in `/config` and used to skip reloads that change nothing.
pub fn config_hash(text: &str) -> String {
    format!("{:016x}", hash_bytes(text.as_bytes()))
}

impl App {
    /// Starts serving a validated config. `source` names where it came from; `text` is what
    /// it was parsed from (for the hash).
    pub async fn start(raw: RawConfig, source: &str, text: &str) -> io::Result<App> {
        let metrics = Arc::new(Metrics::new());
        let origin = Origin {
            version: 1,
            source: source.to_string(),
            hash: config_hash(text),
        };
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
        let admin = Arc::new(AdminState {
            store: store.clone(),
            metrics: metrics.clone(),
            ready: false.into(),
            draining: false.into(),
        });
        let admin_address = admin::serve(admin_wanted, admin.clone()).await?;
        let mut listeners = Vec::new();
        for settings in listener_settings {
            listeners.push(listener::bind(settings, store.clone()).await?);
        }
        metrics
            .config_reloads
            .with_label_values(&["startup", "success"])
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        metrics.config_last_success.set(now.as_secs_f64());
        admin.ready.store(true, Ordering::Relaxed);
        Ok(App {
            store,
            metrics,
            admin,
            admin_address,
            listeners,
        })
    }

    /// The address a listener is bound to (useful with port 0).
    pub fn listener_address(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|l| &*l.settings.name == name)
            .map(|l| l.local_addr)
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully.
    pub async fn run_until_signal(self) -> io::Result<()> {
        wait_for_signal().await?;
        tracing::info!("signal received; draining");
        self.shutdown(DEFAULT_DRAIN_TIMEOUT).await;
        Ok(())
    }

    /// Turns `/ready` to 503, stops accepting, and lets open connections finish their
    /// requests, for at most `drain_timeout`.
    pub async fn shutdown(self, drain_timeout: Duration) {
        self.admin.draining.store(true, Ordering::Relaxed);
        let drains: Vec<_> = self
            .listeners
            .into_iter()
            .map(|l| tokio::spawn(l.drain(drain_timeout)))
            .collect();
        let mut left = 0;
        for d in drains {
            left += d.await.unwrap_or(0);
        }
        if left > 0 {
            tracing::warn!(
                connections = left,
                "drain timeout reached; closing the rest"
            );
        }
    }
}

async fn wait_for_signal() -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
