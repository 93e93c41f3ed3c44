//! Conversion between remora's config (the YAML model) and Envoy's xDS v3 resources, both ways.
//!
//! [`to_envoy`] is what `remora control-plane` serves (to remora and to Envoy alike);
//! [`from_envoy`] is what remora makes of the resources a control plane sends. The two are
//! inverse: for every config that validates, `from_envoy(&to_envoy(&raw))` gives back its
//! listeners, route configs and clusters exactly.
//!
//! How the conversion keeps both sides behaving alike:
//! - Where remora's default differs from Envoy's (listener `request_headers_timeout` and
//!   `idle_timeout`, cluster `idle_timeout`, the health-check fields Envoy requires, retry
//!   backoff), `to_envoy` writes remora's default explicitly and records the field as
//!   `defaulted` in the resource's metadata (below), so that `from_envoy` gives `None` back.
//!   Resources from another control plane that leave such a field unset get remora's
//!   default, not Envoy's (e.g. a 10s request-headers timeout where Envoy has none).
//! - Values Envoy has no field for are carried for remora only in
//!   `metadata.filter_metadata["remora"].extras`, a list of `key=value` strings (a list, not
//!   a Struct's map, so that the encoding and hence the served version are deterministic).
//!   Envoy ignores them; [`NOT_CARRIED`] lists what Envoy does not honour.
//! - Host matching: remora ignores the request's port unless a domain names one; Envoy
//!   matches the port unless told otherwise. `to_envoy` sets the route configuration's
//!   `ignore_port_in_host_matching` (which, unlike the HCM's `strip_any_host_port`, leaves
//!   the Host header forwarded upstream untouched, as remora does) unless one of its domains
//!   names a port: then Envoy must see ports, and a portless domain no longer matches a
//!   request that carries one (remora's would). `from_envoy` accepts
//!   `ignore_port_in_host_matching`, `strip_any_host_port` and `strip_matching_host_port`
//!   either way: remora's rule is fixed.
//! - Ring hash: remora hashes per cluster (`hash_on`); Envoy reads the cluster-level
//!   `hash_policy` of the upstream `HttpProtocolOptions` (Envoy ≥ 1.37), which overrides the
//!   routes'. `to_envoy` writes it there; `from_envoy` reads it there, else from the
//!   `hash_policy` of the routes that point at the cluster (which must then agree).
//! - Fields remora does not implement and that would change behaviour if ignored are errors
//!   naming the field (the resource is NACKed); cosmetic and tuning fields are ignored.

// Several Envoy fields remora reads or writes are deprecated in the API but still honoured
// (`dns_refresh_rate`, `per_request_buffer_limit_bytes`, `HeaderValueOption.append`, ...).
#![allow(deprecated)]

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use prost::{Message, Name};
use remora_xds::envoy_types::pb::envoy::config::accesslog::v3 as alog;
use remora_xds::envoy_types::pb::envoy::config::cluster::v3 as cl;
use remora_xds::envoy_types::pb::envoy::config::core::v3 as ecore;
use remora_xds::envoy_types::pb::envoy::config::endpoint::v3 as ep;
use remora_xds::envoy_types::pb::envoy::config::listener::v3 as lis;
use remora_xds::envoy_types::pb::envoy::config::route::v3 as rt;
use remora_xds::envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
use remora_xds::envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    StderrAccessLog, StdoutAccessLog,
};
use remora_xds::envoy_types::pb::envoy::extensions::clusters::dns::v3::DnsCluster;
use remora_xds::envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use remora_xds::envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use remora_xds::envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use remora_xds::envoy_types::pb::envoy::extensions::upstreams::http::v3 as uhttp;
use remora_xds::envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use remora_xds::envoy_types::pb::envoy::r#type::v3 as etype;
use remora_xds::envoy_types::pb::google::protobuf as pbuf;
use remora_xds::Resources;

use super::duration::Dur;
use crate::config::raw::*;

use ecore::socket_address::PortSpecifier;
use hcm::http_connection_manager::{CodecType, RouteSpecifier};
use pbuf::value::Kind;
use rt::route_action::hash_policy::PolicySpecifier;
use rt::route_action::{ClusterSpecifier, HashPolicy, HostRewriteSpecifier};

mod rbac;
mod tls;

// === Public API ===

/// remora's dynamic resources, converted from Envoy's.
#[derive(Debug, Clone, Default, PartialEq, Hash)]
pub struct Dynamic {
    pub listeners: Vec<RawListener>,
    pub route_configs: Vec<RawRouteConfig>,
    pub clusters: Vec<RawCluster>,
    /// Endpoints from EDS for clusters of the static config (`type: eds`), by cluster name.
    pub assignments: std::collections::BTreeMap<String, Vec<RawEndpoint>>,
}

/// remora fields Envoy does not honour as remora does. Each is still carried so that the
/// round trip is exact (in Envoy's nearest field, or in the `remora` metadata that only
/// remora reads), except where the entry says it comes back changed.
pub const NOT_CARRIED: &[&str] = &[
    "listeners[].max_connections: Envoy's Listener has no connection limit (the overload manager or a connection_limit filter would be needed); carried in metadata `remora` for remora only",
    "listeners[].max_request_headers_bytes: Envoy's max_request_headers_kb counts KiB; a value that is not a multiple of 1024 is rounded up for Envoy (the exact value is in metadata `remora`)",
    "listeners[].access_log: becomes Envoy's file access log on the same path, in Envoy's own text format rather than remora's JSON lines",
    "retry_policy.retry_non_idempotent: Envoy retries every method on its conditions; carried in metadata `remora` of the route or virtual host for remora only",
    "retry_policy.replay_buffer_bytes: becomes per_request_buffer_limit_bytes of the route or virtual host holding the policy (Envoy also caps it at the connection buffer limit, 1 MiB by default)",
    "clusters[].retry_budget: becomes circuit_breakers.thresholds[0].retry_budget, whose semantics are close but not equal (Envoy budgets concurrent retries against active requests): ratio → budget_percent (capped at 100 for Envoy), min_retries_per_second → min_retry_concurrency, window → budget_interval",
    "clusters[].outlier_detection.half_open_probes: Envoy has no half-open state; carried in metadata `remora` for remora only",
    "clusters[].outlier_detection.consecutive_local_origin_failure: carried, but Envoy counts it only with split_external_local_origin_errors, which would change what consecutive_5xx counts, so it is not set",
    "routes[].name: an empty name (`name: \"\"`) comes back absent (Envoy's name is a plain string)",
    "clusters[].health_check.host: an empty host comes back absent (both mean the cluster name)",
    "timeout, retry_policy, prefix_rewrite, host_rewrite and upgrade_configs on a direct_response route: Envoy's direct response has no place for them (remora ignores them there); they are dropped",
];

/// remora config → Envoy resources (what `remora control-plane` serves, to remora and to Envoy).
pub fn to_envoy(raw: &RawConfig) -> Resources {
    let mut endpoints = Vec::new();
    let clusters = raw
        .clusters
        .iter()
        .map(|c| cluster_to(c, &mut endpoints))
        .collect();
    Resources {
        listeners: raw
            .listeners
            .iter()
            .map(|l| {
                let authorizes = raw
                    .route_configs
                    .iter()
                    .any(|rc| rc.name == l.route_config && rbac::authorizes(rc));
                listener_to(l, authorizes)
            })
            .collect(),
        route_configs: raw.route_configs.iter().map(route_config_to).collect(),
        clusters,
        endpoints,
    }
}

