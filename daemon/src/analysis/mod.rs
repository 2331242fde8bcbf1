//! Balance analysis: turns per-connection observations into per-(client pod, service) balance
//! figures and a load-balancing verdict ([`Verdict`]).
//!
//! Pure: no kernel, no I/O, no clock. Every input carries its time ([`Nanos`], any monotonic
//! origin, e.g. CLOCK_MONOTONIC), and [`Analyzer::evaluate`] is given `now`.
//!
//! Inputs, fed by the daemon:
//! * [`Analyzer::on_open`] / [`Analyzer::on_close`]: a connection from a client pod to a service
//!   (ClusterIP with its conntrack backend, or a pod reached directly with its service). The
//!   backend may be learnt later ([`Analyzer::on_backend`]) when the conntrack lookup completes.
//! * [`Analyzer::on_sample`]: a connection's cumulative counters since it opened.
//! * [`Analyzer::set_ready_backends`]: a service's ready backends, from the identity inventory.
//!
//! The window. Time is cut in buckets (default 1 s). The window is the last
//! `ceil(window / bucket)` buckets, the current (partial) one included, so it spans between
//! `window - bucket` and `window`. Rates divide by the span actually covered: from the window start,
//! or from when the key was first seen if that is later.
//!
//! Definitions:
//! * ready: the service's ready backends now (0 when the service's readiness was never given).
//! * connected (fan-out): backends that had a live connection at any moment of the window or traffic
//!   in it. A live connection that carries nothing still counts: the client holds it and can use
//!   it. A backend whose last connection closed (and whose traffic stopped) before the window
//!   start does not count, even if it served requests earlier.
//! * coverage = ready backends that are connected / ready backends; None when nothing is ready.
//! * skew = largest backend share / fair share, where fair share = 1 / ready backends, or
//!   1 / connected backends when no backend is ready (readiness unknown). 1.0 is even. None when
//!   no request has a known backend.
//! * lifetimes: connections that closed in the window. The mean lifetime the verdict uses counts
//!   live connections too, at their current age.
//! * local ports: distinct local ports of the live connections at the window start (the start of
//!   its first bucket) and now. The same set at both ends shows the connections were reused.
//!   A key first seen inside the window had nothing live at its start.
//! * requests source: `messages` if any request of the window was estimated from messages (TLS or
//!   unparsable traffic), `h2` if all were counted from HTTP/2 frames.
//!
//! Recovered connections (found at startup, open time unknown) are not counted as opens; their age
//! starts when they were first seen, a lower bound. Their first counter sample is a baseline, since
//! it includes traffic from before the daemon started.
//!
//! Memory is bounded. Per key: one ring of `ceil(window / bucket)` buckets (opens, closes, lifetime
//! histogram, requests, bytes), one ring of port snapshots of at most `max_ports` ports, and per
//! backend (at most `max_backends_per_key`; traffic to more is counted as unattributed) one ring of
//! per-backend request/connection buckets. At most `max_keys` keys and `max_connections` live
//! connections: opens over a cap are refused and counted in [`AnalyzerStats`]. [`Analyzer::gc`]
//! drops keys whose client or service is gone ([`Analyzer::client_gone`],
//! [`Analyzer::service_gone`]) for `grace`, and keys with no live connection and no event for
//! `grace`.

pub mod feed;
pub mod ports;
pub mod regress;
mod verdict;
mod window;

#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use self::window::{BackendBucket, KeyBucket, Ring, lifetime_bucket};
pub use self::{
    verdict::{ServiceFacts, Thresholds, Verdict, advise, classify, pct, secs},
    window::{LIFETIME_BOUNDS_SECONDS, LifetimeHistogram},
};
use crate::{identity::model::ObjectRef, keyed::Map};

/// Nanoseconds since an arbitrary monotonic origin.
pub type Nanos = u64;

/// Most buckets a window may hold.
pub const MAX_SLOTS: u64 = 3600;

/// A connection, as the daemon names it: any id unique among live connections (for example the
/// kernel socket address, or a sequence number assigned at open).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConnId(pub u64);

/// How a connection's request count was obtained (the connection table's own type).
pub use crate::conntable::RequestSource;

/// A connection that opened (or, `recovered`, was found already open).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnOpen {
    pub id: ConnId,
    pub client: ObjectRef,
    pub service: ObjectRef,
    /// The backend pod, when known at open (direct pod connections, or conntrack already resolved).
    pub backend: Option<ObjectRef>,
    pub local_port: u16,
    pub at: Nanos,
    /// Found at startup: its open time is unknown and it is not counted as an open.
    pub recovered: bool,
}

/// A connection's counters, cumulative since it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub requests: u64,
    pub source: RequestSource,
}

impl Counters {
    fn zero() -> Self {
        Counters {
            bytes_sent: 0,
            bytes_received: 0,
            messages_sent: 0,
            messages_received: 0,
            requests: 0,
            source: RequestSource::H2,
        }
    }
}

