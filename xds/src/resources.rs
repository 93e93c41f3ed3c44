//! The four resource types remora speaks (LDS, RDS, CDS, EDS), their type URLs, and their
//! encoding to and from `Any`.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};

/// A set of resources of the four types, e.g. one control-plane snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub listeners: Vec<Listener>,
    pub route_configs: Vec<RouteConfiguration>,
    pub clusters: Vec<Cluster>,
    pub endpoints: Vec<ClusterLoadAssignment>,
}

/// The resource types, in make-before-break order: clusters before their endpoints,
/// listeners before their routes are needed... and routes last (Envoy's own order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TypeUrl {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl TypeUrl {
    pub const ALL: [TypeUrl; 4] = [
        TypeUrl::Cluster,
        TypeUrl::Endpoint,
        TypeUrl::Listener,
        TypeUrl::Route,
    ];

    pub fn as_str(self) -> String {
        match self {
            TypeUrl::Cluster => Cluster::type_url(),
            TypeUrl::Endpoint => ClusterLoadAssignment::type_url(),
            TypeUrl::Listener => Listener::type_url(),
            TypeUrl::Route => RouteConfiguration::type_url(),
        }
    }

    pub fn parse(url: &str) -> Option<TypeUrl> {
        TypeUrl::ALL.into_iter().find(|t| t.as_str() == url)
    }

    /// The short name used in metrics and logs: `cds`, `eds`, `lds`, `rds`.
    pub fn label(self) -> &'static str {
        match self {
            TypeUrl::Cluster => "cds",
            TypeUrl::Endpoint => "eds",
            TypeUrl::Listener => "lds",
            TypeUrl::Route => "rds",
        }
    }

    /// Whether a client asks for these by name (RDS, EDS) rather than for all (LDS, CDS).
    pub fn by_name(self) -> bool {
        matches!(self, TypeUrl::Endpoint | TypeUrl::Route)
    }
}

/// One resource, named and encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    pub name: String,
    pub any: Any,
}

fn encode<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

impl Resources {
    /// The resources of one type, named and encoded.
    pub fn encoded(&self, kind: TypeUrl) -> Vec<Named> {
        match kind {
            TypeUrl::Listener => self
                .listeners
                .iter()
                .map(|m| Named {
                    name: m.name.clone(),
                    any: encode(m),
                })
                .collect(),
            TypeUrl::Route => self
                .route_configs
                .iter()
                .map(|m| Named {
                    name: m.name.clone(),
                    any: encode(m),
                })
                .collect(),
            TypeUrl::Cluster => self
                .clusters
                .iter()
                .map(|m| Named {
                    name: m.name.clone(),
                    any: encode(m),
                })
                .collect(),
            TypeUrl::Endpoint => self
                .endpoints
                .iter()
                .map(|m| Named {
                    name: m.cluster_name.clone(),
                    any: encode(m),
                })
                .collect(),
        }
    }

    /// Decodes one type's resources from a response into `self` (replacing that type: the
    /// state of the world). Errors name the resource that failed.
    pub fn decode_into(&mut self, kind: TypeUrl, anys: &[Any]) -> Result<Vec<String>, String> {
        fn all<M: Message + Name + Default>(anys: &[Any]) -> Result<Vec<M>, String> {
            anys.iter()
                .enumerate()
                .map(|(i, a)| {
                    if a.type_url != M::type_url() {
                        return Err(format!(
                            "resources[{i}]: type `{}` in a response for `{}`",
                            a.type_url,
                            M::type_url()
                        ));
                    }
                    M::decode(a.value.as_slice())
                        .map_err(|e| format!("resources[{i}]: cannot decode: {e}"))
                })
                .collect()
        }
        let names = match kind {
            TypeUrl::Listener => {
                self.listeners = all(anys)?;
                self.listeners.iter().map(|l| l.name.clone()).collect()
            }
            TypeUrl::Route => {
                self.route_configs = all(anys)?;
                self.route_configs.iter().map(|r| r.name.clone()).collect()
            }
            TypeUrl::Cluster => {
                self.clusters = all(anys)?;
                self.clusters.iter().map(|c| c.name.clone()).collect()
            }
            TypeUrl::Endpoint => {
                self.endpoints = all(anys)?;
                self.endpoints
                    .iter()
                    .map(|e| e.cluster_name.clone())
                    .collect()
            }
        };
        Ok(names)
    }
}