/// Envoy resources → remora config. Every error names the resource and the field path, e.g.
/// "listener `ingress`: filter_chains[0].filters[0].typed_config.http_filters[1] (envoy.filters.http.lua): not supported (only the router filter is; mark others `is_optional`)".
pub fn from_envoy(res: &Resources) -> Result<Dynamic, Vec<String>> {
    let mut e = Errs::default();
    let mut out = Dynamic::default();

    // Listeners, and the route configs some of them hold inline.
    let listener_labels: Vec<String> = res
        .listeners
        .iter()
        .map(|l| format!("listener `{}`", l.name))
        .collect();
    let mut inline = Vec::new();
    for (l, label) in res.listeners.iter().zip(&listener_labels) {
        let (listener, route_config) = listener_from(l, &At::root(label), &mut e);
        if let Some((path, rc)) = route_config {
            inline.push((label.as_str(), path, listener.route_config.clone(), rc));
        }
        out.listeners.push(listener);
    }

    // Route configs: those sent by RDS, then the inline ones (named after the listener when
    // they have no name of their own).
    let rds_labels: Vec<String> = res
        .route_configs
        .iter()
        .map(|rc| format!("route config `{}`", rc.name))
        .collect();
    let mut tables: Vec<(At<'_>, String, &rt::RouteConfiguration)> = res
        .route_configs
        .iter()
        .zip(&rds_labels)
        .map(|(rc, label)| (At::root(label), rc.name.clone(), rc))
        .collect();
    for (label, path, name, rc) in &inline {
        tables.push((
            At {
                res: label,
                path: path.clone(),
            },
            name.clone(),
            rc,
        ));
    }
    for (at, name, rc) in &tables {
        out.route_configs
            .push(route_config_from(rc, name.clone(), at, &mut e));
    }

    // Clusters, with their endpoints and (for ring hash) the routes' hash policies.
    let assignments: HashMap<&str, &ep::ClusterLoadAssignment> = res
        .endpoints
        .iter()
        .map(|cla| (cla.cluster_name.as_str(), cla))
        .collect();
    let route_hashes = route_hash_policies(&tables);
    let cluster_labels: Vec<String> = res
        .clusters
        .iter()
        .map(|c| format!("cluster `{}`", c.name))
        .collect();
    for (c, label) in res.clusters.iter().zip(&cluster_labels) {
        let at = At::root(label);
        out.clusters
            .push(cluster_from(c, &assignments, &route_hashes, &at, &mut e));
    }

    if e.0.is_empty() {
        Ok(out)
    } else {
        Err(e.0)
    }
}

// === Listener ===

const HCM_FILTER: &str = "envoy.filters.network.http_connection_manager";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
const FILE_LOGGER: &str = "envoy.access_loggers.file";
const RAW_BUFFER: &str = "envoy.transport_sockets.raw_buffer";
const HCM_PATH: &str = "typed_config";

/// `authorizes`: its route config sets `authorization` somewhere (the RBAC filter is added).
fn listener_to(l: &RawListener, authorizes: bool) -> lis::Listener {
    let mut x = Extras::default();
    let manager = hcm_to(l, authorizes, &mut x);
    if let Some(n) = l.max_connections {
        x.set("max_connections", n);
    }
    let transport_socket = l
        .tls
        .as_ref()
        .map(|t| tls::listener_to(t, l.protocol, &mut x));
    lis::Listener {
        name: l.name.clone(),
        address: Some(socket_address(&l.address)),
        filter_chains: vec![lis::FilterChain {
            filters: vec![lis::Filter {
                name: HCM_FILTER.into(),
                config_type: Some(lis::filter::ConfigType::TypedConfig(any(&manager))),
            }],
            transport_socket,
            ..Default::default()
        }],
        metadata: x.metadata(),
        ..Default::default()
    }
}

fn hcm_to(l: &RawListener, authorizes: bool, x: &mut Extras) -> hcm::HttpConnectionManager {
    use crate::config::compile::{DEFAULT_IDLE_TIMEOUT, DEFAULT_REQUEST_HEADERS_TIMEOUT};
    let headers_timeout = or_default(
        l.request_headers_timeout,
        Dur(DEFAULT_REQUEST_HEADERS_TIMEOUT),
        "request_headers_timeout",
        x,
    );
    let idle_timeout = or_default(l.idle_timeout, Dur(DEFAULT_IDLE_TIMEOUT), "idle_timeout", x);
    let max_request_headers_kb = l.max_request_headers_bytes.map(|bytes| {
        if bytes % 1024 != 0 {
            x.set("max_request_headers_bytes", bytes);
        }
        u32v(u32_of(bytes.div_ceil(1024)))
    });
    hcm::HttpConnectionManager {
        codec_type: match l.protocol {
            ListenerProtocol::Auto => CodecType::Auto,
            ListenerProtocol::Http1 => CodecType::Http1,
            ListenerProtocol::Http2 => CodecType::Http2,
        } as i32,
        stat_prefix: l.name.clone(),
        route_specifier: Some(RouteSpecifier::Rds(hcm::Rds {
            config_source: Some(ads()),
            route_config_name: l.route_config.clone(),
        })),
        http_filters: if authorizes {
            vec![rbac::filter(), router_filter()]
        } else {
            vec![router_filter()]
        },
        common_http_protocol_options: Some(ecore::HttpProtocolOptions {
            idle_timeout: Some(pb_dur(idle_timeout)),
            max_headers_count: l.max_request_headers_count.map(|n| u32v(u32_of(n))),
            ..Default::default()
        }),
        request_headers_timeout: Some(pb_dur(headers_timeout)),
        // remora's default is Envoy's (5 minutes): written only when set.
        stream_idle_timeout: l.stream_idle_timeout.map(pb_dur),
        max_request_headers_kb,
        normalize_path: l.normalize_path.then_some(pbuf::BoolValue { value: true }),
        merge_slashes: l.merge_slashes,
        access_log: l.access_log.iter().map(access_log_to).collect(),
        // remora replaces a client-sent XFCC with the verified peer's (By, Hash, URI).
        forward_client_cert_details: if l.tls.is_some() {
            hcm::http_connection_manager::ForwardClientCertDetails::SanitizeSet as i32
        } else {
            0
        },
        set_current_client_cert_details: l.tls.as_ref().map(|_| {
            hcm::http_connection_manager::SetCurrentClientCertDetails {
                uri: true,
                ..Default::default()
            }
        }),
        // remora tunnels WebSocket upgrades unless a route disables them; Envoy only when
        // the connection manager enables the type.
        upgrade_configs: vec![hcm::http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The router, last and only: remora runs no other HTTP filter. Envoy's own `x-envoy-*`
/// response and upstream headers are suppressed, as remora adds none.
fn router_filter() -> hcm::HttpFilter {
    hcm::HttpFilter {
        name: ROUTER_FILTER.into(),
        config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(&Router {
            suppress_envoy_headers: true,
            ..Default::default()
        }))),
        ..Default::default()
    }
}

fn access_log_to(log: &RawAccessLog) -> alog::AccessLog {
    alog::AccessLog {
        name: FILE_LOGGER.into(),
        filter: None,
        config_type: Some(alog::access_log::ConfigType::TypedConfig(any(
            &FileAccessLog {
                path: log.path.clone(),
                access_log_format: None,
            },
        ))),
    }
}

/// A listener, and the route config it holds inline (with its field path) if any.
fn listener_from(
    l: &lis::Listener,
    at: &At<'_>,
    e: &mut Errs,
) -> (RawListener, Option<(String, rt::RouteConfiguration)>) {
    let x = Extras::read(l.metadata.as_ref(), at, e);
    unsupported(
        e,
        at,
        &[
            ("additional_addresses", !l.additional_addresses.is_empty()),
            ("listener_filters", !l.listener_filters.is_empty()),
            ("filter_chain_matcher", l.filter_chain_matcher.is_some()),
            ("fcds_config", l.fcds_config.is_some()),
            ("use_original_dst", bool_set(l.use_original_dst)),
            ("transparent", bool_set(l.transparent)),
            ("bind_to_port", l.bind_to_port.is_some_and(|b| !b.value)),
            ("udp_listener_config", l.udp_listener_config.is_some()),
            ("api_listener", l.api_listener.is_some()),
            ("internal_listener", l.listener_specifier.is_some()),
        ],
    );
    // Ignored: stat_prefix, socket options, buffer limits, drain_type, traffic_direction,
    // connection balancing, reuse_port, keepalive, backlog, listener-level access logs.
    let address = address_from(l.address.as_ref(), &at.field("address"), e);

    let mut chains: Vec<(At<'_>, &lis::FilterChain)> = l
        .filter_chains
        .iter()
        .enumerate()
        .map(|(i, c)| (at.item("filter_chains", i), c))
        .collect();
    if let Some(c) = &l.default_filter_chain {
        chains.push((at.field("default_filter_chain"), c));
    }
    let mut tls = None;
    let manager = match chains.as_slice() {
        [(chain_at, chain)] => {
            tls = chain.transport_socket.as_ref().and_then(|socket| {
                tls::listener_from(socket, &x, &chain_at.field("transport_socket"), e)
            });
            filter_chain_from(chain, chain_at, e)
        }
        _ => {
            e.add(
                &at.field("filter_chains"),
                format!(
                    "exactly one filter chain is supported, found {}",
                    chains.len()
                ),
            );
            None
        }
    };

    let mut listener = RawListener {
        tls,
        name: l.name.clone(),
        address,
        protocol: ListenerProtocol::Auto,
        route_config: String::new(),
        max_request_headers_bytes: None,
        max_request_headers_count: None,
        request_headers_timeout: None,
        idle_timeout: None,
        stream_idle_timeout: None,
        max_connections: x.number("max_connections", at, e),
        normalize_path: false,
        merge_slashes: false,
        access_log: None,
    };
    let Some((hcm_at, manager)) = manager else {
        return (listener, None);
    };
    let inline = hcm_from(&manager, &x, &mut listener, &hcm_at, e);
    (listener, inline)
}

/// The one chain's one network filter, the HTTP connection manager, decoded.
fn filter_chain_from<'a>(
    chain: &lis::FilterChain,
    at: &At<'a>,
    e: &mut Errs,
) -> Option<(At<'a>, hcm::HttpConnectionManager)> {
    if chain
        .filter_chain_match
        .as_ref()
        .is_some_and(|m| *m != lis::FilterChainMatch::default())
    {
        e.add(&at.field("filter_chain_match"), "not supported");
    }
    unsupported(
        e,
        at,
        &[("use_proxy_proto", bool_set(chain.use_proxy_proto))],
    );
    let mut found = None;
    for (i, f) in chain.filters.iter().enumerate() {
        let f_at = at.item("filters", i);
        let typed = match &f.config_type {
            Some(lis::filter::ConfigType::TypedConfig(a)) => Some(a),
            _ => None,
        };
        let is_hcm = typed.map_or(f.name == HCM_FILTER, |a| {
            type_name(a) == hcm::HttpConnectionManager::full_name()
        });
        if !is_hcm {
            e.add(
                &f_at,
                format!(
                    "network filter `{}` is not supported (only {HCM_FILTER} is)",
                    f.name
                ),
            );
            continue;
        }
        let Some(a) = typed else {
            e.add(
                &f_at.field(HCM_PATH),
                "is required (config_discovery is not supported)",
            );
            continue;
        };
        if found.is_some() {
            e.add(&f_at, "a second http_connection_manager is not supported");
            continue;
        }
        let hcm_at = f_at.field(HCM_PATH);
        match decode_any::<hcm::HttpConnectionManager>(a) {
            Ok(m) => found = Some((hcm_at, m)),
            Err(msg) => e.add(&hcm_at, msg),
        }
    }
    if found.is_none() && chain.filters.is_empty() {
        e.add(&at.field("filters"), format!("needs {HCM_FILTER}"));
    }
    found
}

/// Fills the listener from its connection manager; returns an inline route config.
fn hcm_from(
    h: &hcm::HttpConnectionManager,
    x: &Extras,
    l: &mut RawListener,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<(String, rt::RouteConfiguration)> {
    use crate::config::compile::{DEFAULT_IDLE_TIMEOUT, DEFAULT_REQUEST_HEADERS_TIMEOUT};
    l.protocol = match CodecType::try_from(h.codec_type) {
        Ok(CodecType::Auto) => ListenerProtocol::Auto,
        Ok(CodecType::Http1) => ListenerProtocol::Http1,
        Ok(CodecType::Http2) => ListenerProtocol::Http2,
        _ => {
            e.add(
                &at.field("codec_type"),
                "only AUTO, HTTP1 and HTTP2 are supported",
            );
            ListenerProtocol::Auto
        }
    };
    let mut inline = None;
    match &h.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            check_ads(
                rds.config_source.as_ref(),
                &at.field("rds.config_source"),
                e,
            );
            l.route_config = rds.route_config_name.clone();
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            let name = if rc.name.is_empty() {
                l.name.clone()
            } else {
                rc.name.clone()
            };
            l.route_config = name;
            inline = Some((at.field("route_config").path, rc.clone()));
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => e.add(&at.field("scoped_routes"), "not supported"),
        None => e.add(at, "needs `rds` or `route_config`"),
    }
    http_filters_from(&h.http_filters, at, e);
    upgrades_from(&h.upgrade_configs, at, e);

    let common = h.common_http_protocol_options.unwrap_or_default();
    l.idle_timeout = undefault(
        dur(
            common.idle_timeout,
            at,
            "common_http_protocol_options.idle_timeout",
            e,
        ),
        Dur(DEFAULT_IDLE_TIMEOUT),
        "idle_timeout",
        x,
    );
    l.max_request_headers_count = common.max_headers_count.map(|n| n.value as usize);
    l.request_headers_timeout = undefault(
        dur(h.request_headers_timeout, at, "request_headers_timeout", e),
        Dur(DEFAULT_REQUEST_HEADERS_TIMEOUT),
        "request_headers_timeout",
        x,
    );
    l.max_request_headers_bytes = h.max_request_headers_kb.map(|kb| {
        let kb = kb.value as usize;
        match x.number::<usize>("max_request_headers_bytes", at, e) {
            Some(exact) if exact.div_ceil(1024) == kb => exact,
            _ => kb * 1024,
        }
    });
    l.stream_idle_timeout = dur(h.stream_idle_timeout, at, "stream_idle_timeout", e);
    l.normalize_path = bool_set(h.normalize_path);
    l.merge_slashes = h.merge_slashes;
    l.access_log = access_log_from(&h.access_log, at, e);

    let path_action = h.path_with_escaped_slashes_action;
    use hcm::http_connection_manager::PathWithEscapedSlashesAction as Slashes;
    unsupported(
        e,
        at,
        &[
            (
                "common_http_protocol_options.max_connection_duration",
                common.max_connection_duration.is_some(),
            ),
            (
                "common_http_protocol_options.max_stream_duration",
                common.max_stream_duration.is_some(),
            ),
            (
                "common_http_protocol_options.max_requests_per_connection",
                common.max_requests_per_connection.is_some(),
            ),
            (
                "common_http_protocol_options.headers_with_underscores_action",
                common.headers_with_underscores_action != 0,
            ),
            (
                "request_timeout",
                h.request_timeout
                    .is_some_and(|d| d != pbuf::Duration::default()),
            ),
            (
                "path_with_escaped_slashes_action",
                path_action != Slashes::ImplementationSpecificDefault as i32
                    && path_action != Slashes::KeepUnchanged as i32,
            ),
            (
                "path_normalization_options",
                h.path_normalization_options.is_some(),
            ),
            ("strip_trailing_host_dot", h.strip_trailing_host_dot),
            (
                "early_header_mutation_extensions",
                !h.early_header_mutation_extensions.is_empty(),
            ),
            ("local_reply_config", h.local_reply_config.is_some()),
            (
                "forward_client_cert_details (remora never forwards a client-sent XFCC: SANITIZE or SANITIZE_SET)",
                !matches!(
                    hcm::http_connection_manager::ForwardClientCertDetails::try_from(
                        h.forward_client_cert_details
                    ),
                    Ok(hcm::http_connection_manager::ForwardClientCertDetails::Sanitize
                        | hcm::http_connection_manager::ForwardClientCertDetails::SanitizeSet)
                ),
            ),
        ],
    );
    // Accepted either way: strip_any_host_port / strip_matching_host_port (remora ignores
    // the port unless a domain names one; see the module docs). Ignored as cosmetic or
    // tuning: stat_prefix, server_name, tracing, HTTP/1 and HTTP/2 codec options,
    // drain and delayed-close timeouts, request ID and XFF settings,
    // forward_proto_config, proxy_100_continue, set_current_client_cert_details (remora
    // sends By, Hash and URI).
    inline
}

fn http_filters_from(filters: &[hcm::HttpFilter], at: &At<'_>, e: &mut Errs) {
    if filters.is_empty() {
        e.add(
            &at.field("http_filters"),
            format!("needs the router filter ({ROUTER_FILTER}) last"),
        );
    }
    for (i, f) in filters.iter().enumerate() {
        let f_at = at.field(&format!("http_filters[{i}] ({})", f.name));
        let typed = match &f.config_type {
            Some(hcm::http_filter::ConfigType::TypedConfig(a)) => Some(a),
            _ => None,
        };
        let is_router = typed.map_or(f.name == ROUTER_FILTER, |a| {
            type_name(a) == Router::full_name()
        });
        let last = i + 1 == filters.len();
        if is_router && !last {
            e.add(&f_at, "the router filter must be last");
        } else if is_router {
            match typed.map(decode_any::<Router>) {
                Some(Ok(r)) if !r.upstream_http_filters.is_empty() => e.add(
                    &f_at.field("typed_config.upstream_http_filters"),
                    "not supported",
                ),
                Some(Err(msg)) => e.add(&f_at.field("typed_config"), msg),
                // Router options are observability and header suppression: ignored.
                _ => {}
            }
        } else if last {
            e.add(
                &f_at,
                format!("the last http filter must be the router ({ROUTER_FILTER})"),
            );
        } else if rbac::is_rbac(&f.name, typed) {
            rbac::filter_from(&f.name, typed, &f_at, e);
        } else if !(f.is_optional || f.disabled) {
            // A disabled filter only runs on routes that enable it through
            // typed_per_filter_config, which remora does not read.
            e.add(
                &f_at,
                "not supported (only the router filter is; mark others `is_optional`)",
            );
        }
    }
}

/// The connection manager's upgrade types: remora tunnels WebSocket by default and any
/// other type only where a route enables it, so only `websocket`, enabled, is accepted.
fn upgrades_from(
    upgrades: &[hcm::http_connection_manager::UpgradeConfig],
    at: &At<'_>,
    e: &mut Errs,
) {
    for (i, u) in upgrades.iter().enumerate() {
        let websocket = u.upgrade_type.eq_ignore_ascii_case("websocket");
        let enabled = u.enabled.is_none_or(|b| b.value);
        if !websocket || !enabled || !u.filters.is_empty() {
            e.add(
                &at.item("upgrade_configs", i),
                format!(
                    "`{}`: only an enabled `websocket` without filters is supported here (enable other upgrades on routes)",
                    u.upgrade_type
                ),
            );
        }
    }
}

/// The first file (or stdout/stderr) access log; other loggers and access-log filters are
/// observability and are ignored.
fn access_log_from(logs: &[alog::AccessLog], at: &At<'_>, e: &mut Errs) -> Option<RawAccessLog> {
    for (i, log) in logs.iter().enumerate() {
        let Some(alog::access_log::ConfigType::TypedConfig(a)) = &log.config_type else {
            continue;
        };
        let name = type_name(a);
        let path = if name == FileAccessLog::full_name() {
            match decode_any::<FileAccessLog>(a) {
                Ok(f) => f.path,
                Err(msg) => {
                    e.add(&at.item("access_log", i), msg);
                    continue;
                }
            }
        } else if name == StdoutAccessLog::full_name() {
            "/dev/stdout".to_string()
        } else if name == StderrAccessLog::full_name() {
            "/dev/stderr".to_string()
        } else {
            continue;
        };
        return Some(RawAccessLog { path });
    }
    None
}

// === Route configuration ===

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const METHOD: &str = ":method";

fn route_config_to(rc: &RawRouteConfig) -> rt::RouteConfiguration {
    let port_named = rc
        .virtual_hosts
        .iter()
        .flat_map(|v| &v.domains)
        .any(|d| names_port(d));
    rt::RouteConfiguration {
        name: rc.name.clone(),
        virtual_hosts: rc.virtual_hosts.iter().map(vhost_to).collect(),
        ignore_port_in_host_matching: !port_named,
        ..Default::default()
    }
}

/// Whether a domain names a port (`host:80`, `[::1]:80`), as remora's router decides.
fn names_port(domain: &str) -> bool {
    match domain.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    }
}

fn vhost_to(v: &RawVirtualHost) -> rt::VirtualHost {
    let mut x = Extras::default();
    let retry_policy = v.retry_policy.as_ref().map(|p| retry_to(p, &mut x));
    rt::VirtualHost {
        name: v.name.clone(),
        domains: v.domains.clone(),
        routes: v.routes.iter().map(route_to).collect(),
        retry_policy,
        per_request_buffer_limit_bytes: replay_to(v.retry_policy.as_ref()),
        typed_per_filter_config: v.authorization.iter().map(rbac::per_route_to).collect(),
        metadata: x.metadata(),
        ..Default::default()
    }
}

fn route_to(r: &RawRoute) -> rt::Route {
    let mut x = Extras::default();
    let (action, buffer) = match &r.direct_response {
        Some(d) => (rt::route::Action::DirectResponse(direct_to(d)), None),
        None => (
            rt::route::Action::Route(route_action_to(r, &mut x)),
            replay_to(r.retry_policy.as_ref()),
        ),
    };
    rt::Route {
        name: r.name.clone().unwrap_or_default(),
        r#match: Some(match_to(&r.route_match)),
        action: Some(action),
        request_headers_to_add: r.request_headers_to_add.iter().map(header_to).collect(),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: r.response_headers_to_add.iter().map(header_to).collect(),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        per_request_buffer_limit_bytes: buffer,
        typed_per_filter_config: r.authorization.iter().map(rbac::per_route_to).collect(),
        metadata: x.metadata(),
        ..Default::default()
    }
}

fn route_action_to(r: &RawRoute, x: &mut Extras) -> rt::RouteAction {
    let cluster_specifier = if let Some(c) = &r.cluster {
        Some(ClusterSpecifier::Cluster(c.clone()))
    } else {
        r.weighted_clusters.as_ref().map(|split| {
            ClusterSpecifier::WeightedClusters(rt::WeightedCluster {
                clusters: split
                    .iter()
                    .map(|w| rt::weighted_cluster::ClusterWeight {
                        name: w.name.clone(),
                        weight: Some(u32v(w.weight)),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        })
    };
    rt::RouteAction {
        cluster_specifier,
        prefix_rewrite: r.prefix_rewrite.clone().unwrap_or_default(),
        host_rewrite_specifier: r
            .host_rewrite
            .clone()
            .map(HostRewriteSpecifier::HostRewriteLiteral),
        timeout: r.timeout.map(pb_dur),
        retry_policy: r.retry_policy.as_ref().map(|p| retry_to(p, x)),
        upgrade_configs: r
            .upgrade_configs
            .iter()
            .map(|u| rt::route_action::UpgradeConfig {
                upgrade_type: u.upgrade_type.clone(),
                enabled: Some(pbuf::BoolValue { value: u.enabled }),
                connect_config: None,
            })
            .collect(),
        ..Default::default()
    }
}

fn direct_to(d: &RawDirectResponse) -> rt::DirectResponseAction {
    rt::DirectResponseAction {
        status: u32::from(d.status),
        body: d.body.as_ref().map(|b| ecore::DataSource {
            specifier: Some(ecore::data_source::Specifier::InlineString(b.clone())),
            ..Default::default()
        }),
        body_format: None,
    }
}

fn match_to(m: &RawRouteMatch) -> rt::RouteMatch {
    use rt::route_match::PathSpecifier;
    let path_specifier = if let Some(p) = &m.prefix {
        Some(PathSpecifier::Prefix(p.clone()))
    } else if let Some(p) = &m.path {
        Some(PathSpecifier::Path(p.clone()))
    } else {
        m.regex
            .as_ref()
            .map(|re| PathSpecifier::SafeRegex(regex_matcher(re)))
    };
    rt::RouteMatch {
        path_specifier,
        headers: m
            .headers
            .iter()
            .map(header_matcher_to)
            .chain(methods_to(m.methods.as_deref()))
            .collect(),
        ..Default::default()
    }
}

fn regex_matcher(re: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: re.to_string(),
        engine_type: None,
    }
}

fn string_match(
    pattern: matcher::string_matcher::MatchPattern,
) -> rt::header_matcher::HeaderMatchSpecifier {
    rt::header_matcher::HeaderMatchSpecifier::StringMatch(matcher::StringMatcher {
        ignore_case: false,
        match_pattern: Some(pattern),
    })
}

fn header_matcher_to(h: &RawHeaderMatcher) -> rt::HeaderMatcher {
    use matcher::string_matcher::MatchPattern as P;
    use rt::header_matcher::HeaderMatchSpecifier as S;
    let spec = if let Some(v) = &h.exact {
        Some(string_match(P::Exact(v.clone())))
    } else if let Some(v) = &h.prefix {
        Some(string_match(P::Prefix(v.clone())))
    } else if let Some(v) = &h.suffix {
        Some(string_match(P::Suffix(v.clone())))
    } else if let Some(v) = &h.contains {
        Some(string_match(P::Contains(v.clone())))
    } else if let Some(re) = &h.regex {
        Some(string_match(P::SafeRegex(regex_matcher(re))))
    } else {
        // No specifier: Envoy, like remora, then checks that the header is present.
        h.present.map(S::PresentMatch)
    };
    rt::HeaderMatcher {
        name: h.name.clone(),
        invert_match: h.invert,
        header_match_specifier: spec,
        ..Default::default()
    }
}

/// remora's `methods` as a `:method` matcher: one method exactly, several as an escaped
/// `A|B` regex, and an empty list (any method) as a presence check.
fn methods_to(methods: Option<&[String]>) -> Option<rt::HeaderMatcher> {
    use matcher::string_matcher::MatchPattern as P;
    use rt::header_matcher::HeaderMatchSpecifier as S;
    let spec = match methods? {
        [] => S::PresentMatch(true),
        [one] => string_match(P::Exact(one.clone())),
        many => {
            let alternatives: Vec<String> = many.iter().map(|m| regex::escape(m)).collect();
            string_match(P::SafeRegex(regex_matcher(&alternatives.join("|"))))
        }
    };
    Some(rt::HeaderMatcher {
        name: METHOD.into(),
        header_match_specifier: Some(spec),
        ..Default::default()
    })
}

fn header_to(h: &RawHeaderValue) -> ecore::HeaderValueOption {
    use ecore::header_value_option::HeaderAppendAction as A;
    ecore::HeaderValueOption {
        header: Some(ecore::HeaderValue {
            key: h.name.clone(),
            // Envoy reads `%...%` as a command operator; `%%` is a literal `%`.
            value: h.value.replace('%', "%%"),
            raw_value: Vec::new(),
        }),
        append_action: if h.append {
            A::AppendIfExistsOrAdd
        } else {
            A::OverwriteIfExistsOrAdd
        } as i32,
        // remora adds a header with an empty value; Envoy skips it unless told.
        keep_empty_value: h.value.is_empty(),
        ..Default::default()
    }
}

fn retry_to(p: &RawRetryPolicy, x: &mut Extras) -> rt::RetryPolicy {
    use crate::retry::{DEFAULT_BASE_INTERVAL, DEFAULT_MAX_INTERVAL};
    if p.retry_non_idempotent {
        x.set("retry_non_idempotent", true);
    }
    let retry_back_off = p.backoff.as_ref().map(|b| {
        // Envoy requires base_interval; its default max is 10 × base, remora's is 250ms.
        let base = or_default(
            b.base_interval,
            Dur(DEFAULT_BASE_INTERVAL),
            "retry_policy.backoff.base_interval",
            x,
        );
        let max = match b.max_interval {
            Some(m) => Some(m),
            None if base.0 <= DEFAULT_MAX_INTERVAL => {
                x.defaulted("retry_policy.backoff.max_interval");
                Some(Dur(DEFAULT_MAX_INTERVAL))
            }
            None => None,
        };
        rt::retry_policy::RetryBackOff {
            base_interval: Some(pb_dur(base)),
            max_interval: max.map(pb_dur),
        }
    });
    rt::RetryPolicy {
        retry_on: p.retry_on.join(","),
        num_retries: p.num_retries.map(u32v),
        per_try_timeout: p.per_try_timeout.map(pb_dur),
        retriable_status_codes: p
            .retriable_status_codes
            .iter()
            .map(|c| u32::from(*c))
            .collect(),
        retry_back_off,
        // remora's retries prefer an endpoint not tried before.
        retry_host_predicate: vec![rt::retry_policy::RetryHostPredicate {
            name: PREVIOUS_HOSTS.into(),
            config_type: Some(
                rt::retry_policy::retry_host_predicate::ConfigType::TypedConfig(any(
                    &PreviousHostsPredicate {},
                )),
            ),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

fn replay_to(p: Option<&RawRetryPolicy>) -> Option<pbuf::UInt32Value> {
    p?.replay_buffer_bytes.map(|n| u32v(u32_of(n)))
}

fn route_config_from(
    rc: &rt::RouteConfiguration,
    name: String,
    at: &At<'_>,
    e: &mut Errs,
) -> RawRouteConfig {
    rbac::refuse_elsewhere(&rc.typed_per_filter_config, false, at, e);
    unsupported(
        e,
        at,
        &[
            ("vhds", rc.vhds.is_some()),
            (
                "internal_only_headers",
                !rc.internal_only_headers.is_empty(),
            ),
            (
                "request_headers_to_add",
                !rc.request_headers_to_add.is_empty(),
            ),
            (
                "request_headers_to_remove",
                !rc.request_headers_to_remove.is_empty(),
            ),
            (
                "response_headers_to_add",
                !rc.response_headers_to_add.is_empty(),
            ),
            (
                "response_headers_to_remove",
                !rc.response_headers_to_remove.is_empty(),
            ),
            (
                "request_mirror_policies",
                !rc.request_mirror_policies.is_empty(),
            ),
            ("vhost_header", !rc.vhost_header.is_empty()),
            (
                "ignore_path_parameters_in_path_matching",
                rc.ignore_path_parameters_in_path_matching,
            ),
            ("route_specifiers", !rc.route_specifiers.is_empty()),
        ],
    );
    // ignore_port_in_host_matching: accepted either way (module docs). Ignored:
    // validate_clusters, max_direct_response_body_size_bytes, typed_per_filter_config,
    // cluster_specifier_plugins (only used when a route names one, which is an error).
    RawRouteConfig {
        name,
        virtual_hosts: rc
            .virtual_hosts
            .iter()
            .enumerate()
            .map(|(i, v)| vhost_from(v, &at.item("virtual_hosts", i), e))
            .collect(),
    }
}

fn vhost_from(v: &rt::VirtualHost, at: &At<'_>, e: &mut Errs) -> RawVirtualHost {
    let x = Extras::read(v.metadata.as_ref(), at, e);
    unsupported(
        e,
        at,
        &[
            ("matcher", v.matcher.is_some()),
            ("require_tls", v.require_tls != 0),
            (
                "request_headers_to_add",
                !v.request_headers_to_add.is_empty(),
            ),
            (
                "request_headers_to_remove",
                !v.request_headers_to_remove.is_empty(),
            ),
            (
                "response_headers_to_add",
                !v.response_headers_to_add.is_empty(),
            ),
            (
                "response_headers_to_remove",
                !v.response_headers_to_remove.is_empty(),
            ),
            (
                "retry_policy_typed_config",
                v.retry_policy_typed_config.is_some(),
            ),
            ("hedge_policy", v.hedge_policy.is_some()),
            (
                "request_mirror_policies",
                !v.request_mirror_policies.is_empty(),
            ),
            ("route_specifiers", !v.route_specifiers.is_empty()),
        ],
    );
    // Ignored: virtual_clusters (stats), rate_limits, the typed_per_filter_config of filters
    // other than RBAC (remora does not run them), include_*_attempt_count,
    // request_body_buffer_limit.
    let retry_policy = v.retry_policy.as_ref().map(|p| {
        retry_from(
            p,
            v.per_request_buffer_limit_bytes,
            &x,
            &at.field("retry_policy"),
            e,
        )
    });
    let routes = v
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_from(r, retry_policy.as_ref(), &at.item("routes", i), e))
        .collect();
    RawVirtualHost {
        authorization: rbac::per_route_from(&v.typed_per_filter_config, at, e),
        name: v.name.clone(),
        domains: v.domains.clone(),
        routes,
        retry_policy,
        read_from: Default::default(),
    }
}

fn route_from(
    r: &rt::Route,
    vhost_retry: Option<&RawRetryPolicy>,
    at: &At<'_>,
    e: &mut Errs,
) -> RawRoute {
    let x = Extras::read(r.metadata.as_ref(), at, e);
    unsupported(
        e,
        at,
        &[("route_specifiers", !r.route_specifiers.is_empty())],
    );
    // Ignored: decorator, tracing, stat_prefix, typed_per_filter_config other than RBAC's.
    let route_match = match &r.r#match {
        Some(m) => match_from(m, &at.field("match"), e),
        None => {
            e.add(&at.field("match"), "is required");
            RawRouteMatch::default()
        }
    };
    let mut route = RawRoute {
        authorization: rbac::per_route_from(&r.typed_per_filter_config, at, e),
        name: (!r.name.is_empty()).then(|| r.name.clone()),
        route_match,
        cluster: None,
        weighted_clusters: None,
        direct_response: None,
        prefix_rewrite: None,
        host_rewrite: None,
        request_headers_to_add: headers_from(
            &r.request_headers_to_add,
            &at.field("request_headers_to_add"),
            e,
        ),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: headers_from(
            &r.response_headers_to_add,
            &at.field("response_headers_to_add"),
            e,
        ),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        timeout: None,
        retry_policy: None,
        upgrade_configs: Vec::new(),
    };
    match &r.action {
        Some(rt::route::Action::Route(ra)) => {
            route_action_from(ra, r, vhost_retry, &x, &mut route, &at.field("route"), e)
        }
        Some(rt::route::Action::DirectResponse(d)) => {
            route.direct_response = direct_from(d, &at.field("direct_response"), e);
        }
        Some(rt::route::Action::Redirect(_)) => e.add(&at.field("redirect"), "not supported"),
        Some(rt::route::Action::FilterAction(_)) => {
            e.add(&at.field("filter_action"), "not supported")
        }
        Some(rt::route::Action::NonForwardingAction(_)) => {
            e.add(&at.field("non_forwarding_action"), "not supported")
        }
        None => e.add(at, "needs an action: `route` or `direct_response`"),
    }
    route
}

fn route_action_from(
    ra: &rt::RouteAction,
    r: &rt::Route,
    vhost_retry: Option<&RawRetryPolicy>,
    x: &Extras,
    route: &mut RawRoute,
    at: &At<'_>,
    e: &mut Errs,
) {
    match &ra.cluster_specifier {
        Some(ClusterSpecifier::Cluster(c)) => route.cluster = Some(c.clone()),
        Some(ClusterSpecifier::WeightedClusters(w)) => {
            route.weighted_clusters = Some(weighted_from(w, &at.field("weighted_clusters"), e))
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => {
            e.add(&at.field("cluster_header"), "not supported")
        }
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => {
            e.add(&at.field("cluster_specifier_plugin"), "not supported")
        }
        Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => e.add(
            &at.field("inline_cluster_specifier_plugin"),
            "not supported",
        ),
        None => e.add(at, "needs `cluster` or `weighted_clusters`"),
    }
    route.prefix_rewrite = (!ra.prefix_rewrite.is_empty()).then(|| ra.prefix_rewrite.clone());
    match &ra.host_rewrite_specifier {
        Some(HostRewriteSpecifier::HostRewriteLiteral(h)) => route.host_rewrite = Some(h.clone()),
        Some(HostRewriteSpecifier::AutoHostRewrite(b)) if !b.value => {}
        Some(HostRewriteSpecifier::AutoHostRewrite(_)) => {
            e.add(&at.field("auto_host_rewrite"), "not supported")
        }
        Some(HostRewriteSpecifier::HostRewriteHeader(_)) => {
            e.add(&at.field("host_rewrite_header"), "not supported")
        }
        Some(HostRewriteSpecifier::HostRewritePathRegex(_)) => {
            e.add(&at.field("host_rewrite_path_regex"), "not supported")
        }
        Some(HostRewriteSpecifier::HostRewrite(_)) => e.add(
            &at.field("host_rewrite"),
            "not supported (use host_rewrite_literal)",
        ),
        None => {}
    }
    route.timeout = dur(ra.timeout, at, "timeout", e);
    route.retry_policy = match &ra.retry_policy {
        Some(p) => Some(retry_from(
            p,
            r.per_request_buffer_limit_bytes,
            x,
            &at.field("retry_policy"),
            e,
        )),
        // A route that only sets a buffer limit keeps its virtual host's policy with that
        // replay buffer (remora's policies are not merged, so it becomes the route's own).
        None => match (r.per_request_buffer_limit_bytes, vhost_retry) {
            (Some(limit), Some(policy)) => Some(RawRetryPolicy {
                replay_buffer_bytes: Some(limit.value as usize),
                ..policy.clone()
            }),
            _ => None,
        },
    };
    for (i, u) in ra.upgrade_configs.iter().enumerate() {
        if u.connect_config.is_some() {
            e.add(
                &at.item("upgrade_configs", i).field("connect_config"),
                "not supported",
            );
        }
        route.upgrade_configs.push(RawUpgradeConfig {
            upgrade_type: u.upgrade_type.clone(),
            enabled: u.enabled.is_none_or(|b| b.value),
        });
    }
    let internal_redirect = ra.internal_redirect_action != 0;
    unsupported(
        e,
        at,
        &[
            ("metadata_match", ra.metadata_match.is_some()),
            ("regex_rewrite", ra.regex_rewrite.is_some()),
            ("path_rewrite_policy", ra.path_rewrite_policy.is_some()),
            ("path_rewrite", !ra.path_rewrite.is_empty()),
            ("append_x_forwarded_host", ra.append_x_forwarded_host),
            ("idle_timeout", ra.idle_timeout.is_some()),
            ("flush_timeout", ra.flush_timeout.is_some()),
            (
                "retry_policy_typed_config",
                ra.retry_policy_typed_config.is_some(),
            ),
            (
                "request_mirror_policies",
                !ra.request_mirror_policies.is_empty(),
            ),
            ("max_grpc_timeout", ra.max_grpc_timeout.is_some()),
            ("grpc_timeout_offset", ra.grpc_timeout_offset.is_some()),
            (
                "internal_redirect_policy",
                ra.internal_redirect_policy.is_some(),
            ),
            ("internal_redirect_action", internal_redirect),
            ("hedge_policy", ra.hedge_policy.is_some()),
            ("max_stream_duration", ra.max_stream_duration.is_some()),
        ],
    );
    // hash_policy is read per cluster (cluster_from). Ignored: priority (remora has one),
    // rate_limits and cors (their filters do not run), cluster_not_found_response_code
    // (validation refuses unknown clusters), early_data_policy.
}

fn weighted_from(w: &rt::WeightedCluster, at: &At<'_>, e: &mut Errs) -> Vec<RawWeightedCluster> {
    use rt::weighted_cluster::RandomValueSpecifier as R;
    match &w.random_value_specifier {
        Some(R::HeaderName(_)) => e.add(&at.field("header_name"), "not supported"),
        Some(R::UseHashPolicy(b)) if b.value => {
            e.add(&at.field("use_hash_policy"), "not supported")
        }
        _ => {}
    }
    w.clusters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let c_at = at.item("clusters", i);
            rbac::refuse_elsewhere(&c.typed_per_filter_config, false, &c_at, e);
            unsupported(
                e,
                &c_at,
                &[
                    ("cluster_header", !c.cluster_header.is_empty()),
                    ("metadata_match", c.metadata_match.is_some()),
                    (
                        "request_headers_to_add",
                        !c.request_headers_to_add.is_empty(),
                    ),
                    (
                        "request_headers_to_remove",
                        !c.request_headers_to_remove.is_empty(),
                    ),
                    (
                        "response_headers_to_add",
                        !c.response_headers_to_add.is_empty(),
                    ),
                    (
                        "response_headers_to_remove",
                        !c.response_headers_to_remove.is_empty(),
                    ),
                    ("host_rewrite_literal", c.host_rewrite_specifier.is_some()),
                ],
            );
            let weight = c.weight.map_or_else(
                || {
                    e.add(&c_at.field("weight"), "is required");
                    0
                },
                |w| w.value,
            );
            RawWeightedCluster {
                name: c.name.clone(),
                weight,
            }
        })
        .collect()
}

fn direct_from(
    d: &rt::DirectResponseAction,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<RawDirectResponse> {
    use ecore::data_source::Specifier;
    if d.body_format.is_some() {
        e.add(&at.field("body_format"), "not supported");
    }
    let Ok(status) = u16::try_from(d.status) else {
        e.add(
            &at.field("status"),
            format!("{} is not an HTTP status", d.status),
        );
        return None;
    };
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => None,
        Some(Specifier::InlineString(s)) => Some(s.clone()),
        Some(Specifier::InlineBytes(b)) => match String::from_utf8(b.clone()) {
            Ok(s) => Some(s),
            Err(_) => {
                e.add(&at.field("body.inline_bytes"), "must be UTF-8");
                None
            }
        },
        Some(Specifier::Filename(_)) => {
            e.add(
                &at.field("body.filename"),
                "not supported (use inline_string)",
            );
            None
        }
        Some(Specifier::EnvironmentVariable(_)) => {
            e.add(
                &at.field("body.environment_variable"),
                "not supported (use inline_string)",
            );
            None
        }
    };
    Some(RawDirectResponse { status, body })
}

fn match_from(m: &rt::RouteMatch, at: &At<'_>, e: &mut Errs) -> RawRouteMatch {
    use rt::route_match::PathSpecifier;
    let mut out = RawRouteMatch::default();
    if m.case_sensitive.is_some_and(|b| !b.value) {
        e.add(
            &at.field("case_sensitive"),
            "false is not supported (remora matches paths case-sensitively)",
        );
    }
    unsupported(
        e,
        at,
        &[
            ("runtime_fraction", m.runtime_fraction.is_some()),
            ("query_parameters", !m.query_parameters.is_empty()),
            ("cookies", !m.cookies.is_empty()),
            ("grpc", m.grpc.is_some()),
            ("tls_context", m.tls_context.is_some()),
            ("dynamic_metadata", !m.dynamic_metadata.is_empty()),
            ("filter_state", !m.filter_state.is_empty()),
        ],
    );
    match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => out.prefix = Some(p.clone()),
        Some(PathSpecifier::Path(p)) => out.path = Some(p.clone()),
        Some(PathSpecifier::SafeRegex(re)) => out.regex = Some(re.regex.clone()),
        Some(PathSpecifier::ConnectMatcher(_)) => {
            e.add(&at.field("connect_matcher"), "not supported")
        }
        Some(PathSpecifier::PathSeparatedPrefix(_)) => {
            e.add(&at.field("path_separated_prefix"), "not supported")
        }
        Some(PathSpecifier::PathMatchPolicy(_)) => {
            e.add(&at.field("path_match_policy"), "not supported")
        }
        None => e.add(at, "needs `prefix`, `path` or `safe_regex`"),
    }
    for (i, h) in m.headers.iter().enumerate() {
        let h_at = at.item("headers", i);
        if h.name.eq_ignore_ascii_case(METHOD) {
            if out.methods.is_some() {
                e.add(&h_at, "a second :method matcher is not supported");
            } else {
                out.methods = methods_from(h, &h_at, e);
            }
        } else {
            out.headers.push(header_matcher_from(h, &h_at, e));
        }
    }
    out
}

/// The `:method` matcher shapes `methods_to` writes, and nothing else.
fn methods_from(h: &rt::HeaderMatcher, at: &At<'_>, e: &mut Errs) -> Option<Vec<String>> {
    use matcher::string_matcher::MatchPattern as P;
    use rt::header_matcher::HeaderMatchSpecifier as S;
    let shape = if h.invert_match || h.treat_missing_header_as_empty {
        None
    } else {
        match &h.header_match_specifier {
            Some(S::PresentMatch(true)) => Some(Vec::new()),
            Some(S::ExactMatch(m)) => Some(vec![m.clone()]),
            Some(S::SafeRegexMatch(re)) => alternatives(&re.regex),
            Some(S::StringMatch(sm)) if !sm.ignore_case => match &sm.match_pattern {
                Some(P::Exact(m)) => Some(vec![m.clone()]),
                Some(P::SafeRegex(re)) => alternatives(&re.regex),
                _ => None,
            },
            _ => None,
        }
    };
    if shape.is_none() {
        e.add(
            at,
            "on :method only an exact method or an alternation like `GET|POST` is supported",
        );
    }
    shape
}

/// `GET|POST` (with `\`-escaped characters) → the literal alternatives; `None` for any
/// other regex.
fn alternatives(re: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = re.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) if !n.is_ascii_alphanumeric() => current.push(n),
                _ => return None,
            },
            '|' => out.push(std::mem::take(&mut current)),
            '.' | '+' | '*' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '^' | '$' => return None,
            c => current.push(c),
        }
    }
    out.push(current);
    if out.iter().any(String::is_empty) {
        return None;
    }
    Some(out)
}

