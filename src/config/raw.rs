//! The config file's schema: serde types that mirror the YAML one to one (nothing else knows YAML).
//!
//! Every struct denies unknown fields. Defaults are documented on each field and applied by
//! `compile`, so that `/config` can show what the user wrote next to what is in force.

use serde::{Deserialize, Serialize};

use super::duration::Dur;

/// Default `admin.address`.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The admin server (`/metrics`, `/ready`, `/live`, `/config`, `/clusters`).
    /// Default: `127.0.0.1:9901`. Changing it needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    /// Worker threads. Default: the container's CPU quota (cgroup), else the core count.
    /// Changing it needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    /// Graceful shutdown timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<RawShutdown>,
    /// Who this sidecar is, as sent to the control plane. Default: id = the hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<RawNode>,
    /// The control plane (xDS ADS) that adds listeners, route configs and clusters to the
    /// ones in this file. Default: none. Changing it needs a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xds: Option<RawXds>,
    /// Where remora accepts connections.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<RawListener>,
    /// Route tables, referenced by listeners by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route_configs: Vec<RawRouteConfig>,
    /// Upstream services, referenced by routes by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<RawCluster>,
}

/// The node identity sent on the xDS stream.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    /// Unique per sidecar. Default: the hostname (the pod name in Kubernetes).
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<String>,
    /// The service this sidecar belongs to; `remora control-plane` serving a directory
    /// serves `<cluster>.yaml` to it. Default: empty.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster: Option<String>,
}

/// Where the control plane is.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawXds {
    /// `host:port` of the control plane, spoken to as h2c gRPC (ADS). Or:
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub address: Option<String>,
    /// the name of a static cluster in this file whose first endpoint is the control plane.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster: Option<String>,
    /// `/ready` waits this long for the first complete config from the control plane, then
    /// says ready with what it has. Default `15s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_fetch_timeout: Option<Dur>,
    /// Where the last accepted resources are kept, so that a restart while the control plane
    /// is down serves them at once. Default: none.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `ip:port` to serve the admin endpoints on. Default `127.0.0.1:9901`; keep it on loopback.
    #[serde(deserialize_with = "super::strict::string")]
    pub address: String,
    /// Most open admin connections; further ones are closed at accept. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// An admin connection with no byte either way for this long is closed. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Dur>,
    /// Time to receive a request's headers on an admin connection. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers_timeout: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    /// After SIGTERM/SIGINT, keep serving this long with `/ready` at 503 so the endpoint can
    /// be deregistered, then stop accepting. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_delay: Option<Dur>,
    /// Then give in-flight requests this long to finish. Default `25s` (inside Kubernetes'
    /// default 30s grace period together with the delay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<Dur>,
}

/// How a listener speaks HTTP to its clients.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Hash, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1, or h2c when the connection opens with the HTTP/2 preface (default).
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// h2c (HTTP/2 with prior knowledge) only.
    Http2,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Unique name; used in metrics and logs.
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// `ip:port` to accept on.
    #[serde(deserialize_with = "super::strict::string")]
    pub address: String,
    /// `auto` (default), `http1` or `http2`.
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Name of the route config that serves this listener's requests.
    #[serde(deserialize_with = "super::strict::string")]
    pub route_config: String,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    /// Default 61440 (60 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_headers_bytes: Option<usize>,
    /// Most request headers; more gets 431. Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_headers_count: Option<usize>,
    /// Time from a request's first byte to its last header byte, after which the
    /// connection is closed. Default `10s`; `0` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers_timeout: Option<Dur>,
    /// A connection with no request in flight for this long is closed gracefully.
    /// Default `300s`; `0` disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Dur>,
    /// A request whose bytes stop moving, both ways (request body, response headers and
    /// body), for this long ends: 408 `stream_idle_timeout` before the response has started,
    /// else the stream is reset (HTTP/2) or the connection closed (HTTP/1.1). As Envoy's
    /// `stream_idle_timeout`. Default `300s`; `0` disables. WebSocket tunnels have
    /// `idle_timeout` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_idle_timeout: Option<Dur>,
    /// Most open downstream connections; further ones are closed at accept. Default 8192.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Normalize request paths before routing and forward the normalized path (RFC 3986
    /// §6.2.2: decode percent-encoded unreserved characters, remove `.` and `..` segments),
    /// as Envoy's `normalize_path`. Default `false`, as Envoy's: turn it on wherever routes
    /// guard paths (a `/admin` prefix is otherwise bypassed by `/%61dmin` or `/x/../admin`).
    #[serde(default)]
    pub normalize_path: bool,
    /// Merge runs of `/` in request paths before routing (`//admin` → `/admin`), as Envoy's
    /// `merge_slashes`. Default `false`.
    #[serde(default)]
    pub merge_slashes: bool,
    /// Serve HTTPS (and with `client_ca_file`, require client certificates). Default: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawListenerTls>,
    /// JSON-lines access log for this listener. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<RawAccessLog>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// File to append to; `/dev/stdout` and `/dev/stderr` work.
    #[serde(deserialize_with = "super::strict::string")]
    pub path: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawRouteConfig {
    /// Unique name, referenced by listeners.
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// Virtual hosts, chosen by the request's authority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub virtual_hosts: Vec<RawVirtualHost>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawVirtualHost {
    /// Name, for logs and `/config`.
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// Authorities served: `orders` (exact), `*.svc.local` (suffix), `orders.*` (prefix) or
    /// `*`. Case-insensitive; the request's port is ignored unless the domain has one.
    #[serde(deserialize_with = "super::strict::strings")]
    pub domains: Vec<String>,
    /// Routes, tried in order; the first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RawRoute>,
    /// Retry policy for routes that set none. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RawRetryPolicy>,
    /// Which verified client identities may use this virtual host (routes may set their
    /// own). Default: anyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<RawAuthorization>,
    /// How it was read; not part of the schema.
    #[serde(skip)]
    pub read_from: ReadFrom,
}

