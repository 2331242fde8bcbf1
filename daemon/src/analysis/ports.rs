//! The headless port gotcha: a client that dials a service's pods directly (a headless service,
//! or pod IPs it resolved some other way) on the service's `port` while the pods listen on its
//! `targetPort` gets refused connections, and nothing in the balance shows why.
//!
//! Detection: a failed connect whose remote address is a pod that backs a service, on a port
//! none of that pod's endpoints serve but that is one of the service's `port`s. Failed connects
//! to a port a pod does serve (a pod not listening yet, a crash) are something else and are not
//! reported here.
//!
//! Invariants: [`PortGotchas`] holds at most `cap` (client, service, port) entries; a new one over
//! the cap replaces the entry seen least recently, so the metric's series stay bounded too. An
//! entry idle for [`PortGotchas::IDLE`] is dropped by [`PortGotchas::gc`].

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::Nanos;
use crate::identity::model::{Inventory, ObjectRef};

/// How many (client, service, port) entries are kept (and metric series made) by default.
pub const DEFAULT_CAP: usize = 1000;

/// A service port a client dialled on a backend pod that serves the service on other ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub service: ObjectRef,
    /// The port the client dialled: one of the service's `port`s.
    pub dialled: u16,
    /// The ports the pod serves the service on (its `targetPort`s, resolved).
    pub target_ports: Vec<u16>,
}

/// Whether a failed connect to `remote` is the port gotcha (the first service by name that
/// explains it).
pub fn mismatch(inv: &Inventory, remote: SocketAddr) -> Option<Mismatch> {
    // One index lookup for the common refusal, to no pod at all; the services only after.
    inv.pod_by_ip(remote.ip())?;
    let mut best: Option<Mismatch> = None;
    for s in inv.services() {
        let mut targets: Vec<u16> = s
            .endpoints
            .iter()
            .filter(|e| e.ip == remote.ip())
            .map(|e| e.port)
            .collect();
        if targets.is_empty() || targets.contains(&remote.port()) {
            continue;
        }
        if !s.ports.iter().any(|p| p.port == remote.port()) {
            continue;
        }
        targets.sort_unstable();
        targets.dedup();
        let m = Mismatch {
            service: s.id(),
            dialled: remote.port(),
            target_ports: targets,
        };
        if best.as_ref().is_none_or(|b| m.service < b.service) {
            best = Some(m);
        }
    }
    best
}

/// One client's refused connects on a wrong port of one service, as the API serves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortMismatchView {
    pub service: ObjectRef,
    pub dialled_port: u16,
    pub target_ports: Vec<u16>,
    /// Failed connects since the agent started (or the entry was last dropped).
    pub failed_connects: u64,
    /// Seconds since the last one.
    pub last_seen_seconds_ago: f64,
    /// The fix, in words.
    pub advice: String,
}

/// The fix for a port mismatch.
pub fn port_advice(m: &Mismatch, headless: bool) -> String {
    let targets: Vec<String> = m.target_ports.iter().map(|p| p.to_string()).collect();
    let how = if headless {
        format!(
            "{} is headless: clients connect to the pod IPs themselves, so the service's port \
             is never translated",
            m.service.name
        )
    } else {
        "the client dials the pods directly, so the service's port is never translated".to_string()
    };
    format!(
        "the client dials port {} of {}'s pods, which serve it on {}: {how}. Dial port {} \
         (the targetPort), or make the service's port equal to its targetPort.",
        m.dialled,
        m.service.name,
        targets.join(", "),
        targets.first().map_or("the targetPort", |s| s.as_str()),
    )
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    client: ObjectRef,
    service: ObjectRef,
    dialled: u16,
}

#[derive(Clone, Debug)]
struct Entry {
    target_ports: Vec<u16>,
    count: u64,
    last: Nanos,
    headless: bool,
}

/// Failed connects that were the port gotcha, per (client, service, dialled port).
#[derive(Debug)]
pub struct PortGotchas {
    entries: BTreeMap<Key, Entry>,
    cap: usize,
}

impl PortGotchas {
    /// An entry without a new failed connect for this long is dropped.
    pub const IDLE: Duration = Duration::from_secs(3600);

    pub fn new(cap: usize) -> Self {
        PortGotchas {
            entries: BTreeMap::new(),
            cap: cap.max(1),
        }
    }

