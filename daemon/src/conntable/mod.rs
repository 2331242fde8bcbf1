//! The live connection table: every TCP connection of every network namespace on the node, keyed by
//! (network namespace, local address, remote address), built from lifecycle events and from the
//! connections that already existed when the daemon started.

pub mod reconcile;
pub mod recover;

use std::{collections::HashSet, net::SocketAddr, time::Duration};

use fanout_common::RecordKind;
use serde::{Deserialize, Serialize};

use crate::{
    event::{Counters, Event, Owner},
    keyed::{Map, Set},
};

/// Where a request count comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestSource {
    /// Client-initiated HTTP/2 streams counted from the frames in the kernel.
    H2,
    /// Not parsable as cleartext HTTP/2 (TLS, another protocol, or opened before fanout):
    /// messages sent stand in for requests.
    Messages,
}

impl RequestSource {
    /// Bounded label value ("h2" or "messages").
    pub fn as_str(self) -> &'static str {
        match self {
            RequestSource::H2 => "h2",
            RequestSource::Messages => "messages",
        }
    }
}

/// gRPC requests a client sent on a connection, with where the figure comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Requests {
    pub count: u64,
    pub source: RequestSource,
    /// Why HTTP/2 was not parsable, when the source is messages.
    pub unparsable: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub struct ConnKey {
    pub netns: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// One 128-bit write for an IPv4 key, three for IPv6: the derived form writes a discriminant,
/// the octets and a port per address, and was a tenth of the daemon's CPU in a profile (every
/// record hashes the key two to four times). Keys that are equal write the same.
impl std::hash::Hash for ConnKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match (self.local, self.remote) {
            (SocketAddr::V4(l), SocketAddr::V4(r)) => h.write_u128(
                u128::from(self.netns) << 96
                    | u128::from(u32::from(*l.ip())) << 64
                    | u128::from(u32::from(*r.ip())) << 32
                    | u128::from(l.port()) << 16
                    | u128::from(r.port()),
            ),
            (l, r) => {
                h.write_u128(ip_bits(l.ip()));
                h.write_u128(ip_bits(r.ip()));
                h.write_u64(
                    u64::from(self.netns) << 32 | u64::from(l.port()) << 16 | u64::from(r.port()),
                );
            }
        }
    }
}

