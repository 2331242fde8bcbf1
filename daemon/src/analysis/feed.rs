//! What the daemon feeds the analyzer: its connections, seen through identity, as analyzer
//! inputs. Only connections this node's pods dialled to a service count (each node exports its
//! own pods as clients).

use super::{ConnId, ConnOpen, Counters, Nanos};
use crate::{
    conntable::{self, Conn, Direction},
    event,
    identity::{Identity, attribution::LocalEnd, model::Inventory, model::ObjectRef},
};

/// The analyzer's id of a connection: its kernel socket address (unique among live sockets).
pub fn conn_id(conn: &Conn) -> Option<ConnId> {
    (conn.sock != 0).then_some(ConnId(conn.sock))
}

/// The analyzer input for a connection a local pod dialled to a service, if it is one.
pub fn open_of(
    identity: &Identity,
    inv: &Inventory,
    conn: &Conn,
    at: Nanos,
    recovered: bool,
) -> Option<ConnOpen> {
    if conn.direction != Direction::Outbound {
        return None;
    }
    let id = conn_id(conn)?;
    // Most connections reach no service: say so before attributing (which copies names).
    let remote = conn.key.remote;
    if inv.service_by_cluster_addr(remote).is_none() && inv.services_by_endpoint(remote).is_empty()
    {
        return None;
    }
    let at_ = identity.attribute(inv, conn);
    let LocalEnd::Pod(client) = &at_.local else {
        return None;
    };
    let service = at_.service()?;
    Some(ConnOpen {
        id,
        client: client.id(),
        service: ObjectRef::new(&service.namespace, &service.name),
        backend: at_.peer_pod().map(|p| p.id()),
        local_port: conn.key.local.port(),
        at,
        recovered,
    })
}

/// The backend pod of a connection, once known (for ClusterIP connections, after conntrack).
pub fn backend_of(identity: &Identity, inv: &Inventory, conn: &Conn) -> Option<ObjectRef> {
    identity.attribute(inv, conn).peer_pod().map(|p| p.id())
}

/// A sample of a connection's counters for the analyzer.
pub fn counters_of(c: &event::Counters, r: &conntable::Requests) -> Counters {
    Counters {
        bytes_sent: c.bytes_sent,
        bytes_received: c.bytes_recv,
        messages_sent: c.msgs_sent,
        messages_received: c.msgs_recv,
        requests: r.count,
        source: r.source,
    }
}

/// Every service with its ready backend pods (distinct), from the inventory.
pub fn ready_backends(inv: &Inventory) -> Vec<(ObjectRef, Vec<ObjectRef>)> {
    inv.services()
        .iter()
        .map(|s| {
            let mut pods: Vec<ObjectRef> = s
                .endpoints
                .iter()
                .filter(|e| e.ready)
                .filter_map(|e| e.pod.clone())
                .collect();
            pods.sort();
            pods.dedup();
            (s.id(), pods)
        })
        .collect()
}

