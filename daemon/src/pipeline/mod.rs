//! The pipeline: the one owner of the connection table, the balance analyzer, the conntrack
//! queue's bookkeeping and the verdict history.
//!
//! Invariants:
//! - Only the pipeline task touches that state. Everything else talks to it by message: the ring
//!   reader sends record batches, the conntrack thread resolved backends, the sampler counter
//!   samples, the recovery task what it found and what reconciliation fixed, and the HTTP handlers
//!   queries that are answered over a oneshot. There is no lock to take in any order.
//! - Every channel is bounded. The record channel holds a few batches: when the pipeline falls
//!   behind, the reader waits, the ring fills, and the kernel counts what it cannot write
//!   (`ring_full`): nothing is dropped silently and no buffer grows without bound.
//! - What the metrics need is published once per tick ([`BalanceSnapshot`]): a scrape never
//!   waits for the pipeline, and the analyzer is evaluated once a second however many scrapes come.
//! - The analyzer sees every connection it tracks open once and close once; a close whose open is
//!   still waiting for its backend follows the open.

pub mod query;
pub mod recovery;
pub mod resolve;
pub mod sampler;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    analysis::{
        self, Analyzer, ConnId, Nanos, feed,
        ports::{self, PortGotchas},
        regress::{Judged, Regression, Regressions, VerdictHistory, WorkloadKey},
    },
    conntable::{Change, Conn, ConnKey, ConnTable, Direction, Requests, reconcile::Plan},
    event::{Counters, Event, EventTap, Owner, reader::Batch},
    exposition::{api, balance::BalanceSnapshot, metrics::Metrics},
    identity::{
        Identity,
        model::{Inventory, ObjectRef},
    },
};

use self::resolve::{Lookup, Resolver};

/// Record batches in flight between the reader and the pipeline.
pub const RECORD_BATCHES: usize = 8;
/// Other inputs in flight (resolutions, samples, queries).
pub const INPUTS: usize = 1024;
/// How often the housekeeping turn runs: gc, ready backends, the metrics snapshot.
pub const TICK: Duration = Duration::from_secs(1);
/// How often every client's verdict is evaluated for the regression history.
pub const VERDICT_EVERY: Duration = Duration::from_secs(5);
/// Client workloads whose last verdict per service is remembered, and for how long one that is
/// no longer judged is (a day covers a slow rollout).
const VERDICT_HISTORY_CAP: usize = 10_000;
const VERDICT_HISTORY_FORGET: Duration = Duration::from_secs(24 * 3600);
/// How long a new outbound connection has to send its first bytes (the HTTP/2 preface or a TLS
/// ClientHello, where the scanner makes its entry) before "no scanner entry" counts as "not
/// HTTP/2".
const H2_FIRST_BYTES_GRACE: Duration = Duration::from_secs(2);
/// A server end without owner is sampled every round while younger than this, then once per
/// this long (its owner is the task of its first read or write, kept with the socket's state).
const OWNER_WATCH: Duration = Duration::from_secs(10);
const OWNER_WATCH_ROUNDS: u64 = OWNER_WATCH.as_secs() / TICK.as_secs();
/// Regressions kept for `GET /regressions`.
const REGRESSIONS_KEPT: usize = 100;
/// Regressions waiting to become Kubernetes Events; over it they are counted and dropped.
pub const REGRESSION_EVENTS_QUEUE: usize = 64;

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// A counter sample of one live connection, read from the kernel's maps.
#[derive(Clone, Debug)]
pub struct Sample {
    pub key: ConnKey,
    pub sock: u64,
    pub counters: Counters,
    pub requests: Option<Requests>,
    /// The owner the kernel named (a server end's: the task of its first read or write).
    pub owner: Option<Owner>,
}

/// A connection the sampler reads: its key, socket and direction.
#[derive(Clone, Copy, Debug)]
pub struct Tracked {
    pub key: ConnKey,
    pub sock: u64,
    pub direction: Direction,
}

