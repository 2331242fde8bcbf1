//! Sliding-window storage: a fixed ring of time buckets per key and per backend, so memory per key
//! does not grow with the number of requests or connections.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds, inclusive as Prometheus `le`) of the connection lifetime histogram. The
/// last bucket, `+Inf`, is implicit: [`LifetimeHistogram::counts`] has one more entry than this.
pub const LIFETIME_BOUNDS_SECONDS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// Buckets of the lifetime histogram, `+Inf` included.
pub(crate) const LIFETIME_BUCKETS: usize = LIFETIME_BOUNDS_SECONDS.len() + 1;

/// Index of the histogram bucket a lifetime falls in.
pub(crate) fn lifetime_bucket(lifetime_ns: u64) -> usize {
    let secs = lifetime_ns as f64 / 1e9;
    LIFETIME_BOUNDS_SECONDS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(LIFETIME_BOUNDS_SECONDS.len())
}

/// Lifetimes of the connections that closed in the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifetimeHistogram {
    /// Upper bounds in seconds ([`LIFETIME_BOUNDS_SECONDS`]); the `+Inf` bucket is implicit.
    /// Borrowed from the constant when computed; owned when decoded from the API.
    pub bounds_seconds: Cow<'static, [f64]>,
    /// Per-bucket counts (not cumulative), `bounds_seconds.len() + 1` of them, the last for `+Inf`.
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl LifetimeHistogram {
    pub(crate) fn from_counts(counts: [u64; LIFETIME_BUCKETS], sum_ns: u64) -> Self {
        LifetimeHistogram {
            bounds_seconds: Cow::Borrowed(&LIFETIME_BOUNDS_SECONDS),
            counts: counts.to_vec(),
            count: counts.iter().sum(),
            sum_seconds: sum_ns as f64 / 1e9,
        }
    }

    /// Cumulative counts, as a Prometheus histogram exports them (`le` buckets, `+Inf` last).
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0u64, |acc, c| {
                *acc = acc.saturating_add(*c);
                Some(*acc)
            })
            .collect()
    }
}

/// Stamp of a slot that holds no bucket yet.
const EMPTY: u64 = u64::MAX;

/// A fixed ring of buckets, each stamped with the absolute bucket index (time / bucket width) it
/// holds. Writing to an index reuses the slot of an older bucket; reading filters by stamp, so a
/// slot that was not written for a while never leaks old data into the window.
#[derive(Clone, Debug)]
pub(crate) struct Ring<T> {
    slots: Vec<(u64, T)>,
}

impl<T: Default + Clone> Ring<T> {
    pub(crate) fn new(len: usize) -> Self {
        Ring {
            slots: vec![(EMPTY, T::default()); len.max(1)],
        }
    }

    /// The bucket for absolute index `idx`, cleared first if its slot held an older bucket. None
    /// when the slot already holds a newer bucket: `idx` is too old to be recorded.
    pub(crate) fn slot_mut(&mut self, idx: u64) -> Option<&mut T> {
        if idx == EMPTY {
            return None;
        }
        let len = self.slots.len() as u64;
        let slot = self.slots.get_mut((idx % len) as usize)?;
        if slot.0 == EMPTY || slot.0 < idx {
            *slot = (idx, T::default());
        }
        (slot.0 == idx).then_some(&mut slot.1)
    }

    /// The bucket with absolute index `idx`, if the ring still holds it.
    pub(crate) fn get(&self, idx: u64) -> Option<&T> {
        let len = self.slots.len() as u64;
        self.slots
            .get((idx % len) as usize)
            .filter(|s| s.0 == idx && idx != EMPTY)
            .map(|s| &s.1)
    }

    /// Buckets whose index lies in `lo..=hi`.
    pub(crate) fn range(&self, lo: u64, hi: u64) -> impl Iterator<Item = &T> {
        self.slots
            .iter()
            .filter(move |s| s.0 != EMPTY && s.0 >= lo && s.0 <= hi)
            .map(|s| &s.1)
    }
}

/// What one key (client pod, service) saw in one bucket.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyBucket {
    /// Connections that opened (traced ones; recovered connections are not opens).
    pub(crate) opens: u64,
    pub(crate) closes: u64,
    /// Sum of the lifetimes of the connections that closed.
    pub(crate) lifetime_sum_ns: u64,
    pub(crate) lifetimes: [u64; LIFETIME_BUCKETS],
    pub(crate) requests_h2: u64,
    pub(crate) requests_messages: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) bytes_received: u64,
    pub(crate) messages_sent: u64,
    pub(crate) messages_received: u64,
}

/// What one backend of a key saw in one bucket.
#[derive(Clone, Debug, Default)]
pub(crate) struct BackendBucket {
    pub(crate) requests: u64,
    pub(crate) opens: u64,
    pub(crate) closes: u64,
    pub(crate) lifetime_sum_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_reuses_slots_and_filters_by_stamp() {
        let mut r: Ring<u64> = Ring::new(3);
        *r.slot_mut(0).unwrap() += 1;
        *r.slot_mut(1).unwrap() += 2;
        *r.slot_mut(3).unwrap() += 4; // reuses slot 0
        assert_eq!(r.range(0, 3).sum::<u64>(), 6);
        assert!(r.get(0).is_none());
        assert_eq!(r.get(3), Some(&4));
        assert!(r.slot_mut(0).is_none(), "too old to record");
        assert_eq!(r.range(2, 3).sum::<u64>(), 4);
        assert!(r.slot_mut(u64::MAX).is_none());
    }

    #[test]
    fn lifetime_buckets_follow_le_semantics() {
        assert_eq!(lifetime_bucket(0), 0);
        assert_eq!(lifetime_bucket(1_000_000), 0);
        assert_eq!(lifetime_bucket(1_000_001), 1);
        assert_eq!(lifetime_bucket(20_000_000), 3);
        assert_eq!(lifetime_bucket(u64::MAX), LIFETIME_BOUNDS_SECONDS.len());
        let mut counts = [0; LIFETIME_BUCKETS];
        counts[0] = 2;
        counts[3] = 1;
        let h = LifetimeHistogram::from_counts(counts, 3_000_000_000);
        assert_eq!(h.count, 3);
        assert_eq!(h.cumulative()[LIFETIME_BUCKETS - 1], 3);
        assert_eq!(h.cumulative()[2], 2);
    }
}
