//! Hot reload through the file watcher (ConfigMap symlink swaps, renames, in-place edits),
//! under load, and graceful shutdown of the real binary.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use remora::app::{App, ConfigSource};
use remora::reloader::{Outcome, Trigger};

use crate::support::*;

/// A directory laid out like a Kubernetes ConfigMap volume:
/// `remora.yaml -> ..data/remora.yaml`, `..data -> ..vN`, swapped atomically on update.
struct ConfigMapDir {
    dir: PathBuf,
    version: usize,
}

impl ConfigMapDir {
    fn new(name: &str, text: &str) -> ConfigMapDir {
        let dir = std::env::temp_dir().join(format!("remora-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v0")).unwrap();
        std::fs::write(dir.join("..v0/remora.yaml"), text).unwrap();
        std::os::unix::fs::symlink("..v0", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/remora.yaml", dir.join("remora.yaml")).unwrap();
        ConfigMapDir { dir, version: 0 }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("remora.yaml")
    }

    /// What the kubelet does: write a new version directory, point a temporary link at it,
    /// rename the link over `..data`, delete the old version.
    fn swap(&mut self, text: &str) {
        let old = format!("..v{}", self.version);
        self.version += 1;
        let new = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&new)).unwrap();
        std::fs::write(self.dir.join(&new).join("remora.yaml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        std::fs::remove_dir_all(self.dir.join(old)).unwrap();
    }
}

impl Drop for ConfigMapDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn proxy_from_file(path: &Path) -> Proxy {
    let (raw, text) = remora::config::load_file(path).unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(raw, ConfigSource::File(path.to_path_buf()), &text)
        .await
        .unwrap();
    app.watch_config_file();
    Proxy {
        addr: app.listener_address("main").unwrap(),
        admin: app.admin_address,
        app,
    }
}

/// A config whose `/version` answers `tag`; `/` and `/stream/` go to `up`, `/ws` to `ws`.
fn versioned(tag: &str, up: u16, ws: u16) -> String {
    let routes = format!(
        r#"
      - name: all
        domains: ["*"]
        routes:
          - {{ match: {{ path: /version }}, direct_response: {{ status: 200, body: "{tag}" }} }}
          - {{ match: {{ prefix: /ws }}, cluster: ws }}
          - {{ match: {{ prefix: / }}, cluster: up }}
"#
    );
    let clusters = [cluster("up", &[(up, 1)], ""), cluster("ws", &[(ws, 1)], "")].join("\n");
    config(&routes, &clusters)
}

async fn version(cl: &TestClient, p: &Proxy) -> String {
    get(cl, p.addr, "svc", "/version", &[]).await.body
}

/// Polls until `/version` says `want`; returns how long that took.
async fn wait_for_version(cl: &TestClient, p: &Proxy, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while started.elapsed() < limit {
        if version(cl, p).await == want {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("config `{want}` not visible within {limit:?}");
}

async fn reload_failures(p: &Proxy) -> f64 {
    metric(
        p.admin,
        "remora_config_reloads_total{result=\"failure\",source=\"file\"}",
    )
    .await
}

async fn ws_echo_server() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_configmap_swaps_under_load_lose_nothing() {
    let up = Upstream::start("up").await;
    let ws_port = ws_echo_server().await;
    let mut cm = ConfigMapDir::new("cm", &versioned("v0", up.port(), ws_port));
    let p = proxy_from_file(&cm.path()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

    // Several keep-alive clients, each with its own connection pool.
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, addr) = (stop.clone(), ok.clone(), failed.clone(), p.addr);
        load.push(tokio::spawn(async move {
            let cl = client();
            while !stop.load(Ordering::Relaxed) {
                let r = cl
                    .request(
                        Request::get(format!("http://{addr}/"))
                            .header("host", "svc")
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                    .await;
                match r {
                    Ok(resp) if resp.status() == 200 => {
                        let body = resp.into_body().collect().await;
                        if body.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // One WebSocket, echoing all along.
    let ws_task = {
        let (stop, addr) = (stop.clone(), p.addr);
        tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
                .await
                .unwrap();
            let mut echoed = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("m{echoed}");
                ws.send(Message::text(text.clone())).await.unwrap();
                let back = ws.next().await.unwrap().unwrap();
                assert_eq!(back.into_text().unwrap().as_str(), text);
                echoed += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            echoed
        })
    };
    // One long streaming response: 600 chunks, 20 ms apart (12 s).
    let stream_task = {
        let addr = p.addr;
        tokio::spawn(async move {
            let resp = client()
                .request(
                    Request::get(format!("http://{addr}/stream/600"))
                        .header("host", "svc")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
                .unwrap();
            resp.into_body().collect().await.unwrap().to_bytes()
        })
    };

    let cl = client();
    let mut slowest = Duration::ZERO;
    let mut rejected = 0.0;
    for i in 1..=100 {
        if i % 10 == 5 {
            // An invalid config: rejected, and nothing changes.
            let before = reload_failures(&p).await;
            cm.swap(
                &versioned(&format!("v{i}"), up.port(), ws_port)
                    .replace("cluster: up", "cluster: nope"),
            );
            let started = Instant::now();
            while reload_failures(&p).await == before {
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "invalid config {i} not seen"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            rejected += 1.0;
            assert_eq!(version(&cl, &p).await, format!("v{}", i - 1));
        }
        let tag = format!("v{i}");
        cm.swap(&versioned(&tag, up.port(), ws_port));
        slowest = slowest.max(wait_for_version(&cl, &p, &tag, Duration::from_secs(1)).await);
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    let echoed = ws_task.await.unwrap();
    let streamed = stream_task.await.unwrap();
    let expected: String = (0..600).map(|i| format!("chunk{i}\n")).collect();
    assert!(
        streamed == expected.as_bytes(),
        "stream intact across reloads"
    );
    assert!(echoed > 50, "websocket kept echoing: {echoed}");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed requests");
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert_eq!(reload_failures(&p).await, rejected);
    let applied = metric(
        p.admin,
        "remora_config_reloads_total{result=\"success\",source=\"file\"}",
    )
    .await;
    assert_eq!(applied, 100.0);
    eprintln!(
        "100 reloads: slowest visible after {slowest:?}; {} requests, {echoed} websocket echoes",
        ok.load(Ordering::Relaxed)
    );
}

#[tokio::test]
async fn write_then_rename_and_in_place_edits_reload_and_keep_upstream_connections() {
    let up = Upstream::start("up").await;
    let dir = std::env::temp_dir().join(format!("remora-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("remora.yaml");
    std::fs::write(&path, versioned("a", up.port(), 1)).unwrap();
    let p = proxy_from_file(&path).await;
    let cl = client();
    assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);

    // Write to a temporary file, then rename it over the config (what editors do).
    let tmp = dir.join(".remora.yaml.tmp");
    std::fs::write(&tmp, versioned("b", up.port(), 1)).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_for_version(&cl, &p, "b", Duration::from_secs(1)).await;
    assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);

    // Write in place.
    std::fs::write(&path, versioned("c", up.port(), 1)).unwrap();
    wait_for_version(&cl, &p, "c", Duration::from_secs(1)).await;

    // Deleted and recreated.
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        version(&cl, &p).await,
        "c",
        "a missing file changes nothing"
    );
    std::fs::write(&path, versioned("d", up.port(), 1)).unwrap();
    wait_for_version(&cl, &p, "d", Duration::from_secs(1)).await;

    assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    assert_eq!(
        up.connections(),
        1,
        "reloads that leave cluster `up` alone open no new connection to it"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn listeners_are_added_and_removed_by_reload() {
    let up = Upstream::start("up").await;
    let base = versioned("a", up.port(), 1);
    let p = proxy(&base).await;
    let with_extra = base.replace(
        "listeners:\n",
        "listeners:\n  - { name: extra, address: 127.0.0.1:0, route_config: rc }\n",
    );
    assert!(matches!(
        p.app.apply(with_extra, "extra.yaml").await,
        Outcome::Applied { version: 2 }
    ));
    let extra = p
        .app
        .listener_address("extra")
        .expect("extra listener bound");
    let cl = client();
    assert_eq!(get(&cl, extra, "svc", "/version", &[]).await.body, "a");

    assert!(matches!(
        p.app
            .apply(base.replace("body: \"a\"", "body: \"b\""), "base.yaml")
            .await,
        Outcome::Applied { version: 3 }
    ));
    assert!(p.app.listener_address("extra").is_none());
    let mut refused = false;
    for _ in 0..50 {
        if TcpStream::connect(extra).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused, "removed listener stopped accepting");
    assert_eq!(get(&cl, p.addr, "svc", "/version", &[]).await.body, "b");
}

#[tokio::test]
async fn rejected_reloads_keep_the_running_config_and_show_in_admin() {
    let up = Upstream::start("up").await;
    let base = versioned("a", up.port(), 1);
    let p = proxy(&base).await;
    let broken = base.replace("cluster: up", "cluster: upp");
    let Outcome::Rejected(errors) = p.app.apply(broken, "broken.yaml").await else {
        panic!("accepted a broken config");
    };
    assert!(
        errors[0].starts_with("broken.yaml:") && errors[0].contains("did you mean `up`"),
        "{errors:?}"
    );
    let moved_admin = base.replace(
        "admin: { address: 127.0.0.1:0 }",
        "admin: { address: 127.0.0.1:9 }",
    );
    let Outcome::Rejected(errors) = p.app.apply(moved_admin, "admin.yaml").await else {
        panic!("accepted an admin address change");
    };
    assert!(errors[0].contains("needs a restart"), "{errors:?}");
    let same = p.app.apply(base.clone(), "same.yaml").await;
    assert_eq!(same, Outcome::Unchanged);
    assert_eq!(
        p.app.reload(Trigger::Signal).await,
        Outcome::Unchanged,
        "no file to re-read"
    );

    let cl = client();
    assert_eq!(get(&cl, p.addr, "svc", "/version", &[]).await.body, "a");
    let config: serde_json::Value =
        serde_json::from_str(&get(&cl, p.admin, "a", "/config", &[]).await.body).unwrap();
    assert_eq!(config["version"], 1);
    assert!(config["last_rejected"]["errors"][0]
        .as_str()
        .unwrap()
        .contains("needs a restart"));
    assert_eq!(
        metric(
            p.admin,
            "remora_config_reloads_total{result=\"failure\",source=\"api\"}"
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn sigterm_drains_twenty_slow_requests_then_exits_0() {
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_millis(1500));
    let (listen, admin) = (free_address(), free_address());
    let yaml = binary_config(
        admin,
        listen,
        up.port(),
        "shutdown: { drain_delay: 1s, drain_timeout: 10s }",
    );
    let dir = std::env::temp_dir().join(format!("remora-term-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("remora.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_remora"))
        .args(["run", "-c"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(admin).await;

    let in_flight: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { get(&client(), listen, "svc", "/", &[]).await.status }))
        .collect();
    while up.hits() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sigterm(&child);
    let signalled = Instant::now();
    let mut ready = 200;
    for _ in 0..100 {
        ready = get(&client(), admin, "a", "/ready", &[])
            .await
            .status
            .as_u16();
        if ready == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ready, 503, "/ready after SIGTERM");
    // Still accepting during the drain delay (1 s from the signal)...
    if signalled.elapsed() < Duration::from_millis(800) {
        assert!(TcpStream::connect(listen).await.is_ok());
    }
    // ...and refusing after it.
    let mut refused = false;
    for _ in 0..100 {
        if TcpStream::connect(listen).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "still accepting 5 s after the drain delay");
    assert!(
        signalled.elapsed() >= Duration::from_millis(900),
        "stopped accepting before the drain delay was over"
    );
    for r in in_flight {
        assert_eq!(r.await.unwrap(), 200);
    }
    let status = wait_exit(&mut child).await;
    assert_eq!(status.code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An edit made after remora read its file but before the watcher started (startup can
/// wait seconds for DNS) is applied: the watcher starts from the running config's hash,
/// not from the file as it is when the watcher starts.
#[tokio::test]
async fn an_edit_made_while_remora_starts_is_applied() {
    let up = Upstream::start("up").await;
    let dir = std::env::temp_dir().join(format!("remora-startup-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("remora.yaml");
    std::fs::write(&path, versioned("a", up.port(), 1)).unwrap();
    let (raw, text) = remora::config::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(raw, ConfigSource::File(path.clone()), &text)
        .await
        .unwrap();
    // The edit lands between reading the file and watching it.
    std::fs::write(&path, versioned("b", up.port(), 1)).unwrap();
    app.watch_config_file();
    let p = Proxy {
        addr: app.listener_address("main").unwrap(),
        admin: app.admin_address,
        app,
    };
    // Well inside the 5 s hash poll: the change must be seen when the watcher starts.
    wait_for_version(&client(), &p, "b", Duration::from_secs(3)).await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A file reload rejected for a reason that passes (a new listener's address in use) is
/// tried again, and applies once the address is free, with no further edit.
#[tokio::test]
async fn a_reload_that_could_not_bind_is_retried_until_it_applies() {
    let up = Upstream::start("up").await;
    let blocker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap();
    let dir = std::env::temp_dir().join(format!("remora-bind-retry-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("remora.yaml");
    std::fs::write(&path, versioned("a", up.port(), 1)).unwrap();
    let p = proxy_from_file(&path).await;
    let cl = client();
    // The watcher is running once an edit shows.
    std::fs::write(&path, versioned("a2", up.port(), 1)).unwrap();
    wait_for_version(&cl, &p, "a2", Duration::from_secs(8)).await;
    let with_extra = versioned("b", up.port(), 1).replace(
        "route_config: rc }\n",
        &format!(
            "route_config: rc }}\n  - {{ name: extra, address: \"{taken}\", route_config: rc }}\n"
        ),
    );
    assert!(with_extra.contains("name: extra"), "{with_extra}");
    std::fs::write(&path, with_extra).unwrap();
    let started = Instant::now();
    while reload_failures(&p).await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "no rejected reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(version(&cl, &p).await, "a2", "the running config stays");
    drop(blocker);
    wait_for_version(&cl, &p, "b", Duration::from_secs(12)).await;
    assert!(
        TcpStream::connect(taken).await.is_ok(),
        "extra listener bound"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