/// Questions to the pipeline, answered over the oneshot.
pub enum Query {
    /// One page of the table (`GET /connections`).
    Connections {
        filter: query::ConnFilter,
        reply: oneshot::Sender<api::ConnectionsPage>,
    },
    /// A service's balance per client pod; None when the service is unknown and has no client.
    ServiceBalance {
        service: ObjectRef,
        reply: oneshot::Sender<Option<api::ServiceBalanceView>>,
    },
    /// A pod's peers; None when the pod is unknown.
    PodPeers {
        pod: ObjectRef,
        limit: usize,
        reply: oneshot::Sender<Option<api::PodPeersView>>,
    },
    /// The connections whose counters the sampler reads: the outbound ones.
    Tracked {
        reply: oneshot::Sender<Vec<Tracked>>,
    },
    /// The keys of every row, for a reconciliation round.
    Keys {
        reply: oneshot::Sender<std::collections::HashSet<ConnKey>>,
    },
    /// Every row (tests and embedders).
    Rows { reply: oneshot::Sender<Vec<Conn>> },
    /// The recent verdict regressions (`GET /regressions`).
    Regressions {
        reply: oneshot::Sender<api::RegressionsView>,
    },
}

/// What reaches the pipeline besides records.
pub enum Input {
    /// The conntrack thread's answer to a lookup.
    Resolved(resolve::Resolved),
    /// Counters of live connections.
    Samples(Vec<Sample>),
    /// What the startup scan found (the first reconciliation round); answered once applied.
    Recovered {
        found: Vec<Conn>,
        reply: oneshot::Sender<usize>,
    },
    /// What a later reconciliation round decided.
    Reconciled(Plan),
    Query(Query),
}

/// How the rest of the daemon talks to the pipeline.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Input>,
}

impl Handle {
    /// Sends an input; false when the pipeline is gone (shutting down).
    pub async fn send(&self, input: Input) -> bool {
        self.tx.send(input).await.is_ok()
    }

    /// Sends from a thread outside the runtime (the conntrack thread).
    pub fn blocking_send(&self, input: Input) -> bool {
        self.tx.blocking_send(input).is_ok()
    }

    /// Asks a question; None when the pipeline is gone.
    pub async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Input::Query(make(reply))).await.ok()?;
        answer.await.ok()
    }

    /// Every row of the table.
    pub async fn rows(&self) -> Vec<Conn> {
        self.ask(|reply| Query::Rows { reply })
            .await
            .unwrap_or_default()
    }
}

/// The pipeline's state. See the module doc.
pub struct Pipeline {
    table: ConnTable,
    analyzer: Analyzer,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    resolver: Resolver,
    verdicts: VerdictHistory,
    events: EventTap,
    snapshot: watch::Sender<Arc<BalanceSnapshot>>,
    /// When the pipeline last turned (monotonic ns): liveness.
    heartbeat: Arc<std::sync::atomic::AtomicU64>,
    last_verdicts: Nanos,
    /// Sampler rounds asked for (see [`OWNER_WATCH`]).
    tracked_rounds: u64,
    /// Refused connects on a service port the pods do not serve.
    ports: PortGotchas,
    /// Recent verdict regressions, with what the client ran before and after.
    regressions: Regressions,
    /// Where regressions go to become Kubernetes Events (Kubernetes mode).
    regression_events: Option<mpsc::Sender<Regression>>,
    /// The inventory the analyzer's service facts were computed from.
    facts_of: Option<std::sync::Weak<Inventory>>,
}

/// The channels the pipeline is built with.
pub struct Channels {
    pub records: mpsc::Receiver<Batch>,
    pub inputs: mpsc::Receiver<Input>,
}

/// Everything [`Pipeline::new`] needs that others share.
pub struct Parts {
    pub analyzer: Analyzer,
    pub identity: Arc<Identity>,
    pub metrics: Arc<Metrics>,
    pub events: EventTap,
    pub snapshot: watch::Sender<Arc<BalanceSnapshot>>,
    pub heartbeat: Arc<std::sync::atomic::AtomicU64>,
    /// The conntrack thread's queue, when conntrack works.
    pub lookups: Option<std::sync::mpsc::Sender<Lookup>>,
    /// The Kubernetes Event writer's queue (Kubernetes mode).
    pub regression_events: Option<mpsc::Sender<Regression>>,
}

/// Makes the channels: the pipeline's ends and the senders.
pub fn channels() -> (Channels, mpsc::Sender<Batch>, Handle) {
    let (records_tx, records) = mpsc::channel(RECORD_BATCHES);
    let (tx, inputs) = mpsc::channel(INPUTS);
    (Channels { records, inputs }, records_tx, Handle { tx })
}