/// How a virtual host was read. Not part of what it means: equal to any other, and hashed
/// as nothing, so that configs compare and digest by their content alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadFrom {
    /// The hash of its text, when it was read from config text (see `config::items`): a
    /// reload finds the compiled virtual host of the same text by it.
    pub text_key: Option<u64>,
    /// It stands for the virtual host of the same text in the running config, whose routes
    /// were not read again (only its name and domains are here, for validation); its lines
    /// are at this byte range of the config text, should it have to be read after all.
    pub placeholder: Option<(usize, usize)>,
}

impl PartialEq for ReadFrom {
    fn eq(&self, _: &ReadFrom) -> bool {
        true
    }
}

impl std::hash::Hash for ReadFrom {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

/// A listener's TLS.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawListenerTls {
    /// PEM certificate chain, leaf first.
    #[serde(deserialize_with = "super::strict::string")]
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(deserialize_with = "super::strict::string")]
    pub key_file: String,
    /// PEM CA bundle: clients must present a certificate it signed (mTLS). Default: none
    /// (no client certificate asked for).
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub client_ca_file: Option<String>,
    /// ALPN protocols offered, in order of preference. Default `[h2, http/1.1]`.
    #[serde(
        deserialize_with = "super::strict::opt_strings",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub alpn: Option<Vec<String>>,
}

/// A cluster's TLS to its endpoints.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawClusterTls {
    /// Server name sent (SNI) and, without `verify_subject_alt_names`, checked against the
    /// certificate. Default: the endpoint's host.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sni: Option<String>,
    /// PEM CA bundle that must have signed the endpoint's certificate. Required.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_file: Option<String>,
    /// PEM client certificate chain for mTLS. Default: none.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cert_file: Option<String>,
    /// PEM private key of `cert_file`.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub key_file: Option<String>,
    /// The endpoint's certificate must carry one of these as a URI or DNS SAN (e.g. a SPIFFE
    /// ID); then the SNI name is not checked. Default: check the SNI name.
    #[serde(
        deserialize_with = "super::strict::strings",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub verify_subject_alt_names: Vec<String>,
}

