//! The ADS state-of-the-world client: one stream to the control plane; LDS and CDS by
//! wildcard, RDS and EDS by the names the consumer's accepted resources reference; every
//! response answered (ACK with its version, or NACK with the reason and the last good
//! version); reconnects with jittered exponential backoff, resubscribing with the versions
//! it holds.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::protobuf::Any;
use envoy_types::pb::google::rpc;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::resources::TypeUrl;

/// First wait before reconnecting, and the cap.
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Time to open the connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PINGs on the stream, and how long one may go unanswered. Five minutes: grpc-go
/// servers (go-control-plane) answer more frequent pings on a quiet stream with GOAWAY
/// `too_many_pings` (their default enforcement MinTime).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The names the consumer wants by RDS and EDS (those its accepted listeners and clusters
/// reference).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscriptions {
    pub routes: BTreeSet<String>,
    pub endpoints: BTreeSet<String>,
}

/// What the client tells its consumer.
#[derive(Debug)]
pub enum Event {
    /// The stream is up (true) or down (false).
    Connected(bool),
    /// The client itself NACKed a response of this type (e.g. duplicate names), for the
    /// consumer's counts.
    Refused { kind: TypeUrl, reason: String },
    /// A response: the whole state of the world for `kind`. The consumer answers on
    /// `verdict`: `Ok` (ACK) or the reason it refuses it (NACK).
    Update {
        kind: TypeUrl,
        version: String,
        resources: Vec<Any>,
        verdict: oneshot::Sender<Result<(), String>>,
    },
}

/// Where to connect and who we are.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` of the control plane (h2c gRPC).
    pub address: String,
    pub node: Node,
}

