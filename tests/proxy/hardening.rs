//! Hardening defects found in review, each pinned by a test that fails until it is fixed:
//! HTTP/2 peers that ignore GOAWAY, obs-text in header matchers, HTTP/2 → HTTP/1.1 cookie
//! joining, the header count over h2c, the admin server's own limits, empty configs,
//! credentials in `/config`, abandoned requests, addresses `run` cannot bind, trailers for
//! HTTP/1.1 clients and path normalization.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use remora::reloader::Outcome;

use crate::raw_http::{StallingUpstream, STALLED_BODY};
use crate::support::*;

const REMORA: &str = env!("CARGO_BIN_EXE_remora");

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

// === helpers ===

/// A whole config: `admin` is the inside of the admin flow mapping, each listener the inside
/// of its flow mapping; `vhosts` are the virtual hosts of route config `rc`.
fn full_config(admin: &str, listeners: &[&str], vhosts: &str, clusters: &str) -> String {
    let listeners: String = listeners
        .iter()
        .map(|l| format!("  - {{ {l} }}\n"))
        .collect();
    format!(
        "admin: {{ {admin} }}\n\
         listeners:\n{listeners}\
         route_configs:\n  - name: rc\n    virtual_hosts:\n{vhosts}\n\
         clusters:\n{clusters}\n"
    )
}

/// The listener `main` on a free port with the given extra fields (`, idle_timeout: 1s`).
fn main_listener(extra: &str) -> String {
    format!("name: main, address: 127.0.0.1:0, route_config: rc{extra}")
}

