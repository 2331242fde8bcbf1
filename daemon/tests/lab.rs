//! Root tests against the real kernel, in a network-namespace lab. Each test makes its own lab
//! (unique prefix, torn down on every exit path) and its own agent, and looks only at its lab's
//! namespaces: the machine has unrelated TCP traffic.
//!
//! These tests never skip: without root or a needed kernel feature they fail and say what is
//! missing.

#[path = "support/e2e.rs"]
mod e2e;

use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use e2e::start_agent_with;
use fanout::{
    agent::Agent,
    conntable::{Direction, Origin},
    event::Event,
};
use fanout_common::RecordKind;
use tokio::sync::broadcast;
use xtask::lab;

fn require_root() {
    lab::require_root("the lab tests load eBPF programs and create network namespaces");
    assert!(
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
        "kernel BTF (/sys/kernel/btf/vmlinux) is missing: fanout needs CONFIG_DEBUG_INFO_BTF"
    );
}

async fn start_agent() -> Agent {
    start_agent_with(|_| {}).await
}

/// Collects events of the given namespaces until `done` says so or `limit` passes, then keeps
/// listening for `settle` more to catch anything extra.
async fn collect(
    rx: &mut broadcast::Receiver<Event>,
    netns: &[u32],
    limit: Duration,
    settle: Duration,
    done: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let mut out = Vec::new();
    let mut deadline = Instant::now() + limit;
    let mut settled = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Ok(ev)) => {
                if netns.contains(&ev.netns) {
                    out.push(ev);
                }
            }
            Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                panic!("test receiver lagged and lost {n} events")
            }
            Ok(Err(broadcast::error::RecvError::Closed)) => panic!("agent stopped"),
            Err(_) => return out,
        }
        if !settled && done(&out) {
            settled = true;
            deadline = Instant::now() + settle;
        }
    }
}

fn count(events: &[Event], kind: RecordKind, netns: u32) -> usize {
    events
        .iter()
        .filter(|e| e.kind == kind && e.netns == netns)
        .count()
}

fn assert_no_losses(agent: &Agent) {
    let text = agent.shared().metrics.encode().expect("metrics encode");
    for line in text
        .lines()
        .filter(|l| l.starts_with("fanout_events_lost_total"))
    {
        assert!(line.ends_with(" 0"), "records were lost: {line}");
    }
}

/// Which form of the tracepoints a lab run asks for.
#[derive(Clone, Copy, PartialEq)]
enum Hooks {
    /// BTF-typed (`--btf-tracepoints`): server ends' state with the socket, owner at the first
    /// read.
    Btf,
    /// Raw (the default, and the fallback where BTF-typed ones fail).
    Raw,
    /// Classic (`--classic-tracepoints`, and the fallback where raw ones fail).
    Classic,
    /// Raw, with owners named at accept() (`--accept-tracepoints`; the path of kernels without
    /// the length tracepoints).
    RawAccept,
}

