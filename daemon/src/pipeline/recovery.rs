//! Startup recovery and reconciliation: one task that reads the kernel's socket tables, compares
//! them with the connection table, and sends the pipeline what to fix.
//!
//! Invariants:
//! - The reading (every namespace's TCP tables, every process's fd table) is blocking work and
//!   happens here, never in the pipeline; the comparison's state ([`Reconciler`]) is this task's
//!   own.
//! - Startup recovery is the first round: what the kernel has and the tracer has not reported
//!   predates the tracer. Later rounds remove rows whose socket is gone and add sockets the table
//!   missed (see [`crate::conntable::reconcile`]).
//! - A later round runs at an `interval` tick only when it can find something: records were lost
//!   since the last tick (then for [`ROUNDS_AFTER_LOSS`] ticks), the last round left suspects, or
//!   `full_interval` passed since the last round (a safety net for drift no loss counter saw).
//!   With nothing lost the table equals the kernel's by construction, and reading every
//!   namespace's socket tables is most of the daemon's CPU on a busy node (the kernel walks its
//!   whole established hash, TIME_WAIT included, and formats a line per socket).
//! - What the startup scan could not read for lack of permission becomes degraded features, with
//!   the fix, and the daemon is ready once the first round is applied.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::{oneshot, watch};

use super::{Handle, Input, Query};
use crate::{
    conntable::{Conn, ConnKey, Origin, reconcile::Reconciler, recover},
    event::Owner,
    exposition::metrics::Metrics,
    features::{Feature, Features},
};

/// What the task needs.
pub struct Recovery {
    pub proc_root: PathBuf,
    pub netns_dirs: Vec<PathBuf>,
    pub interval: Duration,
    /// The longest time without a round when nothing was lost.
    pub full_interval: Duration,
    /// The reader's poll interval: how long a record can wait in the ring.
    pub poll_interval: Duration,
    pub enabled: bool,
}

/// Runs the startup round, sets `ready`, then reconciles every interval until `stop`.
pub async fn run(
    cfg: Recovery,
    pipeline: Handle,
    metrics: Arc<Metrics>,
    features: Arc<Features>,
    ready: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut reconciler = Reconciler::new();
    if !cfg.enabled {
        let (reply, _) = oneshot::channel();
        let _ = pipeline
            .send(Input::Recovered {
                found: Vec::new(),
                reply,
            })
            .await;
        for f in [Feature::RecoveryNetns, Feature::RecoveryOwner] {
            features.unused(f, "--no-recover");
        }
        ready.store(true, Ordering::Release);
        return;
    }
    startup(&cfg, &mut reconciler, &pipeline, &features).await;
    // The scan's garbage (every namespace's socket tables and fd tables) goes back now, not at
    // the next periodic trim.
    let _ = tokio::task::spawn_blocking(crate::heap::trim).await;
    ready.store(true, Ordering::Release);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let mut due = RoundsDue::new(
        metrics.losses(),
        cfg.full_interval,
        std::time::Instant::now(),
    );
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !due.now(
            metrics.losses(),
            reconciler.has_suspects(),
            std::time::Instant::now(),
        ) {
            continue;
        }
        if !round(&cfg, &mut reconciler, &pipeline, &metrics).await {
            return;
        }
    }
}

/// Rounds at the ticks after a loss, so that a loss seen just before a tick (its records still
/// in the ring) is still judged twice.
pub const ROUNDS_AFTER_LOSS: u32 = 3;

/// Which ticks get a round (the module's invariants).
#[derive(Debug)]
struct RoundsDue {
    losses_seen: u64,
    after_loss: u32,
    last_round: std::time::Instant,
    full_interval: Duration,
}

impl RoundsDue {
    /// `now`: when the last round (startup's) ran.
    fn new(losses: u64, full_interval: Duration, now: std::time::Instant) -> Self {
        RoundsDue {
            losses_seen: losses,
            after_loss: 0,
            last_round: now,
            full_interval,
        }
    }

    /// Whether the tick at `now` runs a round, given the loss total and whether the last round
    /// left suspects; a true answer counts as a round done at `now`.
    fn now(&mut self, losses: u64, suspects: bool, now: std::time::Instant) -> bool {
        if losses != self.losses_seen {
            self.losses_seen = losses;
            self.after_loss = ROUNDS_AFTER_LOSS;
        }
        let due = self.after_loss > 0
            || suspects
            || now.saturating_duration_since(self.last_round) >= self.full_interval;
        if due {
            self.after_loss = self.after_loss.saturating_sub(1);
            self.last_round = now;
        }
        due
    }
}

