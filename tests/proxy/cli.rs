//! The `remora` binary: validate, run, version; and every example config loads.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const BROKEN: &str = r#"admin: { address: 127.0.0.1:0 }
listeners:
  - name: a
    address: 127.0.0.1:18555
    route_config: mesh
  - name: b
    address: 127.0.0.1:18555
    route_config: mseh
route_configs:
  - name: mesh
    virtual_hosts:
      - name: v
        domains: ["*"]
        routes:
          - match: { prefix: /, regex: "(" }
            clustr: orders
          - match: { regex: "([a-z" }
            cluster: ordrs
          - match: { prefix: / }
            weighted_clusters: [{ name: orders, weight: 0 }]
clusters:
  - name: orders
    connect_timeout: 5
    endpoints: [{ address: "not-an-address" }]
"#;

#[test]
fn validate_reports_every_error_with_line_and_column_and_exits_1() {
    let path = temp_file("broken.yaml", BROKEN);
    let out = Command::new(REMORA)
        .args(["validate", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    let expect = [
        format!("{file}:16:13: route_configs[0].virtual_hosts[0].routes[0].clustr: unknown field `clustr` (did you mean `cluster`?)"),
        format!("{file}:23:22: clusters[0].connect_timeout: duration `5` has no unit"),
        format!("{file}:7:14: listeners[1].address: address 127.0.0.1:18555 overlaps 127.0.0.1:18555, used by listener `a`: both cannot be bound"),
        format!("{file}:8:19: listeners[1].route_config: unknown route config `mseh` (did you mean `mesh`?)"),
        format!("{file}:15:20: route_configs[0].virtual_hosts[0].routes[0].match: needs exactly one of `prefix`, `path` or `regex`"),
        format!("{file}:15:40: route_configs[0].virtual_hosts[0].routes[0].match.regex: invalid regex `(`: unclosed group"),
        format!("{file}:15:13: route_configs[0].virtual_hosts[0].routes[0]: needs exactly one action"),
        format!("{file}:17:29: route_configs[0].virtual_hosts[0].routes[1].match.regex: invalid regex `([a-z`: unclosed character class"),
        format!("{file}:18:22: route_configs[0].virtual_hosts[0].routes[1].cluster: unknown cluster `ordrs` (did you mean `orders`?)"),
        format!("{file}:20:32: route_configs[0].virtual_hosts[0].routes[2].weighted_clusters: weights sum to 0"),
        format!("{file}:24:28: clusters[0].endpoints[0].address: `not-an-address` is not an `ip:port` address"),
    ];
    for e in &expect {
        assert!(
            err.lines().any(|l| l.starts_with(e.as_str())),
            "missing {e}\nin:\n{err}"
        );
    }
    assert_eq!(err.lines().count(), expect.len(), "{err}");
}

#[test]
fn run_with_an_invalid_config_exits_1_without_starting() {
    let path = temp_file("broken-run.yaml", BROKEN);
    let started = Instant::now();
    let out = Command::new(REMORA)
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `clustr`"));
    assert!(
        std::net::TcpStream::connect("127.0.0.1:18555").is_err(),
        "nothing was bound"
    );
}

#[test]
fn version_is_printed() {
    let out = Command::new(REMORA).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("remora {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn run_serves_then_exits_0_on_sigterm() {
    let up = Upstream::start("up").await;
    let (listen, admin) = (free_address(), free_address());
    let yaml = binary_config(admin, listen, up.port(), "shutdown: { drain_delay: 200ms }");
    let path = temp_file("run.yaml", &yaml);
    let mut child = Command::new(REMORA)
        .args(["--log-format", "json", "run", "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_ready(admin).await;
    assert_eq!(get(&client(), listen, "svc", "/", &[]).await.body, "up");
    sigterm(&child);
    assert_eq!(wait_exit(&mut child).await.code(), Some(0));
}

#[test]
fn every_example_config_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("{{V1_PORT}}", "18081")
            .replace("{{V2_PORT}}", "18082");
        if let Err(e) = remora::config::parse(&text, &path.display().to_string()) {
            panic!("{e}");
        }
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} example configs");
}
