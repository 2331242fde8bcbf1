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
const BATCH: usize = 4096;

/// One batch of decoded records, with the records that failed to decode.
#[derive(Default)]
pub struct Batch {
    pub events: Vec<Event>,
    pub errors: Vec<DecodeError>,
}

fn drain(ring: &mut RingBuf<MapData>, batch: &mut Batch) -> bool {
    while batch.events.len() + batch.errors.len() < BATCH {
        let Some(item) = ring.next() else {
            return false;
        };
        match decode(&item) {
            Ok(ev) => batch.events.push(ev),
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
                    let mut batch = Batch::default();
                    while drain(afd.get_mut(), &mut batch) {
                        if sink.send(std::mem::take(&mut batch)).await.is_err() {
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
            let mut batch = Batch::default();
            let more = drain(afd.get_mut(), &mut batch);
            if (!batch.events.is_empty() || !batch.errors.is_empty())
                && sink.send(batch).await.is_err()
            {
                return Ok(());
            }
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
