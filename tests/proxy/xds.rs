//! xDS: remora under `remora control-plane` (in process and as a real process), NACKs for
//! resources it cannot take, and the YAML → xDS → YAML round trip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use remora::app::{App, ConfigSource};
use remora::config::xds::{from_envoy, to_envoy};

use crate::support::*;

/// A served config: listener `main` on `listen`, every request to cluster `target`, and
/// clusters `a` (static) and `b` (EDS) on the given ports.
fn served(listen: SocketAddr, target: &str, a: u16, b: u16) -> String {
    format!(
        "listeners:\n  - {{ name: main, address: \"{listen}\", route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: {target} }}] }}\n\
         clusters:\n  - {{ name: a, endpoints: [{{ address: \"127.0.0.1:{a}\" }}] }}\n\
         \x20 - {{ name: b, type: eds, endpoints: [{{ address: \"127.0.0.1:{b}\" }}] }}\n"
    )
}

/// Polls `addr` until a GET answers with `want` from the upstream (up to `limit`).
async fn until_served_by(addr: SocketAddr, want: &str, limit: Duration) {
    let cl = client();
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < limit {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let r = get(&cl, addr, "svc", "/", &[]).await;
            if r.status == 200 && r.body == want {
                return;
            }
            last = format!("{} {}", r.status, r.body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not served by `{want}` within {limit:?}; last answer: {last}");
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-xds-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A control plane serving `served(listen, target, a, b)` from a file, and a sidecar
/// following it, ready and answering with `first` (the upstream `target` leads to).
struct Followed {
    listen: SocketAddr,
    dir: PathBuf,
    path: PathBuf,
    cp: remora::control_plane::ControlPlane,
    app: App,
}

impl Followed {
    async fn start(name: &str, target: &str, a: u16, b: u16, first: &str) -> Followed {
        let listen = free_address();
        let dir = temp_dir(name);
        let path = dir.join("default.yaml");
        std::fs::write(&path, served(listen, target, a, b)).unwrap();
        let cp = remora::control_plane::start(&path, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let app = xds_sidecar(cp.address, "shop").await;
        wait_ready(app.admin_address).await;
        until_served_by(listen, first, Duration::from_secs(5)).await;
        Followed {
            listen,
            dir,
            path,
            cp,
            app,
        }
    }
}

/// The control plane serves a YAML file; the sidecar, configured with nothing but the
/// control plane's address, gets its listener, routes and clusters (one of them by EDS),
/// becomes ready, routes as the YAML says, and follows an edit.
#[tokio::test]
async fn a_sidecar_follows_the_control_plane() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let Followed {
        listen,
        dir,
        path,
        cp,
        app,
    } = Followed::start("follow", "a", a.port(), b.port(), "a").await;
    let admin = app.admin_address;
    // The edit: every request to the EDS cluster `b`.
    std::fs::write(&path, served(listen, "b", a.port(), b.port())).unwrap();
    until_served_by(listen, "b", Duration::from_secs(8)).await;
    assert_eq!(metric(admin, "remora_xds_connected").await, 1.0);
    assert!(
        metric(
            admin,
            "remora_xds_updates_total{result=\"ack\",type=\"rds\"}"
        )
        .await
            >= 2.0
    );
    assert_eq!(cp.cache.nacks.load(std::sync::atomic::Ordering::Relaxed), 0);
    let config: serde_json::Value =
        serde_json::from_str(&get(&client(), admin, "a", "/config", &[]).await.body).unwrap();
    for kind in ["lds", "rds", "cds", "eds"] {
        assert!(
            config["xds_versions"][kind]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "/config shows no {kind} version: {}",
            config["xds_versions"]
        );
    }
    // `/config` shows what the control plane sent, as it is in force now: the edited route
    // and the EDS endpoints of `b`.
    let shown = &config["config"];
    assert_eq!(
        shown["route_configs"][0]["virtual_hosts"][0]["routes"][0]["cluster"], "b",
        "{shown}"
    );
    let b_endpoint = format!("127.0.0.1:{}", b.port());
    assert!(
        shown["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "b" && c["endpoints"][0]["address"] == b_endpoint.as_str()),
        "{shown}"
    );
    cp.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The control plane as a real process: killed, the sidecar keeps serving what it has;
/// started again (with a changed config), the sidecar reconnects and converges.
#[tokio::test]
async fn a_sidecar_outlives_its_control_plane_and_reconnects() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = free_address();
    let cp_address = free_address();
    let dir = temp_dir("outlive");
    let path = dir.join("cp.yaml");
    std::fs::write(&path, served(listen, "a", a.port(), b.port())).unwrap();
    let start_cp = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_remora"))
            .args(["control-plane", "-c"])
            .arg(&path)
            .args(["--address", &cp_address.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut cp = start_cp();
    let app = xds_sidecar(cp_address, "shop").await;
    wait_ready(app.admin_address).await;
    until_served_by(listen, "a", Duration::from_secs(5)).await;

    cp.kill().unwrap();
    cp.wait().unwrap();
    let cl = client();
    for _ in 0..20 {
        let r = get(&cl, listen, "svc", "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"));
    }
    let mut down = 1.0;
    for _ in 0..100 {
        down = metric(app.admin_address, "remora_xds_connected").await;
        if down == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        down, 0.0,
        "remora_xds_connected after the control plane died"
    );

    std::fs::write(&path, served(listen, "b", a.port(), b.port())).unwrap();
    let mut cp = start_cp();
    until_served_by(listen, "b", Duration::from_secs(15)).await;
    cp.kill().unwrap();
    cp.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Resources remora cannot take are NACKed with the reason, and traffic stays as it was.
#[tokio::test]
async fn an_unsupported_resource_is_nacked_and_traffic_is_unchanged() {
    use remora_xds::envoy_types::pb::envoy::config::listener::v3::ListenerFilter;
    use remora_xds::server::{AdsServer, Cache, Snapshot};
    use std::sync::Arc;

    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = free_address();
    let good = remora::config::parse(&served(listen, "a", a.port(), b.port()), "good.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    let cache = Arc::new(Cache::default());
    cache.set("default", Snapshot::new(&to_envoy(&good)).unwrap());
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_address = socket.local_addr().unwrap();
    let group: remora_xds::server::GroupOf = Arc::new(|_| "default".to_string());
    tokio::spawn(remora_xds::server::serve(
        socket,
        AdsServer::new(cache.clone(), group),
    ));
    let app = xds_sidecar(cp_address, "shop").await;
    wait_ready(app.admin_address).await;
    until_served_by(listen, "a", Duration::from_secs(5)).await;

    // A listener filter: remora has none, and ignoring it would change behaviour.
    let mut bad = to_envoy(&good);
    bad.listeners[0].listener_filters.push(ListenerFilter {
        name: "envoy.filters.listener.tls_inspector".into(),
        ..Default::default()
    });
    cache.set("default", Snapshot::new(&bad).unwrap());
    let started = Instant::now();
    while cache.nacks.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no NACK");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(
            app.admin_address,
            "remora_xds_updates_total{result=\"nack\",type=\"lds\"}"
        )
        .await,
        1.0
    );
    let cl = client();
    for _ in 0..10 {
        let r = get(&cl, listen, "svc", "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"));
    }
}

/// YAML → xDS → YAML is the identity for every example config.
#[test]
fn every_example_config_survives_the_round_trip() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        // demo.yaml is a template whose ports the demo fills in.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("{{V1_PORT}}", "18081")
            .replace("{{V2_PORT}}", "18082");
        let raw = remora::config::parse(&text, &path.display().to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        let back =
            from_envoy(&to_envoy(&raw)).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        assert_eq!(back.listeners, raw.listeners, "{}", path.display());
        assert_eq!(back.route_configs, raw.route_configs, "{}", path.display());
        assert_eq!(back.clusters, raw.clusters, "{}", path.display());
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} example configs");
}

/// Only an EDS assignment changes (the endpoint moves from one upstream to another) while
/// requests flow: not one fails, and the traffic moves.
#[tokio::test]
async fn an_eds_only_change_under_load_fails_no_request() {
    let (a, b1, b2) = (
        Upstream::start("a").await,
        Upstream::start("b1").await,
        Upstream::start("b2").await,
    );
    let Followed {
        listen,
        dir,
        path,
        cp,
        app: _app,
    } = Followed::start("eds-load", "b", a.port(), b1.port(), "b1").await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let cl = client();
                let (mut sent, mut failed) = (0, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && sent < 5000 {
                    let r = get(&cl, listen, "svc", "/", &[]).await;
                    if r.status != 200 {
                        failed.push(format!("{} {}", r.status, r.body));
                    }
                    sent += 1;
                }
                (sent, failed)
            })
        })
        .collect();
    std::fs::write(&path, served(listen, "b", a.port(), b2.port())).unwrap();
    let started = Instant::now();
    while b2.hits() < 50 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "traffic never moved to b2"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (sent, failed) = task.await.unwrap();
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        total += sent;
    }
    assert!(total > 100, "only {total} requests sent");
    cp.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A served file edited into something invalid is refused by the control plane with located
