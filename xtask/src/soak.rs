//! `cargo xtask soak`: weeks of a node compressed into minutes, against the release daemon.
//!
//! In a lab of client, server and holder pods, for `--minutes`: bursts of thousands of
//! connections (with a 64 KiB ring, so that bursts overflow it), steady churn, long-lived
//! connections replaced over time, the inventory swapped ConfigMap-style (`..data` symlink) every
//! 15 s, and two daemon restarts (the second in the middle of a burst). The last daemon runs for
//! most of the soak. At the end the soak checks, and writes to BENCHMARKS.md:
//! * the table equals the kernel's socket tables of the lab namespaces;
//! * every lifecycle record the kernel emitted while the last daemon ran (counted node-wide by a
//!   tracefs instance of the soak's own) was read or counted as lost;
//! * the last daemon's RSS is flat after warm-up;
//! * what reconciliation fixed, what was lost and why, the inventory reloads.
//!
//! Every loop is bounded in count and time; the lab is removed on every exit path.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    http,
    lab::{self, EchoServer, Lab, Pod},
};

/// The daemon under soak, as a child process.
struct Daemon(crate::daemon::Daemon);

impl Daemon {
    fn start(bin: &Path, args: &[String], log: &Path) -> Result<Daemon> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        crate::daemon::Daemon::start(bin, args, file, log, Duration::from_secs(60)).map(Daemon)
    }

    fn pid(&self) -> u32 {
        self.0.child.id()
    }

    fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn metrics(&self) -> Result<String> {
        let (code, text) = http::get(self.addr(), "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(text)
    }

    fn stop(mut self) -> Result<()> {
        self.0.stop(Duration::from_secs(20))
    }
}

/// Sum of the samples of `name` (with every label set) in a scrape; with `label`, only those
/// carrying it.
fn metric(text: &str, name: &str, label: Option<&str>) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with('{') || rest.starts_with(' ')
        })
        .filter(|l| label.is_none_or(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// A ConfigMap volume's layout: `inventory.yaml` → `..data/inventory.yaml`, `..data` → a
/// timestamped directory that [`Inventory::swap`] replaces atomically, as kubelet does.
struct Inventory {
    dir: PathBuf,
    version: u64,
}

impl Inventory {
    fn new(dir: &Path, text: &str) -> Result<Inventory> {
        std::fs::create_dir_all(dir)?;
        let mut inv = Inventory {
            dir: dir.to_path_buf(),
            version: 0,
        };
        inv.swap(text)?;
        std::os::unix::fs::symlink("..data/inventory.yaml", dir.join("inventory.yaml"))?;
        Ok(inv)
    }

    fn path(&self) -> PathBuf {
        self.dir.join("inventory.yaml")
    }

    fn swap(&mut self, text: &str) -> Result<()> {
        self.version += 1;
        let ts = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&ts))?;
        std::fs::write(self.dir.join(&ts).join("inventory.yaml"), text)?;
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&ts, &tmp)?;
        std::fs::rename(&tmp, self.dir.join("..data"))?;
        if self.version > 1 {
            let _ = std::fs::remove_dir_all(self.dir.join(format!("..v{}", self.version - 1)));
        }
        Ok(())
    }
}

fn inventory_text(lab: &Lab, version: u64) -> String {
    let mut y = String::from("pods:\n");
    for (i, p) in lab.pods.iter().enumerate() {
        let role = match i {
            0..=2 => "client",
            3 | 4 => "server",
            _ => "holder",
        };
        y.push_str(&format!(
            "  - {{name: {role}-{i}, namespace: soak, ip: {}, labels: {{app: {role}, rev: \"{version}\"}}}}\n",
            p.ipv4
        ));
    }
    y.push_str(
        "services:\n  - {name: echo, namespace: soak, headless: true, ports: [{port: 7000}], selector: {app: server}}\n",
    );
    y
}

