//! Retries, budgets, circuit breakers, outlier detection, health checks, the keep-alive race.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::*;

fn route_with(extra: &str) -> String {
    format!(
        "      - name: all\n        domains: [\"*\"]\n        routes:\n          - match: {{ prefix: / }}\n            cluster: c\n{extra}"
    )
}

fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn half_failing_upstream_is_served_by_retries_within_budget() {
    let up = Upstream::start("flaky").await;
    up.fail_every(2);
    let routes = route_with(
        "            retry_policy: { retry_on: [5xx], num_retries: 3, backoff: { base_interval: 1ms, max_interval: 5ms } }\n",
    );
    // Every other attempt fails, so each request needs one retry: a budget of 100% of
    // requests (plus the floor) is what this load needs, and the test checks it is kept.
    let clusters = cluster(
        "c",
        &[(up.port(), 1)],
        "    retry_budget: { ratio: 1.0, min_retries_per_second: 10, window: 10s }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    let mut ok = 0;
    for _ in 0..2000 {
        if get(&cl, p.addr, "svc", "/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 1998, "{ok} of 2000 succeeded");
    let retries = metric(
        p.admin,
        "remora_upstream_retries_total{cluster=\"c\",reason=\"5xx\"}",
    )
    .await;
    // Every request but the first fails once, so exactly one retry each.
    assert_eq!(retries, 1999.0);
    let exhausted = metric(
        p.admin,
        "remora_retry_budget_exhausted_total{cluster=\"c\"}",
    )
    .await;
    assert_eq!(exhausted, 0.0);
    // The upstream saw which attempt each was.
    let attempts: Vec<String> = up
        .seen()
        .iter()
        .take(4)
        .map(|s| {
            s.headers["x-remora-attempt-count"]
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    // The first request's first attempt is the upstream's first, which succeeds; from then
    // on every request fails once and succeeds on its second attempt.
    assert_eq!(attempts, ["1", "1", "2", "1"]);
}

#[tokio::test]
async fn an_exhausted_budget_returns_the_upstream_answer_and_is_counted() {
    let up = Upstream::start("down").await;
    up.set_status(503);
    let routes = route_with("            retry_policy: { retry_on: [5xx], num_retries: 1 }\n");
    let clusters = cluster(
        "c",
        &[(up.port(), 1)],
        "    retry_budget: { ratio: 0.0, min_retries_per_second: 1, window: 10s }\n    circuit_breakers: { max_retries: 100 }\n",
    );
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    for _ in 0..30 {
        let r = get(&cl, p.addr, "svc", "/", &[]).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "down", "the upstream's own answer");
    }
    // Budget: 1/s over 10 s = 10 retries; the other 20 were refused.
    let retries = metric(
        p.admin,
        "remora_upstream_retries_total{cluster=\"c\",reason=\"5xx\"}",
    )
    .await;
    let exhausted = metric(
        p.admin,
        "remora_retry_budget_exhausted_total{cluster=\"c\"}",
    )
    .await;
    assert_eq!(retries, 10.0);
    assert_eq!(exhausted, 20.0);
    assert_eq!(up.hits(), 40);
}

#[tokio::test]
async fn post_is_not_retried_on_503_but_is_retried_on_connect_failure() {
    let up = Upstream::start("up").await;
    up.set_status(503);
    let routes = route_with("            retry_policy: { retry_on: [5xx], num_retries: 2 }\n");
    let p = proxy(&config(&routes, &cluster("c", &[(up.port(), 1)], ""))).await;
    let post = |addr| {
        Request::post(format!("http://{addr}/orders"))
            .header("host", "svc")
            .body(Full::new(Bytes::from_static(b"{\"order\":1}")))
            .unwrap()
    };
    let r = send(&client(), post(p.addr)).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        up.hits(),
        1,
        "a POST that reached the upstream is not repeated"
    );

    // Connect failure on the first endpoint: the POST never left, so it goes to the next.
    let good = Upstream::start("good").await;
    let clusters = cluster("c", &[(dead_port(), 1), (good.port(), 1)], "");
    let p = proxy(&config(&routes, &clusters)).await;
    for _ in 0..4 {
        let r = send(&client(), post(p.addr)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_eq!(good.hits(), 4);
    let seen = &good.seen()[0];
    assert_eq!(seen.method, http::Method::POST);
    let retried = metric(
        p.admin,
        "remora_upstream_retries_total{cluster=\"c\",reason=\"connect_failure\"}",
    )
    .await;
    // Round robin alternates and each retry takes the next pick, so after the first
    // request every first attempt lands on the dead endpoint: every connect failure was
    // retried, and there were three or four of them.
    let refused = metric(
        p.admin,
        "remora_upstream_connect_failures_total{cluster=\"c\"}",
    )
    .await;
    assert_eq!(retried, refused);
    assert!((3.0..=4.0).contains(&retried), "{retried}");
}

#[tokio::test]
async fn a_large_body_streams_once_and_is_not_retried() {
    let up = Upstream::start("up").await;
    up.set_status(503);
    let routes = route_with(
        "            retry_policy: { retry_on: [5xx], num_retries: 2, retry_non_idempotent: true, replay_buffer_bytes: 1024 }\n",
    );
    let p = proxy(&config(&routes, &cluster("c", &[(up.port(), 1)], ""))).await;
    let small = Request::post(format!("http://{}/echo", p.addr))
        .header("host", "svc")
        .body(Full::new(Bytes::from(vec![b'a'; 512])))
        .unwrap();
    let r = send(&client(), small).await;
    assert_eq!(
        (r.status.as_u16(), r.body.len()),
        (503, 512),
        "replayed body echoed whole"
    );
    assert_eq!(up.hits(), 3, "small body: first try and two retries");
    let big = Request::post(format!("http://{}/echo", p.addr))
        .header("host", "svc")
        .body(Full::new(Bytes::from(vec![b'b'; 4096])))
        .unwrap();
    let r = send(&client(), big).await;
    assert_eq!((r.status.as_u16(), r.body.len()), (503, 4096));
    assert_eq!(up.hits(), 4, "large body: sent once");
    assert_eq!(
        metric(p.admin, "remora_retry_body_too_large_total{cluster=\"c\"}").await,
        1.0
    );
}

#[tokio::test]
async fn max_requests_10_with_50_concurrent_slow_requests_fails_40_fast() {
    let up = Upstream::start("slow").await;
    up.set_delay(Duration::from_millis(800));
    let clusters = cluster(
        "c",
        &[(up.port(), 1)],
        "    circuit_breakers: { max_requests: 10 }\n",
    );
    let p = proxy(&config(&route_with(""), &clusters)).await;
    let addr = p.addr;
    let started = Instant::now();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                // Let the first ten take their slots before the rest arrive.
                if i >= 10 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let t = Instant::now();
                let r = get(&client(), addr, "svc", "/", &[]).await;
                (
                    r.status.as_u16(),
                    r.header("x-remora-error").to_string(),
                    r.header("x-remora-overloaded").to_string(),
                    t.elapsed(),
                )
            })
        })
        .collect();
    let mut ok = 0;
    let mut overflow = 0;
    for t in tasks {
        let (status, marker, overloaded, took) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert_eq!((marker.as_str(), overloaded.as_str()), ("overflow", "true"));
                assert!(
                    took < Duration::from_millis(500),
                    "overflow is fast: {took:?}"
                );
                overflow += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, overflow), (10, 40));
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        metric(
            p.admin,
            "remora_circuit_breaker_overflow_total{cluster=\"c\",resource=\"requests\"}"
        )
        .await,
        40.0
    );
}