fn header_matcher_from(h: &rt::HeaderMatcher, at: &At<'_>, e: &mut Errs) -> RawHeaderMatcher {
    use matcher::string_matcher::MatchPattern as P;
    use rt::header_matcher::HeaderMatchSpecifier as S;
    let mut out = RawHeaderMatcher {
        name: h.name.clone(),
        invert: h.invert_match,
        ..Default::default()
    };
    if h.treat_missing_header_as_empty {
        e.add(&at.field("treat_missing_header_as_empty"), "not supported");
    }
    match &h.header_match_specifier {
        None => {}
        Some(S::PresentMatch(p)) => out.present = Some(*p),
        Some(S::ExactMatch(v)) => out.exact = Some(v.clone()),
        Some(S::PrefixMatch(v)) => out.prefix = Some(v.clone()),
        Some(S::SuffixMatch(v)) => out.suffix = Some(v.clone()),
        Some(S::ContainsMatch(v)) => out.contains = Some(v.clone()),
        Some(S::SafeRegexMatch(re)) => out.regex = Some(re.regex.clone()),
        Some(S::RangeMatch(_)) => e.add(&at.field("range_match"), "not supported"),
        Some(S::StringMatch(sm)) => {
            if sm.ignore_case {
                e.add(&at.field("string_match.ignore_case"), "not supported");
            }
            match &sm.match_pattern {
                Some(P::Exact(v)) => out.exact = Some(v.clone()),
                Some(P::Prefix(v)) => out.prefix = Some(v.clone()),
                Some(P::Suffix(v)) => out.suffix = Some(v.clone()),
                Some(P::Contains(v)) => out.contains = Some(v.clone()),
                Some(P::SafeRegex(re)) => out.regex = Some(re.regex.clone()),
                Some(P::Custom(_)) => e.add(&at.field("string_match.custom"), "not supported"),
                None => e.add(&at.field("string_match"), "needs a pattern"),
            }
        }
    }
    out
}

