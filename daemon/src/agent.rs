//! The daemon core: probe → ring-buffer reader → connection table → exposition, plus startup
//! recovery, loss polling and an orderly shutdown that detaches every program.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{broadcast, watch},
    task::JoinHandle,
};

use crate::{
    analysis::{
        self, AnalysisConfig, Analyzer, feed,
        regress::{VerdictHistory, WorkloadKey},
    },
    conntable::{Change, Conn, ConnKey, ConnTable, reconcile::Reconciler, recover},
    event::{Event, reader},
    exposition::{http, metrics::Metrics, server},
    features::{Feature, Features},
    identity::{
        Identity, IdentitySource,
        conntrack::{Conntrack, ConntrackError, Tuple},
        kube::{KubeOptions, KubeSource},
        local::{self, InventoryError, ReloadOutcome},
    },
    probe::{Outcome, Probe, ProbeError, ProbeOptions},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Probe(#[from] ProbeError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("ring buffer reader: {0}")]
    Reader(std::io::Error),
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("Kubernetes client: {0}")]
    Kube(String),
    #[error("analysis: {0}")]
    Analysis(#[from] analysis::ConfigError),
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub probe: ProbeOptions,
    /// Address of the HTTP server (/metrics, /healthz, /connections).
    pub listen: SocketAddr,
    /// How often the reader polls the ring buffer between wakeups.
    pub poll_interval: Duration,
    /// Recover connections that predate the daemon from /proc, and keep comparing the table with
    /// the kernel's socket tables afterwards.
    pub recover: bool,
    /// How often the table is compared with the kernel's socket tables.
    pub reconcile_interval: Duration,
    pub proc_root: PathBuf,
    pub netns_dirs: Vec<PathBuf>,
    pub identity: IdentitySource,
    /// Network namespace whose conntrack table holds kube-proxy's NAT (the node's; None = the
    /// daemon's own).
    pub conntrack_netns: Option<PathBuf>,
    /// Sliding window, thresholds and caps of the balance analysis.
    pub analysis: AnalysisConfig,
    /// The HTTP API's connection cap and timeouts.
    pub api: server::Limits,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            probe: ProbeOptions::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9990)),
            poll_interval: Duration::from_millis(100),
            recover: true,
            reconcile_interval: Duration::from_secs(4),
            proc_root: PathBuf::from("/proc"),
            netns_dirs: crate::probe::default_netns_dirs(),
            identity: IdentitySource::None,
            conntrack_netns: None,
            analysis: AnalysisConfig::default(),
            api: server::Limits::default(),
        }
    }
}

/// Pending conntrack lookups beyond this are dropped (and counted).
const CONNTRACK_QUEUE: usize = 4096;
/// Client workloads whose last verdict per service is remembered, and for how long one that is
/// no longer judged is (a rollout can take a while; a day covers a slow one).
const VERDICT_HISTORY_CAP: usize = 10_000;
const VERDICT_HISTORY_FORGET: Duration = Duration::from_secs(24 * 3600);
/// `/livez` fails once the housekeeping loop has not run for this long.
pub const LIVENESS_STALE: Duration = Duration::from_secs(30);
/// How often every client's verdict is evaluated for the history.
const VERDICT_EVERY: Duration = Duration::from_secs(5);

/// Work for the conntrack thread, in the order the events happened.
enum CtJob {
    /// A connection found at startup (already in the analyzer): set its backend.
    Resolve(ConnKey),
    /// A ClusterIP connection opened: its backend is looked up first, so the analyzer sees the
    /// open with the backend pod kube-proxy chose.
    Open {
        conn: Box<Conn>,
        at: analysis::Nanos,
    },
    /// A connection whose open is still queued closed: the close follows its open. A client that
    /// dials per request closes within milliseconds, often before the lookup is done.
    Close {
        id: analysis::ConnId,
        at: analysis::Nanos,
        lifetime: Option<Duration>,
        counters: analysis::Counters,
    },
}

/// The conntrack thread's queue, as the event path sees it.
struct Resolver {
    tx: std::sync::mpsc::Sender<CtJob>,
    /// Opens queued and not yet handled, per connection (a socket address can be reused by the
    /// next connection before the thread gets to the first). A close of one of these must
    /// follow it through the queue.
    queued_opens: std::collections::HashMap<analysis::ConnId, u32>,
    /// Lookups queued (opens and startup connections), bounded by [`CONNTRACK_QUEUE`]; closes
    /// always join the queue, at most one per queued open.
    pending: usize,
}

impl Resolver {
    fn new(tx: std::sync::mpsc::Sender<CtJob>) -> Self {
        Resolver {
            tx,
            queued_opens: Default::default(),
            pending: 0,
        }
    }

