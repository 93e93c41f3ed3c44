//! Weighted splits and load-balancing policies, measured through the proxy.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;

async fn tally(p: &Proxy, n: usize, headers: &[(&str, &str)]) -> HashMap<String, usize> {
    let cl = client();
    let mut counts = HashMap::new();
    for _ in 0..n {
        let r = get(&cl, p.addr, "svc", "/", headers).await;
        assert_eq!(r.status, 200, "{}", r.body);
        *counts.entry(r.body).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn weighted_clusters_split_90_10_within_one_percent_over_10000_requests() {
    let (v1, v2) = (Upstream::start("v1").await, Upstream::start("v2").await);
    let routes =
        one_route("weighted_clusters: [{ name: v1, weight: 90 }, { name: v2, weight: 10 }]");
    let clusters = [
        cluster("v1", &[(v1.port(), 1)], ""),
        cluster("v2", &[(v2.port(), 1)], ""),
    ]
    .join("\n");
    let p = proxy(&config(&routes, &clusters)).await;
    let counts = tally(&p, 10_000, &[]).await;
    let share = counts["v2"] as f64 / 10_000.0;
    assert!((0.09..=0.11).contains(&share), "{counts:?}");
    // The split is a smooth schedule, so it is in fact exact per cycle.
    assert_eq!(counts["v2"], 1000, "{counts:?}");
}

#[tokio::test]
async fn round_robin_endpoint_weights_3_to_1_hold() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let clusters = cluster(
        "c",
        &[(a.port(), 3), (b.port(), 1)],
        "    lb_policy: round_robin\n",
    );
    let p = proxy(&config(&one_route("cluster: c"), &clusters)).await;
    let counts = tally(&p, 400, &[]).await;
    assert_eq!((counts["a"], counts["b"]), (300, 100));
}

#[tokio::test]
async fn random_respects_weights() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let clusters = cluster(
        "c",
        &[(a.port(), 3), (b.port(), 1)],
        "    lb_policy: random\n",
    );
    let p = proxy(&config(&one_route("cluster: c"), &clusters)).await;
    let counts = tally(&p, 2000, &[]).await;
    let share = counts["a"] as f64 / 2000.0;
    // 0.75 expected; ±0.05 is over 5 standard deviations.
    assert!((0.70..=0.80).contains(&share), "{counts:?}");
}

#[tokio::test]
async fn ring_hash_keeps_a_key_on_one_endpoint_and_spreads_keys() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let eps: Vec<(u16, u32)> = ups.iter().map(|u| (u.port(), 1)).collect();
    let clusters = cluster(
        "c",
        &eps,
        "    lb_policy: ring_hash\n    hash_on: { header: x-user }\n",
    );
    let p = proxy(&config(&one_route("cluster: c"), &clusters)).await;
    let cl = client();
    let mut owners = HashMap::new();
    for user in 0..60 {
        let id = format!("user-{user}");
        let first = get(&cl, p.addr, "svc", "/", &[("x-user", &id)]).await.body;
        for _ in 0..3 {
            let again = get(&cl, p.addr, "svc", "/", &[("x-user", &id)]).await.body;
            assert_eq!(again, first, "key {id} moved");
        }
        *owners.entry(first).or_insert(0) += 1;
    }
    assert_eq!(owners.len(), 3, "every endpoint owns some keys: {owners:?}");
}

#[tokio::test]
async fn least_request_steers_away_from_a_slow_endpoint() {
    let (fast, slow) = (Upstream::start("fast").await, Upstream::start("slow").await);
    slow.set_delay(Duration::from_millis(300));
    let clusters = cluster(
        "c",
        &[(fast.port(), 1), (slow.port(), 1)],
        "    lb_policy: least_request\n",
    );
    let p = proxy(&config(&one_route("cluster: c"), &clusters)).await;
    let cl = client();
    // 40 requests, 8 at a time: requests pile up on the slow endpoint, so picks avoid it.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (cl, addr) = (cl.clone(), p.addr);
        tasks.push(tokio::spawn(async move {
            let mut bodies = Vec::new();
            for _ in 0..5 {
                bodies.push(get(&cl, addr, "svc", "/", &[]).await.body);
            }
            bodies
        }));
    }
    let mut slow_hits = 0;
    for t in tasks {
        slow_hits += t.await.unwrap().iter().filter(|b| *b == "slow").count();
    }
    assert!(slow_hits < 14, "slow endpoint got {slow_hits} of 40");
}

#[tokio::test]
async fn strict_dns_cluster_resolves_localhost() {
    let up = Upstream::start("dns").await;
    let clusters = format!(
        "  - name: d\n    type: strict_dns\n    dns_refresh_rate: 1s\n    endpoints: [{{ address: \"localhost:{}\" }}]\n",
        up.port()
    );
    let p = proxy(&config(&one_route("cluster: d"), &clusters)).await;
    let listing = get(&client(), p.admin, "a", "/clusters", &[]).await.body;
    assert!(
        listing.contains(&format!("\"127.0.0.1:{}\"", up.port())),
        "localhost resolved into the endpoint list: {listing}"
    );
    // localhost may also resolve to ::1, where nothing listens; round robin over at most
    // two addresses sends at least every other request to 127.0.0.1.
    let cl = client();
    let mut ok = 0;
    for _ in 0..6 {
        if get(&cl, p.addr, "svc", "/", &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert!(ok >= 3, "only {ok} of 6 reached the upstream");
}
