//! The kernel side's housekeeping, once a second: loss counters, skipped program runs, kernel
//! logs, and counter samples of the connections the analyzer follows.
//!
//! Invariants: this task alone owns the [`Probe`] (the kernel maps and programs); it asks the
//! pipeline which connections to sample and sends the samples back, so the pipeline never makes
//! a system call for a map. One lookup per connection: the socket's entry carries its counters
//! and, for a client end the HTTP/2 scanner follows, the scanner's figure (which the scanner
//! mirrors there from the state it keeps with the socket). Outbound connections are read (the
//! clients' side, whose request figures matter live), and inbound ones until their owner is
//! known (the kernel names it at their first read or write); inbound ones get their final figures
//! from the close record.

use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::{Handle, Input, Query, Sample, TICK};
use crate::{
    conntable::{Direction, requests_figure},
    event::{Counters, Owner},
    exposition::metrics::Metrics,
    identity::kube::KubeStats,
    probe::Probe,
};

/// Runs until `stop` turns true.
pub async fn run(
    probe: Arc<Mutex<Probe>>,
    pipeline: Handle,
    metrics: Arc<Metrics>,
    kube: Option<Arc<KubeStats>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if let Some(k) = &kube {
            metrics.set_kube_stats(k);
        }
        let Some(tracked) = pipeline.ask(|reply| Query::Tracked { reply }).await else {
            return;
        };
        let p = probe.clone();
        let m = metrics.clone();
        let samples = tokio::task::spawn_blocking(move || {
            let Ok(mut p) = p.lock() else {
                return Vec::new();
            };
            p.flush_logs();
            m.set_program_misses(&p.program_misses());
            match p.lost() {
                Ok(totals) => m.set_kernel_lost(&totals),
                Err(e) => tracing::warn!(error = %e, "reading loss counters"),
            }
            tracked
                .iter()
                .filter_map(|t| {
                    let st = p.sock_state(t.sock)?;
                    let counters = Counters::from(&st);
                    let requests = (t.direction == Direction::Outbound)
                        .then(|| requests_figure(&st, &counters));
                    Some(Sample {
                        key: t.key,
                        sock: t.sock,
                        counters,
                        requests,
                        owner: Owner::of_state(&st),
                    })
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        if !samples.is_empty() && !pipeline.send(Input::Samples(samples)).await {
            return;
        }
    }
}
