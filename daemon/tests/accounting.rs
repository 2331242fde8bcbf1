//! Root: the daemon stays true over time. Every lifecycle record the kernel produces for the
//! lab is read or counted as lost (the kernel's own count, from a tracefs instance of our own, is
//! the ground truth); the connection table converges on the kernel's socket tables after
//! records are lost; and a restart in the middle of a burst brings back no closed connection.
//!
//! Each test owns its lab, its agent and its tracefs instance; the tests of this file run one at
//! a time because a burst's CPU load would otherwise be shared.

#[path = "support/e2e.rs"]
mod e2e;

use std::{
    collections::{BTreeSet, HashSet},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use e2e::start_agent_with;
use fanout::{agent::Agent, conntable::recover};
use fanout_common::{RecordKind, tcp};
use xtask::lab::{self, EchoServer, Lab, Pod};

/// One test at a time (see the module doc).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A tracefs instance (its own buffer) recording `sock/inet_sock_set_state` for one TCP port:
/// what the kernel emitted, independently of fanout. Removed when dropped.
struct TraceInstance {
    dir: PathBuf,
}

impl TraceInstance {
    fn start(name: &str, port: u16) -> TraceInstance {
        let root = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
            .expect("tracefs with instances (cargo xtask setup mounts it)");
        let dir = root.join("instances").join(name);
        std::fs::create_dir(&dir).expect("create a tracefs instance");
        let t = TraceInstance { dir };
        std::fs::write(t.dir.join("buffer_size_kb"), "16384").expect("buffer size");
        let ev = t.dir.join("events/sock/inet_sock_set_state");
        std::fs::write(
            ev.join("filter"),
            format!("sport == {port} || dport == {port}"),
        )
        .expect("event filter");
        std::fs::write(ev.join("enable"), "1").expect("enable the event");
        t
    }

    /// Stops recording; returns the records fanout turns into lifecycle records, by kind, and
    /// whether the instance itself lost any (then it cannot be the ground truth).
    fn finish(&self) -> (Vec<RecordKind>, u64) {
        let ev = self.dir.join("events/sock/inet_sock_set_state");
        std::fs::write(ev.join("enable"), "0").expect("disable the event");
        let mut lost = 0;
        for cpu in std::fs::read_dir(self.dir.join("per_cpu")).expect("per_cpu") {
            let stats = std::fs::read_to_string(cpu.expect("cpu").path().join("stats"))
                .expect("per-cpu stats");
            for l in stats.lines() {
                for field in ["overrun:", "dropped events:"] {
                    if let Some(v) = l.strip_prefix(field) {
                        lost += v.trim().parse::<u64>().unwrap_or(0);
                    }
                }
            }
        }
        let trace = std::fs::read_to_string(self.dir.join("trace")).expect("trace");
        let kinds = trace
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let state = |field: &str| {
                    let v = l.split_whitespace().find_map(|w| w.strip_prefix(field))?;
                    tcp_state(v)
                };
                tcp::classify(state("oldstate=")?, state("newstate=")?)
            })
            .collect();
        (kinds, lost)
    }
}

impl Drop for TraceInstance {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("events/sock/inet_sock_set_state/enable"), "0");
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("tracefs instance {}: {e}", self.dir.display());
        }
    }
}

/// The number of a `TCP_*` state as tracefs prints it.
fn tcp_state(name: &str) -> Option<i32> {
    Some(match name {
        "TCP_ESTABLISHED" => 1,
        "TCP_SYN_SENT" => 2,
        "TCP_SYN_RECV" => 3,
        "TCP_FIN_WAIT1" => 4,
        "TCP_FIN_WAIT2" => 5,
        "TCP_TIME_WAIT" => 6,
        "TCP_CLOSE" => 7,
        "TCP_CLOSE_WAIT" => 8,
        "TCP_LAST_ACK" => 9,
        "TCP_LISTEN" => 10,
        "TCP_CLOSING" => 11,
        "TCP_NEW_SYN_RECV" => 12,
        _ => return None,
    })
}

/// Sum of the record-dropping loss counters (records that were never read).
fn dropped(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("fanout_events_lost_total{reason=\""))
        .filter_map(|l| l.split_once("\"} "))
        .filter(|(reason, _)| {
            *reason == "ring_full" || *reason == "kernel_skipped" || reason.starts_with("decode")
        })
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// The kernel's connections (not listeners or TIME_WAIT) in a pod's namespace.
fn kernel_connections(pod: &Pod) -> BTreeSet<(SocketAddr, SocketAddr)> {
    pod.run(|| {
        let mut out = BTreeSet::new();
        for t in ["tcp", "tcp6"] {
            let text =
                std::fs::read_to_string(format!("/proc/thread-self/net/{t}")).unwrap_or_default();
            for s in recover::parse_proc_net_tcp(&text) {
                // ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING
                if matches!(s.state, 0x01 | 0x04 | 0x05 | 0x08 | 0x09 | 0x0b) {
                    out.insert((s.local, s.remote));
                }
            }
        }
        out
    })
    .expect("pod namespace")
}

