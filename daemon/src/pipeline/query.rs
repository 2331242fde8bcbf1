//! Answers to the API's questions, built from the pipeline's state with the API types of
//! [`crate::exposition::api`].
//!
//! Invariants: every answer is bounded. `/connections` is a page of at most [`MAX_PAGE`] rows in
//! key order with a cursor; a pod's peers list at most `limit` connections per peer with the
//! total; only the analyzer keys an answer needs are evaluated, and a pod's rows are found through
//! its network namespace, not by scanning the table.

use std::collections::hash_map::Entry;

use crate::{
    analysis::{Analyzer, Nanos},
    conntable::{Conn, ConnKey, ConnTable},
    exposition::api,
    identity::{
        Identity,
        attribution::{LocalEnd, Peer},
        model::ObjectRef,
    },
    keyed::Map,
};

/// Rows per `/connections` page by default, and at most.
pub const DEFAULT_PAGE: usize = 1000;
pub const MAX_PAGE: usize = 10_000;
/// Connections listed per peer of a pod by default.
pub const DEFAULT_PEER_CONNECTIONS: usize = 100;

/// Which rows `/connections` returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnFilter {
    pub netns: Option<u32>,
    /// Rows after this key (the previous page's cursor).
    pub after: Option<ConnKey>,
    pub limit: usize,
}

/// A page cursor: the last key of the page, as text (`netns/local/remote`).
pub fn cursor(key: &ConnKey) -> String {
    format!("{}/{}/{}", key.netns, key.local, key.remote)
}

/// Parses a [`cursor`].
pub fn parse_cursor(s: &str) -> Option<ConnKey> {
    let mut it = s.splitn(3, '/');
    Some(ConnKey {
        netns: it.next()?.parse().ok()?,
        local: it.next()?.parse().ok()?,
        remote: it.next()?.parse().ok()?,
    })
}

/// One page of the table.
pub fn connections(
    table: &ConnTable,
    identity: &Identity,
    filter: &ConnFilter,
    now: Nanos,
) -> api::ConnectionsPage {
    let limit = filter.limit.clamp(1, MAX_PAGE);
    let rows: Box<dyn Iterator<Item = &Conn>> = match filter.netns {
        Some(n) => Box::new(table.in_netns(n)),
        None => Box::new(table.iter()),
    };
    let mut keys: Vec<&Conn> = rows.collect();
    let total = keys.len();
    keys.sort_unstable_by_key(|c| c.key);
    let start = filter
        .after
        .map_or(0, |a| keys.partition_point(|c| c.key <= a));
    let page: Vec<&Conn> = keys.iter().skip(start).take(limit).copied().collect();
    let next = (start + page.len() < total)
        .then(|| page.last().map(|c| cursor(&c.key)))
        .flatten();
    let inv = identity.snapshot();
    api::ConnectionsPage {
        connections: page
            .into_iter()
            .map(|c| api::ConnView::new(c, now, identity.attribute(&inv, c)))
            .collect(),
        next,
        total,
    }
}

/// A service's balance per client pod; None when the service is neither known nor called.
pub fn service_balance(
    analyzer: &Analyzer,
    identity: &Identity,
    service: ObjectRef,
    now: Nanos,
) -> Option<api::ServiceBalanceView> {
    let known = identity
        .snapshot()
        .service(&service.namespace, &service.name)
        .is_some();
    let clients = analyzer.evaluate_where(now, |_, s| *s == service);
    (known || !clients.is_empty()).then_some(api::ServiceBalanceView { service, clients })
}