fn headers_from(
    options: &[ecore::HeaderValueOption],
    at: &At<'_>,
    e: &mut Errs,
) -> Vec<RawHeaderValue> {
    use ecore::header_value_option::HeaderAppendAction as A;
    let mut out = Vec::new();
    for (i, o) in options.iter().enumerate() {
        let o_at = at.index(i);
        let Some(h) = &o.header else {
            e.add(&o_at.field("header"), "is required");
            continue;
        };
        let value = if h.raw_value.is_empty() {
            h.value.clone()
        } else {
            match String::from_utf8(h.raw_value.clone()) {
                Ok(v) => v,
                Err(_) => {
                    e.add(&o_at.field("header.raw_value"), "must be UTF-8");
                    continue;
                }
            }
        };
        if value.is_empty() && !o.keep_empty_value {
            continue; // Envoy adds no header with an empty value unless told to.
        }
        let Some(value) = unescape_percent(&value) else {
            e.add(
                &o_at.field("header.value"),
                "Envoy command operators (`%...%`) are not supported (write `%%` for `%`)",
            );
            continue;
        };
        let append = match (o.append, A::try_from(o.append_action)) {
            (Some(b), _) => b.value,
            (None, Ok(A::AppendIfExistsOrAdd)) => true,
            (None, Ok(A::OverwriteIfExistsOrAdd)) => false,
            _ => {
                e.add(
                    &o_at.field("append_action"),
                    "only APPEND_IF_EXISTS_OR_ADD and OVERWRITE_IF_EXISTS_OR_ADD are supported",
                );
                continue;
            }
        };
        out.push(RawHeaderValue {
            name: h.key.clone(),
            value,
            append,
        });
    }
    out
}

/// `%%` → `%`; `None` when the value holds an Envoy command operator.
fn unescape_percent(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '%' && chars.next() != Some('%') {
            return None;
        }
        out.push(c);
    }
    Some(out)
}

fn retry_from(
    p: &rt::RetryPolicy,
    buffer: Option<pbuf::UInt32Value>,
    x: &Extras,
    at: &At<'_>,
    e: &mut Errs,
) -> RawRetryPolicy {
    use crate::retry::{condition_names, DEFAULT_BASE_INTERVAL, DEFAULT_MAX_INTERVAL};
    let retry_on: Vec<String> = p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect();
    for c in &retry_on {
        if !condition_names().any(|n| n == c) {
            let known: Vec<&str> = condition_names().collect();
            e.add(
                &at.field("retry_on"),
                format!(
                    "condition `{c}` is not supported (supported: {})",
                    known.join(", ")
                ),
            );
        }
    }
    for (i, pred) in p.retry_host_predicate.iter().enumerate() {
        let previous_hosts = match &pred.config_type {
            Some(rt::retry_policy::retry_host_predicate::ConfigType::TypedConfig(a)) => {
                type_name(a) == PreviousHostsPredicate::full_name()
            }
            None => pred.name == PREVIOUS_HOSTS,
        };
        if !previous_hosts {
            e.add(
                &at.item("retry_host_predicate", i),
                format!(
                    "`{}` is not supported (only previous_hosts, which remora always applies)",
                    pred.name
                ),
            );
        }
    }
    unsupported(
        e,
        at,
        &[
            ("per_try_idle_timeout", p.per_try_idle_timeout.is_some()),
            ("retry_priority", p.retry_priority.is_some()),
            (
                "retry_options_predicates",
                !p.retry_options_predicates.is_empty(),
            ),
            (
                "rate_limited_retry_back_off",
                p.rate_limited_retry_back_off.is_some(),
            ),
            ("retriable_headers", !p.retriable_headers.is_empty()),
            (
                "retriable_request_headers",
                !p.retriable_request_headers.is_empty(),
            ),
        ],
    );
    let mut retriable_status_codes = Vec::new();
    for (i, code) in p.retriable_status_codes.iter().enumerate() {
        match u16::try_from(*code) {
            Ok(c) => retriable_status_codes.push(c),
            Err(_) => e.add(
                &at.item("retriable_status_codes", i),
                "is not an HTTP status",
            ),
        }
    }
    let backoff = p.retry_back_off.map(|b| RawBackoff {
        base_interval: undefault(
            dur(b.base_interval, at, "retry_back_off.base_interval", e),
            Dur(DEFAULT_BASE_INTERVAL),
            "retry_policy.backoff.base_interval",
            x,
        ),
        max_interval: undefault(
            dur(b.max_interval, at, "retry_back_off.max_interval", e),
            Dur(DEFAULT_MAX_INTERVAL),
            "retry_policy.backoff.max_interval",
            x,
        ),
    });
    RawRetryPolicy {
        retry_on,
        num_retries: p.num_retries.map(|n| n.value),
        per_try_timeout: dur(p.per_try_timeout, at, "per_try_timeout", e),
        retriable_status_codes,
        backoff,
        retry_non_idempotent: x.get("retry_non_idempotent") == Some("true"),
        replay_buffer_bytes: buffer.map(|b| b.value as usize),
    }
}

