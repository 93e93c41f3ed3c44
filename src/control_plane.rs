//! `remora control-plane`: serves remora YAML as xDS (state-of-the-world ADS) to remora
//! sidecars and to Envoy alike. A file serves every node; a directory serves
//! `<node.cluster>.yaml`, else `default.yaml`. Files are watched with the config watcher; a
//! file that does not validate is refused with the same located errors as `remora
//! validate`, and the last good snapshot keeps being served.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use remora_xds::server::{self, AdsServer, Cache, Snapshot};
use tokio::sync::mpsc;

use crate::config;

/// How often a served directory is looked at for new files.
const SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The node group a file that is not named after a node cluster serves.
pub const DEFAULT_GROUP: &str = "default";

/// A running control plane.
pub struct ControlPlane {
    pub address: SocketAddr,
    pub cache: Arc<Cache>,
    server: tokio::task::JoinHandle<()>,
}

impl ControlPlane {
    /// Stops serving: every stream ends, as if the process had gone.
    pub fn stop(self) {
        self.server.abort();
    }
}

/// Loads `source` (a file or a directory of `*.yaml`), starts serving it on `address`, and
/// watches it. Fails when nothing valid can be served at all.
pub async fn start(source: &Path, address: SocketAddr) -> std::io::Result<ControlPlane> {
    let cache = Arc::new(Cache::default());
    let files = files_of(source)?;
    let mut served = 0;
    for (group, path) in &files {
        match load(path) {
            Ok(snapshot) => {
                cache.set(group, snapshot);
                served += 1;
            }
            Err(errors) => {
                for e in errors {
                    tracing::error!(error = %e, "not served");
                }
            }
        }
    }
    if served == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: no valid config to serve", source.display()),
        ));
    }
    let mut watched: std::collections::BTreeSet<PathBuf> = Default::default();
    for (group, path) in files {
        watched.insert(path.clone());
        watch(cache.clone(), group, path);
    }
    if source.is_dir() {
        // Files added later are served too.
        let (cache, dir) = (cache.clone(), source.to_path_buf());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SCAN_EVERY).await;
                let Ok(files) = files_of(&dir) else { continue };
                for (group, path) in files {
                    if watched.insert(path.clone()) {
                        match load(&path) {
                            Ok(snapshot) => cache.set(&group, snapshot),
                            Err(errors) => errors
                                .iter()
                                .for_each(|e| tracing::error!(error = %e, "not served")),
                        }
                        watch(cache.clone(), group, path);
                    }
                }
            }
        });
    }
    // A node gets its cluster's file when there is one, valid or not (an invalid file serves
    // nothing until fixed: never another service's config), else the default group.
    let (is_dir, dir) = (source.is_dir(), source.to_path_buf());
    let group_of: server::GroupOf = Arc::new(move |node| {
        let own = |ext: &str| dir.join(format!("{}.{ext}", node.cluster)).is_file();
        if is_dir && !node.cluster.is_empty() && (own("yaml") || own("yml")) {
            node.cluster.clone()
        } else {
            DEFAULT_GROUP.to_string()
        }
    });
    let listener = tokio::net::TcpListener::bind(address).await?;
    let address = listener.local_addr()?;
    let ads = AdsServer::new(cache.clone(), group_of);
    let server = tokio::spawn(async move {
        if let Err(error) = server::serve(listener, ads).await {
            tracing::error!(%error, "control plane server ended");
        }
    });
    tracing::info!(%address, "control plane serving");
    Ok(ControlPlane {
        address,
        cache,
        server,
    })
}

/// The files served and the node group each serves.
fn files_of(source: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    if !source.is_dir() {
        return Ok(vec![(DEFAULT_GROUP.to_string(), source.to_path_buf())]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(source)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                files.push((stem.to_string(), path.clone()));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// A file's snapshot, or every reason it cannot be served.
fn load(path: &Path) -> Result<Snapshot, Vec<String>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("{file}: cannot read config file: {e}")])?;
    let raw = config::parse_for_serving(&text, &file)
        .map_err(|e| e.0.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    let resources = config::xds::to_envoy(&raw);
    Snapshot::new(&resources).map_err(|errors| {
        errors
            .into_iter()
            .map(|e| format!("{}: {e}", path.display()))
            .collect()
    })
}

/// Reloads `path` into `group` whenever it changes; a bad file keeps the last good snapshot.
fn watch(cache: Arc<Cache>, group: String, path: PathBuf) {
    // Seeded with no hash, so the watcher loads the file once more as it starts: an edit made
    // between the first load and the watcher's start is not missed (an unchanged file makes
    // no push: versions are content hashes).
    let running = String::new();
    let (tx, mut changes) = mpsc::channel(1);
    config::watch::spawn(path.clone(), running, tx);
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            match load(&path) {
                Ok(snapshot) => {
                    tracing::info!(path = %path.display(), %group, "pushing the new config");
                    cache.set(&group, snapshot);
                }
                Err(errors) => {
                    for e in errors {
                        tracing::error!(error = %e, "config refused; still serving the last good one");
                    }
                }
            }
        }
    });
}
