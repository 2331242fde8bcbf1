//! Developer tasks for fanout, and the network-namespace lab shared by the demo and the root tests.
pub mod bench;
pub mod container;
pub mod daemon;
pub mod grpc;
pub mod http;
pub mod image;
pub mod lab;
pub mod prom;
pub mod report;
pub mod setup;
pub mod soak;
