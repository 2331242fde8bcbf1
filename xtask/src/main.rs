//! `cargo xtask <task>`: setup, test, demo, lab.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use xtask::{
    daemon::Daemon,
    http,
    lab::{self, EchoServer, Lab},
    setup,
};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "fanout developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing needs (idempotent; quick when done).
    Setup,
    /// Setup, then formatting, clippy and every test (root lab tests included).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Setup, build, start a lab of pod namespaces with traffic, run the daemon and show what it
    /// sees.
    Demo {
        /// Keep refreshing the view for this many seconds (Ctrl-C stops early).
        #[arg(long, default_value_t = 0)]
        watch: u64,
    },
    /// Measure what the tracer costs (throughput on/off, the kernel's BPF run times, daemon CPU),
    /// record capacity, memory, API latency and the scrape cost; writes BENCHMARKS.md. Not part
    /// of `test`.
    Bench {
        /// Pairs of rounds without and with the daemon (at least 7 for a stable median).
        #[arg(long, default_value_t = 8)]
        rounds: usize,
        /// Connections per round.
        #[arg(long, default_value_t = 20_000)]
        conns: u64,
        /// Only the memory and API phase, printed and not written: for trying a change.
        #[arg(long)]
        memory_only: bool,
    },
    /// Build the release daemon and its container image without a container engine: an OCI
    /// image layout in <out>/oci and an OCI archive <out>/fanout-oci.tar.
    Image {
        /// Output directory (default: <target>/image).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Image tag (the workspace version is always added as a second tag).
        #[arg(long, default_value = xtask::image::DEFAULT_TAG)]
        tag: String,
    },
    /// Weeks of a node compressed into minutes against the release daemon (bursts, ring
    /// overflows, restarts, inventory swaps); checks the table equals the kernel's, every loss is
    /// counted and RSS stays flat, and writes its section of BENCHMARKS.md. Not part of `test`.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Lab maintenance.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Delete every lab namespace (also those of runs that are still going).
    Clean,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(&cargo, args)
}