fn ip_bits(ip: std::net::IpAddr) -> u128 {
    match ip {
        std::net::IpAddr::V4(a) => u128::from(u32::from(a)),
        std::net::IpAddr::V6(a) => u128::from(a),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// This side called connect().
    Outbound,
    /// This side accepted.
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Seen opening by the tracer.
    Traced,
    /// Found at startup (it predates the daemon).
    Recovered,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Conn {
    pub key: ConnKey,
    pub direction: Direction,
    pub origin: Origin,
    /// Kernel socket address; 0 when recovered from /proc.
    pub sock: u64,
    pub owner: Option<Owner>,
    /// CLOCK_MONOTONIC ns when it established, when known.
    pub opened_ns: Option<u64>,
    /// For a connection to a ClusterIP: the backend address kube-proxy's DNAT chose (from
    /// conntrack), once looked up.
    pub backend: Option<SocketAddr>,
    /// Byte and message counters (refreshed from the kernel; final once closed).
    pub counters: Counters,
    /// Requests sent on an outbound connection, when known.
    pub requests: Option<Requests>,
}

/// A connect() still waiting for its handshake. The kernel reports one only when it could not
/// keep the socket's state (`sock_map_full`), so that the owner is not lost; otherwise the owner
/// arrives with the established or failed record and nothing is pending. The local port is often
/// not chosen yet at connect time, so pending connects are keyed by socket.
#[derive(Clone, Debug)]
struct Pending {
    netns: u32,
    remote: SocketAddr,
    owner: Option<Owner>,
    ts_ns: u64,
}

/// What applying one event did to the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Connecting,
    Opened(Conn),
    OwnerLearnt(ConnKey),
    Failed {
        netns: u32,
        remote: SocketAddr,
        owner: Option<Owner>,
    },
    Closed {
        conn: Conn,
        duration: Option<Duration>,
    },
    /// A close, accept or handshake for a socket the table never knew (its earlier records were
    /// lost, or it predates the daemon and recovery missed it).
    Unmatched(RecordKind),
}

/// The live request figure of an outbound connection from its kernel state: see [`requests_of`].
pub fn requests_figure(st: &fanout_common::SockState, counters: &Counters) -> Requests {
    let h2 = u8::try_from(st.h2).ok().filter(|&s| s != 0);
    requests_of(h2.map(|status| (status, st.requests)), counters)
}

/// The request figure of an outbound connection: HTTP/2 streams while the scanner can parse the
/// connection, otherwise the messages sent, with the reason HTTP/2 was not parsable. From the
/// scanner's `(status, requests)` as a close record or the socket's state carry them (`status`
/// 1: parsable; `1 + H2Unparsable`: not; no figure: the scanner never followed it).
pub fn requests_of(h2: Option<(u8, u64)>, counters: &Counters) -> Requests {
    match h2 {
        Some((1, requests)) => Requests {
            count: requests,
            source: RequestSource::H2,
            unparsable: None,
        },
        other => Requests {
            count: counters.msgs_sent,
            source: RequestSource::Messages,
            unparsable: other
                .and_then(|(status, _)| {
                    fanout_common::h2::H2Unparsable::from_u8(status.saturating_sub(1))
                })
                .map(|r| r.as_str()),
        },
    }
}

#[derive(Default)]
pub struct ConnTable {
    conns: Map<ConnKey, Conn>,
    by_sock: Map<u64, ConnKey>,
    /// Rows per network namespace (a pod's connections are its namespace's).
    by_netns: Map<u32, Set<ConnKey>>,
    pending: Map<u64, Pending>,
    /// While startup recovery runs: connections that closed without the table knowing them.
    /// The scan may have seen them alive; they must not be resurrected.
    closed_while_recovering: Option<Set<ConnKey>>,
}

/// Pending connects older than this are dropped by [`ConnTable::sweep`]: the kernel gives up on
/// a handshake long before (tcp_syn_retries=6 is about two minutes).
pub const PENDING_TTL: Duration = Duration::from_secs(600);

impl ConnTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn get(&self, key: &ConnKey) -> Option<&Conn> {
        self.conns.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Conn> {
        self.conns.values()
    }

    fn insert(&mut self, conn: Conn) {
        self.remove(&conn.key);
        if conn.sock != 0 {
            self.by_sock.insert(conn.sock, conn.key);
        }
        self.by_netns
            .entry(conn.key.netns)
            .or_default()
            .insert(conn.key);
        self.conns.insert(conn.key, conn);
    }

    fn remove(&mut self, key: &ConnKey) -> Option<Conn> {
        let conn = self.conns.remove(key)?;
        if conn.sock != 0 && self.by_sock.get(&conn.sock) == Some(key) {
            self.by_sock.remove(&conn.sock);
        }
        if let Some(keys) = self.by_netns.get_mut(&key.netns) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_netns.remove(&key.netns);
            }
        }
        Some(conn)
    }

    /// The rows of one network namespace.
    pub fn in_netns(&self, netns: u32) -> impl Iterator<Item = &Conn> {
        self.by_netns
            .get(&netns)
            .into_iter()
            .flatten()
            .filter_map(|k| self.conns.get(k))
    }

    /// Applies one lifecycle event.
    pub fn apply(&mut self, ev: &Event) -> Change {
        let key = ConnKey {
            netns: ev.netns,
            local: ev.local,
            remote: ev.remote,
        };
        match ev.kind {
            RecordKind::Connect => {
                self.pending.insert(
                    ev.sock,
                    Pending {
                        netns: ev.netns,
                        remote: ev.remote,
                        owner: ev.owner,
                        ts_ns: ev.ts_ns,
                    },
                );
                Change::Connecting
            }
            RecordKind::Established => {
                let pending = self.pending.remove(&ev.sock);
                let owner = ev.owner.or_else(|| pending.and_then(|p| p.owner));
                let conn = Conn {
                    key,
                    direction: Direction::Outbound,
                    origin: Origin::Traced,
                    sock: ev.sock,
                    owner,
                    opened_ns: Some(ev.ts_ns),
                    backend: None,
                    counters: Counters::default(),
                    requests: None,
                };
                self.insert(conn.clone());
                Change::Opened(conn)
            }
            RecordKind::PassiveOpen => {
                let conn = Conn {
                    key,
                    direction: Direction::Inbound,
                    origin: Origin::Traced,
                    sock: ev.sock,
                    owner: ev.owner,
                    opened_ns: Some(ev.ts_ns),
                    backend: None,
                    counters: Counters::default(),
                    requests: None,
                };
                self.insert(conn.clone());
                Change::Opened(conn)
            }
            RecordKind::Accepted => {
                let Some(key) = self.by_sock.get(&ev.sock).copied() else {
                    return Change::Unmatched(RecordKind::Accepted);
                };
                match self.conns.get_mut(&key) {
                    Some(conn) if ev.owner.is_some() => {
                        conn.owner = ev.owner;
                        Change::OwnerLearnt(key)
                    }
                    _ => Change::Unmatched(RecordKind::Accepted),
                }
            }
            RecordKind::ConnectFailed => {
                let pending = self.pending.remove(&ev.sock);
                let (netns, remote, owner) = match pending {
                    Some(p) => (p.netns, p.remote, ev.owner.or(p.owner)),
                    None => (ev.netns, ev.remote, ev.owner),
                };
                Change::Failed {
                    netns,
                    remote,
                    owner,
                }
            }
            RecordKind::Close => {
                // Every close while the startup scan runs, of a known connection too: the scan
                // may have read the socket before it closed, and must not bring it back.
                if let Some(closed) = &mut self.closed_while_recovering {
                    closed.insert(key);
                }
                // By tuple first (recovered connections have no socket address), then by socket.
                let found = self.remove(&key).or_else(|| {
                    let k = self.by_sock.get(&ev.sock).copied()?;
                    self.remove(&k)
                });
                match found {
                    Some(mut conn) => {
                        if let Some(c) = ev.counters {
                            conn.counters = c;
                        }
                        if conn.direction == Direction::Outbound {
                            conn.requests = Some(requests_of(
                                ev.h2.map(|h| (h.status, h.requests)),
                                &conn.counters,
                            ));
                        }
                        Change::Closed {
                            conn,
                            duration: ev.duration,
                        }
                    }
                    None => Change::Unmatched(RecordKind::Close),
                }
            }
        }
    }

    /// Live connections with a kernel socket address (the ones whose counters can be read).
    pub fn tracked(&self) -> Vec<(ConnKey, u64, Direction)> {
        self.conns
            .values()
            .filter(|c| c.sock != 0)
            .map(|c| (c.key, c.sock, c.direction))
            .collect()
    }

    /// Updates a live connection's counters and request figure. False when it is gone.
    pub fn set_stats(
        &mut self,
        key: &ConnKey,
        counters: Counters,
        requests: Option<Requests>,
    ) -> bool {
        match self.conns.get_mut(key) {
            Some(c) => {
                c.counters = counters;
                if requests.is_some() {
                    c.requests = requests;
                }
                true
            }
            None => false,
        }
    }

    /// Sets a live connection's owner where it has none (a server end's, from its socket's state).
    pub fn learn_owner(&mut self, key: &ConnKey, owner: Owner) {
        if let Some(c) = self.conns.get_mut(key)
            && c.owner.is_none()
        {
            c.owner = Some(owner);
        }
    }

    /// Records the backend a ClusterIP connection reached. False when the connection is gone.
    pub fn set_backend(&mut self, key: &ConnKey, backend: SocketAddr) -> bool {
        match self.conns.get_mut(key) {
            Some(c) => {
                c.backend = Some(backend);
                true
            }
            None => false,
        }
    }

    /// Starts remembering closes of unknown connections until [`ConnTable::finish_recovery`].
    pub fn begin_recovery(&mut self) {
        self.closed_while_recovering = Some(Set::default());
    }

    /// Adds connections found at startup. A connection the tracer already reported wins, and one
    /// that closed since recovery began stays closed. Returns how many were added.
    pub fn finish_recovery(&mut self, found: impl IntoIterator<Item = Conn>) -> usize {
        let closed = self.closed_while_recovering.take().unwrap_or_default();
        let mut added = 0;
        for conn in found {
            if !self.conns.contains_key(&conn.key) && !closed.contains(&conn.key) {
                self.insert(conn);
                added += 1;
            }
        }
        added
    }

    /// The keys of every row, for a reconciliation round.
    pub fn keys(&self) -> HashSet<ConnKey> {
        self.conns.keys().copied().collect()
    }

    /// Removes a row whose socket the kernel no longer has (its close record was lost).
    pub fn remove_gone(&mut self, key: &ConnKey) -> Option<Conn> {
        self.remove(key)
    }

    /// Adds a connection the kernel has and the table missed (its open record was lost), unless
    /// a record brought it in meanwhile. Returns whether it was added.
    pub fn add_found(&mut self, conn: Conn) -> bool {
        if self.conns.contains_key(&conn.key) {
            return false;
        }
        self.insert(conn);
        true
    }

    /// Drops pending connects older than [`PENDING_TTL`] (their outcome was lost). Returns how
    /// many were dropped.
    pub fn sweep(&mut self, now_ns: u64) -> usize {
        let ttl = PENDING_TTL.as_nanos() as u64;
        let before = self.pending.len();
        self.pending
            .retain(|_, p| now_ns.saturating_sub(p.ts_ns) < ttl);
        before - self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use crate::event::tests::record;

    fn ev(kind: RecordKind, sock: u64, local: &str, remote: &str) -> Event {
        let mut e = decode(bytemuck::bytes_of(&record(kind))).unwrap();
        e.sock = sock;
        e.local = local.parse().unwrap();
        e.remote = remote.parse().unwrap();
        e
    }

    fn owner(pid: u32) -> Option<Owner> {
        Some(Owner {
            pid,
            tid: pid,
            comm: "client".into(),
        })
    }

    #[test]
    fn keys_hash_by_all_their_fields() {
        let s = ahash::RandomState::new();
        let k = |netns, l: &str, r: &str| ConnKey {
            netns,
            local: l.parse().unwrap(),
            remote: r.parse().unwrap(),
        };
        for (l, r) in [("10.0.0.1:1", "10.0.0.2:2"), ("[fd00::1]:1", "[fd00::2]:2")] {
            let h = s.hash_one(k(1, l, r));
            assert_eq!(h, s.hash_one(k(1, l, r)));
            assert_ne!(h, s.hash_one(k(2, l, r)));
            assert_ne!(h, s.hash_one(k(1, r, l)));
        }
        assert_ne!(
            s.hash_one(k(1, "10.0.0.1:1", "10.0.0.2:2")),
            s.hash_one(k(1, "10.0.0.1:1", "10.0.0.2:3"))
        );
    }

    #[test]
    fn active_open_is_rekeyed_by_tuple_once_established() {
        let mut t = ConnTable::new();
        let mut c = ev(RecordKind::Connect, 1, "10.0.0.1:0", "10.0.0.2:80");
        c.owner = owner(7);
        assert_eq!(t.apply(&c), Change::Connecting);
        assert_eq!(t.len(), 0);
        assert_eq!(t.pending_len(), 1);
        let e = ev(RecordKind::Established, 1, "10.0.0.1:5555", "10.0.0.2:80");
        let Change::Opened(conn) = t.apply(&e) else {
            panic!("not opened")
        };
        assert_eq!(conn.direction, Direction::Outbound);
        assert_eq!(conn.owner, owner(7), "owner carried over from connect");
        assert_eq!(t.len(), 1);
        assert_eq!(t.pending_len(), 0);
        let mut cl = ev(RecordKind::Close, 1, "10.0.0.1:5555", "10.0.0.2:80");
        cl.duration = Some(Duration::from_secs(3));
        assert!(matches!(
            t.apply(&cl),
            Change::Closed { duration: Some(d), .. } if d == Duration::from_secs(3)
        ));
        assert!(t.is_empty());
        assert_eq!(t.apply(&cl), Change::Unmatched(RecordKind::Close));
    }

    #[test]
    fn passive_open_learns_owner_at_accept() {
        let mut t = ConnTable::new();
        let p = ev(RecordKind::PassiveOpen, 9, "10.0.0.2:80", "10.0.0.1:5555");
        assert!(matches!(t.apply(&p), Change::Opened(c) if c.owner.is_none()));
        let mut a = ev(RecordKind::Accepted, 9, "0.0.0.0:0", "0.0.0.0:0");
        a.owner = owner(99);
        let Change::OwnerLearnt(key) = t.apply(&a) else {
            panic!("owner not learnt")
        };
        assert_eq!(t.get(&key).unwrap().owner, owner(99));
        a.sock = 10;
        assert_eq!(t.apply(&a), Change::Unmatched(RecordKind::Accepted));
    }

    #[test]
    fn failed_connect_clears_pending() {
        let mut t = ConnTable::new();
        let mut c = ev(RecordKind::Connect, 3, "10.0.0.1:0", "10.0.0.2:81");
        c.owner = owner(5);
        t.apply(&c);
        let f = ev(RecordKind::ConnectFailed, 3, "10.0.0.1:4000", "10.0.0.2:81");
        assert_eq!(
            t.apply(&f),
            Change::Failed {
                netns: c.netns,
                remote: "10.0.0.2:81".parse().unwrap(),
                owner: owner(5)
            }
        );
        assert_eq!(t.pending_len(), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn recovered_connections_close_by_tuple_and_never_override_traced_ones() {
        let mut t = ConnTable::new();
        let traced = ev(RecordKind::PassiveOpen, 4, "10.0.0.2:80", "10.0.0.1:1");
        t.begin_recovery();
        t.apply(&traced);
        // Closed after the scan read it, before the scan result was merged.
        t.apply(&ev(RecordKind::Close, 77, "10.0.0.2:7", "10.0.0.3:7"));
        let rec = |local: &str, remote: &str| Conn {
            key: ConnKey {
                netns: traced.netns,
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
            },
            direction: Direction::Outbound,
            origin: Origin::Recovered,
            sock: 0,
            owner: None,
            opened_ns: None,
            backend: None,
            counters: Counters::default(),
            requests: None,
        };
        let added = t.finish_recovery([
            rec("10.0.0.2:80", "10.0.0.1:1"),
            rec("10.0.0.2:9", "10.0.0.3:2"),
            rec("10.0.0.2:7", "10.0.0.3:7"),
        ]);
        assert_eq!(added, 1);
        assert_eq!(t.len(), 2);
        let close = ev(RecordKind::Close, 12345, "10.0.0.2:9", "10.0.0.3:2");
        assert!(
            matches!(t.apply(&close), Change::Closed { conn, duration: None } if conn.origin == Origin::Recovered)
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_traced_connection_that_closes_during_the_scan_is_not_brought_back() {
        let mut t = ConnTable::new();
        t.begin_recovery();
        // Opened after the programs attached, read by the scan, closed before the merge.
        let open = ev(RecordKind::Established, 5, "10.0.0.2:4000", "10.0.0.3:80");
        t.apply(&open);
        t.apply(&ev(RecordKind::Close, 5, "10.0.0.2:4000", "10.0.0.3:80"));
        let seen = Conn {
            key: ConnKey {
                netns: open.netns,
                local: "10.0.0.2:4000".parse().unwrap(),
                remote: "10.0.0.3:80".parse().unwrap(),
            },
            direction: Direction::Outbound,
            origin: Origin::Recovered,
            sock: 0,
            owner: None,
            opened_ns: None,
            backend: None,
            counters: Counters::default(),
            requests: None,
        };
        assert_eq!(t.finish_recovery([seen]), 0);
        assert!(t.is_empty());
    }

    #[test]
    fn same_tuple_in_different_namespaces_are_different_connections() {
        let mut t = ConnTable::new();
        let a = ev(RecordKind::PassiveOpen, 1, "10.0.0.2:80", "10.0.0.1:1");
        let mut b = a.clone();
        b.netns += 1;
        b.sock = 2;
        t.apply(&a);
        t.apply(&b);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn socket_address_reuse_does_not_drop_the_new_connection() {
        let mut t = ConnTable::new();
        t.apply(&ev(RecordKind::PassiveOpen, 1, "10.0.0.2:80", "10.0.0.1:1"));
        t.apply(&ev(RecordKind::Close, 1, "10.0.0.2:80", "10.0.0.1:1"));
        // The kernel reuses the sock address for a new connection.
        t.apply(&ev(RecordKind::PassiveOpen, 1, "10.0.0.2:80", "10.0.0.1:2"));
        let mut a = ev(RecordKind::Accepted, 1, "0.0.0.0:0", "0.0.0.0:0");
        a.owner = owner(1);
        assert!(matches!(t.apply(&a), Change::OwnerLearnt(k) if k.remote.port() == 2));
    }

    #[test]
    fn request_figures_fall_back_to_messages_and_say_why() {
        use fanout_common::{SockState, h2::H2Scan};
        let c = Counters {
            msgs_sent: 7,
            ..Default::default()
        };
        // As the scanner mirrors its figure into the socket's state.
        let state = |scan: Option<&H2Scan>| {
            let mut st = SockState::started(1);
            if let Some(scan) = scan {
                st.h2 = scan.status().into();
                st.requests = scan.requests();
            }
            st
        };
        let r = requests_figure(&state(None), &c);
        assert_eq!(
            (r.count, r.source, r.unparsable),
            (7, RequestSource::Messages, None)
        );
        let fresh = H2Scan::new();
        let r = requests_figure(&state(Some(&fresh)), &c);
        assert_eq!((r.count, r.source), (0, RequestSource::H2));
        let mut tls = H2Scan::new();
        tls.scan_segment(0, 9, |_, w| {
            *w = [0x16, 3, 1, 0, 5, 1, 0, 0, 1];
            true
        });
        let r = requests_figure(&state(Some(&tls)), &c);
        assert_eq!(r.source, RequestSource::Messages);
        assert_eq!(r.unparsable, Some("tls"));
    }

    #[test]
    fn sweep_drops_only_stale_pending_connects() {
        let mut t = ConnTable::new();
        let mut c = ev(RecordKind::Connect, 1, "10.0.0.1:0", "10.0.0.2:80");
        c.ts_ns = 0;
        t.apply(&c);
        let mut c2 = c.clone();
        c2.sock = 2;
        c2.ts_ns = PENDING_TTL.as_nanos() as u64;
        t.apply(&c2);
        assert_eq!(t.sweep(PENDING_TTL.as_nanos() as u64 + 1), 1);
        assert_eq!(t.pending_len(), 1);
    }
}
