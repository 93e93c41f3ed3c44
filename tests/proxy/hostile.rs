//! Hostile HTTP/1.1 input: smuggling, header garbage, oversized heads, pipelining, bodiless responses and 100-continue.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::raw_http::*;
use crate::support::*;

/// How long any exchange may take.
const LIMIT: Duration = Duration::from_secs(5);

/// A whole request written after a hostile one on the same connection: it must never reach
/// an upstream when the hostile one breaks the connection's framing.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: svc\r\n\r\n";

// === helpers (HTTP/1.1 on the wire: crate::raw_http) ===

/// Sends `request` on a new connection and asserts exactly one answer, a 400, and then a
/// close (RFC 9112 §6.3: after a framing error the connection cannot be reused).
async fn expect_400(addr: SocketAddr, request: &[u8], what: &str) {
    let (got, closed) = exchange(addr, request, LIMIT).await;
    let text = lossy(&got);
    let (replies, _) = parse_replies(&got, &[]);
    assert_eq!(statuses(&replies), [400], "{what}: {text}");
    assert!(
        closed,
        "{what}: the connection stayed open after the 400: {text}"
    );
}

/// The requests whose body a collecting upstream received whole: (path, body).
type Whole = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An HTTP/1.1 upstream that reads each request's whole body before it answers 200
/// `got N bytes`, and records the requests whose body arrived whole.
async fn collecting_upstream() -> (u16, Whole) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let whole: Whole = Arc::new(Mutex::new(Vec::new()));
    let record = whole.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let path = req.uri().path().to_string();
                        let answer = match req.into_body().collect().await {
                            Ok(body) => {
                                let body = body.to_bytes().to_vec();
                                let answer = format!("got {} bytes", body.len());
                                record.lock().unwrap().push((path, body));
                                answer
                            }
                            Err(_) => "incomplete body".to_string(),
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, whole)
}

// === 1. Request smuggling ===

/// Content-Length with chunked: a 400, or framed by chunked alone, forwarded without Content-Length, then closed.
#[tokio::test]
async fn content_length_with_chunked_is_rejected_or_framed_by_chunked_alone() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    for (what, framing) in [
        (
            "content-length first",
            "content-length: 3\r\ntransfer-encoding: chunked\r\n",
        ),
        (
            "transfer-encoding first",
            "transfer-encoding: chunked\r\ncontent-length: 3\r\n",
        ),
    ] {
        let before = up.hits();
        // By Content-Length the body would be `5\r\nh`; by chunked it is `hello`.
        let request = format!(
            "POST /echo HTTP/1.1\r\nhost: svc\r\n{framing}\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
        );
        let (got, closed) = exchange(p.addr, request.as_bytes(), LIMIT).await;
        let text = lossy(&got);
        let (replies, left) = parse_replies(&got, &[]);
        assert_eq!(
            replies.len(),
            1,
            "{what}: one answer, none for the request after the chunked body: {text}"
        );
        assert!(
            left.is_empty(),
            "{what}: stray bytes after the answer: {text}"
        );
        // RFC 9112 §6.1: with both, the server MUST close the connection after responding.
        assert!(closed, "{what}: the connection stayed open: {text}");
        let seen = up.seen().split_off(before);
        match replies[0].status {
            // Envoy's default (allow_chunked_length off): reject.
            400 => assert!(seen.is_empty(), "{what}: a 400, yet forwarded: {seen:?}"),
            200 => {
                assert_eq!(
                    replies[0].body_text(),
                    "hello",
                    "{what}: not framed by chunked: {text}"
                );
                assert_eq!(seen.len(), 1, "{what}: {seen:?}");
                assert_eq!(seen[0].uri, "/echo");
                let h = &seen[0].headers;
                // RFC 9112 §6.3 (3): an intermediary MUST remove Content-Length before forwarding.
                assert!(
                    !(h.contains_key("content-length") && h.contains_key("transfer-encoding")),
                    "{what}: forwarded with both Content-Length and Transfer-Encoding: {h:?}"
                );
                assert!(
                    h.get("content-length").is_none_or(|v| v.as_bytes() == b"5"),
                    "{what}: forwarded with the client's Content-Length: {h:?}"
                );
            }
            other => panic!("{what}: answered {other}, not 400 or 200: {text}"),
        }
        assert!(
            up.seen().iter().all(|s| s.uri != "/smuggled"),
            "{what}: the smuggled request reached the upstream: {:?}",
            up.seen()
        );
    }
}