/// Who may use a virtual host or route.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorization {
    /// Peer principals admitted: the URI SAN (SPIFFE ID) of the client certificate, else its
    /// first DNS SAN. Exact, or a prefix ending in `*`. Others, and plain-text peers, get 403.
    #[serde(deserialize_with = "super::strict::strings")]
    pub principals: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Name, used as the `route` field in access logs. Default: `<virtual host>/<index>`.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub name: Option<String>,
    /// What the request must look like.
    #[serde(rename = "match")]
    pub route_match: RawRouteMatch,
    /// Action: send to this cluster.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster: Option<String>,
    /// Action: split between clusters in proportion to their weights (sum > 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighted_clusters: Option<Vec<RawWeightedCluster>>,
    /// Action: answer directly without an upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<RawDirectResponse>,
    /// Replace the matched `prefix` with this before forwarding.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prefix_rewrite: Option<String>,
    /// Replace the Host/authority with this before forwarding. Default: keep it.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub host_rewrite: Option<String>,
    /// Headers added to the request before forwarding.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_headers_to_add: Vec<RawHeaderValue>,
    /// Headers removed from the request before forwarding.
    #[serde(
        deserialize_with = "super::strict::strings",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub request_headers_to_remove: Vec<String>,
    /// Headers added to the response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub response_headers_to_add: Vec<RawHeaderValue>,
    /// Headers removed from the response.
    #[serde(
        deserialize_with = "super::strict::strings",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub response_headers_to_remove: Vec<String>,
    /// Time until the upstream's response headers arrive, covering every attempt and the
    /// backoff between them; 504 after. Default `15s`; `0` = none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// When and how to retry. Default: the virtual host's policy, else no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RawRetryPolicy>,
    /// Which HTTP/1.1 upgrades (`Upgrade:` protocols) this route tunnels, as Envoy's
    /// `upgrade_configs`. Default: `websocket` only. An entry enables (or, with
    /// `enabled: false`, disables) one protocol; any other upgrade request is forwarded as a
    /// plain request without its `Upgrade` headers (h2c is never tunnelled).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upgrade_configs: Vec<RawUpgradeConfig>,
    /// Who may use this route; overrides the virtual host's. Default: the virtual host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<RawAuthorization>,
}

/// One upgrade protocol a route tunnels or refuses.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawUpgradeConfig {
    /// The `Upgrade` protocol name, case-insensitive, e.g. `websocket`.
    #[serde(deserialize_with = "super::strict::string")]
    pub upgrade_type: String,
    /// Default `true`.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

/// Envoy's retry policy, flattened.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawRetryPolicy {
    /// Conditions: `5xx`, `gateway-error`, `connect-failure`, `reset`, `refused-stream`,
    /// `retriable-4xx`, `retriable-status-codes`, and from `grpc-status` in response
    /// headers: `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`,
    /// `unavailable`. At least one is required.
    #[serde(
        deserialize_with = "super::strict::strings",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub retry_on: Vec<String>,
    /// Retries after the first attempt. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_retries: Option<u32>,
    /// Limit for each attempt (then it counts as a timeout failure). Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Dur>,
    /// Status codes retried under `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    /// Full-jitter exponential backoff between attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<RawBackoff>,
    /// Retry POST, PATCH and other non-idempotent methods on any condition, not only when
    /// the request provably never reached the upstream. Default false.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Request bodies up to this many bytes are kept for replay; a larger one streams
    /// through once and is not retried. Default 65536.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_buffer_bytes: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    /// Default `25ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_interval: Option<Dur>,
    /// Default `250ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_interval: Option<Dur>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawRouteMatch {
    /// Path starts with this (query string excluded).
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prefix: Option<String>,
    /// Path equals this (query string excluded).
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub path: Option<String>,
    /// Whole path matches this regex (query string excluded).
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub regex: Option<String>,
    /// Request method is one of these. Default: any.
    #[serde(
        deserialize_with = "super::strict::opt_strings",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub methods: Option<Vec<String>>,
    /// Every one of these header matchers must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<RawHeaderMatcher>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderMatcher {
    /// Header name (case-insensitive).
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// Value equals this.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exact: Option<String>,
    /// Value starts with this.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub prefix: Option<String>,
    /// Value ends with this.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub suffix: Option<String>,
    /// Value contains this.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub contains: Option<String>,
    /// Whole value matches this regex.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub regex: Option<String>,
    /// `true`: the header is present; `false`: it is absent. The default when no other
    /// matcher is given is `present: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
    /// Invert the result. Default false.
    #[serde(default)]
    pub invert: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedCluster {
    /// Cluster name.
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// Relative weight; 0 takes no traffic.
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawDirectResponse {
    /// Status code, 200 to 599.
    pub status: u16,
    /// Body. Default: empty.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub body: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderValue {
    /// Header name.
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// Header value.
    #[serde(deserialize_with = "super::strict::string")]
    pub value: String,
    /// `true` (default): add beside existing values; `false`: replace them.
    #[serde(default = "default_true")]
    pub append: bool,
}

fn default_true() -> bool {
    true
}

/// How a cluster finds its endpoints.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Hash, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DiscoveryType {
    /// Endpoints are `ip:port` as written (default).
    #[default]
    Static,
    /// Endpoints are `host:port`, resolved every `dns_refresh_rate`; every address answered
    /// becomes an endpoint with the configured weight. A failed lookup keeps the last answer.
    StrictDns,
    /// Endpoints come from the control plane (xDS EDS, a ClusterLoadAssignment named after
    /// the cluster). In a file served by `remora control-plane`, `endpoints` are what it
    /// serves; at the sidecar they are the last assignment received (`ip:port` each).
    Eds,
}

