//! The load-balancing verdict: which client behaviour the figures of one (client pod, service)
//! show, with the reason in words.
//!
//! Rules, checked in this order; the first that matches wins:
//!
//! 1. `insufficient_data` when the key was observed for less than `min_observation` (default: one
//!    window), or fewer than `min_requests` requests fell in the window.
//! 2. `dial_per_request` when opens per request >= `dial_opens_per_request` and the mean lifetime
//!    of the window's connections is < `short_lifetime`. When some requests come from messages
//!    (TLS or another protocol the scanner cannot read), a "request" is a message and a TLS call
//!    alone is about six (the handshake's records), so opens per request says nothing: then the
//!    connection level decides, `dial_min_opens` or more opens in the window whose connections
//!    live < `short_lifetime` on average. A TLS client gets the verdict of its h2c twin. It comes first because it is independent
//!    of where the requests went: a client that dials per call is even across backends (kube-proxy
//!    spreads connections), and if it always lands on one backend the handshake cost is still the
//!    problem to report. Server-side MaxConnectionAge rotation is not this: its connections are
//!    long-lived and carry many requests each, so both conditions fail.
//! 3. `insufficient_data` when fewer than `min_requests` requests have a known backend (conntrack
//!    has not resolved the backend), or when fewer than 2 backends are ready: with 0 ready (or
//!    readiness unknown) or 1 ready backend the policies cannot be told apart.
//! 4. `pick_first` when one backend took >= `pick_first_share` of the requests with a known
//!    backend and its connections are long-lived: their mean lifetime (live ones counted at their
//!    age) is at least `short_lifetime`. It comes before `stale_resolver` because a pinned client
//!    also leaves the other ready backends unconnected: one backend taking everything is the
//!    stronger explanation. (A round_robin client that only ever resolved one pod looks the same.)
//! 5. `stale_resolver` when at least one ready backend has been unconnected (no live connection, no
//!    traffic) for longer than `stale_after` (default: one window) while other backends took
//!    requests.
//! 6. `round_robin` when coverage >= `round_robin_coverage`, skew <= `round_robin_max_skew` and
//!    connections are reused (opens per request < `dial_opens_per_request`).
//! 7. Otherwise `insufficient_data`, the reason quoting the figures that fit no pattern (for
//!    example a new backend that is not yet unconnected for a whole window).
//!
//! Every verdict but `round_robin` and `insufficient_data` comes with advice ([`advise`]): the
//! change that fixes it, naming the service's headless twin when the inventory has one. The
//! reason ends with it too, so that a log line or an alert carries the fix.

use std::{fmt, time::Duration};

use serde::{Deserialize, Serialize};

use super::Balance;
use crate::conntable::RequestSource;

/// What a client does with the backends of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Pins one backend over a long-lived connection.
    PickFirst,
    /// One reused connection per backend, requests spread evenly.
    RoundRobin,
    /// A new connection (and handshake) for each call.
    DialPerRequest,
    /// Spreads over the backends it resolved, but never learnt about ready backends added later.
    StaleResolver,
    /// Too few requests, too short an observation, or figures that fit no pattern.
    InsufficientData,
}

impl Verdict {
    /// Every verdict, for metrics that export one series per value.
    pub const ALL: [Verdict; 5] = [
        Verdict::PickFirst,
        Verdict::RoundRobin,
        Verdict::DialPerRequest,
        Verdict::StaleResolver,
        Verdict::InsufficientData,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::PickFirst => "pick_first",
            Verdict::RoundRobin => "round_robin",
            Verdict::DialPerRequest => "dial_per_request",
            Verdict::StaleResolver => "stale_resolver",
            Verdict::InsufficientData => "insufficient_data",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every threshold the rules use.
#[derive(Clone, Debug, PartialEq)]
pub struct Thresholds {
    /// Fewer requests in the window than this is `insufficient_data`.
    pub min_requests: u64,
    /// A key observed for less than this is `insufficient_data`. None: one window.
    pub min_observation: Option<Duration>,
    /// `pick_first`: the share of requests the top backend takes (with >= 2 ready backends).
    pub pick_first_share: f64,
    /// `round_robin`: the least coverage (connected ready backends / ready backends).
    pub round_robin_coverage: f64,
    /// `round_robin`: the largest skew (top backend share / fair share).
    pub round_robin_max_skew: f64,
    /// `dial_per_request`: the least opens per request. Below it, connections count as reused.
    pub dial_opens_per_request: f64,
    /// `dial_per_request` when requests come from messages (TLS): the least opens in the window.
    pub dial_min_opens: u64,
    /// Mean connection lifetime below which connections are short (`dial_per_request`); at or
    /// above it they are long-lived (`pick_first`).
    pub short_lifetime: Duration,
    /// `stale_resolver`: how long a ready backend must have been unconnected. None: one window.
    pub stale_after: Option<Duration>,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_requests: 20,
            min_observation: None,
            pick_first_share: 0.9,
            round_robin_coverage: 0.8,
            round_robin_max_skew: 1.5,
            dial_opens_per_request: 0.5,
            dial_min_opens: 10,
            short_lifetime: Duration::from_secs(1),
            stale_after: None,
        }
    }
}

