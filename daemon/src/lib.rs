//! fanout: a node agent that traces every TCP connection of every pod network namespace and shows
//! whether gRPC clients spread their calls across all pods of a service.
//!
//! Data path, one module per stage:
//! [`probe`] (eBPF programs, kernel layouts) → [`event`] (ring buffer records) →
//! [`conntable`] (live connections, recovery, reconciliation) → [`identity`] (pods, services,
//! conntrack) → [`analysis`] (balance, verdicts) → [`pipeline`] (the one owner of that state,
//! fed by messages) → [`exposition`] (metrics, HTTP API).
//! [`agent`] starts and stops the tasks; [`cli`] is the command line.

pub mod agent;
pub mod analysis;
pub mod cli;
pub mod conntable;
pub mod event;
pub mod exposition;
pub mod features;
pub mod heap;
pub mod identity;
pub mod keyed;
pub mod pipeline;
pub mod probe;
pub mod verify;
