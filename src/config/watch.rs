//! Watches the config file for changes, however they are made: written in place, written to
//! a temporary file and renamed over it, deleted and recreated, or swapped underneath as a
//! Kubernetes ConfigMap does (the file is a symlink through `..data`, which is replaced
//! atomically). It watches the directories, not the file, debounces bursts, recreates the
//! watcher if it fails, and also compares the file's hash every few seconds in case an event
//! was missed. Only a changed hash asks for a reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Quiet time after the last event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the file's hash is compared even without events.
const POLL: Duration = Duration::from_secs(5);
/// Wait before recreating a failed watcher.
const RETRY: Duration = Duration::from_secs(1);

/// Calls `on_change` (from a task) whenever the content of `path` changes.
pub fn spawn(path: PathBuf, on_change: mpsc::Sender<()>) {
    tokio::spawn(async move {
        let mut last = content_hash(&path);
        loop {
            let (events_tx, mut events) = mpsc::unbounded_channel::<Result<(), String>>();
            let watcher = start_watcher(&path, events_tx);
            if let Err(error) = &watcher {
                tracing::warn!(path = %path.display(), %error, "cannot watch config; polling only");
            }
            // Pick up anything that changed while no watcher was running.
            if changed(&path, &mut last) && on_change.send(()).await.is_err() {
                return;
            }
            loop {
                let event = if watcher.is_ok() {
                    tokio::time::timeout(POLL, events.recv()).await.ok()
                } else {
                    tokio::time::sleep(POLL).await;
                    None
                };
                let retry = match event {
                    Some(Some(Ok(()))) => {
                        // Let a burst of events (editor saves, ConfigMap swaps) settle.
                        while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, events.recv()).await
                        {
                        }
                        false
                    }
                    Some(Some(Err(error))) => {
                        tracing::warn!(path = %path.display(), %error, "config watcher failed; recreating it");
                        true
                    }
                    Some(None) => true,
                    // A poll tick; without a watcher, also a time to try making one again.
                    None => watcher.is_err(),
                };
                if changed(&path, &mut last) && on_change.send(()).await.is_err() {
                    return;
                }
                if retry {
                    break;
                }
            }
            drop(watcher);
            tokio::time::sleep(RETRY).await;
        }
    });
}

fn changed(path: &Path, last: &mut Option<String>) -> bool {
    let now = content_hash(path);
    // A file that is missing for a moment (delete then recreate) is not a change to act on.
    if now.is_some() && now != *last {
        *last = now;
        true
    } else {
        false
    }
}

fn content_hash(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|t| crate::app::config_hash(&t))
}

/// Watches the file's directory, and the directory of the file it links to, if any.
fn start_watcher(
    path: &Path,
    events: mpsc::UnboundedSender<Result<(), String>>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        let _ = events.send(e.map(|_| ()).map_err(|e| e.to_string()));
    })?;
    let dir = parent(path);
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    if let Ok(target) = std::fs::canonicalize(path) {
        let target_dir = parent(&target);
        if target_dir != dir {
            // Best effort: in a ConfigMap this directory is replaced on every update, and
            // the events on `dir` (the `..data` swap) already cover it.
            let _ = watcher.watch(&target_dir, RecursiveMode::NonRecursive);
        }
    }
    Ok(watcher)
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
