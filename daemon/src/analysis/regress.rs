//! Verdict history per client workload and service: a rollout that silently turns a balancing
//! client into a pinned one (a wrong image reverting to pick_first) shows up as a counted change.
//!
//! Invariants:
//! - Keyed by the client's workload (Deployment, StatefulSet, ...; the pod itself when it has
//!   none) and the service, not by pod: a rollout replaces every pod, so per-pod history would
//!   never see the change.
//! - A workload's verdict is the worst decisive verdict among its pods at one evaluation
//!   (round_robin is best, then stale_resolver, then pick_first and dial_per_request).
//!   `insufficient_data` is never a verdict here: pods still warming up or idle do not count.
//!   So a rollout to a bad image is counted as soon as its first pod is judged, and a rollout to a
//!   good image once the last bad pod is gone.
//! - The first decisive verdict of a workload is remembered, not counted. Memory is bounded: at
//!   most `cap` workloads, and one not judged for `forget` is dropped (the least recently judged
//!   goes first when the cap is reached).

use std::collections::HashMap;

use super::{Nanos, Verdict};
use crate::identity::model::ObjectRef;

/// A client workload calling a service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    pub namespace: String,
    /// `Kind/name`, e.g. `Deployment/checkout`.
    pub workload: String,
    pub service: ObjectRef,
}

/// A counted change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerdictChange {
    pub key: WorkloadKey,
    pub from: Verdict,
    pub to: Verdict,
}

impl VerdictChange {
    /// From a better verdict to a worse one.
    pub fn is_regression(&self) -> bool {
        rank(self.to) < rank(self.from)
    }
}

/// Higher is better; None for `insufficient_data`.
pub fn rank(v: Verdict) -> Option<u8> {
    match v {
        Verdict::RoundRobin => Some(3),
        Verdict::StaleResolver => Some(2),
        Verdict::PickFirst | Verdict::DialPerRequest => Some(1),
        Verdict::InsufficientData => None,
    }
}

/// The worst of a workload's pods' decisive verdicts (pick_first before dial_per_request on a
/// tie, so the result does not depend on pod order).
pub fn worst(verdicts: impl IntoIterator<Item = Verdict>) -> Option<Verdict> {
    verdicts
        .into_iter()
        .filter(|v| rank(*v).is_some())
        .min_by_key(|v| (rank(*v), *v != Verdict::PickFirst))
}

struct Remembered {
    verdict: Verdict,
    seen: Nanos,
}

pub struct VerdictHistory {
    last: HashMap<WorkloadKey, Remembered>,
    cap: usize,
    forget: Nanos,
}