/// How a cluster picks an endpoint for a request.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Hash, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Smooth weighted round robin: exact proportions over each cycle (default).
    #[default]
    RoundRobin,
    /// Weighted power of two choices over in-flight requests.
    LeastRequest,
    /// Weighted random.
    Random,
    /// Consistent hashing (see `hash_on`); few keys move when endpoints change.
    RingHash,
}

/// What `ring_hash` hashes: a request header's value when `header` is set and the request
/// has it, else the client's IP address.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash, Eq)]
#[serde(deny_unknown_fields)]
pub struct HashOn {
    /// Header to hash. Default: none (hash the client address).
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub header: Option<String>,
}

/// The protocol remora speaks to a cluster's endpoints.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Hash, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a keep-alive pool per endpoint (default).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c; with `tls`, ALPN `h2` only): one multiplexed
    /// connection per endpoint (gRPC needs HTTP/2).
    Http2,
    /// With `tls` only: ALPN offers `h2` and `http/1.1` and each endpoint's choice is used
    /// (learned from its first connection), as Envoy's `auto_config`.
    Auto,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Unique name, referenced by routes.
    #[serde(deserialize_with = "super::strict::string")]
    pub name: String,
    /// `static` (default) or `strict_dns`.
    #[serde(default, rename = "type")]
    pub discovery: DiscoveryType,
    /// `round_robin` (default), `least_request`, `random` or `ring_hash`.
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// For `ring_hash`: `{ header: NAME }`; default and fallback: the client address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
    /// `http1` (default), `http2` (h2c, or h2 by ALPN with `tls`) or `auto` (with `tls`).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// The endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<RawEndpoint>,
    /// Time allowed to open a TCP connection to an endpoint. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Dur>,
    /// Pooled connections unused for this long are closed. Default `60s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Dur>,
    /// Largest response head (status line and headers) an endpoint may send, in bytes,
    /// 8192 to 1048576; a larger one is a 502 `upstream_response_headers_too_large`.
    /// Default 61440 (60 KiB, Envoy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response_headers_bytes: Option<usize>,
    /// For `strict_dns`: how often to resolve again. Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_refresh_rate: Option<Dur>,
    /// Per-cluster limits that fail fast with 503 `overflow` when reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<RawCircuitBreakers>,
    /// How much retries may add to the load on this cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RawRetryBudget>,
    /// Passive health: eject endpoints that keep failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<RawOutlierDetection>,
    /// Active health checks. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    /// When fewer than this percentage of endpoints are usable, balance over all of them
    /// rather than overload the few. Default 50; 0 disables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold: Option<u32>,
    /// TLS to the endpoints. Default: plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawClusterTls>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawCircuitBreakers {
    /// Open connections to all endpoints. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Requests waiting for a new connection. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<usize>,
    /// Requests in flight. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<usize>,
    /// Retries in flight. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRetryBudget {
    /// Retries may add this fraction of the request rate. Default 0.2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Retries per second always allowed. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// Window over which requests and retries are counted. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Dur>,
}

