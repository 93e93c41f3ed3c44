//! TLS: HTTPS listeners (curl over HTTP/1.1 and HTTP/2), mTLS with SPIFFE principals,
//! authorization, XFCC, and TLS to upstreams (CA, SAN checks, client certificates).
//! Certificates are made at test time with rcgen.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tonic::codegen::{BoxFuture, Service};
use tonic::{Code, Request};
use tonic_prost::ProstCodec;

use crate::grpc::{echo_upstream, Msg};
use crate::support::*;
use crate::tunnels::{counter_reaches, ws_config, ws_echo_server};

/// A CA and the leaf certificates it signs, as PEM files in a directory of their own.
pub(crate) struct Pki {
    dir: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

impl Pki {
    pub(crate) fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("remora-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca_params,
            ca_key,
        }
    }

    pub(crate) fn ca(&self) -> String {
        self.dir.join("ca.pem").display().to_string()
    }

    /// A leaf for `dns` names and, if given, a URI SAN (a SPIFFE ID): (cert path, key path).
    pub(crate) fn leaf(&self, stem: &str, dns: &[&str], uri: Option<&str>) -> (String, String) {
        self.leaf_with(stem, dns, uri, |_| {})
    }

    /// The same, with the parameters adjusted (e.g. validity) before signing.
    fn leaf_with(
        &self,
        stem: &str,
        dns: &[&str],
        uri: Option<&str>,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        adjust(&mut params);
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// curl against `https://localhost:<port><path>` with the CA and extra arguments; returns
/// (exit success, HTTP status, body, http version).
fn curl(addr: SocketAddr, path: &str, ca: &str, extra: &[&str]) -> (bool, u16, String, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert", ca])
        .args(["--resolve", &format!("localhost:{}:127.0.0.1", addr.port())])
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://localhost:{}{path}", addr.port()))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut tail = tail.split(' ');
    let status = tail.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let version = tail.next().unwrap_or("").to_string();
    (out.status.success(), status, body.to_string(), version)
}

/// One HTTPS listener `main` in front of cluster `up`; `listener_tls` and `vhost_extra` are
/// inserted as flow-mapping entries.
fn https_config(listener_tls: &str, vhost_extra: &str, up: u16) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc, tls: {{ {listener_tls} }} }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"]{vhost_extra}, routes: [{{ match: {{ prefix: / }}, cluster: up }}] }}\n\
         clusters:\n  - {{ name: up, endpoints: [{{ address: \"127.0.0.1:{up}\" }}] }}\n"
    )
}

/// An HTTPS listener answers curl over HTTP/1.1 and, chosen by ALPN, HTTP/2.
#[tokio::test]
async fn https_over_http1_and_http2() {
    let pki = Pki::new("https");
    let (cert, key) = pki.leaf("server", &["localhost"], None);
    let up = Upstream::start("up").await;
    let p = proxy(&https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\""),
        "",
        up.port(),
    ))
    .await;
    let ca = pki.ca();
    let addr = p.addr;
    let (ok, status, body, version) =
        tokio::task::spawn_blocking(move || curl(addr, "/", &ca, &["--http1.1"]))
            .await
            .unwrap();
    assert!(ok && status == 200 && body == "up", "{status} {body}");
    assert_eq!(version, "1.1");
    let ca = pki.ca();
    let (ok, status, body, version) =
        tokio::task::spawn_blocking(move || curl(addr, "/", &ca, &["--http2"]))
            .await
            .unwrap();
    assert!(ok && status == 200 && body == "up", "{status} {body}");
    assert_eq!(version, "2");
    let seen = up.seen();
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
}

