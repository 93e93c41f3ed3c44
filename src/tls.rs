//! TLS with rustls (ring): listener server configs (optionally requiring client
//! certificates), cluster client configs (CA, client certificate, SAN checks), and peer
//! identities (the principal: URI SAN, else the first DNS SAN).

use std::io::BufReader;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key in it")]
    NoKey { path: String },
    #[error("TLS settings refused: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("CA bundle refused: {0}")]
    Verifier(String),
    #[error("{path}: the certificate expired (not after {not_after})")]
    Expired { path: String, not_after: String },
}

/// When a certificate stops being valid, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Refuses a leaf certificate that has expired.
fn check_not_expired(path: &str, leaf: &CertificateDer<'_>) -> Result<(), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| TlsError::Verifier(format!("{path}: {e}")))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if cert.validity().not_after.timestamp() < now {
        return Err(TlsError::Expired {
            path: path.to_string(),
            not_after: cert.validity().not_after.to_string(),
        });
    }
    Ok(())
}

/// The crypto provider: ring, or AWS-LC when built with the `aws-lc-rs` feature.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc-rs")]
    return Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    #[cfg(not(feature = "aws-lc-rs"))]
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_string(),
        source,
    })
}

/// The certificates in a PEM file.
pub fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(pem.as_slice()))
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_string(),
        });
    }
    Ok(certs)
}

fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut BufReader::new(pem.as_slice()))
        .map_err(|source| TlsError::Read {
            path: path.to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey {
            path: path.to_string(),
        })
}