// === Cluster ===

const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
/// remora's health-check defaults (as `cluster/health.rs` applies them).
const HC_INTERVAL: Duration = Duration::from_secs(5);
const HC_TIMEOUT: Duration = Duration::from_secs(1);
const HC_UNHEALTHY: u32 = 3;
const HC_HEALTHY: u32 = 2;

fn cluster_to(c: &RawCluster, assignments: &mut Vec<ep::ClusterLoadAssignment>) -> cl::Cluster {
    use cl::cluster::{ClusterDiscoveryType, DiscoveryType as D, EdsClusterConfig, LbPolicy as L};
    let mut x = Extras::default();
    let assignment = cla_to(&c.name, &c.endpoints);
    let (load_assignment, eds_cluster_config) = match c.discovery {
        DiscoveryType::Eds => {
            // Always sent, even empty, so that the cluster warms.
            assignments.push(assignment);
            let eds = EdsClusterConfig {
                eds_config: Some(ads()),
                service_name: String::new(),
            };
            (None, Some(eds))
        }
        DiscoveryType::Static | DiscoveryType::StrictDns => (Some(assignment), None),
    };
    let discovery = match c.discovery {
        DiscoveryType::Static => D::Static,
        DiscoveryType::StrictDns => D::StrictDns,
        DiscoveryType::Eds => D::Eds,
    };
    let lb_policy = match c.lb_policy {
        LbPolicy::RoundRobin => L::RoundRobin,
        LbPolicy::LeastRequest => L::LeastRequest,
        LbPolicy::Random => L::Random,
        LbPolicy::RingHash => L::RingHash,
    };
    let options = http_options_to(c, &mut x);
    let circuit_breakers = breakers_to(c, &mut x);
    let transport_socket = c.tls.as_ref().map(|t| tls::cluster_to(c, t, &mut x));
    let outlier_detection = c.outlier_detection.as_ref().map(|o| outlier_to(o, &mut x));
    let health_checks = c
        .health_check
        .iter()
        .map(|h| health_to(h, &mut x))
        .collect();
    cl::Cluster {
        name: c.name.clone(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(discovery as i32)),
        eds_cluster_config,
        load_assignment,
        lb_policy: lb_policy as i32,
        connect_timeout: c.connect_timeout.map(pb_dur),
        dns_refresh_rate: c.dns_refresh_rate.map(pb_dur),
        typed_extension_protocol_options: HashMap::from([(
            HTTP_OPTIONS.to_string(),
            any(&options),
        )]),
        circuit_breakers,
        outlier_detection,
        health_checks,
        common_lb_config: c.panic_threshold.map(|p| cl::cluster::CommonLbConfig {
            healthy_panic_threshold: Some(etype::Percent {
                value: f64::from(p),
            }),
            ..Default::default()
        }),
        transport_socket,
        metadata: x.metadata(),
        ..Default::default()
    }
}

/// The upstream protocol, the idle timeout and (ring hash) the cluster's hash policy.
fn http_options_to(c: &RawCluster, x: &mut Extras) -> uhttp::HttpProtocolOptions {
    use uhttp::http_protocol_options::explicit_http_config::ProtocolConfig;
    use uhttp::http_protocol_options::{
        AutoHttpConfig, ExplicitHttpConfig, UpstreamProtocolOptions,
    };
    let idle = or_default(
        c.idle_timeout,
        Dur(crate::cluster::DEFAULT_IDLE_TIMEOUT),
        "idle_timeout",
        x,
    );
    let explicit = |protocol| {
        UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(protocol),
        })
    };
    let protocol = match c.protocol {
        UpstreamProtocol::Http1 => {
            explicit(ProtocolConfig::HttpProtocolOptions(Default::default()))
        }
        UpstreamProtocol::Http2 => {
            explicit(ProtocolConfig::Http2ProtocolOptions(Default::default()))
        }
        UpstreamProtocol::Auto => UpstreamProtocolOptions::AutoConfig(AutoHttpConfig {
            http_protocol_options: Some(Default::default()),
            http2_protocol_options: Some(Default::default()),
            ..Default::default()
        }),
    };
    // Envoy counts KiB: a byte count that is not a multiple is rounded up for Envoy and
    // carried exactly for remora.
    let max_response_headers_kb = c.max_response_headers_bytes.map(|bytes| {
        if bytes % 1024 != 0 {
            x.set("max_response_headers_bytes", bytes);
        }
        u32v(u32_of(bytes.div_ceil(1024)))
    });
    uhttp::HttpProtocolOptions {
        common_http_protocol_options: Some(ecore::HttpProtocolOptions {
            idle_timeout: Some(pb_dur(idle)),
            max_response_headers_kb,
            ..Default::default()
        }),
        upstream_protocol_options: Some(protocol),
        hash_policy: if c.lb_policy == LbPolicy::RingHash {
            hash_policy_to(c.hash_on.as_ref())
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

/// remora's `hash_on` as Envoy hash policies: a header, terminal, falling back to the
/// client address when the request lacks it; or the client address alone. `hash_on: {}`
/// (the same meaning as no `hash_on`) is told apart by a terminal flag, a no-op on the
/// last policy.
fn hash_policy_to(hash_on: Option<&HashOn>) -> Vec<HashPolicy> {
    use rt::route_action::hash_policy::{ConnectionProperties, Header};
    let source_ip = |terminal| HashPolicy {
        terminal,
        policy_specifier: Some(PolicySpecifier::ConnectionProperties(
            ConnectionProperties { source_ip: true },
        )),
    };
    match hash_on {
        None => vec![source_ip(false)],
        Some(HashOn { header: None }) => vec![source_ip(true)],
        Some(HashOn { header: Some(name) }) => vec![
            HashPolicy {
                terminal: true,
                policy_specifier: Some(PolicySpecifier::Header(Header {
                    header_name: name.clone(),
                    regex_rewrite: None,
                })),
            },
            source_ip(false),
        ],
    }
}

fn breakers_to(c: &RawCluster, x: &mut Extras) -> Option<cl::CircuitBreakers> {
    if c.circuit_breakers.is_none() && c.retry_budget.is_none() {
        return None;
    }
    let limits = c.circuit_breakers.clone().unwrap_or_default();
    if c.retry_budget.is_some() && c.circuit_breakers == Some(RawCircuitBreakers::default()) {
        // An empty `circuit_breakers: {}` beside a budget would otherwise come back absent.
        x.set("circuit_breakers", "{}");
    }
    let max = |n: Option<usize>| n.map(|n| u32v(u32_of(n)));
    Some(cl::CircuitBreakers {
        thresholds: vec![cl::circuit_breakers::Thresholds {
            max_connections: max(limits.max_connections),
            max_pending_requests: max(limits.max_pending_requests),
            max_requests: max(limits.max_requests),
            max_retries: max(limits.max_retries),
            retry_budget: c.retry_budget.as_ref().map(|b| budget_to(b, x)),
            ..Default::default()
        }],
        per_host_thresholds: Vec::new(),
    })
}

fn budget_to(b: &RawRetryBudget, x: &mut Extras) -> cl::circuit_breakers::thresholds::RetryBudget {
    let budget_percent = b.ratio.map(|ratio| {
        let percent = (ratio * 100.0).min(100.0);
        if round_ratio(percent / 100.0) != ratio {
            x.set("retry_budget.ratio", ratio);
        }
        etype::Percent { value: percent }
    });
    cl::circuit_breakers::thresholds::RetryBudget {
        budget_percent,
        budget_interval: b.window.map(pb_dur),
        min_retry_concurrency: b.min_retries_per_second.map(u32v),
    }
}

/// A ratio back from a percentage: rounded to 12 decimals, which undoes the float error of
/// `× 100 ÷ 100` for any ratio written with up to 12 decimals.
fn round_ratio(v: f64) -> f64 {
    (v * 1e12).round() / 1e12
}

fn outlier_to(o: &RawOutlierDetection, x: &mut Extras) -> cl::OutlierDetection {
    if let Some(n) = o.half_open_probes {
        x.set("half_open_probes", n);
    }
    cl::OutlierDetection {
        consecutive_5xx: o.consecutive_5xx.map(u32v),
        consecutive_gateway_failure: o.consecutive_gateway_failure.map(u32v),
        consecutive_local_origin_failure: o.consecutive_local_origin_failure.map(u32v),
        interval: o.interval.map(pb_dur),
        base_ejection_time: o.base_ejection_time.map(pb_dur),
        max_ejection_time: o.max_ejection_time.map(pb_dur),
        max_ejection_percent: o.max_ejection_percent.map(u32v),
        // remora ejects on gateway failures (Envoy's default enforcement there is 0%) and
        // has no success-rate ejection (Envoy's default enforcement there is 100%).
        enforcing_consecutive_gateway_failure: Some(u32v(100)),
        enforcing_success_rate: Some(u32v(0)),
        ..Default::default()
    }
}

fn health_to(h: &RawHealthCheck, x: &mut Extras) -> ecore::HealthCheck {
    use ecore::health_check::{HealthChecker, HttpHealthCheck, TcpHealthCheck};
    // Envoy requires the timing fields, and a path; remora has defaults for them.
    let interval = or_default(h.interval, Dur(HC_INTERVAL), "health_check.interval", x);
    let timeout = or_default(h.timeout, Dur(HC_TIMEOUT), "health_check.timeout", x);
    let unhealthy = or_default(
        h.unhealthy_threshold,
        HC_UNHEALTHY,
        "health_check.unhealthy_threshold",
        x,
    );
    let healthy = or_default(
        h.healthy_threshold,
        HC_HEALTHY,
        "health_check.healthy_threshold",
        x,
    );
    let checker = match h.protocol {
        HealthCheckProtocol::Tcp => HealthChecker::TcpHealthCheck(TcpHealthCheck::default()),
        HealthCheckProtocol::Http => {
            let path = h.path.clone().unwrap_or_else(|| {
                x.defaulted("health_check.path");
                "/".to_string()
            });
            let expected_statuses = if h.expected_statuses.is_empty() {
                // remora's default is any 2xx; Envoy's is 200 alone.
                x.defaulted("health_check.expected_statuses");
                vec![etype::Int64Range {
                    start: 200,
                    end: 300,
                }]
            } else {
                h.expected_statuses
                    .iter()
                    .map(|s| etype::Int64Range {
                        start: i64::from(*s),
                        end: i64::from(*s) + 1,
                    })
                    .collect()
            };
            HealthChecker::HttpHealthCheck(HttpHealthCheck {
                host: h.host.clone().unwrap_or_default(),
                path,
                expected_statuses,
                ..Default::default()
            })
        }
    };
    ecore::HealthCheck {
        timeout: Some(pb_dur(timeout)),
        interval: Some(pb_dur(interval)),
        unhealthy_threshold: Some(u32v(unhealthy)),
        healthy_threshold: Some(u32v(healthy)),
        // remora jitters each interval by up to 10%, and checks idle clusters as often as
        // busy ones (Envoy's no-traffic interval is 60s by default).
        interval_jitter_percent: 10,
        no_traffic_interval: Some(pb_dur(interval)),
        health_checker: Some(checker),
        ..Default::default()
    }
}

/// What the routes say about each cluster's hash: (where, the policies).
type RouteHashes<'r> = HashMap<&'r str, Vec<(String, &'r [HashPolicy])>>;

fn route_hash_policies<'r>(
    tables: &[(At<'_>, String, &'r rt::RouteConfiguration)],
) -> RouteHashes<'r> {
    let mut out: RouteHashes<'r> = HashMap::new();
    for (at, _, rc) in tables {
        let rc: &'r rt::RouteConfiguration = rc;
        for (v, vh) in rc.virtual_hosts.iter().enumerate() {
            for (r, route) in vh.routes.iter().enumerate() {
                let Some(rt::route::Action::Route(ra)) = &route.action else {
                    continue;
                };
                if ra.hash_policy.is_empty() {
                    continue;
                }
                let place = at
                    .field(&format!("virtual_hosts[{v}].routes[{r}].route.hash_policy"))
                    .to_string();
                let clusters: Vec<&'r str> = match &ra.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(c)) => vec![c.as_str()],
                    Some(ClusterSpecifier::WeightedClusters(w)) => {
                        w.clusters.iter().map(|c| c.name.as_str()).collect()
                    }
                    _ => Vec::new(),
                };
                for c in clusters {
                    out.entry(c)
                        .or_default()
                        .push((place.clone(), ra.hash_policy.as_slice()));
                }
            }
        }
    }
    out
}

/// A list of hash policies, read as remora's `hash_on`.
enum HashSpec {
    /// No policy.
    Unset,
    /// `None`: the client address; `Some`: as written.
    Is(Option<HashOn>),
}

const HASH_SHAPES: &str = "only a header (optionally followed by connection_properties.source_ip as the fallback) or connection_properties.source_ip is supported";

fn hash_spec(policies: &[HashPolicy]) -> Result<HashSpec, &'static str> {
    let source_ip = |p: &HashPolicy| matches!(&p.policy_specifier, Some(PolicySpecifier::ConnectionProperties(c)) if c.source_ip);
    match policies {
        [] => Ok(HashSpec::Unset),
        [only] if source_ip(only) => Ok(HashSpec::Is(only.terminal.then(HashOn::default))),
        [first, rest @ ..] if rest.len() <= 1 && rest.iter().all(source_ip) => {
            // Without the fallback Envoy hashes nothing (picks at random) when the header is
            // missing, where remora hashes the client address.
            match &first.policy_specifier {
                Some(PolicySpecifier::Header(h))
                    if h.regex_rewrite.is_none() && !h.header_name.is_empty() =>
                {
                    Ok(HashSpec::Is(Some(HashOn {
                        header: Some(h.header_name.clone()),
                    })))
                }
                _ => Err(HASH_SHAPES),
            }
        }
        _ => Err(HASH_SHAPES),
    }
}