    /// Queues a lookup unless the queue is full or the thread is gone.
    fn lookup(&mut self, job: CtJob) -> bool {
        if self.pending >= CONNTRACK_QUEUE {
            return false;
        }
        let id = match &job {
            CtJob::Open { conn, .. } => feed::conn_id(conn),
            _ => None,
        };
        if self.tx.send(job).is_err() {
            return false;
        }
        self.pending += 1;
        if let Some(id) = id {
            *self.queued_opens.entry(id).or_default() += 1;
        }
        true
    }

    /// The thread handled a lookup.
    fn done(&mut self, open: Option<analysis::ConnId>) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(id) = open
            && let Some(n) = self.queued_opens.get_mut(&id)
        {
            *n -= 1;
            if *n == 0 {
                self.queued_opens.remove(&id);
            }
        }
    }
}

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

/// State shared by the reader, the HTTP handlers and embedders (tests).
pub struct Shared {
    table: Mutex<ConnTable>,
    pub metrics: Metrics,
    pub identity: Identity,
    ready: AtomicBool,
    events: broadcast::Sender<Event>,
    conntrack: Mutex<Option<Resolver>>,
    /// Balance per (client pod, service) over the sliding window.
    pub analyzer: Arc<Mutex<Analyzer>>,
    /// The probe, for reading a connection's final HTTP/2 count when it closes.
    probe: std::sync::OnceLock<Arc<Mutex<Probe>>>,
    /// What works on this node and what fell back.
    pub features: Features,
    /// Each client workload's last verdict per service, for regressions.
    verdicts: Mutex<VerdictHistory>,
    /// When the housekeeping loop last ran (monotonic ns; 0 before the first run): `/livez`.
    heartbeat: std::sync::atomic::AtomicU64,
    /// The comparison with the kernel's socket tables, carried between rounds.
    reconciler: Mutex<Reconciler>,
    /// The API server's connection figures.
    pub http: server::ServerStats,
}

impl Shared {
    fn new(analyzer: Analyzer) -> Self {
        let analyzer = Arc::new(Mutex::new(analyzer));
        let mut metrics = Metrics::new();
        metrics.register_balance(analyzer.clone(), monotonic_ns);
        let http_stats = server::ServerStats::default();
        http_stats.register(&mut metrics.registry);
        let gauge = metrics.features.clone();
        let features = Features::new(move |feature, enabled| {
            crate::exposition::metrics::set_feature(&gauge, feature, enabled)
        });
        Shared {
            features,
            heartbeat: Default::default(),
            reconciler: Mutex::new(Reconciler::new()),
            http: http_stats,
            verdicts: Mutex::new(VerdictHistory::new(
                VERDICT_HISTORY_CAP,
                VERDICT_HISTORY_FORGET,
            )),
            analyzer,
            probe: std::sync::OnceLock::new(),
            table: Mutex::new(ConnTable::new()),
            metrics,
            identity: Identity::default(),
            ready: AtomicBool::new(false),
            events: broadcast::channel(1 << 16).0,
            conntrack: Mutex::new(None),
        }
    }

    fn resolver(&self) -> MutexGuard<'_, Option<Resolver>> {
        self.conntrack.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a conntrack lookup; false (counted) when it cannot be.
    fn request_lookup(&self, job: CtJob) -> bool {
        let refused = match self.resolver().as_mut() {
            Some(r) => {
                if r.lookup(job) {
                    return true;
                }
                "dropped"
            }
            None => "unavailable",
        };
        self.metrics.conntrack_lookup(refused);
        false
    }

    /// Queues the close of a connection whose open is still queued; false when none is.
    fn follow_open(&self, id: analysis::ConnId, close: impl FnOnce() -> CtJob) -> bool {
        let mut g = self.resolver();
        let Some(r) = g.as_mut().filter(|r| r.queued_opens.contains_key(&id)) else {
            return false;
        };
        r.tx.send(close()).is_ok()
    }

    /// The analyzer, locked. Lock order: table, then analyzer, then the resolver, then probe.
    pub fn analyzer(&self) -> MutexGuard<'_, Analyzer> {
        self.analyzer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn table(&self) -> MutexGuard<'_, ConnTable> {
        // A panic while holding the lock leaves a table that is still consistent enough to read.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the connection table locked.
    pub fn with_table<T>(&self, f: impl FnOnce(&ConnTable) -> T) -> T {
        f(&self.table())
    }