/// Every peer of a pod with its connections (at most `limit` per peer), and its verdict per
/// service; None when the pod is unknown.
pub fn pod_peers(
    table: &ConnTable,
    analyzer: &Analyzer,
    identity: &Identity,
    pod: ObjectRef,
    limit: usize,
    now: Nanos,
) -> Option<api::PodPeersView> {
    let inv = identity.snapshot();
    inv.pod(&pod.namespace, &pod.name)?;
    let mut peers: Vec<api::PeerView> = Vec::new();
    // (remote, peer) → index in `peers`: one lookup per connection, not a scan of the peers.
    let mut index: Map<(String, Peer), usize> = Map::default();
    for netns in identity.netns_of(&pod) {
        for c in table.in_netns(netns) {
            let at = identity.attribute(&inv, c);
            let LocalEnd::Pod(me) = &at.local else {
                continue;
            };
            if me.namespace != pod.namespace || me.name != pod.name {
                continue;
            }
            let conn = api::PeerConn::new(c, now);
            let remote = api::PeerView::remote_of(c);
            match index.entry((remote, at.peer.clone())) {
                Entry::Occupied(e) => peers[*e.get()].push(conn),
                Entry::Vacant(e) => {
                    let (remote, peer) = e.key().clone();
                    e.insert(peers.len());
                    peers.push(api::PeerView::new(peer, remote, vec![conn]));
                }
            }
        }
    }
    peers.sort_by(|a, b| a.remote.cmp(&b.remote));
    // The first `limit` by port, so that the same table answers the same.
    for p in &mut peers {
        p.connections.sort_by_key(|c| (c.local_port, c.remote_port));
        p.connections.truncate(limit);
    }
    let services = analyzer
        .evaluate_where(now, |c, _| *c == pod)
        .iter()
        .map(api::ServiceVerdict::from)
        .collect();
    Some(api::PodPeersView {
        pod,
        peers,
        services,
        port_mismatches: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let k = ConnKey {
            netns: 4026532177,
            local: "[fd00:244::2]:4000".parse().unwrap(),
            remote: "10.96.0.10:80".parse().unwrap(),
        };
        assert_eq!(parse_cursor(&cursor(&k)), Some(k));
        assert_eq!(parse_cursor("x/y/z"), None);
        assert_eq!(parse_cursor("1/10.0.0.1:1"), None);
    }

    /// A server's inbound connections group by the client's address (their remote ports are
    /// ephemeral), its outbound ones by the address dialled; the peers are found in one pass
    /// (a scan of the peers per connection took 457 ms for a pod with 10 000 connections).
    #[test]
    fn inbound_connections_group_by_client_address() {
        use crate::{
            analysis::AnalysisConfig,
            conntable::{Direction, Origin},
            event::Counters,
        };
        let inv = crate::identity::local::parse(
            "pods:\n\
             - {name: server, namespace: shop, ip: 10.0.0.2}\n\
             - {name: a, namespace: shop, ip: 10.0.0.3}\n\
             - {name: b, namespace: shop, ip: 10.0.0.4}\n",
            "test",
        )
        .unwrap();
        let identity = Identity::default();
        identity.replace(std::sync::Arc::new(inv));
        let conn = |direction, local: &str, remote: &str| Conn {
            key: ConnKey {
                netns: 7,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
            },
            direction,
            origin: Origin::Traced,
            sock: 0,
            owner: None,
            opened_ns: None,
            backend: None,
            counters: Counters::default(),
            requests: None,
        };
        let mut found = Vec::new();
        for port in 0..3000u16 {
            let (from, port) = if port < 2000 {
                ("10.0.0.3", 30000 + port)
            } else {
                ("10.0.0.4", 40000 + port)
            };
            found.push(conn(
                Direction::Inbound,
                "10.0.0.2:80",
                &format!("{from}:{port}"),
            ));
        }
        found.push(conn(Direction::Outbound, "10.0.0.2:50000", "10.0.0.3:8080"));
        found.push(conn(Direction::Outbound, "10.0.0.2:50001", "10.0.0.3:8080"));
        let mut table = ConnTable::new();
        table.finish_recovery(found.clone());
        for c in &found {
            identity.learn(&identity.snapshot(), c);
        }
        let analyzer = Analyzer::new(AnalysisConfig::default()).unwrap();
        let view = pod_peers(
            &table,
            &analyzer,
            &identity,
            ObjectRef::new("shop", "server"),
            100,
            0,
        )
        .expect("known pod");
        let got: Vec<(&str, usize, usize)> = view
            .peers
            .iter()
            .map(|p| (p.remote.as_str(), p.connections.len(), p.total()))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.3", 100, 2000),
                ("10.0.0.3:8080", 2, 2),
                ("10.0.0.4", 100, 1000)
            ]
        );
        let first = &view.peers[0].connections[0];
        assert_eq!((first.local_port, first.remote_port), (80, 30000));
    }
}
