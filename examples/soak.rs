//! The soak (`bench/soak/run`): one remora under steady load for a long time while
//! everything that changes state happens at once: HTTP/1.1 at a fixed rate, a reload every
//! 10 s, an endpoint that flaps (so health checks and outlier detection act all the time),
//! and a WebSocket and a gRPC stream held open throughout. Every 10 s it samples remora's
//! RSS, open file descriptors and tokio tasks; at the end it prints a Markdown report with
//! the failures and each sample's slope. Loopback only; stops what it starts.
//!
//! `soak REMORA_BINARY MINUTES RATE`, e.g. `soak target/release/remora 30 2000`.

use std::convert::Infallible;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use http::uri::PathAndQuery;
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};
use tonic_prost::ProstCodec;

/// How long the flapping endpoint stays up, then down, in turn.
const FLAP: Duration = Duration::from_secs(7);
const RELOAD_EVERY: Duration = Duration::from_secs(10);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const CONNECTIONS: usize = 20;

#[derive(Default)]
struct Counts {
    /// Each failure's kind (status and `x-remora-error`, or how the connection broke) and
    /// the minute it happened.
    failures: std::sync::Mutex<Vec<(f64, String)>>,
    ok: AtomicU64,
    failed: AtomicU64,
    ws_ok: AtomicU64,
    ws_failed: AtomicU64,
    grpc_ok: AtomicU64,
    grpc_failed: AtomicU64,
    reloads: AtomicU64,
    started: Option<Instant>,
}

impl Counts {
    fn fail(&self, kind: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let minute = self
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64() / 60.0);
        self.failures.lock().expect("lock").push((minute, kind));
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: soak REMORA_BINARY MINUTES RATE");
        std::process::exit(2);
    }
    let binary = args[1].clone();
    let minutes: f64 = args[2].parse().expect("minutes");
    let rate: f64 = args[3].parse().expect("rate");
    let length = Duration::from_secs_f64(minutes * 60.0);

    let steady = http_upstream(Arc::new(AtomicBool::new(true))).await;
    let flappy_up = Arc::new(AtomicBool::new(true));
    let flappy = http_upstream(flappy_up.clone()).await;
    let ws = ws_upstream().await;
    let grpc = grpc_upstream().await;
    let (listen, admin) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("remora-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("soak.yaml");
    let ports = Ports {
        listen,
        admin,
        steady,
        flappy,
        ws,
        grpc,
    };
    std::fs::write(&file, ports.config(0)).expect("write config");
    let mut remora = Remora(
        Command::new(&binary)
            .args(["run", "-c"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start remora"),
    );
    let pid = remora.0.id();
    wait_ready(admin).await;

    let counts = Arc::new(Counts {
        started: Some(Instant::now()),
        ..Counts::default()
    });
    let started = Instant::now();
    let end = started + length;

    // The flapping endpoint: up for FLAP, down (503 to everything) for FLAP.
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(FLAP).await;
            flappy_up.fetch_xor(true, Ordering::Relaxed);
        }
    });
    // A reload every 10 s: a response header on the web route changes each time, and every
    // third time the steady endpoint's weight (a cluster rebuilt, its state carried over).
    {
        let (file, counts) = (file.clone(), counts.clone());
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                if Instant::now() + Duration::from_secs(1) >= end {
                    return;
                }
                n += 1;
                let tmp = file.with_extension("tmp");
                std::fs::write(&tmp, ports.config(n)).expect("write config");
                std::fs::rename(&tmp, &file).expect("swap config");
                counts.reloads.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let load = load(listen, rate, end, counts.clone());
    let ws_task = tokio::spawn(ws_stream(listen, end, counts.clone()));
    let grpc_task = tokio::spawn(grpc_stream(listen, end, counts.clone()));

    let mut samples = Vec::new();
    while Instant::now() < end {
        let at = started.elapsed().as_secs_f64() / 60.0;
        samples.push(Sample {
            minute: at,
            rss_kib: rss_kib(pid),
            fds: fds(pid),
            tasks: tasks(admin).await,
            ok: counts.ok.load(Ordering::Relaxed),
            failed: counts.failed.load(Ordering::Relaxed),
        });
        tokio::time::sleep(SAMPLE_EVERY.min(end.saturating_duration_since(Instant::now()))).await;
    }
    for t in load {
        let _ = t.await;
    }
    let _ = ws_task.await;
    let _ = grpc_task.await;
    samples.push(Sample {
        minute: started.elapsed().as_secs_f64() / 60.0,
        rss_kib: rss_kib(pid),
        fds: fds(pid),
        tasks: tasks(admin).await,
        ok: counts.ok.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
    });
    let applied = metric(
        admin,
        "remora_config_reloads_total{result=\"success\",source=\"file\"}",
    )
    .await
    .unwrap_or(-1.0);
    let ejections = sum_metric(admin, "remora_outlier_ejections_total{").await;
    let retry_overflow = sum_metric(
        admin,
        "remora_circuit_breaker_overflow_total{cluster=\"web\",resource=\"retries\"}",
    )
    .await;
    let budget_exhausted = sum_metric(admin, "remora_retry_budget_exhausted_total{").await;
    let health_failures = sum_metric(
        admin,
        "remora_health_checks_total{cluster=\"web\",result=\"failure\"}",
    )
    .await;
    remora.stop();
    let _ = std::fs::remove_dir_all(&dir);
    report(
        &samples,
        &counts,
        minutes,
        rate,
        &Totals {
            applied,
            ejections,
            health_failures,
            retry_overflow,
            budget_exhausted,
        },
    );
}

