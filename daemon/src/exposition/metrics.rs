//! Prometheus metrics (OpenMetrics text). Every label value comes from a closed set: never an IP,
//! a port or a namespace inode.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::conntable::{Change, Direction};
use crate::event::kind_name;

/// Every record kind, in the order of [`RecordCounters::by_kind`].
const KINDS: [fanout_common::RecordKind; 6] = {
    use fanout_common::RecordKind::*;
    [
        Connect,
        Established,
        PassiveOpen,
        ConnectFailed,
        Close,
        Accepted,
    ]
};

/// The per-record counters, resolved once: a label lookup in a `Family` takes its lock and
/// hashes the labels, twice for every record otherwise. They share their atomics with the
/// families, so the series are the same (and exist from the start, at 0).
#[derive(Debug)]
struct RecordCounters {
    by_kind: [Counter; 6],
    /// Outbound, inbound.
    opened: [Counter; 2],
    closed: [Counter; 2],
}

impl RecordCounters {
    fn new(
        records: &Family<KindLabels, Counter>,
        opened: &Family<DirectionLabels, Counter>,
        closed: &Family<DirectionLabels, Counter>,
    ) -> Self {
        let dir = |f: &Family<DirectionLabels, Counter>, d: Direction| {
            f.get_or_create(&DirectionLabels {
                direction: d.as_str(),
            })
            .clone()
        };
        RecordCounters {
            by_kind: KINDS.map(|k| {
                records
                    .get_or_create(&KindLabels { kind: kind_name(k) })
                    .clone()
            }),
            opened: [Direction::Outbound, Direction::Inbound].map(|d| dir(opened, d)),
            closed: [Direction::Outbound, Direction::Inbound].map(|d| dir(closed, d)),
        }
    }

    fn kind(&self, kind: fanout_common::RecordKind) -> &Counter {
        let i = KINDS.iter().position(|k| *k == kind).unwrap_or(0);
        &self.by_kind[i]
    }
}

