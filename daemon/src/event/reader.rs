//! Reads the ring buffer from tokio.
//!
//! The kernel submits records without a wakeup until `wakeup_bytes` are waiting (a wakeup per
//! record costs microseconds per event and halves connection throughput), so the reader both
//! waits for readiness and polls on a short timer: latency stays bounded by the poll interval and
//! bursts wake it early.

use std::time::Duration;

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::watch};

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

/// Reads until `shutdown` turns true, calling `sink` with every non-empty batch.
pub async fn run(
    ring: RingBuf<MapData>,
    poll_interval: Duration,
    mut shutdown: watch::Receiver<bool>,
    mut sink: impl FnMut(Batch),
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
                        sink(std::mem::take(&mut batch));
                    }
                    if !batch.events.is_empty() || !batch.errors.is_empty() {
                        sink(batch);
                    }
                    return Ok(());
                }
            }
        }
        loop {
            let mut batch = Batch::default();
            let more = drain(afd.get_mut(), &mut batch);
            if !batch.events.is_empty() || !batch.errors.is_empty() {
                sink(batch);
            }
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
    }
}