#[derive(Clone, Copy)]
struct Ports {
    listen: u16,
    admin: u16,
    steady: u16,
    flappy: u16,
    ws: u16,
    grpc: u16,
}

impl Ports {
    fn config(&self, n: u64) -> String {
        let weight = 1 + (n / 3) % 2;
        format!(
            r#"admin: {{ address: "127.0.0.1:{admin}" }}
listeners:
  - {{ name: main, address: "127.0.0.1:{listen}", route_config: soak }}
route_configs:
  - name: soak
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{ prefix: /test.Echo/ }}
            cluster: grpc
            timeout: 0s
          - match: {{ prefix: /ws }}
            cluster: ws
          - match: {{ prefix: / }}
            cluster: web
            retry_policy: {{ retry_on: [5xx, reset, connect-failure], num_retries: 3, backoff: {{ base_interval: 5ms, max_interval: 50ms }} }}
            response_headers_to_add: [{{ name: x-soak-version, value: "{n}" }}]
clusters:
  - name: web
    endpoints: [{{ address: "127.0.0.1:{steady}", weight: {weight} }}, {{ address: "127.0.0.1:{flappy}" }}]
    health_check: {{ path: /healthz, interval: 1s, timeout: 500ms, unhealthy_threshold: 1, healthy_threshold: 2 }}
    outlier_detection: {{ consecutive_5xx: 3, interval: 1s, base_ejection_time: 3s, max_ejection_percent: 50 }}
    retry_budget: {{ ratio: 0.5, min_retries_per_second: 50 }}
    # Envoy's default of 3 retries in flight lets a few of the flapping endpoint's 503s
    # through at 2,000 req/s (a burst of them lands in the moment before it is ejected).
    circuit_breakers: {{ max_retries: 50 }}
  - name: ws
    endpoints: [{{ address: "127.0.0.1:{ws}" }}]
  - name: grpc
    protocol: http2
    endpoints: [{{ address: "127.0.0.1:{grpc}" }}]
"#,
            admin = self.admin,
            listen = self.listen,
            steady = self.steady,
            flappy = self.flappy,
            ws = self.ws,
            grpc = self.grpc,
        )
    }
}

/// remora as a child process; stopped (SIGTERM, then kill) when dropped.
struct Remora(Child);

impl Remora {
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Remora {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.stop();
        }
    }
}

fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("address").port()
}

