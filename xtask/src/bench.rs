//! `cargo xtask bench`: what the tracer costs, measured so that the figures hold from run to run.
//!
//! * **Throughput, on versus off.** The load loop is `loadgen` (xtask/src/bin/loadgen.rs, built
//!   in release): one thread pinned to one CPU in a lab pod does connect, 64 B request, 64 B
//!   reply, close on the pod's loopback, against a server pinned to the other CPU. Rounds without
//!   the daemon (`off`) and with the release daemon (`on`, pinned to the server's CPU, never the
//!   loader's) alternate in pairs, in one run; the daemon is started before each `on` round and
//!   stopped after it, both outside the measured window. Besides connections per second, each
//!   round measures the CPU time of the loader's and the server's threads per connection, which
//!   other work on the machine does not inflate the way it does wall-clock time.
//! * **The kernel's own figures.** With `kernel.bpf_stats_enabled=1` (restored afterwards), the
//!   run time and run count of each of the daemon's programs (from /proc/<pid>/fdinfo of its
//!   bpf-prog fds) before and after each `on` round: BPF nanoseconds per connection, per program,
//!   and per packet of the cgroup_skb HTTP/2 scanner on traffic that carries no HTTP/2. Daemon
//!   CPU per connection comes from /proc/<pid>/task/*/schedstat (nanoseconds).
//! * **Record capacity.** Pinned loaders at increasing load against one daemon: records read per
//!   second (`fanout_records_total`) and losses (`fanout_events_lost_total`) per step.
//! * **Memory and API.** RSS idle, with 10 000 live connections, with an inventory of 10 000
//!   pods and 1 000 services, and both; the kernel memory of the daemon's maps; API latency with
//!   20 000 table rows.
//!
//! The results go to the `bench` section of BENCHMARKS.md (other commands' sections are kept),
//! together with the scrape-cost table of `daemon/benches/scrape.rs`. Labs, daemons, loaders and
//! the bpf_stats setting are cleaned up on every exit path, Ctrl-C and SIGTERM included.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    http,
    lab::{self, Lab, Pod},
    report,
};

/// The budgets. `None`: the issue gave no number for this figure (the table says so).
mod budget {
    /// BPF time per connection, all programs together.
    pub const BPF_NS_PER_CONN: f64 = 1000.0;
    /// The HTTP/2 scanner per packet that carries no HTTP/2.
    pub const H2_NS_PER_PACKET: f64 = 50.0;
    /// Records read per second without a loss.
    pub const RECORDS_PER_SEC: f64 = 300_000.0;
    /// RSS (MiB): idle, 10 k live connections, inventory of 10 k pods and 1 k services, both.
    pub const RSS_IDLE_MIB: Option<f64> = None;
    pub const RSS_CONNS_MIB: Option<f64> = None;
    pub const RSS_INVENTORY_MIB: Option<f64> = None;
    pub const RSS_BOTH_MIB: Option<f64> = None;
    /// Kernel memory of the maps (MiB).
    pub const MAPS_MIB: Option<f64> = None;
    /// p99 latencies (ms).
    pub const PEERS_100_P99_MS: Option<f64> = None;
    pub const PEERS_10K_P99_MS: Option<f64> = None;
    /// `GET /connections`: one page (the whole table from an agent without pages), and the
    /// whole table page by page.
    pub const CONNECTIONS_PAGE_P99_MS: Option<f64> = None;
    pub const CONNECTIONS_ALL_P99_MS: Option<f64> = None;
    pub const METRICS_P99_MS: Option<f64> = None;
}

/// The section of BENCHMARKS.md this command owns.
const SECTION: &str = "bench";

const HEADER: &str = "# Benchmarks\n\nWritten by `cargo xtask bench` and `cargo xtask soak`, \
                      each into its own section. Do not edit by hand.\n";

// ---------------------------------------------------------------------------------------------
// Pure pieces (unit-tested).

/// The median (the mean of the two middle values for an even count); NaN when empty.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// (min, max); NaN when empty.
pub fn min_max(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// The nearest-rank percentile `p` (0–100): the smallest value with at least p % of the values
/// at or below it; NaN when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// What /proc/<pid>/fdinfo/<fd> says about a bpf-prog or bpf-map fd.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FdInfo {
    /// `prog_id` or `map_id`.
    pub id: u64,
    pub prog_type: Option<u64>,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub memlock: u64,
}

/// Parses fdinfo text (`key:\tvalue` lines); `None` without a `prog_id` or `map_id`.
pub fn parse_fdinfo(text: &str) -> Option<FdInfo> {
    let mut info = FdInfo::default();
    let mut id = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let Ok(n) = v.trim().parse::<u64>() else {
            continue;
        };
        match k.trim() {
            "prog_id" | "map_id" => id = Some(n),
            "prog_type" => info.prog_type = Some(n),
            "run_time_ns" => info.run_time_ns = n,
            "run_cnt" => info.run_cnt = n,
            "memlock" => info.memlock = n,
            _ => {}
        }
    }
    info.id = id?;
    Some(info)
}

/// The sum of every sample of metric `name` (any labels) in a Prometheus/OpenMetrics scrape.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The samples of metric `name` per value of `label` (summed over the other labels).
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let key = format!("{label}=\"");
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(v) = labels
            .split_once(&key)
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(v, _)| v.to_string())
        else {
            continue;
        };
        if let Ok(n) = value.trim().parse::<f64>() {
            *out.entry(v).or_insert(0.0) += n;
        }
    }
    out
}

/// "3 (ring_full 2, kernel_skipped 1)": what grew from `before` to `after`.
pub fn growth(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let d: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    let total: f64 = d.iter().map(|(_, v)| v).sum();
    if d.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = d.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!("{total} ({})", parts.join(", "))
}

/// The rows a `GET /connections` answer counts: its `total` (a page of the table), or the length
/// of the array (an agent without pages).
pub fn rows_in(v: &serde_json::Value) -> Option<usize> {
    match v {
        serde_json::Value::Array(a) => Some(a.len()),
        v => v["total"].as_u64().map(|n| n as usize),
    }
}

