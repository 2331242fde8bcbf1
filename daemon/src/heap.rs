//! Giving freed heap back to the kernel: after loading the probe (tens of MiB of BTF parsing), and
//! every [`PERIODIC_TRIM`] for what the agent leaves behind since (inventory swaps: the old
//! snapshot and the parse of the new one; batches, samples, outgrown hash tables, API answers,
//! freed in the arenas of whichever thread made them). glibc keeps freed memory in its arenas and
//! returns only the top of the main heap by itself, so without this the resident size stays at
//! the peak for the agent's whole life: with 4 000 table rows, 36.8 MiB resident before a trim,
//! 30.4 MiB after.
//!
//! The daemon also keeps one malloc arena ([`tune_malloc`], before its first thread; the
//! `MALLOC_ARENA_MAX` environment variable overrides it). glibc gives threads arenas of their own
//! (up to 8 per CPU), each holding its own free memory: the pipeline runs on whichever runtime
//! worker is free, so its tables and their outgrown copies spread over several arenas. Side by
//! side with 10 000 connections and a 10 000-pod inventory (`cargo xtask bench --memory-only`):
//! 71.8 MiB resident with glibc's default, 64.8 with two arenas, 62.9 with one. Threads still
//! allocate small blocks from their own caches (tcache) without taking the arena's lock.
//!
//! And blocks of [`MMAP_THRESHOLD`] or more are mapped on their own, so that freeing one gives
//! its pages back at once (`MALLOC_MMAP_THRESHOLD_` overrides it). By default glibc raises that
//! threshold to the size of every mapped block freed, so that once a hash table has outgrown its
//! first copy, the next copies live in the heap and stay there, freed but resident, until a trim:
//! the table's growth to 20 000 rows, the sampler's per-second vectors, API answers. Same
//! comparison, one arena: 62.1 → 54.6 MiB, and 44.3 → 38.2 with the connections alone.
//!
//! Invariant: trims run on a blocking thread, never on a runtime worker: once after the probe
//! load, once after the startup scan, then from [`run`] only. An inventory swap does not trim by
//! itself; the next periodic trim, at most [`PERIODIC_TRIM`] later, returns what it freed.

use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often [`run`] trims.
pub const PERIODIC_TRIM: Duration = Duration::from_secs(10);

/// Blocks at least this large are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: i32 = 256 << 10;

/// Keeps glibc to one malloc arena unless `MALLOC_ARENA_MAX` says otherwise, and maps large
/// blocks on their own unless `MALLOC_MMAP_THRESHOLD_` says otherwise. Call it before any thread
/// starts: threads already running keep the arena they have.
pub fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX is a valid one.
            unsafe {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
        }
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: as above. A fixed threshold also turns off glibc's raising it to the size
            // of every mapped block freed, after which outgrown hash tables and answers would
            // stay in the heap until a trim.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            }
        }
    }
}

/// Returns free heap pages to the kernel (`malloc_trim`).
pub fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`PERIODIC_TRIM`] until `stop` changes.
pub async fn run(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PERIODIC_TRIM);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the probe load has just trimmed.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let took = tokio::task::spawn_blocking(|| {
            let start = Instant::now();
            trim();
            start.elapsed()
        })
        .await;
        if let Ok(took) = took {
            tracing::debug!(?took, "heap trimmed");
        }
    }
}