/// An HTTP/1.1 origin answering `200 ok`, or 503 to everything (health checks included)
/// while `up` is false.
async fn http_upstream(up: Arc<AtomicBool>) -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = socket.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let up = up.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                    let status = if up.load(Ordering::Relaxed) { 200 } else { 503 };
                    async move {
                        let mut resp = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                        *resp.status_mut() = http::StatusCode::from_u16(status).expect("status");
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

async fn ws_upstream() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = socket.local_addr().expect("address").port();
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

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[derive(Clone)]
struct Echo;

impl NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct Bidi;

impl StreamingService<Msg> for Bidi {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = BoxFuture<Response<MsgStream>, Status>;
    fn call(&mut self, req: Request<Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let out = req.into_inner().map(|m| m.map(|m| Msg { text: m.text }));
            Ok(Response::new(Box::pin(out) as MsgStream))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for Echo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::<Msg, Msg>::default());
            Ok(match req.uri().path() {
                "/test.Echo/Bidi" => grpc.streaming(Bidi, req).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

async fn grpc_upstream() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = socket.local_addr().expect("address").port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Echo)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(socket)),
    );
    port
}

/// Fixed-rate GETs over keep-alive connections until `end`; a non-2xx answer or a broken
/// connection is a failure (a broken connection is reopened).
fn load(
    port: u16,
    rate: f64,
    end: Instant,
    counts: Arc<Counts>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let gap = Duration::from_secs_f64(CONNECTIONS as f64 / rate);
    (0..CONNECTIONS)
        .map(|c| {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut due = Instant::now() + gap.mul_f64(c as f64 / CONNECTIONS as f64);
                let mut sender = None;
                while due < end {
                    tokio::time::sleep_until(due.into()).await;
                    due += gap;
                    if sender.is_none() {
                        sender = connect(port).await;
                    }
                    let Some(s) = sender.as_mut() else {
                        counts.fail("could not connect".into());
                        continue;
                    };
                    let req = http::Request::get("/")
                        .header("host", "soak")
                        .body(Empty::<Bytes>::new())
                        .expect("request");
                    let answered = match s.ready().await {
                        Ok(()) => s.send_request(req).await.ok(),
                        Err(_) => None,
                    };
                    match answered {
                        Some(resp) if resp.status().is_success() => {
                            let _ = resp.into_body().collect().await;
                            counts.ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(resp) => {
                            let kind = format!(
                                "{} {}",
                                resp.status().as_u16(),
                                resp.headers()
                                    .get("x-remora-error")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("(from the upstream)")
                            );
                            let _ = resp.into_body().collect().await;
                            counts.fail(kind);
                        }
                        None => {
                            counts.fail("connection broke".into());
                            sender = None;
                        }
                    }
                }
            })
        })
        .collect()
}