/// K connections from pod0 to pod1: exactly K of each lifecycle step on each side, with the
/// right namespaces, 4-tuples and owners, and nothing lost; through each form of the hooks.
async fn k_connections(v6: bool, k: usize, hooks: Hooks) {
    require_root();
    let (lab, server) = lab::client_server(v6, k as u32).expect("lab");
    let client = lab.pod(0).clone();
    let agent = start_agent_with(|o| {
        o.probe.classic_tracepoints = hooks == Hooks::Classic;
        o.probe.btf_tracepoints = hooks == Hooks::Btf;
        o.probe.accept_tracepoints = hooks == Hooks::RawAccept;
    })
    .await;
    let info = agent.shared().metrics.encode().expect("metrics encode");
    let (want, not) = match hooks {
        Hooks::Classic => ("tracepoint:sock/inet_sock_set_state", "raw_tracepoint:"),
        Hooks::Raw => (
            "raw_tracepoint:inet_sock_set_state",
            "tracepoint:sock/inet_sock",
        ),
        Hooks::Btf => ("tp_btf:inet_sock_set_state", "tracepoint:"),
        Hooks::RawAccept => ("tracepoint:syscalls/sys_exit_accept", "first read or write"),
    };
    let build = info
        .lines()
        .find(|l| l.starts_with("fanout_build_info{"))
        .expect("fanout_build_info");
    assert!(
        build.contains(want) && !build.contains(not),
        "hooks in {build}"
    );
    let mut rx = agent.subscribe();
    let to = server.addr;
    let locals = tokio::task::spawn_blocking(move || {
        lab::connect_many(&client, to, k, Duration::from_secs(60))
    })
    .await
    .expect("join")
    .expect("connections");
    assert_eq!(locals.len(), k, "the lab opened all {k} connections");

    let (cn, sn) = (lab.pod(0).netns_inode, lab.pod(1).netns_inode);
    let events = collect(
        &mut rx,
        &[cn, sn],
        Duration::from_secs(20),
        Duration::from_millis(500),
        |ev| count(ev, RecordKind::Close, cn) >= k && count(ev, RecordKind::Close, sn) >= k,
    )
    .await;

    // Client side: established, close (the connect record only when the socket's state could
    // not be kept); server side: passive open, close, and an accepted record where the owner is
    // not kept in the socket map for user space to read (socket storage, BTF-typed) or is named
    // at accept(). The close records carry every owner (checked below).
    let accepted = match hooks {
        Hooks::Raw | Hooks::Classic => 0,
        Hooks::Btf | Hooks::RawAccept => k,
    };
    for (kind, ns, want) in [
        (RecordKind::Connect, cn, 0),
        (RecordKind::Established, cn, k),
        (RecordKind::Close, cn, k),
        (RecordKind::ConnectFailed, cn, 0),
        (RecordKind::PassiveOpen, sn, k),
        (RecordKind::Accepted, sn, accepted),
        (RecordKind::Close, sn, k),
        (RecordKind::PassiveOpen, cn, 0),
        (RecordKind::Established, sn, 0),
    ] {
        assert_eq!(count(&events, kind, ns), want, "{kind:?} in netns {ns}");
    }

    let want_locals: BTreeSet<SocketAddr> = locals.iter().copied().collect();
    let established: BTreeSet<SocketAddr> = events
        .iter()
        .filter(|e| e.kind == RecordKind::Established)
        .map(|e| {
            assert_eq!(e.remote, to, "client remote is the server");
            e.local
        })
        .collect();
    assert_eq!(established, want_locals, "client 4-tuples");
    // Closes carry the connection's tuple too (the kernel has released the local port by then).
    let closed: BTreeSet<SocketAddr> = events
        .iter()
        .filter(|e| e.kind == RecordKind::Close && e.netns == cn)
        .map(|e| {
            assert_eq!(e.remote, to, "client close remote is the server");
            e.local
        })
        .collect();
    assert_eq!(closed, want_locals, "client close 4-tuples");
    let accepted_remotes: BTreeSet<SocketAddr> = events
        .iter()
        .filter(|e| e.kind == RecordKind::PassiveOpen)
        .map(|e| {
            assert_eq!(e.local, to, "server local is the listening address");
            e.remote
        })
        .collect();
    assert_eq!(accepted_remotes, want_locals, "server 4-tuples");

    let me = std::process::id();
    for e in events.iter().filter(|e| {
        matches!(
            e.kind,
            RecordKind::Connect | RecordKind::Established | RecordKind::Accepted
        ) || (e.kind == RecordKind::Close)
    }) {
        let owner = e
            .owner
            .as_ref()
            .unwrap_or_else(|| panic!("no owner: {e:?}"));
        assert_eq!(owner.pid, me, "owner of {e:?}");
    }
    for e in events.iter().filter(|e| e.kind == RecordKind::Close) {
        let d = e
            .duration
            .unwrap_or_else(|| panic!("close without duration: {e:?}"));
        assert!(d < Duration::from_secs(60), "{d:?}");
    }

    let left = agent.shared().with_rows(|t| {
        t.iter()
            .filter(|c| c.key.netns == cn || c.key.netns == sn)
            .count()
    });
    assert_eq!(left, 0, "every closed connection left the table");
    assert_no_losses(&agent);
    agent.shutdown().await.expect("clean shutdown");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_ipv4_connections_are_reported_exactly() {
    k_connections(false, 200, Hooks::Raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_ipv6_connections_are_reported_exactly() {
    k_connections(true, 50, Hooks::Raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_connections_through_the_btf_tracepoints_are_reported_exactly() {
    k_connections(false, 100, Hooks::Btf).await;
    k_connections(true, 30, Hooks::Btf).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_connections_with_owners_from_the_accept_tracepoints_are_reported_exactly() {
    k_connections(false, 100, Hooks::RawAccept).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_connections_through_the_classic_tracepoints_are_reported_exactly() {
    k_connections(false, 100, Hooks::Classic).await;
    k_connections(true, 30, Hooks::Classic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_opened_before_start_is_recovered_and_its_close_seen() {
    require_root();
    let (lab, server) = lab::client_server(false, 4).expect("lab");
    let client = lab.pod(0).clone();
    let to = server.addr;
    let early = lab::hold(&client, to, 1).expect("connect");
    let local = early[0].local_addr().expect("local addr");

    let agent = start_agent().await;
    let (cn, sn) = (lab.pod(0).netns_inode, lab.pod(1).netns_inode);
    let conns: HashMap<(u32, SocketAddr), _> = agent.shared().with_rows(|t| {
        t.iter()
            .filter(|c| c.key.netns == cn || c.key.netns == sn)
            .map(|c| ((c.key.netns, c.key.local), c.clone()))
            .collect()
    });
    assert_eq!(conns.len(), 2, "both ends recovered: {conns:?}");
    let out = &conns[&(cn, local)];
    assert_eq!(
        (out.key.remote, out.direction, out.origin),
        (to, Direction::Outbound, Origin::Recovered)
    );
    assert_eq!(
        out.owner.as_ref().map(|o| o.pid),
        Some(std::process::id()),
        "owner found through /proc/<pid>/fd"
    );
    let inb = &conns[&(sn, to)];
    assert_eq!(
        (inb.key.remote, inb.direction, inb.origin),
        (local, Direction::Inbound, Origin::Recovered)
    );

    // Closing it produces close records that match the recovered entries by tuple.
    let mut rx = agent.subscribe();
    drop(early);
    let events = collect(
        &mut rx,
        &[cn, sn],
        Duration::from_secs(10),
        Duration::from_millis(300),
        |ev| count(ev, RecordKind::Close, cn) == 1 && count(ev, RecordKind::Close, sn) == 1,
    )
    .await;
    assert_eq!(count(&events, RecordKind::Close, cn), 1);
    assert_eq!(count(&events, RecordKind::Close, sn), 1);
    let left = agent.shared().with_rows(|t| {
        t.iter()
            .filter(|c| c.key.netns == cn || c.key.netns == sn)
            .count()
    });
    // Both closes matched their recovered entries (by tuple). The machine-wide unmatched-close
    // counter is not checked: other tests' labs vanish while their sockets still close.
    assert_eq!(left, 0, "recovered connections removed on close");
    agent.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_closed_port_is_reported_as_failed() {
    require_root();
    let lab = lab::Lab::new(2).expect("lab");
    let client = lab.pod(0).clone();
    let agent = start_agent().await;
    let mut rx = agent.subscribe();
    let to = lab.pod(1).addr(false, 9);
    let attempts = 3;
    let results = client
        .run(move || {
            (0..attempts)
                .map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(5)).is_err())
                .collect::<Vec<_>>()
        })
        .expect("lab");
    assert!(results.iter().all(|&refused| refused), "port 9 is closed");

    let cn = lab.pod(0).netns_inode;
    let events = collect(
        &mut rx,
        &[cn, lab.pod(1).netns_inode],
        Duration::from_secs(10),
        Duration::from_millis(300),
        |ev| count(ev, RecordKind::ConnectFailed, cn) >= attempts,
    )
    .await;
    // The owner travels with the socket from connect() to the failure record.
    assert_eq!(count(&events, RecordKind::Connect, cn), 0);
    assert_eq!(count(&events, RecordKind::ConnectFailed, cn), attempts);
    assert_eq!(count(&events, RecordKind::Established, cn), 0);
    for e in events
        .iter()
        .filter(|e| e.kind == RecordKind::ConnectFailed)
    {
        assert_eq!(e.remote, to);
        assert_eq!(e.owner.as_ref().map(|o| o.pid), Some(std::process::id()));
    }
    let metrics = agent.shared().metrics.encode().expect("metrics");
    let failed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fanout_connect_failed_total "))
        .and_then(|v| v.parse().ok())
        .expect("fanout_connect_failed_total present");
    assert!(failed >= attempts as u64, "{failed}");
    agent.shutdown().await.expect("clean shutdown");
}

fn lost_total(agent_metrics: &str, reason: &str) -> u64 {
    let prefix = format!("fanout_events_lost_total{{reason=\"{reason}\"}} ");
    agent_metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix} in metrics"))
}

/// A one-page ring that the reader is never woken for: records go in without a wakeup (nothing
/// arrives while traffic runs), the ring fills, and every lab record is either delivered (at
/// shutdown's final drain) or counted as lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_room_are_counted_as_lost() {
    require_root();
    let k = 50;
    let (lab, server) = lab::client_server(false, k as u32).expect("lab");
    let client = lab.pod(0).clone();
    let page = 4096;
    let agent = start_agent_with(|o| {
        // Never polled while the test runs, and a wakeup threshold the ring cannot reach.
        o.poll_interval = Duration::from_secs(3600);
        o.probe.ring_bytes = page;
        o.probe.wakeup_bytes = u64::from(page) - 1;
    })
    .await;
    let mut rx = agent.subscribe();
    let to = server.addr;
    let done = tokio::task::spawn_blocking(move || {
        lab::connect_many(&client, to, k, Duration::from_secs(60))
    })
    .await
    .expect("join")
    .expect("connections");
    assert_eq!(done.len(), k);
    tokio::time::sleep(Duration::from_millis(1500)).await; // loss poller runs every second
    let (cn, sn) = (lab.pod(0).netns_inode, lab.pod(1).netns_inode);
    let mut early = 0;
    while let Ok(ev) = rx.try_recv() {
        if ev.netns == cn || ev.netns == sn {
            early += 1;
        }
    }
    assert_eq!(
        early, 0,
        "no wakeup per record: nothing read before the final drain"
    );

    let shared = agent.shared().clone();
    let metrics = shared.metrics.encode().expect("metrics");
    agent.shutdown().await.expect("shutdown");
    let mut delivered = 0u64;
    while let Ok(ev) = rx.try_recv() {
        if ev.netns == cn || ev.netns == sn {
            delivered += 1;
        }
    }
    // Established, passive open, two closes (the connect rides on established, the server
    // end's owner on its state and close).
    let expected = 4 * k as u64;
    let lost = lost_total(&metrics, "ring_full");
    assert!(
        delivered < expected,
        "a one-page ring cannot hold {expected} records"
    );
    assert!(
        lost >= expected - delivered,
        "every missing lab record is counted: expected {expected}, delivered {delivered}, \
         lost {lost}"
    );
}

/// A live server end's owner is the task of its first read, kept with the socket's state: no
/// record says it, the sampler reads it for rows without an owner (and the close would carry
/// it). Connections the server has read nothing from have no owner yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_server_ends_learn_their_owner_from_the_socket_state() {
    require_root();
    let (lab, server) = lab::client_server(false, 4).expect("lab");
    let client = lab.pod(0).clone();
    let agent = start_agent().await;
    let to = server.addr;
    let mut held = lab::hold(&client, to, 4).expect("connect");
    // Three of the four send a byte, which the echo server reads (and answers).
    for s in held.iter_mut().take(3) {
        s.write_all(b"x").expect("send");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).expect("echo");
    }
    let locals: Vec<SocketAddr> = held
        .iter()
        .map(|s| s.local_addr().expect("local"))
        .collect();
    let sn = lab.pod(1).netns_inode;
    let me = std::process::id();
    let end = Instant::now() + Duration::from_secs(10);
    let owners = loop {
        let rows = agent.shared().rows().await;
        let owners: Vec<Option<u32>> = locals
            .iter()
            .map(|l| {
                rows.iter()
                    .find(|c| c.key.netns == sn && c.key.remote == *l)
                    .and_then(|c| c.owner.map(|o| o.pid))
            })
            .collect();
        if owners[..3].iter().all(|o| o.is_some()) || Instant::now() >= end {
            break owners;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        owners,
        vec![Some(me), Some(me), Some(me), None],
        "server ends' owners (the last one was never read)"
    );
    drop(held);
    agent.shutdown().await.expect("shutdown");
}

/// A socket map with room for one socket: the overflow is counted, records still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_socket_map_is_counted() {
    require_root();
    let (lab, server) = lab::client_server(false, 3).expect("lab");
    let client = lab.pod(0).clone();
    let agent = start_agent_with(|o| o.probe.sock_entries = 1).await;
    let mut rx = agent.subscribe();
    let to = server.addr;
    let held = lab::hold(&client, to, 3).expect("connect");
    let cn = lab.pod(0).netns_inode;
    let events = collect(
        &mut rx,
        &[cn],
        Duration::from_secs(10),
        Duration::from_millis(200),
        |ev| count(ev, RecordKind::Established, cn) == 3,
    )
    .await;
    assert_eq!(
        count(&events, RecordKind::Established, cn),
        3,
        "records still flow"
    );
    // The one entry holds at most one of the three sockets: the others' connects could not
    // keep their owner with the socket, so the kernel reported it in a connect record, and the
    // table still knows who owns every connection.
    assert!(
        count(&events, RecordKind::Connect, cn) >= 2,
        "a connect record where the state could not be kept"
    );
    let me = std::process::id();
    let owners: Vec<Option<u32>> = agent
        .shared()
        .rows()
        .await
        .iter()
        .filter(|c| c.key.netns == cn && c.key.remote == to)
        .map(|c| c.owner.map(|o| o.pid))
        .collect();
    assert_eq!(owners, vec![Some(me); 3], "owners of the held connections");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = agent.shared().metrics.encode().expect("metrics");
    assert!(lost_total(&metrics, "sock_map_full") >= 2, "{metrics}");
    drop(held);
    agent.shutdown().await.expect("shutdown");
}
