//! Command line.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    agent::AgentOptions, analysis::Thresholds, identity::IdentitySource, probe::ProbeOptions,
};

#[derive(Parser, Debug)]
#[command(
    name = "fanout",
    version,
    about = "Shows whether gRPC clients really spread their calls across all pods of a service"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node agent: trace TCP connections and serve /metrics, /healthz, /connections.
    Run(Box<RunArgs>),
    /// Prove that a service's clients balance (coverage, connection reuse, distribution), from a
    /// running agent; exit 0 when they do, 1 when they do not, 2 on error. Usable as a rollout
    /// gate.
    Verify(VerifyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    /// The service, as NAMESPACE/NAME.
    #[arg(long)]
    pub service: String,
    /// Only this client pod, as NAMESPACE/POD (default: every client of the service).
    #[arg(long)]
    pub client: Option<String>,
    /// How long to observe: the same local ports at the start and the end prove reuse.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub window: Duration,
    /// The agent's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:9990")]
    pub endpoint: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Address for the HTTP server.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "127.0.0.1:9990")]
    pub listen: SocketAddr,
    /// How often to poll the ring buffer between wakeups (e.g. 100ms, 1s).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// Ring buffer size in bytes (a power of two).
    #[arg(long, default_value_t = ProbeOptions::default().ring_bytes)]
    pub ring_bytes: u32,
    /// Capacity of the kernel's per-socket state map.
    #[arg(long, default_value_t = ProbeOptions::default().sock_entries)]
    pub sock_entries: u32,
    /// Wake the reader early once this many bytes wait in the ring buffer.
    #[arg(long, default_value_t = ProbeOptions::default().wakeup_bytes)]
    pub wakeup_bytes: u64,
    /// Use the classic tracepoints even where the cheaper raw ones work (for comparison, or as a
    /// way out should a kernel's raw tracepoint misbehave).
    #[arg(long)]
    pub classic_tracepoints: bool,
    /// Use the BTF-typed tracepoints where the kernel takes them: a server end's state kept with
    /// its socket, its owner taken at its first read or write (off by default: they cost more
    /// per connection than the raw ones where measured, see BENCHMARKS.md).
    #[arg(long)]
    pub btf_tracepoints: bool,
    /// Name an accepted socket's owner at accept() (the accepting process), from the accept
    /// syscalls' tracepoints, instead of at its first read or write: for servers that accept in
    /// one process and serve in another. Costs about a microsecond per accept where measured.
    /// Raw and classic tracepoints only.
    #[arg(long)]
    pub accept_tracepoints: bool,
    /// Do not scan /proc for connections that predate the daemon (nor compare the table with the
    /// kernel's socket tables later).
    #[arg(long)]
    pub no_recover: bool,
    /// How often the connection table is compared with the kernel's socket tables after lost
    /// records: a row whose socket is gone (a lost close) disappears, and a missed open appears,
    /// within two rounds.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub reconcile_interval: Duration,
    /// How often the table is compared with the kernel's socket tables when no record was lost
    /// (a safety net: with nothing lost the table equals the kernel's).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub reconcile_full_interval: Duration,
    /// cgroup v2 directory whose egress traffic is scanned for HTTP/2 requests (default: the
    /// host's cgroup v2 root, found among the cgroup2 mounts (e.g. the host's /sys/fs/cgroup
    /// mounted at /host/sys/fs/cgroup) or through <proc-root>/1/root; never a container's own
    /// cgroup).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Kernel BTF used to resolve struct offsets.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,
    /// /proc of the host (mount the host's /proc here when running in a container).
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,
    /// Identity from an inventory file (YAML; see the README), re-read when it changes.
    #[arg(long, conflicts_with = "kube")]
    pub inventory: Option<PathBuf>,
    /// How often to check the inventory file for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub inventory_reload: Duration,
    /// Identity from the Kubernetes API (in-cluster config or kubeconfig).
    #[arg(long)]
    pub kube: bool,
    /// Kubeconfig file for --kube (default: in-cluster config, then $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (Downward API), to tell this node's pods from the rest.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Sliding window of the balance analysis (fan-out, skew, churn, verdicts).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    /// How long the series and figures of a pod or service that is gone (or idle) are kept.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Hard cap on the per-pod balance metric series; what it refuses is counted in
    /// fanout_series_dropped_total.
    #[arg(long, default_value_t = crate::analysis::AnalysisConfig::default().max_series)]
    pub max_series: usize,
    /// Fewer requests in the window than this is insufficient_data.
    #[arg(long, default_value_t = Thresholds::default().min_requests)]
    pub min_requests: u64,
    /// pick_first: the share of requests one backend takes (0 to 1).
    #[arg(long, default_value_t = Thresholds::default().pick_first_share, value_parser = parse_fraction)]
    pub pick_first_share: f64,
    /// round_robin: the least coverage, connected ready backends / ready backends (0 to 1).
    #[arg(long, default_value_t = Thresholds::default().round_robin_coverage, value_parser = parse_fraction)]
    pub round_robin_coverage: f64,
    /// round_robin: the largest skew, top backend share / fair share (at least 1).
    #[arg(long, default_value_t = Thresholds::default().round_robin_max_skew, value_parser = parse_skew)]
    pub round_robin_max_skew: f64,
    /// dial_per_request: the least connection opens per request (above 0).
    #[arg(long, default_value_t = Thresholds::default().dial_opens_per_request, value_parser = parse_positive)]
    pub dial_opens_per_request: f64,
    /// dial_per_request when requests come from messages (TLS): the least connection opens in
    /// the window (their mean lifetime under --short-lifetime).
    #[arg(long, default_value_t = Thresholds::default().dial_min_opens)]
    pub dial_min_opens: u64,
    /// Mean connection lifetime below which connections are short (dial_per_request) and at or
    /// above which they are long-lived (pick_first).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub short_lifetime: Duration,
    /// Most concurrent HTTP connections (kept below the open-files limit; idle ones are shed for
    /// new ones, so a flood cannot starve the probes).
    #[arg(long, default_value_t = crate::exposition::server::Limits::default().max_connections)]
    pub api_max_connections: usize,
    /// Network namespace whose conntrack table holds kube-proxy's NAT (default: the daemon's
    /// own, which is the node's when it runs with hostNetwork).
    #[arg(long)]
    pub conntrack_netns: Option<PathBuf>,
}

