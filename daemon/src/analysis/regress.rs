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
//! - [`Observed`] also says which workloads got a (new) remembered verdict and which were
//!   forgotten, so that the exporter can create the counters of every possible regression at 0
//!   ahead of time (a counter born at 1 hides its first increase from `increase()`) and drop them
//!   with the workload.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

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

/// Verdicts ranked below `v`: the regressions possible from it.
pub fn worse_than(v: Verdict) -> impl Iterator<Item = Verdict> {
    Verdict::ALL
        .into_iter()
        .filter(move |w| matches!((rank(*w), rank(v)), (Some(a), Some(b)) if a < b))
}

/// What one evaluation changed.
#[derive(Debug, Default, PartialEq)]
pub struct Observed {
    /// Counted changes, in key order.
    pub changes: Vec<VerdictChange>,
    /// Workloads whose remembered verdict was set (first seen) or changed, with it.
    pub remembered: Vec<(WorkloadKey, Verdict)>,
    /// Workloads dropped from memory.
    pub forgotten: Vec<WorkloadKey>,
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

    /// Feeds one evaluation: every client pod's verdict with its workload key.
    pub fn observe(
        &mut self,
        verdicts: impl IntoIterator<Item = (WorkloadKey, Verdict)>,
        now: Nanos,
    ) -> Observed {
        let mut per: HashMap<WorkloadKey, Vec<Verdict>> = HashMap::new();
        for (k, v) in verdicts {
            per.entry(k).or_default().push(v);
        }
        let mut out = Observed::default();
        let changes = &mut out.changes;
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
                        out.remembered.push((key.clone(), now_verdict));
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
                        out.forgotten.push(oldest);
                    }
                    out.remembered.push((key.clone(), now_verdict));
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
        self.last.retain(|k, r| {
            let keep = now.saturating_sub(r.seen) <= forget;
            if !keep {
                out.forgotten.push(k.clone());
            }
            keep
        });
        out.changes.sort_by(|a, b| a.key.cmp(&b.key));
        out.remembered.sort_by(|a, b| a.0.cmp(&b.0));
        out.forgotten.sort();
        out
    }
}

/// One regression as the API and the Kubernetes Event report it: when, what changed, and what
/// the client ran before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Regression {
    /// Unix time, seconds.
    pub at_unix_seconds: u64,
    pub namespace: String,
    /// `Kind/name` of the client workload.
    pub workload: String,
    pub service: ObjectRef,
    pub from: Verdict,
    pub to: Verdict,
    /// The client pod with the worse verdict.
    pub pod: ObjectRef,
    /// What the workload's pods ran at the evaluation before (images or template hash).
    #[serde(deserialize_with = "Option::deserialize")]
    pub version_before: Option<String>,
    /// What the pod with the worse verdict runs.
    #[serde(deserialize_with = "Option::deserialize")]
    pub version_after: Option<String>,
}

impl Regression {
    /// One line for logs and Events.
    pub fn describe(&self) -> String {
        let v = |x: &Option<String>| x.clone().unwrap_or_else(|| "unknown".into());
        let changed = if self.version_before == self.version_after {
            format!("it still runs {}", v(&self.version_after))
        } else {
            format!(
                "it ran {} and now runs {}",
                v(&self.version_before),
                v(&self.version_after)
            )
        };
        format!(
            "{}/{} now {} for service {}/{} (was {}), first seen on pod {}: {changed}",
            self.namespace,
            self.workload,
            self.to,
            self.service.namespace,
            self.service.name,
            self.from,
            self.pod.name
        )
    }
}

/// The recent regressions (at most `cap`, newest last) and what each workload ran at its last
/// evaluation, which is the "before" of its next regression.
pub struct Regressions {
    recent: VecDeque<Regression>,
    cap: usize,
    versions: HashMap<WorkloadKey, Option<String>>,
}