    /// Ready: programs attached, startup recovery done, identity synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.identity.is_synced()
    }

    /// Live: the housekeeping loop (loss counters, kernel map reads, verdicts) ran within
    /// [`LIVENESS_STALE`], or has not had its first turn yet.
    pub fn is_live(&self) -> bool {
        let beat = self.heartbeat.load(Ordering::Acquire);
        beat == 0 || monotonic_ns().saturating_sub(beat) < LIVENESS_STALE.as_nanos() as u64
    }

    pub fn refresh_gauges(&self) {
        let n = self.table().len();
        self.metrics.active.set(n as i64);
    }

    /// Feeds a close to the analyzer: now, or through the conntrack queue after its queued open.
    /// Only connections the analyzer tracks (or will, once their open is handled) are looked at:
    /// the node's other sockets close without any lookup.
    fn feed_close(
        &self,
        analyzer: &mut Analyzer,
        conn: &Conn,
        at: analysis::Nanos,
        lifetime: Option<Duration>,
    ) {
        let Some(id) = feed::conn_id(conn) else {
            return;
        };
        // The final figures, as the close record carried them (no map is read).
        let final_counters = || {
            let req = conn
                .requests
                .unwrap_or_else(|| crate::conntable::requests_of(None, &conn.counters));
            feed::counters_of(&conn.counters, &req)
        };
        // Only an outbound connection with no backend yet can have its open queued (see
        // `Identity::needs_backend`); the node's other closes skip the resolver's lock.
        let may_be_queued =
            conn.direction == crate::conntable::Direction::Outbound && conn.backend.is_none();
        let queued = may_be_queued
            && self.follow_open(id, || CtJob::Close {
                id,
                at,
                lifetime,
                counters: final_counters(),
            });
        if !queued && analyzer.tracks(id) {
            analyzer.on_sample(id, at, &final_counters());
            analyzer.on_close(id, at, lifetime);
        }
    }

    fn apply(&self, batch: reader::Batch) {
        for e in &batch.errors {
            tracing::warn!(error = %e, "undecodable record");
            self.metrics.lost_user(e.reason());
        }
        let inv = self.identity.snapshot();
        {
            let mut table = self.table();
            let mut analyzer = self.analyzer();
            for ev in &batch.events {
                let change = table.apply(ev);
                match &change {
                    Change::Opened(conn) => {
                        self.identity.learn(&inv, conn);
                        let queued = Identity::needs_backend(&inv, conn)
                            && self.request_lookup(CtJob::Open {
                                conn: Box::new(conn.clone()),
                                at: ev.ts_ns,
                            });
                        if !queued
                            && let Some(open) =
                                feed::open_of(&self.identity, &inv, conn, ev.ts_ns, false)
                        {
                            analyzer.on_open(open);
                        }
                    }
                    Change::Closed { conn, duration } => {
                        self.feed_close(&mut analyzer, conn, ev.ts_ns, *duration);
                    }
                    _ => {}
                }
                self.metrics.observe(ev.kind, &change);
            }
            self.metrics.active.set(table.len() as i64);
        }
        for ev in batch.events {
            // No subscribers is the normal case for the daemon.
            let _ = self.events.send(ev);
        }
    }
}

/// A running daemon core.
pub struct Agent {
    shared: Arc<Shared>,
    probe: Arc<Mutex<Probe>>,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    reader: JoinHandle<std::io::Result<()>>,
    kube: Option<KubeSource>,
}

impl Agent {
    /// Attaches the probes, starts reading, recovers pre-existing connections and serves HTTP.
    pub async fn start(opts: AgentOptions) -> Result<Agent, AgentError> {
        opts.probe.validate()?;
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| AgentError::Listen {
                addr: opts.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| AgentError::Listen {
            addr: opts.listen,
            source,
        })?;
        let probe_opts = opts.probe.clone();
        let (probe, ring) = tokio::task::spawn_blocking(move || Probe::load(&probe_opts))
            .await
            .map_err(|e| AgentError::Reader(std::io::Error::other(e)))??;
        let shared = Arc::new(Shared::new(Analyzer::new(opts.analysis.clone())?));
        for (feature, outcome) in &probe.outcomes {
            match outcome {
                Outcome::On(how) => shared.features.on(*feature, how.clone()),
                Outcome::Off { reason, fix } => {
                    shared.features.off(*feature, reason.clone(), fix.clone())
                }
            }
        }
        let mut tasks = Vec::new();
        let kube = start_identity(&opts, &shared, &mut tasks).await?;
        start_conntrack(&opts, &shared);
        shared
            .metrics
            .build_info
            .get_or_create(&crate::exposition::metrics::BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                hooks: probe.plan.describe(),
            })
            .set(1);
        shared.metrics.set_kernel_lost(&probe.lost()?);
        let probe = Arc::new(Mutex::new(probe));
        let _ = shared.probe.set(probe.clone());
        let (stop, stop_rx) = watch::channel(false);

        // Records that arrive while /proc is scanned must win over what the scan found.
        shared.table().begin_recovery();
        let reader = {
            let shared = shared.clone();
            tokio::spawn(reader::run(
                ring,
                opts.poll_interval,
                stop_rx.clone(),
                move |batch| shared.apply(batch),
            ))
        };

