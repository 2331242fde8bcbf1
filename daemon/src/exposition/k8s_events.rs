//! Kubernetes Events for verdict regressions: when a client workload's verdict for a service
//! gets worse, a Warning Event `BalanceRegressed` on the client pod that brought it says what
//! changed and what the pod ran before and after, where `kubectl describe pod` and every event
//! pipeline see it.
//!
//! Invariants: the pipeline never waits on the API server. It hands regressions over a bounded
//! queue ([`crate::pipeline::REGRESSION_EVENTS_QUEUE`]) and counts what does not fit
//! (`fanout_regression_events_dropped_total`); this task writes them one at a time and counts the
//! results (`fanout_regression_events_total{result}`). It needs `create` on `events` in the API
//! group `events.k8s.io`, and nothing else.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::{
    analysis::regress::Regression,
    exposition::metrics::{Metrics, ResultLabels},
    identity::Identity,
};

/// The Event's reason.
pub const REASON: &str = "BalanceRegressed";
/// events.k8s.io limits an Event's note to 1 kB.
const NOTE_MAX: usize = 1024;

/// The Event for a regression, and the pod it is about (uid when the inventory knows it).
pub fn event_of(r: &Regression, uid: Option<String>) -> (Event, ObjectReference) {
    let mut note = r.describe();
    if note.len() > NOTE_MAX {
        let mut cut = NOTE_MAX;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let ev = Event {
        type_: EventType::Warning,
        reason: REASON.into(),
        note: Some(note),
        action: "EvaluateBalance".into(),
        secondary: None,
    };
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        namespace: Some(r.pod.namespace.clone()),
        name: Some(r.pod.name.clone()),
        uid,
        ..ObjectReference::default()
    };
    (ev, reference)
}

/// Writes every regression that arrives as an Event, until the queue closes.
pub async fn run(
    client: kube::Client,
    node: Option<String>,
    identity: Arc<Identity>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Regression>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "fanout".into(),
            instance: node,
        },
    );
    while let Some(r) = rx.recv().await {
        let uid = identity
            .snapshot()
            .pod(&r.pod.namespace, &r.pod.name)
            .map(|p| p.uid.clone())
            .filter(|u| !u.is_empty());
        let (ev, reference) = event_of(&r, uid);
        let result = match recorder.publish(&ev, &reference).await {
            Ok(()) => "ok",
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    pod = %r.pod,
                    "could not write the BalanceRegressed Event (the ClusterRole needs create on \
                     events.k8s.io/events)"
                );
                "error"
            }
        };
        metrics
            .regression_events
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::Verdict;
    use crate::identity::model::ObjectRef;

    #[test]
    fn the_event_names_the_pod_and_the_change() {
        let r = Regression {
            at_unix_seconds: 1,
            namespace: "shop".into(),
            workload: "Deployment/cart".into(),
            service: ObjectRef::new("shop", "pricing"),
            from: Verdict::RoundRobin,
            to: Verdict::PickFirst,
            pod: ObjectRef::new("shop", "cart-7d9f-abcde"),
            version_before: Some("shop/cart:1.4".into()),
            version_after: Some("x".repeat(2000)),
        };
        let (ev, reference) = event_of(&r, Some("uid-1".into()));
        assert_eq!(ev.reason, REASON);
        assert!(matches!(ev.type_, EventType::Warning));
        let note = ev.note.expect("note");
        assert_eq!(note.len(), NOTE_MAX, "truncated to the API's limit");
        assert!(
            note.starts_with("shop/Deployment/cart now pick_first"),
            "{note}"
        );
        assert_eq!(reference.kind.as_deref(), Some("Pod"));
        assert_eq!(reference.name.as_deref(), Some("cart-7d9f-abcde"));
        assert_eq!(reference.uid.as_deref(), Some("uid-1"));
    }
}