/// errors; the last good snapshot keeps being served, and the sidecar keeps its config.
#[tokio::test]
async fn an_invalid_served_file_keeps_the_last_good_snapshot() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let Followed {
        listen,
        dir,
        path,
        cp,
        app,
    } = Followed::start("invalid", "a", a.port(), b.port(), "a").await;
    let before = metric(
        app.admin_address,
        "remora_xds_updates_total{result=\"ack\",type=\"rds\"}",
    )
    .await;
    // An unknown cluster: `remora validate` would refuse it.
    std::fs::write(&path, served(listen, "nosuch", a.port(), b.port())).unwrap();
    // Then a valid edit: the sidecar gets it, so the invalid one was skipped, not queued.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cl = client();
    for _ in 0..10 {
        let r = get(&cl, listen, "svc", "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "a"));
    }
    assert_eq!(
        metric(
            app.admin_address,
            "remora_xds_updates_total{result=\"ack\",type=\"rds\"}"
        )
        .await,
        before,
        "an invalid file was pushed"
    );
    std::fs::write(&path, served(listen, "b", a.port(), b.port())).unwrap();
    until_served_by(listen, "b", Duration::from_secs(8)).await;
    cp.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A dynamic resource with the name of a static one is refused (NACK), and the static one
/// stays in force.
#[tokio::test]
async fn a_name_defined_statically_and_by_the_control_plane_is_nacked() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = free_address();
    let dir = temp_dir("both");
    let path = dir.join("default.yaml");
    std::fs::write(&path, served(listen, "a", a.port(), b.port())).unwrap();
    let cp = remora::control_plane::start(&path, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // The sidecar defines cluster `a` itself (pointing at `b`'s upstream).
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nnode: {{ id: both }}\n\
         xds: {{ address: \"{}\", initial_fetch_timeout: 2s }}\n\
         clusters:\n  - {{ name: a, endpoints: [{{ address: \"127.0.0.1:{}\" }}] }}\n",
        cp.address,
        b.port()
    );
    let raw = remora::config::parse(&yaml, "sidecar.yaml").unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(raw, ConfigSource::Inline("sidecar.yaml".into()), &yaml)
        .await
        .unwrap();
    let started = Instant::now();
    while metric(
        app.admin_address,
        "remora_xds_updates_total{result=\"nack\",type=\"cds\"}",
    )
    .await
        < 1.0
    {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the duplicate cluster was not NACKed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let config = get(&client(), app.admin_address, "a", "/config", &[])
        .await
        .body;
    assert!(
        config.contains(&format!("127.0.0.1:{}", b.port()))
            && !config.contains(&format!("127.0.0.1:{}", a.port())),
        "the static cluster `a` must stay as defined:\n{config}"
    );
    cp.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With `cache_file`, a sidecar restarted while the control plane is down serves the config
/// it last accepted (Envoy cannot).
#[tokio::test]
async fn a_restart_with_a_cache_file_serves_while_the_control_plane_is_down() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = free_address();
    let dir = temp_dir("cache");
    let path = dir.join("default.yaml");
    std::fs::write(&path, served(listen, "b", a.port(), b.port())).unwrap();
    let cache = dir.join("xds-cache.bin");
    let cp = remora::control_plane::start(&path, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let cp_address = cp.address;
    let start = || {
        let yaml = format!(
            "admin: {{ address: 127.0.0.1:0 }}\nnode: {{ id: cached }}\n\
             xds: {{ address: \"{cp_address}\", initial_fetch_timeout: 30s, cache_file: \"{}\" }}\n",
            cache.display()
        );
        let raw = remora::config::parse(&yaml, "sidecar.yaml").unwrap_or_else(|e| panic!("{e}"));
        async move {
            App::start(raw, ConfigSource::Inline("sidecar.yaml".into()), &yaml)
                .await
                .unwrap()
        }
    };
    let first = start().await;
    wait_ready(first.admin_address).await;
    until_served_by(listen, "b", Duration::from_secs(5)).await;
    // The route config's ACK comes after its cache write.
    wait_metric(
        first.admin_address,
        "remora_xds_updates_total{result=\"ack\",type=\"rds\"}",
        1.0,
    )
    .await;
    assert!(cache.is_file(), "no cache file written");
    cp.stop();
    first.shutdown(Duration::from_secs(2)).await;

    // The control plane is gone; the initial fetch timeout (30 s) is far away.
    let second = start().await;
    wait_ready(second.admin_address).await;
    until_served_by(listen, "b", Duration::from_secs(5)).await;
    assert_eq!(
        metric(second.admin_address, "remora_xds_connected").await,
        0.0
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The ordinary "move the traffic, then delete the old cluster" edit in one step: the route
/// moves from `a` to `b` and cluster `a` disappears. CDS (without `a`) arrives while the
/// route still uses `a`: that route answers 503 `cluster_not_found` until the new route
/// config is in force (as in Envoy); nothing is NACKed.
#[tokio::test]
async fn moving_a_route_and_removing_its_old_cluster_in_one_edit_applies() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let Followed {
        listen,
        dir,
        path,
        cp,
        app,
    } = Followed::start("move", "a", a.port(), b.port(), "a").await;
    let without_a = served(listen, "b", a.port(), b.port()).replace(
        &format!(
            "  - {{ name: a, endpoints: [{{ address: \"127.0.0.1:{}\" }}] }}\n",
            a.port()
        ),
        "",
    );
    assert!(!without_a.contains("name: a,"), "{without_a}");
    std::fs::write(&path, without_a).unwrap();
    until_served_by(listen, "b", Duration::from_secs(8)).await;
    assert_eq!(cp.cache.nacks.load(std::sync::atomic::Ordering::Relaxed), 0);
    // `a` is gone once nothing uses it.
    let started = Instant::now();
    loop {
        let clusters = get(&client(), app.admin_address, "a", "/clusters", &[])
            .await
            .body;
        if !clusters.contains("\"name\": \"a\"") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "cluster `a` stayed:\n{clusters}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cp.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A listener whose route config is renamed keeps serving its previous version while the
/// new route config warms: its port never closes.
#[tokio::test]
async fn a_listener_switching_route_config_keeps_serving_while_it_warms() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let Followed {
        listen,
        dir,
        path,
        cp,
        app: _app,
    } = Followed::start("rds-rename", "a", a.port(), b.port(), "a").await;
    let renamed = served(listen, "b", a.port(), b.port()).replace("rc", "rc2");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let cl = client();
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let req = http::Request::get(format!("http://{listen}/"))
                    .header("host", "svc")
                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                    .unwrap();
                match cl.request(req).await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("{e}")),
                }
            }
            failures
        })
    };
    std::fs::write(&path, renamed).unwrap();
    until_served_by(listen, "b", Duration::from_secs(8)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = probe.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    cp.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The control plane named as a static cluster (`xds.cluster`). A dynamic route naming a
/// cluster the control plane has not delivered answers 503 `cluster_not_found` (no NACK), as
/// in Envoy, and is routed once the cluster comes. A static route must name a known cluster
/// (Envoy's `validate_clusters` for static route configs).
#[tokio::test]
async fn a_route_to_a_cluster_not_delivered_yet_answers_503_until_it_comes() {
    use remora_xds::server::{AdsServer, Cache, Snapshot};
    use std::sync::Arc;

    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let listen = free_address();
    let full = remora::config::parse(&served(listen, "a", a.port(), b.port()), "full.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut routes_first = to_envoy(&full);
    routes_first.clusters.retain(|c| c.name != "a");
    let cache = Arc::new(Cache::default());
    cache.set("default", Snapshot::new(&routes_first).unwrap());
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_address = socket.local_addr().unwrap();
    let group: remora_xds::server::GroupOf = Arc::new(|_| "default".to_string());
    tokio::spawn(remora_xds::server::serve(
        socket,
        AdsServer::new(cache.clone(), group),
    ));

    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nnode: {{ id: later }}\n\
         xds: {{ cluster: control-plane, initial_fetch_timeout: 5s }}\n\
         clusters:\n  - {{ name: control-plane, endpoints: [{{ address: \"{cp_address}\" }}] }}\n"
    );
    let raw = remora::config::parse(&yaml, "sidecar.yaml").unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(raw, ConfigSource::Inline("sidecar.yaml".into()), &yaml)
        .await
        .unwrap();
    wait_ready(app.admin_address).await;
    let cl = client();
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            let r = get(&cl, listen, "svc", "/", &[]).await;
            if r.status == 503 {
                assert_eq!(r.header("x-remora-error"), "cluster_not_found");
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "listener never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cache.nacks.load(std::sync::atomic::Ordering::Relaxed), 0);
    cache.set("default", Snapshot::new(&to_envoy(&full)).unwrap());
    until_served_by(listen, "a", Duration::from_secs(5)).await;

    // A static route naming a cluster the file does not have is refused at validation.
    let bad = format!(
        "{yaml}listeners:\n  - {{ name: in, address: \"{}\", route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: a }}] }}\n",
        free_address()
    );
    let errors =
        remora::config::parse(&bad, "bad.yaml").expect_err("a static route to an unknown cluster");
    assert!(
        errors.to_string().contains("unknown cluster `a`"),
        "{errors}"
    );
}

/// A static `type: eds` cluster serves the endpoints in the file until the control plane's
/// ClusterLoadAssignment for it arrives, then those.
#[tokio::test]
async fn a_static_eds_cluster_is_fed_by_the_control_plane() {
    use remora_xds::server::{AdsServer, Cache, Snapshot};
    use std::sync::Arc;

    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let static_listen = free_address();
    // Only an assignment for `b`, pointing at upstream `b`.
    let assignment =
        remora::config::parse(&served(free_address(), "b", a.port(), b.port()), "cla.yaml")
            .unwrap_or_else(|e| panic!("{e}"));
    let cla = to_envoy(&assignment).endpoints;
    assert_eq!(cla.len(), 1);
    let cache = Arc::new(Cache::default());
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_address = socket.local_addr().unwrap();
    let group: remora_xds::server::GroupOf = Arc::new(|_| "default".to_string());
    tokio::spawn(remora_xds::server::serve(
        socket,
        AdsServer::new(cache.clone(), group),
    ));

    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nnode: {{ id: static-eds }}\n\
         xds: {{ address: \"{cp_address}\", initial_fetch_timeout: 5s }}\n\
         listeners:\n  - {{ name: inbound, address: \"{static_listen}\", route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: b }}] }}\n\
         clusters:\n  - {{ name: b, type: eds, endpoints: [{{ address: \"127.0.0.1:{}\" }}] }}\n",
        a.port()
    );
    let raw = remora::config::parse(&yaml, "sidecar.yaml").unwrap_or_else(|e| panic!("{e}"));
    let _app = App::start(raw, ConfigSource::Inline("sidecar.yaml".into()), &yaml)
        .await
        .unwrap();
    // Until the control plane answers: the file's endpoint.
    until_served_by(static_listen, "a", Duration::from_secs(5)).await;
    cache.set(
        "default",
        Snapshot::new(&remora_xds::Resources {
            endpoints: cla,
            ..Default::default()
        })
        .unwrap(),
    );
    until_served_by(static_listen, "b", Duration::from_secs(10)).await;
}

/// A response with two resources of one name is NACKed by the client, with the reason, and
/// counted.
#[tokio::test]
async fn duplicate_names_in_a_response_are_nacked() {
    use remora_xds::envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use remora_xds::envoy_types::pb::envoy::service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use tokio_stream::Stream;

    type Out<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

    /// Answers every CDS request with two clusters named `dup`; records NACK reasons.
    struct Duplicating {
        nacks: Arc<Mutex<Vec<String>>>,
    }

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Duplicating {
        type StreamAggregatedResourcesStream = Out<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream = Out<DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let nacks = self.nacks.clone();
            tokio::spawn(async move {
                while let Ok(Some(req)) = inbound.message().await {
                    if let Some(e) = &req.error_detail {
                        nacks.lock().unwrap().push(e.message.clone());
                        continue;
                    }
                    if !req.type_url.ends_with("Cluster") || !req.response_nonce.is_empty() {
                        continue;
                    }
                    let cluster =
                        remora_xds::envoy_types::pb::envoy::config::cluster::v3::Cluster {
                            name: "dup".into(),
                            ..Default::default()
                        };
                    let any = remora_xds::envoy_types::pb::google::protobuf::Any {
                        type_url: req.type_url.clone(),
                        value: prost::Message::encode_to_vec(&cluster),
                    };
                    let resp = DiscoveryResponse {
                        version_info: "1".into(),
                        resources: vec![any.clone(), any],
                        type_url: req.type_url.clone(),
                        nonce: "n1".into(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }

        async fn delta_aggregated_resources(
            &self,
            _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("no delta"))
        }
    }

    let nacks = Arc::new(Mutex::new(Vec::new()));
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_address = socket.local_addr().unwrap();
    let service = AggregatedDiscoveryServiceServer::new(Duplicating {
        nacks: nacks.clone(),
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(socket)),
    );
    let app = xds_sidecar(cp_address, "shop").await;
    let started = Instant::now();
    while nacks.lock().unwrap().is_empty() {
        assert!(started.elapsed() < Duration::from_secs(5), "no NACK");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        nacks.lock().unwrap()[0].contains("duplicate resource name `dup`"),
        "{:?}",
        nacks.lock().unwrap()
    );
    wait_metric(
        app.admin_address,
        "remora_xds_updates_total{result=\"nack\",type=\"cds\"}",
        1.0,
    )
    .await;
}