        tasks.push({
            let shared = shared.clone();
            let (recover_on, proc_root, dirs, poll_interval, reconcile_every) = (
                opts.recover,
                opts.proc_root.clone(),
                opts.netns_dirs.clone(),
                opts.poll_interval,
                opts.reconcile_interval,
            );
            let mut stop_rx = stop_rx.clone();
            tokio::spawn(async move {
                if recover_on {
                    // The first reconciliation round: everything the kernel has that the tracer
                    // has not reported predates it.
                    let before = shared.with_table(|t| t.keys());
                    let (p, d) = (proc_root.clone(), dirs.clone());
                    let scan = tokio::task::spawn_blocking(move || recover::scan(&p, &d))
                        .await
                        .unwrap_or_default();
                    let covered: HashSet<u32> = scan.conns.iter().map(|c| c.key.netns).collect();
                    let plan = shared
                        .reconciler
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .round(&before, scan.conns, &covered);
                    let ownerless = scan.ownerless;
                    let mut scan_report = RecoveryReport {
                        namespaces: scan.namespaces,
                        netns_unreachable: scan.netns_unreachable,
                        enter_denied: scan.enter_denied,
                        owners_denied: scan.owners_denied,
                        owners_missing: 0,
                    };
                    let added = shared.table().finish_recovery(plan.add);
                    // Ownerless connections that were also traced (opened during the scan) get
                    // their owner from the tracer once the reader has drained the records
                    // submitted meanwhile (it polls every poll interval); only those recovery
                    // alone knows count.
                    tokio::time::sleep((poll_interval * 3).min(Duration::from_secs(1))).await;
                    scan_report.owners_missing = shared.with_table(|t| {
                        t.iter()
                            .filter(|c| c.origin == crate::conntable::Origin::Recovered)
                            .filter(|c| c.owner.is_none() && ownerless.contains(&c.key))
                            .count()
                    });
                    let inv = shared.identity.snapshot();
                    let now = monotonic_ns();
                    let opens: Vec<_> = shared.with_table(|t| {
                        t.iter()
                            .filter(|c| c.origin == crate::conntable::Origin::Recovered)
                            .filter_map(|c| feed::open_of(&shared.identity, &inv, c, now, true))
                            .collect()
                    });
                    {
                        let mut a = shared.analyzer();
                        for o in opens {
                            a.on_open(o);
                        }
                    }
                    let lookups: Vec<ConnKey> = shared.with_table(|t| {
                        t.iter()
                            .inspect(|c| shared.identity.learn(&inv, c))
                            .filter(|c| Identity::needs_backend(&inv, c))
                            .map(|c| c.key)
                            .collect()
                    });
                    for key in lookups {
                        shared.request_lookup(CtJob::Resolve(key));
                    }
                    shared.metrics.recovered.inc_by(added as u64);
                    tracing::info!(
                        namespaces = scan.namespaces,
                        connections = added,
                        "recovered connections that predate the daemon"
                    );
                    report_recovery(&shared.features, &scan_report);
                } else {
                    shared.table().finish_recovery(Vec::new());
                    for f in [Feature::RecoveryNetns, Feature::RecoveryOwner] {
                        shared.features.unused(f, "--no-recover");
                    }
                }
                shared.ready.store(true, Ordering::Release);
                if !recover_on {
                    return;
                }
                // Later rounds: ghosts (lost closes) and holes (lost opens) are fixed within two
                // rounds.
                let mut tick = tokio::time::interval(reconcile_every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop_rx.changed() => return,
                    }
                    reconcile_round(&shared, &proc_root, &dirs).await;
                }
            })
        });

        tasks.push({
            let (shared, probe, mut stop_rx) = (shared.clone(), probe.clone(), stop_rx.clone());
            let kube_stats = kube.as_ref().map(|k| k.stats.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                let mut last_verdicts = 0;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop_rx.changed() => return,
                    }
                    if let Some(k) = &kube_stats {
                        shared.metrics.set_kube_stats(k);
                    }
                    let lost = probe.lock().map(|mut p| {
                        p.flush_logs();
                        shared.metrics.set_program_misses(&p.program_misses());
                        p.lost()
                    });
                    match lost {
                        Ok(Ok(totals)) => shared.metrics.set_kernel_lost(&totals),
                        Ok(Err(e)) => tracing::warn!(error = %e, "reading loss counters"),
                        Err(_) => return,
                    }
                    refresh_stats(&shared, &probe);
                    let now = monotonic_ns();
                    shared.heartbeat.store(now, Ordering::Release);
                    if now.saturating_sub(last_verdicts) >= VERDICT_EVERY.as_nanos() as u64 {
                        last_verdicts = now;
                        track_verdicts(&shared, now);
                    }
                    let dropped = shared.table().sweep(monotonic_ns());
                    if dropped > 0 {
                        tracing::debug!(dropped, "dropped stale pending connects");
                    }
                }
            })
        });

        tasks.push({
            let router = http::router(shared.clone());
            let mut stop_rx = stop_rx.clone();
            // The API never holds more connections than the descriptors allow, sheds idle ones
            // for new ones, and times out slow and idle clients: a flood of sockets from any pod
            // cannot starve the probes.
            let soft = match server::raise_nofile_limit() {
                Ok((before, after)) => {
                    if after > before {
                        tracing::info!(before, after, "raised the open-files limit");
                    }
                    after
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read or raise the open-files limit");
                    1024
                }
            };
            let limits = server::Limits {
                max_connections: server::connection_cap(opts.api.max_connections, soft),
                ..opts.api.clone()
            };
            tracing::info!(
                max_connections = limits.max_connections,
                "HTTP connection cap"
            );
            let stats = shared.http.clone();
            tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                };
                if let Err(e) = server::serve(listener, router, limits, stats, shutdown).await {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            })
        });
        tracing::info!(%http_addr, "serving /metrics, /healthz, /connections");

        Ok(Agent {
            shared,
            probe,
            http_addr,
            stop,
            tasks,
            reader,
            kube,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Every decoded event from now on (for embedders and tests; lagging receivers lose events
    /// and are told so by the channel).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Waits until startup recovery finished.
    pub async fn ready(&self) {
        while !self.shared.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Names of the attached eBPF programs.
    pub fn programs(&self) -> Vec<String> {
        self.probe.lock().map(|p| p.programs()).unwrap_or_default()
    }

    /// Stops every task, drains the ring buffer and detaches the programs.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        let _ = self.stop.send(true);
        let read = self.reader.await;
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        if let Some(k) = self.kube {
            k.stop().await;
        }
        // Ends the conntrack resolver thread.
        self.shared.resolver().take();
        drop(self.probe);
        tracing::info!("eBPF programs detached");
        match read {
            Ok(r) => r.map_err(AgentError::Reader),
            Err(e) => Err(AgentError::Reader(std::io::Error::other(e))),
        }
    }
}

/// One reconciliation round after startup: read the kernel's tables, compare, fix the table and
/// the analyzer, count what was fixed.
async fn reconcile_round(shared: &Arc<Shared>, proc_root: &std::path::Path, dirs: &[PathBuf]) {
    use crate::conntable::recover;
    let before = shared.with_table(|t| t.keys());
    let (p, d) = (proc_root.to_path_buf(), dirs.to_vec());
    let Ok(tables) = tokio::task::spawn_blocking(move || recover::tables(&p, &d)).await else {
        return;
    };
    let covered = tables.covered();
    let none = std::collections::HashMap::new();
    let kernel: Vec<Conn> = tables
        .namespaces
        .iter()
        .flat_map(|(ns, socks)| recover::connections(*ns, socks, &none))
        .collect();
    let mut plan = shared
        .reconciler
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .round(&before, kernel, &covered);
    shared.metrics.reconcile_rounds.inc();
    if plan.remove.is_empty() && plan.add.is_empty() {
        return;
    }
    if !plan.add.is_empty() {
        // Owners only for what is added: reading every fd table is the expensive part.
        let p = proc_root.to_path_buf();
        if let Ok(scan) =
            tokio::task::spawn_blocking(move || recover::with_owners(&p, tables)).await
        {
            let owners: std::collections::HashMap<ConnKey, crate::event::Owner> = scan
                .conns
                .into_iter()
                .filter_map(|c| Some((c.key, c.owner?)))
                .collect();
            for c in &mut plan.add {
                c.owner = owners.get(&c.key).cloned();
            }
        }
    }
    let now = monotonic_ns();
    let inv = shared.identity.snapshot();
    let (mut removed, mut added, mut lookups) = (0u64, 0u64, Vec::new());
    {
        let mut table = shared.table();
        let mut analyzer = shared.analyzer();
        for key in &plan.remove {
            if let Some(conn) = table.remove_gone(key) {
                tracing::debug!(?key, "reconcile: the kernel has no such socket; removed");
                shared.feed_close(&mut analyzer, &conn, now, None);
                removed += 1;
            }
        }
        for conn in plan.add {
            if table.add_found(conn.clone()) {
                tracing::debug!(key = ?conn.key, "reconcile: a socket the table missed; added");
                shared.identity.learn(&inv, &conn);
                if let Some(open) = feed::open_of(&shared.identity, &inv, &conn, now, true) {
                    analyzer.on_open(open);
                }
                if Identity::needs_backend(&inv, &conn) {
                    lookups.push(conn.key);
                }
                added += 1;
            }
        }
        shared.metrics.active.set(table.len() as i64);
    }
    for key in lookups {
        shared.request_lookup(CtJob::Resolve(key));
    }
    for (action, n) in [("removed", removed), ("added", added)] {
        if n > 0 {
            shared
                .metrics
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

/// What a startup scan could not read, for the features it degrades.
struct RecoveryReport {
    namespaces: usize,
    netns_unreachable: usize,
    enter_denied: usize,
    owners_denied: usize,
    owners_missing: usize,
}

fn report_recovery(features: &Features, r: &RecoveryReport) {
    use crate::probe::caps;
    let held = caps::effective();
    if r.netns_unreachable == 0 && r.enter_denied == 0 {
        features.on(
            Feature::RecoveryNetns,
            format!("{} network namespaces scanned", r.namespaces),
        );
    } else {
        let mut why = Vec::new();
        let mut fix = Vec::new();
        if r.netns_unreachable > 0 {
            why.push(format!(
                "{} more network namespaces exist whose processes' /proc/<pid>/ns/net could not \
                 be read (permission denied)",
                r.netns_unreachable
            ));
            fix.push(if held.has(caps::SYS_PTRACE) {
                "check the AppArmor or SELinux profile: reading another process's \
                 /proc/<pid>/ns/net needs ptrace read access (the Helm chart runs unconfined)"
            } else {
                "add SYS_PTRACE to the container's capabilities: reading another process's \
                 /proc/<pid>/ns/net needs ptrace read access"
            });
        }
        if r.enter_denied > 0 {
            why.push(format!(
                "{} namespaces under /run/netns could not be entered",
                r.enter_denied
            ));
            fix.push(
                "entering a namespace no process lives in needs CAP_SYS_ADMIN; pod namespaces \
                 always have a process, so do not mount /run/netns into the container",
            );
        }
        features.off(
            Feature::RecoveryNetns,
            format!(
                "{} network namespaces scanned: {}",
                r.namespaces.saturating_sub(r.enter_denied),
                why.join("; ")
            ),
            fix.join("; "),
        );
    }
    // Unreadable fd tables only matter when they hide the owner of a recovered connection.
    if r.owners_missing == 0 || r.owners_denied == 0 {
        features.on(
            Feature::RecoveryOwner,
            format!(
                "every recovered connection has its owner ({} fd tables unreadable, holding none)",
                r.owners_denied
            ),
        );
    } else {
        let mut add = Vec::new();
        if !held.has(caps::SYS_PTRACE) {
            add.push("SYS_PTRACE (fd links of other processes)");
        }
        if !held.can_read_search() {
            add.push("DAC_READ_SEARCH (fd directories of other users' processes)");
        }
        let fix = if add.is_empty() {
            "check the AppArmor or SELinux profile (the Helm chart runs unconfined)".to_string()
        } else {
            format!("add {} to the container's capabilities", add.join(" and "))
        };
        features.off(
            Feature::RecoveryOwner,
            format!(
                "{} recovered connections have no owner: the fd table of {} processes could not \
                 be read (permission denied)",
                r.owners_missing, r.owners_denied
            ),
            fix,
        );
    }
}

/// Evaluates every client's verdict, feeds the per-workload history and counts the changes.
fn track_verdicts(shared: &Shared, now: analysis::Nanos) {
    let balances = shared.analyzer().evaluate(now);
    let inv = shared.identity.snapshot();
    let judged = balances.into_iter().map(|b| {
        let workload = inv
            .pod(&b.client.namespace, &b.client.name)
            .map(|p| format!("{}/{}", p.workload.kind, p.workload.name))
            .unwrap_or_else(|| format!("Pod/{}", b.client.name));
        (
            WorkloadKey {
                namespace: b.client.namespace,
                workload,
                service: b.service,
            },
            b.verdict,
        )
    });
    let observed = shared
        .verdicts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .observe(judged, now);
    let labels = |k: &WorkloadKey, from: analysis::Verdict, to: analysis::Verdict| {
        crate::exposition::metrics::VerdictChangeLabels {
            namespace: k.namespace.clone(),
            workload: k.workload.clone(),
            service_namespace: k.service.namespace.clone(),
            service: k.service.name.clone(),
            from: from.as_str(),
            to: to.as_str(),
        }
    };
    let family = &shared.metrics.verdict_changes;
    for k in &observed.forgotten {
        for from in analysis::Verdict::ALL {
            for to in analysis::Verdict::ALL {
                family.remove(&labels(k, from, to));
            }
        }
    }
    // Every regression possible from the remembered verdict exists at 0 ahead of time, so the
    // first one is an increase Prometheus can see.
    for (k, v) in &observed.remembered {
        for worse in analysis::regress::worse_than(*v) {
            let _ = family.get_or_create(&labels(k, *v, worse));
        }
    }
    for c in observed.changes {
        let log = format!(
            "{}/{} now {} for service {}/{} (was {})",
            c.key.namespace,
            c.key.workload,
            c.to.as_str(),
            c.key.service.namespace,
            c.key.service.name,
            c.from.as_str()
        );
        if c.is_regression() {
            tracing::warn!("balance verdict got worse: {log}");
        } else {
            tracing::info!("balance verdict changed: {log}");
        }
        family.get_or_create(&labels(&c.key, c.from, c.to)).inc();
    }
}

/// Reads live connections' counters and request figures from the kernel maps.
fn refresh_stats(shared: &Shared, probe: &Mutex<Probe>) {
    use crate::conntable::{Direction, h2_key, requests_figure};
    let tracked = shared.with_table(|t| t.tracked());
    let updates: Vec<_> = {
        let Ok(p) = probe.lock() else { return };
        tracked
            .iter()
            .filter_map(|(key, sock, dir)| {
                let counters = crate::event::Counters::from(&p.sock_state(*sock)?);
                let requests = (*dir == Direction::Outbound)
                    .then(|| requests_figure(p.h2_state(&h2_key(key)).as_ref(), &counters));
                Some((*key, counters, requests))
            })
            .collect()
    };
    let now = monotonic_ns();
    let mut table = shared.table();
    let mut analyzer = shared.analyzer();
    for (key, counters, requests) in updates {
        table.set_stats(&key, counters, requests);
        if let (Some(req), Some(conn)) = (requests, table.get(&key))
            && let Some(id) = feed::conn_id(conn)
        {
            analyzer.on_sample(id, now, &feed::counters_of(&counters, &req));
        }
    }
    drop(table);
    for (service, ready) in feed::ready_backends(&shared.identity.snapshot()) {
        analyzer.set_ready_backends(&service, ready, now);
    }
    analyzer.gc(now);
}

/// Loads the identity source and keeps the shared identity up to date.
async fn start_identity(
    opts: &AgentOptions,
    shared: &Arc<Shared>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Option<KubeSource>, AgentError> {
    match &opts.identity {
        IdentitySource::None => {
            shared.identity.set_synced(true);
            Ok(None)
        }
        IdentitySource::Local { path, reload_every } => {
            let loaded = local::stamp(path);
            let inv = Arc::new(local::load(path)?);
            tracing::info!(
                file = %path.display(),
                pods = inv.pods().len(),
                services = inv.services().len(),
                "inventory loaded"
            );
            shared.identity.replace(inv.clone());
            shared.identity.set_synced(true);
            shared.metrics.inventory_reload(true);
            let (tx, mut rx) = watch::channel(inv);
            let s = shared.clone();
            tasks.push(tokio::spawn(local::watch_file(
                path.clone(),
                *reload_every,
                loaded,
                tx,
                move |outcome| {
                    s.metrics
                        .inventory_reload(*outcome == ReloadOutcome::Loaded)
                },
            )));
            let s = shared.clone();
            tasks.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let inv = rx.borrow_and_update().clone();
                    s.identity.replace(inv);
                }
            }));
            Ok(None)
        }
        IdentitySource::Kube {
            node_name,
            kubeconfig,
        } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let source = KubeSource::start(
                client,
                KubeOptions {
                    node_name: node_name.clone(),
                    debounce: Duration::from_millis(200),
                },
            );
            let (mut inv_rx, mut synced_rx) = (source.inventory.clone(), source.synced.clone());
            let s = shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = inv_rx.changed() => {
                            if r.is_err() { return; }
                            let inv = inv_rx.borrow_and_update().clone();
                            s.identity.replace(inv);
                        }
                        r = synced_rx.changed() => {
                            if r.is_err() { return; }
                            let synced = *synced_rx.borrow_and_update();
                            s.identity.set_synced(synced);
                            s.metrics.identity_synced.set(i64::from(synced));
                        }
                    }
                }
            }));
            Ok(Some(source))
        }
    }
}

