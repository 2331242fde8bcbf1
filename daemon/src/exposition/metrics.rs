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

use crate::conntable::Change;
use crate::event::kind_name;

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
pub struct BuildLabels {
    pub version: &'static str,
    pub hooks: String,
}

pub struct Metrics {
    pub registry: Registry,
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
    /// Kernel loss totals last read, to turn them into counter increments.
    kernel_lost_seen: [AtomicU64; fanout_common::LostReason::COUNT as usize],
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
            "fanout_connections_opened",
            "TCP connections that established, by direction",
            opened.clone(),
        );
        let closed = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "fanout_connections_closed",
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
            "fanout_connections_active",
            "TCP connections currently in the connection table",
            active.clone(),
        );
        let duration = Histogram::new(exponential_buckets(0.001, 4.0, 12));
        registry.register(
            "fanout_connection_duration_seconds",
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
            "fanout_connections_recovered",
            "Connections found at startup that predate the daemon",
            recovered.clone(),
        );
        let build_info = Family::default();
        registry.register(
            "fanout_build_info",
            "Version and active hooks",
            build_info.clone(),
        );
        Metrics {
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
        }
    }

    /// Records what one applied event did.
    pub fn observe(&self, kind: fanout_common::RecordKind, change: &Change) {
        self.records
            .get_or_create(&KindLabels {
                kind: kind_name(kind),
            })
            .inc();
        match change {
            Change::Opened(conn) => {
                self.opened
                    .get_or_create(&DirectionLabels {
                        direction: conn.direction.as_str(),
                    })
                    .inc();
            }
            Change::Closed { conn, duration } => {
                self.closed
                    .get_or_create(&DirectionLabels {
                        direction: conn.direction.as_str(),
                    })
                    .inc();
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
        use std::sync::atomic::Ordering;
        for &(reason, total) in totals {
            let seen = &self.kernel_lost_seen[reason as usize];
            let before = seen.swap(total, Ordering::Relaxed);
            if total > before {
                self.lost
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc_by(total - before);
            } else {
                // Make the series exist (at 0) so that alerts on it have something to read.
                let _ = self.lost.get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                });
            }
        }
    }

    pub fn lost_user(&self, reason: &'static str) {
        self.lost.get_or_create(&ReasonLabels { reason }).inc();
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
    }
}
