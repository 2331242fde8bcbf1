//! ClusterIP backends: the conntrack thread, and the pipeline's bookkeeping of its queue.
//!
//! Invariants:
//! - The thread only answers lookups; it never touches the table or the analyzer. Its answers
//!   come back to the pipeline as [`super::Input::Resolved`], in the order the lookups were made.
//! - At most [`QUEUE`] lookups wait; beyond that an open goes to the analyzer without a backend and
//!   is counted (`fanout_conntrack_lookups_total{result="dropped"}`).
//! - A connection whose open waits for its backend cannot close before it opened: its close is
//!   held and applied right after the open (a client dialling per request closes within
//!   milliseconds, often before the lookup is done). A socket address reused by the next
//!   connection while the first still waits is counted per open, so each close follows its own.

use std::{net::SocketAddr, path::Path, time::Duration};

use super::{Handle, HeldClose, Input};
use crate::{
    analysis::{self, ConnId, Nanos},
    conntable::{Conn, ConnKey},
    features::{Feature, Features},
    identity::conntrack::{Conntrack, ConntrackError, Tuple},
    keyed::Map,
};

/// Lookups waiting at most.
pub const QUEUE: usize = 4096;

/// A lookup for the conntrack thread.
pub enum Lookup {
    /// A ClusterIP connection opened: its backend is looked up before the analyzer sees the open.
    Open { conn: Box<Conn>, at: Nanos },
    /// A connection already in the table (recovered): set its backend.
    Existing(ConnKey),
}

/// What a lookup was for.
pub enum Resolution {
    Open { conn: Box<Conn>, at: Nanos },
    Existing(ConnKey),
}

/// The thread's answer.
pub struct Resolved {
    pub what: Resolution,
    /// The backend kube-proxy chose: the reply tuple's source.
    pub backend: Option<SocketAddr>,
    /// `found`, `missing` or `error` (a metric label).
    pub result: &'static str,
}

/// The pipeline's view of the thread's queue.
pub struct Resolver {
    tx: Option<std::sync::mpsc::Sender<Lookup>>,
    /// Opens queued and not yet answered, per connection: its socket address and its key, for
    /// a socket address alone also names the next connections that reuse it (another pod's
    /// inbound one, say, whose close must never wait for this open).
    queued_opens: Map<(ConnId, ConnKey), u32>,
    /// Closes waiting for their connection's open, in order.
    held: Map<(ConnId, ConnKey), Vec<HeldClose>>,
    /// Lookups queued.
    pending: usize,
}

impl Resolver {
    pub fn new(tx: Option<std::sync::mpsc::Sender<Lookup>>) -> Self {
        Resolver {
            tx,
            queued_opens: Map::default(),
            held: Map::default(),
            pending: 0,
        }
    }

    fn send(&mut self, lookup: Lookup) -> Result<(), &'static str> {
        let Some(tx) = &self.tx else {
            return Err("unavailable");
        };
        if self.pending >= QUEUE {
            return Err("dropped");
        }
        tx.send(lookup).map_err(|_| "unavailable")?;
        self.pending += 1;
        Ok(())
    }

    /// Queues the lookup of an opened connection's backend.
    pub fn open(&mut self, conn: &Conn, at: Nanos) -> Result<(), &'static str> {
        let id = crate::analysis::feed::conn_id(conn);
        self.send(Lookup::Open {
            conn: Box::new(conn.clone()),
            at,
        })?;
        if let Some(id) = id {
            *self.queued_opens.entry((id, conn.key)).or_default() += 1;
        }
        Ok(())
    }

    /// Queues the lookup of an existing connection's backend.
    pub fn existing(&mut self, key: ConnKey) -> Result<(), &'static str> {
        self.send(Lookup::Existing(key))
    }

    /// Holds a close whose connection's open is still queued; false when none is.
    pub fn hold_close(
        &mut self,
        id: ConnId,
        key: ConnKey,
        at: Nanos,
        lifetime: Option<Duration>,
        counters: analysis::Counters,
    ) -> bool {
        if !self.queued_opens.contains_key(&(id, key)) {
            return false;
        }
        self.held.entry((id, key)).or_default().push(HeldClose {
            id,
            at,
            lifetime,
            counters,
        });
        true
    }

    /// An open was answered: the close held for it, if it closed meanwhile.
    pub fn opened(&mut self, id: Option<ConnId>, key: ConnKey) -> Option<HeldClose> {
        self.pending = self.pending.saturating_sub(1);
        let this = (id?, key);
        if let Some(n) = self.queued_opens.get_mut(&this) {
            *n -= 1;
            if *n == 0 {
                self.queued_opens.remove(&this);
            }
        }
        let held = self.held.get_mut(&this)?;
        let first = (!held.is_empty()).then(|| held.remove(0));
        if held.is_empty() {
            self.held.remove(&this);
        }
        first
    }

    /// An existing connection's lookup was answered.
    pub fn done(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// Lookups waiting.
    pub fn pending(&self) -> usize {
        self.pending
    }
}