/// The agent's rows in a pod's namespace.
fn table_rows(agent: &Agent, pod: &Pod) -> BTreeSet<(SocketAddr, SocketAddr)> {
    agent.shared().with_rows(|t| {
        t.iter()
            .filter(|c| c.key.netns == pod.netns_inode)
            .map(|c| (c.key.local, c.key.remote))
            .collect()
    })
}

/// Waits until the agent's rows of `pods` equal the kernel's connections there; returns how long
/// it took, or panics with both sides after `limit`.
async fn converged(agent: &Agent, pods: &[&Pod], limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let mut diff = Vec::new();
        for p in pods {
            let (k, t) = (kernel_connections(p), table_rows(agent, p));
            if k != t {
                let ghosts: Vec<_> = t.difference(&k).collect();
                let holes: Vec<_> = k.difference(&t).collect();
                diff.push(format!(
                    "{}: {} ghosts {:?}…, {} holes {:?}…",
                    p.name,
                    ghosts.len(),
                    ghosts.iter().take(3).collect::<Vec<_>>(),
                    holes.len(),
                    holes.iter().take(3).collect::<Vec<_>>()
                ));
            }
        }
        if diff.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "the table did not converge in {limit:?}: {}",
            diff.join("; ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens, uses and closes `n` connections from each of `clients` to `to`, all clients at once.
async fn burst(clients: &[Pod], to: SocketAddr, n: usize) -> usize {
    let runs: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| {
            tokio::task::spawn_blocking(move || {
                lab::connect_many(&c, to, n, Duration::from_secs(120)).map(|v| v.len())
            })
        })
        .collect();
    let mut done = 0;
    for r in runs {
        done += r.await.expect("join").expect("connections");
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_the_kernel_emits_is_read_or_counted_lost() {
    lab::require_root("the accounting tests load eBPF programs and build a lab");
    let _one = SERIAL.lock().await;
    let lab = Lab::new(4).expect("lab");
    let server_pod = lab.pod(3);
    let per_client = 2000;
    let server = EchoServer::start(
        server_pod,
        server_pod.addr(false, 0),
        3 * per_client as u32,
        Duration::from_secs(300),
    )
    .expect("server");
    let agent = start_agent_with(|_| {}).await;
    let netns: HashSet<u32> = lab.pods.iter().map(|p| p.netns_inode).collect();
    let mut rx = agent.subscribe();
    let collector = tokio::spawn(async move {
        let mut kinds = Vec::new();
        let mut lagged = 0u64;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Ok(ev))
                    if netns.contains(&ev.netns)
                        && !matches!(ev.kind, RecordKind::Accepted | RecordKind::Connect) =>
                {
                    kinds.push(ev.kind)
                }
                Ok(Ok(_)) => {}
                Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => lagged += n,
                Ok(Err(_)) | Err(_) => return (kinds, lagged),
            }
        }
    });
    let lost_before = dropped(&agent.shared().metrics.encode().expect("metrics"));
    let trace = TraceInstance::start(&lab.prefix, server.addr.port());

    let clients: Vec<Pod> = lab.pods[..3].to_vec();
    let done = burst(&clients, server.addr, per_client).await;
    assert_eq!(done, 3 * per_client, "every connection of the burst");
    // Everything submitted is read within a few poll intervals; the loss poller runs every
    // second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (emitted, trace_lost) = trace.finish();
    let lost = dropped(&agent.shared().metrics.encode().expect("metrics")) - lost_before;
    let (read, lagged) = collector.await.expect("collector");
    assert_eq!(trace_lost, 0, "the tracefs instance itself lost events");
    assert_eq!(lagged, 0, "the test's own receiver fell behind");
    // connect, established, passive open, and a close on each side: five per connection.
    assert_eq!(
        emitted.len(),
        5 * 3 * per_client,
        "the kernel's own count: five lifecycle transitions per connection"
    );
    // A connect makes a record only when the socket's state cannot be kept (then counted as
    // sock_map_full); otherwise its owner rides on the established record. The comparison is of
    // the other four, which always make one.
    let emitted: Vec<RecordKind> = emitted
        .into_iter()
        .filter(|k| *k != RecordKind::Connect)
        .collect();
    let count = |v: &[RecordKind], k: RecordKind| v.iter().filter(|x| **x == k).count();
    eprintln!(
        "emitted {} read {} counted lost (node-wide) {lost}",
        emitted.len(),
        read.len()
    );
    assert!(read.len() <= emitted.len(), "nothing read twice");
    let missing = (emitted.len() - read.len()) as u64;
    assert!(
        missing <= lost,
        "every record that was not read is counted: {missing} missing, {lost} counted lost \
         (per kind emitted/read: {:?})",
        [
            RecordKind::Established,
            RecordKind::PassiveOpen,
            RecordKind::Close
        ]
        .map(|k| (k, count(&emitted, k), count(&read, k)))
    );
    if lost == 0 {
        assert_eq!(read.len(), emitted.len(), "no loss: every record read");
    }
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_converges_on_the_kernel_after_lost_records() {
    lab::require_root("the accounting tests load eBPF programs and build a lab");
    let _one = SERIAL.lock().await;
    let (lab, server) = lab::client_server(false, 10_000).expect("lab");
    let (client, server_pod) = (lab.pod(0).clone(), lab.pod(1).clone());
    // A one-page ring (30 records) read every second and never woken early: a burst overflows
    // it however slowly a busy machine runs it (6 records a connection), so opens and closes are
    // lost.
    let agent = start_agent_with(|o| {
        o.poll_interval = Duration::from_secs(1);
        o.probe.ring_bytes = 4096;
        o.probe.wakeup_bytes = 4095;
        o.reconcile_interval = Duration::from_secs(1);
    })
    .await;
    let to = server.addr;
    let c = client.clone();
    let bursting = tokio::task::spawn_blocking(move || {
        lab::connect_many(&c, to, 600, Duration::from_secs(60))
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Connections that stay open, opened in the middle of the burst.
    let held: Vec<TcpStream> = lab::hold(&client, to, 40).expect("held connections");
    assert_eq!(bursting.await.expect("join").expect("burst").len(), 600);
    // The loss counters are polled from the kernel every second: give them two polls.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut lost = 0;
    while lost == 0 && std::time::Instant::now() < deadline {
        lost = dropped(&agent.shared().metrics.encode().expect("metrics"));
        if lost == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    assert!(
        lost > 0,
        "the one-page ring lost records (else this test proves nothing)"
    );
    // Two rounds of one second, plus the scan and a margin.
    let took = converged(&agent, &[&client, &server_pod], Duration::from_secs(5)).await;
    eprintln!("converged {took:?} after the burst");
    assert_eq!(
        table_rows(&agent, &client).len(),
        40,
        "the held connections"
    );
    drop(held);
    let took = converged(&agent, &[&client, &server_pod], Duration::from_secs(5)).await;
    eprintln!("converged {took:?} after closing the held connections");
    let metrics = agent.shared().metrics.encode().expect("metrics");
    let fixed: u64 = ["removed", "added"]
        .iter()
        .filter_map(|a| {
            let p = format!("fanout_reconciled_total{{action=\"{a}\"}} ");
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&p)?.parse::<u64>().ok())
        })
        .sum();
    assert!(
        fixed > 0,
        "what the lost records broke is counted as reconciled"
    );
    agent.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_in_a_burst_brings_back_no_closed_connection() {
    lab::require_root("the accounting tests load eBPF programs and build a lab");
    let _one = SERIAL.lock().await;
    let (lab, server) = lab::client_server(false, 100_000).expect("lab");
    let (client, server_pod) = (lab.pod(0).clone(), lab.pod(1).clone());
    let to = server.addr;
    let held: Vec<TcpStream> = lab::hold(&client, to, 20).expect("held connections");
    let first = start_agent_with(|_| {}).await;
    let c = client.clone();
    let bursting = tokio::task::spawn_blocking(move || {
        lab::connect_many(&c, to, 3000, Duration::from_secs(60))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.shutdown().await.expect("shutdown");
    // The second agent starts while the burst runs; no reconciliation round after startup, so
    // that only the startup scan is judged.
    let second = start_agent_with(|o| o.reconcile_interval = Duration::from_secs(3600)).await;
    assert_eq!(bursting.await.expect("join").expect("burst").len(), 3000);
    // Every record of the burst read (a few poll intervals), then: exactly the held ones.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(kernel_connections(&client).len(), 20);
    converged(&second, &[&client, &server_pod], Duration::from_secs(1)).await;
    drop(held);
    second.shutdown().await.expect("shutdown");
}
