//! Envoy's xDS v3, state-of-the-world ADS: the client remora runs against a control plane,
//! and the server `remora control-plane` runs. Knows nothing of remora's config: resources
//! go in and out as envoy-types messages.

pub mod client;
pub mod resources;
pub mod server;

pub use envoy_types;
pub use resources::{assignment_name, rds_names, Resources, TypeUrl};