/// The kernel's connections in a pod's namespace.
fn kernel_connections(pod: &Pod) -> Result<BTreeSet<(String, String)>> {
    let rows = pod.run(|| {
        let mut out = BTreeSet::new();
        for t in ["tcp", "tcp6"] {
            let text =
                std::fs::read_to_string(format!("/proc/thread-self/net/{t}")).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING
                if f.len() > 3 && matches!(f[3], "01" | "04" | "05" | "08" | "09" | "0B") {
                    out.insert((f[1].to_string(), f[2].to_string()));
                }
            }
        }
        out
    })?;
    Ok(rows)
}

/// The daemon's rows for a namespace, in /proc's hex notation.
fn table_rows(d: &Daemon, netns: u32) -> Result<BTreeSet<(String, String)>> {
    let (code, body) = http::get(d.addr(), &format!("/connections?netns={netns}"))?;
    if code != 200 {
        bail!("/connections answered {code}: {body}");
    }
    let page: serde_json::Value = serde_json::from_str(&body)?;
    let v = &page["connections"];
    let hex = |s: &str| -> Option<String> {
        let a: SocketAddr = s.parse().ok()?;
        Some(match a {
            SocketAddr::V4(v4) => format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(v4.ip().octets()),
                v4.port()
            ),
            SocketAddr::V6(v6) => {
                let o = v6.ip().octets();
                let words: String = o
                    .chunks(4)
                    .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                    .collect();
                format!("{words}:{:04X}", v6.port())
            }
        })
    };
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| Some((hex(c["local"].as_str()?)?, hex(c["remote"].as_str()?)?)))
        .collect())
}

/// A node-wide tracefs instance counting `sock/inet_sock_set_state` events fanout turns into
/// records. Removed when dropped.
struct Trace {
    dir: PathBuf,
}

impl Trace {
    fn start(name: &str) -> Result<Trace> {
        let dir = Path::new("/sys/kernel/tracing/instances").join(name);
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t = Trace { dir };
        std::fs::write(t.dir.join("buffer_size_kb"), "65536")?;
        std::fs::write(t.dir.join("events/sock/inet_sock_set_state/enable"), "1")?;
        Ok(t)
    }

