//! Admin endpoints, metrics and the access log.

use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn metrics_count_exactly_the_requests_sent() {
    let up = Upstream::start("up").await;
    let routes = r#"
      - name: all
        domains: ["*"]
        routes:
          - { match: { prefix: /missing }, direct_response: { status: 404 } }
          - { match: { prefix: / }, cluster: up }
"#;
    let p = proxy(&config(routes, &cluster("up", &[(up.port(), 1)], ""))).await;
    let cl = client();
    for _ in 0..37 {
        get(&cl, p.addr, "svc", "/ok", &[]).await;
    }
    for _ in 0..5 {
        get(&cl, p.addr, "svc", "/missing", &[]).await;
    }
    // The record is written when the response body ends, just after the client read it.
    wait_metric(
        p.admin,
        "remora_downstream_request_duration_seconds_count{listener=\"main\"}",
        42.0,
    )
    .await;
    let m = |s: &'static str| metric(p.admin, s);
    assert_eq!(
        m("remora_downstream_requests_total{code_class=\"2xx\",listener=\"main\"}").await,
        37.0
    );
    assert_eq!(
        m("remora_downstream_requests_total{code_class=\"4xx\",listener=\"main\"}").await,
        5.0
    );
    assert_eq!(
        m("remora_upstream_requests_total{cluster=\"up\",code_class=\"2xx\"}").await,
        37.0
    );
    assert_eq!(
        m("remora_downstream_request_duration_seconds_count{listener=\"main\"}").await,
        42.0
    );
    assert_eq!(
        m("remora_upstream_request_duration_seconds_count{cluster=\"up\"}").await,
        37.0
    );
    assert_eq!(
        m("remora_upstream_connections_active{cluster=\"up\"}").await,
        1.0
    );
    assert_eq!(
        m("remora_downstream_connections_active{listener=\"main\"}").await,
        1.0
    );
    assert_eq!(
        m("remora_cluster_endpoints{cluster=\"up\",state=\"healthy\"}").await,
        1.0
    );
    assert_eq!(
        m("remora_config_reloads_total{result=\"success\",source=\"startup\"}").await,
        1.0
    );
}

#[tokio::test]
async fn ready_live_config_and_clusters() {
    let up = Upstream::start("up").await;
    let routes =
        "      - { name: all, domains: [\"*\"], routes: [{ match: { prefix: / }, cluster: up }] }";
    let p = proxy(&config(routes, &cluster("up", &[(up.port(), 2)], ""))).await;
    let cl = client();
    assert_eq!(get(&cl, p.admin, "a", "/ready", &[]).await.status, 200);
    assert_eq!(get(&cl, p.admin, "a", "/live", &[]).await.status, 200);
    let config: serde_json::Value =
        serde_json::from_str(&get(&cl, p.admin, "a", "/config", &[]).await.body).unwrap();
    assert_eq!(config["version"], 1);
    assert_eq!(config["source"], "test.yaml");
    assert_eq!(config["config"]["clusters"][0]["name"], "up");
    assert_eq!(config["hash"].as_str().unwrap().len(), 16);
    let clusters: serde_json::Value =
        serde_json::from_str(&get(&cl, p.admin, "a", "/clusters", &[]).await.body).unwrap();
    let ep = &clusters["clusters"][0]["endpoints"][0];
    assert_eq!(ep["address"], format!("127.0.0.1:{}", up.port()));
    assert_eq!(ep["weight"], 2);
    assert_eq!(get(&cl, p.admin, "a", "/nope", &[]).await.status, 404);
}

