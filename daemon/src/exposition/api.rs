//! The JSON API's response types: what [`super::http`] serves and what its clients (`fanout
//! verify`) decode. One set for both sides, so a field renamed on one side breaks the build or the
//! decode instead of reading as 0.
//!
//! Compatibility rules, for these types and the domain types they embed ([`Balance`],
//! [`Attribution`], [`Status`], ...):
//! * Unknown fields are ignored when decoding (no `deny_unknown_fields`): a client reads an agent
//!   that added fields.
//! * Every field the agent always sends is required, `Option`s included: serde would read a
//!   missing `Option` as `None`, so those carry `#[serde(deserialize_with = "Option::deserialize")]`.
//!   A missing or renamed field is a decode error. Only a field added later carries
//!   `#[serde(default)]`, and its documentation says what the default means.
//! * Enums (verdicts, directions, feature states) are their snake_case names. An unknown name is a
//!   decode error: a client cannot judge a verdict it does not know.

use serde::{Deserialize, Serialize};

use crate::analysis::{Balance, Verdict};
use crate::conntable::{Conn, Direction, Origin, RequestSource, Requests};
use crate::event::{Counters, Owner};
use crate::features::Status;
use crate::identity::attribution::{Attribution, Peer};
use crate::identity::model::ObjectRef;

/// Seconds since a connection established (`opened_ns`), when the tracer saw it open.
fn age_seconds(c: &Conn, now_ns: u64) -> Option<f64> {
    c.opened_ns.map(|t| now_ns.saturating_sub(t) as f64 / 1e9)
}

/// The body of every error answer (`400`, `404`, `500`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, in words.
    pub error: String,
}

impl ApiError {
    pub fn new(error: impl Into<String>) -> Self {
        ApiError {
            error: error.into(),
        }
    }
}

/// `GET /features`: every feature that can fall back, and whether it works on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturesView {
    pub features: Vec<Status>,
}

/// `GET /services/{namespace}/{name}/balance`: the service's balance per client pod this agent
/// sees, over the analysis window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceBalanceView {
    pub service: ObjectRef,
    /// One per client pod of this node that called the service (none: no traffic seen).
    pub clients: Vec<Balance>,
}

/// The requests sent on a connection, with where the figure comes from
/// ([`crate::conntable::Requests`], which borrows its `unparsable` reason).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRequests {
    pub count: u64,
    /// `h2` (HTTP/2 streams) or `messages` (messages sent stand in).
    pub source: RequestSource,
    /// Why HTTP/2 was not parsable, when the source is `messages` and the scanner said why.
    #[serde(deserialize_with = "Option::deserialize")]
    pub unparsable: Option<String>,
}

impl From<Requests> for ConnRequests {
    fn from(r: Requests) -> Self {
        ConnRequests {
            count: r.count,
            source: r.source,
            unparsable: r.unparsable.map(str::to_string),
        }
    }
}

/// One connection of the live table, as `GET /connections` serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnView {
    /// Inode of the connection's network namespace.
    pub netns: u32,
    /// `IP:port` of this end.
    pub local: String,
    /// `IP:port` of the other end.
    pub remote: String,
    pub direction: Direction,
    /// `traced` (seen opening) or `recovered` (found at startup).
    pub origin: Origin,
    /// The process that owns the socket, when known.
    #[serde(deserialize_with = "Option::deserialize")]
    pub owner: Option<Owner>,
    /// Seconds since the connection established, when the tracer saw it open.
    #[serde(deserialize_with = "Option::deserialize")]
    pub age_seconds: Option<f64>,
    /// Which pod this end is and what the peer is (pod, service with backend, node, external).
    pub identity: Attribution,
    /// Payload bytes and send/receive calls, counted in the kernel.
    pub counters: Counters,
    /// Requests sent (outbound connections), with their source: `h2` or `messages`.
    #[serde(deserialize_with = "Option::deserialize")]
    pub requests: Option<ConnRequests>,
}

impl ConnView {
    /// `c` as of `now_ns` (CLOCK_MONOTONIC), with its attribution.
    pub fn new(c: &Conn, now_ns: u64, identity: Attribution) -> Self {
        ConnView {
            netns: c.key.netns,
            local: c.key.local.to_string(),
            remote: c.key.remote.to_string(),
            direction: c.direction,
            origin: c.origin,
            owner: c.owner,
            age_seconds: age_seconds(c, now_ns),
            identity,
            counters: c.counters,
            requests: c.requests.map(ConnRequests::from),
        }
    }
}

