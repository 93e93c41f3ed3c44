//! Arbitrary requests → route matching against the demo's table: never a panic, and the
//! route picked agrees with its own predicates (path, methods).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use remora::router::PathMatch;
use remora::snapshot::Snapshot;

fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        let text = remora::demo::DEMO_CONFIG
            .replace("{{V1_PORT}}", "18081")
            .replace("{{V2_PORT}}", "18082");
        let raw = remora::config::parse(&text, "demo.yaml").expect("demo config");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        let origin = remora::config::compile::Origin {
            version: 1,
            source: "fuzz".into(),
            hash: String::new(),
            written: remora::config::Written::text(&text),
        };
        // A static, not a leaked box: LeakSanitizer reports the latter when the run ends.
        static METRICS: OnceLock<remora::metrics::Metrics> = OnceLock::new();
        let metrics = METRICS.get_or_init(remora::metrics::Metrics::new);
        remora::config::compile::compile(raw, origin, metrics, None)
    })
}

// Input: method, authority, path and `name:value` headers, separated by newlines.
fuzz_target!(|data: &[u8]| {
    let snapshot = snapshot();
    let table = snapshot
        .routes(&snapshot.listeners[0])
        .expect("a route table");
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let Ok(method) = http::Method::from_bytes(lines.next().unwrap_or("GET").as_bytes()) else {
        return;
    };
    let authority = lines.next().unwrap_or_default();
    let path = lines.next().unwrap_or("/");
    let mut headers = http::HeaderMap::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
    if let Some((_, route)) = table.find(authority, &method, path, &headers) {
        match &route.path {
            PathMatch::Prefix(p) => assert!(path.starts_with(p.as_str())),
            PathMatch::Exact(p) => assert_eq!(path, p),
            PathMatch::Regex(r) => assert!(r.is_match(path)),
        }
        assert!(route.methods.is_empty() || route.methods.contains(&method));
    }
});