/// By the ratio's bits: equal budgets hash equal (validation refuses NaN).
impl std::hash::Hash for RawRetryBudget {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.ratio.map(f64::to_bits).hash(state);
        self.min_retries_per_second.hash(state);
        self.window.hash(state);
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawOutlierDetection {
    /// Consecutive 5xx responses (or connect failures, resets, timeouts) that eject. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 (or connect failures, resets, timeouts) that eject. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_failure: Option<u32>,
    /// Consecutive connect failures that eject. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_local_origin_failure: Option<u32>,
    /// An endpoint healthy this long forgets one past ejection. Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    /// Ejection lasts this × times ejected. Default `30s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Dur>,
    /// Longest ejection. Default `300s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_time: Option<Dur>,
    /// Most of the cluster ejected at once, in percent; one endpoint may always be. Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
    /// Requests let through at once while half-open; their outcome closes or reopens. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub half_open_probes: Option<u32>,
}

/// How a health check talks to an endpoint.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Hash, Eq)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckProtocol {
    /// `GET path`; healthy when the status is expected (default).
    #[default]
    Http,
    /// Healthy when a TCP connection opens.
    Tcp,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// `http` (default) or `tcp`.
    #[serde(default)]
    pub protocol: HealthCheckProtocol,
    /// HTTP path. Default `/`.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub path: Option<String>,
    /// HTTP Host header. Default: the cluster name.
    #[serde(
        deserialize_with = "super::strict::opt_string",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub host: Option<String>,
    /// Statuses that pass. Default: any 2xx.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expected_statuses: Vec<u16>,
    /// Time between checks (each with up to 10% jitter). Default `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    /// Limit for one check. Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Failed checks in a row that make an endpoint unhealthy. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Passed checks in a row that make it healthy again. Default 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Hash)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    /// `ip:port`, or `host:port` for `strict_dns`.
    #[serde(deserialize_with = "super::strict::string")]
    pub address: String,
    /// Relative weight, 1 to 10000. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

impl RawListenerTls {
    /// The files, as the TLS module takes them.
    pub fn files(&self) -> crate::tls::ServerFiles<'_> {
        crate::tls::ServerFiles {
            cert_file: &self.cert_file,
            key_file: &self.key_file,
            client_ca_file: self.client_ca_file.as_deref(),
            alpn: self.alpn.as_deref(),
        }
    }
}

impl RawClusterTls {
    /// The files, as the TLS module takes them.
    pub fn files(&self) -> crate::tls::ClientFiles<'_> {
        crate::tls::ClientFiles {
            ca_file: self.ca_file.as_deref().unwrap_or_default(),
            cert: self.cert_file.as_deref().zip(self.key_file.as_deref()),
            verify_subject_alt_names: &self.verify_subject_alt_names,
        }
    }
}

impl RawListenerTls {
    /// The files it reads.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        [Some(self.cert_file.as_str()), Some(self.key_file.as_str())]
            .into_iter()
            .chain([self.client_ca_file.as_deref()])
            .flatten()
    }
}

impl RawListenerTls {
    /// The ALPN protocols offered: `alpn`, else what a listener of `protocol` speaks (a
    /// client must not negotiate h2 on an HTTP/1.1-only listener).
    pub fn alpn_for(&self, protocol: ListenerProtocol) -> Vec<String> {
        if let Some(alpn) = &self.alpn {
            return alpn.clone();
        }
        let offered: &[&str] = match protocol {
            ListenerProtocol::Http1 => &["http/1.1"],
            ListenerProtocol::Http2 => &["h2"],
            ListenerProtocol::Auto => &["h2", "http/1.1"],
        };
        offered.iter().map(|p| p.to_string()).collect()
    }
}

impl RawCluster {
    /// The server name its TLS sends (SNI) and checks: `tls.sni`, else the host of the first
    /// endpoint as written (empty when there is none yet).
    pub fn tls_server_name(&self) -> String {
        if let Some(sni) = self.tls.as_ref().and_then(|t| t.sni.clone()) {
            return sni;
        }
        let first = self
            .endpoints
            .first()
            .map(|e| e.address.as_str())
            .unwrap_or("");
        match first.rsplit_once(':') {
            Some((host, _)) => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            None => first.to_string(),
        }
    }
}

impl RawClusterTls {
    /// The files it reads.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        [
            self.ca_file.as_deref(),
            self.cert_file.as_deref(),
            self.key_file.as_deref(),
        ]
        .into_iter()
        .flatten()
    }
}

/// A digest of files' names and contents (unreadable files count as empty); 0 for none.
pub fn files_digest<'a>(paths: impl Iterator<Item = &'a str>) -> u64 {
    let mut all = Vec::new();
    for p in paths {
        all.extend_from_slice(p.as_bytes());
        all.push(0);
        all.extend(std::fs::read(p).unwrap_or_default());
        all.push(0);
    }
    if all.is_empty() {
        return 0;
    }
    crate::hash::hash_bytes(&all)
}

impl RawConfig {
    /// A digest of the TLS files the config names (certificates, keys, CA bundles), so that
    /// a rotated file counts as a change of config.
    pub fn tls_files_digest(&self) -> u64 {
        let listeners = self.listeners.iter().filter_map(|l| l.tls.as_ref());
        let clusters = self.clusters.iter().filter_map(|c| c.tls.as_ref());
        files_digest(
            listeners
                .flat_map(RawListenerTls::paths)
                .chain(clusters.flat_map(RawClusterTls::paths)),
        )
    }
}