/// Runs cargo and returns what it printed on stdout (stderr goes to ours).
fn cargo_stdout(args: &[&str]) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    String::from_utf8(out.stdout).context("cargo printed something that is not UTF-8")
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let ok = Command::new(program)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running {program} {}", args.join(" ")))?
        .success();
    if !ok {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])?;
            // The eBPF crate only builds for the BPF target.
            run(
                "rustup",
                &[
                    "run",
                    "nightly",
                    "cargo",
                    "clippy",
                    "--package",
                    "fanout-ebpf",
                    "--target",
                    "bpfel-unknown-none",
                    "-Z",
                    "build-std=core",
                    "--",
                    "-D",
                    "warnings",
                ],
            )?;
            // The container test runs the image users deploy: the release binary on a minimal
            // root, built here without a container engine.
            cargo(&["build", "--release", "--package", "fanout"])?;
            let image = xtask::image::build(
                &target_dir().join("release/fanout"),
                &target_dir().join("image"),
                xtask::image::DEFAULT_TAG,
            )?;
            let mut test = vec!["test"];
            test.extend(args.iter().map(String::as_str));
            let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = Command::new(cargo_bin)
                .args(&test)
                .env("FANOUT_IMAGE", &image.layout)
                .current_dir(workspace_root())
                .status()
                .context("running cargo test")?
                .success();
            if !ok {
                bail!("cargo {} failed", test.join(" "));
            }
            Ok(())
        }
        Task::Demo { watch } => {
            setup::run()?;
            demo(Duration::from_secs(watch))
        }
        Task::Bench {
            rounds,
            conns,
            memory_only,
        } => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "fanout"])?;
            // The load loop, compiled in release (xtask/src/bin/loadgen.rs).
            cargo(&[
                "build",
                "--release",
                "--package",
                "xtask",
                "--bin",
                "loadgen",
            ])?;
            let bin = target_dir().join("release/fanout");
            let scrape = if memory_only {
                String::new()
            } else {
                cargo_stdout(&["bench", "--package", "fanout", "--bench", "scrape"])?
            };
            xtask::bench::run(
                &bin,
                &target_dir().join("release/loadgen"),
                &xtask::bench::Options {
                    pairs: rounds,
                    conns,
                    memory_only,
                },
                &scrape,
                &workspace_root().join("BENCHMARKS.md"),
            )
        }
        Task::Image { out, tag } => {
            xtask::image::require_bpf_linker()?;
            cargo(&["build", "--release", "--package", "fanout"])?;
            let out = out.unwrap_or_else(|| target_dir().join("image"));
            xtask::image::build(&target_dir().join("release/fanout"), &out, &tag).map(drop)
        }
        Task::Soak { minutes } => {
            setup::run()?;
            cargo(&["build", "--release", "--package", "fanout"])?;
            xtask::soak::run(
                &target_dir().join("release/fanout"),
                minutes,
                &workspace_root().join("BENCHMARKS.md"),
            )
        }
        Task::Lab { cmd: LabCmd::Clean } => {
            for ns in lab::sweep(true) {
                println!("deleted {ns}");
            }
            Ok(())
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// The demo's daemon: the debug build the demo just made.
fn start_daemon(log: &std::path::Path, extra: &[&std::ffi::OsStr]) -> Result<Daemon> {
    Daemon::start(
        &target_dir().join("debug/fanout"),
        extra,
        std::fs::File::create(log)?,
        log,
        Duration::from_secs(30),
    )
}

/// The demo's inventory: the embedded default identity for the lab.
fn demo_inventory(lab: &Lab) -> String {
    let mut y = String::from("# Generated by `cargo xtask demo` for its lab.\npods:\n");
    y.push_str(&format!(
        "  - {{name: frontend, namespace: shop, ips: [{}, {}], workload: Deployment/frontend}}\n",
        lab.pod(0).ipv4,
        lab.pod(0).ipv6
    ));
    for i in 1..=3 {
        y.push_str(&format!(
            "  - {{name: pricing-{i}, namespace: shop, ips: [{}, {}], workload: Deployment/pricing, labels: {{app: pricing}}}}\n",
            lab.pod(i).ipv4,
            lab.pod(i).ipv6
        ));
    }
    for (i, name) in DEMO_CLIENTS.iter().enumerate() {
        y.push_str(&format!(
            "  - {{name: {name}, namespace: shop, ip: {}, workload: Deployment/{name}}}\n",
            lab.pod(4 + i).ipv4
        ));
    }
    y.push_str(
        "services:\n\
         \x20 - {name: pricing, namespace: shop, cluster_ip: 10.96.0.10, ports: [{port: 80, target_port: 8080, name: grpc}], selector: {app: pricing}}\n\
         \x20 - {name: pricing-headless, namespace: shop, headless: true, ports: [{port: 8081}], selector: {app: pricing}}\n\
         \x20 - {name: pricing-grpc, namespace: shop, headless: true, ports: [{port: 9090}], selector: {app: pricing}}\n",
    );
    y
}

/// The demo's gRPC clients (pods 4..6), one per load-balancing behaviour.
const DEMO_CLIENTS: [&str; 3] = ["checkout", "cart", "search"];

/// Runs the three gRPC clients side by side against shop/pricing-grpc and prints fanout's
/// verdict for each.
fn demo_grpc(lab: &Lab, daemon: &Daemon) -> Result<()> {
    use xtask::grpc::{GrpcClient, GrpcServer, Policy, ServerOptions, Target};
    println!();
    println!(
        "== gRPC: checkout (round_robin), cart (pick_first) and search (a dial per call) call \
         shop/pricing-grpc on its three pods"
    );
    let servers: Vec<GrpcServer> = (1..=3)
        .map(|i| {
            let p = lab.pod(i);
            GrpcServer::start(
                p,
                p.addr(false, 9090),
                ServerOptions::new(format!("pricing-{i}")),
            )
        })
        .collect::<Result<_>>()?;
    let backends: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    // Each client calls every 40 ms on its own thread until stopped (bounded by 30 s).
    let runs: Vec<_> = [
        Policy::RoundRobin,
        Policy::PickFirst,
        Policy::DialPerRequest,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, policy)| {
        let client = GrpcClient::start(
            lab.pod(4 + i),
            policy,
            Target::Addrs(backends.clone()),
            Duration::from_secs(30),
        )?;
        let stop = client.stop_handle();
        let thread = std::thread::spawn(move || {
            client.calls(10_000, Duration::from_millis(40))?;
            client.finish()
        });
        Ok((stop, thread))
    })
    .collect::<Result<_>>()?;
    // More than one 5 s analysis window of traffic, read while the clients still call.
    std::thread::sleep(Duration::from_millis(6500));
    let (code, body) = http::get(daemon.addr, "/services/shop/pricing-grpc/balance")?;
    if code != 200 {
        bail!("/services/shop/pricing-grpc/balance answered {code}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    println!();
    println!(
        "{:<16} {:<18} {:>5} {:>9} {:<28} {:>5}  REASON",
        "CLIENT", "VERDICT", "READY", "CONNECTED", "REQUESTS PER BACKEND", "SKEW"
    );
    for b in v["clients"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let per: Vec<String> = b["requests_per_backend"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| format!("{}={n}", k.trim_start_matches("pricing-")))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{:<16} {:<18} {:>5} {:>9} {:<28} {:>5}  {}",
            format!("shop/{}", b["client"]["name"].as_str().unwrap_or("?")),
            b["verdict"].as_str().unwrap_or("?"),
            b["ready"].to_string(),
            b["connected"].to_string(),
            per.join(" "),
            b["skew"]
                .as_f64()
                .map(|s| format!("{s:.2}"))
                .unwrap_or_else(|| "-".into()),
            b["reason"].as_str().unwrap_or("")
        );
    }
    let (_, metrics) = http::get(daemon.addr, "/metrics")?;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("fanout_lb_verdict{") && l.ends_with(" 1"))
    {
        println!("   {line}");
    }
    for (stop, thread) in runs {
        stop.stop();
        let report = thread
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        if report.failed() > 0 {
            bail!("a demo client had failed calls: {:?}", report.errors);
        }
    }
    println!(
        "   (GET http://{}/services/shop/pricing-grpc/balance and /pods/shop/checkout/peers)",
        daemon.addr
    );
    drop(servers);
    Ok(())
}