/// Runs the client until `events` is closed.
pub async fn run(
    config: Config,
    mut subscriptions: watch::Receiver<Subscriptions>,
    events: mpsc::Sender<Event>,
) {
    let mut versions: HashMap<TypeUrl, String> = HashMap::new();
    let mut backoff = BACKOFF_BASE;
    loop {
        let outcome = session(&config, &mut subscriptions, &events, &mut versions).await;
        if events.is_closed() {
            return;
        }
        let _ = events.send(Event::Connected(false)).await;
        match outcome {
            Session::Served => backoff = BACKOFF_BASE,
            Session::Refused => {
                tracing::warn!(address = %config.address, retry_in = ?backoff, "control plane ended the stream before answering")
            }
            Session::Failed(error) => {
                tracing::warn!(address = %config.address, %error, retry_in = ?backoff, "control plane unreachable")
            }
        }
        // Full jitter, so that a fleet of sidecars does not reconnect in step.
        let wait = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Session {
    /// A stream was up and answered, then ended: reconnect soon.
    Served,
    /// A stream opened but ended before any response: back off as for a failure.
    Refused,
    /// No stream could be opened.
    Failed(String),
}

/// Per type on one stream: the nonce of the last response.
struct Sent {
    nonce: String,
}

async fn session(
    config: &Config,
    subscriptions: &mut watch::Receiver<Subscriptions>,
    events: &mpsc::Sender<Event>,
    versions: &mut HashMap<TypeUrl, String>,
) -> Session {
    let endpoint =
        match tonic::transport::Endpoint::from_shared(format!("http://{}", config.address)) {
            Ok(e) => e
                .connect_timeout(CONNECT_TIMEOUT)
                // SotW is silent while nothing changes: keepalives find a stream that died
                // quietly (a vanished host, a NAT that forgot it).
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_keepalive(Some(KEEPALIVE_INTERVAL)),
            Err(e) => return Session::Failed(e.to_string()),
        };
    let mut client = match endpoint.connect().await {
        Ok(channel) => AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(64 * 1024 * 1024),
        Err(e) => return Session::Failed(e.to_string()),
    };
    let (tx, rx) = mpsc::channel::<DiscoveryRequest>(16);
    let mut last: HashMap<TypeUrl, Sent> = HashMap::new();
    let mut answered = false;
    let ended = |answered: bool| {
        if answered {
            Session::Served
        } else {
            Session::Refused
        }
    };
    let request = |kind: TypeUrl,
                   names: Vec<String>,
                   version: String,
                   nonce: String,
                   error: Option<String>,
                   first: bool| DiscoveryRequest {
        version_info: version,
        // The node goes with the first request of the stream only, as Envoy does.
        node: first.then(|| config.node.clone()),
        resource_names: names,
        type_url: kind.as_str(),
        response_nonce: nonce,
        error_detail: error.map(|message| rpc::Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    };
    let names_of = |subs: &Subscriptions, kind: TypeUrl| -> Vec<String> {
        match kind {
            TypeUrl::Route => subs.routes.iter().cloned().collect(),
            TypeUrl::Endpoint => subs.endpoints.iter().cloned().collect(),
            _ => Vec::new(),
        }
    };
    // Subscribe: clusters and listeners by wildcard, routes and endpoints by name, each with
    // the version held (so an unchanged control plane need not resend).
    let mut subscribed = subscriptions.borrow_and_update().clone();
    let mut first = true;
    for kind in TypeUrl::ALL {
        if kind.by_name() && names_of(&subscribed, kind).is_empty() {
            continue;
        }
        let version = versions.get(&kind).cloned().unwrap_or_default();
        let req = request(
            kind,
            names_of(&subscribed, kind),
            version,
            String::new(),
            None,
            first,
        );
        first = false;
        if tx.send(req).await.is_err() {
            return Session::Failed("request channel closed".into());
        }
    }
    // Only now open the stream: some servers (grpc-go, so go-control-plane) send response
    // headers with their first response, which comes only after a request, and the call
    // returns once headers arrive. The requests above wait in the channel.
    let opened = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.stream_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await;
    let mut responses = match opened {
        Ok(Ok(r)) => r.into_inner(),
        Ok(Err(status)) => return Session::Failed(status.to_string()),
        Err(_) => {
            return Session::Failed("no answer to the stream within the connect timeout".into())
        }
    };
    let _ = events.send(Event::Connected(true)).await;
    let mut asked: BTreeSet<TypeUrl> = TypeUrl::ALL
        .into_iter()
        .filter(|k| !k.by_name() || !names_of(&subscribed, *k).is_empty())
        .collect();
    loop {
        tokio::select! {
            message = responses.message() => {
                let response: DiscoveryResponse = match message {
                    Ok(Some(r)) => r,
                    Ok(None) => return ended(answered),
                    Err(status) => {
                        tracing::warn!(%status, "ADS stream broke");
                        return ended(answered);
                    }
                };
                answered = true;
                let Some(kind) = TypeUrl::parse(&response.type_url) else {
                    tracing::debug!(type_url = %response.type_url, "response for a type not asked for");
                    continue;
                };
                let verdict = match duplicate_name(kind, &response.resources) {
                    Some(name) => {
                        let reason = format!("duplicate resource name `{name}` in one response");
                        let _ = events.send(Event::Refused { kind, reason: reason.clone() }).await;
                        Err(reason)
                    }
                    None => {
                        let (tell, answer) = oneshot::channel();
                        let update = Event::Update {
                            kind,
                            version: response.version_info.clone(),
                            resources: response.resources,
                            verdict: tell,
                        };
                        if events.send(update).await.is_err() {
                            return Session::Served;
                        }
                        answer.await.unwrap_or_else(|_| Err("remora is shutting down".into()))
                    }
                };
                let (version, error) = match verdict {
                    Ok(()) => {
                        versions.insert(kind, response.version_info.clone());
                        (response.version_info.clone(), None)
                    }
                    Err(reason) => {
                        tracing::warn!(kind = kind.label(), version = %response.version_info, %reason, "NACK");
                        (versions.get(&kind).cloned().unwrap_or_default(), Some(reason))
                    }
                };
                last.insert(kind, Sent { nonce: response.nonce.clone() });
                // An update may change what routes and endpoints are wanted: send those
                // requests with this answer (the consumer updated `subscriptions` before it
                // answered).
                let now = subscriptions.borrow_and_update().clone();
                let req = request(kind, names_of(&now, kind), version, response.nonce, error, false);
                if tx.send(req).await.is_err() {
                    return Session::Served;
                }
                if now != subscribed {
                    if !resubscribe(&tx, &request, &names_of, &now, &subscribed, versions, &last, &mut asked).await {
                        return Session::Served;
                    }
                    subscribed = now;
                }
            }
            changed = subscriptions.changed() => {
                if changed.is_err() {
                    return Session::Served;
                }
                let now = subscriptions.borrow_and_update().clone();
                if now != subscribed {
                    if !resubscribe(&tx, &request, &names_of, &now, &subscribed, versions, &last, &mut asked).await {
                        return Session::Served;
                    }
                    subscribed = now;
                }
            }
        }
    }
}

/// Sends a new request for RDS and EDS where the wanted names changed.
#[allow(clippy::too_many_arguments)]
async fn resubscribe(
    tx: &mpsc::Sender<DiscoveryRequest>,
    request: &impl Fn(TypeUrl, Vec<String>, String, String, Option<String>, bool) -> DiscoveryRequest,
    names_of: &impl Fn(&Subscriptions, TypeUrl) -> Vec<String>,
    now: &Subscriptions,
    before: &Subscriptions,
    versions: &HashMap<TypeUrl, String>,
    last: &HashMap<TypeUrl, Sent>,
    asked: &mut BTreeSet<TypeUrl>,
) -> bool {
    for kind in [TypeUrl::Endpoint, TypeUrl::Route] {
        let names = names_of(now, kind);
        if names == names_of(before, kind) || (names.is_empty() && !asked.contains(&kind)) {
            continue;
        }
        asked.insert(kind);
        let version = versions.get(&kind).cloned().unwrap_or_default();
        let nonce = last.get(&kind).map(|s| s.nonce.clone()).unwrap_or_default();
        if tx
            .send(request(kind, names, version, nonce, None, false))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// The first name that appears twice in a response, if any.
fn duplicate_name(kind: TypeUrl, resources: &[Any]) -> Option<String> {
    let mut probe = crate::Resources::default();
    let names = probe.decode_into(kind, resources).ok()?;
    let mut seen = BTreeSet::new();
    names.into_iter().find(|n| !seen.insert(n.clone()))
}
