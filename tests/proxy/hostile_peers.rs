//! Hostile peers: upstreams that answer with broken HTTP/1.1, and HTTP/2 clients that flood remora with frames.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::raw_http::*;
use crate::support::*;

/// How long any exchange may take.
const LIMIT: Duration = Duration::from_secs(5);
/// How long a scripted upstream waits after its (partial) answer before it ends the
/// connection: long enough for remora to have passed the head and the bytes on.
const PAUSE: Duration = Duration::from_millis(300);

// === helpers: misbehaving upstreams ===

/// How a scripted upstream ends a connection once it has answered.
#[derive(Clone, Copy)]
enum End {
    /// An orderly close (FIN).
    Close,
    /// A TCP reset: SO_LINGER 0, then the socket is dropped.
    Reset,
}

/// An upstream on 127.0.0.1:0 that reads each request head, writes `answer` as it is,
/// waits `pause`, then ends the connection as `end` says.
async fn scripted_upstream(answer: &'static [u8], pause: Duration, end: End) -> u16 {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            tokio::spawn(async move {
                let _ = read_until(&mut s, LIMIT, |b| find(b, b"\r\n\r\n").is_some()).await;
                let _ = s.write_all(answer).await;
                tokio::time::sleep(pause).await;
                match end {
                    End::Close => {
                        let _ = s.shutdown().await;
                    }
                    End::Reset => {
                        let _ = s.set_zero_linger();
                    }
                }
                drop(s);
            });
        }
    });
    port
}

/// One virtual host for any authority whose routes send each path prefix to a cluster,
/// in order: `&[("/a", "a"), ("/", "rest")]`.
fn prefix_routes(routes: &[(&str, &str)]) -> String {
    let mut yaml = String::from("      - name: all\n        domains: [\"*\"]\n        routes:\n");
    for (prefix, cluster) in routes {
        yaml.push_str(&format!(
            "          - {{ match: {{ prefix: {prefix} }}, cluster: {cluster} }}\n"
        ));
    }
    yaml
}

/// Sends a keep-alive `GET path` on a new connection and asserts what a client must see
/// when the upstream's 100-byte body breaks off after 10 bytes: the 200 head, fewer than
/// 100 body bytes, nothing that reads as a whole response, and a close within `LIMIT`
/// (the request did not ask for one: the close is remora's).
async fn expect_truncated(addr: SocketAddr, path: &str, what: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: svc\r\n\r\n");
    let (got, closed) = exchange(addr, request.as_bytes(), LIMIT).await;
    let text = lossy(&got);
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{what}: no 200 head: {text}"
    );
    let body = find(&got, b"\r\n\r\n").map_or(0, |at| got.len() - (at + 4));
    assert!(
        body < 100,
        "{what}: {body} body bytes from an upstream that sent 10 of 100: {text}"
    );
    assert!(
        parse_reply(&got, false).is_none(),
        "{what}: the client got a complete-looking response: {text}"
    );
    assert!(
        closed,
        "{what}: the client connection was still open {LIMIT:?} after the upstream's body broke off: {text}"
    );
}

// === 1. Upstreams that answer with broken HTTP/1.1 ===