#[tokio::test]
async fn a_hard_down_endpoint_is_ejected_then_returns_through_half_open() {
    let (a, b, bad) = (
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("bad").await,
    );
    bad.set_status(503);
    let clusters = cluster(
        "c",
        &[(a.port(), 1), (b.port(), 1), (bad.port(), 1)],
        "    outlier_detection: { consecutive_5xx: 3, base_ejection_time: 1s, max_ejection_percent: 50 }\n",
    );
    let p = proxy(&config(&route_with(""), &clusters)).await;
    let cl = client();
    for _ in 0..30 {
        get(&cl, p.addr, "svc", "/", &[]).await;
    }
    assert_eq!(bad.hits(), 3, "ejected after 3 consecutive 5xx");
    let ejections = metric(
        p.admin,
        "remora_outlier_ejections_total{cluster=\"c\",reason=\"consecutive_5xx\"}",
    )
    .await;
    assert_eq!(ejections, 1.0);
    assert_eq!(
        metric(
            p.admin,
            "remora_cluster_endpoints{cluster=\"c\",state=\"ejected\"}"
        )
        .await,
        1.0
    );
    let clusters_json = get(&cl, p.admin, "a", "/clusters", &[]).await.body;
    assert!(
        clusters_json.contains("\"breaker\": \"open\""),
        "{clusters_json}"
    );

    // It recovers; after the ejection time a probe goes through and closes the breaker.
    bad.set_status(200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..30 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    }
    assert!(bad.hits() >= 3 + 6, "back in rotation: {} hits", bad.hits());
    assert_eq!(
        metric(
            p.admin,
            "remora_cluster_endpoints{cluster=\"c\",state=\"healthy\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn a_failing_health_check_removes_an_endpoint_within_interval_times_threshold() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let clusters = cluster(
        "c",
        &[(a.port(), 1), (b.port(), 1)],
        "    health_check: { path: /healthz, interval: 200ms, timeout: 100ms, unhealthy_threshold: 2, healthy_threshold: 1 }\n",
    );
    let p = proxy(&config(&route_with(""), &clusters)).await;
    let cl = client();
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.set_status(503);
    let failed_at = Instant::now();
    // interval × threshold = 400 ms, plus jitter and one check in flight.
    let mut removed_after = None;
    while failed_at.elapsed() < Duration::from_secs(2) {
        let counts = metric(
            p.admin,
            "remora_cluster_endpoints{cluster=\"c\",state=\"unhealthy\"}",
        )
        .await;
        if counts == 1.0 {
            removed_after = Some(failed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let removed_after = removed_after.expect("b never marked unhealthy");
    assert!(
        removed_after < Duration::from_millis(1000),
        "{removed_after:?}"
    );
    let hits_before = b.hits();
    for _ in 0..20 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.body, "a");
    }
    // Health checks still reach b; traffic does not.
    let checks_only = b.seen()[hits_before..].iter().all(|s| s.uri == "/healthz");
    assert!(checks_only);

    b.set_status(200);
    let mut back = false;
    for _ in 0..100 {
        if get(&cl, p.addr, "svc", "/", &[]).await.body == "b" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "b returned after passing checks");
    assert!(
        metric(
            p.admin,
            "remora_health_checks_total{cluster=\"c\",result=\"failure\"}"
        )
        .await
            >= 2.0
    );
}

#[tokio::test]
async fn per_try_timeout_moves_a_hung_attempt_to_another_endpoint() {
    let (hung, fast) = (Upstream::start("hung").await, Upstream::start("fast").await);
    hung.set_delay(Duration::from_secs(5));
    let routes = route_with(
        "            timeout: 3s\n            retry_policy: { retry_on: [5xx], num_retries: 1, per_try_timeout: 200ms }\n",
    );
    let clusters = cluster("c", &[(hung.port(), 1), (fast.port(), 1)], "");
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    for _ in 0..6 {
        let t = Instant::now();
        let r = get(&cl, p.addr, "svc", "/", &[]).await;
        assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "fast"));
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
    assert!(hung.hits() >= 1);
    assert_eq!(
        metric(
            p.admin,
            "remora_upstream_retries_total{cluster=\"c\",reason=\"per_try_timeout\"}"
        )
        .await,
        hung.hits() as f64,
        "every attempt at the hung endpoint timed out and moved on"
    );
}

/// An HTTP/1.1 server that answers with keep-alive, then closes the connection shortly
/// after, as servers with short idle timeouts do.
async fn closes_idle_connections() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = socket.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok",
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                // Close without a word: the proxy's pooled connection is now dead.
            });
        }
    });
    (port, served)
}