/// `GET /connections`: one page of the live table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionsPage {
    pub connections: Vec<ConnView>,
    /// The cursor of the next page (`/connections?after=NEXT`); `None` on the last page.
    #[serde(deserialize_with = "Option::deserialize")]
    pub next: Option<String>,
    /// Connections that match the query, on every page.
    pub total: usize,
}

/// `GET /regressions`: the recent changes of a client workload's verdict for a service to a worse
/// one, newest last, with what the client ran before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegressionsView {
    pub regressions: Vec<crate::analysis::regress::Regression>,
}

/// `GET /pods/{namespace}/{name}/peers`: every peer of a pod with its connections, and the
/// balance verdict per service the pod calls.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodPeersView {
    pub pod: ObjectRef,
    pub peers: Vec<PeerView>,
    pub services: Vec<ServiceVerdict>,
    /// Refused connects of this pod to a service's pods on a port they do not serve, with the
    /// fix. Empty from an agent that does not send it.
    #[serde(default)]
    pub port_mismatches: Vec<crate::analysis::ports::PortMismatchView>,
}

/// One peer of a pod (pod, service, node, loopback or external) at one remote address.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerView {
    pub peer: Peer,
    /// The other end: `IP:port` as dialled for the pod's outbound connections; the `IP` alone for
    /// its inbound ones, whose remote ports are the clients' ephemeral ports (grouped by those, a
    /// server would list one peer per connection). Each connection carries its `remote_port`.
    pub remote: String,
    pub connections: Vec<PeerConn>,
    /// Connections to this peer in all; `connections` may list fewer. `0` from an agent that does
    /// not send it, which listed them all: read it through [`PeerView::total`].
    #[serde(default)]
    pub connections_total: usize,
}

impl PeerView {
    /// What a connection's peer entry is called: see [`PeerView::remote`].
    pub fn remote_of(c: &Conn) -> String {
        match c.direction {
            Direction::Inbound => c.key.remote.ip().to_string(),
            _ => c.key.remote.to_string(),
        }
    }

    /// A peer with all its connections listed.
    pub fn new(peer: Peer, remote: String, connections: Vec<PeerConn>) -> Self {
        PeerView {
            peer,
            remote,
            connections_total: connections.len(),
            connections,
        }
    }

    /// Lists one more connection, counted in `connections_total`.
    pub fn push(&mut self, conn: PeerConn) {
        self.connections.push(conn);
        self.connections_total += 1;
    }

    /// Connections to this peer in all, listed or not.
    pub fn total(&self) -> usize {
        self.connections_total.max(self.connections.len())
    }
}

/// One connection of a [`PeerView`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PeerConn {
    pub local_port: u16,
    /// The other end's port. `0` from an agent that does not send it.
    #[serde(default)]
    pub remote_port: u16,
    pub direction: Direction,
    /// `established`: the table holds live connections only.
    pub state: String,
    pub origin: Origin,
    /// Seconds since the connection established, when the tracer saw it open.
    #[serde(deserialize_with = "Option::deserialize")]
    pub age_seconds: Option<f64>,
    pub counters: Counters,
    /// Requests sent (outbound connections), with their source.
    #[serde(deserialize_with = "Option::deserialize")]
    pub requests: Option<ConnRequests>,
}

impl PeerConn {
    /// `c` as of `now_ns` (CLOCK_MONOTONIC).
    pub fn new(c: &Conn, now_ns: u64) -> Self {
        PeerConn {
            local_port: c.key.local.port(),
            remote_port: c.key.remote.port(),
            direction: c.direction,
            state: "established".into(),
            origin: c.origin,
            age_seconds: age_seconds(c, now_ns),
            counters: c.counters,
            requests: c.requests.map(ConnRequests::from),
        }
    }
}

/// The verdict on one service a pod calls: the headline figures of its [`Balance`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceVerdict {
    pub service: ObjectRef,
    pub verdict: Verdict,
    /// The verdict's reason, in words (ending with the advice when there is one).
    pub reason: String,
    /// The fix for the verdict; `None` for round_robin and insufficient_data.
    #[serde(deserialize_with = "Option::deserialize")]
    pub advice: Option<String>,
    /// Ready backends of the service.
    pub ready: usize,
    /// Backends connected in the window (fan-out).
    pub connected: usize,
    /// Ready backends connected / ready backends; `None` when none is ready.
    #[serde(deserialize_with = "Option::deserialize")]
    pub coverage: Option<f64>,
    /// Largest backend share / fair share; `None` without a request with a known backend.
    #[serde(deserialize_with = "Option::deserialize")]
    pub skew: Option<f64>,
    pub requests_per_backend: std::collections::BTreeMap<String, u64>,
}

