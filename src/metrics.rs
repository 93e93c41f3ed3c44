//! Prometheus metrics: one registry, created at startup and passed in; per-listener and
//! per-cluster handles are resolved once at compile time so the hot path only bumps atomics.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: 0.5 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// `code_class` label values. `0`: no response was sent, because the client went away
/// first (Envoy's response code 0, "downstream disconnect").
const CODE_CLASSES: [&str; 6] = ["0", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// Index of a status code's class in [`CODE_CLASSES`].
fn class_index(status: u16) -> usize {
    if status == 0 {
        return 0;
    }
    (usize::from(status / 100)).clamp(1, 5)
}

/// Every metric remora exports. See the README for what each one means.
pub struct Metrics {
    registry: Registry,
    downstream_requests: IntCounterVec,
    downstream_duration: HistogramVec,
    downstream_connections_active: IntGaugeVec,
    downstream_connections_total: IntCounterVec,
    downstream_connections_overflow: IntCounterVec,
    local_replies: IntCounterVec,
    tls_handshakes: IntCounterVec,
    tls_handshake_failures: IntCounterVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    upstream_connections_active: IntGaugeVec,
    upstream_connect_failures: IntCounterVec,
    cluster_endpoints: IntGaugeVec,
    upstream_retries: IntCounterVec,
    retry_budget_exhausted: IntCounterVec,
    retry_body_too_large: IntCounterVec,
    breaker_overflow: IntCounterVec,
    outlier_ejections: IntCounterVec,
    health_checks: IntCounterVec,
    /// `remora_config_reloads_total{source,result}`.
    pub config_reloads: IntCounterVec,
    /// `remora_config_last_reload_success_timestamp_seconds`.
    pub config_last_success: prometheus::Gauge,
    /// `remora_tls_certificate_expiry_timestamp_seconds{owner,name}`: the leaf certificate in
    /// use by a listener or a cluster (client certificate).
    pub tls_certificate_expiry: prometheus::GaugeVec,
    /// `remora_runtime_tasks_alive`: tokio tasks alive, read at each scrape (for the soak: a
    /// leak of tasks shows as a slope).
    tasks_alive: prometheus::IntGauge,
    /// `remora_xds_connected`: 1 while the ADS stream is up.
    pub xds_connected: prometheus::IntGauge,
    /// `remora_xds_updates_total{type,result}`: responses ACKed or NACKed.
    pub xds_updates: IntCounterVec,
    /// `remora_xds_last_update_timestamp_seconds{type}`: when a type was last accepted.
    pub xds_last_update: prometheus::GaugeVec,
    /// `remora_xds_apply_duration_seconds{type}`: from a response's arrival to its verdict.
    pub xds_apply_duration: HistogramVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let config_last_success = prometheus::Gauge::new(
            "remora_config_last_reload_success_timestamp_seconds",
            "Unix time of the last config load that took effect.",
        )
        .expect("valid metric");
        r.register(Box::new(config_last_success.clone()))
            .expect("unique metric");
        let xds_connected = prometheus::IntGauge::new(
            "remora_xds_connected",
            "1 while the stream to the xDS control plane is up, else 0.",
        )
        .expect("valid metric");
        r.register(Box::new(xds_connected.clone()))
            .expect("unique metric");
        let tasks_alive = prometheus::IntGauge::new(
            "remora_runtime_tasks_alive",
            "Tasks alive in remora's async runtime, read at each scrape.",
        )
        .expect("valid metric");
        r.register(Box::new(tasks_alive.clone()))
            .expect("unique metric");
        let xds_last_update = prometheus::GaugeVec::new(
            Opts::new(
                "remora_xds_last_update_timestamp_seconds",
                "Unix time the last update of each xDS type was accepted.",
            ),
            &["type"],
        )
        .expect("valid metric");
        r.register(Box::new(xds_last_update.clone()))
            .expect("unique metric");
        let tls_certificate_expiry = prometheus::GaugeVec::new(
            Opts::new(
                "remora_tls_certificate_expiry_timestamp_seconds",
                "Unix time the certificate a listener serves, or a cluster presents, expires.",
            ),
            &["owner", "name"],
        )
        .expect("valid metric");
        r.register(Box::new(tls_certificate_expiry.clone()))
            .expect("unique metric");
        let m = Metrics {
            tls_certificate_expiry,
            tls_handshakes: counter(
                &r,
                "remora_tls_handshakes_total",
                "TLS handshakes on HTTPS listeners, by result (success, failure).",
                &["listener", "result"],
            ),
            tls_handshake_failures: counter(
                &r,
                "remora_tls_handshake_failures_total",
                "Failed TLS handshakes by owner (listener: a client's; cluster: to an endpoint), name and reason.",
                &["owner", "name", "reason"],
            ),
            xds_apply_duration: histogram(
                &r,
                "remora_xds_apply_duration_seconds",
                "Time from an xDS response's arrival to its ACK or NACK (conversion, validation, compile, swap).",
                &["type"],
            ),
            xds_connected,
            xds_last_update,
            xds_updates: counter(
                &r,
                "remora_xds_updates_total",
                "xDS responses answered, by type (lds, rds, cds, eds) and result (ack, nack).",
                &["type", "result"],
            ),
            downstream_requests: counter(
                &r,
                "remora_downstream_requests_total",
                "Requests received, by listener and response status class.",
                &["listener", "code_class"],
            ),
            downstream_duration: histogram(
                &r,
                "remora_downstream_request_duration_seconds",
                "Time from request headers received to response body sent.",
                &["listener"],
            ),
            downstream_connections_active: gauge(
                &r,
                "remora_downstream_connections_active",
                "Open client connections.",
                &["listener"],
            ),
            downstream_connections_total: counter(
                &r,
                "remora_downstream_connections_total",
                "Client connections accepted.",
                &["listener"],
            ),
            downstream_connections_overflow: counter(
                &r,
                "remora_downstream_connections_overflow_total",
                "Client connections closed at accept because max_connections was reached.",
                &["listener"],
            ),
            local_replies: counter(
                &r,
                "remora_local_replies_total",
                "Responses remora generated itself, by the x-remora-error marker.",
                &["listener", "reason"],
            ),
            upstream_requests: counter(
                &r,
                "remora_upstream_requests_total",
                "Requests sent to a cluster, by response status class.",
                &["cluster", "code_class"],
            ),
            upstream_duration: histogram(
                &r,
                "remora_upstream_request_duration_seconds",
                "Time from sending a request upstream to its response headers.",
                &["cluster"],
            ),
            upstream_connections_active: gauge(
                &r,
                "remora_upstream_connections_active",
                "Open connections to a cluster's endpoints.",
                &["cluster"],
            ),
            upstream_connect_failures: counter(
                &r,
                "remora_upstream_connect_failures_total",
                "Failed or timed-out connection attempts to a cluster's endpoints.",
                &["cluster"],
            ),
            cluster_endpoints: gauge(
                &r,
                "remora_cluster_endpoints",
                "Endpoints of a cluster, by state.",
                &["cluster", "state"],
            ),
            upstream_retries: counter(
                &r,
                "remora_upstream_retries_total",
                "Retries sent, by the condition that caused them.",
                &["cluster", "reason"],
            ),
            retry_budget_exhausted: counter(
                &r,
                "remora_retry_budget_exhausted_total",
                "Retries not sent because the retry budget or max_retries said no.",
                &["cluster"],
            ),
            retry_body_too_large: counter(
                &r,
                "remora_retry_body_too_large_total",
                "Retries not sent because the request body outgrew the replay buffer.",
                &["cluster"],
            ),
            breaker_overflow: counter(
                &r,
                "remora_circuit_breaker_overflow_total",
                "Requests failed fast because a circuit breaker threshold was reached.",
                &["cluster", "resource"],
            ),
            outlier_ejections: counter(
                &r,
                "remora_outlier_ejections_total",
                "Endpoints ejected by outlier detection, by reason.",
                &["cluster", "reason"],
            ),
            health_checks: counter(
                &r,
                "remora_health_checks_total",
                "Active health checks, by result.",
                &["cluster", "result"],
            ),
            config_reloads: counter(
                &r,
                "remora_config_reloads_total",
                "Config loads attempted, by source (startup, file, signal, api, xds) and result.",
                &["source", "result"],
            ),
            config_last_success,
            tasks_alive,
            registry: r,
        };
        // Every reload series exists from the start, so rate() and alerts see a zero.
        for kind in ["lds", "rds", "cds", "eds"] {
            for result in ["ack", "nack"] {
                m.xds_updates.with_label_values(&[kind, result]);
            }
        }
        for source in ["startup", "file", "signal", "api", "xds"] {
            for result in ["success", "failure"] {
                m.config_reloads.with_label_values(&[source, result]);
            }
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let alive = runtime.metrics().num_alive_tasks();
            self.tasks_alive
                .set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    pub fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            requests: CODE_CLASSES.map(|c| self.downstream_requests.with_label_values(&[name, c])),
            duration: self.downstream_duration.with_label_values(&[name]),
            connections_active: self
                .downstream_connections_active
                .with_label_values(&[name]),
            connections_total: self.downstream_connections_total.with_label_values(&[name]),
            connections_overflow: self
                .downstream_connections_overflow
                .with_label_values(&[name]),
            local_replies: self.local_replies.clone(),
            tls_failed: self.tls_handshakes.with_label_values(&[name, "failure"]),
            tls_failures: self.tls_handshake_failures.clone(),
            tls_expiry: self.tls_certificate_expiry.clone(),
            tls_ok: self.tls_handshakes.with_label_values(&[name, "success"]),
            name: name.to_string(),
        }
    }

    /// A cluster's handles. Its endpoint gauges exist from the start; its traffic series
    /// appear, as a set, with its first event (as Envoy's deferred cluster stats), so a mesh
    /// of thousands of idle clusters does not hold thousands of histograms.
    pub fn cluster(&self, name: &str) -> ClusterMetrics {
        ClusterMetrics(Arc::new(ClusterSeries {
            endpoints: ENDPOINT_STATES
                .map(|st| self.cluster_endpoints.with_label_values(&[name, st])),
            traffic: OnceLock::new(),
            vecs: ClusterVecs {
                requests: self.upstream_requests.clone(),
                duration: self.upstream_duration.clone(),
                connections_active: self.upstream_connections_active.clone(),
                connect_failures: self.upstream_connect_failures.clone(),
                endpoints: self.cluster_endpoints.clone(),
                retries: self.upstream_retries.clone(),
                budget_exhausted: self.retry_budget_exhausted.clone(),
                body_too_large: self.retry_body_too_large.clone(),
                overflow: self.breaker_overflow.clone(),
                ejections: self.outlier_ejections.clone(),
                health_checks: self.health_checks.clone(),
                tls_expiry: self.tls_certificate_expiry.clone(),
                tls_failures: self.tls_handshake_failures.clone(),
            },
            labelled: Mutex::new(BTreeSet::new()),
            removed: AtomicBool::new(false),
            name: name.to_string(),
        }))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A listener's handles.
#[derive(Clone)]
pub struct ListenerMetrics {
    requests: [IntCounter; 6],
    pub duration: Histogram,
    pub connections_active: IntGauge,
    pub connections_total: IntCounter,
    pub connections_overflow: IntCounter,
    local_replies: IntCounterVec,
    tls_failed: IntCounter,
    tls_failures: IntCounterVec,
    pub tls_ok: IntCounter,
    tls_expiry: prometheus::GaugeVec,
    name: String,
}

impl ListenerMetrics {
    /// The certificate this listener serves expires at `at` (Unix seconds).
    pub fn certificate_expires(&self, at: i64) {
        self.tls_expiry
            .with_label_values(&["listener", &self.name])
            .set(at as f64);
    }

    /// A client's TLS handshake failed, for `reason` (see [`crate::tls::failure_reason`]).
    pub fn tls_handshake_failure(&self, reason: &str) {
        self.tls_failed.inc();
        self.tls_failures
            .with_label_values(&["listener", &self.name, reason])
            .inc();
    }

    pub fn request(&self, status: u16, seconds: f64) {
        self.requests[class_index(status)].inc();
        self.duration.observe(seconds);
    }

    /// Counts a response remora made itself; rare, so the label lookup is fine here.
    pub fn local_reply(&self, reason: &str) {
        self.local_replies
            .with_label_values(&[&self.name, reason])
            .inc();
    }
}

/// The `state` values of `remora_cluster_endpoints`.
pub const ENDPOINT_STATES: [&str; 4] = ["healthy", "unhealthy", "ejected", "half_open"];

/// A cluster's handles, shared by its clones. Rare events resolve their labels when they
/// happen. [`ClusterMetrics::remove`] takes every series of a cluster the config dropped
/// out of `/metrics`.
#[derive(Clone)]
pub struct ClusterMetrics(Arc<ClusterSeries>);

struct ClusterSeries {
    endpoints: [IntGauge; 4],
    traffic: OnceLock<ClusterTraffic>,
    vecs: ClusterVecs,
    /// The second label of each rare-event series made so far (`(metric, label)`), so that
    /// removal finds them.
    labelled: Mutex<BTreeSet<(&'static str, String)>>,
    /// Set once the cluster left the config: late events make no series.
    removed: AtomicBool,
    name: String,
}

/// The series every request touches, made together on first use.
struct ClusterTraffic {
    requests: [IntCounter; 6],
    duration: Histogram,
    connections_active: IntGauge,
    connect_failures: IntCounter,
    budget_exhausted: IntCounter,
    body_too_large: IntCounter,
    health_checks: [IntCounter; 2],
}

/// The metric families a cluster's series live in.
struct ClusterVecs {
    requests: IntCounterVec,
    duration: HistogramVec,
    connections_active: IntGaugeVec,
    connect_failures: IntCounterVec,
    endpoints: IntGaugeVec,
    retries: IntCounterVec,
    budget_exhausted: IntCounterVec,
    body_too_large: IntCounterVec,
    overflow: IntCounterVec,
    ejections: IntCounterVec,
    health_checks: IntCounterVec,
    tls_expiry: prometheus::GaugeVec,
    tls_failures: IntCounterVec,
}

const HEALTH_RESULTS: [&str; 2] = ["success", "failure"];

impl ClusterMetrics {
    fn traffic(&self) -> &ClusterTraffic {
        // After `remove`, this is already made (and detached), so it makes no series.
        let s = &*self.0;
        s.traffic.get_or_init(|| {
            let name = s.name.as_str();
            let v = &s.vecs;
            ClusterTraffic {
                requests: CODE_CLASSES.map(|c| v.requests.with_label_values(&[name, c])),
                duration: v.duration.with_label_values(&[name]),
                connections_active: v.connections_active.with_label_values(&[name]),
                connect_failures: v.connect_failures.with_label_values(&[name]),
                budget_exhausted: v.budget_exhausted.with_label_values(&[name]),
                body_too_large: v.body_too_large.with_label_values(&[name]),
                health_checks: HEALTH_RESULTS
                    .map(|r| v.health_checks.with_label_values(&[name, r])),
            }
        })
    }

    /// A series with a second label, made (and remembered for removal) unless the cluster
    /// is gone.
    fn labelled<M>(
        &self,
        metric: &'static str,
        label: &str,
        make: impl FnOnce(&ClusterVecs, &str) -> M,
    ) -> Option<M> {
        let s = &*self.0;
        let mut made = s.labelled.lock().expect("metrics lock");
        if s.removed.load(Ordering::Relaxed) {
            return None;
        }
        if !made.iter().any(|(m, l)| *m == metric && l == label) {
            made.insert((metric, label.to_string()));
        }
        Some(make(&s.vecs, &s.name))
    }

    /// A TLS handshake with an endpoint failed, for `reason` (see
    /// [`crate::tls::failure_reason`]).
    pub fn tls_handshake_failure(&self, reason: &str) {
        let series = self.labelled("tls_failures", reason, |v, name| {
            v.tls_failures.with_label_values(&["cluster", name, reason])
        });
        series.inspect(IntCounter::inc);
    }

    /// The client certificate this cluster presents expires at `at` (Unix seconds).
    pub fn certificate_expires(&self, at: i64) {
        let series = self.labelled("tls_expiry", "", |v, name| {
            v.tls_expiry.with_label_values(&["cluster", name])
        });
        if let Some(g) = series {
            g.set(at as f64);
        }
    }

    pub fn response(&self, status: u16, seconds: f64) {
        let t = self.traffic();
        t.requests[class_index(status)].inc();
        t.duration.observe(seconds);
    }

    /// `remora_upstream_connections_active` for this cluster.
    pub fn connections_active(&self) -> IntGauge {
        self.traffic().connections_active.clone()
    }

    pub fn connect_failure(&self) {
        self.traffic().connect_failures.inc();
    }

    pub fn budget_exhausted(&self) {
        self.traffic().budget_exhausted.inc();
    }

    pub fn body_too_large(&self) {
        self.traffic().body_too_large.inc();
    }

    /// Endpoint counts in the order of [`ENDPOINT_STATES`].
    pub fn set_endpoint_counts(&self, counts: [i64; 4]) {
        for (g, n) in self.0.endpoints.iter().zip(counts) {
            g.set(n);
        }
    }

    pub fn retry(&self, reason: &str) {
        let series = self.labelled("retries", reason, |v, name| {
            v.retries.with_label_values(&[name, reason])
        });
        series.inspect(IntCounter::inc);
    }

    pub fn overflow(&self, resource: &str) {
        let series = self.labelled("overflow", resource, |v, name| {
            v.overflow.with_label_values(&[name, resource])
        });
        series.inspect(IntCounter::inc);
    }

    pub fn ejection(&self, reason: &str) {
        let series = self.labelled("ejections", reason, |v, name| {
            v.ejections.with_label_values(&[name, reason])
        });
        series.inspect(IntCounter::inc);
    }

    pub fn health_check(&self, passed: bool) {
        self.traffic().health_checks[usize::from(!passed)].inc();
    }

    /// Takes every series of this cluster out of `/metrics`: the config no longer has it
    /// (a cluster that comes back starts from zero, as a new one does). Handles still held
    /// by requests in flight keep counting into series no one exports.
    pub fn remove(&self) {
        self.traffic();
        let s = &*self.0;
        let mut made = s.labelled.lock().expect("metrics lock");
        s.removed.store(true, Ordering::Relaxed);
        let (v, name) = (&s.vecs, s.name.as_str());
        for state in ENDPOINT_STATES {
            let _ = v.endpoints.remove_label_values(&[name, state]);
        }
        for class in CODE_CLASSES {
            let _ = v.requests.remove_label_values(&[name, class]);
        }
        let _ = v.duration.remove_label_values(&[name]);
        let _ = v.connections_active.remove_label_values(&[name]);
        let _ = v.connect_failures.remove_label_values(&[name]);
        let _ = v.budget_exhausted.remove_label_values(&[name]);
        let _ = v.body_too_large.remove_label_values(&[name]);
        for result in HEALTH_RESULTS {
            let _ = v.health_checks.remove_label_values(&[name, result]);
        }
        for (metric, label) in std::mem::take(&mut *made) {
            let label = label.as_str();
            let _ = match metric {
                "retries" => v.retries.remove_label_values(&[name, label]),
                "overflow" => v.overflow.remove_label_values(&[name, label]),
                "ejections" => v.ejections.remove_label_values(&[name, label]),
                "tls_failures" => v
                    .tls_failures
                    .remove_label_values(&["cluster", name, label]),
                _ => v.tls_expiry.remove_label_values(&["cluster", name]),
            };
        }
    }
}
