//! The agent: starts the stages in order and stops them in order. It holds no state of the data
//! path: the pipeline task owns the connection table and the analysis (see
//! [`crate::pipeline`]), and every other task talks to it by message.
//!
//! Tasks: the ring reader (records → pipeline), the pipeline, the sampler (the probe's owner:
//! losses, skipped runs, counter samples), recovery and reconciliation, the conntrack thread,
//! the identity source, and the HTTP server.
//!
//! Shutdown: the stop signal reaches every task; the reader drains the ring into the pipeline,
//! which applies what is left and ends; the other tasks end; dropping the probe detaches every
//! program (nothing is pinned, so a crash leaves nothing attached either).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64},
    },
    time::Duration,
};

use tokio::{
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};

use crate::{
    analysis::{self, AnalysisConfig, Analyzer},
    event::{Event, EventTap, reader},
    exposition::{
        balance::BalanceSnapshot,
        http::{self, AppState},
        metrics::Metrics,
        server,
    },
    features::Features,
    identity::{
        Identity, IdentitySource,
        kube::KubeSource,
        source::{self, SourceError},
    },
    pipeline::{self, Pipeline, recovery, resolve, sampler},
    probe::{Outcome, Probe, ProbeError, ProbeOptions},
};

pub use crate::pipeline::monotonic_ns;

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
    Identity(#[from] SourceError),
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
    /// How often the table may be compared with the kernel's socket tables: at this interval
    /// after lost records, else every `reconcile_full_interval`.
    pub reconcile_interval: Duration,
    /// The longest time between two comparisons when no record was lost.
    pub reconcile_full_interval: Duration,
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
            reconcile_full_interval: Duration::from_secs(60),
            proc_root: PathBuf::from("/proc"),
            netns_dirs: crate::probe::default_netns_dirs(),
            identity: IdentitySource::None,
            conntrack_netns: None,
            analysis: AnalysisConfig::default(),
            api: server::Limits::default(),
        }
    }
}

/// A running daemon core.
pub struct Agent {
    shared: Arc<AppState>,
    probe: Arc<Mutex<Probe>>,
    http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    reader: JoinHandle<std::io::Result<()>>,
    pipeline: JoinHandle<()>,
    kube: Option<KubeSource>,
}