    /// Stops; returns (records fanout would emit, events the instance itself lost).
    fn finish(&self) -> Result<(u64, u64)> {
        std::fs::write(self.dir.join("events/sock/inet_sock_set_state/enable"), "0")?;
        let mut lost = 0;
        for cpu in std::fs::read_dir(self.dir.join("per_cpu"))? {
            let stats = std::fs::read_to_string(cpu?.path().join("stats"))?;
            for l in stats.lines() {
                for f in ["overrun:", "dropped events:"] {
                    if let Some(v) = l.strip_prefix(f) {
                        lost += v.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
        let state = |l: &str, f: &str| -> Option<&'static str> {
            let v = l.split_whitespace().find_map(|w| w.strip_prefix(f))?;
            [
                "TCP_ESTABLISHED",
                "TCP_SYN_SENT",
                "TCP_SYN_RECV",
                "TCP_FIN_WAIT1",
                "TCP_FIN_WAIT2",
                "TCP_TIME_WAIT",
                "TCP_CLOSE",
                "TCP_CLOSE_WAIT",
                "TCP_LAST_ACK",
                "TCP_LISTEN",
                "TCP_CLOSING",
            ]
            .into_iter()
            .find(|s| *s == v)
        };
        let text = std::fs::read_to_string(self.dir.join("trace"))?;
        let emitted = text
            .lines()
            .filter(|l| l.contains("protocol=IPPROTO_TCP"))
            .filter(|l| {
                let (Some(o), Some(n)) = (state(l, "oldstate="), state(l, "newstate=")) else {
                    return false;
                };
                matches!(
                    (o, n),
                    ("TCP_SYN_SENT", "TCP_ESTABLISHED")
                        | ("TCP_SYN_RECV", "TCP_ESTABLISHED")
                        | ("TCP_SYN_SENT", "TCP_CLOSE")
                        | (
                            "TCP_ESTABLISHED"
                                | "TCP_FIN_WAIT1"
                                | "TCP_FIN_WAIT2"
                                | "TCP_TIME_WAIT"
                                | "TCP_CLOSE_WAIT"
                                | "TCP_LAST_ACK"
                                | "TCP_CLOSING",
                            "TCP_CLOSE"
                        )
                )
            })
            .count() as u64;
        Ok((emitted, lost))
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/sock/inet_sock_set_state/enable"), "0");
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Records read (accepts excluded: they come from another tracepoint; connects too: the kernel
/// makes one only when it cannot keep the socket's state) and records dropped.
fn read_and_dropped(metrics: &str) -> (u64, u64) {
    let read = metric(metrics, "fanout_records_total", None)
        - metric(metrics, "fanout_records_total", Some("kind=\"accepted\""))
        - metric(metrics, "fanout_records_total", Some("kind=\"connect\""));
    let dropped = ["ring_full", "kernel_skipped", "decode"]
        .iter()
        .map(|r| {
            metrics
                .lines()
                .filter(|l| l.starts_with("fanout_events_lost_total{reason=\""))
                .filter(|l| l.contains(&format!("reason=\"{r}")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    (read, dropped)
}

/// Runs the soak for `minutes` and writes its section of `out` (BENCHMARKS.md).
pub fn run(bin: &Path, minutes: u64, out: &Path) -> Result<()> {
    let total = Duration::from_secs(minutes.max(2) * 60);
    let started = Instant::now();
    let lab = Lab::new(6)?;
    let dir = std::env::temp_dir().join(format!("fanout-soak-{}", lab.prefix));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("fanout.log");
    let servers: Vec<EchoServer> = [3, 4]
        .iter()
        .map(|&i| {
            let p = lab.pod(i);
            EchoServer::start(
                p,
                p.addr(false, 7000),
                u32::MAX,
                total + Duration::from_secs(120),
            )
        })
        .collect::<Result<_, _>>()?;
    let targets: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let mut inventory = Inventory::new(&dir.join("inventory"), &inventory_text(&lab, 0))?;
    let args: Vec<String> = [
        "--inventory",
        &inventory.path().display().to_string(),
        "--ring-bytes",
        "65536",
        "--wakeup-bytes",
        "32768",
        "--reconcile-interval",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();

    let stop = Arc::new(AtomicBool::new(false));
    // Churn pauses while the accounting window opens, so that no record is in flight then.
    let paused = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let deadline = total + Duration::from_secs(60);
    // Steady churn: every client, paced.
    let churn: Vec<_> = (0..3)
        .map(|i| {
            let (pod, stop, paused, made, to) = (
                lab.pod(i).clone(),
                stop.clone(),
                paused.clone(),
                made.clone(),
                targets[i % 2],
            );
            std::thread::spawn(move || {
                let end = Instant::now() + deadline;
                while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                    if paused.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    let n = lab::connect_many(&pod, to, 40, Duration::from_secs(20))
                        .map(|v| v.len())
                        .unwrap_or(0);
                    made.fetch_add(n as u64, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();

    let mut daemon = Some(Daemon::start(bin, &args, &log)?);
    let mut restarts = 0;
    let mut swaps = 0;
    let mut bursts = 0;
    let mut held: Vec<TcpStream> = Vec::new();
    let holder = lab.pod(5).clone();
    let restart_at = [total / 7, total * 2 / 7];
    let mut rss: Vec<(Duration, u64)> = Vec::new();
    let mut last_daemon_start = Instant::now();
    let mut trace: Option<(Trace, (u64, u64))> = None;
    let mut next = (Instant::now(), Instant::now(), Instant::now());
    while started.elapsed() < total {
        let now = Instant::now();
        // Bursts every 20 s: three clients at once, far more than the ring holds.
        if now >= next.0 {
            next.0 = now + Duration::from_secs(20);
            bursts += 1;
            let runs: Vec<_> = (0..3)
                .map(|i| {
                    let (pod, to) = (lab.pod(i).clone(), targets[i % 2]);
                    std::thread::spawn(move || {
                        lab::connect_many(&pod, to, 1500, Duration::from_secs(60))
                            .map(|v| v.len())
                            .unwrap_or(0)
                    })
                })
                .collect();
            // The second restart happens in the middle of this burst.
            if restarts < restart_at.len() && started.elapsed() >= restart_at[restarts] {
                std::thread::sleep(Duration::from_millis(300));
                if let Some(d) = daemon.take() {
                    d.stop()?;
                }
                daemon = Some(Daemon::start(bin, &args, &log)?);
                restarts += 1;
                rss.clear();
                last_daemon_start = Instant::now();
            }
            for r in runs {
                made.fetch_add(r.join().unwrap_or(0) as u64, Ordering::Relaxed);
            }
            if restarts == restart_at.len() && trace.is_none() {
                // The last daemon: count what the kernel emits from now on, opening the window
                // while no lab record is in flight (churn paused, the ring read).
                paused.store(true, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1500));
                let base = read_and_dropped(&daemon.as_ref().context("daemon")?.metrics()?);
                let t = Trace::start(&format!("{}-soak", lab.prefix))?;
                paused.store(false, Ordering::Relaxed);
                trace = Some((t, base));
            }
        }
        // Long-lived connections replaced every 10 s.
        if now >= next.1 {
            next.1 = now + Duration::from_secs(10);
            let keep = held.len() / 2;
            held.truncate(keep);
            held.extend(lab::hold(&holder, targets[0], 30)?);
        }
        // The inventory swapped as a ConfigMap update every 15 s.
        if now >= next.2 {
            next.2 = now + Duration::from_secs(15);
            swaps += 1;
            inventory.swap(&inventory_text(&lab, swaps))?;
        }
        if let Some(d) = &daemon
            && let Some(kib) = d.rss_kib()
        {
            rss.push((last_daemon_start.elapsed(), kib));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    stop.store(true, Ordering::Relaxed);
    for c in churn {
        let _ = c.join();
    }
    held.truncate(25);
    let d = daemon.take().context("daemon")?;
    // Every record read (poll interval), then two reconciliation rounds and a margin; the
    // accounting window closes before the last scrape (the scrapes' own loopback connections are
    // outside it).
    std::thread::sleep(Duration::from_secs(6));
    let (emitted, trace_lost) = match &trace {
        Some((t, _)) => t.finish()?,
        None => bail!("the soak is too short to reach its last restart"),
    };
    let metrics = d.metrics()?;
    let base = trace.as_ref().map(|(_, b)| *b).unwrap_or_default();
    let (read, dropped) = read_and_dropped(&metrics);
    let (read_delta, dropped_delta) = (read - base.0, dropped - base.1);
    let mut table_diff = Vec::new();
    let mut rows = 0;
    for p in &lab.pods {
        let (k, t) = (kernel_connections(p)?, table_rows(&d, p.netns_inode)?);
        rows += t.len();
        if k != t {
            table_diff.push(format!(
                "{}: {} ghosts, {} holes",
                p.name,
                t.difference(&k).count(),
                k.difference(&t).count()
            ));
        }
    }
    drop(held);
    d.stop()?;

    // RSS after warm-up (the first fifth of the last daemon's life): the halves' medians.
    let warm: Vec<u64> = rss
        .iter()
        .skip(rss.len() / 5)
        .map(|(_, kib)| *kib)
        .collect();
    let median = |v: &[u64]| -> u64 {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    let (first, second) = warm.split_at(warm.len() / 2);
    let (rss_a, rss_b) = (median(first), median(second));
    let rss_peak = rss.iter().map(|(_, k)| *k).max().unwrap_or(0);
    let growth = rss_b as f64 / rss_a.max(1) as f64;

    let lost_by = |r: &str| metric(&metrics, "fanout_events_lost_total", Some(r));
    let mut md = String::new();
    writeln!(md, "## Soak")?;
    writeln!(md)?;
    writeln!(
        md,
        "Written by `cargo xtask soak --minutes {minutes}` ({} of churn). Bursts of 3 × 1500 \
         connections every 20 s into a 64 KiB ring (so that they overflow it), steady churn from \
         three client pods, 30 long-lived connections replaced every 10 s, the inventory swapped \
         ConfigMap-style every 15 s, two restarts (the second in the middle of a burst). The last \
         daemon ran {:.0} s.",
        humantime(started.elapsed()),
        last_daemon_start.elapsed().as_secs_f64()
    )?;
    writeln!(md)?;
    writeln!(md, "| figure | value |")?;
    writeln!(md, "| --- | ---: |")?;
    for (k, v) in [
        ("connections made", made.load(Ordering::Relaxed).to_string()),
        ("bursts", bursts.to_string()),
        ("restarts", restarts.to_string()),
        ("inventory swaps", swaps.to_string()),
        (
            "inventory reloads ok / error (last daemon)",
            format!(
                "{} / {}",
                metric(
                    &metrics,
                    "fanout_inventory_reloads_total",
                    Some("result=\"ok\"")
                ),
                metric(
                    &metrics,
                    "fanout_inventory_reloads_total",
                    Some("result=\"error\"")
                )
            ),
        ),
        (
            "records the kernel emitted while the last daemon ran (tracefs, node-wide)",
            emitted.to_string(),
        ),
        (
            "records read by the last daemon in that time",
            read_delta.to_string(),
        ),
        (
            "records counted lost in that time (ring_full, kernel_skipped, decode)",
            dropped_delta.to_string(),
        ),
        (
            "emitted − read − counted lost",
            (emitted as i64 - read_delta as i64 - dropped_delta as i64).to_string(),
        ),
        (
            "lost: ring_full (last daemon)",
            lost_by("ring_full").to_string(),
        ),
        (
            "lost: kernel_skipped (last daemon)",
            lost_by("kernel_skipped").to_string(),
        ),
        (
            "reconciled: removed / added (last daemon)",
            format!(
                "{} / {}",
                metric(&metrics, "fanout_reconciled_total", Some("removed")),
                metric(&metrics, "fanout_reconciled_total", Some("added"))
            ),
        ),
        (
            "lab rows at the end (table = kernel)",
            format!(
                "{rows} ({})",
                if table_diff.is_empty() {
                    "equal"
                } else {
                    "DIFFERENT"
                }
            ),
        ),
        (
            "RSS after warm-up: first half → second half (median)",
            format!(
                "{} → {} KiB ({:+.1} %)",
                rss_a,
                rss_b,
                (growth - 1.0) * 100.0
            ),
        ),
        ("RSS peak (last daemon)", format!("{rss_peak} KiB")),
    ] {
        writeln!(md, "| {k} | {v} |")?;
    }
    crate::report::write_section(out, "soak", &md)?;
    print!("{md}");
    let _ = std::fs::remove_dir_all(&dir);

    let mut failures = Vec::new();
    if !table_diff.is_empty() {
        failures.push(format!("table ≠ kernel: {}", table_diff.join("; ")));
    }
    if trace_lost > 0 {
        failures.push(format!("the tracefs instance lost {trace_lost} events"));
    }
    // Node traffic outside the lab (a few records) can be in flight when the window opens or
    // closes; anything more is a loss nobody counted.
    if emitted > read_delta + dropped_delta + 10 {
        failures.push(format!(
            "{} records neither read nor counted lost",
            emitted - read_delta - dropped_delta
        ));
    }
    if growth > 1.10 && rss_b.saturating_sub(rss_a) > 4096 {
        failures.push(format!("RSS grew {rss_a} → {rss_b} KiB after warm-up"));
    }
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    Ok(())
}

fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}m{:02}s", s / 60, s % 60)
}