/// Configuration of the analysis.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisConfig {
    /// The sliding window (default 30 s).
    pub window: Duration,
    /// Bucket width (default 1 s): the window's resolution.
    pub bucket: Duration,
    /// How long a key whose client or service is gone, or which is idle, is kept (default 60 s,
    /// two default windows).
    pub grace: Duration,
    /// Most (client, service) keys (default 4096).
    pub max_keys: usize,
    /// Most live connections tracked (default 65536).
    pub max_connections: usize,
    /// Most distinct backends per key (default 256).
    pub max_backends_per_key: usize,
    /// Most local ports kept per snapshot and reported (default 64, the lowest ones).
    pub max_ports: usize,
    /// Hard cap on the per-pod metric series (default 50000): a (client, service) key costs
    /// [`KEY_SERIES`], each backend under it [`BACKEND_SERIES`]. A new key over the cap is refused;
    /// a new backend over it is counted under the `_overflow` backend.
    pub max_series: usize,
    pub thresholds: Thresholds,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            window: Duration::from_secs(30),
            bucket: Duration::from_secs(1),
            grace: Duration::from_secs(60),
            max_keys: 4096,
            max_connections: 65536,
            max_backends_per_key: 256,
            max_ports: 64,
            max_series: 50_000,
            thresholds: Thresholds::default(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("analysis bucket must be longer than zero")]
    ZeroBucket,
    #[error("analysis window ({window:?}) must be at least one bucket ({bucket:?})")]
    WindowShorterThanBucket { window: Duration, bucket: Duration },
    #[error("analysis window holds {slots} buckets, more than the limit of {MAX_SLOTS}")]
    TooManyBuckets { slots: u64 },
}

/// Counters of what the analyzer holds and what it refused or dropped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AnalyzerStats {
    pub keys: usize,
    pub connections: usize,
    pub services: usize,
    /// Opens refused because the key cap was reached (their key was not created).
    pub dropped_key_cap: u64,
    /// Opens refused because the connection cap was reached.
    pub dropped_connection_cap: u64,
    /// Connections whose backend was over the per-key backend cap (their requests are unattributed).
    pub dropped_backend_cap: u64,
    /// Keys (their opens refused) and backends (counted under `_overflow`) refused because the
    /// series cap was reached.
    pub dropped_series_cap: u64,
    /// Metric series the current keys and backends take ([`KEY_SERIES`], [`BACKEND_SERIES`]).
    pub series: usize,
    /// Keys dropped by [`Analyzer::gc`] (gone or idle for the grace period).
    pub keys_collected: u64,
    /// Live connections dropped with their key by [`Analyzer::gc`].
    pub connections_collected: u64,
    /// Closes, samples and backends for connections the analyzer does not know.
    pub unmatched: u64,
    /// Opens that reused the id of a live connection: the old one is taken as closed.
    pub implicit_closes: u64,
}

/// One backend's figures in a [`Balance`].
///
/// Decoding requires every field, the `Option`s included (`deserialize_with`): a missing or
/// renamed field is an error, never a silent `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendBalance {
    pub backend: ObjectRef,
    /// The pod name, or `namespace/name` when the backend is outside the service's namespace.
    pub name: String,
    pub ready: bool,
    pub connected: bool,
    pub live_connections: u64,
    /// Connections seen in the window: live ones plus those that closed in it.
    pub connections: u64,
    pub opens: u64,
    pub closes: u64,
    pub requests: u64,
    /// Share of the requests with a known backend; None when there are none.
    #[serde(deserialize_with = "Option::deserialize")]
    pub share: Option<f64>,
    /// Mean lifetime of the window's connections, live ones at their current age.
    #[serde(deserialize_with = "Option::deserialize")]
    pub mean_lifetime_seconds: Option<f64>,
    /// For a ready backend that is not connected: how long it has been ready and unconnected
    /// (since it became ready, last had a connection, or the key was first seen, whichever is
    /// latest).
    #[serde(deserialize_with = "Option::deserialize")]
    pub unconnected_seconds: Option<f64>,
}

/// The balance of one client pod's calls over one service's backends, over the window.
///
/// As the balance API serves it (`exposition::api::ServiceBalanceView`). Decoding requires every
/// field, the `Option`s included (`deserialize_with`): a missing or renamed field is an error,
/// never a silent `None`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Balance {
    pub client: ObjectRef,
    pub service: ObjectRef,
    /// The configured window.
    pub window_seconds: f64,
    /// The span the window figures cover (shorter while the key is younger than the window).
    pub span_seconds: f64,
    /// Since the key was first seen.
    pub observed_seconds: f64,
    pub ready: usize,
    /// Backends connected in the window (fan-out), ready or not.
    pub connected: usize,
    /// Ready backends that are connected.
    pub connected_ready: usize,
    #[serde(deserialize_with = "Option::deserialize")]
    pub coverage: Option<f64>,
    /// Requests in the window, unattributed ones included.
    pub requests: u64,
    /// Requests on connections whose backend is unknown (or over the backend cap).
    pub requests_unattributed: u64,
    /// Requests per backend name; ready backends without requests appear with 0.
    pub requests_per_backend: BTreeMap<String, u64>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub skew: Option<f64>,
    pub live_connections: u64,
    /// Connections seen in the window: live ones plus those that closed in it.
    pub connections: u64,
    pub opens: u64,
    pub closes: u64,
    pub opens_per_sec: f64,
    pub closes_per_sec: f64,
    #[serde(deserialize_with = "Option::deserialize")]
    pub opens_per_request: Option<f64>,
    /// Mean lifetime of the window's connections, live ones at their current age.
    #[serde(deserialize_with = "Option::deserialize")]
    pub mean_lifetime_seconds: Option<f64>,
    /// Lifetimes of the connections that closed in the window.
    pub lifetimes: LifetimeHistogram,
    pub local_ports_start: Vec<u16>,
    pub local_ports_end: Vec<u16>,
    /// Some live connection at the window start, and the same local ports at both ends.
    pub ports_stable: bool,
    /// Share of the start ports still live at the end; None when nothing was live at the start.
    #[serde(deserialize_with = "Option::deserialize")]
    pub ports_reused: Option<f64>,
    /// More live ports than `max_ports`: the port lists hold the lowest ones.
    pub ports_truncated: bool,
    #[serde(deserialize_with = "Option::deserialize")]
    pub source: Option<RequestSource>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub backends: Vec<BackendBalance>,
    pub verdict: Verdict,
    /// The verdict's reason in words, ending with the advice when there is one.
    pub reason: String,
    /// The fix for the verdict ([`verdict::advise`]); None for `round_robin` and
    /// `insufficient_data`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub advice: Option<String>,
}

