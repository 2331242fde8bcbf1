//! Features that can fall back, and whether each one works on this node.
//!
//! Invariants:
//! - A feature is `Unknown` until the step that provides it has run, then `On`, `Off` (degraded:
//!   something the user can fix; the reason and the fix are kept) or `Unused` (not needed in this
//!   configuration, e.g. conntrack without an identity source).
//! - Turning a feature off logs one WARN line naming what is lost and the fix, and the
//!   `fanout_feature_enabled{feature}` gauge says 0; `On` says 1. `Unknown` and `Unused` export
//!   no series, so a dashboard never shows a degradation that has not been established.
//! - The state is small and written a handful of times (at startup), so one mutex guards it and
//!   nothing else is locked while it is held.

use std::{borrow::Cow, sync::Mutex};

use serde::{Deserialize, Serialize};

/// The features that can fall back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// gRPC requests counted from HTTP/2 frames by the cgroup_skb scanner on the host cgroup2 root.
    H2Requests,
    /// Bytes and messages per connection, from `sock/sock_{send,recv}_length`.
    ByteCounters,
    /// The owning process of accepted sockets: the task of a server end's first read or write
    /// (the length hooks), or where those are missing `syscalls/sys_exit_accept{,4}`.
    AcceptOwner,
    /// Startup recovery reached the network namespace of every process.
    RecoveryNetns,
    /// Owners of recovered connections, from every process's fd table.
    RecoveryOwner,
    /// ClusterIP backends from the node's conntrack table.
    Conntrack,
}

impl Feature {
    pub const ALL: [Feature; 6] = [
        Feature::H2Requests,
        Feature::ByteCounters,
        Feature::AcceptOwner,
        Feature::RecoveryNetns,
        Feature::RecoveryOwner,
        Feature::Conntrack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::H2Requests => "h2_requests",
            Feature::ByteCounters => "byte_counters",
            Feature::AcceptOwner => "accept_owner",
            Feature::RecoveryNetns => "recovery_netns",
            Feature::RecoveryOwner => "recovery_owner",
            Feature::Conntrack => "conntrack",
        }
    }

    /// What users lose while it is off.
    pub fn loss(self) -> &'static str {
        match self {
            Feature::H2Requests => {
                "gRPC requests are estimated from messages sent (over-counted, and dial-per-request \
                 clients can be misjudged)"
            }
            Feature::ByteCounters => {
                "connections carry no byte or message counts, and requests have no stand-in"
            }
            Feature::AcceptOwner => "accepted connections have no owning process",
            Feature::RecoveryNetns => {
                "connections that existed before the daemon started are missing for the pods \
                 whose network namespace could not be read"
            }
            Feature::RecoveryOwner => "recovered connections have no owning process",
            Feature::Conntrack => {
                "connections to ClusterIP services have no backend pod (backend_pod=\"_unknown\")"
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Unknown,
    On,
    Off,
    Unused,
}

/// One feature's status, as `/features` serves it (`exposition::api::FeaturesView`). Decoding
/// requires every field, the `Option`s included.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub feature: Feature,
    pub state: State,
    /// How it works (on) or why it does not (off, unused).
    pub detail: String,
    /// What is lost while it is off ([`Feature::loss`]; owned when decoded from the API).
    #[serde(deserialize_with = "Option::deserialize")]
    pub loss: Option<Cow<'static, str>>,
    /// How to turn it on.
    #[serde(deserialize_with = "Option::deserialize")]
    pub fix: Option<String>,
}

/// The features of this daemon.
pub struct Features {
    states: Mutex<Vec<Status>>,
    /// Called with every feature whose state became known, to update the gauge.
    on_change: Box<dyn Fn(Feature, Option<bool>) + Send + Sync>,
}

impl Default for Features {
    fn default() -> Self {
        Features::new(|_, _| {})
    }
}

impl Features {
    pub fn new(on_change: impl Fn(Feature, Option<bool>) + Send + Sync + 'static) -> Self {
        Features {
            states: Mutex::new(
                Feature::ALL
                    .iter()
                    .map(|&feature| Status {
                        feature,
                        state: State::Unknown,
                        detail: "not determined yet".into(),
                        loss: None,
                        fix: None,
                    })
                    .collect(),
            ),
            on_change: Box::new(on_change),
        }
    }

    fn set(&self, status: Status) {
        let gauge = match status.state {
            State::On => Some(true),
            State::Off => Some(false),
            State::Unknown | State::Unused => None,
        };
        let feature = status.feature;
        {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = states.iter_mut().find(|s| s.feature == feature) {
                *s = status;
            }
        }
        (self.on_change)(feature, gauge);
    }

    pub fn on(&self, feature: Feature, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(feature = feature.name(), %detail, "feature on");
        self.set(Status {
            feature,
            state: State::On,
            detail,
            loss: None,
            fix: None,
        });
    }

    /// Degraded: logs a WARN naming the loss and the fix.
    pub fn off(&self, feature: Feature, reason: impl Into<String>, fix: impl Into<String>) {
        let (reason, fix) = (reason.into(), fix.into());
        tracing::warn!(
            feature = feature.name(),
            %reason,
            loss = feature.loss(),
            %fix,
            "feature off: {}",
            feature.name()
        );
        self.set(Status {
            feature,
            state: State::Off,
            detail: reason,
            loss: Some(Cow::Borrowed(feature.loss())),
            fix: Some(fix),
        });
    }

    /// Not needed in this configuration; no series is exported.
    pub fn unused(&self, feature: Feature, why: impl Into<String>) {
        let detail = why.into();
        tracing::info!(feature = feature.name(), %detail, "feature not used");
        self.set(Status {
            feature,
            state: State::Unused,
            detail,
            loss: None,
            fix: None,
        });
    }

    pub fn snapshot(&self) -> Vec<Status> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn state(&self, feature: Feature) -> State {
        self.snapshot()
            .into_iter()
            .find(|s| s.feature == feature)
            .map(|s| s.state)
            .unwrap_or(State::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn states_reach_the_gauge_only_once_known() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let f = Features::new(move |feature, v| s.lock().unwrap().push((feature, v)));
        assert!(f.snapshot().iter().all(|s| s.state == State::Unknown));
        f.on(Feature::ByteCounters, "tracepoint");
        f.off(
            Feature::H2Requests,
            "no cgroup2",
            "mount the host's /sys/fs/cgroup",
        );
        f.unused(Feature::Conntrack, "no identity source");
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (Feature::ByteCounters, Some(true)),
                (Feature::H2Requests, Some(false)),
                (Feature::Conntrack, None),
            ]
        );
        let h2 = f
            .snapshot()
            .into_iter()
            .find(|s| s.feature == Feature::H2Requests)
            .unwrap();
        assert_eq!(h2.state, State::Off);
        assert_eq!(h2.fix.as_deref(), Some("mount the host's /sys/fs/cgroup"));
        assert!(h2.loss.is_some());
        assert_eq!(f.state(Feature::Conntrack), State::Unused);
        let names: std::collections::HashSet<_> = Feature::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), Feature::ALL.len());
    }
}