impl Pipeline {
    pub fn new(parts: Parts) -> Self {
        Pipeline {
            table: ConnTable::new(),
            analyzer: parts.analyzer,
            identity: parts.identity,
            metrics: parts.metrics,
            resolver: Resolver::new(parts.lookups),
            verdicts: VerdictHistory::new(VERDICT_HISTORY_CAP, VERDICT_HISTORY_FORGET),
            events: parts.events,
            snapshot: parts.snapshot,
            heartbeat: parts.heartbeat,
            last_verdicts: 0,
            tracked_rounds: 0,
            ports: PortGotchas::new(ports::DEFAULT_CAP),
            regressions: Regressions::new(REGRESSIONS_KEPT),
            regression_events: parts.regression_events,
            facts_of: None,
        }
    }

    /// Runs until `stop` turns true and the reader has handed on its last records (it closes
    /// the record channel), or every input sender is gone.
    pub async fn run(mut self, mut ch: Channels, mut stop: watch::Receiver<bool>) {
        self.table.begin_recovery();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut records_open = true;
        let mut stopping = false;
        loop {
            if stopping && !records_open {
                break;
            }
            tokio::select! {
                biased;
                batch = ch.records.recv(), if records_open => match batch {
                    Some(b) => self.apply(b),
                    None => records_open = false,
                },
                input = ch.inputs.recv(), if !stopping => match input {
                    Some(i) => self.input(i),
                    None => break,
                },
                r = stop.changed(), if !stopping => {
                    stopping = r.is_err() || *stop.borrow();
                }
                _ = tick.tick(), if !stopping => self.tick(monotonic_ns()),
            }
        }
    }

    fn input(&mut self, input: Input) {
        match input {
            Input::Resolved(r) => self.resolved(r),
            Input::Samples(s) => self.samples(s),
            Input::Recovered { found, reply } => {
                let n = self.recovered(found);
                let _ = reply.send(n);
            }
            Input::Reconciled(plan) => self.reconciled(plan),
            Input::Query(q) => self.answer(q),
        }
    }

    /// Applies one batch of records to the table, the analyzer and the metrics.
    pub fn apply(&mut self, mut batch: Batch) {
        for e in &batch.errors {
            tracing::warn!(error = %e, "undecodable record");
            self.metrics.lost_user(e.reason());
        }
        let inv = self.identity.snapshot();
        for ev in &batch.events {
            let change = self.table.apply(ev);
            match &change {
                Change::Opened(conn) => {
                    self.identity.learn(&inv, conn);
                    let queued =
                        Identity::needs_backend(&inv, conn) && self.ask_backend(conn, ev.ts_ns);
                    if !queued
                        && let Some(open) =
                            feed::open_of(&self.identity, &inv, conn, ev.ts_ns, false)
                    {
                        self.analyzer.on_open(open);
                    }
                }
                Change::Closed { conn, duration } => self.close(conn, ev.ts_ns, *duration),
                Change::Failed { remote, .. } => self.failed_connect(&inv, ev, *remote),
                _ => {}
            }
            self.metrics.observe(ev.kind, &change);
        }
        self.metrics.active.set(self.table.len() as i64);
        self.events.send_all(&mut batch.events);
        batch.recycle();
    }

    /// A refused connect of a local pod: counted when it is the port gotcha (a service's pod
    /// dialled on the service port instead of the target port).
    fn failed_connect(&mut self, inv: &Inventory, ev: &Event, remote: SocketAddr) {
        let Some(client) = inv.pod_by_ip(ev.local.ip()) else {
            return;
        };
        let Some(m) = ports::mismatch(inv, remote) else {
            return;
        };
        let headless = inv
            .service(&m.service.namespace, &m.service.name)
            .is_some_and(|s| s.headless());
        let client = client.id();
        let labels = port_labels(&client, &m.service, m.dialled);
        let first = self
            .metrics
            .port_mismatch
            .get(&labels)
            .is_none_or(|c| c.get() == 0);
        if first {
            tracing::warn!(
                client = %client,
                service = %m.service,
                "refused connects: {}",
                ports::port_advice(&m, headless)
            );
        }
        if let Some((c, s, p)) = self.ports.record(client, &m, headless, ev.ts_ns) {
            self.metrics.port_mismatch.remove(&port_labels(&c, &s, p));
        }
        self.metrics.port_mismatch.get_or_create(&labels).inc();
    }