async fn connect(port: u16) -> Option<http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.set_nodelay(true).ok();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// One WebSocket, open from start to end: a message a second, each echoed.
async fn ws_stream(port: u16, end: Instant, counts: Arc<Counts>) {
    let url = format!("ws://127.0.0.1:{port}/ws");
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let Ok((mut ws, _)) = tokio_tungstenite::client_async(url, stream).await else {
        counts.ws_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut n = 0u64;
    while Instant::now() < end {
        n += 1;
        let text = format!("ping {n}");
        let sent = ws
            .send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await;
        let echoed = match sent {
            Ok(()) => tokio::time::timeout(Duration::from_secs(5), ws.next()).await,
            Err(_) => Ok(None),
        };
        match echoed {
            Ok(Some(Ok(m))) if m.to_text().ok() == Some(text.as_str()) => {
                counts.ws_ok.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                // The stream broke: that is the failure this measures; stop counting.
                counts.ws_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = ws.close(None).await;
}

/// One gRPC bidirectional stream, open from start to end: a message a second, each echoed.
async fn grpc_stream(port: u16, end: Instant, counts: Arc<Counts>) {
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("uri")
        .connect()
        .await;
    let Ok(channel) = channel else {
        counts.grpc_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        counts.grpc_failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let call = grpc.streaming(
        Request::new(tokio_stream::wrappers::ReceiverStream::new(rx)),
        PathAndQuery::from_static("/test.Echo/Bidi"),
        ProstCodec::<Msg, Msg>::default(),
    );
    let _ = tx
        .send(Msg {
            text: "hello".into(),
        })
        .await;
    let Ok(resp) = call.await else {
        counts.grpc_failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut inbound = resp.into_inner();
    let mut expected = "hello".to_string();
    let mut n = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), inbound.message()).await {
            Ok(Ok(Some(m))) if m.text == expected => {
                counts.grpc_ok.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                counts.grpc_failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        n += 1;
        expected = format!("message {n}");
        if tx
            .send(Msg {
                text: expected.clone(),
            })
            .await
            .is_err()
        {
            counts.grpc_failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}

async fn admin_get(port: u16, path: &str) -> Option<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    String::from_utf8(body.to_vec()).ok()
}

async fn wait_ready(admin: u16) {
    for _ in 0..500 {
        if admin_get(admin, "/ready").await.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("remora was not ready in 10 s");
}

async fn metric(admin: u16, sample: &str) -> Option<f64> {
    let text = admin_get(admin, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// The sum of every sample whose line starts with `prefix`.
async fn sum_metric(admin: u16, prefix: &str) -> f64 {
    let text = admin_get(admin, "/metrics").await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>()
        + 0.0 // an empty sum is -0.0
}

async fn tasks(admin: u16) -> f64 {
    metric(admin, "remora_runtime_tasks_alive")
        .await
        .unwrap_or(f64::NAN)
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn fds(pid: u32) -> f64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(f64::NAN, |d| d.count() as f64)
}

struct Sample {
    minute: f64,
    rss_kib: f64,
    fds: f64,
    tasks: f64,
    ok: u64,
    failed: u64,
}

/// Least-squares slope of `y` over minutes, per minute.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// What remora's own metrics said at the end.
struct Totals {
    applied: f64,
    ejections: f64,
    health_failures: f64,
    retry_overflow: f64,
    budget_exhausted: f64,
}

fn report(samples: &[Sample], counts: &Counts, minutes: f64, rate: f64, totals: &Totals) {
    let Totals {
        applied,
        ejections,
        health_failures,
        retry_overflow,
        budget_exhausted,
    } = totals;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!("## Soak: {minutes} min at {rate} req/s\n");
    println!("| what | count |\n|---|---|");
    println!("| HTTP requests answered 2xx | {} |", get(&counts.ok));
    println!(
        "| HTTP requests failed (non-2xx or broken) | {} |",
        get(&counts.failed)
    );
    println!(
        "| reloads written / applied | {} / {applied} |",
        get(&counts.reloads)
    );
    println!("| outlier ejections | {ejections} |");
    println!("| failed health checks (web) | {health_failures} |");
    println!(
        "| retries refused by the retry breaker / the budget | {retry_overflow} / {budget_exhausted} |"
    );
    println!(
        "| WebSocket echoes ok / failed | {} / {} |",
        get(&counts.ws_ok),
        get(&counts.ws_failed)
    );
    println!(
        "| gRPC stream echoes ok / failed | {} / {} |",
        get(&counts.grpc_ok),
        get(&counts.grpc_failed)
    );
    let failures = counts.failures.lock().expect("lock");
    if !failures.is_empty() {
        println!("\nEach failed request (minute: status and marker, or what broke):\n");
        for (minute, kind) in failures.iter() {
            println!("- {minute:.2}: {kind}");
        }
    }
    // Slopes after the first two minutes (pools, caches and the allocator settle), up to
    // the last sample under load.
    let settled: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.minute >= 2.0 && s.minute <= minutes)
        .collect();
    let line = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
        settled.iter().map(|s| (s.minute, f(s))).collect()
    };
    println!("\nSlopes after minute 2 (least squares):\n");
    println!("| sample | first | last | slope per minute |\n|---|---|---|---|");
    for (name, f) in [
        (
            "RSS (MiB)",
            (|s: &Sample| s.rss_kib / 1024.0) as fn(&Sample) -> f64,
        ),
        ("open fds", |s: &Sample| s.fds),
        ("tokio tasks", |s: &Sample| s.tasks),
    ] {
        let points = line(f);
        let (first, last) = (
            points.first().map_or(f64::NAN, |p| p.1),
            points.last().map_or(f64::NAN, |p| p.1),
        );
        println!(
            "| {name} | {first:.1} | {last:.1} | {:+.3} |",
            slope(&points)
        );
    }
    println!("\nEvery sample:\n");
    println!("| minute | RSS (MiB) | fds | tasks | 2xx so far | failed so far |\n|---|---|---|---|---|---|");
    for s in samples {
        println!(
            "| {:.1} | {:.1} | {} | {} | {} | {} |",
            s.minute,
            s.rss_kib / 1024.0,
            s.fds,
            s.tasks,
            s.ok,
            s.failed
        );
    }
}
