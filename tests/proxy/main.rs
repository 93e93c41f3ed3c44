//! Integration tests: real upstreams and a real remora on 127.0.0.1:0, real clients.

mod admin;
mod balancing;
mod cli;
mod correctness;
mod envoy;
mod forwarding;
mod grpc;
mod hardening;
mod hostile;
mod hostile_peers;
mod limits;
mod properties;
mod raw_http;
mod reload;
mod resilience;
mod routing;
mod streaming;
mod support;
mod tls;
mod tunnels;
mod xds;