    /// Queues a conntrack lookup for a ClusterIP connection's open; false (counted) when it
    /// cannot be, and the open goes to the analyzer without a backend.
    fn ask_backend(&mut self, conn: &Conn, at: Nanos) -> bool {
        match self.resolver.open(conn, at) {
            Ok(()) => true,
            Err(why) => {
                self.metrics.conntrack_lookup(why);
                false
            }
        }
    }

    /// Feeds a close to the analyzer, or holds it until its queued open is resolved.
    fn close(&mut self, conn: &Conn, at: Nanos, lifetime: Option<Duration>) {
        let Some(id) = feed::conn_id(conn) else {
            return;
        };
        // The final figures, as the close record carried them.
        let req = conn
            .requests
            .unwrap_or_else(|| crate::conntable::requests_of(None, &conn.counters));
        let counters = feed::counters_of(&conn.counters, &req);
        if self
            .resolver
            .hold_close(id, conn.key, at, lifetime, counters)
        {
            return;
        }
        if self.analyzer.tracks(id) {
            self.analyzer.on_sample(id, at, &counters);
            self.analyzer.on_close(id, at, lifetime);
        }
    }

    fn resolved(&mut self, r: resolve::Resolved) {
        self.metrics.conntrack_lookup(r.result);
        let inv = self.identity.snapshot();
        match r.what {
            resolve::Resolution::Open { mut conn, at } => {
                conn.backend = r.backend;
                // The same connection still open (not a later one on the same ports).
                if let Some(backend) = conn.backend
                    && self
                        .table
                        .get(&conn.key)
                        .is_some_and(|c| c.sock == conn.sock)
                {
                    self.table.set_backend(&conn.key, backend);
                }
                if let Some(open) = feed::open_of(&self.identity, &inv, &conn, at, false) {
                    self.analyzer.on_open(open);
                }
                if let Some(held) = self.resolver.opened(feed::conn_id(&conn), conn.key)
                    && self.analyzer.tracks(held.id)
                {
                    self.analyzer.on_sample(held.id, held.at, &held.counters);
                    self.analyzer.on_close(held.id, held.at, held.lifetime);
                }
            }
            resolve::Resolution::Existing(key) => {
                self.resolver.done();
                if let Some(backend) = r.backend
                    && self.table.set_backend(&key, backend)
                    && let Some(conn) = self.table.get(&key)
                    && let (Some(id), Some(pod)) = (
                        feed::conn_id(conn),
                        feed::backend_of(&self.identity, &inv, conn),
                    )
                {
                    self.analyzer.on_backend(id, pod, monotonic_ns());
                }
            }
        }
    }

    fn samples(&mut self, samples: Vec<Sample>) {
        let now = monotonic_ns();
        for s in samples {
            let Some(direction) = self
                .table
                .get(&s.key)
                .filter(|c| c.sock == s.sock)
                .map(|c| c.direction)
            else {
                continue;
            };
            if let Some(owner) = s.owner {
                self.table.learn_owner(&s.key, owner);
            }
            // An inbound row is read for its owner only; its figures come with its close.
            if direction == Direction::Inbound {
                continue;
            }
            self.table.set_stats(&s.key, s.counters, s.requests);
            let Some(conn) = self.table.get(&s.key) else {
                continue;
            };
            // The scanner makes its entry at a connection's first bytes: until a young
            // connection had the time to send them, "no entry" is not "not HTTP/2". Feeding its
            // message count as requests would count them, and the HTTP/2 figure that follows
            // would then look like no new request. Deferring loses nothing: the next sample or
            // the close carries the cumulative figures.
            let young = conn
                .opened_ns
                .is_some_and(|t| now.saturating_sub(t) < H2_FIRST_BYTES_GRACE.as_nanos() as u64);
            let req = s.requests.filter(|r| {
                !(young
                    && r.source == crate::conntable::RequestSource::Messages
                    && r.unparsable.is_none())
            });
            if let Some(req) = req
                && let Some(id) = feed::conn_id(conn)
            {
                self.analyzer
                    .on_sample(id, now, &feed::counters_of(&s.counters, &req));
            }
        }
    }

