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
    let mut envoy_proc = start_envoy(&bootstrap);

    let app = xds_sidecar(cp.address, "remora").await;
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

/// Starts Envoy on `bootstrap`, quiet, one worker.
fn start_envoy(bootstrap: &std::path::Path) -> std::process::Child {
    std::process::Command::new(envoy_binary())
        .arg("-c")
        .arg(bootstrap)
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
        .expect("start envoy")
}

const REMORA_ID: &str = "spiffe://mesh.local/ns/shop/sa/remora";
const ENVOY_ID: &str = "spiffe://mesh.local/ns/shop/sa/envoy";

/// Each proxy's config in the mesh test: an mTLS `inbound` listener in front of its own app
/// that admits only the peer's identity (and on `/admin` only `ops` identities), and a plain
/// `outbound` listener whose routes reach the other proxy's inbound over mTLS (`/nocert`
/// without a client certificate, `/wrongsan` expecting another identity).
struct MeshSide<'a> {
    inbound: SocketAddr,
    outbound: SocketAddr,
    app: u16,
    peer_inbound: SocketAddr,
    peer_id: &'a str,
    cert: &'a (String, String),
    ca: &'a str,
}

impl MeshSide<'_> {
    fn yaml(&self) -> String {
        let (cert, key) = self.cert;
        let (ca, peer, peer_id) = (self.ca, self.peer_inbound, self.peer_id);
        format!(
            r#"listeners:
  - name: inbound
    address: "{inbound}"
    route_config: inbound
    tls: {{ cert_file: "{cert}", key_file: "{key}", client_ca_file: "{ca}" }}
  - {{ name: outbound, address: "{outbound}", route_config: outbound }}
route_configs:
  - name: inbound
    virtual_hosts:
      - name: app
        domains: ["*"]
        authorization: {{ principals: ["{peer_id}"] }}
        routes:
          - {{ match: {{ prefix: /admin }}, cluster: app, authorization: {{ principals: ["spiffe://mesh.local/ns/ops/*"] }} }}
          - {{ match: {{ prefix: / }}, cluster: app }}
  - name: outbound
    virtual_hosts:
      - name: mesh
        domains: ["*"]
        routes:
          - {{ match: {{ prefix: /nocert }}, cluster: peer-nocert }}
          - {{ match: {{ prefix: /wrongsan }}, cluster: peer-wrong-san }}
          - {{ match: {{ prefix: / }}, cluster: peer }}
clusters:
  - {{ name: app, endpoints: [{{ address: "127.0.0.1:{app}" }}] }}
  - name: peer
    endpoints: [{{ address: "{peer}" }}]
    tls: {{ ca_file: "{ca}", cert_file: "{cert}", key_file: "{key}", verify_subject_alt_names: ["{peer_id}"] }}
  - name: peer-nocert
    endpoints: [{{ address: "{peer}" }}]
    tls: {{ ca_file: "{ca}", verify_subject_alt_names: ["{peer_id}"] }}
  - name: peer-wrong-san
    endpoints: [{{ address: "{peer}" }}]
    tls: {{ ca_file: "{ca}", cert_file: "{cert}", key_file: "{key}", verify_subject_alt_names: ["spiffe://mesh.local/ns/shop/sa/someone-else"] }}
"#,
            inbound = self.inbound,
            outbound = self.outbound,
            app = self.app,
        )
    }
}

