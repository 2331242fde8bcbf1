//! Giving freed heap back to the kernel after the few large, known frees: loading the probe
//! (tens of MiB of BTF parsing) and swapping the inventory (the old snapshot and the parse of the
//! new one). glibc keeps freed memory in its arenas, so without this the resident size stays at
//! the peak of those moments for the agent's whole life.
//!
//! Invariant: [`trim_after_swap`] trims at most once per [`SWAP_TRIM_INTERVAL`], so a watch that
//! swaps the inventory every 200 ms does not walk the heap each time.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// The shortest time between two trims after inventory swaps.
pub const SWAP_TRIM_INTERVAL: Duration = Duration::from_secs(10);

/// Returns free heap pages to the kernel (`malloc_trim`).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`trim`], unless one ran after a swap less than [`SWAP_TRIM_INTERVAL`] ago.
pub fn trim_after_swap() {
    static LAST_SECS: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_SECS.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= SWAP_TRIM_INTERVAL.as_secs()
        && LAST_SECS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        trim();
    }
}