/// mTLS: no certificate, or one from another CA, fails the handshake; a certificate from the
/// CA with an admitted SPIFFE ID is served, its identity upstream in XFCC (a client-sent one
/// removed); an identity not admitted gets 403 `forbidden`.
#[tokio::test]
async fn mtls_principals_authorization_and_xfcc() {
    let pki = Pki::new("mtls");
    let other = Pki::new("other");
    let (cert, key) = pki.leaf(
        "server",
        &["localhost"],
        Some("spiffe://mesh.local/ns/shop/sa/inbound"),
    );
    let (web, web_key) = pki.leaf("web", &[], Some("spiffe://mesh.local/ns/shop/sa/web"));
    let (batch, batch_key) = pki.leaf("batch", &[], Some("spiffe://mesh.local/ns/jobs/sa/batch"));
    let (stranger, stranger_key) =
        other.leaf("web", &[], Some("spiffe://mesh.local/ns/shop/sa/web"));
    let up = Upstream::start("up").await;
    let p = proxy(&https_config(
        &format!(
            "cert_file: \"{cert}\", key_file: \"{key}\", client_ca_file: \"{}\"",
            pki.ca()
        ),
        ", authorization: { principals: [\"spiffe://mesh.local/ns/shop/sa/*\"] }",
        up.port(),
    ))
    .await;
    let addr = p.addr;
    let run = |args: Vec<String>| {
        let ca = pki.ca();
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(addr, "/", &ca, &refs)
        })
    };
    let (ok, _, _, _) = run(vec![]).await.unwrap();
    assert!(!ok, "served without a client certificate");
    let (ok, _, _, _) = run(vec![
        "--cert".into(),
        stranger,
        "--key".into(),
        stranger_key,
    ])
    .await
    .unwrap();
    assert!(!ok, "served a certificate from another CA");
    for reason in ["no_client_certificate", "unknown_ca"] {
        wait_metric(
            p.admin,
            &format!("remora_tls_handshake_failures_total{{name=\"main\",owner=\"listener\",reason=\"{reason}\"}}"),
            1.0,
        )
        .await;
    }
    let (ok, status, body, _) = run(vec![
        "--cert".into(),
        web,
        "--key".into(),
        web_key,
        "-H".into(),
        "x-forwarded-client-cert: By=spiffe://forged;URI=spiffe://mesh.local/ns/admin/sa/root"
            .into(),
    ])
    .await
    .unwrap();
    assert!(ok && status == 200 && body == "up", "{status} {body}");
    let xfcc = up.seen()[0].headers["x-forwarded-client-cert"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        xfcc.starts_with("By=spiffe://mesh.local/ns/shop/sa/inbound;Hash="),
        "{xfcc}"
    );
    assert!(
        xfcc.ends_with(";URI=spiffe://mesh.local/ns/shop/sa/web"),
        "{xfcc}"
    );
    assert!(
        !xfcc.contains("forged") && !xfcc.contains("admin"),
        "{xfcc}"
    );
    let (ok, status, body, _) = run(vec!["--cert".into(), batch, "--key".into(), batch_key])
        .await
        .unwrap();
    assert!(ok && status == 403, "{status} {body}");
    assert_eq!(up.hits(), 1, "a forbidden request reached the upstream");
}

/// TLS to the upstream: a second remora terminates HTTPS (requiring client certificates) in
/// front of the real upstream. The first checks the CA and the SPIFFE SAN and presents its
/// own certificate: served, its identity at the upstream. A SAN that does not match is a
/// connect failure, 503.
#[tokio::test]
async fn tls_to_the_upstream_with_san_checks_and_a_client_certificate() {
    let pki = Pki::new("upstream");
    let (backend_cert, backend_key) = pki.leaf(
        "backend",
        &[],
        Some("spiffe://mesh.local/ns/shop/sa/payments"),
    );
    let (front_cert, front_key) =
        pki.leaf("front", &[], Some("spiffe://mesh.local/ns/shop/sa/web"));
    let up = Upstream::start("payments").await;
    let backend = proxy(&https_config(
        &format!(
            "cert_file: \"{backend_cert}\", key_file: \"{backend_key}\", client_ca_file: \"{}\"",
            pki.ca()
        ),
        "",
        up.port(),
    ))
    .await;
    let front = |san: &str| {
        format!(
            "admin: {{ address: 127.0.0.1:0 }}\n\
             listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc }}\n\
             route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: payments }}] }}\n\
             clusters:\n  - name: payments\n    endpoints: [{{ address: \"{}\" }}]\n    tls: {{ ca_file: \"{}\", cert_file: \"{front_cert}\", key_file: \"{front_key}\", verify_subject_alt_names: [\"{san}\"] }}\n",
            backend.addr,
            pki.ca()
        )
    };
    let good = proxy(&front("spiffe://mesh.local/ns/shop/sa/payments")).await;
    let r = get(&client(), good.addr, "svc", "/", &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.body.as_str()),
        (200, "payments"),
        "{}",
        r.header("x-remora-error")
    );
    let xfcc = up.seen()[0].headers["x-forwarded-client-cert"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        xfcc.ends_with("URI=spiffe://mesh.local/ns/shop/sa/web"),
        "{xfcc}"
    );

    let wrong = proxy(&front("spiffe://mesh.local/ns/shop/sa/someone-else")).await;
    let r = get(&client(), wrong.addr, "svc", "/", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-remora-error"), "upstream_connect_failure");
    let sample = "remora_tls_handshake_failures_total{name=\"payments\",owner=\"cluster\",reason=\"san_mismatch\"}";
    assert_eq!(metric(wrong.admin, sample).await, 1.0);
    assert_eq!(up.hits(), 1);
}