/// A pooled connection the upstream closed while it sat idle is noticed before reuse (the
/// pool's closed/ready check, or hyper handing the request back unsent). The race itself,
/// a close that arrives as the request is written, is
/// `tunnels::the_keep_alive_race_is_resent_on_a_fresh_connection`.
#[tokio::test]
async fn a_pooled_connection_closed_while_idle_is_not_used() {
    let (port, served) = closes_idle_connections().await;
    // No retry policy at all: the race is handled underneath.
    let p = proxy(&config(&route_with(""), &cluster("c", &[(port, 1)], ""))).await;
    let cl = client();
    for i in 0..30 {
        let r = get(&cl, p.addr, "svc", "/", &[]).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        // Sometimes right after the close, sometimes a little later.
        tokio::time::sleep(Duration::from_millis(if i % 2 == 0 { 25 } else { 60 })).await;
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 30);
}

#[tokio::test]
async fn a_reset_mid_body_reaches_the_client_as_a_broken_body_and_remora_keeps_serving() {
    let up = Upstream::start("up").await;
    let p = proxy(&config(
        &route_with(""),
        &cluster("c", &[(up.port(), 1)], ""),
    ))
    .await;
    let cl = client();
    let resp = cl
        .request(
            Request::get(format!("http://{}/reset", p.addr))
                .header("host", "svc")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.into_body().collect().await.is_err(),
        "the break is passed on"
    );
    let after = get(&cl, p.addr, "svc", "/", &[]).await;
    assert_eq!(
        after.status,
        200,
        "{} {}",
        after.header("x-remora-error"),
        after.body
    );
}

#[tokio::test]
async fn retried_requests_leave_no_in_flight_count_behind() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    a.set_status(503);
    b.set_status(503);
    let routes = route_with("            retry_policy: { retry_on: [5xx], num_retries: 1 }\n");
    let clusters = cluster("c", &[(a.port(), 1), (b.port(), 1)], "");
    let p = proxy(&config(&routes, &clusters)).await;
    let cl = client();
    for _ in 0..5 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 503);
    }
    // Each request's count is released when its record is written, just after the client
    // has read the response: wait for that, then check that nothing is left.
    let mut listing = serde_json::Value::Null;
    for _ in 0..100 {
        listing =
            serde_json::from_str(&get(&cl, p.admin, "a", "/clusters", &[]).await.body).unwrap();
        let endpoints = listing["clusters"][0]["endpoints"].as_array().unwrap();
        if endpoints.iter().all(|ep| ep["active_requests"] == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("in-flight counts left behind: {listing}");
}