/// Differing Content-Length values (two lines, a list, a signed value) are a 400 and reach no upstream.
#[tokio::test]
async fn differing_content_lengths_are_a_400() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    // RFC 9112 §6.3 (5): an invalid Content-Length is an unrecoverable framing error: 400,
    // then close. RFC 9110 §8.6: Content-Length = 1*DIGIT; differing values are invalid.
    for (what, framing, body) in [
        (
            "two different lines",
            "content-length: 5\r\ncontent-length: 6\r\n",
            "hello!",
        ),
        (
            "two values in one line",
            "content-length: 5, 6\r\n",
            "hello!",
        ),
        ("a signed value", "content-length: +5\r\n", "hello"),
    ] {
        let request = format!("POST /echo HTTP/1.1\r\nhost: svc\r\n{framing}\r\n{body}{SMUGGLED}");
        expect_400(p.addr, request.as_bytes(), what).await;
    }
    assert_eq!(up.hits(), 0, "forwarded: {:?}", up.seen());
}

/// Obfuscated Transfer-Encoding (unknown coding, chunked not last, space before the colon) is a 400 and reaches no upstream.
#[tokio::test]
async fn obfuscated_transfer_encodings_are_a_400() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    for (what, framing) in [
        // RFC 9112 §6.1: chunked not the final coding in a request: MUST 400, then close.
        ("an unknown coding", "transfer-encoding: xchunked\r\n"),
        (
            "chunked not last",
            "transfer-encoding: chunked, identity\r\n",
        ),
        (
            "chunked not last, over two lines",
            "transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n",
        ),
        // RFC 9112 §5.1: whitespace between a field name and the colon: MUST 400.
        (
            "whitespace before the colon",
            "transfer-encoding : chunked\r\n",
        ),
    ] {
        // A Content-Length that frames the same bytes, for a parser that ignores the coding.
        let request = format!(
            "POST /echo HTTP/1.1\r\nhost: svc\r\n{framing}content-length: 15\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
        );
        expect_400(p.addr, request.as_bytes(), what).await;
    }
    assert_eq!(up.hits(), 0, "forwarded: {:?}", up.seen());
}

/// A bad chunk size (not hex, over 64 bits) is a 400 or a close, and no upstream ever gets the whole request.
#[tokio::test]
async fn a_bad_chunk_size_never_completes_a_request_upstream() {
    let (port, whole) = collecting_upstream().await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    for (what, size) in [
        ("a size that is not hex", "zz"),
        ("a size over 64 bits", "fffffffffffffffffffff"),
    ] {
        let request = format!(
            "POST /upload HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n{size}\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
        );
        let (got, closed) = exchange(p.addr, request.as_bytes(), LIMIT).await;
        let text = lossy(&got);
        let (replies, _) = parse_replies(&got, &[]);
        // RFC 9112 §7.1: chunk-size = 1*HEXDIG; a body that cannot be framed is the client's
        // error: Envoy answers 400 (if no response has started) and closes.
        assert!(
            got.is_empty() || statuses(&replies) == [400],
            "{what}: neither a 400 nor a close: {text}"
        );
        assert!(closed, "{what}: the connection stayed open: {text}");
    }
    let whole = whole.lock().unwrap();
    assert!(
        whole.is_empty(),
        "an upstream got a whole request: {:?}",
        *whole
    );
}

// === 2. Header garbage ===

