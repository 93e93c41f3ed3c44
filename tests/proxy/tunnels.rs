//! Upgrades and tunnels: only allow-listed upgrades are tunnelled; a tunnel is a connection
//! on both sides (limits, gauges, idle timeout, drain) until it closes. Also the two ways
//! an upstream can drop a request it never processed (keep-alive race, HTTP/2 GOAWAY), which
//! remora must send again on a fresh connection.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::support::*;

type Ws = WebSocketStream<TcpStream>;

const DOWNSTREAM_ACTIVE: &str = "remora_downstream_connections_active{listener=\"main\"}";
const UPSTREAM_ACTIVE_WS: &str = "remora_upstream_connections_active{cluster=\"ws\"}";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A config with listener `main`, a `/plain` route answered by remora itself (200 `plain`)
/// and every other path sent to cluster `ws` at `127.0.0.1:port`. The extras are inserted
/// into the listener's, the `ws` route's and the cluster's flow mappings (`, key: value`).
pub(crate) fn ws_config(
    listener_extra: &str,
    route_extra: &str,
    cluster_extra: &str,
    port: u16,
) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc{listener_extra} }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n\
         \x20         - {{ match: {{ prefix: /plain }}, direct_response: {{ status: 200, body: plain }} }}\n\
         \x20         - {{ match: {{ prefix: / }}, cluster: ws{route_extra} }}\n\
         clusters:\n  - {{ name: ws, endpoints: [{{ address: \"127.0.0.1:{port}\" }}]{cluster_extra} }}\n"
    )
}

/// One sample from `/metrics`; 0 when the sample is not there.
async fn sample_or_zero(admin: SocketAddr, sample: &str) -> f64 {
    let text = get(&client(), admin, "admin", "/metrics", &[]).await.body;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Writes `request` on a new connection to `addr` and reads until `done` says so, the peer
/// closes, or 5 s pass. A refused or reset connection gives what was read (maybe nothing).
async fn exchange(addr: SocketAddr, request: &str, done: impl Fn(&str) -> bool) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s.write_all(request.as_bytes()).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if done(&String::from_utf8_lossy(&out)) {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /plain` with `connection: close` on a new connection; the whole answer.
async fn plain_get(addr: SocketAddr) -> String {
    exchange(
        addr,
        "GET /plain HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
        |_| false,
    )
    .await
}

/// True once the text holds a whole head and a body containing `needle`.
fn body_contains(text: &str, needle: &str) -> bool {
    text.split_once("\r\n\r\n")
        .is_some_and(|(_, body)| body.contains(needle))
}

/// Counts what a WebSocket echo server did.
#[derive(Default)]
pub(crate) struct EchoStats {
    /// Handshakes completed (101 sent).
    pub(crate) handshakes: AtomicUsize,
    /// WebSocket connections that ended after a completed handshake.
    pub(crate) ended: AtomicUsize,
}

/// A real WebSocket echo server; returns its port.
pub(crate) async fn ws_echo_server() -> (u16, Arc<EchoStats>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let stats = Arc::new(EchoStats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let st = st.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                st.handshakes.fetch_add(1, SeqCst);
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
                st.ended.fetch_add(1, SeqCst);
            });
        }
    });
    (port, stats)
}

/// Why a WebSocket handshake through remora did not open a tunnel.
#[derive(Debug)]
struct Refusal {
    /// The HTTP status remora answered instead of 101, if it answered.
    status: Option<u16>,
    /// Its `x-remora-error` marker.
    marker: String,
    error: String,
}

/// A WebSocket handshake through remora (bounded to 5 s).
async fn ws_connect(addr: SocketAddr) -> Result<Ws, Refusal> {
    let stream = TcpStream::connect(addr).await.expect("connect to remora");
    let handshake = tokio_tungstenite::client_async(format!("ws://{addr}/chat"), stream);
    match timeout(Duration::from_secs(5), handshake).await {
        Err(_) => panic!("the WebSocket handshake through remora did not end within 5 s"),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(resp))) => Err(Refusal {
            status: Some(resp.status().as_u16()),
            marker: resp
                .headers()
                .get("x-remora-error")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            error: String::from_utf8_lossy(resp.body().as_deref().unwrap_or(&[])).into_owned(),
        }),
        Ok(Err(other)) => Err(Refusal {
            status: None,
            marker: String::new(),
            error: other.to_string(),
        }),
    }
}

/// A WebSocket tunnel through remora that must open.
async fn ws_open(addr: SocketAddr) -> Ws {
    ws_connect(addr).await.unwrap_or_else(|r| {
        panic!(
            "WebSocket handshake through remora failed: status {:?}, marker {:?}: {}",
            r.status, r.marker, r.error
        )
    })
}

/// Sends `text` and expects it echoed back (within 5 s).
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned()))
        .await
        .unwrap_or_else(|e| panic!("sending {text:?} on the tunnel: {e}"));
    match timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(msg))) => assert_eq!(msg.to_text().unwrap_or_default(), text, "echo"),
        other => panic!("no echo of {text:?}; the tunnel gave {other:?}"),
    }
}

/// Closes a tunnel from the client side and waits (bounded) for the close to finish.
async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    let _ = timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Ok when the tunnel ends (end of stream, an error, or a Close frame) within `limit`.
async fn ends_within(ws: &mut Ws, limit: Duration) -> Result<(), String> {
    match timeout(limit, ws.next()).await {
        Err(_) => Err(format!("the tunnel was still open after {limit:?}")),
        Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => Ok(()),
        Ok(Some(Ok(other))) => Err(format!("got {other:?} instead of the end of the tunnel")),
    }
}

/// Polls (every 20 ms, up to `limit`) until `counter` reaches `want`.
pub(crate) async fn counter_reaches(counter: &AtomicUsize, want: usize, limit: Duration) -> bool {
    let tries = limit.as_millis() / 20;
    for _ in 0..tries {
        if counter.load(SeqCst) >= want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    counter.load(SeqCst) >= want
}

// ---------------------------------------------------------------------------------------
// Which upgrades are tunnelled
// ---------------------------------------------------------------------------------------

/// An `Upgrade: h2c` request is not a tunnel: it goes upstream as a plain request with
/// `Upgrade`, `HTTP2-Settings` and the `upgrade` token of `Connection` removed, and the
/// client gets the upstream's 200.
#[tokio::test]
async fn h2c_upgrade_is_not_tunnelled() {
    let up = Upstream::start("h2c-upstream").await;
    let p = proxy_to(&up).await;
    let answer = exchange(
        p.addr,
        "GET / HTTP/1.1\r\nhost: svc\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        |t| body_contains(t, "h2c-upstream"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert!(body_contains(&answer, "h2c-upstream"), "{answer:?}");
    let seen = up.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let headers = &seen[0].headers;
    assert!(
        !headers.contains_key("upgrade"),
        "the upstream got `upgrade`: {headers:?}"
    );
    assert!(
        !headers.contains_key("http2-settings"),
        "the upstream got `http2-settings`: {headers:?}"
    );
    let upgrade_token = headers.get_all("connection").iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("upgrade")
    });
    assert!(
        !upgrade_token,
        "the upstream got an `upgrade` Connection token: {headers:?}"
    );
}

/// An HTTP/1.1 upstream that records every request head it receives (lowercased) and
/// answers each with `200 ok`.
async fn recording_upstream() -> (u16, Arc<Mutex<Vec<String>>>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let rec = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut got: Vec<u8> = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head: Vec<u8> = got.drain(..end).collect();
                    rec.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&head).to_lowercase());
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (port, heads)
}

/// Whether a (lowercased) request head has a `name:` line whose value contains `token`.
fn head_has(head: &str, name: &str, token: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(n, v)| n.trim() == name && v.contains(token))
    })
}

/// An upgrade the route does not list (`foo`) goes upstream as a plain request without
/// `upgrade`; once the route lists it (`upgrade_configs: [{ upgrade_type: foo }]`) the
/// upstream receives `upgrade: foo`.
#[tokio::test]
async fn an_unlisted_upgrade_is_stripped_and_a_listed_one_passes() {
    let request = "GET /x HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: foo\r\n\r\n";

    let (port, heads) = recording_upstream().await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    let answer = exchange(p.addr, request, |t| body_contains(t, "ok")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let head = heads
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a request upstream");
    assert!(
        !head.lines().any(|l| l.starts_with("upgrade:")),
        "an unlisted upgrade reached the upstream:\n{head}"
    );
    assert!(
        !head_has(&head, "connection", "upgrade"),
        "the `upgrade` Connection token reached the upstream:\n{head}"
    );

    let (port, heads) = recording_upstream().await;
    let p = proxy(&config(
        &one_route("cluster: up, upgrade_configs: [{ upgrade_type: foo }]"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    let answer = exchange(p.addr, request, |t| body_contains(t, "ok")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    let head = heads
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a request upstream");
    assert!(
        head_has(&head, "upgrade", "foo"),
        "a listed upgrade lost its `upgrade: foo`:\n{head}"
    );
    assert!(
        head_has(&head, "connection", "upgrade"),
        "a listed upgrade lost its `connection: upgrade`:\n{head}"
    );
}

/// `upgrade_configs: [{ upgrade_type: websocket, enabled: false }]` turns WebSocket off for
/// the route: the handshake through remora gets no 101 and the upstream never completes one.
#[tokio::test]
async fn websocket_can_be_disabled_per_route() {
    let (port, stats) = ws_echo_server().await;
    let p = proxy(&ws_config(
        "",
        ", upgrade_configs: [{ upgrade_type: websocket, enabled: false }]",
        "",
        port,
    ))
    .await;
    match ws_connect(p.addr).await {
        Ok(_) => panic!("a WebSocket tunnel opened on a route with WebSocket disabled"),
        Err(refusal) => assert_ne!(refusal.status, Some(101), "{refusal:?}"),
    }
    assert_eq!(
        stats.handshakes.load(SeqCst),
        0,
        "the upstream completed a WebSocket handshake"
    );
}

// ---------------------------------------------------------------------------------------
// A tunnel is a connection on both sides
// ---------------------------------------------------------------------------------------

/// A tunnel holds its listener's `max_connections` slot and stays in
/// `remora_downstream_connections_active` until it closes.
#[tokio::test]
async fn tunnels_count_against_max_connections() {
    let (port, _stats) = ws_echo_server().await;
    let p = proxy(&ws_config(", max_connections: 2", "", "", port)).await;
    let mut a = ws_open(p.addr).await;
    let mut b = ws_open(p.addr).await;
    echo(&mut a, "a1").await;
    echo(&mut b, "b1").await;
    assert_eq!(
        sample_or_zero(p.admin, DOWNSTREAM_ACTIVE).await,
        2.0,
        "two open tunnels are two downstream connections"
    );

    let third = plain_get(p.addr).await;
    assert!(
        !third.starts_with("HTTP/1.1 200"),
        "a third connection was served while two tunnels held both slots: {third:?}"
    );
    assert_eq!(sample_or_zero(p.admin, DOWNSTREAM_ACTIVE).await, 2.0);

    // Once one tunnel closes, its slot serves new connections again.
    close(a).await;
    let mut served = false;
    for _ in 0..100 {
        if plain_get(p.addr).await.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a closed tunnel never gave its slot back");
    echo(&mut b, "b2").await;
    close(b).await;
}

/// A tunnel holds its cluster's `circuit_breakers.max_connections` slot and stays in
/// `remora_upstream_connections_active` until it closes.
#[tokio::test]
async fn a_tunnel_counts_as_an_upstream_connection() {
    let (port, stats) = ws_echo_server().await;
    let p = proxy(&ws_config(
        "",
        "",
        ", circuit_breakers: { max_connections: 1 }",
        port,
    ))
    .await;
    let mut a = ws_open(p.addr).await;
    echo(&mut a, "one").await;
    assert_eq!(
        sample_or_zero(p.admin, UPSTREAM_ACTIVE_WS).await,
        1.0,
        "an open tunnel is an open upstream connection"
    );

    match ws_connect(p.addr).await {
        Ok(_) => panic!("a second tunnel opened past `circuit_breakers.max_connections: 1`"),
        Err(refusal) => {
            assert_eq!(refusal.status, Some(503), "{refusal:?}");
            assert_eq!(refusal.marker, "overflow", "{refusal:?}");
        }
    }
    assert_eq!(stats.handshakes.load(SeqCst), 1);
    echo(&mut a, "still open").await;

    // Once it closes, the slot is free for the next tunnel.
    close(a).await;
    let mut next = None;
    for _ in 0..100 {
        if let Ok(ws) = ws_connect(p.addr).await {
            next = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut next = next.expect("a closed tunnel never gave its upstream connection slot back");
    echo(&mut next, "next").await;
    close(next).await;
}

/// A tunnel with traffic stays open past the listener's `idle_timeout`; once no bytes move
/// either way for that long it is closed (both ends).
#[tokio::test]
async fn an_idle_tunnel_is_closed_after_the_idle_timeout() {
    let (port, stats) = ws_echo_server().await;
    let p = proxy(&ws_config(", idle_timeout: 500ms", "", "", port)).await;
    let mut ws = ws_open(p.addr).await;
    // Busy for 1.5 s, three idle timeouts: never idle for 500 ms, so never closed.
    for i in 0..15 {
        echo(&mut ws, &format!("tick {i}")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats.ended.load(SeqCst), 0, "a busy tunnel was closed");
    // Now silent.
    if let Err(why) = ends_within(&mut ws, Duration::from_secs(3)).await {
        panic!("an idle tunnel outlived idle_timeout 500ms: {why}");
    }
    assert!(
        counter_reaches(&stats.ended, 1, Duration::from_secs(3)).await,
        "the upstream side of the idle tunnel was not closed"
    );
}

/// Shutdown drains tunnels too: it waits for them, and at the drain timeout reports them
/// as still open and closes them.
#[tokio::test]
async fn shutdown_closes_tunnels_at_the_drain_timeout() {
    let (port, stats) = ws_echo_server().await;
    let Proxy { app, addr, .. } = proxy(&ws_config("", "", "", port)).await;
    let mut ws = ws_open(addr).await;
    echo(&mut ws, "before shutdown").await;
    let left = timeout(
        Duration::from_secs(10),
        app.shutdown(Duration::from_millis(500)),
    )
    .await
    .expect("shutdown returned");
    assert_eq!(
        left, 1,
        "the open tunnel is a connection still open at the timeout"
    );
    if let Err(why) = ends_within(&mut ws, Duration::from_secs(2)).await {
        panic!("the tunnel survived shutdown: {why}");
    }
    assert!(
        counter_reaches(&stats.ended, 1, Duration::from_secs(2)).await,
        "the upstream side of the tunnel survived shutdown"
    );
}

// ---------------------------------------------------------------------------------------
// Requests an upstream dropped unprocessed are sent again
// ---------------------------------------------------------------------------------------

/// An HTTP/1.1 upstream that answers the first request on each connection (`first`, kept
/// alive) and drops the connection, unanswered, as soon as a second request's bytes arrive:
/// it closed the idle connection just as the request was written. Counts connections.
async fn drops_the_second_request() -> (u16, Arc<AtomicUsize>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            count.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: keep-alive\r\n\r\nfirst",
                )
                .await
                .is_err()
                {
                    return;
                }
                // The next request's first bytes (or the end): drop without a word.
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (port, accepted)
}

/// A GET written to a pooled connection the upstream closes without answering (the
/// keep-alive race) is sent again on a fresh connection, with no retry policy.
#[tokio::test]
async fn the_keep_alive_race_is_resent_on_a_fresh_connection() {
    let (port, accepted) = drops_the_second_request().await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], ""),
    ))
    .await;
    let cl = client();
    for round in 1..=3 {
        for which in ["first", "second"] {
            if round > 1 || which == "second" {
                // The race's premise, not a synchronisation: the pooled connection has sat
                // idle long enough (over remora's 1 s) for an upstream's keep-alive timer to
                // close it just as the next request is written.
                tokio::time::sleep(Duration::from_millis(1100)).await;
            }
            let r = timeout(Duration::from_secs(10), get(&cl, p.addr, "svc", "/", &[]))
                .await
                .unwrap_or_else(|_| panic!("round {round}, {which} GET: no answer within 10 s"));
            assert_eq!(
                (r.status.as_u16(), r.body.as_str()),
                (200, "first"),
                "round {round}, {which} GET: {}",
                r.header("x-remora-error")
            );
        }
        // Every request after the very first lands on a pooled connection that is then
        // dropped, and is sent again on a new one: two new connections per round.
        assert_eq!(accepted.load(SeqCst), 2 * round, "round {round}");
    }
}

/// What the hand-written HTTP/2 upstream saw.
#[derive(Default)]
struct GoawayStats {
    connections: AtomicUsize,
    /// Streams answered with a 200, over all connections.
    answered: AtomicUsize,
    /// The first connection saw three streams before answering.
    first_saw_three: AtomicBool,
}

/// Reads one HTTP/2 frame: (type, flags, stream id, payload).
async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await?;
    Ok((head[3], head[4], stream, payload))
}

/// One HTTP/2 frame on the wire.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

const SETTINGS: u8 = 4;
const PING: u8 = 6;
const HEADERS: u8 = 1;
const GOAWAY: u8 = 7;
const ACK: u8 = 0x1;
const END_STREAM_END_HEADERS: u8 = 0x5;
/// HPACK: `:status: 200`, index 8 of the static table.
const STATUS_200: [u8; 1] = [0x88];

/// A minimal h2c (prior knowledge) upstream. Its first connection waits (up to 5 s) for
/// three requests, answers the lowest stream, sends GOAWAY naming that stream as the last
/// processed (the others were refused unprocessed), and closes ~200 ms later. Every later
/// connection answers every request at once with 200.
async fn goaway_upstream() -> (u16, Arc<GoawayStats>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let stats = Arc::new(GoawayStats::default());
    let st = stats.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = socket.accept().await {
            let first = st.connections.fetch_add(1, SeqCst) == 0;
            let st = st.clone();
            tokio::spawn(async move {
                let _ = serve_h2(s, first, st).await;
            });
        }
    });
    (port, stats)
}

async fn serve_h2(mut s: TcpStream, first: bool, st: Arc<GoawayStats>) -> std::io::Result<()> {
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await?;
    if preface != *b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        return Ok(());
    }
    s.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut streams = Vec::new();
    loop {
        let (kind, flags, id, payload) = if first {
            match tokio::time::timeout_at(deadline, read_frame(&mut s)).await {
                // Three requests never came: drop the connection; the test reports it.
                Err(_) => return Ok(()),
                Ok(read) => read?,
            }
        } else {
            read_frame(&mut s).await?
        };
        match kind {
            SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).await?,
            PING if flags & ACK == 0 => s.write_all(&frame(PING, ACK, 0, &payload)).await?,
            HEADERS if first => {
                if !streams.contains(&id) {
                    streams.push(id);
                }
                if streams.len() == 3 {
                    break;
                }
            }
            HEADERS => {
                s.write_all(&frame(HEADERS, END_STREAM_END_HEADERS, id, &STATUS_200))
                    .await?;
                st.answered.fetch_add(1, SeqCst);
            }
            // DATA, PRIORITY, RST_STREAM, WINDOW_UPDATE, CONTINUATION, acks: nothing to do.
            _ => {}
        }
    }
    // First connection, three streams open: answer the lowest, refuse the rest by GOAWAY.
    st.first_saw_three.store(true, SeqCst);
    let last = *streams.iter().min().expect("three streams");
    s.write_all(&frame(HEADERS, END_STREAM_END_HEADERS, last, &STATUS_200))
        .await?;
    st.answered.fetch_add(1, SeqCst);
    let mut goaway = last.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
    s.write_all(&frame(GOAWAY, 0, 0, &goaway)).await?;
    // Keep the socket open a little (reading and ignoring), then close it.
    let _ = timeout(Duration::from_millis(200), async {
        while read_frame(&mut s).await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Streams an HTTP/2 upstream refuses by GOAWAY (above its last processed stream id) were
/// never processed: remora sends them again on a new connection, even without a retry
/// policy and even for a POST.
#[tokio::test]
async fn requests_refused_by_an_upstream_goaway_are_resent() {
    let (port, stats) = goaway_upstream().await;
    let p = proxy(&config(
        &one_route("cluster: up"),
        &cluster("up", &[(port, 1)], "    protocol: http2\n"),
    ))
    .await;
    let addr = p.addr;
    // Three client connections at once; the upstream holds them all until it has seen all
    // three on its first connection.
    let tasks: Vec<_> = ["GET", "GET", "POST"]
        .into_iter()
        .enumerate()
        .map(|(i, method)| {
            tokio::spawn(async move {
                let req = Request::builder()
                    .method(method)
                    .uri(format!("http://{addr}/r{i}"))
                    .header("host", "svc")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                match timeout(Duration::from_secs(20), send(&client(), req)).await {
                    Ok(a) => (
                        a.status.as_u16(),
                        format!("{method} {}: {}", a.header("x-remora-error"), a.body),
                    ),
                    Err(_) => (0, format!("{method}: no answer within 20 s")),
                }
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    assert!(
        stats.first_saw_three.load(SeqCst),
        "the three requests did not all reach the upstream's first connection: {results:?}"
    );
    for (status, why) in &results {
        assert_eq!(*status, 200, "{why} (all: {results:?})");
    }
    assert!(
        stats.connections.load(SeqCst) >= 2,
        "the refused streams were not sent on a new connection"
    );
    assert_eq!(
        stats.answered.load(SeqCst),
        3,
        "each request processed exactly once"
    );
}

/// A WebSocket handshake the upstream never answers ends at the route timeout (504), and
/// that outcome is recorded: after `consecutive_5xx` of them the endpoint is ejected, as it
/// would be for plain requests.
#[tokio::test]
async fn handshakes_that_time_out_count_against_the_endpoint() {
    // Accepts and never answers.
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = socket.accept().await {
            held.push(s);
        }
    });
    let p = proxy(&ws_config(
        "",
        ", timeout: 200ms",
        ", outlier_detection: { consecutive_5xx: 2, base_ejection_time: 30s, max_ejection_percent: 100 }",
        port,
    ))
    .await;
    for _ in 0..2 {
        let answer = exchange(
            p.addr,
            "GET /chat HTTP/1.1\r\nhost: svc\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            |t| t.contains("\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 504"), "{answer:?}");
    }
    let listing = get(&client(), p.admin, "a", "/clusters", &[]).await.body;
    let listing: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        listing["clusters"][0]["endpoints"][0]["breaker"], "open",
        "{listing}"
    );
}