/// A client-sent XFCC never passes, on a plain-text listener either.
#[tokio::test]
async fn a_client_sent_xfcc_is_removed() {
    let up = Upstream::start("up").await;
    let p = proxy_to(&up).await;
    let r = get(
        &client(),
        p.addr,
        "svc",
        "/",
        &[("x-forwarded-client-cert", "URI=spiffe://forged")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(!up.seen()[0].headers.contains_key("x-forwarded-client-cert"));
}

/// `remora validate` reads the TLS files: a missing key or a file without a certificate is a
/// located error.
#[test]
fn tls_files_are_checked_by_validation() {
    let pki = Pki::new("validate");
    let (cert, _) = pki.leaf("server", &["localhost"], None);
    let missing = Path::new(&pki.dir).join("nope.pem").display().to_string();
    let yaml = https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{missing}\""),
        "",
        1,
    );
    let errors = remora::config::parse(&yaml, "tls.yaml").expect_err("a missing key file");
    let text = errors.to_string();
    assert!(
        text.contains("listeners[0].tls") && text.contains("nope.pem"),
        "{text}"
    );
}

/// TLS settings that could never work are refused where they are written: an empty ALPN
/// list, a server name rustls cannot send, `auto` without TLS.
#[test]
fn unusable_tls_settings_are_located_errors() {
    let pki = Pki::new("settings");
    let (cert, key) = pki.leaf("server", &["localhost"], None);
    let yaml = https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\", alpn: []"),
        "",
        1,
    )
    .replace(
        "clusters:\n",
        &format!(
            "clusters:\n  - {{ name: bad-sni, endpoints: [{{ address: \"127.0.0.1:2\" }}], tls: {{ ca_file: \"{}\", sni: \"api.example.com:443\" }} }}\n  - {{ name: plain-auto, protocol: auto, endpoints: [{{ address: \"127.0.0.1:3\" }}] }}\n",
            pki.ca()
        ),
    );
    let text = remora::config::parse(&yaml, "tls.yaml")
        .expect_err("unusable settings")
        .to_string();
    for want in [
        "listeners[0].tls.alpn: must name at least one protocol",
        "clusters[0].tls.sni: `api.example.com:443` is not a valid TLS server name",
        "clusters[1].protocol: `auto` chooses by TLS ALPN",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
}

/// An expired certificate is refused with a located error; a valid one's expiry is exported.
#[tokio::test]
async fn an_expired_certificate_is_refused_and_expiry_is_exported() {
    let pki = Pki::new("expiry");
    let (old, old_key) = pki.leaf_with("old", &["localhost"], None, |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let yaml = https_config(
        &format!("cert_file: \"{old}\", key_file: \"{old_key}\""),
        "",
        1,
    );
    let errors = remora::config::parse(&yaml, "tls.yaml").expect_err("an expired certificate");
    assert!(errors.to_string().contains("expired"), "{errors}");

    let (cert, key) = pki.leaf_with("server", &["localhost"], None, |p| {
        p.not_after = rcgen::date_time_ymd(2040, 6, 1);
    });
    let up = Upstream::start("up").await;
    let p = proxy(&https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\""),
        "",
        up.port(),
    ))
    .await;
    let expiry = metric(
        p.admin,
        "remora_tls_certificate_expiry_timestamp_seconds{name=\"main\",owner=\"listener\"}",
    )
    .await;
    // 2040-06-01T00:00:00Z
    assert_eq!(expiry, 2_222_121_600.0);

    // A reload with a new pair that fails to take effect (another listener's address is
    // taken) leaves the gauge on the certificate still in use.
    let (next, next_key) = pki.leaf_with("next", &["localhost"], None, |p| {
        p.not_after = rcgen::date_time_ymd(2041, 6, 1);
    });
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let failing = https_config(
        &format!("cert_file: \"{next}\", key_file: \"{next_key}\""),
        "",
        up.port(),
    )
    .replace(
        "route_configs:",
        &format!(
            "  - {{ name: extra, address: \"{}\", route_config: rc }}\nroute_configs:",
            taken.local_addr().unwrap()
        ),
    );
    let outcome = p.app.apply(failing, "tls.yaml").await;
    assert!(
        matches!(outcome, remora::reloader::Outcome::Failed(_)),
        "{outcome:?}"
    );
    let expiry = metric(
        p.admin,
        "remora_tls_certificate_expiry_timestamp_seconds{name=\"main\",owner=\"listener\"}",
    )
    .await;
    assert_eq!(expiry, 2_222_121_600.0);
}