impl RunArgs {
    pub fn agent_options(&self) -> AgentOptions {
        AgentOptions {
            probe: ProbeOptions {
                ring_bytes: self.ring_bytes,
                sock_entries: self.sock_entries,
                wakeup_bytes: self.wakeup_bytes,
                btf_path: self.btf.clone(),
                cgroup_root: self.cgroup_root.clone(),
                proc_root: self.proc_root.clone(),
                classic_tracepoints: self.classic_tracepoints,
                btf_tracepoints: self.btf_tracepoints,
                accept_tracepoints: self.accept_tracepoints,
            },
            listen: self.listen,
            poll_interval: self.poll_interval,
            recover: !self.no_recover,
            reconcile_interval: self.reconcile_interval,
            reconcile_full_interval: self.reconcile_full_interval,
            proc_root: self.proc_root.clone(),
            netns_dirs: crate::probe::default_netns_dirs(),
            identity: match (&self.inventory, self.kube) {
                (Some(path), _) => IdentitySource::Local {
                    path: path.clone(),
                    reload_every: self.inventory_reload,
                },
                (None, true) => IdentitySource::Kube {
                    node_name: self.node_name.clone(),
                    kubeconfig: self.kubeconfig.clone(),
                },
                (None, false) => IdentitySource::None,
            },
            conntrack_netns: self.conntrack_netns.clone(),
            api: crate::exposition::server::Limits {
                max_connections: self.api_max_connections,
                ..Default::default()
            },
            analysis: crate::analysis::AnalysisConfig {
                window: self.window,
                grace: self.grace,
                max_series: self.max_series,
                thresholds: Thresholds {
                    min_requests: self.min_requests,
                    pick_first_share: self.pick_first_share,
                    round_robin_coverage: self.round_robin_coverage,
                    round_robin_max_skew: self.round_robin_max_skew,
                    dial_opens_per_request: self.dial_opens_per_request,
                    dial_min_opens: self.dial_min_opens,
                    short_lifetime: self.short_lifetime,
                    ..Thresholds::default()
                },
                ..Default::default()
            },
        }
    }
}