/// Garbage, a four-digit status code and two differing Content-Lengths from an upstream are each a 502 `upstream_protocol_error`.
#[tokio::test]
async fn malformed_upstream_responses_are_a_502_protocol_error() {
    // hyper's client: httparse refuses a status line that is not `HTTP/1.x ` + 3 digits +
    // SP/CRLF (httparse-1.10.1 src/lib.rs:933 parse_code, :696 `_ => Err(Error::Status)`),
    // which hyper reports as Parse::Version / Parse::Status (hyper-1.12.0 src/error.rs:653);
    // differing Content-Length values are Parse::Header(ContentLengthInvalid)
    // (src/proto/h1/role.rs:1333-1337, src/headers.rs:76). All are `is_parse()`, which
    // remora maps to 502 `upstream_protocol_error` (src/upstream.rs is_malformed_response).
    let cases: [(&str, &str, &'static [u8]); 3] = [
        (
            "garbage instead of a status line",
            "/garbage",
            b"hello, this is not HTTP at all\r\n\r\n".as_slice(),
        ),
        (
            "a four-digit status code",
            "/bad-status",
            b"HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok".as_slice(),
        ),
        (
            "two differing Content-Lengths",
            "/two-lengths",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!".as_slice(),
        ),
    ];
    let mut routes = Vec::new();
    let mut clusters = String::new();
    for (_, path, answer) in cases {
        let port = scripted_upstream(answer, Duration::ZERO, End::Close).await;
        let name = &path[1..];
        routes.push((path, name));
        clusters.push_str(&cluster(name, &[(port, 1)], ""));
    }
    let p = proxy(&config(&prefix_routes(&routes), &clusters)).await;
    let cl = client();
    for (what, path, _) in cases {
        let r = tokio::time::timeout(LIMIT, get(&cl, p.addr, "svc", path, &[]))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer within {LIMIT:?}"));
        assert_eq!(
            (r.status.as_u16(), r.header("x-remora-error")),
            (502, "upstream_protocol_error"),
            "{what}: {}",
            r.body
        );
    }
}

/// An upstream body shorter than its Content-Length (10 of 100, then FIN): the client gets the 200 head, the 10 bytes and a close, never a whole response.
#[tokio::test]
async fn a_short_upstream_body_closes_the_client_connection() {
    let port = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
        PAUSE,
        End::Close,
    )
    .await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    // hyper's client reads a Content-Length body to EOF as IncompleteBody (an error, not
    // an end); the body error makes hyper's server end the client connection.
    expect_truncated(p.addr, "/", "a short body").await;
}

/// An upstream response with Content-Length and chunked is framed by chunked alone: the client gets the whole chunked body and never both headers.
#[tokio::test]
async fn content_length_with_chunked_from_an_upstream_is_framed_by_chunked_alone() {
    // hyper's client decodes by Transfer-Encoding when it is there and ignores
    // Content-Length (hyper-1.12.0 src/proto/h1/role.rs:1319-1332, Client::decoder), but
    // leaves the Content-Length header in the response. RFC 9112 §6.3 (3): an intermediary
    // MUST remove the received Content-Length before forwarding. If remora strips
    // Transfer-Encoding (hop-by-hop) and keeps `content-length: 3`, hyper's server frames
    // the body by that (role.rs:755-783, Encoder::length; encode.rs:143-150 drops the
    // excess) and the client gets `hel`.
    let port = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        Duration::ZERO,
        End::Close,
    )
    .await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    let (got, closed) = exchange(
        p.addr,
        b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
        LIMIT,
    )
    .await;
    let text = lossy(&got);
    let (replies, left) = parse_replies(&got, &[]);
    assert_eq!(statuses(&replies), [200], "{text}");
    let reply = &replies[0];
    assert!(
        !(reply.header("content-length").is_some() && reply.header("transfer-encoding").is_some()),
        "both Content-Length and Transfer-Encoding: {text}"
    );
    assert!(
        reply.header("content-length").is_none_or(|v| v == "11"),
        "the upstream's Content-Length was passed on with a chunked body: {text}"
    );
    assert_eq!(
        reply.body_text(),
        "hello world",
        "not framed by chunked: {text}"
    );
    assert!(left.is_empty(), "stray bytes after the answer: {text}");
    assert!(
        closed,
        "the connection stayed open after `connection: close`"
    );
}

/// An upstream reset mid-body: an HTTP/1.1 client gets the 200 head, a truncated body and a close, an HTTP/2 one a broken body; remora keeps serving.
#[tokio::test]
async fn an_upstream_reset_mid_body_breaks_only_that_response() {
    let reset = scripted_upstream(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789",
        PAUSE,
        End::Reset,
    )
    .await;
    let up = Upstream::start("up").await;
    let clusters = format!(
        "{}{}",
        cluster("reset", &[(reset, 1)], ""),
        cluster("up", &[(up.port(), 1)], "")
    );
    let p = proxy(&config(
        &prefix_routes(&[("/reset", "reset"), ("/", "up")]),
        &clusters,
    ))
    .await;
    expect_truncated(p.addr, "/reset", "a reset mid-body").await;

    let r = get(&client(), p.addr, "svc", "/healthy", &[]).await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "up"));

    // Over HTTP/2 the stream must break (RST_STREAM), not end as if the body were whole.
    let cl = h2_client();
    let req = Request::get(format!("http://{}/reset", p.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(LIMIT, cl.request(req))
        .await
        .expect("no HTTP/2 response head within the limit")
        .expect("the HTTP/2 response head");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(LIMIT, resp.into_body().collect())
        .await
        .expect("the HTTP/2 body neither ended nor broke within the limit");
    if let Ok(body) = body {
        panic!(
            "over HTTP/2, a body whose upstream reset after 10 of 100 bytes ended cleanly with {} bytes",
            body.to_bytes().len()
        );
    }

    expect_truncated(p.addr, "/reset", "a second reset mid-body").await;
    let r = h2_get(&cl, p.addr, "/healthy").await;
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "up"));
}

