//! TLS in xDS: a listener's `DownstreamTlsContext` and a cluster's `UpstreamTlsContext`
//! (file-based certificates), both ways.
//!
//! What keeps remora and Envoy behaving alike from one config:
//! - A listener's ALPN is written out as remora offers it (Envoy offers none by default,
//!   which would leave every client on HTTP/1.1); `defaulted=tls.alpn` gives `None` back.
//! - remora requires a client certificate whenever `client_ca_file` is set, so
//!   `require_client_certificate` is always written; a context that asks for a certificate
//!   without requiring one is refused, as remora has no "optional client certificate".
//! - remora checks an upstream's certificate against its server name (`sni`, else the
//!   endpoint's host) unless `verify_subject_alt_names` is set; Envoy checks only the chain
//!   unless SAN matchers are given. So without `verify_subject_alt_names` the server name is
//!   written as a SAN matcher (and as `sni`), both marked `defaulted`.
//! - SDS, inline secrets, certificate providers and the validation features remora lacks
//!   (SPKI or hash pinning, CRLs, accepting untrusted or expired chains) are refused by name:
//!   ignoring them would silently weaken or change the check.

use std::net::IpAddr;

use prost::Name;
use remora_xds::envoy_types::pb::envoy::config::core::v3 as ecore;
use remora_xds::envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as etls;
use remora_xds::envoy_types::pb::envoy::r#type::matcher::v3 as matcher;

use super::{any, bool_set, decode_any, type_name, unsupported, At, Errs, Extras};
use crate::config::raw::{ListenerProtocol, RawCluster, RawClusterTls, RawListenerTls};

use etls::common_tls_context::ValidationContextType;
use etls::subject_alt_name_matcher::SanType;
use etls::tls_parameters::TlsProtocol;
use matcher::string_matcher::MatchPattern;

const TLS_SOCKET: &str = "envoy.transport_sockets.tls";

// === remora → Envoy ===

/// A listener's TLS as the transport socket of its filter chain.
pub(super) fn listener_to(
    tls: &RawListenerTls,
    protocol: ListenerProtocol,
    x: &mut Extras,
) -> ecore::TransportSocket {
    if tls.alpn.is_none() {
        x.defaulted("tls.alpn");
    }
    let validation = tls.client_ca_file.as_deref().map(|ca| {
        ValidationContextType::ValidationContext(etls::CertificateValidationContext {
            trusted_ca: Some(file(ca)),
            ..Default::default()
        })
    });
    let context = etls::DownstreamTlsContext {
        common_tls_context: Some(etls::CommonTlsContext {
            tls_certificates: vec![certificate(&tls.cert_file, &tls.key_file)],
            alpn_protocols: tls.alpn_for(protocol),
            validation_context_type: validation,
            ..Default::default()
        }),
        require_client_certificate: tls
            .client_ca_file
            .is_some()
            .then_some(super::pbuf::BoolValue { value: true }),
        ..Default::default()
    };
    socket(any(&context))
}

