//! Correctness defects found in review, each pinned by a test that fails until it is fixed:
//! outlier detection across reloads and timeouts, ring-hash retries, listener reloads,
//! pooled connections during uploads, client aborts, malformed requests, config validation.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use remora::reloader::Outcome;

use crate::support::*;

// === helpers ===

/// One virtual host for any authority with one route on `/` to `cluster`, plus `extra`
/// route lines (indented 12 spaces, e.g. `            timeout: 300ms\n`).
fn route_to(cluster: &str, extra: &str) -> String {
    format!(
        "      - name: all\n        domains: [\"*\"]\n        routes:\n          - match: {{ prefix: / }}\n            cluster: {cluster}\n{extra}"
    )
}

/// Like `support::config`, with the one listener written out: `listener` is the inside of
/// its flow mapping, e.g. `name: main, address: "127.0.0.1:1234", route_config: rc`.
fn listener_config(listener: &str, routes: &str, clusters: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ {listener} }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n{routes}\n\
         clusters:\n{clusters}\n"
    )
}

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Like `support::metric`, but a sample that is not there reads as 0.
async fn metric_or_zero(admin: SocketAddr, sample: &str) -> f64 {
    let text = get(&client(), admin, "admin", "/metrics", &[]).await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The `/clusters` entry of the endpoint `127.0.0.1:port` in `cluster`.
async fn endpoint(admin: SocketAddr, cluster: &str, port: u16) -> serde_json::Value {
    let text = get(&client(), admin, "admin", "/clusters", &[]).await.body;
    let listing: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let address = format!("127.0.0.1:{port}");
    listing["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == cluster)
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == address.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {address} in cluster {cluster}: {text}"))
}

/// The endpoint's breaker state in `/clusters`: `closed`, `open` or `half_open`.
async fn breaker(admin: SocketAddr, cluster: &str, port: u16) -> String {
    endpoint(admin, cluster, port).await["breaker"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Reads until the end of a response head, EOF, an error or 5 s; returns what was read.
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends one GET on a raw connection: true when it is answered 200, false when the
/// connection is closed (or reset) without an answer.
async fn served(s: &mut TcpStream) -> bool {
    if s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(
                text.starts_with("HTTP/1.1 200"),
                "unexpected answer: {text}"
            );
            true
        }
        Ok(_) => false,
        Err(_) => panic!("the connection was neither answered nor closed within 5 s"),
    }
}

/// A TCP server that accepts connections and never answers (nor closes them).
async fn hung_endpoint() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = socket.accept().await {
            held.push(stream);
        }
    });
    port
}

/// GET `/` with Host `svc` on an HTTP/1.1 connection of the test's own; returns the
/// status, the `x-remora-error` marker and the body.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
) -> (u16, String, String) {
    sender.ready().await.expect("the connection is still open");
    let req = Request::get("/")
        .header("host", "svc")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.expect("a response");
    let status = resp.status().as_u16();
    let marker = resp
        .headers()
        .get("x-remora-error")
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, marker, String::from_utf8_lossy(&body).into_owned())
}

