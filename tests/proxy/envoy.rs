//! Envoy as the oracle: one route table served by `remora control-plane` to a real Envoy and
//! to remora, and a corpus of requests answered the same by both.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;

/// The route table both proxies get, with their own listener address. Every match kind,
/// header matcher, methods, direct responses, exact, suffix and prefix domains, a `*` host.
fn table(listen: SocketAddr, a: u16, b: u16, c: u16, direct_body: &str) -> String {
    format!(
        r#"listeners:
  - {{ name: main, address: "{listen}", route_config: rc }}
route_configs:
  - name: rc
    virtual_hosts:
      - name: shop
        domains: ["shop", "shop.example.com", "*.shop.local"]
        routes:
          - {{ match: {{ path: /exact }}, cluster: a }}
          - {{ match: {{ prefix: /api/, headers: [{{ name: x-canary, exact: "1" }}] }}, cluster: b }}
          - {{ match: {{ prefix: /api/, methods: [POST, PUT] }}, cluster: c }}
          - {{ match: {{ prefix: /api/ }}, cluster: a }}
          - {{ match: {{ regex: "/items/[0-9]+" }}, cluster: b }}
          - {{ match: {{ prefix: /hdr, headers: [{{ name: x-user, prefix: adm }}] }}, cluster: c }}
          - {{ match: {{ prefix: /hdr, headers: [{{ name: x-user, suffix: "-x" }}] }}, direct_response: {{ status: 418, body: teapot }} }}
          - {{ match: {{ prefix: /hdr, headers: [{{ name: x-user, present: true, invert: true }}] }}, cluster: b }}
          - {{ match: {{ prefix: /contains, headers: [{{ name: x-tag, contains: blue }}] }}, cluster: c }}
          - {{ match: {{ prefix: /direct }}, direct_response: {{ status: 200, body: {direct_body} }} }}
          - {{ match: {{ prefix: / }}, cluster: a }}
      - name: other
        domains: ["other.*"]
        routes:
          - {{ match: {{ prefix: / }}, cluster: b }}
      - name: fallback
        domains: ["*"]
        routes:
          - {{ match: {{ prefix: /only }}, cluster: c }}
clusters:
  - {{ name: a, endpoints: [{{ address: "127.0.0.1:{a}" }}] }}
  - {{ name: b, endpoints: [{{ address: "127.0.0.1:{b}" }}] }}
  - {{ name: c, type: eds, endpoints: [{{ address: "127.0.0.1:{c}" }}] }}
"#
    )
}

/// Envoy's bootstrap: ADS from the control plane at `cp`, node cluster `envoy`.
fn envoy_bootstrap(cp: SocketAddr, admin: SocketAddr) -> String {
    format!(
        r#"node: {{ id: envoy-oracle, cluster: envoy }}
admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{ envoy_grpc: {{ cluster_name: xds }} }}]
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
    - name: xds
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{ http2_protocol_options: {{}} }}
      load_assignment:
        cluster_name: xds
        endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {cp_port} }} }} }} }}] }}]
"#,
        admin_port = admin.port(),
        cp_port = cp.port()
    )
}

/// What a proxy made of one request: the upstream that answered, or the local status (and
/// body for a direct response).
async fn outcome(cl: &TestClient, proxy: SocketAddr, req: &Probe) -> String {
    let mut r = http::Request::builder()
        .method(req.method)
        .uri(format!("http://{proxy}{}", req.path))
        .header("host", req.host);
    if let Some((k, v)) = req.header {
        r = r.header(k, v);
    }
    let a = send(
        cl,
        r.body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    match a.header("x-upstream") {
        "" => format!(
            "{} {}",
            a.status.as_u16(),
            if a.status == 404 { "" } else { a.body.as_str() }
        ),
        up => format!("upstream {up}"),
    }
}

struct Probe {
    host: &'static str,
    path: &'static str,
    method: &'static str,
    header: Option<(&'static str, &'static str)>,
}

fn corpus() -> Vec<Probe> {
    let hosts = [
        "shop",
        "shop:8080",
        "SHOP",
        "shop.example.com",
        "Shop.Example.Com:443",
        "api.shop.local",
        "x.y.shop.local:1",
        "other.net",
        "other.net:99",
        "unknown",
    ];
    let paths = [
        "/exact",
        "/exact/",
        "/api/x",
        "/API/x",
        "/items/42",
        "/items/4x",
        "/hdr",
        "/contains",
        "/direct",
        "/only",
        "/nothing",
    ];
    let headers = [
        None,
        Some(("x-canary", "1")),
        Some(("x-user", "admin")),
        Some(("x-user", "bob-x")),
        Some(("x-tag", "deep-blue")),
    ];
    let mut out = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        for (j, path) in paths.iter().enumerate() {
            for (k, header) in headers.iter().enumerate() {
                // Every host × path × header, the method alternating so both are covered.
                let method = if (i + j + k) % 2 == 0 { "GET" } else { "POST" };
                out.push(Probe {
                    host,
                    path,
                    method,
                    header: *header,
                });
            }
        }
    }
    out
}