fn demo(watch: Duration) -> Result<()> {
    // SAFETY: installs an async-signal-safe handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    println!("== building fanout (eBPF programs embedded)");
    cargo(&["build", "--package", "fanout"])?;

    println!(
        "== creating a lab: shop/frontend (pod0) calls shop/pricing-1..3 (pod1..pod3) through the \
         ClusterIP service shop/pricing and directly through shop/pricing-headless"
    );
    let lab = Lab::new(4 + DEMO_CLIENTS.len())?;
    let mut servers = Vec::new();
    for i in 1..=3 {
        let pod = lab.pod(i);
        for (v6, port) in [(false, 8080), (true, 8081)] {
            servers.push(EchoServer::start(
                pod,
                pod.addr(v6, port),
                10_000,
                watch + Duration::from_secs(120),
            )?);
        }
    }
    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    let backends: Vec<SocketAddr> = (1..=3).map(|i| lab.pod(i).addr(false, 8080)).collect();
    lab.add_cluster_ip(vip, &backends)?;
    let inventory = target_dir().join("demo-inventory.yaml");
    std::fs::write(&inventory, demo_inventory(&lab))?;
    let client = lab.pod(0).clone();

    // One connection that predates the daemon: it must be recovered at startup.
    let early = lab::hold(&client, vip, 1)?;

    let log = target_dir().join("demo-fanout.log");
    println!(
        "== starting the daemon (inventory: {}, log: {})",
        inventory.display(),
        log.display()
    );
    let daemon = start_daemon(
        &log,
        &[
            "--inventory".as_ref(),
            inventory.as_os_str(),
            "--conntrack-netns".as_ref(),
            lab.node_netns_path().as_os_str(),
            "--window".as_ref(),
            "5s".as_ref(),
        ],
    )?;
    println!("   serving http://{}/metrics and /connections", daemon.addr);

    println!(
        "== traffic: long-lived connections through the ClusterIP and to one pod directly, \
         short ones, a refused one"
    );
    let mut held = vec![early, lab::hold(&client, vip, 3)?];
    held.push(lab::hold(&client, lab.pod(3).addr(true, 8081), 1)?);
    let short = lab::connect_many(&client, vip, 20, Duration::from_secs(20))?;
    let refused = lab.pod(3).addr(false, 9);
    let _ = client.run(move || TcpStream::connect_timeout(&refused, Duration::from_secs(2)))?;
    println!("   {} short connections opened and closed", short.len());

    let lab_netns: std::collections::HashSet<u32> =
        lab.pods[..4].iter().map(|p| p.netns_inode).collect();
    let end = Instant::now() + watch;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        show(&daemon, &lab_netns)?;
        if interrupted() || Instant::now() >= end {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    demo_grpc(&lab, &daemon)?;
    drop(held);
    drop(daemon);
    drop(servers);
    println!("== done: daemon stopped (programs detached), lab removed");
    Ok(())
}

/// "ns/name" of the pod in an attribution value, or what the end is instead.
fn end_name(v: &serde_json::Value) -> String {
    match v["kind"].as_str() {
        Some("pod") => format!(
            "{}/{}",
            v["namespace"].as_str().unwrap_or("?"),
            v["name"].as_str().unwrap_or("?")
        ),
        Some(k) => k.to_string(),
        None => "?".into(),
    }
}

fn peer_name(p: &serde_json::Value) -> String {
    let pod = |v: &serde_json::Value| v["name"].as_str().unwrap_or("?").to_string();
    match p["kind"].as_str() {
        Some("service") => {
            let svc = format!(
                "svc {}/{}",
                p["service"]["namespace"].as_str().unwrap_or("?"),
                p["service"]["name"].as_str().unwrap_or("?")
            );
            match &p["backend"] {
                serde_json::Value::Null => format!("{svc} -> ?"),
                b => format!("{svc} -> {}", pod(b)),
            }
        }
        Some("pod") => match &p["service"] {
            serde_json::Value::Null => format!("pod {}", pod(&p["pod"])),
            s => format!(
                "pod {} (svc {})",
                pod(&p["pod"]),
                s["name"].as_str().unwrap_or("?")
            ),
        },
        Some(k) => k.to_string(),
        None => "?".into(),
    }
}

fn show(daemon: &Daemon, lab_netns: &std::collections::HashSet<u32>) -> Result<()> {
    let (code, body) = http::get(daemon.addr, "/connections")?;
    if code != 200 {
        bail!("/connections answered {code}: {body}");
    }
    let page: serde_json::Value = serde_json::from_str(&body)?;
    let conns: Vec<serde_json::Value> = page["connections"].as_array().cloned().unwrap_or_default();
    println!();
    println!(
        "{:<15} {:<9} {:<21} {:<19} {:<37} {:<10} {:<12} {:>6}",
        "POD", "DIR", "LOCAL", "REMOTE", "PEER", "ORIGIN", "OWNER", "AGE(s)"
    );
    let mut shown = 0;
    for c in &conns {
        if !c["netns"]
            .as_u64()
            .is_some_and(|n| lab_netns.contains(&(n as u32)))
        {
            continue; // not a lab pod: the rest of the machine
        }
        let owner = match &c["owner"] {
            serde_json::Value::Null => "-".to_string(),
            o => format!("{}/{}", o["comm"].as_str().unwrap_or("?"), o["pid"]),
        };
        let age = c["age_seconds"]
            .as_f64()
            .map(|a| format!("{a:.1}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<15} {:<9} {:<21} {:<19} {:<37} {:<10} {:<12} {:>6}",
            end_name(&c["identity"]["local"]),
            c["direction"].as_str().unwrap_or("?"),
            c["local"].as_str().unwrap_or("?"),
            c["remote"].as_str().unwrap_or("?"),
            peer_name(&c["identity"]["peer"]),
            c["origin"].as_str().unwrap_or("?"),
            owner,
            age
        );
        shown += 1;
    }
    println!(
        "{shown} live lab connections ({} on the whole machine)",
        conns.len()
    );
    let (_, metrics) = http::get(daemon.addr, "/metrics")?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("fanout_tcp_connections_")
            || l.starts_with("fanout_connect_failed")
            || l.starts_with("fanout_events_lost")
            || l.starts_with("fanout_conntrack_lookups")
    }) {
        println!("   {line}");
    }
    Ok(())
}