    /// The startup scan's connections: added unless a record brought them in or closed them
    /// meanwhile; their opens reach the analyzer and ClusterIP ones are resolved.
    fn recovered(&mut self, found: Vec<Conn>) -> usize {
        let added = self.table.finish_recovery(found);
        let inv = self.identity.snapshot();
        let now = monotonic_ns();
        let recovered: Vec<Conn> = self
            .table
            .iter()
            .filter(|c| c.origin == crate::conntable::Origin::Recovered)
            .cloned()
            .collect();
        for c in &recovered {
            self.identity.learn(&inv, c);
            if let Some(o) = feed::open_of(&self.identity, &inv, c, now, true) {
                self.analyzer.on_open(o);
            }
            if Identity::needs_backend(&inv, c)
                && let Err(why) = self.resolver.existing(c.key)
            {
                self.metrics.conntrack_lookup(why);
            }
        }
        self.metrics.recovered.inc_by(added as u64);
        self.metrics.active.set(self.table.len() as i64);
        added
    }

    /// A later reconciliation round's plan: ghosts go (as closes), holes come (as recovered
    /// opens).
    fn reconciled(&mut self, plan: Plan) {
        let now = monotonic_ns();
        let inv = self.identity.snapshot();
        let (mut removed, mut added) = (0u64, 0u64);
        for key in &plan.remove {
            if let Some(conn) = self.table.remove_gone(key) {
                tracing::debug!(?key, "reconcile: the kernel has no such socket; removed");
                self.close(&conn, now, None);
                removed += 1;
            }
        }
        for conn in plan.add {
            if self.table.add_found(conn.clone()) {
                tracing::debug!(key = ?conn.key, "reconcile: a socket the table missed; added");
                self.identity.learn(&inv, &conn);
                if let Some(open) = feed::open_of(&self.identity, &inv, &conn, now, true) {
                    self.analyzer.on_open(open);
                }
                if Identity::needs_backend(&inv, &conn)
                    && let Err(why) = self.resolver.existing(conn.key)
                {
                    self.metrics.conntrack_lookup(why);
                }
                added += 1;
            }
        }
        self.metrics.active.set(self.table.len() as i64);
        for (action, n) in [("removed", removed), ("added", added)] {
            if n > 0 {
                self.metrics
                    .reconciled
                    .get_or_create(&crate::exposition::metrics::ActionLabels { action })
                    .inc_by(n);
            }
        }
        if removed + added > 0 {
            tracing::info!(
                removed,
                added,
                "reconciled the connection table with the kernel's sockets (lost records)"
            );
        }
    }

    /// Housekeeping: ready backends, gc, stale pending connects, verdict history, the metrics
    /// snapshot and the heartbeat.
    fn tick(&mut self, now: Nanos) {
        let inv = self.identity.snapshot();
        for (service, ready) in feed::ready_backends(&inv) {
            self.analyzer.set_ready_backends(&service, ready, now);
        }
        // Headless twins change only with the inventory (pairwise over services: not every tick).
        if !self
            .facts_of
            .as_ref()
            .is_some_and(|w| std::sync::Weak::ptr_eq(w, &Arc::downgrade(&inv)))
        {
            for (service, facts) in feed::service_facts(&inv) {
                self.analyzer.set_service_facts(&service, facts);
            }
            self.facts_of = Some(Arc::downgrade(&inv));
        }
        self.analyzer.gc(now);
        for (c, svc, p) in self.ports.gc(now) {
            self.metrics.port_mismatch.remove(&port_labels(&c, &svc, p));
        }
        let dropped = self.table.sweep(now);
        if dropped > 0 {
            tracing::debug!(dropped, "dropped stale pending connects");
        }
        let snapshot = BalanceSnapshot::of(&self.analyzer, now);
        if now.saturating_sub(self.last_verdicts) >= VERDICT_EVERY.as_nanos() as u64 {
            self.last_verdicts = now;
            self.track_verdicts(&snapshot.balances, now);
        }
        self.snapshot.send_replace(Arc::new(snapshot));
        self.metrics.active.set(self.table.len() as i64);
        self.heartbeat
            .store(now, std::sync::atomic::Ordering::Release);
    }