/// A Kubernetes client from `kubeconfig`, else in-cluster config or the default kubeconfig.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, AgentError> {
    let err = |e: &dyn std::fmt::Display| AgentError::Kube(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| AgentError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| AgentError::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}

/// Starts the thread that resolves ClusterIP connections to backends through conntrack.
fn start_conntrack(opts: &AgentOptions, shared: &Arc<Shared>) {
    if matches!(opts.identity, IdentitySource::None) {
        shared.features.unused(
            Feature::Conntrack,
            "no identity source: there are no services to resolve",
        );
        return;
    }
    let ct = match &opts.conntrack_netns {
        Some(path) => Conntrack::open_in(path),
        None => Conntrack::open(),
    };
    let where_ = opts.conntrack_netns.as_ref().map_or_else(
        || "the daemon's network namespace (the node's with hostNetwork)".to_string(),
        |p| format!("network namespace {}", p.display()),
    );
    // A lookup of a tuple no connection has proves the kernel answers: not found is success.
    let probe = ct.and_then(|ct| {
        let none = Tuple::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 1)),
        );
        ct.reply_tuple(none).map(|_| ct)
    });
    let ct = match probe {
        Ok(ct) => {
            shared
                .features
                .on(Feature::Conntrack, format!("conntrack table of {where_}"));
            ct
        }
        Err(e) => {
            let fix = match &e {
                ConntrackError::Kernel { errno } if *errno == libc::EPERM => {
                    "add NET_ADMIN to the container's capabilities (conntrack lookups over \
                     netlink need it)"
                }
                ConntrackError::Namespace { .. } => {
                    "run with hostNetwork instead of --conntrack-netns: entering another network \
                     namespace needs CAP_SYS_ADMIN"
                }
                _ => "see the error; the node needs the nf_conntrack_netlink module",
            };
            shared.features.off(
                Feature::Conntrack,
                format!("conntrack lookups in {where_} fail: {e}"),
                fix,
            );
            return;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel::<CtJob>();
    *shared.resolver() = Some(Resolver::new(tx));
    let weak = Arc::downgrade(shared);
    let spawned = std::thread::Builder::new()
        .name("conntrack".into())
        .spawn(move || {
            while let Ok(job) = rx.recv() {
                let Some(shared) = weak.upgrade() else { return };
                resolve_job(&shared, &ct, job);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the conntrack thread");
    }
}

/// Looks up the backend kube-proxy chose for a connection: the reply tuple's source.
fn backend_via(shared: &Shared, ct: &Conntrack, key: &ConnKey) -> Option<SocketAddr> {
    match ct.reply_tuple(Tuple::new(key.local, key.remote)) {
        Ok(Some(reply)) => {
            shared.metrics.conntrack_lookup("found");
            Some(reply.src)
        }
        Ok(None) => {
            shared.metrics.conntrack_lookup("missing");
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "conntrack lookup failed");
            shared.metrics.conntrack_lookup("error");
            None
        }
    }
}

/// One job of the conntrack thread. Lock order as elsewhere (see [`Shared::analyzer`]): table,
/// then analyzer; the resolver is locked alone, after both are released.
fn resolve_job(shared: &Shared, ct: &Conntrack, job: CtJob) {
    match job {
        CtJob::Resolve(key) => {
            let backend = backend_via(shared, ct, &key);
            if let Some(backend) = backend {
                let inv = shared.identity.snapshot();
                let mut table = shared.table();
                if table.set_backend(&key, backend)
                    && let Some(conn) = table.get(&key)
                    && let (Some(id), Some(pod)) = (
                        feed::conn_id(conn),
                        feed::backend_of(&shared.identity, &inv, conn),
                    )
                {
                    shared.analyzer().on_backend(id, pod, monotonic_ns());
                }
            }
            if let Some(r) = shared.resolver().as_mut() {
                r.done(None);
            }
        }
        CtJob::Open { mut conn, at } => {
            conn.backend = backend_via(shared, ct, &conn.key);
            {
                let inv = shared.identity.snapshot();
                let mut table = shared.table();
                // The same connection still open (not a later one on the same ports).
                if let Some(backend) = conn.backend
                    && table.get(&conn.key).is_some_and(|c| c.sock == conn.sock)
                {
                    table.set_backend(&conn.key, backend);
                }
                if let Some(open) = feed::open_of(&shared.identity, &inv, &conn, at, false) {
                    shared.analyzer().on_open(open);
                }
            }
            if let Some(r) = shared.resolver().as_mut() {
                r.done(feed::conn_id(&conn));
            }
        }
        CtJob::Close {
            id,
            at,
            lifetime,
            counters,
        } => {
            let mut analyzer = shared.analyzer();
            if analyzer.tracks(id) {
                analyzer.on_sample(id, at, &counters);
                analyzer.on_close(id, at, lifetime);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntable::{Direction, Origin};

    fn key(port: u16) -> ConnKey {
        ConnKey {
            netns: 1,
            local: SocketAddr::from(([10, 244, 0, 2], port)),
            remote: SocketAddr::from(([10, 96, 0, 10], 80)),
        }
    }

    fn open(sock: u64, port: u16) -> CtJob {
        CtJob::Open {
            conn: Box::new(Conn {
                key: key(port),
                direction: Direction::Outbound,
                origin: Origin::Traced,
                sock,
                owner: None,
                opened_ns: Some(1),
                backend: None,
                counters: Default::default(),
                requests: None,
            }),
            at: 1,
        }
    }

    #[test]
    fn a_reused_socket_stays_queued_until_each_of_its_opens_is_handled() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = Resolver::new(tx);
        let id = analysis::ConnId(7);
        assert!(r.lookup(open(7, 40000)));
        assert!(r.lookup(open(7, 40002)));
        assert_eq!((r.pending, r.queued_opens.get(&id)), (2, Some(&2)));
        r.done(Some(id));
        assert!(
            r.queued_opens.contains_key(&id),
            "the second open is still queued: its close must follow it"
        );
        r.done(Some(id));
        assert!(r.queued_opens.is_empty());
        assert_eq!(r.pending, 0);
        assert_eq!(rx.try_iter().count(), 2);
    }

    #[test]
    fn lookups_beyond_the_queue_bound_or_without_a_thread_are_refused() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = Resolver::new(tx);
        for i in 0..CONNTRACK_QUEUE {
            assert!(r.lookup(CtJob::Resolve(key(i as u16))));
        }
        assert!(!r.lookup(open(9, 1)), "the queue is full");
        assert!(!r.queued_opens.contains_key(&analysis::ConnId(9)));
        r.done(None);
        assert!(r.lookup(open(9, 1)));
        drop(rx);
        r.done(None);
        assert!(!r.lookup(open(10, 2)), "the thread is gone");
        assert_eq!(r.pending, CONNTRACK_QUEUE - 1);
    }
}
