//! What the upstream receives and what the client gets back: forwarding headers and pooling.

use http::Request;

use crate::support::*;

#[tokio::test]
async fn forwarding_headers_follow_the_design() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let cl = client();
    let r = get(
        &cl,
        p.addr,
        "orders.svc:8080",
        "/a",
        &[
            ("x-forwarded-for", "10.1.2.3"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "drop me"),
            ("keep-alive", "timeout=5"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = &up.seen()[0];
    let h = &seen.headers;
    assert_eq!(h["host"], "orders.svc:8080", "authority kept");
    assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(
        h["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    assert_eq!(
        h["b3"],
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
    );
    assert!(h.get("x-hop").is_none());
    assert!(h.get("keep-alive").is_none());
    let id = h["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 36, "generated request id {id}");

    // A request id from the client is kept; without x-forwarded-for the client IP starts it.
    get(&cl, p.addr, "svc", "/b", &[("x-request-id", "abc-123")]).await;
    assert_eq!(up.seen()[1].headers["x-request-id"], "abc-123");
    assert_eq!(up.seen()[1].headers["x-forwarded-for"], "127.0.0.1");

    // An absolute-form request: its authority replaces Host (RFC 9112 §3.2.2) and the
    // upstream gets the origin form.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    raw.write_all(
        b"GET http://abs.example:9000/c?q=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    raw.read_to_end(&mut answer).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    let seen = &up.seen()[2];
    assert_eq!(seen.headers["host"], "abs.example:9000");
    assert_eq!(seen.uri, "/c?q=1");
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let cl = client();
    for _ in 0..50 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    }
    assert_eq!(up.hits(), 50);
    assert_eq!(
        up.connections(),
        1,
        "sequential requests share one upstream connection"
    );
}

#[tokio::test]
async fn h2c_client_to_http1_upstream_and_http1_client_to_h2c_upstream() {
    let up = Upstream::start("up").await;
    let clusters = [
        cluster("h1", &[(up.port(), 1)], ""),
        cluster("h2", &[(up.port(), 1)], "    protocol: http2\n"),
    ]
    .join("\n");
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - { match: { prefix: /to-h2 }, cluster: h2 }
          - { match: { prefix: / }, cluster: h1 }
"#;
    let p = proxy(&config(routes, &clusters)).await;
    let r = send(
        &h2_client(),
        Request::get(format!("http://{}/to-h1", p.addr))
            .body(Default::default())
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let r = get(&client(), p.addr, "svc", "/to-h2", &[]).await;
    assert_eq!(r.status, 200);
    let seen = up.seen();
    assert_eq!(seen[0].version, http::Version::HTTP_11);
    assert_eq!(seen[1].version, http::Version::HTTP_2);
    assert_eq!(seen[1].uri, format!("http://svc/to-h2"));
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched_and_methods_are_kept() {
    let up = Upstream::start("up").await;
    up.set_status(503);
    let p = proxy_to(&up).await;
    let cl = client();
    let req = Request::delete(format!("http://{}/thing", p.addr))
        .header("host", "svc")
        .body(Default::default())
        .unwrap();
    let r = send(&cl, req).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "up", "the upstream's own body");
    assert_eq!(r.header("x-remora-error"), "", "not a local reply");
    assert_eq!(up.seen()[0].method, http::Method::DELETE);
    let upstream_5xx = metric(
        p.admin,
        "remora_upstream_requests_total{cluster=\"up\",code_class=\"5xx\"}",
    )
    .await;
    assert_eq!(upstream_5xx, 1.0);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_and_stops_accepting() {
    let up = Upstream::start("up").await;
    up.set_delay(std::time::Duration::from_millis(500));
    let p = proxy_to(&up).await;
    let addr = p.addr;
    let in_flight: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get(&client(), addr, "svc", "/", &[]).await.status }))
        .collect();
    // All five have reached the upstream: they are in flight when the shutdown begins.
    wait_until("5 requests reach the upstream", || up.hits() == 5).await;
    let shutdown = tokio::spawn(p.app.shutdown(std::time::Duration::from_secs(5)));
    for r in in_flight {
        assert_eq!(r.await.unwrap(), 200);
    }
    shutdown.await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after drain"
    );
}