/// Opens conntrack (in `netns` when given), proves it answers, reports the feature, and starts
/// the thread; the sender of its queue, or None when conntrack cannot be used.
pub fn start(
    netns: Option<&Path>,
    needed: bool,
    features: &Features,
    handle: Handle,
) -> Option<std::sync::mpsc::Sender<Lookup>> {
    if !needed {
        features.unused(
            Feature::Conntrack,
            "no identity source: there are no services to resolve",
        );
        return None;
    }
    let ct = match netns {
        Some(path) => Conntrack::open_in(path),
        None => Conntrack::open(),
    };
    let where_ = netns.map_or_else(
        || "the daemon's network namespace (the node's with hostNetwork)".to_string(),
        |p| format!("network namespace {}", p.display()),
    );
    // A lookup of a tuple no connection has proves the kernel answers: not found is success.
    let probe = ct.and_then(|ct| {
        let none = Tuple::new(
            SocketAddr::from(([127, 0, 0, 1], 1)),
            SocketAddr::from(([127, 0, 0, 1], 1)),
        );
        ct.reply_tuple(none).map(|_| ct)
    });
    let ct = match probe {
        Ok(ct) => {
            features.on(Feature::Conntrack, format!("conntrack table of {where_}"));
            ct
        }
        Err(e) => {
            let fix = match &e {
                ConntrackError::Kernel { errno } if *errno == libc::EPERM => {
                    "add NET_ADMIN to the container's capabilities (conntrack lookups over \
                     netlink need it)"
                }
                ConntrackError::Namespace { .. } => {
                    "run with hostNetwork instead of --conntrack-netns: entering another network \
                     namespace needs CAP_SYS_ADMIN"
                }
                _ => "see the error; the node needs the nf_conntrack_netlink module",
            };
            features.off(
                Feature::Conntrack,
                format!("conntrack lookups in {where_} fail: {e}"),
                fix,
            );
            return None;
        }
    };
    let (tx, rx) = std::sync::mpsc::channel::<Lookup>();
    let spawned = std::thread::Builder::new()
        .name("conntrack".into())
        .spawn(move || {
            while let Ok(lookup) = rx.recv() {
                let (what, key) = match lookup {
                    Lookup::Open { conn, at } => {
                        let key = conn.key;
                        (Resolution::Open { conn, at }, key)
                    }
                    Lookup::Existing(key) => (Resolution::Existing(key), key),
                };
                let (backend, result) = match ct.reply_tuple(Tuple::new(key.local, key.remote)) {
                    Ok(Some(reply)) => (Some(reply.src), "found"),
                    Ok(None) => (None, "missing"),
                    Err(e) => {
                        tracing::debug!(error = %e, "conntrack lookup failed");
                        (None, "error")
                    }
                };
                let answer = Resolved {
                    what,
                    backend,
                    result,
                };
                if !handle.blocking_send(Input::Resolved(answer)) {
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the conntrack thread");
        return None;
    }
    Some(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntable::{Direction, Origin};

    fn conn(sock: u64, port: u16) -> Conn {
        Conn {
            key: ConnKey {
                netns: 1,
                local: SocketAddr::from(([10, 244, 0, 2], port)),
                remote: SocketAddr::from(([10, 96, 0, 10], 80)),
            },
            direction: Direction::Outbound,
            origin: Origin::Traced,
            sock,
            owner: None,
            opened_ns: Some(1),
            backend: None,
            counters: Default::default(),
            requests: None,
        }
    }

    fn zero() -> analysis::Counters {
        analysis::Counters {
            bytes_sent: 0,
            bytes_received: 0,
            messages_sent: 0,
            messages_received: 0,
            requests: 0,
            source: crate::conntable::RequestSource::H2,
        }
    }

    #[test]
    fn each_close_of_a_reused_socket_follows_its_own_open() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = Resolver::new(Some(tx));
        let id = ConnId(7);
        let (a, b) = (conn(7, 40000), conn(7, 40002));
        r.open(&a, 1).unwrap();
        assert!(r.hold_close(id, a.key, 2, None, zero()));
        r.open(&b, 3).unwrap();
        assert!(r.hold_close(id, b.key, 4, None, zero()));
        assert_eq!(r.pending(), 2);
        assert_eq!(r.opened(Some(id), a.key).map(|h| h.at), Some(2));
        assert!(
            r.queued_opens.contains_key(&(id, b.key)),
            "the second open still waits"
        );
        assert_eq!(r.opened(Some(id), b.key).map(|h| h.at), Some(4));
        assert!(r.queued_opens.is_empty() && r.held.is_empty());
        assert!(!r.hold_close(id, a.key, 5, None, zero()), "nothing queued");
        assert_eq!(rx.try_iter().count(), 2);
    }

    #[test]
    fn a_close_that_only_shares_the_socket_address_is_never_held() {
        // A client's open waits for its backend; its socket address is reused meanwhile by a
        // connection whose open was never queued (another pod's inbound one). That close is
        // applied at once, and never popped by the first connection's answer.
        let (tx, _rx) = std::sync::mpsc::channel();
        let mut r = Resolver::new(Some(tx));
        let id = ConnId(7);
        let (client, other) = (conn(7, 40000), conn(7, 50000));
        r.open(&client, 1).unwrap();
        assert!(r.hold_close(id, client.key, 2, None, zero()));
        assert!(!r.hold_close(id, other.key, 3, None, zero()));
        assert_eq!(r.opened(Some(id), client.key).map(|h| h.at), Some(2));
        assert!(r.held.is_empty());
    }

    #[test]
    fn lookups_beyond_the_queue_or_without_a_thread_are_refused() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut r = Resolver::new(Some(tx));
        for i in 0..QUEUE {
            r.existing(conn(0, i as u16).key).unwrap();
        }
        assert_eq!(r.open(&conn(9, 1), 1), Err("dropped"));
        assert!(r.queued_opens.is_empty());
        r.done();
        assert_eq!(r.open(&conn(9, 1), 1), Ok(()));
        drop(rx);
        r.done();
        assert_eq!(
            r.open(&conn(10, 2), 1),
            Err("unavailable"),
            "the thread is gone"
        );
        let mut none = Resolver::new(None);
        assert_eq!(none.existing(conn(0, 1).key), Err("unavailable"));
    }
}