/// Classifies the figures of one key. `window` is the configured window length.
pub fn classify(b: &Balance, th: &Thresholds, window: Duration) -> (Verdict, String) {
    use Verdict::*;
    let min_obs = th.min_observation.unwrap_or(window).as_secs_f64();
    if b.observed_seconds < min_obs {
        return (
            InsufficientData,
            format!(
                "observed for {} so far, less than the {} needed",
                secs(b.observed_seconds),
                secs(min_obs)
            ),
        );
    }
    if b.requests < th.min_requests {
        return (
            InsufficientData,
            format!(
                "only {} request(s) in the last {} (at least {} needed)",
                b.requests,
                secs(b.span_seconds),
                th.min_requests
            ),
        );
    }
    let short = th.short_lifetime.as_secs_f64();
    if b.source == Some(RequestSource::Messages)
        && let Some(life) = b.mean_lifetime_seconds
        && b.opens >= th.dial_min_opens
        && life < short
    {
        return (
            DialPerRequest,
            format!(
                "{} connection(s) opened in the last {}, living {} on average (under {}), across \
                 {} backend(s); requests are estimated from messages ({} sent: TLS or not \
                 HTTP/2), so the opens and lifetimes decide",
                b.opens,
                secs(b.span_seconds),
                secs(life),
                secs(short),
                b.connected,
                b.requests
            ),
        );
    }
    if let (Some(opr), Some(life)) = (b.opens_per_request, b.mean_lifetime_seconds)
        && b.source != Some(RequestSource::Messages)
        && opr >= th.dial_opens_per_request
        && life < short
    {
        return (
            DialPerRequest,
            format!(
                "{} connection(s) opened for {} requests ({:.2} per request), living {} on \
                 average (under {}), across {} backend(s)",
                b.opens,
                b.requests,
                opr,
                secs(life),
                secs(short),
                b.connected
            ),
        );
    }
    let attributed = b.requests.saturating_sub(b.requests_unattributed);
    if attributed < th.min_requests {
        return (
            InsufficientData,
            format!(
                "the backend of {} of {} requests is unknown (conntrack not resolved yet)",
                b.requests_unattributed, b.requests
            ),
        );
    }
    if b.ready < 2 {
        let what = if b.ready == 0 {
            "no ready backends are known for the service".to_string()
        } else {
            "only 1 backend is ready".to_string()
        };
        return (
            InsufficientData,
            format!(
                "{what}: balancing policies cannot be told apart ({} requests to {} connected \
                 backend(s))",
                b.requests, b.connected
            ),
        );
    }
    if let Some(top) = b.top_backend()
        && let (Some(share), Some(life)) = (top.share, top.mean_lifetime_seconds)
        && share >= th.pick_first_share
        && life >= short
    {
        return (
            PickFirst,
            format!(
                "one backend ({}) took {} of {} requests over {} connection(s) living {} on \
                 average while {} backends are ready",
                top.name,
                pct(share),
                attributed,
                top.connections,
                secs(life),
                b.ready
            ),
        );
    }
    let stale_after = th.stale_after.unwrap_or(window).as_secs_f64();
    let stale: Vec<_> = b
        .backends
        .iter()
        .filter(|x| x.ready && !x.connected)
        .filter(|x| x.unconnected_seconds.is_some_and(|s| s > stale_after))
        .collect();
    let serving: Vec<_> = b.backends.iter().filter(|x| x.requests > 0).collect();
    if !stale.is_empty() && !serving.is_empty() {
        let names: Vec<&str> = stale.iter().map(|x| x.name.as_str()).collect();
        let since = stale
            .iter()
            .filter_map(|x| x.unconnected_seconds)
            .fold(f64::INFINITY, f64::min);
        return (
            StaleResolver,
            format!(
                "{} of {} ready backends ({}) have had no connection for at least {} (longer \
                 than {}) while {} other backend(s) took {} requests: the client has not \
                 re-resolved since they became ready (it re-resolves only when a connection drops)",
                stale.len(),
                b.ready,
                names.join(", "),
                secs(since),
                secs(stale_after),
                serving.len(),
                attributed
            ),
        );
    }
    let opr = b.opens_per_request.unwrap_or(0.0);
    if let (Some(cov), Some(skew)) = (b.coverage, b.skew)
        && cov >= th.round_robin_coverage
        && skew <= th.round_robin_max_skew
        && opr < th.dial_opens_per_request
    {
        let ports = if b.ports_stable {
            "the same local ports at both ends of the window".to_string()
        } else {
            match b.mean_lifetime_seconds {
                Some(l) => format!("connections rotating but living {} on average", secs(l)),
                None => "reused connections".to_string(),
            }
        };
        return (
            RoundRobin,
            format!(
                "{} of {} ready backends connected (coverage {}), skew {:.2} over {} requests on \
                 {} connection(s) ({:.3} opens per request), {}",
                b.connected_ready,
                b.ready,
                pct(cov),
                skew,
                attributed,
                b.connections,
                opr,
                ports
            ),
        );
    }
    (
        InsufficientData,
        format!(
            "the figures fit no pattern yet: coverage {}, skew {}, {:.3} opens per request, \
             {} of {} ready backends connected",
            b.coverage.map_or_else(|| "n/a".into(), pct),
            b.skew.map_or_else(|| "n/a".into(), |s| format!("{s:.2}")),
            opr,
            b.connected_ready,
            b.ready
        ),
    )
}