#[tokio::test]
async fn access_log_writes_one_json_line_per_request() {
    let up = Upstream::start("up").await;
    let dir = std::env::temp_dir().join(format!("remora-al-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let _ = std::fs::remove_file(&log);
    let yaml = format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc, access_log: {{ path: \"{}\" }} }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ name: r1, match: {{ prefix: / }}, cluster: up }}] }}\n\
         clusters:\n  - {{ name: up, endpoints: [{{ address: \"127.0.0.1:{}\" }}] }}\n",
        log.display(),
        up.port()
    );
    let p = proxy(&yaml).await;
    let cl = client();
    get(
        &cl,
        p.addr,
        "svc.local",
        "/first",
        &[("x-request-id", "rid-1")],
    )
    .await;
    get(&cl, p.addr, "svc.local", "/second", &[]).await;
    let mut lines = Vec::new();
    for _ in 0..50 {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        lines = text.lines().map(str::to_owned).collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["method"], "GET");
    assert_eq!(first["authority"], "svc.local");
    assert_eq!(first["path"], "/first");
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "r1");
    assert_eq!(first["cluster"], "up");
    assert_eq!(first["upstream"], format!("127.0.0.1:{}", up.port()));
    assert_eq!(first["request_id"], "rid-1");
    assert_eq!(first["bytes_sent"], 2);
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    assert_eq!(second["request_id"].as_str().unwrap().len(), 36);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A cluster's series live as long as the cluster: an idle cluster shows its endpoint
/// gauges but no traffic series (they come with its first request, as Envoy's deferred
/// cluster stats), a changed cluster keeps counting where it was, and a cluster the config
/// drops takes every one of its series, rare-event ones included, out of `/metrics`.
#[tokio::test]
async fn cluster_series_live_and_leave_with_their_cluster() {
    let up = Upstream::start("up").await;
    let two = |weight: u32| {
        config(
            &one_route("cluster: up, retry_policy: { retry_on: [5xx], num_retries: 1 }"),
            &format!(
                "{}{}",
                cluster("up", &[(up.port(), weight)], ""),
                cluster("spare", &[(up.port(), 1)], "")
            ),
        )
    };
    let p = proxy(&two(1)).await;
    let cl = client();
    let series = |text: &str, cluster: &str| -> Vec<String> {
        let label = format!("cluster=\"{cluster}\"");
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&label))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
            .collect()
    };
    let metrics = || async { get(&client(), p.admin, "admin", "/metrics", &[]).await.body };

    let text = metrics().await;
    let spare = series(&text, "spare");
    assert!(
        spare
            .iter()
            .all(|s| s.starts_with("remora_cluster_endpoints{"))
            && spare.len() == 4,
        "an idle cluster has its endpoint gauges only: {spare:#?}"
    );

    for _ in 0..3 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    }
    let sample = "remora_upstream_requests_total{cluster=\"up\",code_class=\"2xx\"}";
    wait_metric(p.admin, sample, 3.0).await;
    // A rare-event series, made by the event: every other answer a 503, retried.
    up.fail_every(2);
    for _ in 0..2 {
        assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    }
    up.fail_every(0);
    let retried = "remora_upstream_retries_total{cluster=\"up\",reason=\"5xx\"}";
    assert!(metric(p.admin, retried).await >= 1.0);

    let before = metric(p.admin, sample).await;
    // Changed (a weight): rebuilt, still counting on.
    assert!(matches!(
        p.app.apply(two(2), "test.yaml").await,
        remora::reloader::Outcome::Applied { .. }
    ));
    assert_eq!(get(&cl, p.addr, "svc", "/", &[]).await.status, 200);
    wait_metric(p.admin, sample, before + 1.0).await;

    // Dropped: every series named for it leaves.
    let only_spare = config(
        &one_route("cluster: spare"),
        &cluster("spare", &[(up.port(), 1)], ""),
    );
    assert!(matches!(
        p.app.apply(only_spare, "test.yaml").await,
        remora::reloader::Outcome::Applied { .. }
    ));
    let text = metrics().await;
    assert_eq!(series(&text, "up"), Vec::<String>::new(), "{text}");
    assert!(!series(&text, "spare").is_empty());

    // A config that brings a cluster but cannot take effect (its new listener's address is
    // taken) leaves none of that cluster's series behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ghost = format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc }}\n\
         \x20 - {{ name: extra, address: \"{}\", route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n{}\n\
         clusters:\n{}{}",
        taken.local_addr().unwrap(),
        one_route("cluster: spare"),
        cluster(
            "spare",
            &[(up.port(), 1), (taken.local_addr().unwrap().port(), 1)],
            ""
        ),
        cluster("ghost", &[(up.port(), 1)], "")
    );
    let outcome = p.app.apply(ghost, "test.yaml").await;
    assert!(
        matches!(outcome, remora::reloader::Outcome::Failed(_)),
        "{outcome:?}"
    );
    let text = metrics().await;
    assert_eq!(series(&text, "ghost"), Vec::<String>::new(), "{text}");
    // Nor does it touch the gauges of the running clusters it changed: `spare` runs with
    // one endpoint still, not the two of the config that failed.
    let endpoints: f64 = text
        .lines()
        .filter(|l| l.starts_with("remora_cluster_endpoints{cluster=\"spare\""))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum();
    assert_eq!(endpoints, 1.0, "{text}");
}