impl Balance {
    /// The backend with the most requests (the first by name on a tie), if any has requests.
    pub fn top_backend(&self) -> Option<&BackendBalance> {
        let mut top: Option<&BackendBalance> = None;
        for b in self.backends.iter().filter(|b| b.requests > 0) {
            if top.is_none_or(|t| b.requests > t.requests) {
                top = Some(b);
            }
        }
        top
    }
}

/// Metric series a (client, service) key takes: the lifetime histogram (buckets, sum, count),
/// ready, connected, skew, one verdict series per [`Verdict`], and the `_unknown` and `_overflow`
/// backends.
pub const KEY_SERIES: usize =
    window::LIFETIME_BUCKETS + 2 + 3 + Verdict::ALL.len() + 2 * BACKEND_SERIES;
/// Metric series one backend of a key takes: opened, closed, active, requests by source (2),
/// bytes by direction (2).
pub const BACKEND_SERIES: usize = 7;

/// The backend name of connections whose backend is not known (yet). Pod names cannot start
/// with `_`, so it never collides with a pod.
pub const BACKEND_UNKNOWN: &str = "_unknown";
/// The backend name of connections whose backend is over the per-key backend cap or the series
/// cap.
pub const BACKEND_OVERFLOW: &str = "_overflow";

/// Cumulative counts of one backend of a key since the key was created (Prometheus counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SlotTotals {
    /// Traced opens. A connection is counted once its backend is known, or under `_unknown`
    /// when it is still unknown a second after the open or at the close. Recovered connections
    /// are not opens.
    pub opened: u64,
    pub closed: u64,
    pub requests_h2: u64,
    pub requests_messages: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl SlotTotals {
    fn is_zero(&self) -> bool {
        *self == SlotTotals::default()
    }
}

/// One backend's cumulative counts and live connections in a [`KeyTotals`].
#[derive(Clone, Debug, PartialEq)]
pub struct BackendTotals {
    /// The pod name (`namespace/name` outside the service's namespace), [`BACKEND_UNKNOWN`] or
    /// [`BACKEND_OVERFLOW`].
    pub name: String,
    pub totals: SlotTotals,
    pub active: u64,
}

/// Cumulative figures of one (client, service) key, for the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyTotals {
    pub client: ObjectRef,
    pub service: ObjectRef,
    /// Every backend with state, then `_unknown` and `_overflow` when they have anything.
    pub backends: Vec<BackendTotals>,
    /// Lifetimes of every closed connection whose lifetime is known (traced start, or opened
    /// while the daemon ran).
    pub lifetimes: LifetimeHistogram,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    client: ObjectRef,
    service: ObjectRef,
}

#[derive(Debug)]
struct ConnState {
    key: Arc<Key>,
    backend: Option<ObjectRef>,
    /// The backend is known but over a cap: counted under `_overflow`.
    overflow: bool,
    /// Found at startup (not an open).
    recovered: bool,
    /// The open is in the totals (see [`SlotTotals::opened`]).
    open_counted: bool,
    local_port: u16,
    /// Open time, or for a recovered connection when it was first seen.
    opened_at: Nanos,
    /// None until a recovered connection's first sample sets the baseline.
    last: Option<Counters>,
}

#[derive(Debug)]
struct BackendState {
    buckets: Ring<BackendBucket>,
    live: u64,
    live_opened_sum: u128,
    /// Last open, close, sample or backend assignment (a time it was connected).
    last_connected: Nanos,
    totals: SlotTotals,
}

#[derive(Debug)]
struct KeyState {
    first_seen: Nanos,
    last_event: Nanos,
    /// When the client pod was reported gone.
    gone_since: Option<Nanos>,
    buckets: Ring<KeyBucket>,
    backends: BTreeMap<ObjectRef, BackendState>,
    live: u64,
    live_opened_sum: u128,
    /// Multiset of the live connections' local ports.
    live_ports: BTreeMap<u16, u32>,
    /// Local ports live at the start of each bucket.
    port_snapshots: Ring<Vec<u16>>,
    /// The newest bucket whose start has a snapshot.
    advanced_to: u64,
    /// Totals of connections with no known backend, and over a cap.
    unknown: SlotTotals,
    overflow: SlotTotals,
    /// Cumulative lifetime histogram (per-bucket counts) and sum.
    lifetimes_total: [u64; window::LIFETIME_BUCKETS],
    lifetime_total_sum_ns: u64,
}

#[derive(Debug, Default)]
struct ServiceState {
    /// Ready backends and since when.
    ready: BTreeMap<ObjectRef, Nanos>,
    gone_since: Option<Nanos>,
    /// What the advice needs to know about the service.
    facts: ServiceFacts,
}