/// What the analyzer knows about the service a key's client calls, for the advice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceFacts {
    /// The service has no cluster IP: clients resolve its pods themselves.
    pub headless: bool,
    /// For a ClusterIP service: a headless service of the same namespace with the same backend
    /// pods, the target a client should resolve instead.
    pub headless_twin: Option<String>,
}

/// The fix for a verdict, in words; None for `round_robin` (nothing to fix) and
/// `insufficient_data` (nothing known yet).
pub fn advise(verdict: Verdict, b: &Balance, facts: &ServiceFacts) -> Option<String> {
    let (ns, name) = (&b.service.namespace, &b.service.name);
    let target = match (&facts.headless_twin, facts.headless) {
        (_, true) => format!("`dns:///{name}.{ns}.svc.cluster.local:<port>`"),
        (Some(twin), false) => {
            format!("the headless service {twin} (`dns:///{twin}.{ns}.svc.cluster.local:<port>`)")
        }
        (None, false) => format!(
            "a headless service (clusterIP: None) with the same selector as {name} (there is \
             none yet), as `dns:///<name>.{ns}.svc.cluster.local:<port>`"
        ),
    };
    let round_robin = "the round_robin policy in the channel's service config \
                       (`{\"loadBalancingConfig\": [{\"round_robin\": {}}]}`)";
    let cluster_ip = if facts.headless {
        String::new()
    } else {
        format!("{name} is a ClusterIP service, which balances connections, not calls. ")
    };
    match verdict {
        Verdict::PickFirst => Some(format!(
            "{cluster_ip}Dial {target} with {round_robin}: the client then holds one connection \
             per ready pod and spreads its calls over them. Keep one pooled channel per target."
        )),
        Verdict::DialPerRequest => Some(format!(
            "Create one channel per target when the client starts and reuse it for every call: \
             a channel per call pays a TCP (and TLS) handshake per request. {cluster_ip}Dial \
             {target} with {round_robin} so that the one channel spreads its calls."
        )),
        Verdict::StaleResolver => Some(
            "The client resolved the service once and re-resolves only when a connection drops: \
             set MaxConnectionAge on the servers (for example 30 s, with a grace period) so that \
             connections rotate and clients re-resolve, or use a resolver that watches the \
             cluster (xDS, or one that follows EndpointSlices)."
                .to_string(),
        ),
        Verdict::RoundRobin | Verdict::InsufficientData => None,
    }
}

/// A share as a whole percentage ("97%").
pub fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Seconds in words: "20 ms", "2.5 s", "29 s".
pub fn secs(s: f64) -> String {
    if !s.is_finite() {
        "n/a".into()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else if s < 10.0 {
        format!("{s:.1} s")
    } else {
        format!("{s:.0} s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_snake_case_and_all_is_complete() {
        let names: Vec<&str> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            names,
            [
                "pick_first",
                "round_robin",
                "dial_per_request",
                "stale_resolver",
                "insufficient_data"
            ]
        );
        for v in Verdict::ALL {
            assert_eq!(
                serde_json::to_value(v).unwrap(),
                serde_json::Value::String(v.as_str().into())
            );
        }
    }

    #[test]
    fn seconds_read_naturally() {
        assert_eq!(secs(0.02), "20 ms");
        assert_eq!(secs(2.5), "2.5 s");
        assert_eq!(secs(29.4), "29 s");
        assert_eq!(secs(f64::NAN), "n/a");
    }
}