/// A ring-hash cluster's `hash_on` from the routes that point at it, which must agree.
fn hash_from_routes(
    name: &str,
    routes: &RouteHashes<'_>,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<HashOn> {
    let mut seen: Vec<(&str, Option<HashOn>)> = Vec::new();
    for (place, policies) in routes.get(name).map(Vec::as_slice).unwrap_or_default() {
        match hash_spec(policies) {
            Ok(HashSpec::Unset) => {}
            // `{}` and absent mean the same: the client address.
            Ok(HashSpec::Is(h)) => seen.push((place.as_str(), h.filter(|h| h.header.is_some()))),
            Err(msg) => e.add(at, format!("{place}: {msg}")),
        }
    }
    let (first_place, first) = seen.first()?.clone();
    if let Some((place, other)) = seen.iter().find(|(_, h)| *h != first) {
        let show = |h: &Option<HashOn>| match h {
            Some(HashOn { header: Some(n) }) => format!("header `{n}`"),
            _ => "the client address".to_string(),
        };
        e.add(
            at,
            format!(
                "routes disagree on its hash policy ({first_place} hashes {}, {place} hashes {}); remora hashes per cluster",
                show(&first),
                show(other)
            ),
        );
    }
    first
}

fn cluster_from(
    c: &cl::Cluster,
    assignments: &HashMap<&str, &ep::ClusterLoadAssignment>,
    route_hashes: &RouteHashes<'_>,
    at: &At<'_>,
    e: &mut Errs,
) -> RawCluster {
    let x = Extras::read(c.metadata.as_ref(), at, e);
    cluster_unsupported(c, at, e);
    let (discovery, dns_refresh_rate) = discovery_from(c, at, e);
    let endpoints = match discovery {
        DiscoveryType::Eds => {
            let name = eds_name(c, at, e);
            let label = format!("endpoints `{name}`");
            assignments
                .get(name)
                .map(|cla| cla_from(cla, &At::root(&label), e))
                .unwrap_or_default()
        }
        _ => c
            .load_assignment
            .as_ref()
            .map(|cla| cla_from(cla, &at.field("load_assignment"), e))
            .unwrap_or_default(),
    };
    let lb_policy = lb_from(c.lb_policy, at, e);
    let options = http_options_from(c, at, e);
    let hash_on = match (lb_policy, options.hash) {
        (LbPolicy::RingHash, HashSpec::Is(h)) => h,
        (LbPolicy::RingHash, HashSpec::Unset) => hash_from_routes(&c.name, route_hashes, at, e),
        _ => None,
    };
    let (circuit_breakers, retry_budget) = breakers_from(c.circuit_breakers.as_ref(), &x, at, e);
    let health_check = match c.health_checks.as_slice() {
        [] => None,
        [h] => Some(health_from(h, &x, &at.item("health_checks", 0), e)),
        _ => {
            e.add(
                &at.field("health_checks"),
                "only one health check is supported",
            );
            None
        }
    };
    let tls = c
        .transport_socket
        .as_ref()
        .and_then(|socket| tls::cluster_from(socket, &x, &at.field("transport_socket"), e));
    RawCluster {
        tls,
        name: c.name.clone(),
        discovery,
        lb_policy,
        hash_on,
        protocol: options.protocol,
        endpoints,
        connect_timeout: dur(c.connect_timeout, at, "connect_timeout", e),
        idle_timeout: undefault(
            options.idle_timeout,
            Dur(crate::cluster::DEFAULT_IDLE_TIMEOUT),
            "idle_timeout",
            &x,
        ),
        // Envoy allows 1 to 8192 KiB, remora 8 KiB to 1 MiB: an Envoy value outside that is
        // brought to the nearest bound rather than refused.
        max_response_headers_bytes: options.max_response_headers_kb.map(|kb| {
            let kb = kb as usize;
            match x.number::<usize>("max_response_headers_bytes", at, e) {
                Some(exact) if exact.div_ceil(1024) == kb => exact,
                _ => (kb * 1024).clamp(8192, 1 << 20),
            }
        }),
        dns_refresh_rate,
        circuit_breakers,
        retry_budget,
        outlier_detection: c
            .outlier_detection
            .as_ref()
            .map(|o| outlier_from(o, &x, &at.field("outlier_detection"), e)),
        health_check,
        panic_threshold: panic_from(c.common_lb_config.as_ref(), at, e),
    }
}

fn cluster_unsupported(c: &cl::Cluster, at: &At<'_>, e: &mut Errs) {
    for (field, set) in [
        (
            "transport_socket_matches",
            !c.transport_socket_matches.is_empty(),
        ),
        (
            "transport_socket_matcher",
            c.transport_socket_matcher.is_some(),
        ),
    ] {
        if set {
            e.add(
                &at.field(field),
                "not supported (one transport_socket per cluster)",
            );
        }
    }
    let per_host = c
        .circuit_breakers
        .as_ref()
        .is_some_and(|b| !b.per_host_thresholds.is_empty());
    unsupported(
        e,
        at,
        &[
            ("lb_subset_config", c.lb_subset_config.is_some()),
            ("load_balancing_policy", c.load_balancing_policy.is_some()),
            ("upstream_config", c.upstream_config.is_some()),
            ("filters", !c.filters.is_empty()),
            ("protocol_selection", c.protocol_selection != 0),
            ("circuit_breakers.per_host_thresholds", per_host),
        ],
    );
    // Ignored as tuning: lb_config (ring sizes, choice_count, slow start), DNS lookup
    // family, resolvers and failure refresh, respect_dns_ttl, buffer limits, cleanup_interval,
    // upstream_bind_config, preconnect_policy, common_lb_config other than the panic
    // threshold, max_requests_per_connection, lrs_server, wait_for_warm_on_init.
}

fn discovery_from(c: &cl::Cluster, at: &At<'_>, e: &mut Errs) -> (DiscoveryType, Option<Dur>) {
    use cl::cluster::{ClusterDiscoveryType, DiscoveryType as D};
    match &c.cluster_discovery_type {
        None => (DiscoveryType::Static, None),
        Some(ClusterDiscoveryType::Type(t)) => match D::try_from(*t) {
            Ok(D::Static) => (DiscoveryType::Static, None),
            Ok(D::StrictDns) => (
                DiscoveryType::StrictDns,
                dur(c.dns_refresh_rate, at, "dns_refresh_rate", e),
            ),
            Ok(D::Eds) => (DiscoveryType::Eds, None),
            Ok(other) => {
                e.add(
                    &at.field("type"),
                    format!(
                        "{} is not supported (STATIC, STRICT_DNS and EDS are)",
                        other.as_str_name()
                    ),
                );
                (DiscoveryType::Static, None)
            }
            Err(_) => {
                e.add(&at.field("type"), format!("unknown discovery type {t}"));
                (DiscoveryType::Static, None)
            }
        },
        Some(ClusterDiscoveryType::ClusterType(custom)) => {
            let c_at = at.field("cluster_type");
            match custom.typed_config.as_ref().map(decode_any::<DnsCluster>) {
                Some(Ok(dns)) => {
                    if dns.all_addresses_in_single_endpoint {
                        e.add(
                            &c_at.field("typed_config.all_addresses_in_single_endpoint"),
                            "not supported (remora makes every address an endpoint, as STRICT_DNS)",
                        );
                    }
                    let rate = dur(
                        dns.dns_refresh_rate,
                        &c_at,
                        "typed_config.dns_refresh_rate",
                        e,
                    );
                    let legacy = dur(c.dns_refresh_rate, at, "dns_refresh_rate", e);
                    (DiscoveryType::StrictDns, rate.or(legacy))
                }
                _ => {
                    e.add(
                        &c_at,
                        format!(
                            "`{}` is not supported (only the DNS cluster is)",
                            custom.name
                        ),
                    );
                    (DiscoveryType::Static, None)
                }
            }
        }
    }
}

/// The ClusterLoadAssignment an EDS cluster reads: its service_name, else its own name.
fn eds_name<'c>(c: &'c cl::Cluster, at: &At<'_>, e: &mut Errs) -> &'c str {
    match &c.eds_cluster_config {
        Some(eds) => {
            check_ads(
                eds.eds_config.as_ref(),
                &at.field("eds_cluster_config.eds_config"),
                e,
            );
            if eds.service_name.is_empty() {
                c.name.as_str()
            } else {
                eds.service_name.as_str()
            }
        }
        None => c.name.as_str(),
    }
}

fn lb_from(policy: i32, at: &At<'_>, e: &mut Errs) -> LbPolicy {
    use cl::cluster::LbPolicy as L;
    match L::try_from(policy) {
        Ok(L::RoundRobin) => LbPolicy::RoundRobin,
        Ok(L::LeastRequest) => LbPolicy::LeastRequest,
        Ok(L::Random) => LbPolicy::Random,
        Ok(L::RingHash) => LbPolicy::RingHash,
        other => {
            let name = other.map_or_else(|_| policy.to_string(), |p| p.as_str_name().to_string());
            e.add(
                &at.field("lb_policy"),
                format!("{name} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM and RING_HASH are)"),
            );
            LbPolicy::RoundRobin
        }
    }
}

/// What the upstream HTTP protocol options say.
struct HttpOptions {
    protocol: UpstreamProtocol,
    idle_timeout: Option<Dur>,
    max_response_headers_kb: Option<u32>,
    hash: HashSpec,
}

fn http_options_from(c: &cl::Cluster, at: &At<'_>, e: &mut Errs) -> HttpOptions {
    // The deprecated cluster-level fields, still honoured by Envoy.
    let mut out = HttpOptions {
        protocol: if c.http2_protocol_options.is_some() {
            UpstreamProtocol::Http2
        } else {
            UpstreamProtocol::Http1
        },
        idle_timeout: c.common_http_protocol_options.and_then(|o| {
            dur(
                o.idle_timeout,
                at,
                "common_http_protocol_options.idle_timeout",
                e,
            )
        }),
        max_response_headers_kb: None,
        hash: HashSpec::Unset,
    };
    for (key, a) in &c.typed_extension_protocol_options {
        let k_at = at.field(&format!("typed_extension_protocol_options[\"{key}\"]"));
        if key != HTTP_OPTIONS {
            e.add(&k_at, "not supported");
            continue;
        }
        match decode_any::<uhttp::HttpProtocolOptions>(a) {
            Ok(o) => read_http_options(&o, &mut out, &k_at, e),
            Err(msg) => e.add(&k_at, msg),
        }
    }
    out
}

fn read_http_options(
    o: &uhttp::HttpProtocolOptions,
    out: &mut HttpOptions,
    at: &At<'_>,
    e: &mut Errs,
) {
    use uhttp::http_protocol_options::explicit_http_config::ProtocolConfig;
    use uhttp::http_protocol_options::UpstreamProtocolOptions as U;
    match &o.upstream_protocol_options {
        Some(U::ExplicitHttpConfig(explicit)) => match &explicit.protocol_config {
            Some(ProtocolConfig::HttpProtocolOptions(_)) => out.protocol = UpstreamProtocol::Http1,
            Some(ProtocolConfig::Http2ProtocolOptions(_)) => out.protocol = UpstreamProtocol::Http2,
            _ => e.add(
                &at.field("explicit_http_config"),
                "only http_protocol_options and http2_protocol_options are supported",
            ),
        },
        Some(U::UseDownstreamProtocolConfig(_)) => e.add(
            &at.field("use_downstream_protocol_config"),
            "not supported (use explicit_http_config)",
        ),
        Some(U::AutoConfig(auto)) => {
            out.protocol = UpstreamProtocol::Auto;
            unsupported(
                e,
                &at.field("auto_config"),
                &[
                    (
                        "http3_protocol_options",
                        auto.http3_protocol_options.is_some(),
                    ),
                    (
                        "alternate_protocols_cache_options",
                        auto.alternate_protocols_cache_options.is_some(),
                    ),
                ],
            );
        }
        None => {}
    }
    if let Some(common) = &o.common_http_protocol_options {
        if let Some(idle) = dur(
            common.idle_timeout,
            at,
            "common_http_protocol_options.idle_timeout",
            e,
        ) {
            out.idle_timeout = Some(idle);
        }
        if let Some(kb) = common.max_response_headers_kb {
            out.max_response_headers_kb = Some(kb.value);
        }
    }
    match hash_spec(&o.hash_policy) {
        Ok(spec) => out.hash = spec,
        Err(msg) => e.add(&at.field("hash_policy"), msg),
    }
    unsupported(
        e,
        at,
        &[
            ("http_filters", !o.http_filters.is_empty()),
            ("outlier_detection", o.outlier_detection.is_some()),
            (
                "request_mirror_policies",
                !o.request_mirror_policies.is_empty(),
            ),
            ("retry_policy", o.retry_policy.is_some()),
        ],
    );
}

/// The DEFAULT-priority thresholds: limits and the retry budget.
fn breakers_from(
    b: Option<&cl::CircuitBreakers>,
    x: &Extras,
    at: &At<'_>,
    e: &mut Errs,
) -> (Option<RawCircuitBreakers>, Option<RawRetryBudget>) {
    let Some(b) = b else {
        return (None, None);
    };
    // HIGH-priority thresholds apply to high-priority routes, which remora does not have.
    let default: Vec<(usize, &cl::circuit_breakers::Thresholds)> = b
        .thresholds
        .iter()
        .enumerate()
        .filter(|(_, t)| t.priority == ecore::RoutingPriority::Default as i32)
        .collect();
    let (i, t) = match default.as_slice() {
        [] => return (None, None),
        [one] => *one,
        _ => {
            e.add(
                &at.field("circuit_breakers.thresholds"),
                "more than one DEFAULT-priority threshold",
            );
            return (None, None);
        }
    };
    let t_at = at.field("circuit_breakers").item("thresholds", i);
    let limit = |v: Option<pbuf::UInt32Value>| v.map(|v| v.value as usize);
    let limits = RawCircuitBreakers {
        max_connections: limit(t.max_connections),
        max_pending_requests: limit(t.max_pending_requests),
        max_requests: limit(t.max_requests),
        max_retries: limit(t.max_retries),
    };
    let budget = t
        .retry_budget
        .map(|r| budget_from(&r, x, &t_at.field("retry_budget"), e));
    let limits = if limits != RawCircuitBreakers::default()
        || budget.is_none()
        || x.get("circuit_breakers").is_some()
    {
        Some(limits)
    } else {
        None
    };
    (limits, budget)
}

fn budget_from(
    b: &cl::circuit_breakers::thresholds::RetryBudget,
    x: &Extras,
    at: &At<'_>,
    e: &mut Errs,
) -> RawRetryBudget {
    let ratio = b.budget_percent.map(|p| {
        x.number::<f64>("retry_budget.ratio", at, e)
            .unwrap_or_else(|| round_ratio(p.value / 100.0))
    });
    RawRetryBudget {
        ratio,
        min_retries_per_second: b.min_retry_concurrency.map(|n| n.value),
        window: dur(b.budget_interval, at, "budget_interval", e),
    }
}

