//! Reconciliation: the connection table against the kernel's own socket tables, so that lost
//! records never leave ghosts or holes for long.
//!
//! Invariants:
//! - Startup recovery and every later round are the same comparison; only the first round adds
//!   what it finds at once (nothing traced can predate it).
//! - A row is removed only when its socket was missing from the kernel's table in two consecutive
//!   rounds, and a kernel connection is added only when it was absent from the table in two
//!   consecutive rounds: a record on its way through the ring buffer (read every poll interval,
//!   far shorter than a round) always wins over the comparison, so a close keeps its final
//!   counters and an open its owner. A ghost therefore disappears within two rounds.
//! - Only namespaces whose table was read in a round are judged in it; a namespace that could not
//!   be read leaves its rows alone.
//! - Memory is bounded by the table and the kernel's tables: the carried-over sets hold at most
//!   one round's suspects.

use std::collections::{HashMap, HashSet};

use super::{Conn, ConnKey};

/// What one round decided.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Rows whose socket is gone (missing twice).
    pub remove: Vec<ConnKey>,
    /// Kernel connections the table does not have (absent twice, or found by the first round).
    pub add: Vec<Conn>,
}

/// The state carried from one round to the next.
#[derive(Debug, Default)]
pub struct Reconciler {
    rounds: u64,
    /// Rows missing from the kernel in the last round.
    missing: HashSet<ConnKey>,
    /// Kernel connections absent from the table in the last round.
    unknown: HashSet<ConnKey>,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rounds done.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Whether the last round left suspects (a row missing from the kernel, or a kernel
    /// connection absent from the table, once): the next round decides them.
    pub fn has_suspects(&self) -> bool {
        !self.missing.is_empty() || !self.unknown.is_empty()
    }

    /// One comparison. `table` holds the keys of the table's rows taken before the kernel's
    /// tables were read; `kernel` the connections read, for the namespaces in `covered`.
    pub fn round(
        &mut self,
        table: &HashSet<ConnKey>,
        kernel: Vec<Conn>,
        covered: &HashSet<u32>,
    ) -> Plan {
        let first = self.rounds == 0;
        self.rounds += 1;
        let in_kernel: HashSet<ConnKey> = kernel.iter().map(|c| c.key).collect();
        let mut plan = Plan::default();
        let mut missing = HashSet::new();
        for key in table {
            if !covered.contains(&key.netns) || in_kernel.contains(key) {
                continue;
            }
            if self.missing.contains(key) {
                plan.remove.push(*key);
            } else {
                missing.insert(*key);
            }
        }
        let mut unknown = HashSet::new();
        let mut seen: HashMap<ConnKey, ()> = HashMap::new();
        for conn in kernel {
            if table.contains(&conn.key) || seen.insert(conn.key, ()).is_some() {
                continue;
            }
            if first || self.unknown.contains(&conn.key) {
                plan.add.push(conn);
            } else {
                unknown.insert(conn.key);
            }
        }
        self.missing = missing;
        self.unknown = unknown;
        plan.remove.sort_by_key(|k| (k.netns, k.local, k.remote));
        plan.add
            .sort_by_key(|c| (c.key.netns, c.key.local, c.key.remote));
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntable::{Direction, Origin};

    fn key(netns: u32, port: u16) -> ConnKey {
        ConnKey {
            netns,
            local: ([10, 244, 0, 2], port).into(),
            remote: ([10, 244, 0, 3], 80).into(),
        }
    }

    fn conn(netns: u32, port: u16) -> Conn {
        Conn {
            key: key(netns, port),
            direction: Direction::Outbound,
            origin: Origin::Recovered,
            sock: 0,
            owner: None,
            opened_ns: None,
            backend: None,
            counters: Default::default(),
            requests: None,
        }
    }

    fn keys(ks: &[ConnKey]) -> HashSet<ConnKey> {
        ks.iter().copied().collect()
    }

    #[test]
    fn the_first_round_adds_what_it_finds() {
        let mut r = Reconciler::new();
        let plan = r.round(
            &keys(&[key(1, 1)]),
            vec![conn(1, 1), conn(1, 2)],
            &[1].into(),
        );
        assert_eq!(plan.add, vec![conn(1, 2)]);
        assert!(plan.remove.is_empty());
    }

    #[test]
    fn a_ghost_goes_after_two_rounds_and_a_hole_is_filled_after_two() {
        let mut r = Reconciler::new();
        r.round(&HashSet::new(), Vec::new(), &[1].into());
        // Row 1 has no socket (its close was lost); socket 2 has no row (its open was lost).
        let table = keys(&[key(1, 1)]);
        let plan = r.round(&table, vec![conn(1, 2)], &[1].into());
        assert_eq!(plan, Plan::default(), "one round is not enough");
        let plan = r.round(&table, vec![conn(1, 2)], &[1].into());
        assert_eq!(plan.remove, vec![key(1, 1)]);
        assert_eq!(plan.add, vec![conn(1, 2)]);
    }

    #[test]
    fn a_record_that_arrives_between_rounds_wins() {
        let mut r = Reconciler::new();
        r.round(&HashSet::new(), Vec::new(), &[1].into());
        // Round 2: the close of row 1 and the open of socket 2 are still in the ring.
        r.round(&keys(&[key(1, 1)]), vec![conn(1, 2)], &[1].into());
        // They arrived: row 1 is gone from the table, socket 2 has its traced row.
        let plan = r.round(&keys(&[key(1, 2)]), vec![conn(1, 2)], &[1].into());
        assert_eq!(plan, Plan::default());
        // A port reused by a new connection between rounds is not a ghost either.
        let plan = r.round(&keys(&[key(1, 2)]), vec![conn(1, 2)], &[1].into());
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn namespaces_not_read_are_left_alone() {
        let mut r = Reconciler::new();
        r.round(&HashSet::new(), Vec::new(), &[1].into());
        let table = keys(&[key(2, 1)]);
        for _ in 0..3 {
            assert_eq!(r.round(&table, Vec::new(), &[1].into()), Plan::default());
        }
        r.round(&table, Vec::new(), &[1, 2].into());
        assert_eq!(
            r.round(&table, Vec::new(), &[1, 2].into()).remove,
            vec![key(2, 1)]
        );
    }
}
