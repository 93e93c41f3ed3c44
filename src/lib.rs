//! remora: a sidecar L7 proxy. The modules follow the request path; see README.md.
// One audited exception: `memory::release_freed` (glibc malloc_trim).
#![deny(unsafe_code)]

pub mod access_log;
pub mod activity;
pub mod admin;
pub mod app;
pub mod body;
pub mod cluster;
pub mod config;
pub mod connection_limit;
pub mod control_plane;
pub mod demo;
pub mod discovery;
pub mod downstream;
pub mod error;
pub mod forward;
pub mod hash;
pub mod listener;
pub mod memory;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod reloader;
pub mod retry;
pub mod router;
pub mod snapshot;
pub mod stream_idle;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod workers;