fn outlier_from(
    o: &cl::OutlierDetection,
    x: &Extras,
    at: &At<'_>,
    e: &mut Errs,
) -> RawOutlierDetection {
    const FULL: &[u32] = &[100];
    const FULL_OR_OFF: &[u32] = &[0, 100];
    const OFF: &[u32] = &[0];
    // remora enforces every ejection it counts; success-rate ejection (statistical, on by
    // default in Envoy) is not implemented and its enforcement is ignored, as is
    // split_external_local_origin_errors (see NOT_CARRIED).
    for (field, value, allowed) in [
        (
            "enforcing_consecutive_5xx",
            o.enforcing_consecutive_5xx,
            FULL,
        ),
        (
            "enforcing_consecutive_local_origin_failure",
            o.enforcing_consecutive_local_origin_failure,
            FULL,
        ),
        (
            "enforcing_consecutive_gateway_failure",
            o.enforcing_consecutive_gateway_failure,
            FULL_OR_OFF,
        ),
        (
            "enforcing_failure_percentage",
            o.enforcing_failure_percentage,
            OFF,
        ),
        (
            "enforcing_failure_percentage_local_origin",
            o.enforcing_failure_percentage_local_origin,
            OFF,
        ),
    ] {
        if let Some(v) = value {
            if !allowed.contains(&v.value) {
                e.add(
                    &at.field(field),
                    format!("{} is not supported (only {allowed:?})", v.value),
                );
            }
        }
    }
    unsupported(e, at, &[("monitors", !o.monitors.is_empty())]);
    let n = |v: Option<pbuf::UInt32Value>| v.map(|v| v.value);
    RawOutlierDetection {
        consecutive_5xx: n(o.consecutive_5xx),
        consecutive_gateway_failure: n(o.consecutive_gateway_failure),
        consecutive_local_origin_failure: n(o.consecutive_local_origin_failure),
        interval: dur(o.interval, at, "interval", e),
        base_ejection_time: dur(o.base_ejection_time, at, "base_ejection_time", e),
        max_ejection_time: dur(o.max_ejection_time, at, "max_ejection_time", e),
        max_ejection_percent: n(o.max_ejection_percent),
        half_open_probes: x.number("half_open_probes", at, e),
    }
}

fn health_from(h: &ecore::HealthCheck, x: &Extras, at: &At<'_>, e: &mut Errs) -> RawHealthCheck {
    use ecore::health_check::HealthChecker;
    unsupported(e, at, &[("alt_port", h.alt_port.is_some())]);
    // Ignored: jitter, no-traffic and edge intervals, event logging, TLS options.
    let mut out = RawHealthCheck {
        protocol: HealthCheckProtocol::Http,
        path: None,
        host: None,
        expected_statuses: Vec::new(),
        interval: undefault(
            dur(h.interval, at, "interval", e),
            Dur(HC_INTERVAL),
            "health_check.interval",
            x,
        ),
        timeout: undefault(
            dur(h.timeout, at, "timeout", e),
            Dur(HC_TIMEOUT),
            "health_check.timeout",
            x,
        ),
        unhealthy_threshold: undefault(
            h.unhealthy_threshold.map(|v| v.value),
            HC_UNHEALTHY,
            "health_check.unhealthy_threshold",
            x,
        ),
        healthy_threshold: undefault(
            h.healthy_threshold.map(|v| v.value),
            HC_HEALTHY,
            "health_check.healthy_threshold",
            x,
        ),
    };
    match &h.health_checker {
        Some(HealthChecker::HttpHealthCheck(http)) => {
            http_check_from(http, x, &mut out, &at.field("http_health_check"), e)
        }
        Some(HealthChecker::TcpHealthCheck(tcp)) => {
            out.protocol = HealthCheckProtocol::Tcp;
            let t_at = at.field("tcp_health_check");
            unsupported(
                e,
                &t_at,
                &[
                    ("send", tcp.send.is_some()),
                    ("receive", !tcp.receive.is_empty()),
                    ("proxy_protocol_config", tcp.proxy_protocol_config.is_some()),
                ],
            );
        }
        Some(HealthChecker::GrpcHealthCheck(_)) => {
            e.add(&at.field("grpc_health_check"), "not supported")
        }
        Some(HealthChecker::CustomHealthCheck(_)) => {
            e.add(&at.field("custom_health_check"), "not supported")
        }
        None => e.add(at, "needs http_health_check or tcp_health_check"),
    }
    out
}

fn http_check_from(
    http: &ecore::health_check::HttpHealthCheck,
    x: &Extras,
    out: &mut RawHealthCheck,
    at: &At<'_>,
    e: &mut Errs,
) {
    use ecore::RequestMethod;
    let method = http.method;
    unsupported(
        e,
        at,
        &[
            ("send", http.send.is_some()),
            ("receive", !http.receive.is_empty()),
            (
                "request_headers_to_add",
                !http.request_headers_to_add.is_empty(),
            ),
            (
                "request_headers_to_remove",
                !http.request_headers_to_remove.is_empty(),
            ),
            (
                "codec_client_type",
                http.codec_client_type != etype::CodecClientType::Http1 as i32,
            ),
            (
                "method",
                method != RequestMethod::MethodUnspecified as i32
                    && method != RequestMethod::Get as i32,
            ),
        ],
    );
    out.protocol = HealthCheckProtocol::Http;
    out.host = (!http.host.is_empty()).then(|| http.host.clone());
    let path = (!http.path.is_empty()).then(|| http.path.clone());
    out.path = undefault(path, "/".to_string(), "health_check.path", x);
    if x.was_defaulted("health_check.expected_statuses")
        && http.expected_statuses
            == [etype::Int64Range {
                start: 200,
                end: 300,
            }]
    {
        return;
    }
    if http.expected_statuses.is_empty() {
        // Envoy's default: 200 alone (remora's would be any 2xx).
        out.expected_statuses = vec![200];
        return;
    }
    for (i, range) in http.expected_statuses.iter().enumerate() {
        if !((100..600).contains(&range.start) && range.start < range.end && range.end <= 600) {
            e.add(
                &at.item("expected_statuses", i),
                format!(
                    "[{}, {}) is not a range of HTTP statuses",
                    range.start, range.end
                ),
            );
            continue;
        }
        // Within 100..600 by the check above.
        out.expected_statuses
            .extend((range.start..range.end).filter_map(|s| u16::try_from(s).ok()));
    }
}

fn panic_from(
    common: Option<&cl::cluster::CommonLbConfig>,
    at: &At<'_>,
    e: &mut Errs,
) -> Option<u32> {
    let p = common?.healthy_panic_threshold?.value;
    if !(0.0..=100.0).contains(&p) {
        e.add(
            &at.field("common_lb_config.healthy_panic_threshold"),
            format!("{p} is not a percentage"),
        );
        return None;
    }
    // Fractional percentages are rounded: remora's threshold is a whole percent.
    Some(p.round() as u32)
}

// === Endpoints ===

fn cla_to(cluster: &str, endpoints: &[RawEndpoint]) -> ep::ClusterLoadAssignment {
    let locality = ep::LocalityLbEndpoints {
        lb_endpoints: endpoints
            .iter()
            .map(|e| ep::LbEndpoint {
                host_identifier: Some(ep::lb_endpoint::HostIdentifier::Endpoint(ep::Endpoint {
                    address: Some(socket_address(&e.address)),
                    ..Default::default()
                })),
                load_balancing_weight: e.weight.map(u32v),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    ep::ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: if endpoints.is_empty() {
            Vec::new()
        } else {
            vec![locality]
        },
        ..Default::default()
    }
}

/// The endpoints of an assignment: localities flattened (their weights and proximity are
/// not used: remora balances over all endpoints by their own weights), UNHEALTHY and
/// DRAINING endpoints left out.
/// The endpoints of one ClusterLoadAssignment (for a static `type: eds` cluster).
pub fn endpoints_from(cla: &ep::ClusterLoadAssignment) -> Result<Vec<RawEndpoint>, Vec<String>> {
    let label = format!("ClusterLoadAssignment `{}`", cla.cluster_name);
    let mut e = Errs(Vec::new());
    let endpoints = cla_from(cla, &At::root(&label), &mut e);
    if e.0.is_empty() {
        Ok(endpoints)
    } else {
        Err(e.0)
    }
}

fn cla_from(cla: &ep::ClusterLoadAssignment, at: &At<'_>, e: &mut Errs) -> Vec<RawEndpoint> {
    use ecore::HealthStatus;
    if cla
        .policy
        .as_ref()
        .is_some_and(|p| !p.drop_overloads.is_empty())
    {
        e.add(&at.field("policy.drop_overloads"), "not supported");
    }
    let mut out = Vec::new();
    for (l, locality) in cla.endpoints.iter().enumerate() {
        let l_at = at.item("endpoints", l);
        if locality.priority != 0 {
            e.add(&l_at.field("priority"), "priorities not supported");
            continue;
        }
        if locality.lb_config.is_some() {
            e.add(&l_at, "LEDS is not supported (list lb_endpoints)");
        }
        for (i, lb) in locality.lb_endpoints.iter().enumerate() {
            let ep_at = l_at.item("lb_endpoints", i);
            let status = HealthStatus::try_from(lb.health_status);
            if matches!(status, Ok(HealthStatus::Unhealthy | HealthStatus::Draining)) {
                continue;
            }
            let endpoint = match &lb.host_identifier {
                Some(ep::lb_endpoint::HostIdentifier::Endpoint(endpoint)) => endpoint,
                Some(ep::lb_endpoint::HostIdentifier::EndpointName(_)) => {
                    e.add(&ep_at.field("endpoint_name"), "not supported");
                    continue;
                }
                None => {
                    e.add(&ep_at.field("endpoint"), "is required");
                    continue;
                }
            };
            let check_elsewhere = endpoint
                .health_check_config
                .as_ref()
                .is_some_and(|h| h.port_value != 0 || h.address.is_some());
            unsupported(
                e,
                &ep_at.field("endpoint"),
                &[
                    ("health_check_config", check_elsewhere),
                    (
                        "additional_addresses",
                        !endpoint.additional_addresses.is_empty(),
                    ),
                ],
            );
            out.push(RawEndpoint {
                address: address_from(
                    endpoint.address.as_ref(),
                    &ep_at.field("endpoint.address"),
                    e,
                ),
                weight: lb.load_balancing_weight.map(|w| w.value),
            });
        }
    }
    out
}

// === Shared: errors, durations, addresses, Any, metadata ===

/// Every problem found, each naming its resource and field.
#[derive(Default)]
struct Errs(Vec<String>);

impl Errs {
    fn add(&mut self, at: &At<'_>, msg: impl fmt::Display) {
        self.0.push(format!("{at}: {msg}"));
    }
}

/// Where in which resource: `listener `x``, `filter_chains[0].filters[0]`.
#[derive(Clone)]
struct At<'a> {
    res: &'a str,
    path: String,
}

impl<'a> At<'a> {
    fn root(res: &'a str) -> At<'a> {
        At {
            res,
            path: String::new(),
        }
    }

    fn field(&self, name: &str) -> At<'a> {
        let path = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        At {
            res: self.res,
            path,
        }
    }

    fn index(&self, i: usize) -> At<'a> {
        At {
            res: self.res,
            path: format!("{}[{i}]", self.path),
        }
    }

    fn item(&self, name: &str, i: usize) -> At<'a> {
        self.field(name).index(i)
    }
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(self.res)
        } else {
            write!(f, "{}: {}", self.res, self.path)
        }
    }
}

/// Reports each field that is set although remora does not implement it.
fn unsupported(e: &mut Errs, at: &At<'_>, checks: &[(&str, bool)]) {
    for (field, set) in checks {
        if *set {
            e.add(&at.field(field), "not supported");
        }
    }
}

fn bool_set(v: Option<pbuf::BoolValue>) -> bool {
    v.is_some_and(|b| b.value)
}

fn u32v(value: u32) -> pbuf::UInt32Value {
    pbuf::UInt32Value { value }
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn pb_dur(d: Dur) -> pbuf::Duration {
    pbuf::Duration {
        seconds: i64::try_from(d.0.as_secs()).unwrap_or(i64::MAX),
        // Below 10⁹, so it fits.
        nanos: i32::try_from(d.0.subsec_nanos()).unwrap_or(0),
    }
}

/// An Envoy duration as remora's, exactly; an invalid one is reported at `at.field`.
fn dur(d: Option<pbuf::Duration>, at: &At<'_>, field: &str, e: &mut Errs) -> Option<Dur> {
    let d = d?;
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(s), Ok(n)) if n < 1_000_000_000 => Some(Dur(Duration::new(s, n))),
        _ => {
            e.add(
                &at.field(field),
                format!("invalid duration ({}s {}ns)", d.seconds, d.nanos),
            );
            None
        }
    }
}