/// The `//!` doc comment of a source file as one paragraph, without the sentences that name
/// `cargo xtask bench` (which says where the table goes, not what it is).
pub fn doc_comment(src: &str) -> String {
    let text: Vec<&str> = src
        .lines()
        .map_while(|l| l.strip_prefix("//!"))
        .map(str::trim)
        .collect();
    let text = text.join(" ");
    text.split_inclusive(". ")
        .filter(|s| !s.contains("cargo xtask bench"))
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first field of a schedstat line: time spent on the CPU, in nanoseconds.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// BENCHMARKS.md with this command's section set to `body`. Every other command's section is
/// kept as it is; text outside sections (the layout before sections existed) is dropped.
pub fn compose(old: &str, body: &str) -> String {
    if report::section(old, SECTION).is_some() {
        return report::replace(old, SECTION, body);
    }
    let mut md = format!("{HEADER}\n<!-- {SECTION}:begin -->\n<!-- {SECTION}:end -->\n");
    let mut rest = old;
    while let Some(a) = rest.find("<!-- ") {
        let after = &rest[a + 5..];
        let Some(name) = after
            .split_once(":begin -->")
            .map(|(n, _)| n)
            .filter(|n| !n.contains(char::is_whitespace) && !n.is_empty())
        else {
            rest = after;
            continue;
        };
        match report::section(rest, name) {
            Some(s) if name != SECTION => {
                write!(md, "\n{s}\n").ok();
                rest = &rest[rest.find(s).unwrap_or(0) + s.len()..];
            }
            _ => rest = after,
        }
    }
    report::replace(&md, SECTION, body)
}

/// The inventory: the lab's pods (with their IPs, so that they have identities), one service
/// over the echo server, and `pods` synthetic pods in 100 namespaces under `services`
/// ClusterIP services of 10 pods each. The synthetic pods need not exist.
pub fn inventory(lab_pods: &[(&str, &str, Vec<String>)], pods: usize, services: usize) -> String {
    let mut y = String::from("# Written by `cargo xtask bench`.\npods:\n");
    for (name, app, ips) in lab_pods {
        let _ = writeln!(
            y,
            "  - {{name: {name}, namespace: bench, ips: [{}], labels: {{app: {app}}}, \
             workload: Deployment/{name}}}",
            ips.join(", ")
        );
    }
    for k in 0..pods {
        let _ = writeln!(
            y,
            "  - {{name: p{k}, namespace: synth-{}, ip: 10.100.{}.{}, labels: {{app: s{}}}, \
             workload: Deployment/s{}}}",
            (k / 10) % 100,
            k / 250,
            k % 250 + 1,
            k / 10,
            k / 10
        );
    }
    y.push_str(
        "services:\n  - {name: echo, namespace: bench, cluster_ip: 10.96.0.10, \
         ports: [{port: 8080}], selector: {app: echo}}\n",
    );
    for j in 0..services {
        let _ = writeln!(
            y,
            "  - {{name: s{j}, namespace: synth-{}, cluster_ip: 10.97.{}.{}, \
             ports: [{{port: 80, target_port: 8080, name: grpc}}], selector: {{app: s{j}}}}}",
            j % 100,
            j / 250,
            j % 250 + 1
        );
    }
    y
}

fn fmt_ns(ns: f64) -> String {
    if !ns.is_finite() {
        "-".into()
    } else if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else if ns >= 1000.0 {
        format!("{:.2} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        "-".into()
    } else if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

fn fmt_mib(kib: f64) -> String {
    format!("{:.1} MiB", kib / 1024.0)
}

fn fmt_bytes(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    } else {
        format!("{:.0} KiB", b as f64 / 1024.0)
    }
}

/// "≤ goal" and "yes"/"no" for an upper bound; "none given" and "-" without one.
fn goal_le(goal: Option<f64>, measured: f64, unit: &str) -> (String, &'static str) {
    match goal {
        None => ("none given".into(), "-"),
        Some(g) => (
            format!("≤ {g} {unit}"),
            if measured <= g { "yes" } else { "no" },
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Cleanup on every exit path.

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Fails once Ctrl-C or SIGTERM arrived, so that everything is dropped (and cleaned up) on the
/// way out.
fn check() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted: cleaned up, BENCHMARKS.md not written");
    }
    Ok(())
}

/// `kernel.bpf_stats_enabled=1` while alive; the previous value is restored on drop.
struct BpfStats {
    prev: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let prev = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_string();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(BpfStats { prev })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS, &self.prev) {
            eprintln!("bench: restoring {BPF_STATS} to {}: {e}", self.prev);
        }
    }
}

/// A cpu_set_t holding `cpu`.
fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// The first two CPUs this process may run on: (the loader's, the server's and daemon's).
fn two_cpus() -> Result<(usize, usize)> {
    // SAFETY: cpu_set_t is plain data, filled by the kernel.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        set
    };
    // SAFETY: reading a bit of a valid cpu_set_t.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    match cpus.as_slice() {
        [a, b, ..] => Ok((*a, *b)),
        _ => bail!(
            "the benchmark pins the load and the daemon to two CPUs; this process has {cpus:?}"
        ),
    }
}