/// One judged pod for [`Regressions::observe`]: its workload key, verdict, name and version.
pub struct Judged {
    pub key: WorkloadKey,
    pub verdict: Verdict,
    pub pod: ObjectRef,
    pub version: Option<String>,
}

impl Regressions {
    pub fn new(cap: usize) -> Self {
        Regressions {
            recent: VecDeque::new(),
            cap: cap.max(1),
            versions: HashMap::new(),
        }
    }

    /// After [`VerdictHistory::observe`] of the same evaluation: turns its regressions into
    /// reports (returned, and kept), then remembers every judged workload's version and forgets
    /// the forgotten ones.
    pub fn observe(
        &mut self,
        judged: &[Judged],
        observed: &Observed,
        at_unix: u64,
    ) -> Vec<Regression> {
        let mut out = Vec::new();
        for c in observed.changes.iter().filter(|c| c.is_regression()) {
            // The pod that brought the worse verdict (the first by name on a tie).
            let culprit = judged
                .iter()
                .filter(|j| j.key == c.key && j.verdict == c.to)
                .min_by(|a, b| a.pod.cmp(&b.pod));
            let r = Regression {
                at_unix_seconds: at_unix,
                namespace: c.key.namespace.clone(),
                workload: c.key.workload.clone(),
                service: c.key.service.clone(),
                from: c.from,
                to: c.to,
                pod: culprit.map_or_else(
                    || ObjectRef::new(&c.key.namespace, "unknown"),
                    |j| j.pod.clone(),
                ),
                version_before: self.versions.get(&c.key).cloned().flatten(),
                version_after: culprit.and_then(|j| j.version.clone()),
            };
            out.push(r.clone());
            if self.recent.len() >= self.cap {
                self.recent.pop_front();
            }
            self.recent.push_back(r);
        }
        // A workload's version: that of its pods with a decisive verdict (the first by name).
        let mut now: HashMap<&WorkloadKey, &Judged> = HashMap::new();
        for j in judged.iter().filter(|j| rank(j.verdict).is_some()) {
            let e = now.entry(&j.key).or_insert(j);
            if j.pod < e.pod {
                *e = j;
            }
        }
        for (k, j) in now {
            self.versions.insert(k.clone(), j.version.clone());
        }
        for k in &observed.forgotten {
            self.versions.remove(k);
        }
        out
    }

    /// The kept regressions, newest last.
    pub fn recent(&self) -> Vec<Regression> {
        self.recent.iter().cloned().collect()
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
        let rr = Verdict::RoundRobin;
        let pf = Verdict::PickFirst;
        // Two balancing pods: remembered (so its regressions can be exported at 0), not counted.
        let o = h.observe([(co.clone(), rr), (co.clone(), rr)], S);
        assert!(o.changes.is_empty());
        assert_eq!(o.remembered, vec![(co.clone(), rr)]);
        // The new pod is still warming up: nothing changes.
        let o = h.observe(
            [(co.clone(), rr), (co.clone(), Verdict::InsufficientData)],
            2 * S,
        );
        assert_eq!(o, Observed::default());
        // The new pod pins one backend: counted once, while old pods still balance.
        let o = h.observe([(co.clone(), rr), (co.clone(), pf)], 3 * S);
        assert_eq!(
            o.changes,
            vec![VerdictChange {
                key: co.clone(),
                from: rr,
                to: pf
            }]
        );
        assert!(o.changes[0].is_regression());
        assert_eq!(o.remembered, vec![(co.clone(), pf)]);
        // Old pods gone, only pinned pods left: no further change.
        assert!(h.observe([(co.clone(), pf)], 4 * S).changes.is_empty());
        // The fix rolls out: counted once the last pinned pod is gone, and not a regression.
        assert!(
            h.observe([(co.clone(), pf), (co.clone(), rr)], 5 * S)
                .changes
                .is_empty()
        );
        let o = h.observe([(co.clone(), rr)], 6 * S);
        assert_eq!(o.changes.len(), 1);
        assert!(!o.changes[0].is_regression());
    }