impl From<&Balance> for ServiceVerdict {
    fn from(b: &Balance) -> Self {
        ServiceVerdict {
            service: b.service.clone(),
            verdict: b.verdict,
            reason: b.reason.clone(),
            advice: b.advice.clone(),
            ready: b.ready,
            connected: b.connected,
            coverage: b.coverage,
            skew: b.skew,
            requests_per_backend: b.requests_per_backend.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::*;
    use crate::analysis::{AnalysisConfig, Analyzer, ConnId, ConnOpen, Nanos};
    use crate::conntable::ConnKey;
    use crate::features::{Feature, Features};
    use crate::identity::attribution::{LocalEnd, PodRef, ServiceRef};
    use crate::identity::model::Workload;

    const S: Nanos = 1_000_000_000;

    fn svc() -> ObjectRef {
        ObjectRef::new("shop", "api")
    }

    fn counters(requests: u64) -> crate::analysis::Counters {
        crate::analysis::Counters {
            bytes_sent: requests * 100,
            bytes_received: requests * 300,
            messages_sent: requests,
            messages_received: requests,
            requests,
            source: RequestSource::H2,
        }
    }

    /// Balances from the real analyzer: `spread` holds one connection to each of 3 ready backends
    /// and rotates one; `pinned` holds one connection to api-1 only (pick_first: coverage 1/3).
    fn balances() -> Vec<Balance> {
        let mut a = Analyzer::new(AnalysisConfig::default()).expect("analyzer");
        let backends = (1..=3).map(|i| ObjectRef::new("shop", format!("api-{i}")));
        a.set_ready_backends(&svc(), backends, 0);
        let mut open = |id: u64, client: &str, backend: &str, port: u16, at: Nanos| {
            assert!(a.on_open(ConnOpen {
                id: ConnId(id),
                client: ObjectRef::new("shop", client),
                service: svc(),
                backend: Some(ObjectRef::new("shop", backend)),
                local_port: port,
                at,
                recovered: false,
            }));
        };
        for (id, b) in [(1, "api-1"), (2, "api-2"), (3, "api-3")] {
            open(id, "spread", b, 40000 + id as u16, S);
        }
        open(4, "pinned", "api-1", 41001, S);
        open(5, "spread", "api-3", 40005, 20 * S);
        for t in 2..=40 {
            for id in 1..=3 {
                assert!(a.on_sample(ConnId(id), t * S, &counters(t * 7 + id)));
            }
            assert!(a.on_sample(ConnId(4), t * S, &counters(t * 21)));
        }
        assert!(a.on_sample(ConnId(5), 21 * S, &counters(3)));
        assert!(a.on_close(ConnId(5), 25 * S, Some(Duration::from_secs(5))));
        let mut out = a.evaluate(40 * S);
        out.sort_by(|x, y| x.client.cmp(&y.client));
        assert_eq!(
            out.iter().map(|b| b.verdict).collect::<Vec<_>>(),
            [Verdict::PickFirst, Verdict::RoundRobin]
        );
        out
    }

    fn pod_ref(name: &str) -> PodRef {
        PodRef {
            namespace: "shop".into(),
            name: name.into(),
            workload: Workload {
                kind: "Deployment".into(),
                name: name
                    .trim_end_matches(|c: char| c == '-' || c.is_ascii_digit())
                    .into(),
            },
        }
    }

    fn api_service() -> ServiceRef {
        ServiceRef {
            namespace: "shop".into(),
            name: "api".into(),
            port: 8080,
            port_name: Some("grpc".into()),
            headless: false,
        }
    }

    fn conn(local: &str, remote: &str, opened_ns: Option<u64>, requests: Option<Requests>) -> Conn {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        Conn {
            key: ConnKey {
                netns: 4026531840,
                local: addr(local),
                remote: addr(remote),
            },
            direction: Direction::Outbound,
            origin: if opened_ns.is_some() {
                Origin::Traced
            } else {
                Origin::Recovered
            },
            sock: 0xffff_8880_1234_5678,
            owner: Some(Owner {
                pid: 4242,
                tid: 4243,
                comm: "frontend".into(),
            }),
            opened_ns,
            backend: Some(addr("10.0.1.7:8080")),
            counters: Counters {
                bytes_sent: 12_345,
                bytes_recv: 67_890,
                msgs_sent: 150,
                msgs_recv: 149,
            },
            requests,
        }
    }

    fn conns() -> Vec<Conn> {
        vec![
            conn(
                "10.0.0.5:40001",
                "10.96.0.10:8080",
                Some(3 * S),
                Some(Requests {
                    count: 150,
                    source: RequestSource::H2,
                    unparsable: None,
                }),
            ),
            conn(
                "[fd00::5]:40002",
                "[fd00::7]:8080",
                None,
                Some(Requests {
                    count: 150,
                    source: RequestSource::Messages,
                    unparsable: Some("tls"),
                }),
            ),
            conn("10.0.0.5:40003", "93.184.216.34:443", Some(S), None),
        ]
    }

    fn attributions() -> Vec<Attribution> {
        let local = LocalEnd::Pod(pod_ref("frontend-1"));
        vec![
            Attribution {
                local: local.clone(),
                peer: Peer::Service {
                    service: api_service(),
                    backend: Some(pod_ref("api-2")),
                    backend_addr: Some("10.0.1.7:8080".parse().expect("addr")),
                },
            },
            Attribution {
                local: local.clone(),
                peer: Peer::Pod {
                    pod: pod_ref("api-3"),
                    service: None,
                },
            },
            Attribution {
                local: LocalEnd::Node,
                peer: Peer::External,
            },
        ]
    }

    /// Serializes, decodes, and checks the value and its JSON survived.
    fn round_trip<T>(v: &T) -> Value
    where
        T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let text = serde_json::to_string(v).expect("serialize");
        let back: T = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(&back, v);
        assert_eq!(serde_json::to_string(&back).expect("serialize"), text);
        serde_json::from_str(&text).expect("json")
    }

    /// `json` with the key at `path` (object keys, array indices) renamed to `to`.
    fn rename(json: &Value, path: &[&str], to: &str) -> Value {
        let mut json = json.clone();
        let (last, parents) = path.split_last().expect("path");
        let mut at = &mut json;
        for p in parents {
            at = match p.parse::<usize>() {
                Ok(i) => &mut at[i],
                Err(_) => &mut at[*p],
            };
        }
        let obj = at.as_object_mut().expect("object");
        let v = obj.remove(*last).unwrap_or_else(|| panic!("no {last}"));
        obj.insert(to.into(), v);
        json
    }

    fn decode_err<T: DeserializeOwned + std::fmt::Debug>(json: Value) -> String {
        serde_json::from_value::<T>(json)
            .expect_err("must not decode")
            .to_string()
    }

    #[test]
    fn service_balance_round_trips_with_todays_shape() {
        let clients = balances();
        assert!(clients[0].coverage.is_some_and(|c| c < 0.34));
        assert!(clients[1].lifetimes.count > 0, "a closed connection");
        let view = ServiceBalanceView {
            service: svc(),
            clients: clients.clone(),
        };
        let json = round_trip(&view);
        // What http.rs serves today, built with json!.
        assert_eq!(json, json!({"service": svc(), "clients": clients}));
        assert_eq!(json["clients"][0]["verdict"], "pick_first");
        assert_eq!(json["clients"][1]["verdict"], "round_robin");
        // The lifetime bounds are decoded as sent.
        let back: ServiceBalanceView = serde_json::from_value(json).expect("decode");
        assert_eq!(
            *back.clients[1].lifetimes.bounds_seconds,
            crate::analysis::LIFETIME_BOUNDS_SECONDS
        );
    }

    #[test]
    fn verdicts_round_trip_as_snake_case_names() {
        for v in Verdict::ALL {
            let json = serde_json::to_value(v).expect("serialize");
            assert_eq!(json, Value::String(v.as_str().into()));
            assert_eq!(serde_json::from_value::<Verdict>(json).expect("decode"), v);
        }
        let err = serde_json::from_value::<Verdict>(json!("RoundRobin")).expect_err("not snake");
        assert!(err.to_string().contains("unknown variant"), "{err}");
    }

    #[test]
    fn a_missing_or_renamed_required_field_is_an_error() {
        let view = ServiceBalanceView {
            service: svc(),
            clients: balances(),
        };
        let json = serde_json::to_value(&view).expect("json");
        for (path, field) in [
            (&["service"][..], "service"),
            (&["clients"][..], "clients"),
            (&["clients", "1", "ready"][..], "ready"),
            (&["clients", "1", "local_ports_end"][..], "local_ports_end"),
            (&["clients", "1", "verdict"][..], "verdict"),
            // Options too: a renamed `skew` must not read as "no skew".
            (&["clients", "1", "skew"][..], "skew"),
            (&["clients", "1", "coverage"][..], "coverage"),
            (
                &["clients", "1", "backends", "0", "unconnected_seconds"][..],
                "unconnected_seconds",
            ),
            (
                &["clients", "1", "lifetimes", "bounds_seconds"][..],
                "bounds_seconds",
            ),
        ] {
            let renamed = rename(&json, path, &format!("{field}_renamed"));
            let err = decode_err::<ServiceBalanceView>(renamed);
            assert!(
                err.contains(&format!("missing field `{field}`")),
                "{field}: {err}"
            );
        }
        let mut unknown = json.clone();
        unknown["clients"][0]["verdict"] = json!("something_new");
        let err = decode_err::<ServiceBalanceView>(unknown);
        assert!(err.contains("unknown variant `something_new`"), "{err}");

        // Added fields are ignored: a newer agent still decodes.
        let mut newer = json.clone();
        newer["generation"] = json!(7);
        newer["clients"][0]["p99_seconds"] = json!(0.25);
        let back: ServiceBalanceView = serde_json::from_value(newer).expect("forward compatible");
        assert_eq!(back, view);
    }

    #[test]
    fn connections_page_round_trips() {
        let now = 10 * S;
        let page = ConnectionsPage {
            connections: conns()
                .iter()
                .zip(attributions())
                .map(|(c, at)| ConnView::new(c, now, at))
                .collect(),
            next: Some("4026531840/10.0.0.5:40003/93.184.216.34:443".into()),
            total: 7,
        };
        let json = round_trip(&page);
        let first = &json["connections"][0];
        assert_eq!(first["local"], "10.0.0.5:40001");
        assert_eq!(first["direction"], "outbound");
        assert_eq!(first["origin"], "traced");
        assert_eq!(first["age_seconds"], 7.0);
        assert_eq!(
            first["owner"],
            json!({"pid": 4242, "tid": 4243, "comm": "frontend"})
        );
        assert_eq!(first["identity"]["peer"]["kind"], "service");
        assert_eq!(first["identity"]["peer"]["backend"]["name"], "api-2");
        assert_eq!(
            first["requests"],
            json!({"count": 150, "source": "h2", "unparsable": null})
        );
        let second = &json["connections"][1];
        assert_eq!(second["remote"], "[fd00::7]:8080");
        assert_eq!(second["age_seconds"], Value::Null);
        assert_eq!(second["origin"], "recovered");
        // The same JSON as the kernel-side `Requests` it stands for.
        assert_eq!(
            second["requests"],
            serde_json::to_value(conns()[1].requests).expect("json")
        );
        assert_eq!(
            json["connections"][2]["identity"]["local"],
            json!({"kind": "node"})
        );
        assert_eq!(json["connections"][2]["requests"], Value::Null);

        let last = ConnectionsPage {
            next: None,
            ..page.clone()
        };
        assert_eq!(round_trip(&last)["next"], Value::Null);
        let err = decode_err::<ConnectionsPage>(rename(&json, &["next"], "cursor"));
        assert!(err.contains("missing field `next`"), "{err}");
        let err = decode_err::<ConnectionsPage>(rename(
            &json,
            &["connections", "1", "requests", "unparsable"],
            "reason",
        ));
        assert!(err.contains("missing field `unparsable`"), "{err}");
        let err = decode_err::<ConnectionsPage>(rename(
            &json,
            &["connections", "0", "identity", "peer", "backend_addr"],
            "addr",
        ));
        assert!(err.contains("missing field `backend_addr`"), "{err}");
    }

    #[test]
    fn pod_peers_round_trip_with_todays_shape() {
        let now = 10 * S;
        let conns = conns();
        let ats = attributions();
        let peers = vec![
            PeerView::new(
                ats[0].peer.clone(),
                conns[0].key.remote.to_string(),
                vec![PeerConn::new(&conns[0], now)],
            ),
            PeerView::new(
                ats[1].peer.clone(),
                conns[1].key.remote.to_string(),
                vec![PeerConn::new(&conns[1], now)],
            ),
        ];
        let balances = balances();
        let services: Vec<ServiceVerdict> = balances.iter().map(ServiceVerdict::from).collect();
        let view = PodPeersView {
            pod: ObjectRef::new("shop", "frontend-1"),
            peers,
            services,
            port_mismatches: vec![crate::analysis::ports::PortMismatchView {
                service: ObjectRef::new("shop", "pricing-headless"),
                dialled_port: 80,
                target_ports: vec![8080],
                failed_connects: 3,
                last_seen_seconds_ago: 1.5,
                advice: "dial 8080".into(),
            }],
        };
        let mut two = view.peers[0].clone();
        two.push(PeerConn::new(&conns[2], now));
        assert_eq!((two.connections.len(), two.connections_total), (2, 2));
        let json = round_trip(&view);
        assert_eq!(json["peers"][0]["connections_total"], 1);
        let c = &json["peers"][0]["connections"][0];
        assert_eq!(c["local_port"], 40001);
        assert_eq!(c["state"], "established");
        assert_eq!(c["counters"]["bytes_recv"], 67_890);
        // What http.rs builds today with json!.
        for (b, s) in balances
            .iter()
            .zip(json["services"].as_array().expect("services"))
        {
            assert_eq!(
                *s,
                json!({
                    "service": b.service,
                    "verdict": b.verdict,
                    "reason": b.reason,
                    "advice": b.advice,
                    "ready": b.ready,
                    "connected": b.connected,
                    "coverage": b.coverage,
                    "skew": b.skew,
                    "requests_per_backend": b.requests_per_backend,
                })
            );
        }
        assert_eq!(json["services"][0]["verdict"], "pick_first");

        assert_eq!(json["port_mismatches"][0]["target_ports"][0], 8080);
        // `connections_total` and `port_mismatches` are optional (added later); the others are
        // not.
        let mut older = json.clone();
        older["peers"][0]
            .as_object_mut()
            .expect("peer")
            .remove("connections_total");
        older
            .as_object_mut()
            .expect("view")
            .remove("port_mismatches");
        let back: PodPeersView = serde_json::from_value(older).expect("an older agent");
        assert!(back.port_mismatches.is_empty());
        assert_eq!(back.peers[0].connections_total, 0);
        assert_eq!(back.peers[0].total(), 1);
        let err = decode_err::<PodPeersView>(rename(&json, &["services", "1", "skew"], "sk"));
        assert!(err.contains("missing field `skew`"), "{err}");
        let err = decode_err::<PodPeersView>(rename(
            &json,
            &["peers", "0", "connections", "0", "age_seconds"],
            "age",
        ));
        assert!(err.contains("missing field `age_seconds`"), "{err}");
    }

    #[test]
    fn features_and_errors_round_trip() {
        let features = Features::default();
        features.on(
            Feature::H2Requests,
            "the scanner is attached to /sys/fs/cgroup",
        );
        features.off(
            Feature::Conntrack,
            "no CAP_NET_ADMIN",
            "add NET_ADMIN to the container's capabilities",
        );
        features.unused(Feature::RecoveryNetns, "no identity source");
        let view = FeaturesView {
            features: features.snapshot(),
        };
        let json = round_trip(&view);
        let conntrack = json["features"]
            .as_array()
            .expect("features")
            .iter()
            .find(|f| f["feature"] == "conntrack")
            .expect("conntrack");
        assert_eq!(conntrack["state"], "off");
        assert_eq!(conntrack["loss"], Feature::Conntrack.loss());
        assert_eq!(
            conntrack["fix"],
            "add NET_ADMIN to the container's capabilities"
        );
        let i = json["features"]
            .as_array()
            .expect("features")
            .iter()
            .position(|f| f["feature"] == "conntrack")
            .expect("conntrack")
            .to_string();
        let err = decode_err::<FeaturesView>(rename(&json, &["features", &i, "loss"], "lost"));
        assert!(err.contains("missing field `loss`"), "{err}");

        let e = ApiError::new("unknown service shop/nope");
        assert_eq!(
            round_trip(&e),
            json!({"error": "unknown service shop/nope"})
        );
        assert!(serde_json::from_value::<ApiError>(json!({"message": "x"})).is_err());
    }
}