/// Rotation: the certificate and key files are replaced while remora runs; new handshakes get
/// the new pair within seconds without a reload command. A mismatched pair written later is
/// rejected and the last good one keeps serving.
#[tokio::test]
async fn rotated_certificates_are_picked_up_and_a_bad_pair_is_refused() {
    let pki = Pki::new("rotate");
    let (cert, key) = pki.leaf_with("server", &["localhost"], None, |p| {
        p.not_after = rcgen::date_time_ymd(2040, 6, 1);
    });
    let up = Upstream::start("up").await;
    let p = proxy(&https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\""),
        "",
        up.port(),
    ))
    .await;
    let sample =
        "remora_tls_certificate_expiry_timestamp_seconds{name=\"main\",owner=\"listener\"}";
    assert_eq!(metric(p.admin, sample).await, 2_222_121_600.0);

    // The new pair, swapped in by rename (as a Secret volume update does).
    let (new_cert, new_key) = pki.leaf_with("next", &["localhost"], None, |p| {
        p.not_after = rcgen::date_time_ymd(2041, 6, 1);
    });
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    // 2041-06-01T00:00:00Z
    wait_metric(p.admin, sample, 2_253_657_600.0).await;
    let (addr, ca) = (p.addr, pki.ca());
    let (ok, status, _, _) = tokio::task::spawn_blocking(move || curl(addr, "/", &ca, &[]))
        .await
        .unwrap();
    assert!(ok && status == 200, "after the rotation: {status}");

    // A key that does not match the certificate: refused, the last good pair stays.
    let (_, other_key) = pki.leaf("other", &["localhost"], None);
    std::fs::copy(&other_key, &key).unwrap();
    let started = std::time::Instant::now();
    while metric(
        p.admin,
        "remora_config_reloads_total{result=\"failure\",source=\"file\"}",
    )
    .await
        < 1.0
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "the bad pair was not refused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (addr, ca) = (p.addr, pki.ca());
    let (ok, status, _, _) = tokio::task::spawn_blocking(move || curl(addr, "/", &ca, &[]))
        .await
        .unwrap();
    assert!(ok && status == 200, "after a bad pair: {status}");
    assert_eq!(metric(p.admin, sample).await, 2_253_657_600.0);
}

/// ALPN offers what the listener speaks: an HTTP/1.1-only listener does not let curl
/// negotiate h2 (it would then be answered in HTTP/1.1 and fail).
#[tokio::test]
async fn alpn_follows_the_listener_protocol() {
    let pki = Pki::new("alpn");
    let (cert, key) = pki.leaf("server", &["localhost"], None);
    let up = Upstream::start("up").await;
    let yaml = https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\""),
        "",
        up.port(),
    )
    .replace(
        "route_config: rc, tls:",
        "route_config: rc, protocol: http1, tls:",
    );
    assert!(yaml.contains("protocol: http1"));
    let p = proxy(&yaml).await;
    let (addr, ca) = (p.addr, pki.ca());
    let (ok, status, body, version) =
        tokio::task::spawn_blocking(move || curl(addr, "/", &ca, &["--http2"]))
            .await
            .unwrap();
    assert!(ok && status == 200 && body == "up", "{status} {body}");
    assert_eq!(version, "1.1");
}

/// A TLS client (TLS 1.2/1.3, ring) trusting only `pki`'s CA and offering `alpn`.
fn tls_client(pki: &Pki, alpn: &[&str]) -> TlsConnector {
    let pem = std::fs::read(pki.ca()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(pem.as_slice())) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TCP connection to `addr` and a TLS handshake for `localhost` on it.
async fn tls_connect(
    tls: &TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Awaits `fut`, failing the test if it takes over 10 s.
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within 10 s"))
}

/// tonic's connector: dials remora and does the TLS handshake itself (tonic is built
/// without TLS), noting the protocol each connection negotiated by ALPN.
#[derive(Clone)]
struct TlsDialer {
    addr: SocketAddr,
    tls: TlsConnector,
    negotiated: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
}

impl Service<http::Uri> for TlsDialer {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, tls, negotiated) = (self.addr, self.tls.clone(), self.negotiated.clone());
        Box::pin(async move {
            let stream = tls_connect(&tls, addr).await?;
            let alpn = stream.get_ref().1.alpn_protocol().map(|p| p.to_vec());
            negotiated.lock().unwrap().push(alpn);
            Ok(TokioIo::new(stream))
        })
    }
}