fn parse_number(s: &str, ok: impl Fn(f64) -> bool, want: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number {s:?}: expected {want}"))?;
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(format!("{s} is out of range: expected {want}"))
    }
}

/// A fraction between 0 and 1 (inclusive).
fn parse_fraction(s: &str) -> Result<f64, String> {
    parse_number(s, |v| (0.0..=1.0).contains(&v), "a fraction from 0 to 1")
}

/// A skew ratio: 1 is even, so at least 1.
fn parse_skew(s: &str) -> Result<f64, String> {
    parse_number(s, |v| v >= 1.0, "a ratio of at least 1")
}

fn parse_positive(s: &str) -> Result<f64, String> {
    parse_number(s, |v| v > 0.0, "a number above 0")
}

/// Parses durations like `250ms`, `30s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected a number with a unit such as 30s")
    })?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if d.is_zero() {
        return Err(format!("duration {s:?} must be greater than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn thresholds_and_caps_are_checked_and_applied() {
        let parse = |args: &[&str]| {
            let mut all = vec!["fanout", "run"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).map(|c| match c.command {
                Command::Run(a) => a.agent_options().analysis,
                Command::Verify(_) => panic!("run"),
            })
        };
        let a = parse(&[]).unwrap();
        assert_eq!(a, crate::analysis::AnalysisConfig::default());
        let a = parse(&[
            "--window",
            "1m",
            "--grace",
            "5m",
            "--max-series",
            "100",
            "--pick-first-share",
            "0.75",
            "--round-robin-max-skew",
            "2",
            "--short-lifetime",
            "500ms",
            "--min-requests",
            "3",
        ])
        .unwrap();
        assert_eq!(
            (a.window, a.grace),
            (Duration::from_secs(60), Duration::from_secs(300))
        );
        assert_eq!(a.max_series, 100);
        assert_eq!(a.thresholds.pick_first_share, 0.75);
        assert_eq!(a.thresholds.round_robin_max_skew, 2.0);
        assert_eq!(a.thresholds.short_lifetime, Duration::from_millis(500));
        assert_eq!(a.thresholds.min_requests, 3);
        for bad in [
            "--pick-first-share=1.5",
            "--round-robin-coverage=-0.1",
            "--round-robin-max-skew=0.9",
            "--dial-opens-per-request=0",
            "--pick-first-share=NaN",
            "--max-series=-1",
            "--grace=0s",
        ] {
            let err = parse(&[bad]).expect_err(bad).to_string();
            let flag = bad.split('=').next().unwrap_or(bad);
            assert!(err.contains(flag), "{err}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["fanout", "run", "--listen", "0.0.0.0:1"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert_eq!(args.agent_options().listen.port(), 1);
        assert!(Cli::try_parse_from(["fanout", "run", "--poll-interval", "x"]).is_err());
        assert!(
            Cli::try_parse_from(["fanout", "run", "--kube", "--inventory", "x.yaml"]).is_err(),
            "one identity source at a time"
        );
        let cli = Cli::try_parse_from(["fanout", "run", "--inventory", "inv.yaml"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert!(matches!(
            args.agent_options().identity,
            IdentitySource::Local { .. }
        ));
    }
}