impl Agent {
    /// Attaches the probes, starts every task and serves HTTP; returns once they run (readiness
    /// comes later: [`Agent::ready`]).
    pub async fn start(opts: AgentOptions) -> Result<Agent, AgentError> {
        opts.probe.validate()?;
        let listener = server::listen(opts.listen).map_err(|source| AgentError::Listen {
            addr: opts.listen,
            source,
        })?;
        let http_addr = listener.local_addr().map_err(|source| AgentError::Listen {
            addr: opts.listen,
            source,
        })?;
        let analyzer = Analyzer::new(opts.analysis.clone())?;
        let probe_opts = opts.probe.clone();
        let (probe, ring) = tokio::task::spawn_blocking(move || {
            let loaded = Probe::load(&probe_opts);
            crate::heap::trim();
            loaded
        })
        .await
        .map_err(|e| AgentError::Reader(std::io::Error::other(e)))??;

        // What the exposition reads: metrics (with the balance snapshot the pipeline publishes),
        // features, the HTTP server's figures.
        let mut metrics = Metrics::new();
        let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(BalanceSnapshot::default()));
        metrics.register_balance(snapshot_rx);
        let http_stats = server::ServerStats::default();
        http_stats.register(&mut metrics.registry);
        let gauge = metrics.features.clone();
        let features = Arc::new(Features::new(move |feature, enabled| {
            crate::exposition::metrics::set_feature(&gauge, feature, enabled)
        }));
        let metrics = Arc::new(metrics);
        for (feature, outcome) in &probe.outcomes {
            match outcome {
                Outcome::On(how) => features.on(*feature, how.clone()),
                Outcome::Off { reason, fix } => features.off(*feature, reason.clone(), fix.clone()),
            }
        }
        metrics
            .build_info
            .get_or_create(&crate::exposition::metrics::BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                hooks: probe.plan.describe(),
            })
            .set(1);
        metrics.set_kernel_lost(&probe.lost()?);
        let probe = Arc::new(Mutex::new(probe));

        let (stop, stop_rx) = watch::channel(false);
        let identity = Arc::new(Identity::default());
        let mut tasks = Vec::new();
        let (m1, m2) = (metrics.clone(), metrics.clone());
        let kube = source::start(
            &opts.identity,
            identity.clone(),
            source::Callbacks {
                reloaded: Box::new(move |ok| m1.inventory_reload(ok)),
                synced: Box::new(move |synced| {
                    m2.identity_synced.set(i64::from(synced));
                }),
            },
            &mut tasks,
        )
        .await?;

        let (channels, records, handle) = pipeline::channels();
        let lookups = resolve::start(
            opts.conntrack_netns.as_deref(),
            !matches!(opts.identity, IdentitySource::None),
            &features,
            handle.clone(),
        );
        let events = EventTap::default();
        let heartbeat = Arc::new(AtomicU64::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let pipeline = {
            // Kubernetes mode: regressions become Events on the client pods.
            let regression_events = kube.as_ref().map(|k| {
                let (tx, rx) = mpsc::channel(pipeline::REGRESSION_EVENTS_QUEUE);
                tasks.push(tokio::spawn(crate::exposition::k8s_events::run(
                    k.client.clone(),
                    k.node_name().map(str::to_owned),
                    identity.clone(),
                    metrics.clone(),
                    rx,
                )));
                tx
            });
            let p = Pipeline::new(pipeline::Parts {
                analyzer,
                identity: identity.clone(),
                metrics: metrics.clone(),
                events: events.clone(),
                snapshot: snapshot_tx,
                heartbeat: heartbeat.clone(),
                lookups,
                regression_events,
            });
            tokio::spawn(p.run(channels, stop_rx.clone()))
        };
        let reader = tokio::spawn(reader::run(
            ring,
            opts.poll_interval,
            stop_rx.clone(),
            records,
        ));
        tasks.push(tokio::spawn(crate::heap::run(stop_rx.clone())));
        tasks.push(tokio::spawn(sampler::run(
            probe.clone(),
            handle.clone(),
            metrics.clone(),
            kube.as_ref().map(|k| k.stats.clone()),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(recovery::run(
            recovery::Recovery {
                proc_root: opts.proc_root.clone(),
                netns_dirs: opts.netns_dirs.clone(),
                interval: opts.reconcile_interval,
                full_interval: opts.reconcile_full_interval,
                poll_interval: opts.poll_interval,
                enabled: opts.recover,
            },
            handle.clone(),
            metrics.clone(),
            features.clone(),
            ready.clone(),
            stop_rx.clone(),
        )));

        let shared = Arc::new(AppState {
            metrics,
            identity,
            features,
            pipeline: handle,
            ready,
            heartbeat,
            events,
            http: http_stats,
        });
        tasks.push(serve(listener, shared.clone(), &opts.api, stop_rx.clone()));
        tracing::info!(%http_addr, "serving /metrics, /healthz, /connections");
        Ok(Agent {
            shared,
            probe,
            http_addr,
            stop,
            tasks,
            reader,
            pipeline,
            kube,
        })
    }

    pub fn shared(&self) -> &Arc<AppState> {
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

    /// Waits until startup recovery finished and identity synced.
    pub async fn ready(&self) {
        while !self.shared.is_ready() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Names of the attached eBPF programs.
    pub fn programs(&self) -> Vec<String> {
        self.probe.lock().map(|p| p.programs()).unwrap_or_default()
    }

    /// Stops every task, drains the ring buffer into the pipeline and detaches the programs.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        let _ = self.stop.send(true);
        let read = self.reader.await;
        // The reader is done: the pipeline applies what it sent and ends.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.pipeline).await;
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        if let Some(k) = self.kube {
            k.stop().await;
        }
        drop(self.probe);
        tracing::info!("eBPF programs detached");
        match read {
            Ok(r) => r.map_err(AgentError::Reader),
            Err(e) => Err(AgentError::Reader(std::io::Error::other(e))),
        }
    }
}

/// Starts the HTTP server: a connection cap below the open-files limit, idle connections shed
/// for new ones, slow and idle clients timed out, so a flood of sockets from any pod cannot
/// starve the probes.
fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<AppState>,
    api: &server::Limits,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
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
        max_connections: server::connection_cap(api.max_connections, soft),
        ..api.clone()
    };
    tracing::info!(
        max_connections = limits.max_connections,
        "HTTP connection cap"
    );
    let stats = shared.http.clone();
    let router = http::router(shared);
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        if let Err(e) = server::serve(listener, router, limits, stats, shutdown).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    })
}