/// Reads until the peer closes the connection (EOF, or an error such as a reset); returns
/// what was read.
async fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Writes `request` on a new connection and reads until the peer closes or `limit` passes.
async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> String {
    let mut got = Vec::new();
    if let Ok(mut s) = TcpStream::connect(addr).await {
        if s.write_all(request).await.is_ok() {
            let mut buf = [0u8; 4096];
            let _ = tokio::time::timeout(limit, async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await;
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of a raw HTTP/1.1 response; 0 when there is none.
fn status_of(response: &str) -> u16 {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// `GET path` with Host `svc` and `connection: close`, plus `extra` raw header lines (each
/// ending in CRLF). The path goes on the wire exactly as given.
fn raw_get(path: &str, extra: &[u8]) -> Vec<u8> {
    let head = format!("GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n");
    [head.as_bytes(), extra, &b"\r\n"[..]].concat()
}

/// The status of `GET path` sent raw on a new connection (0: closed without an answer, or
/// nothing within `limit`).
async fn raw_status(addr: SocketAddr, path: &str, limit: Duration) -> u16 {
    status_of(&raw_exchange(addr, &raw_get(path, b""), limit).await)
}

/// The status of `GET path` sent raw on a new connection, within 5 s.
async fn status(addr: SocketAddr, path: &str) -> u16 {
    raw_status(addr, path, Duration::from_secs(5)).await
}

/// Waits (up to 5 s) until `GET path` on `addr` is answered 200: a connection slot freed by
/// a close is seen by the accept loop a moment after the client sees the close.
async fn eventually_ok(addr: SocketAddr, path: &str, what: &str) {
    let started = Instant::now();
    loop {
        let got = raw_status(addr, path, Duration::from_secs(2)).await;
        if got == 200 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: `GET {path}` on {addr} is not answered 200 (last status {got})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Like `support::metric`, but a sample that is not there reads as 0.
async fn metric_or_zero(admin: SocketAddr, sample: &str) -> f64 {
    let text = get(&client(), admin, "admin", "/metrics", &[]).await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Writes `text` to a file in this process's temporary directory.
fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("remora-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A child process, killed and reaped when dropped, so that a failing test leaves none behind.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// === 1. HTTP/2 peers that ignore GOAWAY ===

/// Defect: the idle timeout only asks an HTTP/2 connection to close (GOAWAY and a PING);
/// a peer that never answers keeps it open for ever. A handful of silent peers hold every
/// `max_connections` slot and the listener refuses everyone else. Planned: after the GOAWAY,
/// a grace of min(idle_timeout, 5 s) with no stream in flight, then a hard close.
#[tokio::test]
async fn silent_http2_connections_are_closed_after_the_idle_timeout() {
    let up = Upstream::start("up").await;
    let listener =
        main_listener(", idle_timeout: 1s, request_headers_timeout: 1s, max_connections: 5");
    let p = proxy(&full_config(
        "address: 127.0.0.1:0",
        &[listener.as_str()],
        &one_route("cluster: up"),
        &cluster("up", &[(up.port(), 1)], ""),
    ))
    .await;
    let mut silent = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(H2_PREFACE).await.unwrap();
        s.write_all(&EMPTY_SETTINGS).await.unwrap();
        silent.push(s);
    }
    // The server's SETTINGS, GOAWAY and PING are read and ignored; nothing is ever ACKed.
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        for s in &mut silent {
            read_until_closed(s).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "HTTP/2 connections that ignore GOAWAY were still open 6 s after opening (idle_timeout 1s)"
    );
    eventually_ok(
        p.addr,
        "/",
        "once the silent HTTP/2 connections are closed, their slots serve others",
    )
    .await;
}

// === 2. obs-text in header matchers ===

/// Defect: header matchers read a value as UTF-8 and a value with obs-text (bytes
/// 0x80-0xFF, legal in HTTP/1.1) as the empty string, so `x-role: admin\xe9` slips past a
/// `contains: admin` deny rule. Values must be matched as bytes, as Envoy does.
#[tokio::test]
async fn obs_text_header_values_are_matched_as_bytes() {
    let up = Upstream::start("up").await;
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - match: { prefix: /, headers: [{ name: x-role, contains: admin }] }
            direct_response: { status: 403, body: denied }
          - match: { prefix: / }
            cluster: up
"#;
    let p = proxy(&config(routes, &cluster("up", &[(up.port(), 1)], ""))).await;
    let limit = Duration::from_secs(5);

    let answer = raw_exchange(p.addr, &raw_get("/", b"x-role: admin\xe9\r\n"), limit).await;
    assert_eq!(status_of(&answer), 403, "obs-text hid `admin`: {answer}");
    assert!(answer.ends_with("denied"), "{answer}");

    let answer = raw_exchange(p.addr, &raw_get("/", b"x-role: user\r\n"), limit).await;
    assert_eq!(status_of(&answer), 200, "{answer}");

    // A repeated header is matched as its values joined by `,`: obs-text in one value must
    // not hide the other.
    let answer = raw_exchange(
        p.addr,
        &raw_get("/", b"x-role: \xe9\r\nx-role: admin\r\n"),
        limit,
    )
    .await;
    assert_eq!(status_of(&answer), 403, "{answer}");
    assert_eq!(up.hits(), 1, "only `x-role: user` reaches the upstream");
}

// === 3. HTTP/2 → HTTP/1.1 translation and the header count over h2c ===

/// Defect: an HTTP/2 client may send `cookie` as several fields (RFC 9113 §8.2.3), and
/// remora forwards them to an HTTP/1.1 upstream as several `cookie` lines, which HTTP/1.1
/// does not allow (RFC 6265 §5.4): many servers keep only one. They must be joined with `; `.
#[tokio::test]
async fn h2_cookies_are_joined_for_an_http1_upstream() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let req = Request::get(format!("http://{}/", p.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send(&h2_client(), req).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    let cookies: Vec<String> = seen[0]
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
}

/// Defect: `max_request_headers_count` (default 100) is enforced by hyper on HTTP/1.1 only;
/// over h2c any number of headers is forwarded. 150 headers must get 431 on both, and
/// reach no upstream. (The cluster speaks h2c: an HTTP/1.1 upstream built on hyper would
/// answer 431 itself, at its own default of 100, and hide the defect.)
#[tokio::test]
async fn too_many_headers_over_h2c_get_431() {
    let up = Upstream::start("up").await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(up.port(), 1)], "    protocol: http2\n"),
    ))
    .await;
    let mut req = Request::get(format!("http://{}/", p.addr));
    for i in 0..150 {
        req = req.header(format!("x-h-{i}"), "v");
    }
    let r = send(&h2_client(), req.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(r.status, 431, "150 headers over h2c: {}", r.body);
    assert_eq!(up.hits(), 0, "the request reached the upstream");

    // HTTP/2 clients may split `cookie` into one field per pair: 150 of them are one header.
    let mut req = Request::get(format!("http://{}/", p.addr));
    for i in 0..150 {
        req = req.header("cookie", format!("c{i}=v"));
    }
    let r = send(&h2_client(), req.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(r.status, 200, "150 cookie fields over h2c: {}", r.body);
    assert_eq!(up.hits(), 1);

    // The reference: the same headers over HTTP/1.1.
    let mut many = String::from("GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(p.addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 431, "{answer}");
    assert_eq!(up.hits(), 1);
}

// === 4. The admin server's own limits ===

/// Defect: the admin server accepts any number of connections and never times them out: a
/// few silent clients (or a flood) hold admin sockets for ever, and with them the process's
/// file descriptors. Planned: `admin.max_connections` (further connections are closed at
/// accept) and `admin.idle_timeout`.
#[tokio::test]
async fn the_admin_server_caps_and_times_out_its_connections() {
    let up = Upstream::start("up").await;
    let main = main_listener("");
    let p = proxy(&full_config(
        "address: 127.0.0.1:0, max_connections: 8, idle_timeout: 500ms",
        &[main.as_str()],
        &one_route("cluster: up"),
        &cluster("up", &[(up.port(), 1)], ""),
    ))
    .await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(p.admin).await.unwrap());
    }
    // Accepted after the 8 (the accept queue is in order), while they hold every slot.
    let mut ninth = TcpStream::connect(p.admin).await.unwrap();
    let _ = ninth
        .write_all(b"GET /live HTTP/1.1\r\nhost: a\r\n\r\n")
        .await;
    let got = tokio::time::timeout(Duration::from_secs(2), read_until_closed(&mut ninth))
        .await
        .expect("the 9th admin connection was neither closed nor answered within 2 s");
    assert!(
        got.is_empty(),
        "the 9th admin connection was served past max_connections: {}",
        String::from_utf8_lossy(&got)
    );
    // The proxy listener is not affected.
    assert_eq!(get(&client(), p.addr, "svc", "/", &[]).await.status, 200);

    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        for s in &mut silent {
            read_until_closed(s).await;
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "silent admin connections were still open 3 s after the 500ms idle timeout"
    );
    eventually_ok(
        p.admin,
        "/live",
        "the admin server serves again once the idle ones are closed",
    )
    .await;
    assert_eq!(get(&client(), p.addr, "svc", "/", &[]).await.status, 200);
}

/// Defect (process level, with the default admin cap): under a low file-descriptor limit, a
/// flood of idle admin connections takes every descriptor; the proxy listener can then
/// accept nothing (and the admin accept loop spins on EMFILE). With the default cap the
/// admin server closes the excess at accept and the proxy keeps serving.
#[tokio::test]
async fn a_flood_of_admin_connections_cannot_take_the_proxys_file_descriptors() {
    let up = Upstream::start("up").await;
    let (listen, admin) = (free_address(), free_address());
    let path = temp_file(
        "fd-flood.yaml",
        &binary_config(admin, listen, up.port(), ""),
    );
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 256 && exec \"$0\" run -c \"$1\"")
        .arg(REMORA)
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    wait_ready(admin).await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect(admin).await {
            flood.push(s);
        }
    }
    // With a cap, the connections past it are closed at accept; once the last one is closed,
    // remora has been through the whole accept queue. Without one, this only bounds the wait.
    if let Some(last) = flood.last_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(3), read_until_closed(last)).await;
    }
    let answer = raw_exchange(listen, &raw_get("/", b""), Duration::from_secs(5)).await;
    assert_eq!(
        status_of(&answer),
        200,
        "the proxy listener under a flood of {} idle admin connections: {answer:?}",
        flood.len()
    );
    drop(flood);
}

// === 5. Empty configs ===

/// Defect: an empty (or comment-only) file is a valid config with no listeners: `validate`
/// passes it, and a reload to it (a truncated ConfigMap, an editor's empty save) removes
/// every listener while `/ready` stays 200. At least one listener must be required.
#[tokio::test]
async fn an_empty_config_is_rejected_and_ready_needs_a_listener() {
    let out = Command::new(REMORA)
        .args(["validate", "-c", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "`remora validate -c /dev/null`: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let err = remora::config::parse("# nothing\n", "t.yaml").expect_err("an empty config parsed");
    assert!(err.to_string().contains("listeners"), "{err}");
    let no_listeners = "admin: { address: 127.0.0.1:0 }\n\
        listeners: []\n\
        route_configs:\n  - name: rc\n    virtual_hosts:\n      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, direct_response: { status: 200 } }] }\n\
        clusters: []\n";
    assert!(
        remora::config::parse(no_listeners, "t.yaml").is_err(),
        "a config with `listeners: []` parsed"
    );

    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let outcome = p.app.apply("# comment only\n".into(), "empty.yaml").await;
    assert!(matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
    assert_eq!(get(&client(), p.addr, "svc", "/", &[]).await.status, 200);
    assert_eq!(
        get(&client(), p.admin, "a", "/ready", &[]).await.status,
        200
    );
}

// === 6. Credentials in /config ===

/// Defect: `/config` (unauthenticated, and reachable from the pod network when the admin
/// address is `0.0.0.0`, as the Kubernetes probes need) shows credentials written in the
/// config: `authorization` and API-key headers added to requests, and header matchers on
/// them. Their values must show as `[redacted]`; what is forwarded is unchanged.
#[tokio::test]
async fn config_endpoint_redacts_credentials() {
    let up = Upstream::start("up").await;
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - match: { prefix: /matched, headers: [{ name: authorization, exact: "Bearer m4tch" }] }
            cluster: up
          - match: { prefix: / }
            cluster: up
            request_headers_to_add:
              - { name: authorization, value: "Bearer s3cr3t" }
              - { name: x-api-key, value: k3y }
              - { name: x-plain, value: visible }
"#;
    let p = proxy(&config(routes, &cluster("up", &[(up.port(), 1)], ""))).await;
    let body = get(&client(), p.admin, "a", "/config", &[]).await.body;
    for secret in ["s3cr3t", "k3y", "m4tch"] {
        assert!(!body.contains(secret), "/config shows `{secret}`:\n{body}");
    }
    assert!(body.contains("visible"), "{body}");
    assert!(body.contains("[redacted]"), "{body}");
    let shown: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(shown["config"]["clusters"][0]["name"], "up", "{body}");

    assert_eq!(get(&client(), p.addr, "svc", "/", &[]).await.status, 200);
    let seen = &up.seen()[0];
    assert_eq!(seen.headers["authorization"], "Bearer s3cr3t");
    assert_eq!(seen.headers["x-api-key"], "k3y");
    assert_eq!(seen.headers["x-plain"], "visible");
}

// === 7. Abandoned requests ===

/// Pins: a request whose client goes away before the response (HTTP/1.1 connection closed,
/// HTTP/2 stream cancelled) is counted under `code_class="0"`, never as `1xx`.
#[tokio::test]
async fn abandoned_requests_are_counted_under_code_class_0() {
    const ZERO: &str = "remora_downstream_requests_total{code_class=\"0\",listener=\"main\"}";
    const ONE_XX: &str = "remora_downstream_requests_total{code_class=\"1xx\",listener=\"main\"}";
    let up = Upstream::start("up").await;
    up.set_delay(Duration::from_secs(2));
    let p = proxy_to(&up).await;
    for i in 0..3 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            .await
            .unwrap();
        wait_until("the upstream has the request", || up.hits() == i + 1).await;
        drop(s);
    }
    wait_metric(p.admin, ZERO, 3.0).await;
    assert_eq!(metric_or_zero(p.admin, ONE_XX).await, 0.0);

    // An HTTP/2 request whose response future is dropped: hyper resets the stream (CANCEL).
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let pending = sender.send_request(
        Request::get(format!("http://{}/", p.addr))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    wait_until("the upstream has the HTTP/2 request", || up.hits() == 4).await;
    drop(pending);
    wait_metric(p.admin, ZERO, 4.0).await;
    assert_eq!(metric_or_zero(p.admin, ONE_XX).await, 0.0);
    drop(sender);
}

// === 8. Addresses `run` cannot bind ===

/// Defect: `validate` compares listener addresses as written, so it passes configs that
/// `run` cannot bind: the admin server on a listener's address, and one port on the same
/// IPv4 address written as IPv4-mapped IPv6, or on `0.0.0.0` and `127.0.0.1`.
#[tokio::test]
async fn validate_refuses_what_run_cannot_bind() {
    let yaml = |admin: &str, a: &str, b: &str| {
        format!(
            "admin: {{ address: \"{admin}\" }}\n\
             listeners:\n  - {{ name: a, address: \"{a}\", route_config: rc }}\n  - {{ name: b, address: \"{b}\", route_config: rc }}\n\
             route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }}] }}\n\
             clusters: []\n"
        )
    };
    let parses = |admin: &str, a: &str, b: &str| {
        remora::config::parse(&yaml(admin, a, b), "t.yaml").map(|_| ())
    };
    // The same config with addresses that can all be bound is valid.
    assert_eq!(
        parses("127.0.0.1:18603", "127.0.0.1:18601", "127.0.0.1:18602"),
        Ok(())
    );
    assert_eq!(parses("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"), Ok(()));

    let refused = [
        ("127.0.0.1:18601", "127.0.0.1:18601", "127.0.0.1:0"),
        ("127.0.0.1:0", "127.0.0.1:18601", "[::ffff:127.0.0.1]:18601"),
        ("127.0.0.1:0", "0.0.0.0:18601", "127.0.0.1:18601"),
    ];
    for (admin, a, b) in refused {
        assert!(
            parses(admin, a, b).is_err(),
            "admin {admin}, listeners {a} and {b} validated"
        );
    }
}

// === 9. Trailers to HTTP/1.1 clients ===

/// An HTTP/1.1 upstream that answers every request with a chunked `hello` and the trailer
/// `x-checksum: abc` (declared in `trailer`).
async fn trailer_upstream() -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                        Ok(Frame::data(Bytes::from_static(b"hello"))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let resp = Response::builder()
                        .header("trailer", "x-checksum")
                        .body(StreamBody::new(tokio_stream::iter(frames)))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    port
}

/// What follows the last chunk (`0\r\n`) of a chunked response: the trailer section and
/// the final CRLF; `None` until the last chunk has arrived.
fn after_last_chunk(text: &str) -> Option<&str> {
    let body = &text[text.find("\r\n\r\n")? + 4..];
    let at = if body.starts_with("0\r\n") {
        0
    } else {
        body.find("\r\n0\r\n")? + 2
    };
    Some(&body[at + 3..])
}

/// Defect: remora drops `Trailer` from responses as if it were hop-by-hop (RFC 9110 no
/// longer lists it), and hyper sends HTTP/1.1 trailers only for fields a `Trailer` header
/// declares: an HTTP/1.1 client that asked for trailers (`te: trailers`) never gets them.
#[tokio::test]
async fn trailers_reach_an_http1_client_that_accepts_them() {
    let port = trailer_upstream().await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\nte: trailers\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let text = String::from_utf8_lossy(&got);
            let complete = after_last_chunk(&text)
                .is_some_and(|rest| rest.starts_with("\r\n") || rest.contains("\r\n\r\n"));
            if complete {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(status_of(&text), 200, "{text}");
    assert!(text.contains("hello"), "{text}");
    let trailer_section =
        after_last_chunk(&text).unwrap_or_else(|| panic!("no last chunk in:\n{text}"));
    assert!(
        trailer_section
            .to_ascii_lowercase()
            .contains("x-checksum: abc"),
        "no trailer after the last chunk:\n{text}"
    );
}

// === 10. Path normalization ===

/// Defect: routes match the path as sent, so `/%61dmin`, `/./admin`, `//admin` and
/// `/x/../admin` all get past a `prefix: /admin` deny rule, and there is no way to ask for
/// normalization. Planned, as Envoy: listener options `normalize_path` (RFC 3986: decode
/// unreserved percent-encodings, remove dot segments) and `merge_slashes`, both off by
/// default; the normalized path is the one routed and forwarded.
#[tokio::test]
async fn path_normalization_is_offered_per_listener() {
    let up = Upstream::start("up").await;
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - match: { prefix: /admin }
            direct_response: { status: 403, body: denied }
          - match: { prefix: / }
            cluster: up
"#;
    let main = main_listener("");
    let p = proxy(&full_config(
        "address: 127.0.0.1:0",
        &[
            main.as_str(),
            "name: norm, address: 127.0.0.1:0, route_config: rc, normalize_path: true, merge_slashes: true",
            "name: dots, address: 127.0.0.1:0, route_config: rc, normalize_path: true",
        ],
        routes,
        &cluster("up", &[(up.port(), 1)], ""),
    ))
    .await;
    let evasions = ["/%61dmin", "/./admin", "//admin", "/x/../admin"];

    // Without the options (Envoy's default), the path is routed and forwarded as sent.
    for path in evasions {
        let before = up.hits();
        assert_eq!(
            status(p.addr, path).await,
            200,
            "{path} without normalization"
        );
        assert_eq!(up.hits(), before + 1);
        assert_eq!(up.seen()[before].uri, path, "forwarded as sent");
    }

    let norm = p.app.listener_address("norm").expect("listener `norm`");
    let before = up.hits();
    for path in evasions {
        assert_eq!(
            status(norm, path).await,
            403,
            "{path} with normalize_path and merge_slashes"
        );
    }
    assert_eq!(up.hits(), before, "a denied path reached the upstream");
    assert_eq!(status(norm, "/a/./b/../c//d?q=1").await, 200);
    assert_eq!(up.hits(), before + 1);
    assert_eq!(up.seen()[before].uri, "/a/c/d?q=1");

    let dots = p.app.listener_address("dots").expect("listener `dots`");
    let before = up.hits();
    assert_eq!(
        status(dots, "//admin").await,
        200,
        "//admin with normalize_path only: slashes are not merged"
    );
    assert_eq!(up.hits(), before + 1);
    for path in ["/%61dmin", "/./admin", "/x/../admin"] {
        assert_eq!(
            status(dots, path).await,
            403,
            "{path} with normalize_path only"
        );
    }
    assert_eq!(up.hits(), before + 1);
}

/// RFC 9112 §3.2: a request with two Host lines is a 400 and reaches no upstream (remora
/// would route on one while the upstream acted on the other). An absolute-form request is
/// routed by its own authority, and the upstream gets that as Host, not the Host line sent.
#[tokio::test]
async fn two_host_headers_are_a_400_and_absolute_form_wins_over_host() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let vhosts = "      - { name: a, domains: [a.svc], routes: [{ match: { prefix: / }, cluster: a }] }\n\
                  \x20     - { name: b, domains: [b.svc], routes: [{ match: { prefix: / }, cluster: b }] }";
    let clusters = format!(
        "{}{}",
        cluster("a", &[(a.port(), 1)], ""),
        cluster("b", &[(b.port(), 1)], "")
    );
    let p = proxy(&config(vhosts, &clusters)).await;
    let twice = b"GET / HTTP/1.1\r\nHost: a.svc\r\nHost: b.svc\r\nconnection: close\r\n\r\n";
    let answer = raw_exchange(p.addr, twice, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert!(answer.contains("x-remora-error: bad_request"), "{answer}");
    assert_eq!(a.hits() + b.hits(), 0);

    let absolute = b"GET http://b.svc/x HTTP/1.1\r\nHost: a.svc\r\nconnection: close\r\n\r\n";
    let answer = raw_exchange(p.addr, absolute, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!((a.hits(), b.hits()), (0, 1));
    let seen = b.seen().pop().unwrap();
    assert_eq!(seen.headers["host"], "b.svc");
    assert_eq!(seen.uri, "/x");
}

/// An upstream that answers with `head` to any request on 127.0.0.1:0, then closes.
async fn raw_upstream(head: &'static [u8]) -> u16 {
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(head).await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

/// The upstream's response head is bounded: over `max_response_headers_bytes` (default
/// 60 KiB, as Envoy) is a 502 `upstream_response_headers_too_large`; a response that is not
/// HTTP is a 502 `upstream_protocol_error` (not a 503: the upstream answered, wrongly).
#[tokio::test]
async fn upstream_response_heads_are_bounded_and_malformed_ones_are_502() {
    let big: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
            "a".repeat(200 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let medium: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\nx-medium: {}\r\ncontent-length: 2\r\n\r\nok",
            "a".repeat(20 * 1024)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let (big, medium, garbage) = (
        raw_upstream(big).await,
        raw_upstream(medium).await,
        raw_upstream(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await,
    );
    let vhosts = "      - name: all\n        domains: [\"*\"]\n        routes:\n\
                  \x20         - { match: { prefix: /big }, cluster: big }\n\
                  \x20         - { match: { prefix: /medium-small-limit }, cluster: medium-small }\n\
                  \x20         - { match: { prefix: /medium }, cluster: medium }\n\
                  \x20         - { match: { prefix: /garbage }, cluster: garbage }";
    let clusters = format!(
        "{}{}{}{}",
        cluster("big", &[(big, 1)], ""),
        cluster("medium", &[(medium, 1)], ""),
        cluster(
            "medium-small",
            &[(medium, 1)],
            "    max_response_headers_bytes: 16384\n"
        ),
        cluster("garbage", &[(garbage, 1)], "")
    );
    let p = proxy(&config(vhosts, &clusters)).await;
    let cl = client();
    let r = get(&cl, p.addr, "svc", "/big", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-remora-error")),
        (502, "upstream_response_headers_too_large")
    );
    let r = get(&cl, p.addr, "svc", "/medium", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "ok"));
    let r = get(&cl, p.addr, "svc", "/medium-small-limit", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-remora-error")),
        (502, "upstream_response_headers_too_large")
    );
    let r = get(&cl, p.addr, "svc", "/garbage", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-remora-error")),
        (502, "upstream_protocol_error"),
        "{}",
        r.body
    );
}

/// `stream_idle_timeout`: a response body that stops after 3 of 100,000 bytes ends the
/// client's connection once nothing moved for the limit, and the breaker slot comes back
/// (with `max_requests: 1`, the next request is admitted); an upstream that never answers,
/// with the route timeout off, is a 408 `stream_idle_timeout` (as Envoy answers), charged
/// to the upstream.
#[tokio::test]
async fn a_stream_that_stops_moving_ends_after_stream_idle_timeout() {
    let stalled = StallingUpstream::start(STALLED_BODY).await.port;
    let silent = StallingUpstream::start(&b""[..]).await.port;
    let vhosts = "      - name: all\n        domains: [\"*\"]\n        routes:\n\
                  \x20         - { match: { prefix: /stalled }, cluster: stalled }\n\
                  \x20         - { match: { prefix: /silent }, cluster: silent, timeout: 0 }";
    let clusters = format!(
        "{}    circuit_breakers: {{ max_requests: 1 }}\n{}",
        cluster("stalled", &[(stalled, 1)], ""),
        cluster(
            "silent",
            &[(silent, 1)],
            "    outlier_detection: { consecutive_5xx: 1, max_ejection_percent: 100 }\n"
        )
    );
    let p = proxy(&full_config(
        "address: 127.0.0.1:0",
        &[&main_listener(
            ", stream_idle_timeout: 500ms, idle_timeout: 60s",
        )],
        vhosts,
        &clusters,
    ))
    .await;
    for round in 0..2 {
        let started = Instant::now();
        let answer = raw_exchange(p.addr, &raw_get("/stalled", b""), Duration::from_secs(10)).await;
        assert_eq!(status_of(&answer), 200, "round {round}: {answer}");
        assert!(answer.ends_with("\r\n\r\nabc"), "round {round}: {answer}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(5),
            "round {round}: the stalled stream held the connection for {took:?}"
        );
    }
    let started = Instant::now();
    let answer = raw_exchange(p.addr, &raw_get("/silent", b""), Duration::from_secs(10)).await;
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(
        answer.contains("x-remora-error: stream_idle_timeout"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // The upstream is the one that stalled (the request was all sent): the attempt counts
    // against it, as a timeout would, and outlier detection ejects it.
    let metrics = get(&client(), p.admin, "admin", "/metrics", &[]).await.body;
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "remora_outlier_ejections_total{cluster=\"silent\",reason=\"consecutive_5xx\"} 1"
        )),
        "{metrics}"
    );
}

/// A response head is movement: an endpoint that answers 503 late in the stream idle limit
/// leaves the retry the whole limit, not what was left of it (before, the retry to a slower
/// healthy endpoint was cut with a 408 that blamed the client).
#[tokio::test]
async fn a_retry_after_a_late_answer_gets_the_whole_stream_idle_limit() {
    let (late, slow) = (Upstream::start("late").await, Upstream::start("slow").await);
    late.set_status(503);
    late.set_delay(Duration::from_millis(800));
    slow.set_delay(Duration::from_millis(400));
    let route = "{ match: { prefix: / }, cluster: up, timeout: 0, \
                 retry_policy: { retry_on: [5xx], num_retries: 1, backoff: { base_interval: 1ms, max_interval: 1ms } } }";
    let p = proxy(&full_config(
        "address: 127.0.0.1:0",
        &[&main_listener(", stream_idle_timeout: 1s")],
        &format!("      - {{ name: all, domains: [\"*\"], routes: [{route}] }}"),
        &cluster("up", &[(late.port(), 1), (slow.port(), 1)], ""),
    ))
    .await;
    // Round robin sends one of the first two requests to `late` first.
    for i in 0..2 {
        let answer = get(&client(), p.addr, "svc", "/", &[]).await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.body);
        assert_eq!(answer.body, "slow", "request {i}");
    }
    assert!(late.hits() >= 1, "no request went to `late` first");
}

/// `stream_idle_timeout` when the client is the one that stalls: it asks for 64 MiB and
/// stops reading. Every buffer on the way fills, nothing can move, and after the limit
/// remora closes the client's connection (it had no way to see this before: the response
/// body is not even polled while the socket is full), freeing the breaker slot for the next
/// request (`max_requests: 1`).
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_stream_idle_timeout() {
    const BIG: usize = 64 << 20;
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        let chunks = (0..BIG / 65536).map(|_| {
                            Ok::<_, Infallible>(Frame::data(Bytes::from(vec![b'x'; 65536])))
                        });
                        StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync()
                    } else {
                        Full::new(Bytes::from_static(b"ok"))
                            .map_err(|never| match never {})
                            .boxed_unsync()
                    };
                    Ok::<_, Infallible>(Response::new(body))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let vhosts =
        "      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, cluster: big }] }";
    let clusters = format!(
        "{}    circuit_breakers: {{ max_requests: 1 }}\n",
        cluster("big", &[(port, 1)], "")
    );
    let p = proxy(&full_config(
        "address: 127.0.0.1:0",
        &[&main_listener(", stream_idle_timeout: 500ms")],
        vhosts,
        &clusters,
    ))
    .await;
    let mut stalled = TcpStream::connect(p.addr).await.unwrap();
    stalled.write_all(&raw_get("/big", b"")).await.unwrap();
    // Read nothing for a while: the stream stalls on the client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The breaker slot is back: the next request is admitted.
    let answer = raw_exchange(p.addr, &raw_get("/small", b""), Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    // And the stalled connection was closed: what is read now ends well short of 64 MiB.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let read_all = async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), read_all).await;
    assert!(ended.is_ok(), "the connection was still open after 13 s");
    assert!(got < BIG, "the whole body came through ({got} bytes)");
}

/// Over HTTP/2 too: an h2c upstream whose response headers exceed the cluster's limit is a
/// 502 (h2 resets the stream itself with PROTOCOL_ERROR; that is not the upstream resetting).
#[tokio::test]
async fn an_http2_response_head_over_the_limit_is_a_502() {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                    resp.headers_mut().insert(
                        "x-big",
                        HeaderValue::from_str(&"a".repeat(70 * 1024)).unwrap(),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let vhosts =
        "      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, cluster: big }] }";
    let p = proxy(&config(
        vhosts,
        &cluster("big", &[(port, 1)], "    protocol: http2\n"),
    ))
    .await;
    let r = get(&client(), p.addr, "svc", "/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-remora-error")),
        (502, "upstream_protocol_error"),
        "{}",
        r.body
    );
}
