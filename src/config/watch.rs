//! Watches the config file for changes, however they are made: written in place, written to
//! a temporary file and renamed over it, deleted and recreated, or swapped underneath as a
//! Kubernetes ConfigMap does (the file is a symlink through `..data`, which is replaced
//! atomically). It watches the directories, not the file, ignores events about other files
//! in them, debounces bursts, recreates the watcher if it fails, and also compares the file's
//! hash every few seconds in case an event was missed. Only a changed hash asks for a reload.

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

/// Calls `on_change` (from a task) whenever the content of `path` changes from `running`,
/// the hash of the config in force: an edit made while remora was starting (after it read
/// the file) is seen at once.
pub fn spawn(path: PathBuf, running: String, on_change: mpsc::Sender<()>) {
    tokio::spawn(async move {
        let mut last = Some(running);
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

/// The file's [`crate::config::hash`], read in chunks: polling a big config every few
/// seconds should not allocate its whole text each time.
fn content_hash(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = [0u8; 64 * 1024];
    let mut h = crate::hash::FNV_OFFSET;
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h = crate::hash::fnv(h, &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        }
    }
    Some(format!("{:016x}", crate::hash::mix(h)))
}

/// Watches the file's directory, and the directory of the file it links to, if any. Only
/// events that name the file, the first step of its symlink (`..data` in a ConfigMap), or the
/// file it links to are passed on: a directory such as the working directory may see many
/// writes to other files, and each would otherwise cost a read and hash of the config.
fn start_watcher(
    path: &Path,
    events: mpsc::UnboundedSender<Result<(), String>>,
) -> notify::Result<notify::RecommendedWatcher> {
    let relevant = relevant_names(path);
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if e.as_ref().map_or(true, |event| concerns(event, &relevant)) {
            let _ = events.send(e.map(|_| ()).map_err(|e| e.to_string()));
        }
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

/// File names whose events may mean the config changed: its own, the first component of a
/// relative symlink target (`..data/config.yaml` → `..data`), and the final target's.
fn relevant_names(path: &Path) -> Vec<std::ffi::OsString> {
    let mut names: Vec<std::ffi::OsString> = path.file_name().into_iter().map(Into::into).collect();
    if let Ok(link) = std::fs::read_link(path) {
        if let Some(std::path::Component::Normal(first)) = link.components().next() {
            names.push(first.to_owned());
        }
    }
    if let Some(name) = std::fs::canonicalize(path)
        .ok()
        .and_then(|t| t.file_name().map(Into::into))
    {
        names.push(name);
    }
    names
}

/// Whether an event may concern the config: it changes something (reads do not: every check
/// reads the file, so passing its own reads on would keep the watcher reading) and names one
/// of `relevant`, or names nothing (a rescan or an overflowed queue, after which anything may
/// have changed).
fn concerns(event: &notify::Event, relevant: &[std::ffi::OsString]) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    if let EventKind::Access(access) = event.kind {
        // Of the access events only a close after writing (IN_CLOSE_WRITE) is a change.
        if access != AccessKind::Close(AccessMode::Write) {
            return false;
        }
    }
    event.paths.is_empty()
        || event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| relevant.iter().any(|r| r == n))
        })
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, EventKind, ModifyKind, RenameMode};

    /// Hashed in chunks, the file hashes as its text does (the config in force is known by
    /// the hash of its text).
    #[test]
    fn the_chunked_hash_is_the_text_hash() {
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let path = std::env::temp_dir().join(format!("remora-hash-{}.yaml", std::process::id()));
        std::fs::write(&path, &text).unwrap();
        assert_eq!(content_hash(&path), Some(crate::config::hash(&text)));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(content_hash(&path), None);
    }

    fn event(kind: EventKind, paths: &[&Path]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        e.paths = paths.iter().map(|p| p.to_path_buf()).collect();
        e
    }

    #[test]
    fn only_events_about_the_config_or_its_links_pass() {
        let dir = std::env::temp_dir().join(format!("remora-watch-{}", std::process::id()));
        let version = dir.join("..2026_11_26_v1");
        std::fs::create_dir_all(&version).unwrap();
        std::fs::write(version.join("remora.yaml"), "{}").unwrap();
        let _ = std::fs::remove_file(dir.join("..data"));
        let _ = std::fs::remove_file(dir.join("remora.yaml"));
        std::os::unix::fs::symlink("..2026_11_26_v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/remora.yaml", dir.join("remora.yaml")).unwrap();

        let names = relevant_names(&dir.join("remora.yaml"));
        let write = EventKind::Modify(ModifyKind::Any);
        let swap = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        // The ConfigMap swap renames `..data_tmp` over `..data`.
        assert!(concerns(
            &event(swap, &[&dir.join("..data_tmp"), &dir.join("..data")]),
            &names
        ));
        assert!(concerns(&event(write, &[&dir.join("remora.yaml")]), &names));
        assert!(concerns(
            &event(write, &[&version.join("remora.yaml")]),
            &names
        ));
        assert!(concerns(&event(EventKind::Other, &[]), &names));
        // Other files in the same directories do not.
        assert!(!concerns(&event(write, &[&dir.join("access.log")]), &names));
        assert!(!concerns(
            &event(
                EventKind::Create(CreateKind::File),
                &[&dir.join(".remora.yaml.swp")]
            ),
            &names
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Reading the file is not a change: remora's own reads (each check hashes the file)
    /// raise open and close events, and passing them on made the watcher read and hash the
    /// whole config every debounce period, forever.
    #[test]
    fn reading_the_config_is_not_a_change() {
        use notify::event::{AccessKind, AccessMode};
        let path = Path::new("/etc/remora/remora.yaml");
        let names = relevant_names(path);
        for read in [
            AccessKind::Open(AccessMode::Any),
            AccessKind::Read,
            AccessKind::Close(AccessMode::Read),
            AccessKind::Any,
        ] {
            assert!(
                !concerns(&event(EventKind::Access(read), &[path]), &names),
                "{read:?}"
            );
        }
        // A file closed after writing is a change (IN_CLOSE_WRITE).
        let written = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(concerns(&event(written, &[path]), &names));
    }

    /// Black box: once started, a watcher on an unchanged file reads it at most a few times
    /// (its first check and a poll), not over and over.
    #[tokio::test]
    async fn an_unchanged_file_is_not_read_again_and_again() {
        fn bytes_read() -> u64 {
            let io = std::fs::read_to_string("/proc/self/io").unwrap();
            io.lines()
                .find_map(|l| l.strip_prefix("rchar: "))
                .unwrap()
                .parse()
                .unwrap()
        }
        let dir = std::env::temp_dir().join(format!("remora-reads-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("remora.yaml");
        let size = 4 << 20;
        std::fs::write(&path, "#".repeat(size)).unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let before = bytes_read();
        spawn(path.clone(), crate::config::hash("#"), tx);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let read = bytes_read() - before;
        assert!(
            read < 3 * size as u64,
            "the watcher read {} MiB of a 4 MiB file in 1.5 s",
            read >> 20
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
