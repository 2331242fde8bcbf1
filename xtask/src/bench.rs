//! `cargo xtask bench`: what the tracer costs connection throughput, measured side by side.
//!
//! In a two-pod lab, one thread opens and closes connections as fast as it can (connect, one
//! byte each way, close) for a fixed count. Three setups take turns round after round, so that
//! the noise of this machine hits all of them alike:
//! * `off`: no tracer;
//! * `threshold`: the daemon as shipped (records submitted without wakeup, reader polls);
//! * `per-record`: the daemon woken for every record (`--wakeup-bytes 0`).
//!
//! Results (median connections per second and the ratios to `off`) go to BENCHMARKS.md.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    http,
    lab::{self, EchoServer, Lab},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    Off,
    Threshold,
    PerRecord,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Off, Setup::Threshold, Setup::PerRecord];

    fn name(self) -> &'static str {
        match self {
            Setup::Off => "off",
            Setup::Threshold => "threshold",
            Setup::PerRecord => "per-record",
        }
    }
}

struct Daemon(Child, SocketAddr);

impl Daemon {
    fn start(bin: &Path, setup: Setup) -> Result<Option<Daemon>> {
        let wakeup = match setup {
            Setup::Off => return Ok(None),
            Setup::Threshold => "262144",
            Setup::PerRecord => "0",
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new(bin)
            .args([
                "run",
                "--listen",
                &addr.to_string(),
                "--wakeup-bytes",
                wakeup,
                "--no-recover",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let d = Daemon(child, addr);
        let end = Instant::now() + Duration::from_secs(30);
        while !matches!(http::get(addr, "/healthz"), Ok((200, _))) {
            if Instant::now() > end {
                bail!("fanout did not become healthy");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(d))
    }

    /// Sum of fanout_events_lost_total over reasons.
    fn lost(&self) -> Result<u64> {
        let (_, text) = http::get(self.1, "/metrics")?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("fanout_events_lost_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }

    /// User + system CPU time of the daemon so far, in seconds.
    fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.0.id())).ok()?;
        // Fields after the parenthesised command; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        Some(ticks as f64 / hz)
    }

    fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.0.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Runs the benchmark and writes `out` (BENCHMARKS.md).
/// Runs the tracer benchmark and writes BENCHMARKS.md with it and `scrape`, the table that
/// `cargo bench -p fanout --bench scrape` printed.
pub fn run(bin: &Path, rounds: usize, conns: usize, scrape: &str, out: &Path) -> Result<()> {
    let lab = Lab::new(2)?;
    let (client, server_pod) = (lab.pod(0).clone(), lab.pod(1).clone());
    let warmup = 200;
    let total = (rounds * conns * Setup::ALL.len() + warmup) as u32;
    let server = EchoServer::start(
        &server_pod,
        server_pod.addr(false, 0),
        total,
        Duration::from_secs(1800),
    )?;
    // Warm-up (ARP, caches).
    lab::connect_many(&client, server.addr, warmup, Duration::from_secs(60))?;

    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); Setup::ALL.len()];
    let mut lost = [0u64; 3];
    let mut rss = [0u64; 3];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); Setup::ALL.len()];
    for round in 0..rounds {
        // Rotate the order so that no setup always follows the same one.
        for j in 0..Setup::ALL.len() {
            let i = (round + j) % Setup::ALL.len();
            let setup = Setup::ALL[i];
            let daemon = Daemon::start(bin, setup)?;
            // Let attaching (or the previous detach) settle before measuring.
            std::thread::sleep(Duration::from_secs(1));
            let cpu_before = daemon.as_ref().and_then(Daemon::cpu_secs);
            let start = Instant::now();
            let done = lab::connect_many(&client, server.addr, conns, Duration::from_secs(300))?;
            let secs = start.elapsed().as_secs_f64();
            if done.len() != conns {
                bail!(
                    "{}: only {} of {conns} connections",
                    setup.name(),
                    done.len()
                );
            }
            rates[i].push(conns as f64 / secs);
            if let Some(d) = &daemon {
                // Let the reader drain before reading the loss counters.
                std::thread::sleep(Duration::from_millis(300));
                lost[i] += d.lost()?;
                if let (Some(b), Some(a)) = (cpu_before, d.cpu_secs()) {
                    cpu[i].push((a - b) * 1000.0 / conns as f64 * 1000.0);
                }
                rss[i] = rss[i].max(d.rss_kib().unwrap_or(0));
            }
            drop(daemon);
            eprintln!(
                "round {}/{rounds} {:<10} {:>8.0} conn/s",
                round + 1,
                setup.name(),
                conns as f64 / secs
            );
        }
    }
    drop(server);