fn direction_index(d: Direction) -> usize {
    match d {
        Direction::Outbound => 0,
        Direction::Inbound => 1,
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabels {
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabels {
    pub feature: &'static str,
}

/// A client workload's verdict for a service changed (see [`crate::analysis::regress`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictChangeLabels {
    pub namespace: String,
    pub workload: String,
    pub service_namespace: String,
    pub service: String,
    pub from: &'static str,
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortMismatchLabels {
    pub namespace: String,
    pub client: String,
    pub service_namespace: String,
    pub service: String,
    pub port: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub hooks: String,
}

pub struct Metrics {
    pub registry: Registry,
    per_record: RecordCounters,
    pub records: Family<KindLabels, Counter>,
    pub opened: Family<DirectionLabels, Counter>,
    pub closed: Family<DirectionLabels, Counter>,
    pub connect_failed: Counter,
    pub active: Gauge,
    pub duration: Histogram,
    pub lost: Family<ReasonLabels, Counter>,
    pub unmatched: Family<KindLabels, Counter>,
    pub recovered: Counter,
    pub build_info: Family<BuildLabels, Gauge<i64, std::sync::atomic::AtomicI64>>,
    pub identity_synced: Gauge,
    pub inventory_reloads: Family<ResultLabels, Counter>,
    pub conntrack_lookups: Family<ResultLabels, Counter>,
    pub kube_watch_errors: Counter,
    pub kube_watch_restarts: Counter,
    pub features: Family<FeatureLabels, Gauge>,
    pub verdict_changes: Family<VerdictChangeLabels, Counter>,
    /// Refused connects of a client to a service's pods on the service port instead of the
    /// target port (analysis::ports).
    pub port_mismatch: Family<PortMismatchLabels, Counter>,
    /// Regressions not written as Kubernetes Events: the writer's queue was full.
    pub regression_events_dropped: Counter,
    /// Kubernetes Events written for regressions, by result (`ok`, `error`).
    pub regression_events: Family<ResultLabels, Counter>,
    pub reconciled: Family<ActionLabels, Counter>,
    pub reconcile_rounds: Counter,
    pub program_misses: Family<ProgramLabels, Counter>,
    program_misses_seen: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    kernel_skipped_seen: AtomicU64,
    /// Kernel loss totals last read, to turn them into counter increments.
    kernel_lost_seen: [AtomicU64; fanout_common::LostReason::COUNT as usize],
    kube_seen: [AtomicU64; 2],
    /// The sum of `lost` ([`Metrics::losses`]).
    losses: AtomicU64,
}

/// Sets (Some) or removes (None) a feature's `fanout_feature_enabled` series.
pub fn set_feature(
    family: &Family<FeatureLabels, Gauge>,
    feature: crate::features::Feature,
    enabled: Option<bool>,
) {
    let labels = FeatureLabels {
        feature: feature.name(),
    };
    match enabled {
        Some(on) => {
            family.get_or_create(&labels).set(i64::from(on));
        }
        None => {
            family.remove(&labels);
        }
    }
}

/// Raises `counter` to an externally kept running `total` (`seen` is the total last applied);
/// returns by how much.
fn bump_to(counter: &Counter, seen: &AtomicU64, total: u64) -> u64 {
    let before = seen.swap(total, std::sync::atomic::Ordering::Relaxed);
    if total > before {
        counter.inc_by(total - before);
        return total - before;
    }
    0
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let records = Family::<KindLabels, Counter>::default();
        registry.register(
            "fanout_records",
            "Lifecycle records read from the kernel, by kind",
            records.clone(),
        );
        let opened = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "fanout_tcp_connections_opened",
            "TCP connections that established, by direction",
            opened.clone(),
        );
        let closed = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "fanout_tcp_connections_closed",
            "Known TCP connections that closed, by direction",
            closed.clone(),
        );
        let connect_failed = Counter::default();
        registry.register(
            "fanout_connect_failed",
            "connect() attempts that never established",
            connect_failed.clone(),
        );
        let active = Gauge::default();
        registry.register(
            "fanout_tcp_connections_active",
            "TCP connections currently in the connection table",
            active.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 4.0, 12));
        registry.register(
            "fanout_tcp_connection_duration_seconds",
            "Lifetime of closed connections whose start was traced",
            duration.clone(),
        );
        let lost = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "fanout_events_lost",
            "Records lost or degraded, by reason",
            lost.clone(),
        );
        let unmatched = Family::<KindLabels, Counter>::default();
        registry.register(
            "fanout_records_unmatched",
            "Records for sockets the connection table did not know",
            unmatched.clone(),
        );
        let recovered = Counter::default();
        registry.register(
            "fanout_tcp_connections_recovered",
            "Connections found at startup that predate the daemon",
            recovered.clone(),
        );
        let build_info = Family::default();
        registry.register(
            "fanout_build_info",
            "Version and active hooks",
            build_info.clone(),
        );
        let identity_synced = Gauge::default();
        registry.register(
            "fanout_identity_synced",
            "1 once the identity source (inventory file or Kubernetes caches) is loaded",
            identity_synced.clone(),
        );
        let inventory_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fanout_inventory_reloads",
            "Inventory file loads, by result (ok, error); on error the last good one stays",
            inventory_reloads.clone(),
        );
        let conntrack_lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fanout_conntrack_lookups",
            "Conntrack lookups of ClusterIP connections, by result",
            conntrack_lookups.clone(),
        );
        let kube_watch_errors = Counter::default();
        registry.register(
            "fanout_kube_watch_errors",
            "Errors from Kubernetes watches (API server outages included)",
            kube_watch_errors.clone(),
        );
        let kube_watch_restarts = Counter::default();
        registry.register(
            "fanout_kube_watch_restarts",
            "Kubernetes watch restarts with a full relist (e.g. after 410 Gone)",
            kube_watch_restarts.clone(),
        );
        let features = Family::<FeatureLabels, Gauge>::default();
        registry.register(
            "fanout_feature_enabled",
            "1 when a feature works, 0 when it fell back (the startup log and /features say why \
             and how to fix it)",
            features.clone(),
        );
        let verdict_changes = Family::<VerdictChangeLabels, Counter>::default();
        registry.register(
            "fanout_lb_verdict_changes",
            "Changes of a client workload's balance verdict for a service, between decisive \
             verdicts",
            verdict_changes.clone(),
        );
        let port_mismatch = Family::<PortMismatchLabels, Counter>::default();
        registry.register(
            "fanout_port_mismatch_connects",
            "Refused connects of a client pod to a service's pods on a service port they do not \
             serve (the headless port gotcha: dial the targetPort); /pods/<ns>/<name>/peers \
             names the fix",
            port_mismatch.clone(),
        );
        let regression_events_dropped = Counter::default();
        registry.register(
            "fanout_regression_events_dropped",
            "Verdict regressions not written as Kubernetes Events because the writer's queue was \
             full",
            regression_events_dropped.clone(),
        );
        let regression_events = Family::<ResultLabels, Counter>::default();
        registry.register(
            "fanout_regression_events",
            "Kubernetes Events written on client pods whose verdict regressed, by result",
            regression_events.clone(),
        );
        let reconciled = Family::<ActionLabels, Counter>::default();
        registry.register(
            "fanout_reconciled",
            "Rows the comparison with the kernel's socket tables fixed: removed (a lost close) or \
             added (a lost open)",
            reconciled.clone(),
        );
        let reconcile_rounds = Counter::default();
        registry.register(
            "fanout_reconcile_rounds",
            "Comparisons of the connection table with the kernel's socket tables",
            reconcile_rounds.clone(),
        );
        let program_misses = Family::<ProgramLabels, Counter>::default();
        registry.register(
            "fanout_bpf_program_misses",
            "Runs of a fanout eBPF program the kernel skipped (recursion_misses: another BPF \
             program was running on that CPU)",
            program_misses.clone(),
        );
        for action in ["removed", "added"] {
            let _ = reconciled.get_or_create(&ActionLabels { action });
        }
        Metrics {
            per_record: RecordCounters::new(&records, &opened, &closed),
            reconciled,
            reconcile_rounds,
            program_misses,
            program_misses_seen: Default::default(),
            kernel_skipped_seen: Default::default(),
            features,
            verdict_changes,
            port_mismatch,
            regression_events_dropped,
            regression_events,
            identity_synced,
            inventory_reloads,
            conntrack_lookups,
            kube_watch_errors,
            kube_watch_restarts,
            kube_seen: Default::default(),
            registry,
            records,
            opened,
            closed,
            connect_failed,
            active,
            duration,
            lost,
            unmatched,
            recovered,
            build_info,
            kernel_lost_seen: Default::default(),
            losses: AtomicU64::new(0),
        }
    }

    /// Adds the per-pod balance metrics, encoded from the latest published snapshot at each
    /// scrape.
    pub fn register_balance(
        &mut self,
        snapshot: tokio::sync::watch::Receiver<std::sync::Arc<super::balance::BalanceSnapshot>>,
    ) {
        self.registry
            .register_collector(Box::new(super::balance::BalanceCollector::new(snapshot)));
    }

    /// Counts the verdict changes of one evaluation, and keeps every regression possible from a
    /// remembered verdict at 0 ahead of time (so the first one is an increase Prometheus sees);
    /// drops the series of forgotten workloads.
    pub fn verdict_changes_observed(&self, observed: &crate::analysis::regress::Observed) {
        use crate::analysis::{Verdict, regress};
        let labels = |k: &regress::WorkloadKey, from: Verdict, to: Verdict| VerdictChangeLabels {
            namespace: k.namespace.clone(),
            workload: k.workload.clone(),
            service_namespace: k.service.namespace.clone(),
            service: k.service.name.clone(),
            from: from.as_str(),
            to: to.as_str(),
        };
        for k in &observed.forgotten {
            for from in Verdict::ALL {
                for to in Verdict::ALL {
                    self.verdict_changes.remove(&labels(k, from, to));
                }
            }
        }
        for (k, v) in &observed.remembered {
            for worse in regress::worse_than(*v) {
                let _ = self.verdict_changes.get_or_create(&labels(k, *v, worse));
            }
        }
        for c in &observed.changes {
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
            self.verdict_changes
                .get_or_create(&labels(&c.key, c.from, c.to))
                .inc();
        }
    }

    /// Records what one applied event did.
    pub fn observe(&self, kind: fanout_common::RecordKind, change: &Change) {
        self.per_record.kind(kind).inc();
        match change {
            Change::Opened(conn) => {
                self.per_record.opened[direction_index(conn.direction)].inc();
            }
            Change::Closed { conn, duration } => {
                self.per_record.closed[direction_index(conn.direction)].inc();
                if let Some(d) = duration {
                    self.duration.observe(d.as_secs_f64());
                }
            }
            Change::Failed { .. } => {
                self.connect_failed.inc();
            }
            Change::Unmatched(kind) => {
                self.unmatched
                    .get_or_create(&KindLabels {
                        kind: kind_name(*kind),
                    })
                    .inc();
            }
            Change::Connecting | Change::OwnerLearnt(_) => {}
        }
    }

    /// Brings the loss counters up to the kernel's totals.
    pub fn set_kernel_lost(&self, totals: &[(fanout_common::LostReason, u64)]) {
        for &(reason, total) in totals {
            // get_or_create also makes the series exist at 0, so alerts have something to read.
            let counter = self.lost.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
            self.add_losses(bump_to(
                &counter,
                &self.kernel_lost_seen[reason as usize],
                total,
            ));
        }
    }

    /// Records lost or degraded so far, all reasons together (what `fanout_events_lost_total`
    /// sums to): reconciliation runs while this moves.
    pub fn losses(&self) -> u64 {
        self.losses.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Adds to [`Metrics::losses`] what was just counted in `lost`.
    fn add_losses(&self, n: u64) {
        self.losses
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Brings the per-program skipped-run counters up to the kernel's totals.
    pub fn set_program_misses(&self, totals: &[(String, u64)]) {
        let mut seen = self
            .program_misses_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (program, total) in totals {
            let counter = self.program_misses.get_or_create(&ProgramLabels {
                program: program.clone(),
            });
            let before = seen.insert(program.clone(), *total).unwrap_or(0);
            if *total > before {
                counter.inc_by(total - before);
            }
        }
        // A skipped run of a program that emits records may be a lost record: counted with the
        // other losses (an upper bound: the run might have emitted nothing).
        let skipped: u64 = totals
            .iter()
            .filter(|(p, _)| crate::probe::RECORD_PROGRAMS.contains(&p.as_str()))
            .map(|(_, n)| n)
            .sum();
        let counter = self.lost.get_or_create(&ReasonLabels {
            reason: "kernel_skipped",
        });
        self.add_losses(bump_to(&counter, &self.kernel_skipped_seen, skipped));
    }

    pub fn inventory_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.inventory_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        if ok {
            self.identity_synced.set(1);
        }
    }

    pub fn conntrack_lookup(&self, result: &'static str) {
        self.conntrack_lookups
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn set_kube_stats(&self, stats: &crate::identity::kube::KubeStats) {
        use std::sync::atomic::Ordering::Relaxed;
        bump_to(
            &self.kube_watch_errors,
            &self.kube_seen[0],
            stats.watch_errors.load(Relaxed),
        );
        bump_to(
            &self.kube_watch_restarts,
            &self.kube_seen[1],
            stats.restarts.load(Relaxed),
        );
    }

    pub fn lost_user(&self, reason: &'static str) {
        self.lost.get_or_create(&ReasonLabels { reason }).inc();
        self.add_losses(1);
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fanout_common::LostReason;

    #[test]
    fn kernel_loss_totals_become_increments() {
        let m = Metrics::new();
        m.set_kernel_lost(&[(LostReason::RingFull, 5), (LostReason::KernelRead, 0)]);
        m.set_kernel_lost(&[(LostReason::RingFull, 7)]);
        let text = m.encode().unwrap();
        assert!(
            text.contains("fanout_events_lost_total{reason=\"ring_full\"} 7"),
            "{text}"
        );
        assert!(text.contains("fanout_events_lost_total{reason=\"kernel_read\"} 0"));
        assert!(text.ends_with("# EOF\n"));
        // The running sum reconciliation watches: 7 from the kernel, then one decode loss.
        assert_eq!(m.losses(), 7);
        m.lost_user("decode_short");
        assert_eq!(m.losses(), 8);
    }
}