/// gRPC over an HTTPS listener: a TLS client offering only `h2` negotiates it, and unary
/// calls (an error status with trailers included), a bidirectional stream and a method the
/// upstream lacks all pass to an h2c upstream.
#[tokio::test]
async fn grpc_over_tls_unary_and_streaming() {
    let pki = Pki::new("grpc");
    let (cert, key) = pki.leaf("server", &["localhost"], None);
    let port = echo_upstream().await;
    let yaml = https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\""),
        "",
        port,
    )
    .replace(
        "{ name: up, endpoints:",
        "{ name: up, protocol: http2, endpoints:",
    )
    .replace(
        "routes: [",
        "routes: [{ match: { prefix: /test.Echo/Secret }, cluster: up, authorization: { principals: [\"spiffe://mesh.local/ns/ops/*\"] } }, ",
    );
    assert!(yaml.contains("protocol: http2") && yaml.contains("/test.Echo/Secret"));
    let p = proxy(&yaml).await;
    let negotiated = Arc::new(Mutex::new(Vec::new()));
    let dialer = TlsDialer {
        addr: p.addr,
        tls: tls_client(&pki, &["h2"]),
        negotiated: negotiated.clone(),
    };
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", p.addr.port()))
            .unwrap();
    let channel = within(
        "the TLS connection",
        endpoint.connect_with_connector(dialer),
    )
    .await
    .expect("a TLS connection to remora");
    let mut grpc = tonic::client::Grpc::new(channel);

    within("ready", grpc.ready()).await.unwrap();
    let resp = within(
        "the unary call",
        grpc.unary(
            Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/test.Echo/Unary"),
            ProstCodec::<Msg, Msg>::default(),
        ),
    )
    .await
    .expect("unary call over TLS");
    assert_eq!(resp.metadata().get("x-served-by").unwrap(), "echo");
    assert_eq!(resp.into_inner().text, "echo: hi");

    within("ready", grpc.ready()).await.unwrap();
    let status = within(
        "the failing unary call",
        grpc.unary(
            Request::new(Msg {
                text: "fail".into(),
            }),
            PathAndQuery::from_static("/test.Echo/Unary"),
            ProstCodec::<Msg, Msg>::default(),
        ),
    )
    .await
    .expect_err("the upstream's error status");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "from-upstream");

    within("ready", grpc.ready()).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
    let resp = grpc.streaming(
        Request::new(outbound),
        PathAndQuery::from_static("/test.Echo/Bidi"),
        ProstCodec::<Msg, Msg>::default(),
    );
    tx.send(Msg { text: "one".into() }).await.unwrap();
    let mut inbound = within("the stream's response headers", resp)
        .await
        .expect("stream opened")
        .into_inner();
    assert_eq!(
        within("the first reply", inbound.message())
            .await
            .unwrap()
            .unwrap()
            .text,
        "ONE"
    );
    for word in ["two", "three", "four"] {
        tx.send(Msg { text: word.into() }).await.unwrap();
        let reply = within("a streamed reply", inbound.message()).await;
        assert_eq!(reply.unwrap().unwrap().text, word.to_uppercase());
    }
    drop(tx);
    assert!(
        within("the end of the stream", inbound.message())
            .await
            .unwrap()
            .is_none(),
        "clean end with OK trailers"
    );
    assert!(within("the trailers", inbound.trailers())
        .await
        .unwrap()
        .is_some());

    within("ready", grpc.ready()).await.unwrap();
    let status = within(
        "the call to a missing method",
        grpc.unary(
            Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/test.Echo/Missing"),
            ProstCodec::<Msg, Msg>::default(),
        ),
    )
    .await
    .expect_err("a method the upstream lacks");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(status.message(), "no such method", "{status:?}");

    // A principal not admitted (this client has none): 403, gRPC-shaped.
    within("ready", grpc.ready()).await.unwrap();
    let status = within(
        "the call to a guarded method",
        grpc.unary(
            Request::new(Msg { text: "hi".into() }),
            PathAndQuery::from_static("/test.Echo/Secret"),
            ProstCodec::<Msg, Msg>::default(),
        ),
    )
    .await
    .expect_err("a principal not admitted");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let negotiated = negotiated.lock().unwrap().clone();
    assert!(!negotiated.is_empty(), "tonic never dialled");
    assert!(
        negotiated.iter().all(|p| p.as_deref() == Some(&b"h2"[..])),
        "ALPN: {negotiated:?}"
    );
}

