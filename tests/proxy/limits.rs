//! Listener limits: header size and count, header timeout, idle timeout, max connections.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

fn config_with_listener(listener_extra: &str, port: u16) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc{listener_extra} }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: up }}] }}\n\
         clusters:\n  - {{ name: up, endpoints: [{{ address: \"127.0.0.1:{port}\" }}] }}\n"
    )
}

/// Writes raw bytes and reads until the peer closes or `limit` passes.
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8], limit: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_or_too_many_headers_get_431() {
    let up = Upstream::start("up").await;
    let p = proxy(&config_with_listener("", up.port())).await;
    let big = "x".repeat(70 * 1024);
    let req = format!("GET / HTTP/1.1\r\nhost: svc\r\nx-big: {big}\r\n\r\n");
    let answer = raw_exchange(p.addr, req.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let mut many = String::from("GET / HTTP/1.1\r\nhost: svc\r\n");
    for i in 0..120 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(p.addr, many.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // A large but allowed head (40 KiB) is fine.
    let ok = format!(
        "GET / HTTP/1.1\r\nhost: svc\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "y".repeat(40 * 1024)
    );
    let answer = raw_exchange(p.addr, ok.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test]
async fn malformed_requests_get_400_not_a_hang() {
    let up = Upstream::start("up").await;
    let p = proxy(&config_with_listener("", up.port())).await;
    let answer = raw_exchange(p.addr, b"GARBAGE\r\n\r\n", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw_exchange(
        p.addr,
        b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "missing Host: {answer}");
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off_while_others_are_served() {
    let up = Upstream::start("up").await;
    let p = proxy(&config_with_listener(
        ", request_headers_timeout: 600ms",
        up.port(),
    ))
    .await;
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\nx-partial: ")
        .await
        .unwrap();
    let started = Instant::now();
    // Meanwhile, others are served.
    let cl = client();
    for _ in 0..5 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    let waited = started.elapsed();
    assert!(read.is_ok(), "slow client was never disconnected");
    assert!(
        waited >= Duration::from_millis(550),
        "cut off too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "cut off too late: {waited:?}"
    );

    // Keep-alive connections that sit idle between requests are not cut by this timeout.
    let mut ka = TcpStream::connect(p.addr).await.unwrap();
    for _ in 0..2 {
        ka.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = ka.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let up = Upstream::start("up").await;
    let p = proxy(&config_with_listener(", idle_timeout: 400ms", up.port())).await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed by remora")
        .unwrap();
    assert_eq!(n, 0, "EOF");
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn connections_past_max_connections_are_refused() {
    let up = Upstream::start("up").await;
    let p = proxy(&config_with_listener(", max_connections: 2", up.port())).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        held.push(s);
    }
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")
        .await;
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "the third connection got no answer");
    let overflow = metric(
        p.admin,
        "remora_downstream_connections_overflow_total{listener=\"main\"}",
    )
    .await;
    assert_eq!(overflow, 1.0);
    // Once one closes, new connections are served again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&client(), p.addr, "svc", "/", &[]).await.status, 200);
}