// === helpers: raw HTTP/2 ===

/// The HTTP/2 client connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
/// A SETTINGS frame with the ACK flag.
const SETTINGS_ACK: [u8; 9] = [0, 0, 0, 4, 1, 0, 0, 0, 0];

// Frame types (RFC 9113 §6).
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

// Error codes (RFC 9113 §7).
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// SETTINGS_MAX_CONCURRENT_STREAMS.
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The longest a flood may take to write.
const FLOOD_LIMIT: Duration = Duration::from_secs(20);
/// No write progress for this long: remora has stopped reading (backpressure).
const STALL: Duration = Duration::from_secs(3);
/// How long remora may take to cut a connection once the flood is written.
const CUT_WITHIN: Duration = Duration::from_secs(5);
/// How long remora may take to answer a whole flood of PINGs or SETTINGS.
const WATCH: Duration = Duration::from_secs(10);
/// The longest a whole flood (connect, flood, watch) may take.
const FLOOD_GUARD: Duration = Duration::from_secs(60);
/// Frames are written in batches of about this many bytes.
const BATCH_BYTES: usize = 64 * 1024;
/// How much this process's resident set (remora runs in it) may grow during a flood.
const RSS_BUDGET_KIB: u64 = 100 * 1024;

/// One HTTP/2 frame as read off the wire.
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// Appends one frame: the 9-byte header, then `payload`.
fn frame(buf: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    buf.extend_from_slice(&len.to_be_bytes()[1..]);
    buf.push(kind);
    buf.push(flags);
    buf.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    buf.extend_from_slice(payload);
}

/// The HPACK block of `GET path` with authority `svc`, no encoder needed: `:method GET`
/// (static 2), `:scheme http` (static 6), `:path` and `:authority` as literals without
/// indexing on static names 4 and 1. `path` is under 127 bytes.
fn request_block(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 3]);
    block.extend_from_slice(b"svc");
    block
}

/// 1 KiB of HPACK: eight 128-byte literal fields without indexing, new name,
/// `x-flood: aaa…` (1 + 1 + 7 + 1 + 118 bytes).
fn continuation_block() -> Vec<u8> {
    let mut block = Vec::with_capacity(1024);
    for _ in 0..8 {
        block.extend_from_slice(&[0x00, 7]);
        block.extend_from_slice(b"x-flood");
        block.push(118);
        block.extend_from_slice(&[b'a'; 118]);
    }
    block
}