/// WebSocket over an HTTPS listener: a `wss://` handshake (ALPN http/1.1) is tunnelled to a
/// plain WebSocket upstream; text and binary messages echo and the close handshake completes.
#[tokio::test]
async fn websocket_over_tls() {
    let pki = Pki::new("wss");
    let (cert, key) = pki.leaf("server", &["localhost"], None);
    let (port, stats) = ws_echo_server().await;
    let p = proxy(&ws_config(
        &format!(", tls: {{ cert_file: \"{cert}\", key_file: \"{key}\" }}"),
        "",
        "",
        port,
    ))
    .await;
    let stream = within(
        "the TLS handshake",
        tls_connect(&tls_client(&pki, &["http/1.1"]), p.addr),
    )
    .await
    .expect("a TLS connection to remora");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut ws, resp) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async("wss://localhost/chat", stream),
    )
    .await
    .unwrap_or_else(|e| panic!("the wss handshake through remora failed: {e}"));
    assert_eq!(resp.status(), 101);
    assert!(
        counter_reaches(&stats.handshakes, 1, Duration::from_secs(5)).await,
        "the upstream did not complete the WebSocket handshake"
    );

    // More than one TLS record's worth (16 KiB) in the last one.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("hello over wss"),
        Message::binary(vec![0u8, 1, 2, 253, 254, 255]),
        Message::text("ünïcödé ✓"),
        Message::binary(big),
    ];
    for (i, msg) in messages.into_iter().enumerate() {
        within("sending", ws.send(msg.clone()))
            .await
            .unwrap_or_else(|e| panic!("sending message {i}: {e}"));
        match within("the echo", ws.next()).await {
            Some(Ok(got)) => assert!(
                got == msg,
                "message {i}: sent {} bytes, the echo is {} bytes: {:?}",
                msg.len(),
                got.len(),
                got.to_text()
                    .map(|t| t.chars().take(40).collect::<String>())
            ),
            other => panic!("no echo of message {i}: {other:?}"),
        }
    }

    within("sending Close", ws.close(None))
        .await
        .expect("sending Close");
    let rest = within("the end of the tunnel", async {
        let mut rest = Vec::new();
        while let Some(item) = ws.next().await {
            rest.push(item);
        }
        rest
    })
    .await;
    assert!(
        matches!(rest.as_slice(), [Ok(Message::Close(_))]),
        "after our Close, expected the peer's Close and a clean end of the stream: {rest:?}"
    );
    assert!(
        counter_reaches(&stats.ended, 1, Duration::from_secs(5)).await,
        "the upstream side of the tunnel did not end"
    );
}

/// A TLS terminator in front of a plain upstream (which may speak HTTP/1.1, h2c or
/// WebSocket): offers `alpn` and copies bytes both ways. Returns its port and the protocol
/// each connection negotiated.
async fn tls_front(pki: &Pki, alpn: &[&str], backend: u16) -> (u16, Arc<Mutex<Vec<String>>>) {
    let (cert, key) = pki.leaf("front", &["localhost"], None);
    let alpn: Vec<String> = alpn.iter().map(|p| p.to_string()).collect();
    let config = remora::tls::server_config(&remora::tls::ServerFiles {
        cert_file: &cert,
        key_file: &key,
        client_ca_file: None,
        alpn: Some(&alpn),
    })
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let negotiated = Arc::new(Mutex::new(Vec::new()));
    let seen = negotiated.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = socket.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let chosen = tls.get_ref().1.alpn_protocol().unwrap_or(b"none");
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(chosen).to_string());
                let Ok(mut plain) = TcpStream::connect(("127.0.0.1", backend)).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (port, negotiated)
}