/// Every service with what the advice needs: headless or not, and for a ClusterIP service its
/// headless twin (a headless service of the same namespace whose backend pods are the same, the
/// first by name if several).
pub fn service_facts(inv: &Inventory) -> Vec<(ObjectRef, super::ServiceFacts)> {
    let pods = |s: &crate::identity::model::Service| -> Vec<ObjectRef> {
        let mut v: Vec<ObjectRef> = s.endpoints.iter().filter_map(|e| e.pod.clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let services = inv.services();
    services
        .iter()
        .map(|s| {
            let headless = s.headless();
            let twin = if headless {
                None
            } else {
                let mine = pods(s);
                services
                    .iter()
                    .filter(|t| t.headless() && t.namespace == s.namespace)
                    .filter(|t| !mine.is_empty() && pods(t) == mine)
                    .map(|t| t.name.clone())
                    .min()
            };
            (
                s.id(),
                super::ServiceFacts {
                    headless,
                    headless_twin: twin,
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conntable::{ConnKey, Origin, RequestSource, Requests},
        identity::model::tests::{pod, service},
    };
    use std::sync::Arc;

    fn conn(local: &str, remote: &str, direction: Direction) -> Conn {
        Conn {
            key: ConnKey {
                netns: 1,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
            },
            direction,
            origin: Origin::Traced,
            sock: 0xabc,
            owner: None,
            opened_ns: Some(5),
            backend: None,
            counters: Default::default(),
            requests: None,
        }
    }

    fn setup() -> (Identity, Arc<Inventory>) {
        let inv = Arc::new(Inventory::new(
            vec![
                pod("shop", "client", "10.244.0.2"),
                pod("shop", "b1", "10.244.0.3"),
                pod("shop", "b2", "10.244.0.4"),
            ],
            vec![service(
                "shop",
                "api",
                Some("10.96.0.10"),
                &[("b1", "10.244.0.3"), ("b2", "10.244.0.4")],
            )],
        ));
        let id = Identity::default();
        id.replace(inv.clone());
        (id, inv)
    }

    #[test]
    fn only_local_pods_dialling_a_service_are_fed() {
        let (id, inv) = setup();
        let out = conn("10.244.0.2:40000", "10.96.0.10:80", Direction::Outbound);
        let open = open_of(&id, &inv, &out, 7, false).expect("client → service");
        assert_eq!(open.client, ObjectRef::new("shop", "client"));
        assert_eq!(open.service, ObjectRef::new("shop", "api"));
        assert_eq!((open.backend, open.local_port, open.at), (None, 40000, 7));
        let mut resolved = out.clone();
        resolved.backend = Some("10.244.0.4:8080".parse().unwrap());
        assert_eq!(
            backend_of(&id, &inv, &resolved),
            Some(ObjectRef::new("shop", "b2"))
        );
        let inbound = conn("10.244.0.3:8080", "10.244.0.2:40000", Direction::Inbound);
        assert!(open_of(&id, &inv, &inbound, 7, false).is_none());
        let external = conn("10.244.0.2:40000", "203.0.113.1:443", Direction::Outbound);
        assert!(open_of(&id, &inv, &external, 7, false).is_none());
    }

    #[test]
    fn samples_and_ready_backends() {
        let (_, inv) = setup();
        let c = counters_of(
            &event::Counters {
                bytes_sent: 1,
                bytes_recv: 2,
                msgs_sent: 3,
                msgs_recv: 4,
            },
            &Requests {
                count: 9,
                source: RequestSource::Messages,
                unparsable: Some("tls"),
            },
        );
        assert_eq!((c.requests, c.source), (9, RequestSource::Messages));
        assert_eq!((c.bytes_received, c.messages_sent), (2, 3));
        let ready = ready_backends(&inv);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].1.len(), 2);
    }

    #[test]
    fn a_cluster_ip_service_learns_its_headless_twin() {
        let b = [("b1", "10.244.0.3"), ("b2", "10.244.0.4")];
        let inv = Inventory::new(
            vec![
                pod("shop", "b1", "10.244.0.3"),
                pod("shop", "b2", "10.244.0.4"),
            ],
            vec![
                service("shop", "api", Some("10.96.0.10"), &b),
                service("shop", "api-headless", None, &b),
                // Same pods, other namespace: not a twin.
                service("other", "api-headless", None, &b),
                // Headless over one of the two pods: not a twin either.
                service("shop", "api-one", None, &b[..1]),
            ],
        );
        let facts: std::collections::BTreeMap<ObjectRef, super::super::ServiceFacts> =
            service_facts(&inv).into_iter().collect();
        let api = &facts[&ObjectRef::new("shop", "api")];
        assert_eq!(
            (api.headless, api.headless_twin.as_deref()),
            (false, Some("api-headless"))
        );
        let twin = &facts[&ObjectRef::new("shop", "api-headless")];
        assert_eq!((twin.headless, twin.headless_twin.as_deref()), (true, None));
    }
}
