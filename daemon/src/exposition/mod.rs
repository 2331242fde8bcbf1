//! What fanout shows: Prometheus metrics and the HTTP API.
pub mod http;
pub mod metrics;
