//! Active health checks: probe every endpoint on an interval (HTTP GET or TCP connect);
//! after `unhealthy_threshold` failures in a row an endpoint leaves the balancer, after
//! `healthy_threshold` passes it returns. A pass also ends an outlier ejection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Cluster;
use crate::config::raw::{HealthCheckProtocol, RawHealthCheck};

/// Health check settings with defaults applied.
#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    pub protocol: HealthCheckProtocol,
    pub path: String,
    pub host: String,
    /// Empty: any 2xx.
    pub expected_statuses: Vec<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

impl HealthCheckConfig {
    pub fn new(raw: &RawHealthCheck, cluster: &str) -> HealthCheckConfig {
        HealthCheckConfig {
            protocol: raw.protocol,
            path: raw.path.clone().unwrap_or_else(|| "/".into()),
            host: raw.host.clone().unwrap_or_else(|| cluster.into()),
            expected_statuses: raw.expected_statuses.clone(),
            interval: raw.interval.map_or(Duration::from_secs(5), |d| d.0),
            timeout: raw.timeout.map_or(Duration::from_secs(1), |d| d.0),
            unhealthy_threshold: raw.unhealthy_threshold.unwrap_or(3).max(1),
            healthy_threshold: raw.healthy_threshold.unwrap_or(2).max(1),
        }
    }

    fn passes(&self, status: StatusCode) -> bool {
        if self.expected_statuses.is_empty() {
            status.is_success()
        } else {
            self.expected_statuses.contains(&status.as_u16())
        }
    }
}

#[derive(Default)]
struct Streak {
    passes: u32,
    failures: u32,
}

/// Checks the cluster's endpoints until the cluster is dropped.
pub fn spawn(cluster: Weak<Cluster>, cfg: HealthCheckConfig) {
    tokio::spawn(async move {
        let mut streaks: HashMap<SocketAddr, Streak> = HashMap::new();
        loop {
            let Some(c) = cluster.upgrade() else { return };
            let endpoints = c.members().endpoints.clone();
            // A TCP check offers the cluster's ALPN (an h2-only endpoint refuses
            // `http/1.1`); an HTTP check sends an HTTP/1.1 GET, so it offers `http/1.1`.
            let tls = c.tls.as_ref().map(|t| {
                t.as_ref().ok().map(|t| {
                    let connector = match cfg.protocol {
                        HealthCheckProtocol::Tcp => t.connector.clone(),
                        HealthCheckProtocol::Http => t.http1.clone(),
                    };
                    (connector, t.name.clone())
                })
            });
            drop(c);
            let checks: Vec<_> = endpoints
                .iter()
                .map(|e| {
                    let (cfg, addr, tls) = (cfg.clone(), e.address, tls.clone());
                    tokio::spawn(async move { (addr, check(&cfg, addr, tls.as_ref()).await) })
                })
                .collect();
            let mut results = Vec::with_capacity(checks.len());
            for c in checks {
                if let Ok(r) = c.await {
                    results.push(r);
                }
            }
            let Some(c) = cluster.upgrade() else { return };
            for (addr, passed) in results {
                let Some(ep) = endpoints.iter().find(|e| e.address == addr) else {
                    continue;
                };
                c.metrics.health_check(passed);
                let streak = streaks.entry(addr).or_default();
                if passed {
                    streak.passes += 1;
                    streak.failures = 0;
                } else {
                    streak.failures += 1;
                    streak.passes = 0;
                }
                let healthy = ep.state.is_healthy();
                if healthy && streak.failures >= cfg.unhealthy_threshold {
                    c.set_health(ep, false);
                } else if !healthy && streak.passes >= cfg.healthy_threshold {
                    c.set_health(ep, true);
                }
                if passed {
                    c.health_check_passed(ep);
                }
            }
            streaks.retain(|a, _| endpoints.iter().any(|e| e.address == *a));
            drop(c);
            // Up to 10% jitter, so that many sidecars do not probe in lockstep.
            let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
            tokio::time::sleep(cfg.interval + jitter).await;
        }
    });
}

/// A TLS cluster's connector and server name; `None` inside when the
/// cluster's TLS files did not load (every probe fails).
type ProbeTls = Option<(
    tokio_rustls::TlsConnector,
    rustls::pki_types::ServerName<'static>,
)>;

async fn check(cfg: &HealthCheckConfig, addr: SocketAddr, tls: Option<&ProbeTls>) -> bool {
    tokio::time::timeout(cfg.timeout, probe(cfg, addr, tls))
        .await
        .unwrap_or(false)
}

/// A TCP connect, then (a TLS cluster, as Envoy does) the TLS handshake, then for HTTP
/// checks a GET.
async fn probe(cfg: &HealthCheckConfig, addr: SocketAddr, tls: Option<&ProbeTls>) -> bool {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return false;
    };
    match tls {
        None if cfg.protocol == HealthCheckProtocol::Tcp => true,
        None => http_probe(cfg, stream).await,
        Some(None) => false,
        Some(Some((connector, name))) => {
            let Ok(stream) = connector.connect(name.clone(), stream).await else {
                return false;
            };
            cfg.protocol == HealthCheckProtocol::Tcp || http_probe(cfg, stream).await
        }
    }
}

async fn http_probe<S>(cfg: &HealthCheckConfig, stream: S) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = Request::get(cfg.path.as_str())
        .header(http::header::HOST, cfg.host.as_str())
        .header(http::header::USER_AGENT, "remora-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new());
    let Ok(req) = req else { return false };
    match sender.send_request(req).await {
        Ok(resp) => cfg.passes(resp.status()),
        Err(_) => false,
    }
}