/// `protocol: auto` offers h2 and http/1.1 by ALPN and speaks what each endpoint chose:
/// HTTP/2 (with `:scheme https`, one shared connection) to one that offers h2, HTTP/1.1 to one
/// that does not. A WebSocket upgrade to the h2 endpoint goes over an HTTP/1.1 connection.
/// A `protocol: http2` TLS cluster sends `:scheme https` too.
#[tokio::test]
async fn an_auto_cluster_speaks_what_each_endpoint_chooses_by_alpn() {
    let pki = Pki::new("auto");
    let up = Upstream::start("app").await;
    let (both, both_seen) = tls_front(&pki, &["h2", "http/1.1"], up.port()).await;
    let (h1_only, h1_seen) = tls_front(&pki, &["http/1.1"], up.port()).await;
    let (ws_port, ws_stats) = ws_echo_server().await;
    let (ws_front, ws_seen) = tls_front(&pki, &["h2", "http/1.1"], ws_port).await;
    let ca = pki.ca();
    let cluster = |name: &str, protocol: &str, port: u16| {
        format!(
            "  - {{ name: {name}, protocol: {protocol}, endpoints: [{{ address: \"127.0.0.1:{port}\" }}], tls: {{ ca_file: \"{ca}\", sni: localhost }} }}\n"
        )
    };
    let p = proxy(&format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n\
         \x20         - {{ match: {{ prefix: /h2 }}, cluster: both }}\n\
         \x20         - {{ match: {{ prefix: /h1 }}, cluster: h1-only }}\n\
         \x20         - {{ match: {{ prefix: /ws }}, cluster: ws }}\n\
         \x20         - {{ match: {{ prefix: /x2 }}, cluster: explicit-h2 }}\n\
         clusters:\n{}{}{}{}",
        cluster("both", "auto", both),
        cluster("h1-only", "auto", h1_only),
        cluster("ws", "auto", ws_front),
        cluster("explicit-h2", "http2", both)
    ))
    .await;
    let cl = client();
    for _ in 0..3 {
        let r = get(&cl, p.addr, "svc", "/h2", &[]).await;
        assert_eq!(r.status, 200, "{}", r.header("x-remora-error"));
        let r = get(&cl, p.addr, "svc", "/h1", &[]).await;
        assert_eq!(r.status, 200, "{}", r.header("x-remora-error"));
    }
    let seen = up.seen();
    let h2: Vec<_> = seen.iter().filter(|s| s.uri.contains("/h2")).collect();
    let h1: Vec<_> = seen.iter().filter(|s| s.uri.contains("/h1")).collect();
    assert_eq!((h2.len(), h1.len()), (3, 3));
    assert!(
        h2.iter()
            .all(|s| s.version == http::Version::HTTP_2 && s.uri.starts_with("https://svc/")),
        "{h2:?}"
    );
    assert!(
        h1.iter().all(|s| s.version == http::Version::HTTP_11),
        "{h1:?}"
    );
    assert_eq!(
        *both_seen.lock().unwrap(),
        ["h2"],
        "one shared h2 connection"
    );
    assert!(h1_seen.lock().unwrap().iter().all(|p| p == "http/1.1"));
    let r = get(&cl, p.addr, "svc", "/x2", &[]).await;
    assert_eq!(r.status, 200, "{}", r.header("x-remora-error"));
    let last = up.seen().pop().unwrap();
    assert_eq!(
        (last.version, last.uri.as_str()),
        (http::Version::HTTP_2, "https://svc/x2")
    );

    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut ws, resp) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async("ws://svc/ws", tcp),
    )
    .await
    .unwrap_or_else(|e| panic!("the upgrade through an auto cluster failed: {e}"));
    assert_eq!(resp.status(), 101);
    within("sending", ws.send(Message::text("over tls")))
        .await
        .unwrap();
    match within("the echo", ws.next()).await {
        Some(Ok(m)) => assert_eq!(m, Message::text("over tls")),
        other => panic!("no echo: {other:?}"),
    }
    assert!(counter_reaches(&ws_stats.handshakes, 1, Duration::from_secs(5)).await);
    assert_eq!(*ws_seen.lock().unwrap(), ["http/1.1"]);
}