/// An HTTP/1.1 upstream written by hand. A POST is answered `401` at once and its body is
/// then read and thrown away for as long as it comes (the connection is never closed by
/// this side); a GET is answered `200 ok`. Returns the port and how many POSTs and GETs
/// were answered.
async fn early_answering_upstream() -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let posts = Arc::new(AtomicUsize::new(0));
    let gets = Arc::new(AtomicUsize::new(0));
    let (posts_seen, gets_seen) = (posts.clone(), gets.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            let (posts, gets) = (posts_seen.clone(), gets_seen.clone());
            tokio::spawn(async move {
                let mut pending: Vec<u8> = Vec::new();
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let end = loop {
                        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => pending.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head: Vec<u8> = pending.drain(..end).collect();
                    if head.starts_with(b"POST") {
                        if s.write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        posts.fetch_add(1, Ordering::SeqCst);
                        // Keep reading the upload, never closing.
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                        }
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    gets.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (port, posts, gets)
}

// === tests ===

/// Defect: the end of an ejection is scheduled against the cluster object that ejected the
/// endpoint. A reload that changes the cluster (here only its `connect_timeout`) replaces
/// that object; the new one carries the endpoint's ejected state over, but the timer finds
/// the old cluster gone and nothing ever ends the ejection: the endpoint stays out forever.
#[tokio::test]
async fn ejection_ends_after_a_reload_changes_the_cluster() {
    let (a, b, bad) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("bad").await,
    );
    bad.set_status(500);
    let yaml = |connect_timeout: &str| {
        config(
            &route_to("c", ""),
            &cluster(
                "c",
                &[(a.port(), 1), (b.port(), 1), (bad.port(), 1)],
                &format!(
                    "    connect_timeout: {connect_timeout}\n    outlier_detection: {{ consecutive_5xx: 3, base_ejection_time: 1s, max_ejection_percent: 100, interval: 10s }}\n"
                ),
            ),
        )
    };
    let p = proxy(&yaml("5s")).await;
    let cl = client();
    let mut ejected = false;
    for _ in 0..30 {
        get(&cl, p.addr, "svc", "/", &[]).await;
        if breaker(p.admin, "c", bad.port()).await == "open" {
            ejected = true;
            break;
        }
    }
    assert!(ejected, "the failing endpoint was never ejected");

    bad.set_status(200);
    let hits_at_reload = bad.hits();
    let outcome = p.app.apply(yaml("6s"), "test.yaml").await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");

    // The ejection lasts 1 s; allow 5 s (traffic keeps flowing meanwhile, in case the
    // ejection is ended lazily by a pick).
    let started = Instant::now();
    let mut state = breaker(p.admin, "c", bad.port()).await;
    while state == "open" && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        get(&cl, p.addr, "svc", "/", &[]).await;
        state = breaker(p.admin, "c", bad.port()).await;
    }
    assert_ne!(
        state, "open",
        "still ejected 5 s after a 1 s ejection, because the cluster was reloaded"
    );
    for _ in 0..30 {
        let r = get(&cl, p.addr, "svc", "/", &[]).await;
        assert_eq!(r.status, 200, "{} {}", r.header("x-remora-error"), r.body);
    }
    assert!(
        bad.hits() >= hits_at_reload + 3,
        "the recovered endpoint is back in rotation: {} hits since the reload",
        bad.hits() - hits_at_reload
    );
}

/// Defect: with `ring_hash`, a retry's pick moves along the ring by adding 1, 2 to the
/// request's hash, which lands on the same endpoint's point almost every time; so a retry
/// after a connect failure goes back to the dead endpoint and about half the keys fail.
#[tokio::test]
async fn ring_hash_retries_move_to_another_endpoint() {
    let good = Upstream::start("good").await;
    let dead = dead_port();
    let routes = route_to(
        "up",
        "            retry_policy: { retry_on: [connect-failure], num_retries: 2, backoff: { base_interval: 1ms, max_interval: 5ms } }\n",
    );
    let clusters = cluster(
        "up",
        &[(good.port(), 1), (dead, 1)],
        "    lb_policy: ring_hash\n    hash_on: { header: x-key }\n    retry_budget: { ratio: 2.0, min_retries_per_second: 100, window: 10s }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    let mut failed = Vec::new();
    for i in 0..200 {
        let key = format!("key-{i}");
        let r = get(&cl, p.addr, "svc", "/", &[("x-key", key.as_str())]).await;
        if r.status != 200 || r.body != "good" {
            failed.push(format!(
                "{key}: {} {}",
                r.status.as_u16(),
                r.header("x-remora-error")
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 200 keys failed despite 2 retries and a live endpoint, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(good.hits(), 200);
}

/// Defect: when the route `timeout` ends a request, the attempt in flight is dropped
/// without its outcome reaching outlier detection; an endpoint that accepts connections
/// and never answers is therefore never ejected and keeps taking its share of requests,
/// each costing the client the full route timeout.
#[tokio::test]
async fn a_hung_endpoint_is_ejected_when_the_route_timeout_cancels_its_requests() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let hung = hung_endpoint().await;
    let routes = route_to("up", "            timeout: 300ms\n");
    let clusters = cluster(
        "up",
        &[(a.port(), 1), (b.port(), 1), (hung, 1)],
        "    lb_policy: round_robin\n    outlier_detection: { consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 100 }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    // Warm-up: the hung endpoint gets about 10 of these, 3 of which should eject it.
    for _ in 0..30 {
        get(&cl, p.addr, "svc", "/", &[]).await;
    }
    // Then 60 more, 10 at a time.
    let addr = p.addr;
    let mut timeouts = 0;
    for _ in 0..6 {
        let batch: Vec<_> = (0..10)
            .map(|_| {
                let cl = cl.clone();
                tokio::spawn(async move { get(&cl, addr, "svc", "/", &[]).await.status.as_u16() })
            })
            .collect();
        for t in batch {
            if t.await.unwrap() == 504 {
                timeouts += 1;
            }
        }
    }
    assert!(
        timeouts <= 3,
        "{timeouts} of 60 requests timed out on an endpoint that should have been ejected"
    );
    assert_eq!(breaker(p.admin, "up", hung).await, "open");
}

/// Defect: a half-open probe whose request is ended by the route `timeout` never reports
/// back, so its probe slot stays taken: the endpoint stays half-open for good, no further
/// probe is let through, and it neither recovers nor is ejected again.
#[tokio::test]
async fn a_half_open_probe_that_times_out_frees_its_slot() {
    let (slow, fast) = (Upstream::start("slow").await, Upstream::start("fast").await);
    slow.set_status(500);
    let routes = route_to("up", "            timeout: 200ms\n");
    let clusters = cluster(
        "up",
        &[(slow.port(), 1), (fast.port(), 1)],
        "    outlier_detection: { consecutive_5xx: 2, base_ejection_time: 500ms, max_ejection_time: 500ms, max_ejection_percent: 100, half_open_probes: 1 }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    let mut ejected = false;
    for _ in 0..20 {
        get(&cl, p.addr, "svc", "/", &[]).await;
        if breaker(p.admin, "up", slow.port()).await == "open" {
            ejected = true;
            break;
        }
    }
    assert!(ejected, "the failing endpoint was never ejected");

    // From now on the endpoint hangs: every probe it gets is ended by the route timeout.
    slow.set_delay(Duration::from_secs(10));
    slow.set_status(200);
    let hits_at_ejection = slow.hits();
    // Each cycle is: ejected 500 ms, half-open, one probe, 200 ms timeout, ejected again.
    // Three probes need about 2.5 s; allow 8 s.
    let started = Instant::now();
    while slow.hits() < hits_at_ejection + 3 && started.elapsed() < Duration::from_secs(8) {
        let r = get(&cl, p.addr, "svc", "/", &[]).await;
        assert!(
            r.status == 200 || r.status == 504,
            "{} {}",
            r.status,
            r.header("x-remora-error")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let probes = slow.hits() - hits_at_ejection;
    assert!(
        probes >= 3,
        "only {probes} probe(s) reached the endpoint in 8 s; /clusters: {}",
        endpoint(p.admin, "up", slow.port()).await
    );
}

/// A half-open probe whose client goes away gives its probe slot back: the endpoint gets the
/// next probe, instead of staying half-open with no traffic.
#[tokio::test]
async fn a_half_open_probe_whose_client_leaves_frees_its_slot() {
    let (slow, fast) = (Upstream::start("slow").await, Upstream::start("fast").await);
    slow.set_status(500);
    let routes = route_to("up", "            timeout: 30s\n");
    let clusters = cluster(
        "up",
        &[(slow.port(), 1), (fast.port(), 1)],
        "    outlier_detection: { consecutive_5xx: 2, base_ejection_time: 300ms, max_ejection_time: 300ms, max_ejection_percent: 100, half_open_probes: 1 }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    for _ in 0..20 {
        get(&cl, p.addr, "svc", "/", &[]).await;
        if breaker(p.admin, "up", slow.port()).await == "open" {
            break;
        }
    }
    // From now on the endpoint hangs (far past any test time); nothing ends a probe but the
    // client leaving.
    slow.set_delay(Duration::from_secs(60));
    slow.set_status(200);
    let started = Instant::now();
    while breaker(p.admin, "up", slow.port()).await != "half_open" {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "never half-open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Requests on connections of their own until two probes have reached the endpoint, each
    // client leaving as soon as its request is there.
    let before = slow.hits();
    let started = Instant::now();
    while slow.hits() < before + 2 {
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{} probe(s) in 8 s: the first probe's slot was never given back; /clusters: {}",
            slow.hits() - before,
            endpoint(p.admin, "up", slow.port()).await
        );
        let hits = slow.hits();
        let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        // The fast endpoint answers at once; the slow one never does: then leave.
        let answered = tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await;
        if answered.is_err() {
            assert!(
                slow.hits() > hits,
                "no answer, yet the slow endpoint saw nothing"
            );
        }
        drop(s);
    }
}

/// Defect: a reload that renames a listener but keeps its address keeps the socket, but
/// connections opened before the reload still look routes up by the old name, which the
/// new config no longer has: their next request gets 404 `no_route`.
#[tokio::test]
async fn renaming_a_listener_keeps_its_open_connections_routed() {
    let up = Upstream::start("up").await;
    let listen = free_address();
    let yaml = |name: &str| {
        listener_config(
            &format!("name: {name}, address: \"{listen}\", route_config: rc"),
            &route_to("up", ""),
            &cluster("up", &[(up.port(), 1)], ""),
        )
    };
    let p = proxy(&yaml("main")).await;
    assert_eq!(p.addr, listen);
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (status, marker, body) = get_on(&mut sender).await;
    assert_eq!((status, body.as_str()), (200, "up"), "{marker}");

    let outcome = p.app.apply(yaml("main2"), "test.yaml").await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert_eq!(p.app.listener_address("main2"), Some(listen));

    let (status, marker, body) = get_on(&mut sender).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "up"),
        "second request on the connection opened before the rename: {marker}"
    );
    // New connections are routed too.
    assert_eq!(get(&client(), listen, "svc", "/", &[]).await.status, 200);
}

/// Defect: a pooled upstream connection goes back to the pool as soon as the response
/// headers (with an empty body) arrive, even while the request body is still being sent
/// on it. An upstream that answers an upload early (401) leaves the connection busy with
/// the upload; the next request picks it from the pool and waits behind the upload until
/// the route timeout (504).
#[tokio::test]
async fn an_uploading_request_does_not_hold_a_pooled_connection_for_others() {
    let (port, posts, gets) = early_answering_upstream().await;
    let routes = route_to("up", "            timeout: 2s\n");
    let p = proxy(&config(&routes, &cluster("up", &[(port, 1)], ""))).await;

    // Client A starts a 1 MB upload, sends 10 bytes of it, and stalls.
    let mut a = TcpStream::connect(p.addr).await.unwrap();
    a.write_all(b"POST /upload HTTP/1.1\r\nhost: svc\r\ncontent-length: 1000000\r\n\r\n0123456789")
        .await
        .unwrap();
    let started = Instant::now();
    while posts.load(Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the upload never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A's 401 (once it is here, remora has had the upstream's answer).
    let head_a = read_head(&mut a).await;

    // Client B, on its own connection to remora.
    let b = tokio::time::timeout(
        Duration::from_secs(10),
        get(&client(), p.addr, "svc", "/", &[]),
    )
    .await
    .expect("B got no answer within 10 s");
    assert_eq!(
        (b.status.as_u16(), b.body.as_str()),
        (200, "ok"),
        "B waited behind A's upload ({}); A got: {head_a:?}",
        b.header("x-remora-error")
    );
    assert_eq!(gets.load(Ordering::SeqCst), 1);
    drop(a);
}

/// Defect: when a client goes away in the middle of its upload, the broken request body
/// makes the upstream attempt fail, and remora treats that as the upstream's fault: it
/// counts a failure for outlier detection (ejecting a healthy endpoint) and retries the
/// request (opening new upstream connections) for a client that is gone.
#[tokio::test]
async fn a_client_that_aborts_its_upload_is_not_charged_to_the_upstream() {
    let up = Upstream::start("up").await;
    // The upstream takes its time before answering, so the abort lands before a response.
    up.set_delay(Duration::from_secs(10));
    let routes = route_to(
        "up",
        "            timeout: 5s\n            retry_policy: { retry_on: [reset, 5xx], num_retries: 2, backoff: { base_interval: 1ms, max_interval: 5ms } }\n",
    );
    let clusters = cluster(
        "up",
        &[(up.port(), 1)],
        "    outlier_detection: { consecutive_5xx: 3, base_ejection_time: 30s, max_ejection_percent: 100 }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    for i in 0..3 {
        let before = up.hits();
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"PUT /echo HTTP/1.1\r\nhost: svc\r\ncontent-length: 100000\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&vec![b'x'; 10_000]).await.unwrap();
        let started = Instant::now();
        while up.hits() == before {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "upload {i} never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(s);
        // Wait for remora to be done with the abandoned request.
        let started = Instant::now();
        loop {
            let ep = endpoint(p.admin, "up", up.port()).await;
            if ep["active_requests"] == 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "abandoned request {i} still in flight: {ep}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ep = endpoint(p.admin, "up", up.port()).await;
    assert_eq!(
        ep["breaker"], "closed",
        "clients that went away ejected the endpoint: {ep}"
    );
    assert_eq!(ep["times_ejected"], 0, "{ep}");
    assert!(
        up.connections() <= 3,
        "{} upstream connections for 3 abandoned uploads: they were retried",
        up.connections()
    );
    let five_xx = metric_or_zero(
        p.admin,
        "remora_upstream_requests_total{cluster=\"up\",code_class=\"5xx\"}",
    )
    .await;
    assert_eq!(five_xx, 0.0);
    up.set_delay(Duration::ZERO);
    let r = get(&client(), p.addr, "svc", "/", &[]).await;
    assert_eq!(r.status, 200, "{} {}", r.header("x-remora-error"), r.body);
}

/// Defect: a Host that is not a valid authority (`svc bad`) is routed by a `*` virtual
/// host and forwarded; for an `http2` cluster the upstream URI cannot be built, the request
/// goes out without `:scheme`/`:authority`, the upstream resets the stream, and remora
/// answers 503 and counts the reset against the endpoint. A few such requests from one bad
/// client eject a healthy endpoint. It should be a 400 to the client, and nothing upstream.
#[tokio::test]
async fn a_malformed_host_is_a_400_and_does_not_eject_an_http2_endpoint() {
    let up = Upstream::start("up").await;
    let clusters = cluster(
        "up",
        &[(up.port(), 1)],
        "    protocol: http2\n    outlier_detection: { consecutive_5xx: 3 }\n",
    );
    let p = proxy(&config(&route_to("up", ""), &clusters)).await;
    for i in 0..5 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: svc bad\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 400"), "request {i}: {head}");
    }
    let r = get(&client(), p.addr, "svc", "/", &[]).await;
    assert_eq!(r.status, 200, "{} {}", r.header("x-remora-error"), r.body);
    let ep = endpoint(p.admin, "up", up.port()).await;
    assert_eq!(ep["breaker"], "closed", "{ep}");
    assert_eq!(ep["times_ejected"], 0, "{ep}");
}

/// Defect: lowering a listener's `max_connections` by reload only forgets the permits that
/// are free at that moment; with the connections open then, nothing is forgotten, and once
/// they close the listener is back to the old capacity (10 instead of 2).
#[tokio::test]
async fn lowering_max_connections_by_reload_takes_effect() {
    let up = Upstream::start("up").await;
    let listen = free_address();
    let yaml = |max: usize| {
        listener_config(
            &format!("name: main, address: \"{listen}\", route_config: rc, max_connections: {max}"),
            &route_to("up", ""),
            &cluster("up", &[(up.port(), 1)], ""),
        )
    };
    let p = proxy(&yaml(10)).await;
    let mut old = Vec::new();
    for i in 0..10 {
        let mut s = TcpStream::connect(listen).await.unwrap();
        assert!(served(&mut s).await, "connection {i} of 10 refused");
        old.push(s);
    }
    let outcome = p.app.apply(yaml(2), "test.yaml").await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");

    let overflow = "remora_downstream_connections_overflow_total{listener=\"main\"}";
    let before = metric_or_zero(p.admin, overflow).await;
    for i in 0..8 {
        let mut s = TcpStream::connect(listen).await.unwrap();
        assert!(
            !served(&mut s).await,
            "new connection {i} served with 10 open and max_connections 2"
        );
    }
    assert_eq!(metric_or_zero(p.admin, overflow).await - before, 8.0);

    // Once the old connections are gone, two fit again, and only two.
    drop(old);
    let mut held = Vec::new();
    let started = Instant::now();
    while held.len() < 2 && started.elapsed() < Duration::from_secs(5) {
        let mut s = TcpStream::connect(listen).await.unwrap();
        if served(&mut s).await {
            held.push(s);
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        held.len(),
        2,
        "capacity did not come back after the old ones closed"
    );
    let mut third = TcpStream::connect(listen).await.unwrap();
    assert!(
        !served(&mut third).await,
        "a third connection was served with max_connections 2"
    );
}

/// Defect: `prefix_rewrite` is accepted whatever it is; `""` or `v2/` turn `/api/users`
/// into `users` (not a path), which the upstream request then silently replaces with `/`.
#[tokio::test]
async fn prefix_rewrite_must_produce_a_path() {
    let routes = |rewrite: &str| {
        format!(
            "      - name: all\n        domains: [\"*\"]\n        routes:\n          - match: {{ prefix: /api/ }}\n            cluster: up\n            prefix_rewrite: {rewrite}\n"
        )
    };
    for bad in ["\"\"", "\"v2/\""] {
        let yaml = config(&routes(bad), &cluster("up", &[(1, 1)], ""));
        match remora::config::parse(&yaml, "t.yaml") {
            Ok(_) => panic!("prefix_rewrite: {bad} was accepted"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains("prefix_rewrite"), "{text}");
            }
        }
    }

    let up = Upstream::start("up").await;
    let p = proxy(&config(
        &routes("/v2/"),
        &cluster("up", &[(up.port(), 1)], ""),
    ))
    .await;
    let r = get(&client(), p.addr, "svc", "/api/users/42?expand=true", &[]).await;
    assert_eq!(r.status, 200, "{} {}", r.header("x-remora-error"), r.body);
    assert_eq!(up.seen()[0].uri, "/v2/users/42?expand=true");
}

/// Defect: a retry refused by the `max_retries` circuit breaker is also counted as
/// `remora_retry_budget_exhausted_total`, so a dashboard cannot tell a full retry breaker
/// from an exhausted budget.
#[tokio::test]
async fn a_retry_refused_by_the_retry_breaker_is_not_budget_exhaustion() {
    let up = Upstream::start("down").await;
    up.set_status(503);
    // Slow enough that every first attempt fails while one retry holds the only slot.
    up.set_delay(Duration::from_millis(400));
    let routes = route_to(
        "up",
        "            retry_policy: { retry_on: [5xx], num_retries: 1, backoff: { base_interval: 1ms, max_interval: 1ms } }\n",
    );
    // A generous budget: only the breaker may refuse a retry here.
    let clusters = cluster(
        "up",
        &[(up.port(), 1)],
        "    circuit_breakers: { max_retries: 1 }\n    retry_budget: { ratio: 10.0, min_retries_per_second: 1000, window: 10s }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let addr = p.addr;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move { get(&client(), addr, "svc", "/", &[]).await.status.as_u16() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 503);
    }
    let overflow = metric_or_zero(
        p.admin,
        "remora_circuit_breaker_overflow_total{cluster=\"up\",resource=\"retries\"}",
    )
    .await;
    let exhausted = metric_or_zero(
        p.admin,
        "remora_retry_budget_exhausted_total{cluster=\"up\"}",
    )
    .await;
    assert!(overflow > 0.0, "no retry was refused by the breaker");
    assert_eq!(
        exhausted, 0.0,
        "{overflow} breaker refusals were counted as budget exhaustion"
    );
}

/// Defect: `max_connections` is not bounded by validation; a reload with a value beyond
/// what the listener's semaphore can hold panics the reloader task, and every later reload
/// is answered "shutting down".
#[tokio::test]
async fn an_oversized_max_connections_is_rejected_and_the_reloader_survives() {
    let up = Upstream::start("up").await;
    let base = config(&route_to("up", ""), &cluster("up", &[(up.port(), 1)], ""));
    let p = proxy(&base).await;
    let with_max = |n: &str| {
        base.replace(
            "route_config: rc }",
            &format!("route_config: rc, max_connections: {n} }}"),
        )
    };
    let huge = with_max("18446744073709551615");
    assert_ne!(huge, base, "the listener line was not found");
    match p.app.apply(huge, "huge.yaml").await {
        Outcome::Rejected(errors) => assert!(
            errors.iter().any(|e| e.contains("max_connections")),
            "{errors:?}"
        ),
        other => panic!("u64::MAX max_connections was not rejected: {other:?}"),
    }
    let outcome = p.app.apply(with_max("100"), "ok.yaml").await;
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    assert_eq!(get(&client(), p.addr, "svc", "/", &[]).await.status, 200);
}
