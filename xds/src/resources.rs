//! The four resource types remora speaks (LDS, RDS, CDS, EDS), their type URLs, and their
//! encoding to and from `Any`.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
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

/// The route config names a listener's HTTP connection managers ask for by RDS.
pub fn rds_names(l: &Listener) -> Vec<String> {
    l.filter_chains
        .iter()
        .flat_map(|fc| fc.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any))
                if any.type_url.ends_with("HttpConnectionManager") =>
            {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect()
}

/// The ClusterLoadAssignment an EDS cluster asks for (its `service_name`, else its name);
/// `None` for a cluster of another type.
pub fn assignment_name(c: &Cluster) -> Option<String> {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        ClusterDiscoveryType, DiscoveryType,
    };
    if c.cluster_discovery_type != Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)) {
        return None;
    }
    let service = c
        .eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.as_str());
    Some(
        service
            .filter(|s| !s.is_empty())
            .unwrap_or(&c.name)
            .to_string(),
    )
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

impl Resources {
    /// A compact binary form (per type: a count, then each resource's length and bytes), for
    /// a cache file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = b"remora-xds-cache-1\n".to_vec();
        for kind in TypeUrl::ALL {
            let encoded = self.encoded(kind);
            out.extend_from_slice(&(encoded.len() as u32).to_le_bytes());
            for r in encoded {
                out.extend_from_slice(&(r.any.value.len() as u32).to_le_bytes());
                out.extend_from_slice(&r.any.value);
            }
        }
        out
    }

    /// Reads what [`Resources::to_bytes`] wrote.
    pub fn from_bytes(mut data: &[u8]) -> Result<Resources, String> {
        let magic = b"remora-xds-cache-1\n";
        data = data
            .strip_prefix(&magic[..])
            .ok_or("not a remora xDS cache file")?;
        let mut take = |n: usize| -> Result<&[u8], String> {
            if data.len() < n {
                return Err("truncated cache file".into());
            }
            let (head, rest) = data.split_at(n);
            data = rest;
            Ok(head)
        };
        let mut res = Resources::default();
        for kind in TypeUrl::ALL {
            let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
            let mut anys = Vec::new();
            for _ in 0..count {
                let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
                anys.push(Any {
                    type_url: kind.as_str(),
                    value: take(len)?.to_vec(),
                });
            }
            res.decode_into(kind, &anys)?;
        }
        Ok(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_form_reads_back_what_it_wrote() {
        let mut res = Resources::default();
        res.listeners.push(Listener {
            name: "l".into(),
            ..Default::default()
        });
        res.endpoints.push(ClusterLoadAssignment {
            cluster_name: "c".into(),
            ..Default::default()
        });
        let bytes = res.to_bytes();
        assert_eq!(Resources::from_bytes(&bytes).unwrap(), res);
        assert!(Resources::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(Resources::from_bytes(b"junk").is_err());
    }
}
