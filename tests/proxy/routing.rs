//! Virtual hosts, route matches and route actions.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn header_host_method_and_path_routing_pick_the_right_cluster() {
    let (a, b, c) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    );
    let routes = r#"
      - name: api
        domains: ["api.example.com", "*.api.internal"]
        routes:
          - match: { prefix: /, headers: [{ name: x-canary, exact: "1" }] }
            cluster: b
          - match: { prefix: /, headers: [{ name: x-user, regex: "admin-[0-9]+" }] }
            cluster: c
          - match: { path: /exact, methods: [POST] }
            cluster: c
          - match: { regex: "/items/[0-9]+" }
            cluster: b
          - match: { prefix: /, headers: [{ name: x-debug, present: true, invert: true }] }
            cluster: a
      - name: other
        domains: ["other.*"]
        routes:
          - match: { prefix: / }
            cluster: c
"#;
    let clusters = [
        cluster("a", &[(a.port(), 1)], ""),
        cluster("b", &[(b.port(), 1)], ""),
        cluster("c", &[(c.port(), 1)], ""),
    ]
    .join("\n");
    let p = proxy(&config(routes, &clusters)).await;
    let cl = client();
    let host = "api.example.com";
    assert_eq!(get(&cl, p.addr, host, "/x", &[]).await.body, "a");
    assert_eq!(
        get(&cl, p.addr, host, "/x", &[("x-canary", "1")])
            .await
            .body,
        "b"
    );
    assert_eq!(
        get(&cl, p.addr, host, "/x", &[("x-canary", "2")])
            .await
            .body,
        "a"
    );
    assert_eq!(
        get(&cl, p.addr, host, "/x", &[("x-user", "admin-42")])
            .await
            .body,
        "c"
    );
    assert_eq!(
        get(&cl, p.addr, host, "/x", &[("x-user", "admin-4x")])
            .await
            .body,
        "a"
    );
    assert_eq!(get(&cl, p.addr, host, "/items/17", &[]).await.body, "b");
    assert_eq!(get(&cl, p.addr, host, "/items/17/x", &[]).await.body, "a");
    // Method matters: GET /exact falls through; POST /exact matches.
    assert_eq!(get(&cl, p.addr, host, "/exact", &[]).await.body, "a");
    let post = http::Request::post(format!("http://{}/exact", p.addr))
        .header("host", host)
        .body(Default::default())
        .unwrap();
    assert_eq!(send(&cl, post).await.body, "c");
    // Host routing: suffix wildcard, port ignored, prefix wildcard, case-insensitive.
    assert_eq!(
        get(&cl, p.addr, "v2.api.internal:8080", "/", &[])
            .await
            .body,
        "a"
    );
    assert_eq!(get(&cl, p.addr, "OTHER.example", "/", &[]).await.body, "c");
    // No virtual host, and a virtual host where no route matches: 404 no_route.
    let miss = get(&cl, p.addr, "nowhere", "/", &[]).await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.header("x-remora-error"), "no_route");
    let miss = get(&cl, p.addr, host, "/x", &[("x-debug", "1")]).await;
    assert_eq!(miss.status, 404);
}

#[tokio::test]
async fn direct_response_rewrites_and_header_edits() {
    let up = Upstream::start("up").await;
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - match: { path: /healthz }
            direct_response: { status: 418, body: "teapot" }
            response_headers_to_add: [{ name: x-direct, value: "yes" }]
          - match: { prefix: /old/ }
            cluster: up
            prefix_rewrite: /new/
            host_rewrite: backend.internal
            request_headers_to_add: [{ name: x-added, value: "1" }, { name: x-replaced, value: "new", append: false }]
            request_headers_to_remove: [x-secret]
            response_headers_to_add: [{ name: x-resp, value: "r" }]
            response_headers_to_remove: [x-upstream]
"#;
    let p = proxy(&config(routes, &cluster("up", &[(up.port(), 1)], ""))).await;
    let cl = client();
    let d = get(&cl, p.addr, "svc", "/healthz", &[]).await;
    assert_eq!((d.status.as_u16(), d.body.as_str()), (418, "teapot"));
    assert_eq!(d.header("x-direct"), "yes");
    assert_eq!(up.hits(), 0);

    let r = get(
        &cl,
        p.addr,
        "svc",
        "/old/thing?q=1",
        &[("x-secret", "s"), ("x-replaced", "old")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-resp"), "r");
    assert_eq!(r.header("x-upstream"), "", "removed from the response");
    let seen = &up.seen()[0];
    assert_eq!(seen.uri, "/new/thing?q=1");
    assert_eq!(seen.headers["host"], "backend.internal");
    assert_eq!(seen.headers["x-added"], "1");
    assert_eq!(seen.headers["x-replaced"], "new");
    assert!(seen.headers.get("x-secret").is_none());
}

#[tokio::test]
async fn route_timeout_gives_504_and_zero_disables_it() {
    let up = Upstream::start("slow").await;
    up.set_delay(Duration::from_millis(600));
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - match: { prefix: /fast-timeout }
            cluster: slow
            timeout: 200ms
          - match: { prefix: / }
            cluster: slow
            timeout: 0
"#;
    let p = proxy(&config(routes, &cluster("slow", &[(up.port(), 1)], ""))).await;
    let cl = client();
    let r = get(&cl, p.addr, "x", "/fast-timeout", &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-remora-error"), "upstream_timeout");
    let r = get(&cl, p.addr, "x", "/no-timeout", &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn unreachable_endpoint_gives_503_connect_failure() {
    // Bind then drop, so nothing listens on the port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let routes = "      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, cluster: gone }] }";
    let p = proxy(&config(routes, &cluster("gone", &[(port, 1)], ""))).await;
    let r = get(&client(), p.addr, "x", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-remora-error"), "upstream_connect_failure");
    // The body names the failure, not the endpoint (the log has that).
    assert_eq!(r.body, "the upstream connection failed\n");
    assert!(!r.body.contains(&port.to_string()), "{}", r.body);
    let failures = metric(
        p.admin,
        "remora_upstream_connect_failures_total{cluster=\"gone\"}",
    )
    .await;
    assert_eq!(failures, 1.0);
}