/// One route table, served by `remora control-plane` from a directory to Envoy (node
/// cluster `envoy`) and to remora (node cluster `remora`): 550 requests get the same answer
/// from both (which upstream, or the local status). Then an edit reaches Envoy.
#[tokio::test]
async fn envoy_and_remora_answer_alike_under_remora_control_plane() {
    let envoy = envoy_binary();
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let (envoy_listen, remora_listen) = (free_address(), free_address());
    let dir = std::env::temp_dir().join(format!("remora-oracle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("envoy.yaml"),
        table(envoy_listen, a.port(), b.port(), c.port(), "direct"),
    )
    .unwrap();
    std::fs::write(
        dir.join("remora.yaml"),
        table(remora_listen, a.port(), b.port(), c.port(), "direct"),
    )
    .unwrap();
    let cp = remora::control_plane::start(&dir, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    let envoy_admin = free_address();
    let bootstrap = dir.join("envoy-bootstrap.yml");
    std::fs::write(&bootstrap, envoy_bootstrap(cp.address, envoy_admin)).unwrap();
    let mut envoy_proc = std::process::Command::new(&envoy)
        .arg("-c")
        .arg(&bootstrap)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--use-dynamic-base-id",
            "-l",
            "error",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start envoy");

    let sidecar_yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nnode: {{ id: remora-oracle, cluster: remora }}\n\
         xds: {{ address: \"{}\" }}\n",
        cp.address
    );
    let raw = remora::config::parse(&sidecar_yaml, "sidecar.yaml").unwrap();
    let app = remora::app::App::start(
        raw,
        remora::app::ConfigSource::Inline("sidecar.yaml".into()),
        &sidecar_yaml,
    )
    .await
    .unwrap();
    wait_ready(app.admin_address).await;

    let cl = client();
    // Envoy is up when its listener routes `/exact` to `a`.
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(envoy_listen).await.is_ok() {
            let probe = Probe {
                host: "shop",
                path: "/exact",
                method: "GET",
                header: None,
            };
            if outcome(&cl, envoy_listen, &probe).await == "upstream a" {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Envoy never served the table"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let corpus = corpus();
    let mut differ = Vec::new();
    let mut kinds = std::collections::BTreeSet::new();
    for p in &corpus {
        let (e, r) = (
            outcome(&cl, envoy_listen, p).await,
            outcome(&cl, remora_listen, p).await,
        );
        kinds.insert(e.clone());
        if e != r {
            differ.push(format!(
                "{} {}{} {:?}: envoy `{e}`, remora `{r}`",
                p.method, p.host, p.path, p.header
            ));
        }
    }
    assert!(corpus.len() >= 200);
    assert!(
        kinds.len() >= 6,
        "the corpus exercises too few outcomes: {kinds:?}"
    );
    assert!(
        differ.is_empty(),
        "{} of {} differ:\n{}",
        differ.len(),
        corpus.len(),
        differ.join("\n")
    );

    // An edit reaches Envoy.
    std::fs::write(
        dir.join("envoy.yaml"),
        table(envoy_listen, a.port(), b.port(), c.port(), "edited"),
    )
    .unwrap();
    let probe = Probe {
        host: "shop",
        path: "/direct",
        method: "GET",
        header: None,
    };
    let started = Instant::now();
    while outcome(&cl, envoy_listen, &probe).await != "200 edited" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "Envoy did not apply the edit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = envoy_proc.kill();
    let _ = envoy_proc.wait();
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