/// The analysis engine. See the module documentation.
#[derive(Debug)]
pub struct Analyzer {
    cfg: AnalysisConfig,
    bucket_ns: u64,
    slots: u64,
    keys: BTreeMap<Arc<Key>, KeyState>,
    conns: Map<ConnId, ConnState>,
    services: Map<ObjectRef, ServiceState>,
    stats: AnalyzerStats,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn secs_f64(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn ratio(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// A backend's name as the API and the metrics show it: the pod name, or `namespace/name` when it
/// is outside the service's namespace.
fn backend_name(backend: &ObjectRef, service: &ObjectRef) -> String {
    if backend.namespace == service.namespace {
        backend.name.clone()
    } else {
        backend.to_string()
    }
}

/// How long a connection's backend may stay unknown before its open is counted under
/// [`BACKEND_UNKNOWN`].
const OPEN_SETTLE_NS: u64 = 1_000_000_000;

fn ports_of(live: &BTreeMap<u16, u32>, max: usize) -> Vec<u16> {
    live.keys().take(max).copied().collect()
}

impl KeyState {
    fn new(at: Nanos, slots: usize, bucket: u64) -> Self {
        let mut port_snapshots = Ring::new(slots);
        if let Some(s) = port_snapshots.slot_mut(bucket) {
            *s = Vec::new();
        }
        KeyState {
            first_seen: at,
            last_event: at,
            gone_since: None,
            buckets: Ring::new(slots),
            backends: BTreeMap::new(),
            live: 0,
            live_opened_sum: 0,
            live_ports: BTreeMap::new(),
            port_snapshots,
            advanced_to: bucket,
            unknown: SlotTotals::default(),
            overflow: SlotTotals::default(),
            lifetimes_total: [0; window::LIFETIME_BUCKETS],
            lifetime_total_sum_ns: 0,
        }
    }

    /// The totals a connection's traffic is counted under.
    fn slot(&mut self, backend: Option<&ObjectRef>, overflow: bool) -> &mut SlotTotals {
        match backend.and_then(|b| self.backends.get_mut(b)) {
            Some(bs) => &mut bs.totals,
            None if overflow => &mut self.overflow,
            None => &mut self.unknown,
        }
    }

    /// Records the live ports at the start of every bucket up to `bucket`, before an event in
    /// `bucket` changes them: they are unchanged since the previous event.
    fn advance(&mut self, bucket: u64, slots: u64, max_ports: usize, at: Nanos) {
        self.last_event = self.last_event.max(at);
        if bucket <= self.advanced_to {
            return;
        }
        let from = (self.advanced_to + 1).max(bucket.saturating_sub(slots - 1));
        let snap = ports_of(&self.live_ports, max_ports);
        for i in from..=bucket {
            if let Some(s) = self.port_snapshots.slot_mut(i) {
                s.clone_from(&snap);
            }
        }
        self.advanced_to = bucket;
    }

    /// The backend a connection is counted under, creating its state; None over a cap (the
    /// per-key backend cap or the series cap).
    fn admit_backend(
        &mut self,
        backend: ObjectRef,
        slots: usize,
        cfg: &AnalysisConfig,
        stats: &mut AnalyzerStats,
    ) -> Option<ObjectRef> {
        if !self.backends.contains_key(&backend) {
            if self.backends.len() >= cfg.max_backends_per_key {
                stats.dropped_backend_cap += 1;
                return None;
            }
            if stats.series + BACKEND_SERIES > cfg.max_series {
                stats.dropped_series_cap += 1;
                return None;
            }
            stats.series += BACKEND_SERIES;
            self.backends.insert(
                backend.clone(),
                BackendState {
                    buckets: Ring::new(slots),
                    live: 0,
                    live_opened_sum: 0,
                    last_connected: 0,
                    totals: SlotTotals::default(),
                },
            );
        }
        Some(backend)
    }

    fn attach(&mut self, backend: &ObjectRef, opened_at: Nanos, at: Nanos) {
        if let Some(b) = self.backends.get_mut(backend) {
            b.live += 1;
            b.live_opened_sum += u128::from(opened_at);
            b.last_connected = b.last_connected.max(at);
        }
    }

    fn detach(&mut self, backend: &ObjectRef, opened_at: Nanos, at: Nanos) {
        if let Some(b) = self.backends.get_mut(backend) {
            b.live = b.live.saturating_sub(1);
            b.live_opened_sum = b.live_opened_sum.saturating_sub(u128::from(opened_at));
            b.last_connected = b.last_connected.max(at);
        }
    }
}

/// Mean of (closed lifetimes in the window + current ages of the live connections).
fn mean_lifetime(
    closed_sum_ns: u64,
    closes: u64,
    live: u64,
    live_opened_sum: u128,
    now: Nanos,
) -> Option<f64> {
    let n = closes + live;
    if n == 0 {
        return None;
    }
    let ages = (u128::from(live) * u128::from(now)).saturating_sub(live_opened_sum);
    Some((u128::from(closed_sum_ns) + ages) as f64 / 1e9 / n as f64)
}

impl Analyzer {
    pub fn new(cfg: AnalysisConfig) -> Result<Self, ConfigError> {
        let bucket_ns = nanos(cfg.bucket);
        if bucket_ns == 0 {
            return Err(ConfigError::ZeroBucket);
        }
        let window_ns = nanos(cfg.window);
        if window_ns < bucket_ns {
            return Err(ConfigError::WindowShorterThanBucket {
                window: cfg.window,
                bucket: cfg.bucket,
            });
        }
        let slots = window_ns.div_ceil(bucket_ns);
        if slots > MAX_SLOTS {
            return Err(ConfigError::TooManyBuckets { slots });
        }
        Ok(Analyzer {
            cfg,
            bucket_ns,
            slots,
            keys: BTreeMap::new(),
            conns: Map::default(),
            services: Map::default(),
            stats: AnalyzerStats::default(),
        })
    }

    pub fn config(&self) -> &AnalysisConfig {
        &self.cfg
    }

    /// Whether a live connection is tracked (callers skip work for the node's other sockets).
    pub fn tracks(&self, id: ConnId) -> bool {
        self.conns.contains_key(&id)
    }

    pub fn stats(&self) -> AnalyzerStats {
        AnalyzerStats {
            keys: self.keys.len(),
            connections: self.conns.len(),
            services: self.services.len(),
            ..self.stats.clone()
        }
    }

    fn bucket_of(&self, t: Nanos) -> u64 {
        t / self.bucket_ns
    }

    /// A connection opened. False when it was refused (a cap was reached).
    pub fn on_open(&mut self, open: ConnOpen) -> bool {
        if self.conns.contains_key(&open.id) {
            self.stats.implicit_closes += 1;
            self.close(open.id, open.at, None);
        }
        if self.conns.len() >= self.cfg.max_connections {
            self.stats.dropped_connection_cap += 1;
            return false;
        }
        let key = Key {
            client: open.client,
            service: open.service,
        };
        let bucket = self.bucket_of(open.at);
        let slots = self.slots as usize;
        let key = match self.keys.get_key_value(&key) {
            Some((k, _)) => k.clone(),
            None => {
                if self.keys.len() >= self.cfg.max_keys {
                    self.stats.dropped_key_cap += 1;
                    return false;
                }
                if self.stats.series + KEY_SERIES > self.cfg.max_series {
                    self.stats.dropped_series_cap += 1;
                    return false;
                }
                self.stats.series += KEY_SERIES;
                let k = Arc::new(key);
                self.keys
                    .insert(k.clone(), KeyState::new(open.at, slots, bucket));
                k
            }
        };
        let Some(ks) = self.keys.get_mut(&key) else {
            return false;
        };
        ks.gone_since = None;
        ks.advance(bucket, self.slots, self.cfg.max_ports, open.at);
        let known = open.backend.is_some();
        let backend = open
            .backend
            .and_then(|b| ks.admit_backend(b, slots, &self.cfg, &mut self.stats));
        let overflow = known && backend.is_none();
        // An open is counted once its backend is known (see `SlotTotals::opened`).
        let open_counted = open.recovered || known;
        if !open.recovered && known {
            ks.slot(backend.as_ref(), overflow).opened += 1;
        }
        ks.live += 1;
        ks.live_opened_sum += u128::from(open.at);
        *ks.live_ports.entry(open.local_port).or_default() += 1;
        if !open.recovered
            && let Some(kb) = ks.buckets.slot_mut(bucket)
        {
            kb.opens += 1;
        }
        if let Some(b) = &backend {
            ks.attach(b, open.at, open.at);
            if !open.recovered
                && let Some(bb) = ks
                    .backends
                    .get_mut(b)
                    .and_then(|s| s.buckets.slot_mut(bucket))
            {
                bb.opens += 1;
            }
        }
        self.conns.insert(
            open.id,
            ConnState {
                key,
                backend,
                overflow,
                recovered: open.recovered,
                open_counted,
                local_port: open.local_port,
                opened_at: open.at,
                last: (!open.recovered).then(Counters::zero),
            },
        );
        true
    }

    /// The backend of a connection became known (or changed). False for an unknown connection.
    pub fn on_backend(&mut self, id: ConnId, backend: ObjectRef, at: Nanos) -> bool {
        let Some(c) = self.conns.get_mut(&id) else {
            self.stats.unmatched += 1;
            return false;
        };
        if c.backend.as_ref() == Some(&backend) {
            return true;
        }
        let Some(ks) = self.keys.get_mut(&c.key) else {
            return false;
        };
        ks.last_event = ks.last_event.max(at);
        if let Some(old) = c.backend.take() {
            ks.detach(&old, c.opened_at, at);
        }
        c.backend = ks.admit_backend(backend, self.slots as usize, &self.cfg, &mut self.stats);
        c.overflow = c.backend.is_none();
        if let Some(b) = &c.backend {
            ks.attach(b, c.opened_at, at);
        }
        if !c.open_counted {
            c.open_counted = true;
            ks.slot(c.backend.as_ref(), c.overflow).opened += 1;
        }
        true
    }

    /// A counter sample of a live connection. False for an unknown connection.
    pub fn on_sample(&mut self, id: ConnId, at: Nanos, counters: &Counters) -> bool {
        let bucket = self.bucket_of(at);
        let Some(c) = self.conns.get_mut(&id) else {
            self.stats.unmatched += 1;
            return false;
        };
        let Some(ks) = self.keys.get_mut(&c.key) else {
            return false;
        };
        ks.advance(bucket, self.slots, self.cfg.max_ports, at);
        let prev = c.last.replace(*counters);
        if let Some(b) = &c.backend
            && let Some(bs) = ks.backends.get_mut(b)
        {
            bs.last_connected = bs.last_connected.max(at);
        }
        if !c.open_counted && at.saturating_sub(c.opened_at) >= OPEN_SETTLE_NS {
            c.open_counted = true;
            ks.slot(c.backend.as_ref(), c.overflow).opened += 1;
        }
        // A recovered connection's first sample is only a baseline.
        let Some(prev) = prev else {
            return true;
        };
        let requests = counters.requests.saturating_sub(prev.requests);
        {
            let t = ks.slot(c.backend.as_ref(), c.overflow);
            let by_source = match counters.source {
                RequestSource::H2 => &mut t.requests_h2,
                RequestSource::Messages => &mut t.requests_messages,
            };
            *by_source = by_source.saturating_add(requests);
            t.bytes_sent = t
                .bytes_sent
                .saturating_add(counters.bytes_sent.saturating_sub(prev.bytes_sent));
            t.bytes_received = t
                .bytes_received
                .saturating_add(counters.bytes_received.saturating_sub(prev.bytes_received));
        }
        if let Some(kb) = ks.buckets.slot_mut(bucket) {
            let add = |acc: &mut u64, new: u64, old: u64| {
                *acc = acc.saturating_add(new.saturating_sub(old));
            };
            add(&mut kb.bytes_sent, counters.bytes_sent, prev.bytes_sent);
            add(
                &mut kb.bytes_received,
                counters.bytes_received,
                prev.bytes_received,
            );
            add(
                &mut kb.messages_sent,
                counters.messages_sent,
                prev.messages_sent,
            );
            add(
                &mut kb.messages_received,
                counters.messages_received,
                prev.messages_received,
            );
            let by_source = match counters.source {
                RequestSource::H2 => &mut kb.requests_h2,
                RequestSource::Messages => &mut kb.requests_messages,
            };
            *by_source = by_source.saturating_add(requests);
        }
        if let Some(b) = &c.backend
            && let Some(bb) = ks
                .backends
                .get_mut(b)
                .and_then(|s| s.buckets.slot_mut(bucket))
        {
            bb.requests = bb.requests.saturating_add(requests);
        }
        true
    }

    /// A connection closed. `lifetime` from the kernel when its start was traced; otherwise it is
    /// the time since the open (for a recovered connection, since it was first seen). False for an
    /// unknown connection.
    pub fn on_close(&mut self, id: ConnId, at: Nanos, lifetime: Option<Duration>) -> bool {
        if self.close(id, at, lifetime) {
            true
        } else {
            self.stats.unmatched += 1;
            false
        }
    }

    fn close(&mut self, id: ConnId, at: Nanos, lifetime: Option<Duration>) -> bool {
        let Some(c) = self.conns.remove(&id) else {
            return false;
        };
        let bucket = self.bucket_of(at);
        let Some(ks) = self.keys.get_mut(&c.key) else {
            return true;
        };
        ks.advance(bucket, self.slots, self.cfg.max_ports, at);
        let life = lifetime.map_or_else(|| at.saturating_sub(c.opened_at), nanos);
        ks.live = ks.live.saturating_sub(1);
        ks.live_opened_sum = ks.live_opened_sum.saturating_sub(u128::from(c.opened_at));
        if let Some(n) = ks.live_ports.get_mut(&c.local_port) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                ks.live_ports.remove(&c.local_port);
            }
        }
        if let Some(kb) = ks.buckets.slot_mut(bucket) {
            kb.closes += 1;
            kb.lifetime_sum_ns = kb.lifetime_sum_ns.saturating_add(life);
            kb.lifetimes[lifetime_bucket(life)] += 1;
        }
        {
            let t = ks.slot(c.backend.as_ref(), c.overflow);
            if !c.open_counted {
                t.opened += 1;
            }
            t.closed += 1;
        }
        // A recovered connection's age is only a lower bound: kept out of the cumulative
        // histogram unless the kernel traced its start.
        if lifetime.is_some() || !c.recovered {
            ks.lifetimes_total[lifetime_bucket(life)] += 1;
            ks.lifetime_total_sum_ns = ks.lifetime_total_sum_ns.saturating_add(life);
        }
        if let Some(b) = &c.backend {
            ks.detach(b, c.opened_at, at);
            if let Some(bb) = ks
                .backends
                .get_mut(b)
                .and_then(|s| s.buckets.slot_mut(bucket))
            {
                bb.closes += 1;
                bb.lifetime_sum_ns = bb.lifetime_sum_ns.saturating_add(life);
            }
        }
        true
    }

    /// Replaces a service's ready backends. A backend that stays ready keeps its ready-since time;
    /// a new one is ready since `now`. Also marks the service present again.
    pub fn set_ready_backends(
        &mut self,
        service: &ObjectRef,
        ready: impl IntoIterator<Item = ObjectRef>,
        now: Nanos,
    ) {
        let st = self.services.entry(service.clone()).or_default();
        let old = std::mem::take(&mut st.ready);
        st.ready = ready
            .into_iter()
            .map(|b| {
                let since = old.get(&b).copied().unwrap_or(now);
                (b, since)
            })
            .collect();
        st.gone_since = None;
    }

    /// Replaces what the advice knows about a service (headless, its headless twin).
    pub fn set_service_facts(&mut self, service: &ObjectRef, facts: ServiceFacts) {
        self.services.entry(service.clone()).or_default().facts = facts;
    }

    /// The service is gone from the inventory: its keys are dropped after the grace period.
    pub fn service_gone(&mut self, service: &ObjectRef, now: Nanos) {
        let st = self.services.entry(service.clone()).or_default();
        st.gone_since.get_or_insert(now);
    }

    /// The client pod is gone: its keys are dropped after the grace period (a new open undoes it).
    pub fn client_gone(&mut self, client: &ObjectRef, now: Nanos) {
        for (k, ks) in self.keys.iter_mut() {
            if &k.client == client {
                ks.gone_since.get_or_insert(now);
            }
        }
    }

    /// Drops keys whose client or service has been gone for the grace period, keys with no live
    /// connection and no event for the grace period, idle non-ready backends, and gone services.
    /// Returns how many keys were dropped.
    pub fn gc(&mut self, now: Nanos) -> usize {
        let grace = nanos(self.cfg.grace);
        let keep_backend = grace.max(nanos(self.cfg.window));
        let services = &self.services;
        let expired = |since: Option<Nanos>| since.is_some_and(|s| now.saturating_sub(s) >= grace);
        let mut dropped: HashSet<Arc<Key>> = HashSet::new();
        for (k, ks) in self.keys.iter_mut() {
            let svc = services.get(&k.service);
            let gone = expired(ks.gone_since) || expired(svc.and_then(|s| s.gone_since));
            let idle = ks.live == 0 && now.saturating_sub(ks.last_event) >= grace;
            if gone || idle {
                dropped.insert(k.clone());
                continue;
            }
            ks.backends.retain(|b, bs| {
                bs.live > 0
                    || svc.is_some_and(|s| s.ready.contains_key(b))
                    || now.saturating_sub(bs.last_connected) < keep_backend
            });
        }
        if !dropped.is_empty() {
            self.keys.retain(|k, _| !dropped.contains(k));
            let before = self.conns.len();
            self.conns.retain(|_, c| !dropped.contains(&c.key));
            self.stats.connections_collected += (before - self.conns.len()) as u64;
            self.stats.keys_collected += dropped.len() as u64;
        }
        self.services.retain(|_, s| !expired(s.gone_since));
        self.stats.series = self
            .keys
            .values()
            .map(|ks| KEY_SERIES + ks.backends.len() * BACKEND_SERIES)
            .sum();
        dropped.len()
    }

    /// The balance of every key, in (client, service) order.
    pub fn evaluate(&self, now: Nanos) -> Vec<Balance> {
        self.keys
            .iter()
            .map(|(k, ks)| self.figures(k, ks, now))
            .collect()
    }

    /// The balance of every key `keep` selects, in (client, service) order: only those are
    /// evaluated.
    pub fn evaluate_where(
        &self,
        now: Nanos,
        keep: impl Fn(&ObjectRef, &ObjectRef) -> bool,
    ) -> Vec<Balance> {
        self.keys
            .iter()
            .filter(|(k, _)| keep(&k.client, &k.service))
            .map(|(k, ks)| self.figures(k, ks, now))
            .collect()
    }

    /// The balance of one key, if it is tracked.
    pub fn balance(&self, client: &ObjectRef, service: &ObjectRef, now: Nanos) -> Option<Balance> {
        let key = Key {
            client: client.clone(),
            service: service.clone(),
        };
        self.keys.get(&key).map(|ks| self.figures(&key, ks, now))
    }

    /// Cumulative figures of every key, in (client, service) order, for the metrics.
    pub fn totals(&self) -> Vec<KeyTotals> {
        // Live connections per key with no known backend, and over a cap.
        let mut unbacked: HashMap<*const Key, (u64, u64)> = HashMap::new();
        for c in self.conns.values().filter(|c| c.backend.is_none()) {
            let e = unbacked.entry(Arc::as_ptr(&c.key)).or_default();
            if c.overflow {
                e.1 += 1;
            } else {
                e.0 += 1;
            }
        }
        self.keys
            .iter()
            .map(|(k, ks)| {
                let (unknown_live, overflow_live) =
                    unbacked.get(&Arc::as_ptr(k)).copied().unwrap_or_default();
                let mut backends: Vec<BackendTotals> = ks
                    .backends
                    .iter()
                    .map(|(b, bs)| BackendTotals {
                        name: backend_name(b, &k.service),
                        totals: bs.totals,
                        active: bs.live,
                    })
                    .collect();
                for (name, totals, active) in [
                    (BACKEND_UNKNOWN, ks.unknown, unknown_live),
                    (BACKEND_OVERFLOW, ks.overflow, overflow_live),
                ] {
                    if !totals.is_zero() || active > 0 {
                        backends.push(BackendTotals {
                            name: name.to_string(),
                            totals,
                            active,
                        });
                    }
                }
                let sum_ns = ks.lifetime_total_sum_ns;
                KeyTotals {
                    client: k.client.clone(),
                    service: k.service.clone(),
                    backends,
                    lifetimes: LifetimeHistogram::from_counts(ks.lifetimes_total, sum_ns),
                }
            })
            .collect()
    }

    fn figures(&self, key: &Key, ks: &KeyState, now: Nanos) -> Balance {
        let cur = self.bucket_of(now);
        let start = cur.saturating_sub(self.slots - 1);
        let start_t = start.saturating_mul(self.bucket_ns);
        let span = now.saturating_sub(start_t.max(ks.first_seen));
        let observed = now.saturating_sub(ks.first_seen);

        let mut kb = KeyBucket::default();
        for b in ks.buckets.range(start, cur) {
            kb.opens += b.opens;
            kb.closes += b.closes;
            kb.lifetime_sum_ns = kb.lifetime_sum_ns.saturating_add(b.lifetime_sum_ns);
            for (acc, n) in kb.lifetimes.iter_mut().zip(b.lifetimes.iter()) {
                *acc += n;
            }
            kb.requests_h2 = kb.requests_h2.saturating_add(b.requests_h2);
            kb.requests_messages = kb.requests_messages.saturating_add(b.requests_messages);
            kb.bytes_sent = kb.bytes_sent.saturating_add(b.bytes_sent);
            kb.bytes_received = kb.bytes_received.saturating_add(b.bytes_received);
            kb.messages_sent = kb.messages_sent.saturating_add(b.messages_sent);
            kb.messages_received = kb.messages_received.saturating_add(b.messages_received);
        }
        let requests = kb.requests_h2.saturating_add(kb.requests_messages);

        let empty = BTreeMap::new();
        let ready_set = self.services.get(&key.service).map_or(&empty, |s| &s.ready);
        let names: BTreeSet<&ObjectRef> = ready_set.keys().chain(ks.backends.keys()).collect();
        let mut backends = Vec::new();
        for b in names {
            let ready_since = ready_set.get(b).copied();
            let (mut bb, live, live_sum, last_connected) = match ks.backends.get(b) {
                Some(st) => {
                    let mut acc = BackendBucket::default();
                    for x in st.buckets.range(start, cur) {
                        acc.requests = acc.requests.saturating_add(x.requests);
                        acc.opens += x.opens;
                        acc.closes += x.closes;
                        acc.lifetime_sum_ns = acc.lifetime_sum_ns.saturating_add(x.lifetime_sum_ns);
                    }
                    (acc, st.live, st.live_opened_sum, Some(st.last_connected))
                }
                None => (BackendBucket::default(), 0, 0, None),
            };
            let connected = live > 0 || last_connected.is_some_and(|t| t >= start_t);
            if ready_since.is_none() && !connected && bb.requests == 0 {
                continue;
            }
            let unconnected = match ready_since {
                Some(since) if !connected => {
                    let from = since.max(ks.first_seen).max(last_connected.unwrap_or(0));
                    Some(secs_f64(now.saturating_sub(from)))
                }
                _ => None,
            };
            let name = backend_name(b, &key.service);
            backends.push(BackendBalance {
                backend: b.clone(),
                name,
                ready: ready_since.is_some(),
                connected,
                live_connections: live,
                connections: live + bb.closes,
                opens: bb.opens,
                closes: bb.closes,
                requests: std::mem::take(&mut bb.requests),
                share: None,
                mean_lifetime_seconds: mean_lifetime(
                    bb.lifetime_sum_ns,
                    bb.closes,
                    live,
                    live_sum,
                    now,
                ),
                unconnected_seconds: unconnected,
            });
        }
        let attributed = backends
            .iter()
            .fold(0u64, |acc, b| acc.saturating_add(b.requests));
        for b in &mut backends {
            b.share = ratio(b.requests, attributed);
        }
        let ready = ready_set.len();
        let connected = backends.iter().filter(|b| b.connected).count();
        let connected_ready = backends.iter().filter(|b| b.connected && b.ready).count();
        let fair_n = if ready > 0 { ready } else { connected };
        let max_req = backends.iter().map(|b| b.requests).max().unwrap_or(0);
        let skew = (attributed > 0 && fair_n > 0)
            .then(|| max_req as f64 * fair_n as f64 / attributed as f64);

        let port_start = if start > ks.advanced_to {
            ports_of(&ks.live_ports, self.cfg.max_ports)
        } else {
            ks.port_snapshots.get(start).cloned().unwrap_or_default()
        };
        let port_end = ports_of(&ks.live_ports, self.cfg.max_ports);
        let kept = port_start
            .iter()
            .filter(|p| port_end.binary_search(p).is_ok())
            .count() as u64;

        let source = if kb.requests_messages > 0 {
            Some(RequestSource::Messages)
        } else if kb.requests_h2 > 0 {
            Some(RequestSource::H2)
        } else {
            None
        };
        let span_s = secs_f64(span);
        let per_sec = |n: u64| if span > 0 { n as f64 / span_s } else { 0.0 };

        let mut balance = Balance {
            client: key.client.clone(),
            service: key.service.clone(),
            window_seconds: self.cfg.window.as_secs_f64(),
            span_seconds: span_s,
            observed_seconds: secs_f64(observed),
            ready,
            connected,
            connected_ready,
            coverage: (ready > 0).then(|| connected_ready as f64 / ready as f64),
            requests,
            requests_unattributed: requests.saturating_sub(attributed),
            requests_per_backend: backends
                .iter()
                .map(|b| (b.name.clone(), b.requests))
                .collect(),
            skew,
            live_connections: ks.live,
            connections: ks.live + kb.closes,
            opens: kb.opens,
            closes: kb.closes,
            opens_per_sec: per_sec(kb.opens),
            closes_per_sec: per_sec(kb.closes),
            opens_per_request: ratio(kb.opens, requests),
            mean_lifetime_seconds: mean_lifetime(
                kb.lifetime_sum_ns,
                kb.closes,
                ks.live,
                ks.live_opened_sum,
                now,
            ),
            lifetimes: LifetimeHistogram::from_counts(kb.lifetimes, kb.lifetime_sum_ns),
            ports_stable: !port_start.is_empty() && port_start == port_end,
            ports_reused: ratio(kept, port_start.len() as u64),
            ports_truncated: ks.live_ports.len() > self.cfg.max_ports,
            local_ports_start: port_start,
            local_ports_end: port_end,
            source,
            bytes_sent: kb.bytes_sent,
            bytes_received: kb.bytes_received,
            messages_sent: kb.messages_sent,
            messages_received: kb.messages_received,
            backends,
            verdict: Verdict::InsufficientData,
            reason: String::new(),
            advice: None,
        };
        let (verdict, reason) = classify(&balance, &self.cfg.thresholds, self.cfg.window);
        let facts = self
            .services
            .get(&key.service)
            .map(|s| s.facts.clone())
            .unwrap_or_default();
        balance.advice = advise(verdict, &balance, &facts);
        balance.verdict = verdict;
        balance.reason = match &balance.advice {
            Some(fix) => format!("{reason}. Fix: {fix}"),
            None => reason,
        };
        balance
    }
}
