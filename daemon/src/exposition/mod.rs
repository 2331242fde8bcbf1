//! What fanout shows: Prometheus metrics (node-wide, and per pod from the analysis) and the HTTP
//! API.
pub mod api;
pub mod balance;
pub mod http;
pub mod k8s_events;
pub mod metrics;
pub mod server;