/// Active health checks of a TLS cluster speak TLS, as Envoy's do: a healthy HTTPS endpoint
/// stays in service (probed in plain text, it would fail every check and be marked down).
#[tokio::test]
async fn health_checks_of_a_tls_cluster_speak_tls() {
    let pki = Pki::new("health");
    let up = Upstream::start("app").await;
    let (front, _) = tls_front(&pki, &["http/1.1"], up.port()).await;
    let p = proxy(&format!(
        "admin: {{ address: 127.0.0.1:0 }}\n\
         listeners:\n  - {{ name: main, address: 127.0.0.1:0, route_config: rc }}\n\
         route_configs:\n  - name: rc\n    virtual_hosts:\n      - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: / }}, cluster: app }}] }}\n\
         clusters:\n  - name: app\n    endpoints: [{{ address: \"127.0.0.1:{front}\" }}]\n    tls: {{ ca_file: \"{}\", sni: localhost }}\n    health_check: {{ path: /health, interval: 100ms, unhealthy_threshold: 1 }}\n",
        pki.ca()
    ))
    .await;
    wait_metric(
        p.admin,
        "remora_health_checks_total{cluster=\"app\",result=\"success\"}",
        3.0,
    )
    .await;
    assert_eq!(
        metric(
            p.admin,
            "remora_health_checks_total{cluster=\"app\",result=\"failure\"}"
        )
        .await,
        0.0
    );
    let r = get(&client(), p.addr, "svc", "/", &[]).await;
    assert_eq!(r.status, 200, "{}", r.header("x-remora-error"));
}

/// The leaf certificate (DER) of a PEM file.
fn leaf_der(path: &str) -> Vec<u8> {
    let pem = std::fs::read(path).unwrap();
    let first = rustls_pemfile::certs(&mut std::io::BufReader::new(pem.as_slice()))
        .next()
        .expect("a certificate")
        .unwrap();
    first.to_vec()
}

/// One GET over `conn`; the status.
async fn get_on(
    conn: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
) -> u16 {
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(http_body_util::Empty::new())
        .unwrap();
    match within("a request", conn.send_request(req)).await {
        Ok(resp) => resp.status().as_u16(),
        Err(_) => 0,
    }
}

/// Rotation under load: clients open a new TLS connection for every request while the
/// certificate and key are replaced (key first, so for a moment the pair does not match).
/// New handshakes see the new certificate within seconds, no request fails, and a
/// connection opened before the rotation keeps working on the old one.
#[tokio::test]
async fn rotation_under_load_fails_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let pki = Pki::new("rotate-load");
    let (cert, key) = pki.leaf_with("server", &["localhost"], None, |p| {
        p.serial_number = Some(1u64.into());
    });
    let (next_cert, next_key) = pki.leaf_with("next", &["localhost"], None, |p| {
        p.serial_number = Some(2u64.into());
    });
    let (old_der, new_der) = (leaf_der(&cert), leaf_der(&next_cert));
    let up = Upstream::start("up").await;
    let p = proxy(&https_config(
        &format!("cert_file: \"{cert}\", key_file: \"{key}\", alpn: [http/1.1]"),
        "",
        up.port(),
    ))
    .await;
    let tls = tls_client(&pki, &["http/1.1"]);
    let connect = |tls: TlsConnector, addr: SocketAddr| async move {
        let stream = tls_connect(&tls, addr).await.ok()?;
        let leaf = stream.get_ref().1.peer_certificates()?.first()?.to_vec();
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(driver);
        Some((conn, leaf))
    };

    let (mut old_conn, old_leaf) = connect(tls.clone(), p.addr)
        .await
        .expect("a first connection");
    assert_eq!(old_leaf, old_der);
    assert_eq!(get_on(&mut old_conn).await, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, saw_new) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (tls, addr, stop) = (tls.clone(), p.addr, stop.clone());
            let (ok, failed, saw_new, new_der) =
                (ok.clone(), failed.clone(), saw_new.clone(), new_der.clone());
            tokio::spawn(async move {
                // Bounded: at most 10 s or 5,000 requests per client.
                let started = std::time::Instant::now();
                for _ in 0..5_000 {
                    if stop.load(SeqCst) || started.elapsed() > Duration::from_secs(10) {
                        break;
                    }
                    let served = match connect(tls.clone(), addr).await {
                        Some((mut conn, leaf)) => (get_on(&mut conn).await == 200).then_some(leaf),
                        None => None,
                    };
                    match served {
                        Some(leaf) => {
                            ok.fetch_add(1, SeqCst);
                            if leaf == new_der {
                                saw_new.fetch_add(1, SeqCst);
                            }
                        }
                        None => {
                            failed.fetch_add(1, SeqCst);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::rename(&next_key, &key).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::rename(&next_cert, &cert).unwrap();
    wait_until("a new handshake sees the new certificate", || {
        saw_new.load(SeqCst) >= 20
    })
    .await;
    stop.store(true, SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(SeqCst), 0, "{} served", ok.load(SeqCst));
    assert!(
        ok.load(SeqCst) > saw_new.load(SeqCst),
        "no request before the rotation"
    );
    assert_eq!(get_on(&mut old_conn).await, 200, "the old connection");
}