    /// Feeds every client's verdict to the per-workload history and counts the changes.
    fn track_verdicts(&mut self, balances: &[analysis::Balance], now: Nanos) {
        let inv = self.identity.snapshot();
        let judged: Vec<Judged> = balances
            .iter()
            .map(|b| {
                let pod = inv.pod(&b.client.namespace, &b.client.name);
                let workload = pod
                    .map(|p| format!("{}/{}", p.workload.kind, p.workload.name))
                    .unwrap_or_else(|| format!("Pod/{}", b.client.name));
                Judged {
                    key: WorkloadKey {
                        namespace: b.client.namespace.clone(),
                        workload,
                        service: b.service.clone(),
                    },
                    verdict: b.verdict,
                    pod: b.client.clone(),
                    version: pod.and_then(|p| p.version.clone()),
                }
            })
            .collect();
        let observed = self
            .verdicts
            .observe(judged.iter().map(|j| (j.key.clone(), j.verdict)), now);
        self.metrics.verdict_changes_observed(&observed);
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for r in self.regressions.observe(&judged, &observed, at) {
            tracing::warn!("balance verdict regressed: {}", r.describe());
            if let Some(tx) = &self.regression_events
                && tx.try_send(r).is_err()
            {
                self.metrics.regression_events_dropped.inc();
            }
        }
    }

    fn answer(&mut self, q: Query) {
        let now = monotonic_ns();
        match q {
            Query::Connections { filter, reply } => {
                let _ = reply.send(query::connections(
                    &self.table,
                    &self.identity,
                    &filter,
                    now,
                ));
            }
            Query::ServiceBalance { service, reply } => {
                let _ = reply.send(query::service_balance(
                    &self.analyzer,
                    &self.identity,
                    service,
                    now,
                ));
            }
            Query::PodPeers { pod, limit, reply } => {
                let _ = reply.send(
                    query::pod_peers(&self.table, &self.analyzer, &self.identity, pod, limit, now)
                        .map(|mut view| {
                            view.port_mismatches = self.ports.of_client(&view.pod, now);
                            view
                        }),
                );
            }
            Query::Tracked { reply } => {
                // Outbound connections with a kernel socket: the clients' side, whose request
                // figures the API and the analysis show live. Inbound ones get their figures from
                // the close record, and are read only until their owner is known: the kernel
                // names it at the socket's first read or write and keeps it with the socket's
                // state. Those still without one after OWNER_WATCH (a client that sends nothing)
                // are read every OWNER_WATCH only, so that idle ones cost little.
                self.tracked_rounds += 1;
                let all_ownerless = self.tracked_rounds.is_multiple_of(OWNER_WATCH_ROUNDS);
                let now = monotonic_ns();
                let watch = OWNER_WATCH.as_nanos() as u64;
                let tracked = self
                    .table
                    .iter()
                    .filter(|c| {
                        c.sock != 0
                            && (c.direction == Direction::Outbound
                                || (c.owner.is_none()
                                    && (all_ownerless
                                        || c.opened_ns
                                            .is_none_or(|t| now.saturating_sub(t) < watch))))
                    })
                    .map(|c| Tracked {
                        key: c.key,
                        sock: c.sock,
                        direction: c.direction,
                    })
                    .collect();
                let _ = reply.send(tracked);
            }
            Query::Keys { reply } => {
                let _ = reply.send(self.table.keys());
            }
            Query::Regressions { reply } => {
                let _ = reply.send(api::RegressionsView {
                    regressions: self.regressions.recent(),
                });
            }
            Query::Rows { reply } => {
                let _ = reply.send(self.table.iter().cloned().collect());
            }
        }
    }
}

/// A close held until its connection's open is resolved.
#[derive(Clone, Debug)]
pub struct HeldClose {
    pub id: ConnId,
    pub at: Nanos,
    pub lifetime: Option<Duration>,
    pub counters: analysis::Counters,
}

/// The metric labels of one port gotcha entry.
fn port_labels(
    client: &ObjectRef,
    service: &ObjectRef,
    port: u16,
) -> crate::exposition::metrics::PortMismatchLabels {
    crate::exposition::metrics::PortMismatchLabels {
        namespace: client.namespace.clone(),
        client: client.name.clone(),
        service_namespace: service.namespace.clone(),
        service: service.name.clone(),
        port,
    }
}