fn roots(path: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path)? {
        store
            .add(cert)
            .map_err(|e| TlsError::Verifier(format!("{path}: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// What a TLS listener serves with (paths to PEM files).
pub struct ServerFiles<'a> {
    pub cert_file: &'a str,
    pub key_file: &'a str,
    /// Clients must present a certificate this CA bundle signed.
    pub client_ca_file: Option<&'a str>,
    /// ALPN protocols offered; default `h2`, `http/1.1`.
    pub alpn: Option<&'a [String]>,
}

/// What a TLS cluster connects with (paths to PEM files).
pub struct ClientFiles<'a> {
    pub ca_file: &'a str,
    /// Client certificate chain and key, for mTLS.
    pub cert: Option<(&'a str, &'a str)>,
    /// SANs one of which the server's certificate must carry (then the name is not checked).
    pub verify_subject_alt_names: &'a [String],
}

/// The server config of a TLS listener.
pub fn server_config(tls: &ServerFiles<'_>) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates(tls.cert_file)?;
    check_not_expired(tls.cert_file, &certs[0])?;
    let key = private_key(tls.key_file)?;
    let builder =
        ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match tls.client_ca_file {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::Verifier(format!("{ca}: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = match tls.alpn {
        Some(alpn) => alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
        None => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(Arc::new(config))
}

/// The client config of a TLS cluster; `alpn` is what the cluster speaks, by preference.
pub fn client_config(tls: &ClientFiles<'_>, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, TlsError> {
    let ca = tls.ca_file;
    let webpki = WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(format!("{ca}: {e}")))?;
    let verifier = Arc::new(SanVerifier {
        inner: webpki,
        names: tls.verify_subject_alt_names.to_vec(),
    });
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match tls.cert {
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            check_not_expired(cert, &chain[0])?;
            builder.with_client_auth_cert(chain, private_key(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The chain checked by webpki; then, with `names`, the leaf's SANs instead of the SNI name
/// (a SPIFFE certificate has a URI SAN and no DNS name), as Envoy's
/// `match_typed_subject_alt_names`.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<String>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        if self.names.is_empty() {
            return checked;
        }
        match checked {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        let sans = subject_alt_names(end_entity);
        if sans.iter().any(|s| self.names.contains(s)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the certificate's SANs {sans:?} match none of verify_subject_alt_names"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A bounded label for why a TLS handshake failed (for
/// `remora_tls_handshake_failures_total`); the full reason goes to the log.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::InvalidInput => "config",
            _ => "connection_closed",
        };
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => "expired",
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => "unknown_ca",
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => "name_mismatch",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::General(msg) if msg.contains("verify_subject_alt_names") => "san_mismatch",
        rustls::Error::NoApplicationProtocol => "no_alpn",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol_error",
    }
}

/// A certificate's subject alternative names, by kind.
#[derive(Debug, Default)]
pub struct Sans {
    pub uris: Vec<String>,
    /// Only names that are valid DNS names (a client certificate's are not checked by the
    /// verifier, so `spiffe://...` written as a DNS SAN must not pass for a URI).
    pub dns: Vec<String>,
}

/// A certificate's URI and DNS SANs.
pub fn sans(der: &[u8]) -> Sans {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Sans::default();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Sans::default();
    };
    let mut out = Sans::default();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) => out.uris.push(u.to_string()),
            GeneralName::DNSName(d) if rustls::pki_types::DnsName::try_from(*d).is_ok() => {
                out.dns.push(d.to_string())
            }
            _ => {}
        }
    }
    out
}

/// A certificate's URI SANs, then its DNS SANs (for matching `verify_subject_alt_names`).
pub fn subject_alt_names(der: &[u8]) -> Vec<String> {
    let s = sans(der);
    s.uris.into_iter().chain(s.dns).collect()
}

/// A verified peer: its principal and the `x-forwarded-client-cert` value it earns.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The URI SAN (SPIFFE ID), else the first DNS SAN.
    pub principal: Option<Arc<str>>,
    /// Envoy's format: `By=<uri>;Hash=<sha256 of the DER>;URI=<uri SAN>`; `None` when a
    /// value cannot be carried in a header.
    pub xfcc: Option<http::HeaderValue>,
}

impl Peer {
    /// From the client's leaf certificate; `by` is the listener's own URI SAN, if any.
    pub fn new(leaf: &[u8], by: Option<&str>) -> Peer {
        let sans = sans(leaf);
        let uri = sans.uris.first();
        let principal: Option<Arc<str>> = uri.or(sans.dns.first()).map(|s| s.as_str().into());
        let hash = ring::digest::digest(&ring::digest::SHA256, leaf);
        let hex: String = hash.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut xfcc = String::new();
        if let Some(by) = by {
            xfcc.push_str(&format!("By={};", xfcc_value(by)));
        }
        xfcc.push_str(&format!("Hash={hex}"));
        if let Some(uri) = uri {
            xfcc.push_str(&format!(";URI={}", xfcc_value(uri)));
        }
        let xfcc = http::HeaderValue::from_str(&xfcc).ok();
        Peer { principal, xfcc }
    }
}

/// An XFCC value, double-quoted (with inner quotes escaped) when it holds `,` `;` `=` or
/// `"`, as Envoy writes it: a SAN cannot add or forge elements.
fn xfcc_value(v: &str) -> String {
    if v.contains([',', ';', '=', '"']) {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_string()
    }
}

/// Whether `principal` is admitted by `patterns` (exact, or a prefix ending in `*`).
pub fn admits(patterns: &[String], principal: Option<&str>) -> bool {
    let Some(p) = principal else {
        return false;
    };
    patterns.iter().any(|pat| match pat.strip_suffix('*') {
        Some(prefix) => p.starts_with(prefix),
        None => p == pat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfcc_values_that_could_forge_elements_are_quoted() {
        assert_eq!(xfcc_value("spiffe://a/b"), "spiffe://a/b");
        assert_eq!(
            xfcc_value("spiffe://a/b,Hash=0;URI=spiffe://x"),
            "\"spiffe://a/b,Hash=0;URI=spiffe://x\""
        );
        assert_eq!(xfcc_value("a\"b;"), "\"a\\\"b;\"");
    }

    #[test]
    fn principals_match_exactly_or_by_prefix() {
        let pats = vec![
            "spiffe://mesh.local/ns/shop/sa/*".to_string(),
            "spiffe://mesh.local/ns/pay/sa/pay".to_string(),
        ];
        assert!(admits(&pats, Some("spiffe://mesh.local/ns/shop/sa/web")));
        assert!(admits(&pats, Some("spiffe://mesh.local/ns/pay/sa/pay")));
        assert!(!admits(&pats, Some("spiffe://mesh.local/ns/pay/sa/payx")));
        assert!(!admits(&pats, None));
    }
}