/// NUL, a bare CR, a space in a name and obs-fold are a 400 that reaches no upstream; bare-LF line ends are read as CRLF.
#[tokio::test]
async fn malformed_header_lines_are_a_400_and_bare_lf_is_accepted() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    for (what, line) in [
        // RFC 9110 §5.5: NUL in a field value: reject the message (or replace it with SP).
        ("a NUL in a value", "x-a: a\0b\r\n"),
        // RFC 9112 §2.2: a bare CR is invalid (reject, or replace it with SP).
        ("a bare CR in a value", "x-a: a\rb\r\n"),
        // RFC 9110 §5.1: a field name is a token: no spaces.
        ("a space in a name", "x bad: v\r\n"),
        // RFC 9112 §5.2: obs-fold in a request: reject with 400 (or replace it with SP).
        ("obs-fold", "x-a: a\r\n b\r\n"),
    ] {
        let request = format!("GET / HTTP/1.1\r\nhost: svc\r\n{line}connection: close\r\n\r\n");
        expect_400(p.addr, request.as_bytes(), what).await;
    }
    assert_eq!(up.hits(), 0, "forwarded: {:?}", up.seen());

    // RFC 9112 §2.2: a recipient MAY take a bare LF as a line end (hyper, by httparse, does).
    let (got, closed) = exchange(
        p.addr,
        b"GET /lf HTTP/1.1\nhost: lf.svc\nconnection: close\n\n",
        LIMIT,
    )
    .await;
    let text = lossy(&got);
    let (replies, left) = parse_replies(&got, &[]);
    assert_eq!(statuses(&replies), [200], "bare LF: {text}");
    assert_eq!(replies[0].body_text(), "up", "bare LF: {text}");
    assert!(left.is_empty() && closed, "bare LF: {text}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].uri, "/lf");
    assert_eq!(
        seen[0].headers.get("host").and_then(|v| v.to_str().ok()),
        Some("lf.svc")
    );
}

// === 3. Oversized heads ===

/// A request line, or headers, over max_request_headers_bytes (60 KiB) get 431 and reach no upstream; 50 KiB is served.
#[tokio::test]
async fn request_heads_over_the_limit_get_431() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    // README "Errors" and Envoy (max_request_headers_kb, request line included): 431.
    let long_line = format!(
        "GET /{} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (got, closed) = exchange(p.addr, long_line.as_bytes(), LIMIT).await;
    let (replies, _) = parse_replies(&got, &[]);
    assert_eq!(
        statuses(&replies),
        [431],
        "70 KiB request line: {}",
        lossy(&got)
    );
    assert!(closed, "70 KiB request line: the connection stayed open");

    let padded = |lines: usize| {
        let mut head = String::from("GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n");
        for i in 0..lines {
            head.push_str(&format!("x-pad-{i}: {}\r\n", "b".repeat(1000)));
        }
        head.push_str("\r\n");
        head
    };
    let (got, closed) = exchange(p.addr, padded(70).as_bytes(), LIMIT).await;
    let (replies, _) = parse_replies(&got, &[]);
    assert_eq!(
        statuses(&replies),
        [431],
        "70 KiB of headers: {}",
        lossy(&got)
    );
    assert!(closed, "70 KiB of headers: the connection stayed open");
    assert_eq!(up.hits(), 0, "an oversized head was forwarded");

    let (got, _) = exchange(p.addr, padded(50).as_bytes(), LIMIT).await;
    let (replies, _) = parse_replies(&got, &[]);
    assert_eq!(
        statuses(&replies),
        [200],
        "50 KiB of headers: {}",
        lossy(&got)
    );
    assert_eq!(up.hits(), 1);
}

// === 4. Pipelining ===

/// Three requests written at once on one connection are forwarded and answered in order.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    // RFC 9112 §9.3.2: a server MUST send its responses in the order of the requests.
    let request = [
        "POST /echo?n=1 HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\none",
        "POST /echo?n=2 HTTP/1.1\r\nhost: svc\r\ncontent-length: 3\r\n\r\ntwo",
        "POST /echo?n=3 HTTP/1.1\r\nhost: svc\r\ncontent-length: 5\r\nconnection: close\r\n\r\nthree",
    ]
    .concat();
    let (got, closed) = exchange(p.addr, request.as_bytes(), LIMIT).await;
    let text = lossy(&got);
    let (replies, left) = parse_replies(&got, &[]);
    assert_eq!(statuses(&replies), [200, 200, 200], "{text}");
    let bodies: Vec<String> = replies.iter().map(Reply::body_text).collect();
    assert_eq!(bodies, ["one", "two", "three"], "{text}");
    assert!(left.is_empty(), "stray bytes after the answers: {text}");
    assert!(
        closed,
        "the connection stayed open after `connection: close`"
    );
    let uris: Vec<String> = up.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/echo?n=1", "/echo?n=2", "/echo?n=3"]);
}