/// An ADS config source, resource API v3.
fn ads() -> ecore::ConfigSource {
    ecore::ConfigSource {
        resource_api_version: ecore::ApiVersion::V3 as i32,
        config_source_specifier: Some(ecore::config_source::ConfigSourceSpecifier::Ads(
            ecore::AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// remora fetches everything over its one ADS stream: `ads` or `self` (or none given).
fn check_ads(source: Option<&ecore::ConfigSource>, at: &At<'_>, e: &mut Errs) {
    use ecore::config_source::ConfigSourceSpecifier as S;
    match source.and_then(|s| s.config_source_specifier.as_ref()) {
        None | Some(S::Ads(_)) | Some(S::Self_(_)) => {}
        Some(_) => e.add(at, "only `ads` is supported (remora has one ADS stream)"),
    }
}

/// `ip:port` or `host:port` (`[v6]:port`) as an Envoy socket address.
fn socket_address(address: &str) -> ecore::Address {
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) => {
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            (host.to_string(), port.parse::<u32>().unwrap_or(0))
        }
        None => (address.to_string(), 0),
    };
    // `[::]` is dual-stack for remora; Envoy needs to be told.
    let ipv4_compat = host
        .parse::<std::net::Ipv6Addr>()
        .is_ok_and(|ip| ip.is_unspecified());
    ecore::Address {
        address: Some(ecore::address::Address::SocketAddress(
            ecore::SocketAddress {
                address: host,
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ipv4_compat,
                ..Default::default()
            },
        )),
    }
}

fn address_from(address: Option<&ecore::Address>, at: &At<'_>, e: &mut Errs) -> String {
    let s = match address.and_then(|a| a.address.as_ref()) {
        Some(ecore::address::Address::SocketAddress(s)) => s,
        Some(_) => {
            e.add(at, "only a socket_address is supported");
            return String::new();
        }
        None => {
            e.add(at, "is required");
            return String::new();
        }
    };
    unsupported(
        e,
        at,
        &[
            (
                "socket_address.protocol",
                s.protocol != ecore::socket_address::Protocol::Tcp as i32,
            ),
            ("socket_address.resolver_name", !s.resolver_name.is_empty()),
            (
                "socket_address.network_namespace_filepath",
                !s.network_namespace_filepath.is_empty(),
            ),
        ],
    );
    let port = match &s.port_specifier {
        Some(PortSpecifier::PortValue(p)) => *p,
        Some(PortSpecifier::NamedPort(_)) => {
            e.add(
                &at.field("socket_address.named_port"),
                "not supported (use port_value)",
            );
            0
        }
        None => {
            e.add(&at.field("socket_address.port_value"), "is required");
            0
        }
    };
    if s.address.contains(':') && !s.address.starts_with('[') {
        format!("[{}]:{port}", s.address)
    } else {
        format!("{}:{port}", s.address)
    }
}

fn any<M: Message + Name>(m: &M) -> pbuf::Any {
    pbuf::Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The message type an `Any` holds (its type URL without the `…/` prefix).
fn type_name(a: &pbuf::Any) -> &str {
    a.type_url.rsplit('/').next().unwrap_or_default()
}

fn decode_any<M: Message + Name + Default>(a: &pbuf::Any) -> Result<M, String> {
    if type_name(a) != M::full_name() {
        return Err(format!(
            "holds `{}` where `{}` was expected",
            a.type_url,
            M::full_name()
        ));
    }
    M::decode(a.value.as_slice()).map_err(|err| format!("cannot decode {}: {err}", M::full_name()))
}

const META_NAMESPACE: &str = "remora";
const META_FIELD: &str = "extras";

/// remora-only values carried in a resource's `metadata.filter_metadata["remora"]` as
/// `extras: ["key=value", ...]`; `defaulted=FIELD` marks a field that `to_envoy` filled in
/// with remora's default (absent in remora's config).
#[derive(Debug, Default)]
struct Extras(Vec<(String, String)>);

impl Extras {
    fn set(&mut self, key: &str, value: impl fmt::Display) {
        self.0.push((key.to_string(), value.to_string()));
    }

    fn defaulted(&mut self, field: &str) {
        self.set("defaulted", field);
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn was_defaulted(&self, field: &str) -> bool {
        self.0.iter().any(|(k, v)| k == "defaulted" && v == field)
    }

    fn number<T: std::str::FromStr>(&self, key: &str, at: &At<'_>, e: &mut Errs) -> Option<T> {
        let value = self.get(key)?;
        match value.parse() {
            Ok(n) => Some(n),
            Err(_) => {
                e.add(
                    &at.field("metadata.filter_metadata.remora.extras"),
                    format!("`{key}={value}` is not a valid value"),
                );
                None
            }
        }
    }

    fn metadata(self) -> Option<ecore::Metadata> {
        if self.0.is_empty() {
            return None;
        }
        let values = self
            .0
            .into_iter()
            .map(|(k, v)| pbuf::Value {
                kind: Some(Kind::StringValue(format!("{k}={v}"))),
            })
            .collect();
        let list = pbuf::Value {
            kind: Some(Kind::ListValue(pbuf::ListValue { values })),
        };
        let fields = HashMap::from([(META_FIELD.to_string(), list)]);
        Some(ecore::Metadata {
            filter_metadata: HashMap::from([(META_NAMESPACE.to_string(), pbuf::Struct { fields })]),
            ..Default::default()
        })
    }

    fn read(metadata: Option<&ecore::Metadata>, at: &At<'_>, e: &mut Errs) -> Extras {
        let mut out = Extras::default();
        let Some(value) = metadata
            .and_then(|m| m.filter_metadata.get(META_NAMESPACE))
            .and_then(|s| s.fields.get(META_FIELD))
        else {
            return out;
        };
        let here = || at.field("metadata.filter_metadata.remora.extras");
        let Some(Kind::ListValue(list)) = &value.kind else {
            e.add(&here(), "must be a list of `key=value` strings");
            return out;
        };
        for v in &list.values {
            match &v.kind {
                Some(Kind::StringValue(s)) => match s.split_once('=') {
                    Some((k, v)) => out.set(k, v),
                    None => e.add(&here(), format!("`{s}` is not `key=value`")),
                },
                _ => e.add(&here(), "must be a list of `key=value` strings"),
            }
        }
        out
    }
}

/// `value`, or remora's default recorded as `defaulted` (for Envoy, which needs a value or
/// whose own default differs).
fn or_default<T>(value: Option<T>, default: T, field: &str, x: &mut Extras) -> T {
    value.unwrap_or_else(|| {
        x.defaulted(field);
        default
    })
}

/// The inverse of [`or_default`]: a value `to_envoy` filled in becomes absent again.
fn undefault<T: PartialEq>(value: Option<T>, default: T, field: &str, x: &Extras) -> Option<T> {
    match value {
        Some(v) if v == default && x.was_defaulted(field) => None,
        other => other,
    }
}

// === Tests ===

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(yaml: &str) {
        let raw = crate::config::parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let back = from_envoy(&to_envoy(&raw)).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(back.listeners, raw.listeners);
        assert_eq!(back.route_configs, raw.route_configs);
        assert_eq!(back.clusters, raw.clusters);
    }

    #[test]
    fn every_field_survives_the_round_trip() {
        round_trip(
            r#"
listeners:
  - name: a
    address: "[::1]:15001"
    protocol: http2
    route_config: r
    max_request_headers_bytes: 1500
    max_request_headers_count: 50
    request_headers_timeout: 250ms
    idle_timeout: 0
    stream_idle_timeout: 30s
    max_connections: 100
    normalize_path: true
    merge_slashes: true
    access_log: { path: /dev/stdout }
  - name: b
    address: 127.0.0.1:15002
    route_config: r
    max_request_headers_bytes: 61440
route_configs:
  - name: r
    virtual_hosts:
      - name: v
        domains: ["a", "*.b", "c.*", "d:8080"]
        retry_policy:
          retry_on: [5xx, reset]
          retry_non_idempotent: true
          replay_buffer_bytes: 1000
          backoff: { max_interval: 100ms }
        routes:
          - name: one
            match:
              prefix: /p
              methods: [GET, M-SEARCH]
              headers:
                - { name: x-a, exact: "1" }
                - { name: x-b, prefix: p }
                - { name: x-c, suffix: s }
                - { name: x-d, contains: c }
                - { name: x-e, regex: "a.*b" }
                - { name: x-f, present: false, invert: true }
                - { name: x-g }
            cluster: c1
            prefix_rewrite: /q
            host_rewrite: example.com
            request_headers_to_add: [{ name: x-h, value: "50%", append: false }, { name: x-i, value: "" }]
            request_headers_to_remove: [x-j]
            response_headers_to_add: [{ name: x-k, value: v }]
            response_headers_to_remove: [x-l]
            timeout: 1500ms
            retry_policy:
              retry_on: [retriable-status-codes, unavailable]
              num_retries: 3
              per_try_timeout: 1s
              retriable_status_codes: [409, 503]
              backoff: {}
            upgrade_configs: [{ upgrade_type: websocket, enabled: false }, { upgrade_type: CONNECT-UDP }]
          - match: { path: /x, methods: [] }
            weighted_clusters: [{ name: c1, weight: 1 }, { name: c2, weight: 0 }]
          - match: { regex: "/r/[0-9]+", methods: [POST] }
            direct_response: { status: 204, body: "" }
          - match: { prefix: / }
            direct_response: { status: 404 }
clusters:
  - name: c1
    lb_policy: ring_hash
    hash_on: { header: x-user }
    protocol: http2
    endpoints: [{ address: "127.0.0.1:1", weight: 5 }, { address: "[::1]:2" }]
    connect_timeout: 1s
    idle_timeout: 60s
    max_response_headers_bytes: 10000
    circuit_breakers: {}
    retry_budget: { ratio: 2.5, min_retries_per_second: 3, window: 5s }
    outlier_detection:
      consecutive_5xx: 1
      consecutive_gateway_failure: 2
      consecutive_local_origin_failure: 3
      interval: 1s
      base_ejection_time: 2s
      max_ejection_time: 3s
      max_ejection_percent: 50
      half_open_probes: 2
    health_check: { path: /, interval: 5s, expected_statuses: [200, 204] }
    panic_threshold: 0
  - name: c2
    type: strict_dns
    max_response_headers_bytes: 16384
    dns_refresh_rate: 10s
    lb_policy: ring_hash
    hash_on: {}
    endpoints: [{ address: "localhost:8080" }]
    health_check: { protocol: tcp, timeout: 1s, unhealthy_threshold: 3, healthy_threshold: 2 }
  - name: c3
    type: eds
    lb_policy: least_request
    endpoints: [{ address: "10.0.0.1:80" }]
    circuit_breakers: { max_connections: 1, max_pending_requests: 2, max_requests: 3, max_retries: 0 }
    retry_budget: {}
    outlier_detection: {}
    health_check: {}
  - name: c4
    type: eds
    lb_policy: ring_hash
    retry_budget: { ratio: 0.2 }
"#,
        );
    }

    fn sample() -> Resources {
        let raw = crate::config::parse(
            "listeners: [{ name: l, address: 127.0.0.1:1, route_config: r }]\n\
             route_configs: [{ name: r, virtual_hosts: [{ name: v, domains: ['*'], routes: [{ match: { prefix: / }, cluster: c }] }] }]\n\
             clusters: [{ name: c, lb_policy: ring_hash, endpoints: [{ address: 127.0.0.1:2 }] }]\n",
            "t.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        to_envoy(&raw)
    }

    fn manager(res: &Resources) -> hcm::HttpConnectionManager {
        match &res.listeners[0].filter_chains[0].filters[0].config_type {
            Some(lis::filter::ConfigType::TypedConfig(a)) => decode_any(a).expect("hcm"),
            other => panic!("{other:?}"),
        }
    }

    fn set_manager(res: &mut Resources, m: &hcm::HttpConnectionManager) {
        res.listeners[0].filter_chains[0].filters[0].config_type =
            Some(lis::filter::ConfigType::TypedConfig(any(m)));
    }

    #[test]
    fn a_non_optional_http_filter_is_refused_by_path() {
        let mut res = sample();
        let mut m = manager(&res);
        m.http_filters.insert(
            0,
            hcm::HttpFilter {
                name: "envoy.filters.http.lua".into(),
                ..Default::default()
            },
        );
        set_manager(&mut res, &m);
        let errors = from_envoy(&res).expect_err("lua is not supported");
        assert_eq!(
            errors,
            vec!["listener `l`: filter_chains[0].filters[0].typed_config.http_filters[0] (envoy.filters.http.lua): not supported (only the router filter is; mark others `is_optional`)".to_string()]
        );
        m.http_filters[0].is_optional = true;
        set_manager(&mut res, &m);
        assert!(from_envoy(&res).is_ok());
    }

    #[test]
    fn every_problem_is_reported() {
        let mut res = sample();
        res.listeners[0].listener_filters.push(Default::default());
        res.clusters[0].lb_policy = cl::cluster::LbPolicy::Maglev as i32;
        let errors = from_envoy(&res).expect_err("two problems");
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].starts_with("listener `l`: listener_filters: "),
            "{errors:#?}"
        );
        assert!(
            errors[1].starts_with("cluster `c`: lb_policy: MAGLEV"),
            "{errors:#?}"
        );
    }

    #[test]
    fn an_inline_route_config_becomes_a_route_config() {
        let mut res = sample();
        let mut m = manager(&res);
        let mut rc = res.route_configs.remove(0);
        rc.name.clear();
        m.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
        set_manager(&mut res, &m);
        let d = from_envoy(&res).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(d.listeners[0].route_config, "l");
        assert_eq!(d.route_configs.len(), 1);
        assert_eq!(d.route_configs[0].name, "l");
    }

    #[test]
    fn route_hash_policies_are_read_when_the_cluster_has_none() {
        let mut res = sample();
        res.clusters[0].typed_extension_protocol_options.clear();
        let header = |name: &str| HashPolicy {
            terminal: false,
            policy_specifier: Some(PolicySpecifier::Header(
                rt::route_action::hash_policy::Header {
                    header_name: name.into(),
                    regex_rewrite: None,
                },
            )),
        };
        let Some(rt::route::Action::Route(ra)) =
            &mut res.route_configs[0].virtual_hosts[0].routes[0].action
        else {
            panic!("not a route action")
        };
        ra.hash_policy = vec![header("x-user")];
        let d = from_envoy(&res).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(
            d.clusters[0].hash_on,
            Some(HashOn {
                header: Some("x-user".into())
            })
        );
        let mut other = res.route_configs[0].virtual_hosts[0].routes[0].clone();
        if let Some(rt::route::Action::Route(ra)) = &mut other.action {
            ra.hash_policy = vec![header("x-other")];
        }
        res.route_configs[0].virtual_hosts[0].routes.push(other);
        let errors = from_envoy(&res).expect_err("routes disagree");
        assert!(errors[0].contains("disagree"), "{errors:#?}");
    }

    #[test]
    fn unhealthy_and_draining_endpoints_are_left_out() {
        let raw = crate::config::parse(
            "listeners: [{ name: l, address: 127.0.0.1:1, route_config: r }]\n\
             route_configs: [{ name: r, virtual_hosts: [] }]\n\
             clusters: [{ name: c, type: eds, endpoints: [{ address: 127.0.0.1:2 }, { address: 127.0.0.1:3 }, { address: 127.0.0.1:4 }] }]\n",
            "t.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let mut res = to_envoy(&raw);
        let lbs = &mut res.endpoints[0].endpoints[0].lb_endpoints;
        lbs[0].health_status = ecore::HealthStatus::Unhealthy as i32;
        lbs[1].health_status = ecore::HealthStatus::Draining as i32;
        let d = from_envoy(&res).unwrap_or_else(|e| panic!("{e:#?}"));
        assert_eq!(d.clusters[0].endpoints.len(), 1);
        assert_eq!(d.clusters[0].endpoints[0].address, "127.0.0.1:4");
        res.endpoints.clear();
        let d = from_envoy(&res).unwrap_or_else(|e| panic!("{e:#?}"));
        assert!(d.clusters[0].endpoints.is_empty());
    }

    #[test]
    fn method_alternations_are_recognised() {
        assert_eq!(
            alternatives(r"GET|M\-SEARCH"),
            Some(vec!["GET".to_string(), "M-SEARCH".to_string()])
        );
        assert_eq!(alternatives("GE.|POST"), None);
        assert_eq!(alternatives("GET|"), None);
        assert_eq!(unescape_percent("50%%"), Some("50%".into()));
        assert_eq!(unescape_percent("%REQ(x)%"), None);
    }
}