/// A cluster's TLS as its transport socket. ALPN is the cluster's protocol.
pub(super) fn cluster_to(
    c: &RawCluster,
    tls: &RawClusterTls,
    x: &mut Extras,
) -> ecore::TransportSocket {
    let mut sni = tls.sni.clone().unwrap_or_default();
    let mut sans: Vec<etls::SubjectAltNameMatcher> = tls
        .verify_subject_alt_names
        .iter()
        .map(|name| {
            let kind = if name.contains("://") {
                SanType::Uri
            } else {
                SanType::Dns
            };
            san_matcher(kind, name)
        })
        .collect();
    if sans.is_empty() {
        let name = c.tls_server_name();
        if !name.is_empty() {
            x.defaulted("tls.verify_subject_alt_names");
            match name.parse::<IpAddr>() {
                // An IP is checked against IP SANs and sent as no SNI (RFC 6066 §3).
                Ok(_) => sans.push(san_matcher(SanType::IpAddress, &name)),
                Err(_) => {
                    sans.push(san_matcher(SanType::Dns, &name));
                    if tls.sni.is_none() {
                        x.defaulted("tls.sni");
                        sni = name;
                    }
                }
            }
        }
    }
    use crate::config::raw::UpstreamProtocol;
    let alpn: &[&str] = match c.protocol {
        UpstreamProtocol::Http1 => &["http/1.1"],
        UpstreamProtocol::Http2 => &["h2"],
        UpstreamProtocol::Auto => &["h2", "http/1.1"],
    };
    let context = etls::UpstreamTlsContext {
        common_tls_context: Some(etls::CommonTlsContext {
            tls_certificates: tls
                .cert_file
                .as_deref()
                .zip(tls.key_file.as_deref())
                .map(|(c, k)| certificate(c, k))
                .into_iter()
                .collect(),
            alpn_protocols: alpn.iter().map(|p| p.to_string()).collect(),
            validation_context_type: Some(ValidationContextType::ValidationContext(
                etls::CertificateValidationContext {
                    trusted_ca: tls.ca_file.as_deref().map(file),
                    match_typed_subject_alt_names: sans,
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
        sni,
        ..Default::default()
    };
    socket(any(&context))
}

fn socket(config: super::pbuf::Any) -> ecore::TransportSocket {
    ecore::TransportSocket {
        name: TLS_SOCKET.into(),
        config_type: Some(ecore::transport_socket::ConfigType::TypedConfig(config)),
    }
}

fn file(path: &str) -> ecore::DataSource {
    ecore::DataSource {
        specifier: Some(ecore::data_source::Specifier::Filename(path.to_string())),
        watched_directory: None,
    }
}

fn certificate(cert: &str, key: &str) -> etls::TlsCertificate {
    etls::TlsCertificate {
        certificate_chain: Some(file(cert)),
        private_key: Some(file(key)),
        ..Default::default()
    }
}

fn san_matcher(kind: SanType, name: &str) -> etls::SubjectAltNameMatcher {
    etls::SubjectAltNameMatcher {
        san_type: kind as i32,
        matcher: Some(matcher::StringMatcher {
            match_pattern: Some(MatchPattern::Exact(name.to_string())),
            ignore_case: false,
        }),
        oid: String::new(),
    }
}

// === Envoy → remora ===

/// A listener chain's transport socket: `None` for plain text (absent or raw buffer).
pub(super) fn listener_from(
    socket: &ecore::TransportSocket,
    x: &Extras,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<RawListenerTls> {
    let context: etls::DownstreamTlsContext = tls_context(socket, at, e)?;
    let at = at.field("typed_config");
    unsupported(
        e,
        &at,
        &[
            ("require_sni", bool_set(context.require_sni)),
            (
                "tls_certificates[0].ocsp_staple (with ocsp_staple_policy)",
                context.ocsp_staple_policy != 0,
            ),
        ],
    );
    // Ignored as tuning: session tickets and timeouts, stateful resumption, cipher preference,
    // full_scan_certs_on_sni_mismatch.
    let common_at = at.field("common_tls_context");
    let Some(common) = &context.common_tls_context else {
        e.add(&common_at, "is required (a certificate and key)");
        return None;
    };
    common_unsupported(common, &common_at, e);
    let [cert] = common.tls_certificates.as_slice() else {
        e.add(
            &common_at.field("tls_certificates"),
            format!(
                "exactly one file-based certificate is supported, found {}",
                common.tls_certificates.len()
            ),
        );
        return None;
    };
    let (cert_file, key_file) = certificate_from(cert, &common_at.item("tls_certificates", 0), e)?;
    let validation = validation_from(common, true, &common_at, e);
    let required = bool_set(context.require_client_certificate);
    let client_ca_file = match validation {
        None if required => {
            e.add(
                &at.field("require_client_certificate"),
                "needs a validation_context with trusted_ca",
            );
            None
        }
        None => None,
        Some(v) => {
            if !v.sans.is_empty() {
                e.add(
                    &common_at.field("validation_context.match_typed_subject_alt_names"),
                    "not supported on listeners: admit client identities with authorization.principals",
                );
            }
            if !required {
                e.add(
                    &at.field("require_client_certificate"),
                    "must be true with a validation_context: remora has no optional client certificate",
                );
            }
            v.trusted_ca
        }
    };
    let alpn = (!x.was_defaulted("tls.alpn")).then(|| common.alpn_protocols.clone());
    Some(RawListenerTls {
        cert_file,
        key_file,
        client_ca_file,
        alpn: alpn.filter(|a| !a.is_empty()),
    })
}

/// A cluster's transport socket: `None` for plain text.
pub(super) fn cluster_from(
    socket: &ecore::TransportSocket,
    x: &Extras,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<RawClusterTls> {
    let context: etls::UpstreamTlsContext = tls_context(socket, at, e)?;
    let at = at.field("typed_config");
    unsupported(
        e,
        &at,
        &[
            ("auto_host_sni", context.auto_host_sni),
            ("auto_sni_san_validation", context.auto_sni_san_validation),
        ],
    );
    // Ignored: allow_renegotiation (rustls never renegotiates), max_session_keys,
    // enforce_rsa_key_usage; alpn_protocols (remora offers the cluster's protocol).
    let common_at = at.field("common_tls_context");
    let default_common = etls::CommonTlsContext::default();
    let common = context
        .common_tls_context
        .as_ref()
        .unwrap_or(&default_common);
    common_unsupported(common, &common_at, e);
    let client = match common.tls_certificates.as_slice() {
        [] => None,
        [cert] => certificate_from(cert, &common_at.item("tls_certificates", 0), e),
        more => {
            e.add(
                &common_at.field("tls_certificates"),
                format!(
                    "at most one client certificate is supported, found {}",
                    more.len()
                ),
            );
            None
        }
    };
    let defaulted_sans = x.was_defaulted("tls.verify_subject_alt_names");
    let Some(validation) = validation_from(common, !defaulted_sans, &common_at, e) else {
        e.add(
            &common_at.field("validation_context"),
            "is required: remora always verifies the upstream's certificate (set trusted_ca)",
        );
        return None;
    };
    let sni = (!context.sni.is_empty() && !x.was_defaulted("tls.sni")).then_some(context.sni);
    let (cert_file, key_file) = client.unzip();
    Some(RawClusterTls {
        sni,
        ca_file: validation.trusted_ca,
        cert_file,
        key_file,
        verify_subject_alt_names: validation.sans,
    })
}

/// The TLS context a transport socket holds, or `None` (plain text, or an error added).
fn tls_context<M: prost::Message + Name + Default>(
    socket: &ecore::TransportSocket,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<M> {
    let Some(ecore::transport_socket::ConfigType::TypedConfig(config)) = &socket.config_type else {
        if socket.name != super::RAW_BUFFER {
            e.add(
                at,
                format!("transport socket `{}` needs a typed_config", socket.name),
            );
        }
        return None;
    };
    if type_name(config).ends_with(".RawBuffer") {
        return None;
    }
    match decode_any::<M>(config) {
        Ok(context) => Some(context),
        Err(msg) => {
            e.add(&at.field("typed_config"), msg);
            None
        }
    }
}

/// What remora cannot honour in either direction's common context.
fn common_unsupported(c: &etls::CommonTlsContext, at: &At<'_>, e: &mut Errs) {
    if !c.tls_certificate_sds_secret_configs.is_empty() {
        e.add(
            &at.field("tls_certificate_sds_secret_configs"),
            "SDS is not supported yet: name the files in tls_certificates",
        );
    }
    unsupported(
        e,
        at,
        &[
            (
                "tls_certificate_provider_instance",
                c.tls_certificate_provider_instance.is_some(),
            ),
            (
                "custom_tls_certificate_selector",
                c.custom_tls_certificate_selector.is_some(),
            ),
            (
                "tls_certificate_certificate_provider",
                c.tls_certificate_certificate_provider.is_some(),
            ),
            (
                "tls_certificate_certificate_provider_instance",
                c.tls_certificate_certificate_provider_instance.is_some(),
            ),
            ("custom_handshaker", c.custom_handshaker.is_some()),
            ("key_log", c.key_log.is_some()),
        ],
    );
    if let Some(p) = &c.tls_params {
        // remora speaks TLS 1.2 and 1.3; a minimum of 1.0 or 1.1 only asks for less.
        let min = p.tls_minimum_protocol_version;
        let max = p.tls_maximum_protocol_version;
        if min == TlsProtocol::TlSv13 as i32 {
            e.add(
                &at.field("tls_params.tls_minimum_protocol_version"),
                "TLSv1_3 is not supported (remora accepts TLS 1.2 and 1.3)",
            );
        }
        if max != TlsProtocol::TlsAuto as i32 && max != TlsProtocol::TlSv13 as i32 {
            e.add(
                &at.field("tls_params.tls_maximum_protocol_version"),
                "below TLSv1_3 is not supported (remora accepts TLS 1.2 and 1.3)",
            );
        }
        // Ignored as tuning: cipher_suites, ecdh_curves, signature_algorithms (rustls's
        // defaults are all modern AEAD suites and curves).
    }
}

/// A certificate and key as two file names.
fn certificate_from(
    c: &etls::TlsCertificate,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<(String, String)> {
    unsupported(
        e,
        at,
        &[
            ("private_key_provider", c.private_key_provider.is_some()),
            ("password", c.password.is_some()),
            ("ocsp_staple", c.ocsp_staple.is_some()),
            (
                "signed_certificate_timestamp",
                !c.signed_certificate_timestamp.is_empty(),
            ),
        ],
    );
    // Ignored: watched_directory (remora watches the files themselves).
    let cert = file_from(
        c.certificate_chain.as_ref(),
        &at.field("certificate_chain"),
        e,
    );
    let key = file_from(c.private_key.as_ref(), &at.field("private_key"), e);
    cert.zip(key)
}

/// A validation context's CA file and SAN names.
struct Validation {
    trusted_ca: Option<String>,
    sans: Vec<String>,
}

/// `read_sans` false: the SAN matchers were remora's own default (see the module doc), so a
/// single DNS or IP matcher, the form that default takes, is not read (any other form is:
/// someone changed it).
fn validation_from(
    c: &etls::CommonTlsContext,
    read_sans: bool,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<Validation> {
    let v = match &c.validation_context_type {
        None => return None,
        Some(ValidationContextType::ValidationContext(v)) => v,
        Some(ValidationContextType::ValidationContextSdsSecretConfig(_)) => {
            e.add(
                &at.field("validation_context_sds_secret_config"),
                "SDS is not supported yet: name the CA file in validation_context.trusted_ca",
            );
            return None;
        }
        Some(ValidationContextType::CombinedValidationContext(_)) => {
            e.add(
                &at.field("combined_validation_context"),
                "not supported (it needs SDS): use validation_context",
            );
            return None;
        }
        Some(ValidationContextType::ValidationContextCertificateProvider(_)) => {
            e.add(
                &at.field("validation_context_certificate_provider"),
                "not supported",
            );
            return None;
        }
        Some(ValidationContextType::ValidationContextCertificateProviderInstance(_)) => {
            e.add(
                &at.field("validation_context_certificate_provider_instance"),
                "not supported",
            );
            return None;
        }
    };
    let at = at.field("validation_context");
    unsupported(
        e,
        &at,
        &[
            (
                "ca_certificate_provider_instance",
                v.ca_certificate_provider_instance.is_some(),
            ),
            ("system_root_certs", v.system_root_certs.is_some()),
            (
                "verify_certificate_spki",
                !v.verify_certificate_spki.is_empty(),
            ),
            (
                "verify_certificate_hash",
                !v.verify_certificate_hash.is_empty(),
            ),
            (
                "match_subject_alt_names (use match_typed_subject_alt_names)",
                !v.match_subject_alt_names.is_empty(),
            ),
            (
                "require_signed_certificate_timestamp",
                bool_set(v.require_signed_certificate_timestamp),
            ),
            ("crl", v.crl.is_some()),
            ("allow_expired_certificate", v.allow_expired_certificate),
            ("trust_chain_verification", v.trust_chain_verification != 0),
            (
                "custom_validator_config",
                v.custom_validator_config.is_some(),
            ),
            ("max_verify_depth", v.max_verify_depth.is_some()),
        ],
    );
    // Ignored: watched_directory, only_verify_leaf_cert_crl (no CRLs),
    // suppress_client_ca_list.
    let trusted_ca_at = at.field("trusted_ca");
    let trusted_ca = match &v.trusted_ca {
        Some(source) => file_from(Some(source), &trusted_ca_at, e),
        None => {
            e.add(&trusted_ca_at, "is required");
            None
        }
    };
    let mut sans = Vec::new();
    let kind_of = |m: &etls::SubjectAltNameMatcher| {
        SanType::try_from(m.san_type).unwrap_or(SanType::Unspecified)
    };
    let default_form = match v.match_typed_subject_alt_names.as_slice() {
        [m] => {
            matches!(kind_of(m), SanType::Dns | SanType::IpAddress)
                && matches!(
                    m.matcher.as_ref().and_then(|s| s.match_pattern.as_ref()),
                    Some(MatchPattern::Exact(_))
                )
        }
        _ => false,
    };
    let matchers = if !read_sans && default_form {
        &[]
    } else {
        v.match_typed_subject_alt_names.as_slice()
    };
    for (i, m) in matchers.iter().enumerate() {
        let m_at = at.item("match_typed_subject_alt_names", i);
        let kind = kind_of(m);
        if !matches!(kind, SanType::Uri | SanType::Dns) {
            e.add(
                &m_at.field("san_type"),
                format!("{} is not supported (URI and DNS are)", kind.as_str_name()),
            );
            continue;
        }
        match m.matcher.as_ref().and_then(|s| s.match_pattern.as_ref()) {
            // remora tells a URI from a DNS name by its `://` (see `cluster_to`).
            Some(MatchPattern::Exact(name)) if name.contains("://") != (kind == SanType::Uri) => e
                .add(
                    &m_at.field("matcher"),
                    format!(
                        "a {} SAN {} `://`: remora tells URI from DNS names by it",
                        kind.as_str_name(),
                        if kind == SanType::Uri {
                            "without"
                        } else {
                            "with"
                        }
                    ),
                ),
            Some(MatchPattern::Exact(name)) if !name.is_empty() => sans.push(name.clone()),
            _ => e.add(
                &m_at.field("matcher"),
                "only a non-empty `exact` match is supported",
            ),
        }
    }
    Some(Validation { trusted_ca, sans })
}

/// A data source that names a file; inline secrets are refused.
fn file_from(source: Option<&ecore::DataSource>, at: &At<'_>, e: &mut Errs) -> Option<String> {
    use ecore::data_source::Specifier;
    match source.and_then(|s| s.specifier.as_ref()) {
        Some(Specifier::Filename(path)) if !path.is_empty() => Some(path.clone()),
        Some(Specifier::InlineBytes(_)) | Some(Specifier::InlineString(_)) => {
            e.add(
                at,
                "inline secrets are not supported yet: name a file (`filename`)",
            );
            None
        }
        Some(Specifier::EnvironmentVariable(_)) => {
            e.add(
                at,
                "environment_variable is not supported: name a file (`filename`)",
            );
            None
        }
        _ => {
            e.add(at, "needs a `filename`");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{from_envoy, to_envoy};
    use super::*;
    use crate::config::raw::RawConfig;
    use remora_xds::envoy_types::pb::envoy::config::cluster::v3 as cl;

    /// Unvalidated (the files need not exist: the conversion never reads them).
    fn raw(yaml: &str) -> RawConfig {
        serde_yaml_ng::from_str(yaml).unwrap_or_else(|e| panic!("{e}"))
    }

    const CONFIG: &str = r#"
listeners:
  - { name: plain, address: 127.0.0.1:1, route_config: r }
  - name: https
    address: 127.0.0.1:2
    route_config: r
    tls: { cert_file: /c.pem, key_file: /k.pem }
  - name: mtls
    address: 127.0.0.1:3
    protocol: http1
    route_config: r
    tls: { cert_file: /c.pem, key_file: /k.pem, client_ca_file: /ca.pem, alpn: [http/1.1, h2] }
route_configs: [{ name: r, virtual_hosts: [] }]
clusters:
  - name: spiffe
    protocol: http2
    endpoints: [{ address: 10.0.0.1:443 }]
    tls:
      sni: payments.shop.svc
      ca_file: /ca.pem
      cert_file: /c.pem
      key_file: /k.pem
      verify_subject_alt_names: ["spiffe://mesh.local/ns/shop/sa/payments", payments.shop.svc]
  - name: by-host
    type: strict_dns
    protocol: auto
    endpoints: [{ address: "api.example.com:443" }]
    tls: { ca_file: /ca.pem }
  - name: by-ip
    endpoints: [{ address: "10.0.0.2:443" }]
    tls: { ca_file: /ca.pem }
  - name: by-sni
    endpoints: [{ address: "10.0.0.3:443" }]
    tls: { ca_file: /ca.pem, sni: api.internal }
"#;

    #[test]
    fn tls_survives_the_round_trip() {
        let raw = raw(CONFIG);
        let back = from_envoy(&to_envoy(&raw)).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(back.listeners, raw.listeners);
        assert_eq!(back.clusters, raw.clusters);
    }

    fn downstream(res: &remora_xds::Resources, listener: usize) -> etls::DownstreamTlsContext {
        let socket = res.listeners[listener].filter_chains[0]
            .transport_socket
            .as_ref()
            .expect("a TLS socket");
        assert_eq!(socket.name, TLS_SOCKET);
        match &socket.config_type {
            Some(ecore::transport_socket::ConfigType::TypedConfig(a)) => decode_any(a).unwrap(),
            None => panic!("no typed_config"),
        }
    }

    fn upstream(c: &cl::Cluster) -> etls::UpstreamTlsContext {
        match &c
            .transport_socket
            .as_ref()
            .expect("a TLS socket")
            .config_type
        {
            Some(ecore::transport_socket::ConfigType::TypedConfig(a)) => decode_any(a).unwrap(),
            None => panic!("no typed_config"),
        }
    }

    fn sans(c: &etls::UpstreamTlsContext) -> Vec<(i32, String)> {
        let Some(ValidationContextType::ValidationContext(v)) = &c
            .common_tls_context
            .as_ref()
            .unwrap()
            .validation_context_type
        else {
            panic!("no validation context")
        };
        v.match_typed_subject_alt_names
            .iter()
            .map(|m| match &m.matcher.as_ref().unwrap().match_pattern {
                Some(MatchPattern::Exact(s)) => (m.san_type, s.clone()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    /// What Envoy is given makes it behave as remora does: ALPN offered by default, a client
    /// certificate required with a client CA, and the upstream's name checked.
    #[test]
    fn envoy_gets_remora_behaviour_written_out() {
        let res = to_envoy(&raw(CONFIG));
        assert!(res.listeners[0].filter_chains[0].transport_socket.is_none());
        let https = downstream(&res, 1);
        let common = https.common_tls_context.as_ref().unwrap();
        assert_eq!(common.alpn_protocols, ["h2", "http/1.1"]);
        assert!(https.require_client_certificate.is_none());
        let mtls = downstream(&res, 2);
        assert_eq!(mtls.require_client_certificate.map(|b| b.value), Some(true));
        assert_eq!(
            mtls.common_tls_context.as_ref().unwrap().alpn_protocols,
            ["http/1.1", "h2"]
        );

        let spiffe = upstream(&res.clusters[0]);
        assert_eq!(spiffe.sni, "payments.shop.svc");
        assert_eq!(
            sans(&spiffe),
            [
                (
                    SanType::Uri as i32,
                    "spiffe://mesh.local/ns/shop/sa/payments".into()
                ),
                (SanType::Dns as i32, "payments.shop.svc".into()),
            ]
        );
        assert_eq!(
            spiffe.common_tls_context.as_ref().unwrap().alpn_protocols,
            ["h2"]
        );
        let by_host = upstream(&res.clusters[1]);
        assert_eq!(by_host.sni, "api.example.com");
        assert_eq!(
            by_host.common_tls_context.as_ref().unwrap().alpn_protocols,
            ["h2", "http/1.1"]
        );
        assert_eq!(
            sans(&by_host),
            [(SanType::Dns as i32, "api.example.com".into())]
        );
        let by_ip = upstream(&res.clusters[2]);
        assert_eq!(by_ip.sni, "");
        assert_eq!(
            sans(&by_ip),
            [(SanType::IpAddress as i32, "10.0.0.2".into())]
        );
        let by_sni = upstream(&res.clusters[3]);
        assert_eq!(
            sans(&by_sni),
            [(SanType::Dns as i32, "api.internal".into())]
        );
    }

    fn errors_after(change: impl FnOnce(&mut remora_xds::Resources)) -> Vec<String> {
        let mut res = to_envoy(&raw(CONFIG));
        res.listeners.iter_mut().for_each(|l| l.metadata = None);
        res.clusters.iter_mut().for_each(|c| c.metadata = None);
        change(&mut res);
        from_envoy(&res).expect_err("refused")
    }

    fn set_downstream(res: &mut remora_xds::Resources, i: usize, c: &etls::DownstreamTlsContext) {
        res.listeners[i].filter_chains[0].transport_socket = Some(socket(any(c)));
    }

    fn set_upstream(res: &mut remora_xds::Resources, i: usize, c: &etls::UpstreamTlsContext) {
        res.clusters[i].transport_socket = Some(socket(any(c)));
    }

    /// SDS, inline secrets, optional client certificates and unchecked upstreams are refused,
    /// each by its resource and field.
    #[test]
    fn unsupported_tls_is_refused_by_name() {
        let errs = errors_after(|res| {
            let mut c = downstream(res, 1);
            let common = c.common_tls_context.as_mut().unwrap();
            common.tls_certificates.clear();
            common
                .tls_certificate_sds_secret_configs
                .push(Default::default());
            set_downstream(res, 1, &c);
        });
        assert!(
            errs.iter().any(|e| e.starts_with(
                "listener `https`: filter_chains[0].transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs: SDS is not supported yet"
            )),
            "{errs:#?}"
        );

        let errs = errors_after(|res| {
            let mut c = downstream(res, 1);
            let cert = &mut c.common_tls_context.as_mut().unwrap().tls_certificates[0];
            cert.private_key = Some(ecore::DataSource {
                specifier: Some(ecore::data_source::Specifier::InlineString("KEY".into())),
                watched_directory: None,
            });
            set_downstream(res, 1, &c);
        });
        assert!(
            errs.iter().any(|e| e
                .contains("tls_certificates[0].private_key: inline secrets are not supported yet")),
            "{errs:#?}"
        );

        let errs = errors_after(|res| {
            let mut c = downstream(res, 2);
            c.require_client_certificate = None;
            set_downstream(res, 2, &c);
        });
        assert!(
            errs.iter().any(|e| e.starts_with("listener `mtls`:")
                && e.contains("require_client_certificate: must be true")),
            "{errs:#?}"
        );

        let errs = errors_after(|res| {
            let mut c = upstream(&res.clusters[2]);
            c.common_tls_context
                .as_mut()
                .unwrap()
                .validation_context_type = None;
            set_upstream(res, 2, &c);
        });
        assert!(
            errs.iter().any(|e| e.starts_with("cluster `by-ip`: transport_socket.typed_config.common_tls_context.validation_context: is required")),
            "{errs:#?}"
        );

        let errs = errors_after(|res| {
            let mut c = upstream(&res.clusters[0]);
            if let Some(ValidationContextType::ValidationContext(v)) = &mut c
                .common_tls_context
                .as_mut()
                .unwrap()
                .validation_context_type
            {
                v.match_typed_subject_alt_names[0].matcher = Some(matcher::StringMatcher {
                    match_pattern: Some(MatchPattern::Prefix("spiffe://".into())),
                    ignore_case: false,
                });
                v.allow_expired_certificate = true;
            }
            set_upstream(res, 0, &c);
        });
        assert!(
            errs.iter().any(|e| e.ends_with("match_typed_subject_alt_names[0].matcher: only a non-empty `exact` match is supported")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.ends_with("validation_context.allow_expired_certificate: not supported")),
            "{errs:#?}"
        );
    }

    /// A SAN matcher whose kind remora cannot tell from its name, and a verify depth, are
    /// refused; a default SAN matcher someone replaced is read, not dropped as the default.
    #[test]
    fn san_matchers_are_read_as_written() {
        fn validation(c: &mut etls::UpstreamTlsContext) -> &mut etls::CertificateValidationContext {
            match &mut c
                .common_tls_context
                .as_mut()
                .unwrap()
                .validation_context_type
            {
                Some(ValidationContextType::ValidationContext(v)) => v,
                _ => panic!("no validation context"),
            }
        }
        let errs = errors_after(|res| {
            let mut c = upstream(&res.clusters[0]);
            let v = validation(&mut c);
            v.match_typed_subject_alt_names[1].san_type = SanType::Uri as i32;
            v.max_verify_depth = Some(super::super::u32v(1));
            set_upstream(res, 0, &c);
        });
        assert!(
            errs.iter().any(|e| e.ends_with("match_typed_subject_alt_names[1].matcher: a URI SAN without `://`: remora tells URI from DNS names by it")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.ends_with("validation_context.max_verify_depth: not supported")),
            "{errs:#?}"
        );

        // `by-host` keeps its metadata (`defaulted`), but its matcher is now a SPIFFE ID.
        let mut res = to_envoy(&raw(CONFIG));
        let mut c = upstream(&res.clusters[1]);
        validation(&mut c).match_typed_subject_alt_names = vec![san_matcher(
            SanType::Uri,
            "spiffe://mesh.local/ns/api/sa/api",
        )];
        set_upstream(&mut res, 1, &c);
        let back = from_envoy(&res).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(
            back.clusters[1]
                .tls
                .as_ref()
                .unwrap()
                .verify_subject_alt_names,
            ["spiffe://mesh.local/ns/api/sa/api"]
        );
    }

    /// A plain raw-buffer socket is plain text, as no socket at all.
    #[test]
    fn a_raw_buffer_socket_is_plain_text() {
        let mut res = to_envoy(&raw(CONFIG));
        res.listeners[0].filter_chains[0].transport_socket = Some(ecore::TransportSocket {
            name: super::super::RAW_BUFFER.into(),
            config_type: None,
        });
        let back = from_envoy(&res).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(back.listeners[0].tls, None);
    }
}
