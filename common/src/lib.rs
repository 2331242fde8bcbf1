//! Types shared by fanout's eBPF programs and its daemon.
//!
//! Everything here is `no_std`, `#[repr(C)]` and free of padding so that the same bytes mean the
//! same thing on both sides of the ring buffer. Pure logic (state classification) lives here too so
//! that it is unit-tested on the host and runs unchanged in the kernel.
#![no_std]

pub mod config;
pub mod h2;
pub mod record;
pub mod tcp;

pub use config::{Config, KernelOffsets, SockLayout, TracepointLayout};
pub use record::{LostReason, Record, RecordKind, SockState};
