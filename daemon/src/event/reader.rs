//! Reads the ring buffer from tokio.
//!
//! The kernel submits records without a wakeup until `wakeup_bytes` are waiting (a wakeup per
//! record costs microseconds per event and halves connection throughput), so the reader both
//! waits for readiness and polls on a short timer: latency stays bounded by the poll interval and
//! bursts wake it early.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};

use super::{DecodeError, Event, decode};

/// At most this many records are decoded per batch before the batch is handed on.
const BATCH: usize = 1024;
/// Emptied batches the reader keeps to fill again (see [`Batch::recycle`]).
const SPARES: usize = 2;

/// One batch of decoded records, with the records that failed to decode.
///
/// Invariant: a batch's event buffer is reused: the pipeline hands it back emptied
/// ([`Batch::recycle`]) and the reader fills it again, so that the per-record path does not
/// grow a new vector per batch (growing one by doubling copies every event about twice more, and
/// copying was the daemon's largest cost in a profile). At most [`SPARES`] wait to be reused;
/// the others are freed.
#[derive(Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub errors: Vec<DecodeError>,
    back: Option<mpsc::Sender<Vec<Event>>>,
}

impl Batch {
    /// Hands the event buffer back to the reader that filled it, emptied.
    pub fn recycle(self) {
        if let Some(back) = self.back
            && self.events.capacity() > 0
        {
            let mut events = self.events;
            events.clear();
            let _ = back.try_send(events);
        }
    }
}

/// New batches, from the spares when there are any.
struct Batches {
    back: mpsc::Sender<Vec<Event>>,
    spares: mpsc::Receiver<Vec<Event>>,
}

impl Batches {
    fn new() -> Self {
        let (back, spares) = mpsc::channel(SPARES);
        Batches { back, spares }
    }

    fn next(&mut self) -> Batch {
        // A new buffer is sized at its first record (most polls find none).
        let events = self.spares.try_recv().unwrap_or_default();
        Batch {
            events,
            errors: Vec::new(),
            back: Some(self.back.clone()),
        }
    }
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Batch) -> bool {
    while batch.events.len() + batch.errors.len() < BATCH {
        let Some(item) = ring.next() else {
            return false;
        };
        match decode(&item) {
            Ok(ev) => {
                if batch.events.capacity() == 0 {
                    batch.events.reserve_exact(BATCH);
                }
                batch.events.push(ev)
            }
            Err(e) => batch.errors.push(e),
        }
    }
    true
}

/// Reads until `shutdown` turns true, sending every non-empty batch to `sink` (a bounded
/// channel: when its receiver falls behind, the reader waits and the ring fills, and the kernel
/// counts what it cannot write). Ends early when the receiver is gone.
pub async fn run(
    ring: RingBuf<MapData>,
    poll_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    sink: mpsc::Sender<Batch>,
) -> std::io::Result<()> {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd holds it, and the fd is
    // neither closed nor replaced while registered.
    let mut afd = unsafe { AsyncFd::register(ring) }
        .map_err(|e| std::io::Error::other(format!("registering the ring buffer: {e}")))?;
    let mut batches = Batches::new();
    let mut tick = tokio::time::interval(poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            guard = afd.readable_mut() => {
                let mut guard = guard?;
                guard.clear_ready();
            }
            _ = tick.tick() => {}
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    // Hand on what is already there before stopping.
                    let mut batch = batches.next();
                    while drain(afd.get_mut(), &mut batch) {
                        let full = std::mem::replace(&mut batch, batches.next());
                        if sink.send(full).await.is_err() {
                            return Ok(());
                        }
                    }
                    if !batch.events.is_empty() || !batch.errors.is_empty() {
                        let _ = sink.send(batch).await;
                    }
                    return Ok(());
                }
            }
        }
        loop {
            let mut batch = batches.next();
            let more = drain(afd.get_mut(), &mut batch);
            if batch.events.is_empty() && batch.errors.is_empty() {
                batch.recycle();
            } else if sink.send(batch).await.is_err() {
                return Ok(());
            }
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_reuse_the_buffers_handed_back_and_keep_few() {
        let mut batches = Batches::new();
        // A batch that never held a record hands nothing back.
        batches.next().recycle();
        assert_eq!(batches.next().events.capacity(), 0);
        let mut made = Vec::new();
        for _ in 0..SPARES + 2 {
            let mut b = batches.next();
            b.events.reserve_exact(BATCH);
            made.push(b);
        }
        for b in made {
            b.recycle();
        }
        for _ in 0..SPARES {
            let b = batches.next();
            assert!(b.events.is_empty() && b.events.capacity() >= BATCH);
        }
        // The buffers over SPARES were freed.
        assert_eq!(batches.next().events.capacity(), 0);
    }
}