async fn startup(
    cfg: &Recovery,
    reconciler: &mut Reconciler,
    pipeline: &Handle,
    features: &Features,
) {
    let before = pipeline
        .ask(|reply| Query::Keys { reply })
        .await
        .unwrap_or_default();
    let (p, d) = (cfg.proc_root.clone(), cfg.netns_dirs.clone());
    let scan = tokio::task::spawn_blocking(move || recover::scan(&p, &d))
        .await
        .unwrap_or_default();
    let covered = scan.conns.iter().map(|c| c.key.netns).collect();
    let plan = reconciler.round(&before, scan.conns, &covered);
    let mut report = RecoveryReport {
        namespaces: scan.namespaces,
        netns_unreachable: scan.netns_unreachable,
        enter_denied: scan.enter_denied,
        owners_denied: scan.owners_denied,
        owners_missing: 0,
    };
    let (reply, added) = oneshot::channel();
    if !pipeline
        .send(Input::Recovered {
            found: plan.add,
            reply,
        })
        .await
    {
        return;
    }
    let added = added.await.unwrap_or(0);
    // Ownerless connections that were also traced (opened during the scan) get their owner
    // from the tracer once the reader has drained the records submitted meanwhile; only those
    // recovery alone knows count.
    tokio::time::sleep((cfg.poll_interval * 3).min(Duration::from_secs(1))).await;
    let rows = pipeline.rows().await;
    report.owners_missing = rows
        .iter()
        .filter(|c| c.origin == Origin::Recovered)
        .filter(|c| c.owner.is_none() && scan.ownerless.contains(&c.key))
        .count();
    tracing::info!(
        namespaces = report.namespaces,
        connections = added,
        "recovered connections that predate the daemon"
    );
    report_recovery(features, &report);
}

/// One later round; false when the pipeline is gone.
async fn round(
    cfg: &Recovery,
    reconciler: &mut Reconciler,
    pipeline: &Handle,
    metrics: &Metrics,
) -> bool {
    let Some(before) = pipeline.ask(|reply| Query::Keys { reply }).await else {
        return false;
    };
    let (p, d) = (cfg.proc_root.clone(), cfg.netns_dirs.clone());
    let Ok(tables) = tokio::task::spawn_blocking(move || recover::tables(&p, &d)).await else {
        return true;
    };
    let covered = tables.covered();
    let none = HashMap::new();
    let kernel: Vec<Conn> = tables
        .namespaces
        .iter()
        .flat_map(|(ns, socks)| recover::connections(*ns, socks, &none))
        .collect();
    let mut plan = reconciler.round(&before, kernel, &covered);
    metrics.reconcile_rounds.inc();
    if plan.remove.is_empty() && plan.add.is_empty() {
        return true;
    }
    if !plan.add.is_empty() {
        // Owners only for what is added: reading every fd table is the expensive part.
        let p = cfg.proc_root.clone();
        if let Ok(scan) =
            tokio::task::spawn_blocking(move || recover::with_owners(&p, tables)).await
        {
            let owners: HashMap<ConnKey, Owner> = scan
                .conns
                .into_iter()
                .filter_map(|c| Some((c.key, c.owner?)))
                .collect();
            for c in &mut plan.add {
                c.owner = owners.get(&c.key).cloned();
            }
        }
    }
    pipeline.send(Input::Reconciled(plan)).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_run_after_losses_with_suspects_and_at_the_full_interval() {
        let t0 = std::time::Instant::now();
        let s = Duration::from_secs(1);
        let mut due = RoundsDue::new(5, 60 * s, t0);
        // Nothing lost, nothing suspect: no round until the full interval.
        assert!(!due.now(5, false, t0 + 4 * s));
        assert!(!due.now(5, false, t0 + 8 * s));
        assert!(due.now(5, false, t0 + 60 * s));
        assert!(!due.now(5, false, t0 + 64 * s));
        // A loss: the next ROUNDS_AFTER_LOSS ticks run, then quiet again.
        assert!(due.now(7, false, t0 + 68 * s));
        assert!(due.now(7, false, t0 + 72 * s));
        assert!(due.now(7, false, t0 + 76 * s));
        assert!(!due.now(7, false, t0 + 80 * s));
        // Suspects keep rounds going until the round that decides them.
        assert!(due.now(7, true, t0 + 84 * s));
        assert!(due.now(7, true, t0 + 88 * s));
        assert!(!due.now(7, false, t0 + 92 * s));
        // The full interval counts from the last round.
        assert!(!due.now(7, false, t0 + 147 * s));
        assert!(due.now(7, false, t0 + 148 * s));
    }
}