/// The big-endian 32-bit word at `at` in `bytes`.
fn word(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The first whole frame in `pending`, taken out of it.
fn take_frame(pending: &mut BytesMut) -> Option<Frame> {
    if pending.len() < 9 {
        return None;
    }
    let len = u32::from_be_bytes([0, pending[0], pending[1], pending[2]]) as usize;
    if pending.len() < 9 + len {
        return None;
    }
    let whole = pending.split_to(9 + len);
    Some(Frame {
        kind: whole[3],
        flags: whole[4],
        stream: u32::from_be_bytes([whole[5], whole[6], whole[7], whole[8]]) & 0x7fff_ffff,
        payload: whole[9..].to_vec(),
    })
}

/// How writing a flood ended.
#[derive(Clone, Copy)]
enum Written {
    /// Every frame was written.
    All,
    /// A write failed after `sent` frames: remora closed the connection.
    Failed { sent: usize },
    /// No write progress for `STALL` (or `FLOOD_LIMIT` passed) after `sent` frames:
    /// remora stopped reading.
    Stalled { sent: usize },
}

impl Written {
    fn describe(&self) -> String {
        match self {
            Written::All => "all written".into(),
            Written::Failed { sent } => format!("a write failed after {sent} units"),
            Written::Stalled { sent } => format!("writes stalled after {sent} units"),
        }
    }
}

/// What became of a flooding connection.
struct Fate {
    written: Written,
    /// The frames read after the flood was written.
    frames: Vec<Frame>,
    /// Whether remora closed the connection (EOF or an error) while they were read.
    closed: bool,
}

impl Fate {
    /// The error code of the GOAWAY read after the flood, if any.
    fn goaway(&self) -> Option<u32> {
        self.frames
            .iter()
            .find(|f| f.kind == GOAWAY)
            .map(|f| word(&f.payload, 4).unwrap_or(u32::MAX))
    }

    /// Whether remora cut the connection: a GOAWAY, a close, or a write that failed.
    fn cut(&self) -> bool {
        self.closed || matches!(self.written, Written::Failed { .. }) || self.goaway().is_some()
    }

    fn summary(&self) -> String {
        format!(
            "writing: {}; GOAWAY: {:?}; closed: {}; {} frames read after the flood",
            self.written.describe(),
            self.goaway(),
            self.closed,
            self.frames.len()
        )
    }
}

/// A raw h2c connection to remora.
struct RawH2 {
    s: TcpStream,
    /// Bytes read but not yet taken as a whole frame.
    pending: BytesMut,
}

impl RawH2 {
    /// Connects: the preface and an empty SETTINGS, then remora's SETTINGS, which is ACKed
    /// and returned as (identifier, value) pairs.
    async fn connect(addr: SocketAddr) -> (RawH2, Vec<(u16, u32)>) {
        let s = TcpStream::connect(addr).await.expect("connect to remora");
        let mut conn = RawH2 {
            s,
            pending: BytesMut::new(),
        };
        conn.s
            .write_all(H2_PREFACE)
            .await
            .expect("write the preface");
        conn.s
            .write_all(&EMPTY_SETTINGS)
            .await
            .expect("write SETTINGS");
        let (frames, closed) = conn
            .read_frames(LIMIT, |f| f.kind == SETTINGS && f.flags & ACK == 0)
            .await;
        let settings = frames
            .iter()
            .find(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .unwrap_or_else(|| {
                panic!("no SETTINGS from remora within {LIMIT:?} (closed: {closed})")
            });
        let params = settings
            .payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect();
        conn.s
            .write_all(&SETTINGS_ACK)
            .await
            .expect("ACK remora's SETTINGS");
        (conn, params)
    }

    /// Reads frames until `stop` holds for one (or one is a GOAWAY), remora closes, or
    /// `limit` passes; returns the frames and whether remora closed.
    async fn read_frames(
        &mut self,
        limit: Duration,
        mut stop: impl FnMut(&Frame) -> bool,
    ) -> (Vec<Frame>, bool) {
        let mut frames = Vec::new();
        let mut closed = false;
        let mut buf = vec![0u8; 16 * 1024];
        let RawH2 { s, pending } = self;
        let _ = tokio::time::timeout(limit, async {
            loop {
                while let Some(f) = take_frame(pending) {
                    let done = stop(&f) || f.kind == GOAWAY;
                    frames.push(f);
                    if done {
                        return;
                    }
                }
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        closed = true;
                        return;
                    }
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        (frames, closed)
    }

    /// Sends `GET path` on stream `id`; false if the write failed.
    async fn get(&mut self, id: u32, path: &str) -> bool {
        let mut buf = Vec::new();
        frame(
            &mut buf,
            HEADERS,
            END_STREAM | END_HEADERS,
            id,
            &request_block(path),
        );
        self.s.write_all(&buf).await.is_ok()
    }

    /// Sends `GET path` on stream `id` and waits (up to `LIMIT`) for its response HEADERS:
    /// proof that the frames these tests build are ones remora takes.
    async fn answered(&mut self, id: u32, path: &str) -> bool {
        if !self.get(id, path).await {
            return false;
        }
        let (frames, _) = self
            .read_frames(LIMIT, |f| f.kind == HEADERS && f.stream == id)
            .await;
        frames.iter().any(|f| f.kind == HEADERS && f.stream == id)
    }

    /// Writes `units` units (`unit(i, buf)` appends the `i`th one's frames) in batches,
    /// never reading.
    async fn flood(&mut self, units: usize, mut unit: impl FnMut(usize, &mut Vec<u8>)) -> Written {
        let deadline = Instant::now() + FLOOD_LIMIT;
        let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES + 4096);
        let mut i = 0;
        while i < units {
            let first = i;
            batch.clear();
            while i < units && batch.len() < BATCH_BYTES {
                unit(i, &mut batch);
                i += 1;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(STALL.min(left), self.s.write_all(&batch)).await {
                Ok(Ok(())) => {}
                // Remora closed the connection: the expected end of most floods.
                Ok(Err(_)) => return Written::Failed { sent: first },
                Err(_) => return Written::Stalled { sent: first },
            }
        }
        Written::All
    }

    /// Floods (see `flood`), then reads what remora sends until `stop` holds for a frame,
    /// a GOAWAY, a close, or `watch` passes (2 s at most when the flood did not all go out).
    async fn flood_and_watch(
        &mut self,
        units: usize,
        unit: impl FnMut(usize, &mut Vec<u8>),
        watch: Duration,
        stop: impl FnMut(&Frame) -> bool,
    ) -> Fate {
        let written = self.flood(units, unit).await;
        let watch = match written {
            Written::All => watch,
            _ => watch.min(Duration::from_secs(2)),
        };
        let (frames, closed) = self.read_frames(watch, stop).await;
        Fate {
            written,
            frames,
            closed,
        }
    }
}

/// This process's resident set in KiB, from /proc/self/status (remora runs in-process).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .expect("VmRSS in /proc/self/status")
}

/// `GET path` over h2c (the authority is the address).
async fn h2_get(cl: &TestClient, addr: SocketAddr, path: &str) -> Answer {
    let req = Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(cl, req).await
}

/// Runs `flood` on its own task while a well-behaved h2c client asks `GET /` every 50 ms
/// on its own connection: each answer must be a 200 within `LIMIT` (one of them after the
/// flood has ended), and this process's RSS must grow by less than `RSS_BUDGET_KIB`
/// meanwhile. Returns what the flood returned (its panics are re-raised).
async fn under_flood<T: Send + 'static>(
    addr: SocketAddr,
    what: &str,
    flood: impl Future<Output = T> + Send + 'static,
) -> T {
    let before = rss_kib();
    let mut peak = before;
    let started = Instant::now();
    let task = tokio::spawn(flood);
    let cl = h2_client();
    let mut served = 0;
    loop {
        let flood_over = task.is_finished();
        let r = tokio::time::timeout(LIMIT, h2_get(&cl, addr, "/"))
            .await
            .unwrap_or_else(|_| {
                panic!("{what}: a well-behaved h2c client got no answer within {LIMIT:?} ({served} answered before)")
            });
        assert_eq!(
            r.status, 200,
            "{what}: a well-behaved h2c client: {}",
            r.body
        );
        served += 1;
        peak = peak.max(rss_kib());
        if flood_over {
            break;
        }
        assert!(
            started.elapsed() < FLOOD_GUARD,
            "{what}: the flood did not end within {FLOOD_GUARD:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = match task.await {
        Ok(out) => out,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let grown = peak.saturating_sub(before);
    assert!(
        grown < RSS_BUDGET_KIB,
        "{what}: RSS grew by {} MiB (from {} MiB) during the flood",
        grown / 1024,
        before / 1024
    );
    out
}

/// An HTTP/2 client that stops granting flow-control window (it reads the socket, but
/// never sends WINDOW_UPDATE) stalls its stream without filling any socket: hyper waits for
/// window and polls the response body no more, so a check made while polling never runs.
/// After `stream_idle_timeout` the stream's breaker slot comes back all the same (with
/// `max_requests: 1`, the next request is admitted) and the upstream is let go.
#[tokio::test]
async fn an_http2_client_that_withholds_window_loses_its_stream_after_stream_idle_timeout() {
    const BODY: usize = 1 << 20;
    let mut answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {BODY}\r\n\r\n").into_bytes();
    answer.resize(answer.len() + BODY, b'x');
    let up = StallingUpstream::start(answer).await;
    let p = proxy(&stream_idle_config(
        up.port,
        "500ms",
        "    circuit_breakers: { max_requests: 1 }\n",
    ))
    .await;
    let (mut conn, _) = RawH2::connect(p.addr).await;
    assert!(conn.get(1, "/").await, "the request was not written");
    // The head and the first window's worth of body come; then nothing can.
    let (frames, closed) = conn
        .read_frames(LIMIT, |f| f.kind == HEADERS && f.stream == 1)
        .await;
    assert!(
        !closed && frames.iter().any(|f| f.kind == HEADERS),
        "no response HEADERS"
    );
    // Keep reading (the socket never fills) past the limit, granting no window.
    let _ = conn
        .read_frames(Duration::from_millis(1500), |_| false)
        .await;
    let answer = get(&client(), p.addr, "svc", "/", &[]).await;
    assert_eq!(
        answer.status,
        200,
        "the stalled stream still holds the breaker slot: {}",
        answer.header("x-remora-error")
    );
    assert_eq!(answer.body.len(), BODY);
    assert_eq!(up.accepted(), 2);
}

/// An HTTP/2 stream whose upstream stalls after the head is reset at `stream_idle_timeout`,
/// whichever of the two idle checks (in the body, or the task watching it) sees it first.
#[tokio::test]
async fn an_http2_stream_whose_upstream_stalls_is_reset_after_stream_idle_timeout() {
    let up = StallingUpstream::start(STALLED_BODY).await;
    let p = proxy(&stream_idle_config(up.port, "300ms", "")).await;
    for round in 0..5 {
        let (mut conn, _) = RawH2::connect(p.addr).await;
        assert!(conn.get(1, "/").await, "the request was not written");
        let (frames, _) = conn
            .read_frames(LIMIT, |f| f.kind == RST_STREAM && f.stream == 1)
            .await;
        assert!(
            frames.iter().any(|f| f.kind == RST_STREAM && f.stream == 1),
            "round {round}: the stalled stream was not reset within {LIMIT:?}"
        );
    }
}

/// One route to the cluster `up` (an upstream on `port`, with `cluster_extra`), the route
/// timeout off, and the listener's `stream_idle_timeout` at `limit`.
fn stream_idle_config(port: u16, limit: &str, cluster_extra: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc, stream_idle_timeout: {limit} }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n{}\n\
         clusters:\n{}",
        one_route("cluster: up, timeout: 0"),
        cluster("up", &[(port, 1)], cluster_extra)
    )
}

// === 2. HTTP/2 floods ===

/// Rapid reset (CVE-2023-44487): 20,000 HEADERS each cancelled at once by RST_STREAM get the connection cut (GOAWAY ENHANCE_YOUR_CALM or a close).
#[tokio::test]
async fn rapid_reset_floods_are_cut() {
    // hyper's HTTP/2 server leaves max_pending_accept_reset_streams unset
    // (hyper-1.12.0 src/proto/h2/server.rs:70, :146-148), so h2's default of 20 applies
    // (h2-0.4.20 src/server.rs:660, src/proto/mod.rs:34). A stream reset by the client
    // before the server accepted it is counted; the 21st is a GOAWAY ENHANCE_YOUR_CALM
    // `too_many_resets` (src/proto/streams/recv.rs:909-921). h2 reads every frame the
    // socket holds before the server accepts the next stream (src/proto/connection.rs:356
    // poll2), so pairs written back to back are reset while pending accept. Remora does
    // not change these defaults (src/listener/connection.rs, http2::Builder).
    const RAPID_RESETS: usize = 20_000;
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let addr = p.addr;
    let fate = under_flood(addr, "rapid reset", async move {
        let (mut conn, _) = RawH2::connect(addr).await;
        assert!(
            conn.answered(1, "/").await,
            "a well-formed request on the raw connection got no response HEADERS"
        );
        conn.flood_and_watch(
            RAPID_RESETS,
            |i, buf| {
                let id = 3 + 2 * i as u32;
                frame(
                    buf,
                    HEADERS,
                    END_STREAM | END_HEADERS,
                    id,
                    &request_block("/"),
                );
                frame(buf, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
            },
            CUT_WITHIN,
            |_| false,
        )
        .await
    })
    .await;
    assert!(
        fate.cut(),
        "{RAPID_RESETS} HEADERS + RST_STREAM pairs: the connection was not cut: {}",
        fate.summary()
    );
    assert!(
        fate.goaway().is_none_or(|code| code == ENHANCE_YOUR_CALM),
        "a GOAWAY for another reason than the resets: {}",
        fate.summary()
    );
}

/// A CONTINUATION flood (HEADERS without END_HEADERS, then 10,000 CONTINUATION frames of 1 KiB) gets the connection cut.
#[tokio::test]
async fn continuation_floods_are_cut() {
    // h2 bounds the CONTINUATION frames of one header block by the header list limit:
    // max(61440 / 16384 + 25 %, 5) = 5 with remora's default max_request_headers_bytes
    // (h2-0.4.20 src/codec/framed_read.rs:106-113 calc_max_continuation_frames, set at the
    // handshake by src/server.rs:395-397); the 6th is a GOAWAY ENHANCE_YOUR_CALM
    // `too_many_continuations` (framed_read.rs:327-343).
    const CONTINUATIONS: usize = 10_000;
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let addr = p.addr;
    let fate = under_flood(addr, "CONTINUATION flood", async move {
        let (mut conn, _) = RawH2::connect(addr).await;
        assert!(
            conn.answered(1, "/").await,
            "a well-formed request on the raw connection got no response HEADERS"
        );
        let block = continuation_block();
        conn.flood_and_watch(
            1 + CONTINUATIONS,
            move |i, buf| {
                if i == 0 {
                    // No END_HEADERS: the header block goes on in CONTINUATION frames.
                    frame(buf, HEADERS, END_STREAM, 3, &request_block("/"));
                } else {
                    frame(buf, CONTINUATION, 0, 3, &block);
                }
            },
            CUT_WITHIN,
            |_| false,
        )
        .await
    })
    .await;
    assert!(
        fate.cut(),
        "{CONTINUATIONS} CONTINUATION frames of 1 KiB: the connection was not cut: {}",
        fate.summary()
    );
    assert!(
        fate.goaway().is_none_or(|code| code == ENHANCE_YOUR_CALM),
        "a GOAWAY for another reason than the flood: {}",
        fate.summary()
    );
}

/// A PING flood (100,000 PINGs, ACKs unread) is cut or bounded: all ACKed, or remora stops reading; others are served and memory stays flat.
#[tokio::test]
async fn ping_floods_are_cut_or_bounded() {
    // h2 has no PING-flood limit; it holds at most one unsent PING ACK and reads no further
    // frame until that ACK is buffered for writing (h2-0.4.20 src/proto/ping_pong.rs:97-156
    // `pending_pong`; src/proto/connection.rs:385 poll_ready, :223, before each frame). A
    // client that never reads its ACKs therefore only fills socket buffers, then remora
    // stops reading: bounded, not cut.
    const PINGS: usize = 100_000;
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let addr = p.addr;
    let last = (PINGS as u64 - 1).to_be_bytes();
    let is_last_ack =
        move |f: &Frame| f.kind == PING && f.flags & ACK != 0 && f.payload[..] == last[..];
    let fate = under_flood(addr, "PING flood", async move {
        let (mut conn, _) = RawH2::connect(addr).await;
        conn.flood_and_watch(
            PINGS,
            |i, buf| frame(buf, PING, 0, 0, &(i as u64).to_be_bytes()),
            WATCH,
            is_last_ack,
        )
        .await
    })
    .await;
    let acked_all = fate.frames.iter().any(is_last_ack);
    assert!(
        fate.cut() || acked_all || matches!(fate.written, Written::Stalled { .. }),
        "{PINGS} PINGs: neither cut, nor all ACKed within {WATCH:?}, nor held back: {}",
        fate.summary()
    );
}

/// A SETTINGS flood (100,000 SETTINGS, ACKs unread) is cut or bounded: all ACKed, or remora stops reading; others are served and memory stays flat.
#[tokio::test]
async fn settings_floods_are_cut_or_bounded() {
    // h2 has no SETTINGS-flood limit; it holds at most one unACKed remote SETTINGS and
    // ACKs it before it reads another frame (h2-0.4.20 src/proto/settings.rs:81-87
    // "We always ACK before reading more frames", polled in src/proto/connection.rs:225-228
    // poll_ready). As for PINGs: bounded by backpressure, not cut.
    const FRAMES: usize = 100_000;
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let addr = p.addr;
    let fate = under_flood(addr, "SETTINGS flood", async move {
        let (mut conn, _) = RawH2::connect(addr).await;
        // remora's ACK of the first SETTINGS (sent by `connect`) may be among those read.
        let mut acks = 0;
        conn.flood_and_watch(
            FRAMES,
            |_, buf| buf.extend_from_slice(&EMPTY_SETTINGS),
            WATCH,
            move |f: &Frame| {
                if f.kind == SETTINGS && f.flags & ACK != 0 {
                    acks += 1;
                }
                acks >= FRAMES
            },
        )
        .await
    })
    .await;
    let acks = fate
        .frames
        .iter()
        .filter(|f| f.kind == SETTINGS && f.flags & ACK != 0)
        .count();
    assert!(
        fate.cut() || acks >= FRAMES || matches!(fate.written, Written::Stalled { .. }),
        "{FRAMES} SETTINGS: neither cut, nor all ACKed within {WATCH:?} ({acks} ACKs), nor held back: {}",
        fate.summary()
    );
}

/// Streams past the SETTINGS_MAX_CONCURRENT_STREAMS remora advertises get RST_STREAM REFUSED_STREAM (or the connection a GOAWAY); the admitted ones are answered.
#[tokio::test]
async fn streams_over_the_concurrency_limit_are_refused() {
    // hyper's HTTP/2 server advertises max_concurrent_streams 200 (hyper-1.12.0
    // src/proto/h2/server.rs:69, :143-145) and h2 enforces it from the start, before the
    // client's ACK (h2-0.4.20 src/proto/connection.rs:149-152): a stream over it is refused
    // (src/proto/streams/recv.rs:145-147, streams.rs:523) with RST_STREAM REFUSED_STREAM
    // (connection.rs:229-236), counted toward the local reset limit of 1024.
    const EXCESS: usize = 10;
    let slow = Upstream::start("slow").await;
    slow.set_delay(Duration::from_secs(2));
    let up = Upstream::start("up").await;
    let clusters = format!(
        "{}{}",
        cluster("slow", &[(slow.port(), 1)], ""),
        cluster("up", &[(up.port(), 1)], "")
    );
    let p = proxy(&config(
        &prefix_routes(&[("/slow", "slow"), ("/", "up")]),
        &clusters,
    ))
    .await;
    let addr = p.addr;
    let (max, fate) = under_flood(addr, "streams over the limit", async move {
        let (mut conn, settings) = RawH2::connect(addr).await;
        let max = settings
            .iter()
            .find(|(id, _)| *id == MAX_CONCURRENT_STREAMS)
            .map(|&(_, v)| v as usize)
            .expect("remora's SETTINGS has no SETTINGS_MAX_CONCURRENT_STREAMS: no stream limit");
        assert!(
            (1..=10_000).contains(&max),
            "SETTINGS_MAX_CONCURRENT_STREAMS {max} is out of this test's range"
        );
        // Stop once every excess stream is refused and every admitted one answered.
        let (mut refused, mut answered) = (0usize, 0usize);
        let stop = move |f: &Frame| {
            match f.kind {
                RST_STREAM => refused += 1,
                HEADERS => answered += 1,
                _ => {}
            }
            refused >= EXCESS && answered >= max
        };
        // Each upstream answer takes 2 s, so the first `max` streams are all still open
        // when the rest arrive.
        let fate = conn
            .flood_and_watch(
                max + EXCESS,
                |i, buf| {
                    let id = 1 + 2 * i as u32;
                    frame(
                        buf,
                        HEADERS,
                        END_STREAM | END_HEADERS,
                        id,
                        &request_block("/slow"),
                    );
                },
                WATCH,
                stop,
            )
            .await;
        (max, fate)
    })
    .await;
    if fate.goaway().is_some() {
        // RFC 9113 §5.1.2 allows a stream error; a GOAWAY for the whole connection
        // answers the excess too.
        return;
    }
    let id = |i: usize| 1 + 2 * i as u32;
    let refused: BTreeSet<u32> = fate
        .frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && word(&f.payload, 0) == Some(REFUSED_STREAM))
        .map(|f| f.stream)
        .collect();
    let excess: BTreeSet<u32> = (max..max + EXCESS).map(id).collect();
    assert_eq!(
        refused,
        excess,
        "the streams past the limit of {max} were not (all, and only them) refused: {}",
        fate.summary()
    );
    let answered: BTreeSet<u32> = fate
        .frames
        .iter()
        .filter(|f| f.kind == HEADERS)
        .map(|f| f.stream)
        .collect();
    let admitted: BTreeSet<u32> = (0..max).map(id).collect();
    assert!(
        answered == admitted,
        "{} of the {max} admitted streams were answered within {WATCH:?}, and {} others: {}",
        answered.intersection(&admitted).count(),
        answered.difference(&admitted).count(),
        fate.summary()
    );
}