/// Raises RLIMIT_NOFILE to at least `n` (the client ends of the held connections).
fn raise_nofile(n: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        if lim.rlim_cur >= n {
            return Ok(());
        }
        lim.rlim_cur = n;
        lim.rlim_max = lim.rlim_max.max(n);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!(
                "raising the open-files limit to {n}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The daemon.

struct Daemon {
    child: Child,
    addr: SocketAddr,
    /// Spawn to healthy.
    start_secs: f64,
    stopped: bool,
}

impl Daemon {
    /// Starts the release daemon as shipped (only `--listen` and `--inventory` given), pinned to
    /// `cpu` from before its first instruction, so that every thread it makes stays there.
    fn start(bin: &Path, cpu: usize, inventory: &Path, log: &Path) -> Result<Daemon> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let set = cpu_set(cpu);
        let mut cmd = Command::new(bin);
        cmd.args(["run", "--listen", &addr.to_string(), "--inventory"])
            .arg(inventory)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)?,
            );
        // SAFETY: sched_setaffinity is a plain system call, async-signal-safe; `set` was built
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut d = Daemon {
            child,
            addr,
            start_secs: 0.0,
            stopped: false,
        };
        let end = t0 + Duration::from_secs(120);
        loop {
            check()?;
            if let Ok((200, _)) = http::get(addr, "/healthz") {
                d.start_secs = t0.elapsed().as_secs_f64();
                return Ok(d);
            }
            if let Some(st) = d.child.try_wait()? {
                d.stopped = true;
                bail!("fanout exited with {st} (log: {})", log.display());
            }
            if Instant::now() > end {
                bail!("fanout not healthy after 120 s (log: {})", log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn metrics(&self) -> Result<String> {
        let (code, text) = http::get(self.addr, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(text)
    }

    /// (records read, records lost) so far.
    fn records(&self) -> Result<(f64, f64)> {
        let m = self.metrics()?;
        Ok((
            metric_sum(&m, "fanout_records_total"),
            metric_sum(&m, "fanout_events_lost_total"),
        ))
    }

    /// fdinfo of every fd of the daemon whose link is `anon_inode:<kind>`, one per id.
    fn bpf_fds(&self, kind: &str) -> Result<Vec<FdInfo>> {
        let pid = self.pid();
        let want = format!("anon_inode:{kind}");
        let mut out: BTreeMap<u64, FdInfo> = BTreeMap::new();
        for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
            let e = e?;
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            if link.as_os_str() != want.as_str() {
                continue;
            }
            let fd = e.file_name();
            let Ok(text) =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
            else {
                continue;
            };
            if let Some(info) = parse_fdinfo(&text) {
                out.insert(info.id, info);
            }
        }
        Ok(out.into_values().collect())
    }

    /// CPU time of all the daemon's threads so far, in nanoseconds.
    fn cpu_ns(&self) -> Result<u64> {
        task_cpu_ns(self.pid())
    }

    fn rss_kib(&self) -> Result<f64> {
        self.status_kib("VmRSS")
    }

    /// A `kB` field of /proc/<pid>/status (VmRSS, VmHWM).
    fn status_kib(&self, field: &str) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {field}"))
    }

    /// SIGTERM and wait; the seconds it took.
    fn stop(&mut self) -> Result<f64> {
        if self.stopped {
            return Ok(0.0);
        }
        self.stopped = true;
        let t0 = Instant::now();
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let end = t0 + Duration::from_secs(20);
        while Instant::now() < end {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("fanout exited with {st} on SIGTERM");
                }
                return Ok(t0.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("fanout did not stop within 20 s of SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("bench: stopping fanout: {e}");
        }
    }
}

/// CPU time of the live threads of process `pid` so far, in nanoseconds
/// (/proc/<pid>/task/*/schedstat).
fn task_cpu_ns(pid: u32) -> Result<u64> {
    let mut sum = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        if let Ok(text) = std::fs::read_to_string(e?.path().join("schedstat")) {
            sum += parse_schedstat(&text).unwrap_or(0);
        }
    }
    Ok(sum)
}

/// Program id → (name, type) as bpftool shows them (full names from BTF); empty without bpftool.
fn prog_names() -> HashMap<u64, (String, String)> {
    let Ok(out) = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()
    else {
        return HashMap::new();
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return HashMap::new();
    };
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()?,
                (
                    p["name"].as_str().unwrap_or("?").to_string(),
                    p["type"].as_str().unwrap_or("?").to_string(),
                ),
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The load generator.

fn loadgen_cmd(bin: &Path, mode: &str, pod: &Pod) -> Command {
    let mut c = Command::new(bin);
    c.arg(mode)
        .arg("--netns")
        .arg(Path::new("/run/netns").join(&pod.netns))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    c
}

/// `loadgen serve`: answers 64 B for 64 B; stops when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(bin: &Path, pod: &Pod, cpu: usize, threads: usize) -> Result<Server> {
        let mut child = loadgen_cmd(bin, "serve", pod)
            .args([
                "--cpus",
                &cpu.to_string(),
                "--threads",
                &threads.to_string(),
            ])
            .args(["--addr", "127.0.0.1:0"])
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut line = String::new();
        let read = child
            .stdout
            .take()
            .map(|o| BufReader::new(o).read_line(&mut line));
        let server = |port| Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        match (read, line.trim().strip_prefix("port ").map(str::parse)) {
            (Some(Ok(_)), Some(Ok(port))) => Ok(server(port)),
            _ => {
                drop(server(0));
                bail!("loadgen serve did not start: {line:?}")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One load command's result.
#[derive(Clone, Copy, Debug)]
struct Run {
    ok: u64,
    errors: u64,
    secs: f64,
    /// CPU time of the load threads.
    cpu_secs: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

/// `loadgen client`: runs load commands in a pod; killed when dropped.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// What one load command does.
#[derive(Clone, Debug)]
struct Load {
    refused: bool,
    threads: usize,
    /// Attempts, 0 for no limit.
    count: u64,
    secs: f64,
    /// Attempts per second, 0 for as fast as it can.
    rate: f64,
    cpus: Vec<usize>,
}

impl Client {
    fn start(bin: &Path, pod: &Pod) -> Result<Client> {
        let mut child = loadgen_cmd(bin, "client", pod)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("loadgen client: no pipes");
        };
        Ok(Client {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    fn run(&mut self, load: &Load, to: SocketAddr) -> Result<Run> {
        check()?;
        let cpus: Vec<String> = load.cpus.iter().map(usize::to_string).collect();
        writeln!(
            self.stdin,
            "{} {} {} {} {} {} {to}",
            if load.refused { "refused" } else { "conn" },
            load.threads,
            load.count,
            load.secs,
            load.rate,
            cpus.join(",")
        )?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["done", ok, errors, secs, cpu] => Ok(Run {
                ok: ok.parse()?,
                errors: errors.parse()?,
                secs: secs.parse()?,
                cpu_secs: cpu.parse()?,
            }),
            _ => bail!("loadgen client answered {line:?}"),
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Holding connections open.

/// `loadgen hold`: accepts connections in a pod and keeps them open until dropped. A process of
/// its own: the two ends of 10 000 connections need more open files than one process may have.
struct Holder {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: SocketAddr,
}

impl Holder {
    fn start(bin: &Path, pod: &Pod, port: u16) -> Result<Holder> {
        let mut child = loadgen_cmd(bin, "hold", pod)
            .args(["--addr", &pod.addr(false, port).to_string()])
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("loadgen hold: no pipes");
        };
        let mut h = Holder {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            addr: pod.addr(false, port),
        };
        let mut line = String::new();
        h.stdout.read_line(&mut line)?;
        match line.trim().strip_prefix("port ").map(str::parse::<u16>) {
            Some(Ok(p)) => h.addr.set_port(p),
            _ => bail!("loadgen hold did not start: {line:?}"),
        }
        Ok(h)
    }

    /// Connections accepted so far.
    fn held(&mut self) -> Result<usize> {
        writeln!(self.stdin)?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .strip_prefix("held ")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("loadgen hold answered {line:?}"))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The phases.

/// What one `on` round measured.
struct OnRound {
    conns: f64,
    /// Per program: (name, type, Δrun_time_ns, Δrun_cnt).
    progs: Vec<(String, String, u64, u64)>,
    cpu_ns: u64,
    records: f64,
    lost: f64,
}

impl OnRound {
    fn bpf_ns_per_conn(&self) -> f64 {
        self.progs.iter().map(|p| p.2 as f64).sum::<f64>() / self.conns
    }
}

/// One round of the throughput phase: connections per second, and CPU time per connection of
/// the load loop's threads and the server's.
#[derive(Clone, Copy, Default)]
struct Round {
    rate: f64,
    cpu_ns: f64,
}

struct Throughput {
    /// (off, on) per pair.
    pairs: Vec<(Round, Round)>,
    on: Vec<OnRound>,
    start_secs: Vec<f64>,
    stop_secs: Vec<f64>,
}

fn prog_stats(d: &Daemon) -> Result<BTreeMap<u64, FdInfo>> {
    Ok(d.bpf_fds("bpf-prog")?
        .into_iter()
        .map(|i| (i.id, i))
        .collect())
}

struct Ctx<'a> {
    fanout: &'a Path,
    inventory: &'a Path,
    log: &'a Path,
    daemon_cpu: usize,
}

impl Ctx<'_> {
    fn daemon(&self) -> Result<Daemon> {
        Daemon::start(self.fanout, self.daemon_cpu, self.inventory, self.log)
    }
}

fn throughput(
    ctx: &Ctx,
    client: &mut Client,
    server: &Server,
    load: &Load,
    pairs: usize,
) -> Result<Throughput> {
    let to = server.addr;
    // Runs the load loop once: the run and the CPU time per connection of loader and server.
    let measure = |client: &mut Client| -> Result<(Run, Round)> {
        let s0 = task_cpu_ns(server.child.id())?;
        let r = client.run(load, to)?;
        let s1 = task_cpu_ns(server.child.id())?;
        if r.errors > r.ok / 100 {
            bail!(
                "the load loop failed {} of {} connections",
                r.errors,
                r.ok + r.errors
            );
        }
        let cpu = r.cpu_secs * 1e9 + s1.saturating_sub(s0) as f64;
        Ok((
            r,
            Round {
                rate: r.rate(),
                cpu_ns: cpu / r.ok as f64,
            },
        ))
    };
    let mut t = Throughput {
        pairs: Vec::new(),
        on: Vec::new(),
        start_secs: Vec::new(),
        stop_secs: Vec::new(),
    };
    for pair in 0..pairs {
        // off, on in even pairs; on, off in odd ones: drift hits both sides alike.
        let mut off = Round::default();
        let mut on = Round::default();
        for is_on in [pair % 2 == 1, pair % 2 == 0] {
            check()?;
            if !is_on {
                off = measure(client)?.1;
                eprintln!(
                    "pair {}/{pairs} off {:>8.0} conn/s, load CPU {:.2} µs/conn",
                    pair + 1,
                    off.rate,
                    off.cpu_ns / 1000.0
                );
                continue;
            }
            let mut d = ctx.daemon()?;
            t.start_secs.push(d.start_secs);
            // Let attaching and startup recovery settle before measuring.
            std::thread::sleep(Duration::from_secs(1));
            let names = prog_names();
            let (rec0, lost0) = d.records()?;
            let (p0, c0) = (prog_stats(&d)?, d.cpu_ns()?);
            let (r, round) = measure(client)?;
            let p1 = prog_stats(&d)?;
            // Let the reader drain what the round left in the ring (its CPU counts).
            std::thread::sleep(Duration::from_millis(500));
            let c1 = d.cpu_ns()?;
            let (rec1, lost1) = d.records()?;
            t.stop_secs.push(d.stop()?);
            drop(d);
            on = round;
            let mut progs: Vec<(String, String, u64, u64)> = Vec::new();
            for (id, a) in &p1 {
                let b = p0.get(id).copied().unwrap_or_default();
                let (mut name, ty) = names
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| (format!("prog{}", progs.len()), "?".into()));
                // Names bpftool could only show truncated may repeat: keep them apart.
                if progs.iter().any(|p| p.0 == name) {
                    name = format!("{name}#{id}");
                }
                progs.push((
                    name,
                    ty,
                    a.run_time_ns.saturating_sub(b.run_time_ns),
                    a.run_cnt.saturating_sub(b.run_cnt),
                ));
            }
            let round_on = OnRound {
                conns: r.ok as f64,
                progs,
                cpu_ns: c1.saturating_sub(c0),
                records: rec1 - rec0,
                lost: lost1 - lost0,
            };
            eprintln!(
                "pair {}/{pairs} on  {:>8.0} conn/s, load CPU {:.2} µs/conn, BPF {:.0} ns/conn, \
                 daemon CPU {:.2} µs/conn",
                pair + 1,
                on.rate,
                on.cpu_ns / 1000.0,
                round_on.bpf_ns_per_conn(),
                round_on.cpu_ns as f64 / round_on.conns / 1000.0
            );
            t.on.push(round_on);
            // Let the detach settle before an off round.
            std::thread::sleep(Duration::from_millis(500));
        }
        t.pairs.push((off, on));
    }
    Ok(t)
}

/// One capacity step's result.
struct Step {
    what: String,
    load: Load,
    run: Run,
    records_per_sec: f64,
    lost: f64,
    /// The loss and its reasons.
    lost_text: String,
}

fn capacity(
    ctx: &Ctx,
    client: &mut Client,
    server: SocketAddr,
    refused_at: SocketAddr,
    (a, b): (usize, usize),
) -> Result<Vec<Step>> {
    let secs = 3.0;
    let step = |refused: bool, threads: usize, rate: f64, cpus: Vec<usize>| Load {
        refused,
        threads,
        count: 0,
        secs,
        rate,
        cpus,
    };
    let plan = [
        ("connect/close", step(false, 1, 5000.0, vec![a])),
        ("connect/close", step(false, 1, 0.0, vec![a])),
        ("connect/close", step(false, 2, 0.0, vec![a, b])),
        ("refused connect", step(true, 1, 50_000.0, vec![a])),
        ("refused connect", step(true, 1, 0.0, vec![a])),
        ("refused connect", step(true, 2, 0.0, vec![a, b])),
    ];
    let d = ctx.daemon()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut out = Vec::new();
    for (what, load) in plan {
        let to = if load.refused { refused_at } else { server };
        let m0 = d.metrics()?;
        let run = client.run(&load, to)?;
        // Let the reader drain the ring: the records of the step count, however late read.
        std::thread::sleep(Duration::from_millis(700));
        let m1 = d.metrics()?;
        let lost = |m: &str| metric_by_label(m, "fanout_events_lost_total", "reason");
        let s = Step {
            what: what.to_string(),
            records_per_sec: (metric_sum(&m1, "fanout_records_total")
                - metric_sum(&m0, "fanout_records_total"))
                / run.secs,
            lost: metric_sum(&m1, "fanout_events_lost_total")
                - metric_sum(&m0, "fanout_events_lost_total"),
            lost_text: growth(&lost(&m0), &lost(&m1)),
            load,
            run,
        };
        eprintln!(
            "capacity: {} × {} ({}): {:.0} attempts/s, {:.0} records/s, {} lost",
            s.what,
            s.load.threads,
            if s.load.rate > 0.0 {
                format!("{:.0}/s", s.load.rate)
            } else {
                "max".into()
            },
            s.run.rate(),
            s.records_per_sec,
            s.lost_text
        );
        out.push(s);
    }
    Ok(out)
}

/// Memory and API figures.
#[derive(Default)]
struct Memory {
    rss_idle: f64,
    rss_conns: f64,
    rss_inventory: f64,
    rss_both: f64,
    /// After the API requests, and the peak (VmHWM) then.
    rss_after_api: f64,
    hwm_after_api: f64,
    maps: u64,
    map_count: usize,
    rows: f64,
    /// (label, connections of the pod, response bytes, latencies ms)
    api: Vec<(String, String, usize, Vec<f64>)>,
}

/// Waits until the table holds `want` rows of the network namespaces `netns` (bounded); returns
/// the whole table's size then (`fanout_tcp_connections_active`).
fn wait_rows(d: &Daemon, netns: &[u32], want: usize) -> Result<f64> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        check()?;
        let mut n = 0;
        for ns in netns {
            let body = get_ok(d, &format!("/connections?netns={ns}"))?;
            n += rows_in(&serde_json::from_str(&body)?)
                .with_context(|| format!("/connections?netns={ns}: neither rows nor a total"))?;
        }
        if n == want {
            return Ok(metric_sum(&d.metrics()?, "fanout_tcp_connections_active"));
        }
        if Instant::now() > end {
            bail!("the table holds {n} rows of the lab's pods, expected {want}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Opens the held connections: 100 from `small`, `total - 100` from `bulk`, to `holder`.
fn hold(small: &Pod, bulk: &Pod, holder: &mut Holder, total: usize) -> Result<Vec<Vec<TcpStream>>> {
    let a = lab::hold(small, holder.addr, 100)?;
    let b = lab::hold(bulk, holder.addr, total - 100)?;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let n = holder.held()?;
        if n >= total {
            return Ok(vec![a, b]);
        }
        check()?;
        if Instant::now() > end {
            bail!("the holder accepted only {n} of {total}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// GETs `path`, which must answer 200.
fn get_ok(d: &Daemon, path: &str) -> Result<String> {
    let (code, body) = http::get(d.addr, path)?;
    if code != 200 {
        bail!(
            "GET {path} answered {code}: {}",
            &body[..body.len().min(200)]
        );
    }
    Ok(body)
}

/// The whole table through `GET /connections`, following the `next` cursors from page to page
/// (an agent that answers one JSON array has one page): (bytes, pages).
fn get_table(d: &Daemon) -> Result<(usize, usize)> {
    let (mut bytes, mut pages) = (0, 0);
    let mut path = "/connections".to_string();
    loop {
        let body = get_ok(d, &path)?;
        bytes += body.len();
        pages += 1;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        match v["next"].as_str() {
            Some(next) if pages < 1000 => {
                path = format!("/connections?after={}", crate::prom::urlencode(next))
            }
            _ => return Ok((bytes, pages)),
        }
    }
}

/// Runs `f` (which returns a response size) up to `max` times within `budget`, at least 5 times,
/// after one unmeasured run: latencies in ms, and the last size.
fn sample(
    max: usize,
    budget: Duration,
    mut f: impl FnMut() -> Result<usize>,
) -> Result<(Vec<f64>, usize)> {
    let mut size = f()?;
    let mut ms = Vec::new();
    let end = Instant::now() + budget;
    while ms.len() < max && (ms.len() < 5 || Instant::now() < end) {
        check()?;
        let t0 = Instant::now();
        size = f()?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((ms, size))
}

fn memory(
    fanout: &Path,
    loadgen: &Path,
    daemon_cpu: usize,
    log: &Path,
    (small_inv, big_inv): (&Path, &Path),
    (server, small, bulk): (&Pod, &Pod, &Pod),
) -> Result<Memory> {
    const HELD: usize = 10_000;
    // The client ends (the server ends are the holder's).
    raise_nofile(HELD as u64 + 1000)?;
    let mut m = Memory::default();
    let settle = || std::thread::sleep(Duration::from_secs(3));
    for big in [false, true] {
        let inv = if big { big_inv } else { small_inv };
        let d = Daemon::start(fanout, daemon_cpu, inv, log)?;
        settle();
        if big {
            m.rss_inventory = d.rss_kib()?;
        } else {
            m.rss_idle = d.rss_kib()?;
            let maps = d.bpf_fds("bpf-map")?;
            m.maps = maps.iter().map(|i| i.memlock).sum();
            m.map_count = maps.len();
        }
        eprintln!(
            "memory: {} MiB idle ({})",
            d.rss_kib()? / 1024.0,
            inv.display()
        );
        let mut holder = Holder::start(loadgen, server, 8080)?;
        let held = hold(small, bulk, &mut holder, HELD)?;
        // Both ends are lab pods: two rows per connection.
        let pods = [server.netns_inode, small.netns_inode, bulk.netns_inode];
        m.rows = wait_rows(&d, &pods, 2 * HELD)?;
        settle();
        if big {
            m.rss_both = d.rss_kib()?;
            // Where the memory is, for whoever reads the log (`--memory-only` prints the path).
            let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", d.pid()))?;
            std::fs::write(log.with_file_name("smaps-both.txt"), smaps)?;
            let budget = Duration::from_secs(20);
            let mut api = |label: String,
                           conns: &str,
                           max: usize,
                           f: &mut dyn FnMut() -> Result<usize>|
             -> Result<()> {
                let (ms, size) = sample(max, budget, f)?;
                eprintln!(
                    "api: {label}: p50 {:.2} ms p99 {:.2} ms ({} samples, {size} B)",
                    percentile(&ms, 50.0),
                    percentile(&ms, 99.0),
                    ms.len()
                );
                m.api.push((label, conns.to_string(), size, ms));
                Ok(())
            };
            for (path, conns, max) in [
                ("/pods/bench/small-client/peers", "100", 200),
                ("/pods/bench/echo-server/peers", "10 000", 100),
                ("/connections", "20 000 rows", 100),
            ] {
                api(format!("`GET {path}`"), conns, max, &mut || {
                    Ok(get_ok(&d, path)?.len())
                })?;
            }
            let (_, pages) = get_table(&d)?;
            api(
                format!("the whole table: `GET /connections` and its {pages} page(s)"),
                "20 000 rows",
                50,
                &mut || Ok(get_table(&d)?.0),
            )?;
            api("`GET /metrics`".into(), "-", 200, &mut || {
                Ok(get_ok(&d, "/metrics")?.len())
            })?;
            m.rss_after_api = d.rss_kib()?;
            m.hwm_after_api = d.status_kib("VmHWM")?;
        } else {
            m.rss_conns = d.rss_kib()?;
        }
        eprintln!(
            "memory: {} MiB with {HELD} connections (at the end)",
            d.rss_kib()? / 1024.0
        );
        drop(held);
        drop(holder);
        drop(d);
    }
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// The whole run.

/// Options of `cargo xtask bench`.
pub struct Options {
    /// on/off pairs of the throughput phase.
    pub pairs: usize,
    /// Connections per throughput round.
    pub conns: u64,
    /// Only the memory and API phase, printed to stderr; BENCHMARKS.md is not written.
    pub memory_only: bool,
}

/// Runs the benchmark with the release daemon `fanout` and the release load generator
/// `loadgen`, and writes the `bench` section of `out` (BENCHMARKS.md) with it and `scrape`, the
/// table that `cargo bench -p fanout --bench scrape` printed.
pub fn run(fanout: &Path, loadgen: &Path, opts: &Options, scrape: &str, out: &Path) -> Result<()> {
    let scrape_table: Vec<&str> = scrape.lines().filter(|l| l.starts_with('|')).collect();
    if !opts.memory_only && scrape_table.len() < 3 {
        bail!("the scrape benchmark printed no table:\n{scrape}");
    }
    if opts.pairs < 1 || opts.conns < 1000 {
        bail!("at least one pair of rounds of 1000 connections");
    }
    // SAFETY: installs async-signal-safe handlers that only store to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let began = Instant::now();
    let (load_cpu, daemon_cpu) = two_cpus()?;
    let dir: PathBuf = fanout
        .parent()
        .map(|p| p.join("bench"))
        .unwrap_or_else(|| PathBuf::from("bench"));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("fanout.log");
    let _ = std::fs::remove_file(&log);

    // pod0: the load loop on its loopback; pod1: the echo server of the held connections;
    // pod2, pod3: their clients.
    let lab = Lab::new(4)?;
    let names = [
        ("loader", "loader"),
        ("echo-server", "echo"),
        ("small-client", "small"),
        ("bulk-client", "bulk"),
    ];
    let lab_pods: Vec<(&str, &str, Vec<String>)> = names
        .iter()
        .zip(&lab.pods)
        .map(|((n, app), p)| (*n, *app, vec![p.ipv4.to_string(), p.ipv6.to_string()]))
        .collect();
    let small_inv = dir.join("inventory-lab.yaml");
    let big_inv = dir.join("inventory-10k.yaml");
    std::fs::write(&small_inv, inventory(&lab_pods, 0, 0))?;
    std::fs::write(&big_inv, inventory(&lab_pods, 10_000, 1_000))?;

    let memory_phase = || {
        memory(
            fanout,
            loadgen,
            daemon_cpu,
            &log,
            (&small_inv, &big_inv),
            (lab.pod(1), lab.pod(2), lab.pod(3)),
        )
    };
    if opts.memory_only {
        let m = memory_phase()?;
        let mib = |k: f64| k / 1024.0;
        eprintln!(
            "memory only: idle {:.1} MiB, connections {:.1}, inventory {:.1}, both {:.1}, \
             after the API {:.1}, peak {:.1}; maps {:.1} MiB",
            mib(m.rss_idle),
            mib(m.rss_conns),
            mib(m.rss_inventory),
            mib(m.rss_both),
            mib(m.rss_after_api),
            mib(m.hwm_after_api),
            m.maps as f64 / 1048576.0
        );
        eprintln!(
            "memory only: the daemon's smaps with both loads: {}",
            log.with_file_name("smaps-both.txt").display()
        );
        return Ok(());
    }
    let server = Server::start(loadgen, lab.pod(0), daemon_cpu, 4)?;
    let mut client = Client::start(loadgen, lab.pod(0))?;
    // Nothing listens on port 9 of the pod's loopback: the refused connects.
    let refused_at = SocketAddr::from(([127, 0, 0, 1], 9));
    let load = Load {
        refused: false,
        threads: 1,
        count: opts.conns,
        secs: 30.0,
        rate: 0.0,
        cpus: vec![load_cpu],
    };
    // Warm-up: caches, the server's threads, the port range.
    client.run(
        &Load {
            count: 2000,
            ..load.clone()
        },
        server.addr,
    )?;
    let stats = BpfStats::enable()?;
    let ctx = Ctx {
        fanout,
        inventory: &small_inv,
        log: &log,
        daemon_cpu,
    };
    let tp = throughput(&ctx, &mut client, &server, &load, opts.pairs)?;
    let cap = capacity(
        &ctx,
        &mut client,
        server.addr,
        refused_at,
        (load_cpu, daemon_cpu),
    )?;
    drop(stats);
    drop(client);
    drop(server);
    let mem = memory_phase()?;
    drop(lab);
    let took = began.elapsed();

    // What the scrape table's columns are is the scrape benchmark's to say: its doc comment.
    let scrape_doc = out
        .parent()
        .map(|root| root.join("daemon/benches/scrape.rs"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|src| doc_comment(&src))
        .unwrap_or_default();
    let body = render(
        opts,
        &Results {
            cpus: (load_cpu, daemon_cpu),
            tp,
            cap,
            mem,
            took,
        },
        &scrape_table,
        &scrape_doc,
    )?;
    let old = std::fs::read_to_string(out).unwrap_or_default();
    let md = compose(&old, &body);
    std::fs::write(out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{body}");
    eprintln!(
        "bench: {}m{:02}s (without the builds and the scrape benchmark); wrote {}",
        took.as_secs() / 60,
        took.as_secs() % 60,
        out.display()
    );
    Ok(())
}

/// Everything one run measured.
struct Results {
    /// (the loader's CPU, the server's and daemon's).
    cpus: (usize, usize),
    tp: Throughput,
    cap: Vec<Step>,
    mem: Memory,
    took: Duration,
}

fn render(opts: &Options, r: &Results, scrape_table: &[&str], doc: &str) -> Result<String> {
    let ((load_cpu, daemon_cpu), tp, cap, mem, took) = (r.cpus, &r.tp, &r.cap, &r.mem, r.took);
    let mut md = String::new();
    let per_on = |f: &dyn Fn(&OnRound) -> f64| -> Vec<f64> { tp.on.iter().map(f).collect() };
    let ratios: Vec<f64> = tp
        .pairs
        .iter()
        .map(|(off, on)| on.rate / off.rate)
        .collect();
    let (rlo, rhi) = min_max(&ratios);
    let cpu_ratios: Vec<f64> = tp
        .pairs
        .iter()
        .map(|(off, on)| on.cpu_ns / off.cpu_ns)
        .collect();
    let (cplo, cphi) = min_max(&cpu_ratios);
    let cpu_added: Vec<f64> = tp
        .pairs
        .iter()
        .map(|(off, on)| on.cpu_ns - off.cpu_ns)
        .collect();
    let (calo, cahi) = min_max(&cpu_added);
    let bpf = per_on(&|r| r.bpf_ns_per_conn());
    let (blo, bhi) = min_max(&bpf);
    let cpu = per_on(&|r| r.cpu_ns as f64 / r.conns);
    let (clo, chi) = min_max(&cpu);
    let recs = per_on(&|r| r.records / r.conns);
    let lost: f64 = tp.on.iter().map(|r| r.lost).sum();
    // Every daemon start loads its programs anew (new ids): they are matched by name.
    let mut per_prog: BTreeMap<String, (String, Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for r in &tp.on {
        for (name, ty, t, n) in &r.progs {
            let e = per_prog
                .entry(name.clone())
                .or_insert_with(|| (ty.clone(), Vec::new(), Vec::new()));
            if *n > 0 {
                e.1.push(*t as f64 / *n as f64);
            }
            e.2.push(*n as f64 / r.conns);
        }
    }
    let h2: Vec<f64> = per_prog
        .get("h2_egress")
        .map(|p| p.1.clone())
        .unwrap_or_default();
    let (hlo, hhi) = min_max(&h2);
    let conns = opts.conns;
    let pairs = opts.pairs;

    let sys = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    writeln!(
        md,
        "Run of {}m{:02}s (without the builds and the scrape benchmark) on {} CPUs, kernel {}, \
         net.core.bpf_jit_enable={}. Other work on the machine during the run shows in the \
         spread of the wall-clock figures; the kernel's BPF figures and the CPU times do not \
         depend on it.",
        took.as_secs() / 60,
        took.as_secs() % 60,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        sys("/proc/sys/kernel/osrelease"),
        sys("/proc/sys/net/core/bpf_jit_enable")
    )?;
    writeln!(md)?;
    writeln!(md, "## Tracer cost per connection")?;
    writeln!(md)?;
    writeln!(
        md,
        "Method: `loadgen` (xtask/src/bin/loadgen.rs, release build), one thread pinned to CPU \
         {load_cpu} in a lab pod: connect to the pod's loopback, 64 B request, 64 B reply, close; \
         {conns} connections per round. The server, pinned to CPU {daemon_cpu}, answers 64 B. \
         `off` rounds run without the daemon, `on` rounds with the release daemon as shipped \
         (`fanout run --inventory` of the lab's pods), pinned to CPU {daemon_cpu} with the \
         server, never the loader's CPU. {pairs} pairs in one run, off→on and on→off in turn. \
         Each `on` round starts the daemon, waits for /healthz and 1 s, and stops it after the \
         round: start (median {:.1} s) and stop (median {:.2} s) are outside the window. \
         Throughput is connections per wall-clock second of the loop. Load CPU per connection \
         is the CPU time of the loader's thread (CLOCK_THREAD_CPUTIME_ID) plus the server's \
         threads (/proc/<pid>/task/*/schedstat) over the round, per connection: it includes \
         the kernel's work in their context (the loopback path and the BPF programs that run \
         there), but not the time other processes take the CPU, so it is the stable form of \
         the throughput cost. BPF figures are the kernel's (`kernel.bpf_stats_enabled=1` during the run, restored after): \
         Δrun_time_ns and Δrun_cnt of each of the daemon's programs (/proc/<pid>/fdinfo of its \
         bpf-prog fds) over the round. Daemon CPU is Δ of /proc/<pid>/task/*/schedstat (ns) over \
         the round and a 0.5 s drain after it. bpf_stats adds two clock reads to every program \
         run, which the `on` rounds pay, so the throughput ratio is slightly pessimistic.",
        median(&tp.start_secs),
        median(&tp.stop_secs)
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| figure | goal | median | min – max over rounds | met |"
    )?;
    writeln!(md, "| --- | --- | ---: | ---: | --- |")?;
    writeln!(
        md,
        "| throughput on/off (per pair) | - | {:.3} | {:.3} – {:.3} | - |",
        median(&ratios),
        rlo,
        rhi
    )?;
    writeln!(
        md,
        "| load CPU per connection on/off (per pair) | - | {:.3} | {:.3} – {:.3} | - |",
        median(&cpu_ratios),
        cplo,
        cphi
    )?;
    writeln!(
        md,
        "| load CPU added per connection, on − off (per pair) | - | {} | {} – {} | - |",
        fmt_ns(median(&cpu_added)),
        fmt_ns(calo),
        fmt_ns(cahi)
    )?;
    let bm = median(&bpf);
    writeln!(
        md,
        "| BPF time per connection (all programs) | ≤ {} | {} | {} – {} | {} |",
        fmt_ns(budget::BPF_NS_PER_CONN),
        fmt_ns(bm),
        fmt_ns(blo),
        fmt_ns(bhi),
        if bm <= budget::BPF_NS_PER_CONN {
            "yes"
        } else {
            "no"
        }
    )?;
    let hm = median(&h2);
    writeln!(
        md,
        "| BPF time per packet without HTTP/2 (`h2_egress`) | ≤ {} | {} | {} – {} | {} |",
        fmt_ns(budget::H2_NS_PER_PACKET),
        fmt_ns(hm),
        fmt_ns(hlo),
        fmt_ns(hhi),
        if hm <= budget::H2_NS_PER_PACKET {
            "yes"
        } else {
            "no"
        }
    )?;
    writeln!(
        md,
        "| daemon CPU per connection | - | {} | {} – {} | - |",
        fmt_ns(median(&cpu)),
        fmt_ns(clo),
        fmt_ns(chi)
    )?;
    let (relo, rehi) = min_max(&recs);
    writeln!(
        md,
        "| records read per connection | - | {:.2} | {:.2} – {:.2} | - |",
        median(&recs),
        relo,
        rehi
    )?;
    writeln!(
        md,
        "| records lost in the `on` rounds | 0 | {lost} (sum) | | {} |",
        if lost == 0.0 { "yes" } else { "no" }
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "Per program, medians over the `on` rounds (runs per connection include whatever else \
         the machine did during the round):"
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| program | type | ns per run | runs per connection | ns per connection |"
    )?;
    writeln!(md, "| --- | --- | ---: | ---: | ---: |")?;
    for (name, (ty, ns, runs)) in &per_prog {
        let (n, r) = (median(ns), median(runs));
        writeln!(
            md,
            "| `{name}` | {ty} | {} | {r:.2} | {} |",
            if n.is_finite() {
                format!("{n:.0}")
            } else {
                "-".into()
            },
            if n.is_finite() {
                format!("{:.0}", n * r)
            } else {
                "0".into()
            }
        )?;
    }
    writeln!(md)?;
    writeln!(md, "Per pair:")?;
    writeln!(md)?;
    writeln!(
        md,
        "| pair | order | off conn/s | on conn/s | on/off | off load CPU/conn | on load CPU/conn | on/off |"
    )?;
    writeln!(
        md,
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (i, (off, on)) in tp.pairs.iter().enumerate() {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.3} | {} | {} | {:.3} |",
            i + 1,
            if i % 2 == 0 { "off→on" } else { "on→off" },
            off.rate,
            on.rate,
            on.rate / off.rate,
            fmt_ns(off.cpu_ns),
            fmt_ns(on.cpu_ns),
            on.cpu_ns / off.cpu_ns
        )?;
    }
    writeln!(md)?;

    // Capacity.
    writeln!(md, "## Record capacity")?;
    writeln!(md)?;
    writeln!(
        md,
        "Method: one daemon as shipped (pinned to CPU {daemon_cpu}), `loadgen` threads pinned \
         as listed, 3 s per step, increasing load. `connect/close` is the loop above (four \
         records a connection: established, passive open, two closes; the connecting task \
         rides on the established record, the server end's owner on its close); `refused connect` is a connect to a \
         port nobody listens on (one failed record, a SYN and a RST: the cheapest way to make \
         records). Records per second are Δ \
         `fanout_records_total` (after a 0.7 s drain) over the step; lost is Δ \
         `fanout_events_lost_total`. A thread on CPU {daemon_cpu} shares it with the daemon (and \
         the server)."
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| load | threads (CPUs) | target attempts/s | attempts/s done | records/s read | lost |"
    )?;
    writeln!(md, "| --- | --- | ---: | ---: | ---: | ---: |")?;
    for s in cap {
        let cpus: Vec<String> = s.load.cpus.iter().map(usize::to_string).collect();
        writeln!(
            md,
            "| {} | {} ({}) | {} | {:.0} | {:.0} | {} |",
            s.what,
            s.load.threads,
            cpus.join(", "),
            if s.load.rate > 0.0 {
                format!("{:.0}", s.load.rate)
            } else {
                "max".into()
            },
            s.run.rate(),
            s.records_per_sec,
            s.lost_text
        )?;
    }
    let best = cap
        .iter()
        .filter(|s| s.lost == 0.0)
        .map(|s| s.records_per_sec)
        .fold(f64::NAN, f64::max);
    let any_loss = cap.iter().any(|s| s.lost > 0.0);
    let most = cap
        .iter()
        .map(|s| s.records_per_sec)
        .fold(f64::NAN, f64::max);
    let met = if best >= budget::RECORDS_PER_SEC {
        "yes".to_string()
    } else if most < budget::RECORDS_PER_SEC {
        format!(
            "not shown: the loaders made at most {:.0} k records/s on this machine{}",
            most / 1000.0,
            if any_loss {
                "; records were lost at some steps (see above)"
            } else {
                ", without a loss"
            }
        )
    } else {
        "no".to_string()
    };
    writeln!(md)?;
    writeln!(md, "| figure | goal | measured | met |")?;
    writeln!(md, "| --- | --- | ---: | --- |")?;
    writeln!(
        md,
        "| highest records/s read with no loss | ≥ {:.0} k/s | {:.0} k/s | {met} |",
        budget::RECORDS_PER_SEC / 1000.0,
        best / 1000.0,
    )?;
    writeln!(md)?;

    // Memory.
    writeln!(md, "## Memory")?;
    writeln!(md)?;
    writeln!(
        md,
        "Method: the release daemon as shipped, pinned to CPU {daemon_cpu}, VmRSS 3 s after \
         /healthz (idle) and 3 s after the table holds the connections. 10 000 connections are \
         held open from two lab pods (100 and 9 900) to an echo server pod: both ends are lab \
         pods, so the table has 20 000 lab rows ({:.0} rows in all when measured). The \
         inventory lists the lab's 4 pods, or those plus 10 000 synthetic pods in 100 \
         namespaces and 1 000 ClusterIP services of 10 pods each. One daemon per inventory. \
         Kernel map memory is the sum of `memlock` in /proc/<pid>/fdinfo of the daemon's \
         {} bpf-map fds.",
        mem.rows, mem.map_count
    )?;
    writeln!(md)?;
    writeln!(md, "| figure | goal | measured | met |")?;
    writeln!(md, "| --- | --- | ---: | --- |")?;
    for (label, goal, kib) in [
        (
            "RSS idle (inventory of the 4 lab pods)",
            budget::RSS_IDLE_MIB,
            mem.rss_idle,
        ),
        (
            "RSS with 10 000 live connections",
            budget::RSS_CONNS_MIB,
            mem.rss_conns,
        ),
        (
            "RSS with an inventory of 10 000 pods and 1 000 services",
            budget::RSS_INVENTORY_MIB,
            mem.rss_inventory,
        ),
        ("RSS with both", budget::RSS_BOTH_MIB, mem.rss_both),
        (
            "RSS with both, after the API requests below",
            budget::RSS_BOTH_MIB,
            mem.rss_after_api,
        ),
        (
            "peak RSS (VmHWM) with both, after the API requests",
            budget::RSS_BOTH_MIB,
            mem.hwm_after_api,
        ),
        (
            "kernel map memory (memlock)",
            budget::MAPS_MIB,
            mem.maps as f64 / 1024.0,
        ),
    ] {
        let (g, met) = goal_le(goal, kib / 1024.0, "MiB");
        writeln!(md, "| {label} | {g} | {} | {met} |", fmt_mib(kib))?;
    }
    writeln!(md)?;

    // API.
    writeln!(md, "## API latency")?;
    writeln!(md)?;
    writeln!(
        md,
        "Method: the daemon with the 10 000-pod inventory and the 10 000 held connections \
         ({:.0} table rows), one request at a time over loopback (a new connection each, \
         `Connection: close`), timed from connect to the last byte; after one unmeasured \
         request, up to 200 samples or 20 s per request (at least 5). Percentiles are nearest \
         rank. `small-client` has 100 connections, `echo-server` 10 000. `GET /connections` is \
         one answer as the agent gives it (a page of the table, or all of it from an agent \
         without pages); \"the whole table\" follows the `next` cursors from the first page to \
         the last, one request after the other, and its time and size are those of all pages.",
        mem.rows
    )?;
    writeln!(md)?;
    writeln!(
        md,
        "| request | connections | response | p50 | p99 | samples | goal (p99) | met |"
    )?;
    writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")?;
    // In the order `memory` measures them.
    let goals = [
        budget::PEERS_100_P99_MS,
        budget::PEERS_10K_P99_MS,
        budget::CONNECTIONS_PAGE_P99_MS,
        budget::CONNECTIONS_ALL_P99_MS,
        budget::METRICS_P99_MS,
    ];
    if goals.len() != mem.api.len() {
        bail!("{} API figures for {} goals", mem.api.len(), goals.len());
    }
    for ((label, conns, size, ms), goal) in mem.api.iter().zip(goals) {
        let p99 = percentile(ms, 99.0);
        let (g, met) = goal_le(goal, p99, "ms");
        writeln!(
            md,
            "| {label} | {conns} | {} | {} | {} | {} | {g} | {met} |",
            fmt_bytes(*size),
            fmt_ms(percentile(ms, 50.0)),
            fmt_ms(p99),
            ms.len()
        )?;
    }
    writeln!(md)?;

    writeln!(md, "## Scrape cost of the balance metrics")?;
    writeln!(md)?;
    writeln!(
        md,
        "`daemon/benches/scrape.rs` (`cargo bench -p fanout --bench scrape`), in process, in one \
         run.{}{doc}",
        if doc.is_empty() { "" } else { " " }
    )?;
    writeln!(md)?;
    for l in scrape_table {
        writeln!(md, "{l}")?;
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(min_max(&[0.9, 1.1, 0.95]), (0.9, 1.1));
        assert!(min_max(&[]).0.is_nan());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        // Few samples: p99 is the largest.
        assert_eq!(percentile(&[5.0, 1.0, 3.0], 99.0), 5.0);
        assert_eq!(percentile(&[5.0, 1.0, 3.0], 50.0), 3.0);
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn fdinfo_of_progs_and_maps() {
        let prog = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2071\nprog_type:\t8\n\
                    prog_jited:\t1\nprog_tag:\ta8e6c8b6d1b1e4a1\nmemlock:\t4096\nprog_id:\t317\n\
                    run_time_ns:\t123456789\nrun_cnt:\t4242\nrecursion_misses:\t0\n\
                    verified_insns:\t812\n";
        assert_eq!(
            parse_fdinfo(prog),
            Some(FdInfo {
                id: 317,
                prog_type: Some(8),
                run_time_ns: 123_456_789,
                run_cnt: 4242,
                memlock: 4096,
            })
        );
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t27\nkey_size:\t0\nvalue_size:\t0\n\
                   max_entries:\t8388608\nmap_flags:\t0x0\nmap_extra:\t0x0\n\
                   memlock:\t8400896\nmap_id:\t91\nfrozen:\t0\n";
        let m = parse_fdinfo(map).unwrap();
        assert_eq!((m.id, m.memlock, m.run_cnt), (91, 8_400_896, 0));
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }

    #[test]
    fn metric_sums_and_schedstat() {
        let text = "# TYPE fanout_records counter\n\
                    fanout_records_total{kind=\"connect\"} 10\n\
                    fanout_records_total{kind=\"close\"} 5\n\
                    fanout_records_total_other 7\n\
                    fanout_tcp_connections_active 3\n";
        assert_eq!(metric_sum(text, "fanout_records_total"), 15.0);
        assert_eq!(metric_sum(text, "fanout_tcp_connections_active"), 3.0);
        assert_eq!(metric_sum(text, "fanout_missing"), 0.0);
        assert_eq!(parse_schedstat("2138211 9931 42\n"), Some(2_138_211));
        assert_eq!(parse_schedstat(""), None);
    }

    #[test]
    fn metrics_per_label_and_their_growth() {
        let before = "fanout_events_lost_total{reason=\"ring_full\"} 1\n\
                      fanout_events_lost_total{reason=\"kernel_skipped\"} 0\n";
        let after = "fanout_events_lost_total{reason=\"ring_full\"} 3\n\
                     fanout_events_lost_total{reason=\"kernel_skipped\"} 1\n\
                     fanout_events_lost_total{program=\"x\",reason=\"decode_kind\"} 0\n\
                     fanout_records_total{kind=\"connect\"} 9\n";
        let (b, a) = (
            metric_by_label(before, "fanout_events_lost_total", "reason"),
            metric_by_label(after, "fanout_events_lost_total", "reason"),
        );
        assert_eq!(a.get("ring_full"), Some(&3.0));
        assert_eq!(a.get("decode_kind"), Some(&0.0));
        assert_eq!(a.len(), 3);
        assert_eq!(growth(&b, &a), "3 (kernel_skipped 1, ring_full 2)");
        assert_eq!(growth(&a, &a), "0");
    }

    #[test]
    fn rows_of_a_page_or_an_array() {
        let page = serde_json::json!({"connections": [{}, {}], "next": "x", "total": 5});
        assert_eq!(rows_in(&page), Some(5));
        assert_eq!(rows_in(&serde_json::json!([{}, {}, {}])), Some(3));
        assert_eq!(rows_in(&serde_json::json!({"error": "no"})), None);
    }

    #[test]
    fn doc_comments_become_a_paragraph() {
        let src = "//! What it costs: one thing, and another. Prints a Markdown table; `cargo \
                   xtask bench` puts it in BENCHMARKS.md.\n//!\n//! Each pair is one client.\n\n\
                   use std::sync::Arc;\n//! not this\n";
        assert_eq!(
            doc_comment(src),
            "What it costs: one thing, and another. Each pair is one client."
        );
        assert_eq!(doc_comment("fn main() {}\n"), "");
    }

    #[test]
    fn compose_replaces_the_old_layout_and_keeps_other_sections() {
        let old = "# Benchmarks\n\n## Tracer cost on connection throughput\n\nold table\n\n\
                   <!-- soak:begin -->\n## Soak\nfigures\n<!-- soak:end -->\n";
        let md = compose(old, "## New\nnumbers");
        assert!(!md.contains("old table"), "{md}");
        assert!(md.starts_with(HEADER));
        assert!(md.contains("<!-- bench:begin -->\n## New\nnumbers\n<!-- bench:end -->"));
        assert_eq!(
            report::section(&md, "soak"),
            Some("<!-- soak:begin -->\n## Soak\nfigures\n<!-- soak:end -->")
        );
        // The next run replaces only its section, wherever it is.
        let md2 = compose(&md, "## Newer");
        assert!(md2.contains("<!-- bench:begin -->\n## Newer\n<!-- bench:end -->"));
        assert!(!md2.contains("numbers"));
        assert_eq!(report::section(&md2, "soak"), report::section(&md, "soak"));
        // A first run on an empty file.
        assert!(compose("", "x").contains("<!-- bench:begin -->\nx\n<!-- bench:end -->"));
    }

    #[test]
    fn inventory_lists_lab_and_synthetic_objects() {
        let lab = [("echo-server", "echo", vec!["10.244.0.3".to_string()])];
        let y = inventory(&lab, 10_000, 1_000);
        assert_eq!(y.matches("  - {name: p").count(), 10_000);
        assert_eq!(y.matches("cluster_ip: 10.97.").count(), 1_000);
        assert!(y.contains("{name: echo-server, namespace: bench, ips: [10.244.0.3]"));
        assert!(y.contains("ip: 10.100.39.250,"), "the last synthetic pod");
        assert!(y.contains("cluster_ip: 10.97.3.250,"), "the last service");
        let small = inventory(&lab, 0, 0);
        assert!(!small.contains("synth"));
    }
}
