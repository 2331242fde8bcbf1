//! The hash maps of the per-record path (connection table, held closes, analyzer state).
//!
//! Invariant: every map keyed by what a peer chooses (addresses, ports, socket addresses) is
//! keyed with a per-map random seed, so a remote that picks its ports cannot aim collisions at a
//! bucket. aHash's `RandomState` is such a keyed hash (seeded from the OS at runtime) and costs a
//! fraction of std's SipHash-1-3, which was a quarter of the daemon's CPU per record in a profile
//! (BENCHMARKS.md).

/// A `HashMap` with a randomly keyed aHash.
pub type Map<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
/// A `HashSet` with a randomly keyed aHash.
pub type Set<K> = std::collections::HashSet<K, ahash::RandomState>;