impl VerdictHistory {
    pub fn new(cap: usize, forget: std::time::Duration) -> Self {
        VerdictHistory {
            last: HashMap::new(),
            cap: cap.max(1),
            forget: forget.as_nanos().try_into().unwrap_or(Nanos::MAX),
        }
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Feeds one evaluation: every client pod's verdict with its workload key. Returns the
    /// changes, in key order.
    pub fn observe(
        &mut self,
        verdicts: impl IntoIterator<Item = (WorkloadKey, Verdict)>,
        now: Nanos,
    ) -> Vec<VerdictChange> {
        let mut per: HashMap<WorkloadKey, Vec<Verdict>> = HashMap::new();
        for (k, v) in verdicts {
            per.entry(k).or_default().push(v);
        }
        let mut changes = Vec::new();
        for (key, vs) in per {
            let Some(now_verdict) = worst(vs) else {
                continue;
            };
            match self.last.get_mut(&key) {
                Some(r) => {
                    if r.verdict != now_verdict {
                        changes.push(VerdictChange {
                            key: key.clone(),
                            from: r.verdict,
                            to: now_verdict,
                        });
                        r.verdict = now_verdict;
                    }
                    r.seen = now;
                }
                None => {
                    if self.last.len() >= self.cap
                        && let Some(oldest) = self
                            .last
                            .iter()
                            .min_by_key(|(k, r)| (r.seen, (*k).clone()))
                            .map(|(k, _)| k.clone())
                    {
                        self.last.remove(&oldest);
                    }
                    self.last.insert(
                        key,
                        Remembered {
                            verdict: now_verdict,
                            seen: now,
                        },
                    );
                }
            }
        }
        let forget = self.forget;
        self.last
            .retain(|_, r| now.saturating_sub(r.seen) <= forget);
        changes.sort_by(|a, b| a.key.cmp(&b.key));
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const S: Nanos = 1_000_000_000;

    fn key(workload: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: "shop".into(),
            workload: workload.into(),
            service: ObjectRef::new("shop", "pricing"),
        }
    }

    #[test]
    fn a_rollout_to_a_pinning_image_is_one_regression() {
        let mut h = VerdictHistory::new(100, Duration::from_secs(3600));
        let co = key("Deployment/checkout");
        // Two balancing pods: remembered, nothing counted.
        assert!(
            h.observe(
                [
                    (co.clone(), Verdict::RoundRobin),
                    (co.clone(), Verdict::RoundRobin)
                ],
                S
            )
            .is_empty()
        );
        // The new pod is still warming up: nothing changes.
        assert!(
            h.observe(
                [
                    (co.clone(), Verdict::RoundRobin),
                    (co.clone(), Verdict::InsufficientData)
                ],
                2 * S
            )
            .is_empty()
        );
        // The new pod pins one backend: counted once, while old pods still balance.
        let c = h.observe(
            [
                (co.clone(), Verdict::RoundRobin),
                (co.clone(), Verdict::PickFirst),
            ],
            3 * S,
        );
        assert_eq!(
            c,
            vec![VerdictChange {
                key: co.clone(),
                from: Verdict::RoundRobin,
                to: Verdict::PickFirst
            }]
        );
        assert!(c[0].is_regression());
        // Old pods gone, only pinned pods left: no further change.
        assert!(
            h.observe([(co.clone(), Verdict::PickFirst)], 4 * S)
                .is_empty()
        );
        // The fix rolls out: counted once the last pinned pod is gone, and not a regression.
        assert!(
            h.observe(
                [
                    (co.clone(), Verdict::PickFirst),
                    (co.clone(), Verdict::RoundRobin)
                ],
                5 * S
            )
            .is_empty()
        );
        let c = h.observe([(co.clone(), Verdict::RoundRobin)], 6 * S);
        assert_eq!(c.len(), 1);
        assert!(!c[0].is_regression());
    }

    #[test]
    fn workloads_are_separate_and_memory_is_bounded() {
        let mut h = VerdictHistory::new(2, Duration::from_secs(10));
        h.observe([(key("a"), Verdict::RoundRobin)], S);
        h.observe([(key("b"), Verdict::PickFirst)], 2 * S);
        // A third workload evicts the least recently judged (a).
        h.observe([(key("c"), Verdict::RoundRobin)], 3 * S);
        assert_eq!(h.len(), 2);
        // a is new again: remembered, not counted.
        assert!(
            h.observe([(key("a"), Verdict::PickFirst)], 4 * S)
                .is_empty()
        );
        // Workloads not judged for longer than `forget` are dropped.
        h.observe([(key("a"), Verdict::PickFirst)], 30 * S);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn worst_is_deterministic_and_ignores_insufficient_data() {
        assert_eq!(
            worst([Verdict::DialPerRequest, Verdict::PickFirst]),
            Some(Verdict::PickFirst)
        );
        assert_eq!(
            worst([Verdict::PickFirst, Verdict::DialPerRequest]),
            Some(Verdict::PickFirst)
        );
        assert_eq!(
            worst([Verdict::RoundRobin, Verdict::StaleResolver]),
            Some(Verdict::StaleResolver)
        );
        assert_eq!(worst([Verdict::InsufficientData]), None);
    }
}