    #[test]
    fn workloads_are_separate_and_memory_is_bounded() {
        let mut h = VerdictHistory::new(2, Duration::from_secs(10));
        h.observe([(key("a"), Verdict::RoundRobin)], S);
        h.observe([(key("b"), Verdict::PickFirst)], 2 * S);
        // A third workload evicts the least recently judged (a).
        let o = h.observe([(key("c"), Verdict::RoundRobin)], 3 * S);
        assert_eq!(o.forgotten, vec![key("a")]);
        assert_eq!(h.len(), 2);
        // a is new again: remembered, not counted.
        let o = h.observe([(key("a"), Verdict::PickFirst)], 4 * S);
        assert!(o.changes.is_empty());
        assert_eq!(o.remembered, vec![(key("a"), Verdict::PickFirst)]);
        // Workloads not judged for longer than `forget` are dropped, and said so.
        let o = h.observe([(key("a"), Verdict::PickFirst)], 30 * S);
        assert_eq!(o.forgotten, vec![key("c")]);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn the_regressions_possible_from_each_verdict() {
        let w = |v| worse_than(v).collect::<Vec<_>>();
        assert_eq!(
            w(Verdict::RoundRobin),
            vec![
                Verdict::PickFirst,
                Verdict::DialPerRequest,
                Verdict::StaleResolver
            ]
        );
        assert_eq!(
            w(Verdict::StaleResolver),
            vec![Verdict::PickFirst, Verdict::DialPerRequest]
        );
        assert!(w(Verdict::PickFirst).is_empty() && w(Verdict::DialPerRequest).is_empty());
        assert!(w(Verdict::InsufficientData).is_empty());
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

    #[test]
    fn a_regression_names_the_pod_and_the_versions_before_and_after() {
        let mut h = VerdictHistory::new(100, Duration::from_secs(3600));
        let mut r = Regressions::new(2);
        let co = key("Deployment/checkout");
        let judged = |pod: &str, v: Verdict, version: &str| Judged {
            key: co.clone(),
            verdict: v,
            pod: ObjectRef::new("shop", pod),
            version: Some(version.into()),
        };
        let eval = |h: &mut VerdictHistory, r: &mut Regressions, js: Vec<Judged>, t: Nanos| {
            let o = h.observe(js.iter().map(|j| (j.key.clone(), j.verdict)), t);
            r.observe(&js, &o, t / S)
        };
        let rr = Verdict::RoundRobin;
        assert!(
            eval(
                &mut h,
                &mut r,
                vec![judged("checkout-a", rr, "shop/checkout:1.4")],
                S
            )
            .is_empty()
        );
        // The rollout: a new pod on 1.5 pins one backend while the old one still balances.
        let got = eval(
            &mut h,
            &mut r,
            vec![
                judged("checkout-a", rr, "shop/checkout:1.4"),
                judged("checkout-b", Verdict::PickFirst, "shop/checkout:1.5"),
            ],
            10 * S,
        );
        assert_eq!(got.len(), 1);
        let g = &got[0];
        assert_eq!(
            (g.from, g.to, g.at_unix_seconds),
            (rr, Verdict::PickFirst, 10)
        );
        assert_eq!(g.pod.name, "checkout-b");
        assert_eq!(g.version_before.as_deref(), Some("shop/checkout:1.4"));
        assert_eq!(g.version_after.as_deref(), Some("shop/checkout:1.5"));
        assert_eq!(
            g.describe(),
            "shop/Deployment/checkout now pick_first for service shop/pricing (was round_robin), \
             first seen on pod checkout-b: it ran shop/checkout:1.4 and now runs shop/checkout:1.5"
        );
        // Staying bad is no new regression; the list is bounded.
        assert!(
            eval(
                &mut h,
                &mut r,
                vec![judged(
                    "checkout-b",
                    Verdict::PickFirst,
                    "shop/checkout:1.5"
                )],
                20 * S
            )
            .is_empty()
        );
        assert_eq!(r.recent().len(), 1);
    }
}