    let med: Vec<f64> = rates.iter().map(|r| median(&mut r.clone())).collect();
    let mut md = String::new();
    writeln!(md, "# Benchmarks")?;
    writeln!(md)?;
    writeln!(md, "Written by `cargo xtask bench`. Do not edit by hand.")?;
    writeln!(md)?;
    writeln!(md, "## Tracer cost on connection throughput")?;
    writeln!(md)?;
    writeln!(
        md,
        "One client thread in a lab pod opens, uses (one byte each way) and closes {conns} \
         connections to a server pod, per round. The three setups take turns in a rotating order, \
         {rounds} rounds, in one run, with a one-second pause after each start or stop. Each connection makes six records (connect, established, passive open, \
         accepted, and a close on each side)."
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| setup | median conn/s | ratio to off | daemon CPU ms per 1000 conns (median) | \
         records lost | daemon max RSS |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: |")?;
    for (i, setup) in Setup::ALL.iter().enumerate() {
        let ratio = if med[0] > 0.0 { med[i] / med[0] } else { 0.0 };
        let (c, l, r) = if *setup == Setup::Off {
            ("-".to_string(), "-".to_string(), "-".to_string())
        } else {
            (
                format!("{:.1}", median(&mut cpu[i])),
                lost[i].to_string(),
                format!("{} MiB", rss[i] / 1024),
            )
        };
        writeln!(
            md,
            "| {} | {:.0} | {:.2} | {} | {} | {} |",
            setup.name(),
            med[i],
            ratio,
            c,
            l,
            r
        )?;
    }
    writeln!(md)?;
    writeln!(
        md,
        "`threshold` is the default: records go in without a wakeup, and the reader polls every \
         100 ms or wakes once 256 KiB are waiting. `per-record` wakes the reader for every \
         record (`--wakeup-bytes 0`). Daemon CPU is its user + system time during the \
         measured part of a round (clock-tick resolution), scaled to 1000 connections. \
         Throughput on this 2-vCPU machine varies from round to round; compare the medians \
         of one run, not numbers across runs."
    )?;
    writeln!(md)?;
    writeln!(md, "Per-round throughput (conn/s):")?;
    writeln!(md)?;
    for (i, setup) in Setup::ALL.iter().enumerate() {
        let mut r = rates[i].clone();
        r.sort_by(|a, b| a.total_cmp(b));
        let list: Vec<String> = r.iter().map(|v| format!("{v:.0}")).collect();
        writeln!(md, "- {}: {}", setup.name(), list.join(", "))?;
    }
    writeln!(md)?;
    writeln!(md, "## Scrape cost of the balance metrics")?;
    writeln!(md)?;
    writeln!(
        md,
        "`daemon/benches/scrape.rs`, in process: client/service pairs of 3 backends each, one \
         reused connection per backend sampled every second, up to the default series cap \
         (50 000). \"analyzer locked\" is how long a scrape holds the analyzer (and with it \
         the event path) to take its snapshot; the rest of the encode runs unlocked. Medians \
         of 9 scrapes, in one run."
    )?;
    writeln!(md)?;
    let table: Vec<&str> = scrape.lines().filter(|l| l.starts_with('|')).collect();
    if table.len() < 3 {
        bail!("the scrape benchmark printed no table:\n{scrape}");
    }
    for l in table {
        writeln!(md, "{l}")?;
    }
    // The soak's section (`cargo xtask soak`) is kept as it is.
    let old = std::fs::read_to_string(out).unwrap_or_default();
    if let Some(soak) = crate::report::section(&old, "soak") {
        write!(md, "\n{soak}\n")?;
    }
    std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    print!("{md}");
    Ok(())
}