/// The mesh both ways with one CA, both proxies configured by `remora control-plane` from
/// YAML: Envoy is the mTLS client of remora's inbound listener and remora the mTLS client of
/// Envoy's. Each side checks the other's SPIFFE ID, each app sees its caller's identity in
/// `x-forwarded-client-cert`, a caller without a certificate or expecting another identity
/// gets no connection (503), and a caller its principal does not admit gets 403 (remora's
/// `authorization`, which Envoy gets as RBAC).
#[tokio::test]
async fn envoy_and_remora_speak_mtls_to_each_other_under_remora_control_plane() {
    let pki = crate::tls::Pki::new("mesh-interop");
    let remora_cert = pki.leaf("remora", &["localhost"], Some(REMORA_ID));
    let envoy_cert = pki.leaf("envoy", &["localhost"], Some(ENVOY_ID));
    let ca = pki.ca();
    let (remora_app, envoy_app) = (
        Upstream::start("remora-app").await,
        Upstream::start("envoy-app").await,
    );
    let (remora_in, remora_out) = (free_address(), free_address());
    let (envoy_in, envoy_out) = (free_address(), free_address());
    let remora_side = MeshSide {
        inbound: remora_in,
        outbound: remora_out,
        app: remora_app.port(),
        peer_inbound: envoy_in,
        peer_id: ENVOY_ID,
        cert: &remora_cert,
        ca: &ca,
    };
    let envoy_side = MeshSide {
        inbound: envoy_in,
        outbound: envoy_out,
        app: envoy_app.port(),
        peer_inbound: remora_in,
        peer_id: REMORA_ID,
        cert: &envoy_cert,
        ca: &ca,
    };
    let dir = std::env::temp_dir().join(format!("remora-mesh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("remora.yaml"), remora_side.yaml()).unwrap();
    std::fs::write(dir.join("envoy.yaml"), envoy_side.yaml()).unwrap();
    let cp = remora::control_plane::start(&dir, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();

    let bootstrap = dir.join("envoy-bootstrap.yml");
    std::fs::write(&bootstrap, envoy_bootstrap(cp.address, free_address())).unwrap();
    let mut envoy_proc = start_envoy(&bootstrap);
    let app = xds_sidecar(cp.address, "remora").await;
    wait_ready(app.admin_address).await;

    let cl = client();
    let get = |addr: SocketAddr, path: &'static str| {
        let cl = cl.clone();
        async move {
            let req = http::Request::get(format!("http://{addr}{path}"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            send(&cl, req).await
        }
    };
    // Envoy → remora: Envoy is up once its outbound listener reaches remora's app.
    let started = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(envoy_out).await.is_ok() {
            let a = get(envoy_out, "/from-envoy").await;
            if a.status == 200 {
                assert_eq!(a.header("x-upstream"), "remora-app");
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Envoy never reached remora over mTLS"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = remora_app.seen();
    let xfcc = seen.last().unwrap().headers["x-forwarded-client-cert"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        xfcc.starts_with(&format!("By={REMORA_ID};Hash="))
            && xfcc.ends_with(&format!(";URI={ENVOY_ID}")),
        "remora's app sees Envoy's identity: {xfcc}"
    );

    // remora → Envoy.
    let a = get(remora_out, "/from-remora").await;
    assert_eq!(
        (a.status.as_u16(), a.header("x-upstream")),
        (200, "envoy-app")
    );
    let seen = envoy_app.seen();
    let xfcc = seen.last().unwrap().headers["x-forwarded-client-cert"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        xfcc.starts_with(&format!("By={ENVOY_ID};Hash="))
            && xfcc.ends_with(&format!(";URI={REMORA_ID}")),
        "Envoy's app sees remora's identity: {xfcc}"
    );

    // The refusals, both ways: not admitted by principal, without a client certificate, and
    // expecting another identity.
    let hits = (remora_app.hits(), envoy_app.hits());
    for addr in [remora_out, envoy_out] {
        let a = get(addr, "/admin").await;
        assert_eq!(a.status, 403, "{addr}/admin: {}", a.body);
    }
    for (addr, path) in [
        (remora_out, "/nocert"),
        (remora_out, "/wrongsan"),
        (envoy_out, "/nocert"),
        (envoy_out, "/wrongsan"),
    ] {
        let a = get(addr, path).await;
        assert_eq!(a.status, 503, "{addr}{path}: {}", a.body);
    }
    assert_eq!((remora_app.hits(), envoy_app.hits()), hits);

    let _ = envoy_proc.kill();
    let _ = envoy_proc.wait();
    cp.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