// === 5. Bodiless responses ===

/// Answers to HEAD and upstream 204 and 304 carry no body bytes: the next pipelined answer starts right after the head.
#[tokio::test]
async fn bodiless_responses_carry_no_body_bytes() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;

    // RFC 9110 §9.3.2: a response to HEAD has no content.
    let request =
        "HEAD /h HTTP/1.1\r\nhost: svc\r\n\r\nGET /g HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n";
    let (got, closed) = exchange(p.addr, request.as_bytes(), LIMIT).await;
    let text = lossy(&got);
    let (replies, left) = parse_replies(&got, &[true]);
    assert_eq!(statuses(&replies), [200, 200], "HEAD then GET: {text}");
    assert_eq!(replies[1].body_text(), "up", "HEAD then GET: {text}");
    assert!(left.is_empty() && closed, "HEAD then GET: {text}");
    let methods: Vec<Method> = up.seen().into_iter().map(|s| s.method).collect();
    assert_eq!(methods, [Method::HEAD, Method::GET]);

    // RFC 9112 §6.3 (1): a 204 or 304 ends at its head, whatever the upstream sent after it.
    for code in [204u16, 304] {
        up.set_status(code);
        let request =
            "GET /a HTTP/1.1\r\nhost: svc\r\n\r\nGET /b HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n";
        let (got, closed) = exchange(p.addr, request.as_bytes(), LIMIT).await;
        let text = lossy(&got);
        let (replies, left) = parse_replies(&got, &[]);
        assert_eq!(statuses(&replies), [code, code], "{code}: {text}");
        assert!(left.is_empty(), "{code}: bytes after the last head: {text}");
        assert!(closed, "{code}: the connection stayed open: {text}");
        if code == 204 {
            for r in &replies {
                // RFC 9110 §8.6 and RFC 9112 §6.1: no Content-Length or Transfer-Encoding in a 204.
                assert!(
                    r.header("content-length").is_none() && r.header("transfer-encoding").is_none(),
                    "204 with framing headers: {text}"
                );
            }
        }
    }
}

// === 6. Expect: 100-continue ===

/// `Expect: 100-continue` gets `100 Continue` before the body is sent, then the final 200 with the echoed body.
#[tokio::test]
async fn expect_100_continue_gets_a_100_then_the_echo() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /echo HTTP/1.1\r\nhost: svc\r\ncontent-length: 11\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // curl sends the body anyway after 1 s without a 100; this client waits up to 2 s.
    let (interim, closed) = read_until(&mut s, Duration::from_secs(2), |b| {
        find(b, b"\r\n\r\n").is_some()
    })
    .await;
    let continued = interim.starts_with(b"HTTP/1.1 100 ");
    assert!(
        (interim.is_empty() && !closed) || continued,
        "a final answer (or a close) before the body was sent: {}",
        lossy(&interim)
    );
    let _ = s.write_all(b"hello world").await;
    let (rest, _) = read_until(&mut s, LIMIT, |_| false).await;
    let all = [interim.as_slice(), rest.as_slice()].concat();
    let text = lossy(&all);
    let (replies, left) = parse_replies(&all, &[]);
    let finals: Vec<&Reply> = replies.iter().filter(|r| r.status >= 200).collect();
    assert_eq!(finals.len(), 1, "one final answer: {text}");
    assert_eq!(
        (finals[0].status, finals[0].body_text().as_str()),
        (200, "hello world"),
        "{text}"
    );
    assert!(left.is_empty(), "stray bytes: {text}");
    // RFC 9110 §10.1.1 (a server that will read the content sends 100 first); Envoy sends it
    // itself (proxy_100_continue off).
    assert!(
        continued,
        "no `100 Continue` within 2 s of the head: {text}"
    );
}