    /// Counts one failed connect. Returns the entry evicted to make room, if any (its client,
    /// service and port), so that its metric series can go too.
    pub fn record(
        &mut self,
        client: ObjectRef,
        m: &Mismatch,
        headless: bool,
        now: Nanos,
    ) -> Option<(ObjectRef, ObjectRef, u16)> {
        let key = Key {
            client,
            service: m.service.clone(),
            dialled: m.dialled,
        };
        let mut evicted = None;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.cap {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
                evicted = Some((k.client, k.service, k.dialled));
            }
        }
        let e = self.entries.entry(key).or_insert(Entry {
            target_ports: m.target_ports.clone(),
            count: 0,
            last: now,
            headless,
        });
        e.count += 1;
        e.last = now;
        e.target_ports = m.target_ports.clone();
        e.headless = headless;
        evicted
    }

    /// Drops idle entries; returns them (client, service, port).
    pub fn gc(&mut self, now: Nanos) -> Vec<(ObjectRef, ObjectRef, u16)> {
        let idle = Self::IDLE.as_nanos() as u64;
        let gone: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| now.saturating_sub(e.last) > idle)
            .map(|(k, _)| k.clone())
            .collect();
        gone.into_iter()
            .map(|k| {
                self.entries.remove(&k);
                (k.client, k.service, k.dialled)
            })
            .collect()
    }

    /// A client's entries, by service and port.
    pub fn of_client(&self, client: &ObjectRef, now: Nanos) -> Vec<PortMismatchView> {
        self.entries
            .iter()
            .filter(|(k, _)| &k.client == client)
            .map(|(k, e)| {
                let m = Mismatch {
                    service: k.service.clone(),
                    dialled: k.dialled,
                    target_ports: e.target_ports.clone(),
                };
                PortMismatchView {
                    service: k.service.clone(),
                    dialled_port: k.dialled,
                    target_ports: e.target_ports.clone(),
                    failed_connects: e.count,
                    last_seen_seconds_ago: now.saturating_sub(e.last) as f64 / 1e9,
                    advice: port_advice(&m, e.headless),
                }
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::model::tests::{pod, service};

    fn inv() -> Inventory {
        // `service` makes endpoints on port 8080 for a service port 80.
        Inventory::new(
            vec![
                pod("shop", "b1", "10.244.0.3"),
                pod("shop", "b2", "10.244.0.4"),
            ],
            vec![
                service(
                    "shop",
                    "api",
                    None,
                    &[("b1", "10.244.0.3"), ("b2", "10.244.0.4")],
                ),
                service("shop", "lone", None, &[("b2", "10.244.0.4")]),
            ],
        )
    }

    #[test]
    fn the_service_port_on_a_pod_ip_is_the_gotcha() {
        let inv = inv();
        let svc = &inv.services()[0];
        assert_eq!(svc.ports[0].port, 80, "the fixture's service port");
        let m = mismatch(&inv, "10.244.0.3:80".parse().unwrap()).expect("gotcha");
        assert_eq!(
            m,
            Mismatch {
                service: ObjectRef::new("shop", "api"),
                dialled: 80,
                target_ports: vec![8080],
            }
        );
        // The first service by name explains a pod that backs two.
        let m = mismatch(&inv, "10.244.0.4:80".parse().unwrap()).expect("gotcha");
        assert_eq!(m.service, ObjectRef::new("shop", "api"));
        let advice = port_advice(&m, true);
        assert!(
            advice.contains("Dial port 8080 (the targetPort)"),
            "{advice}"
        );
        assert!(advice.contains("api is headless"), "{advice}");
    }

    #[test]
    fn other_refusals_are_not_the_gotcha() {
        let inv = inv();
        // The target port itself: the pod is not listening (yet); another story.
        assert_eq!(mismatch(&inv, "10.244.0.3:8080".parse().unwrap()), None);
        // A port that is no service port.
        assert_eq!(mismatch(&inv, "10.244.0.3:9".parse().unwrap()), None);
        // Not a backend pod.
        assert_eq!(mismatch(&inv, "10.244.9.9:80".parse().unwrap()), None);
    }

    #[test]
    fn entries_are_counted_capped_and_aged_out() {
        let inv = inv();
        let m = mismatch(&inv, "10.244.0.3:80".parse().unwrap()).unwrap();
        let c1 = ObjectRef::new("shop", "c1");
        let c2 = ObjectRef::new("shop", "c2");
        let mut g = PortGotchas::new(1);
        assert_eq!(g.record(c1.clone(), &m, true, 1), None);
        assert_eq!(g.record(c1.clone(), &m, true, 2), None);
        let v = g.of_client(&c1, 2_000_000_002);
        assert_eq!(
            (v.len(), v[0].failed_connects, v[0].dialled_port),
            (1, 2, 80)
        );
        assert!((v[0].last_seen_seconds_ago - 2.0).abs() < 1e-9);
        // Over the cap, the least recent entry goes.
        assert_eq!(
            g.record(c2.clone(), &m, true, 3),
            Some((c1.clone(), m.service.clone(), 80))
        );
        assert!(g.of_client(&c1, 3).is_empty());
        let idle = PortGotchas::IDLE.as_nanos() as u64;
        assert_eq!(g.gc(3 + idle), vec![]);
        assert_eq!(g.gc(4 + idle), vec![(c2, m.service.clone(), 80)]);
        assert!(g.is_empty());
    }
}
