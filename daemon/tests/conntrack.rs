//! Root tests of conntrack lookups against the real kernel, in a network-namespace lab: a DNAT rule
//! in a pod's nat OUTPUT chain stands in for kube-proxy, and the lookup must name the backend the
//! rule chose. All traffic stays inside the lab's namespaces; the lab is torn down when dropped.
//!
//! These tests never skip: without root or iptables they fail and say what is missing.

use std::{
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use fanout::identity::conntrack::{Conntrack, ConntrackError, Tuple};
use xtask::lab::{Lab, Pod};

const SERVICE_V4: &str = "10.96.0.10:80";
const SERVICE_V6: &str = "[fd00:96::10]:80";
const BACKEND_PORT: u16 = 8080;

fn require_root_and(tool: &str) {
    xtask::lab::require_root("the conntrack tests create network namespaces and iptables rules");
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        found,
        "`{tool}` is missing: the conntrack tests need it to add a DNAT rule (install the \
         iptables package, or run `cargo xtask setup`)"
    );
}

/// Runs `cmd args` inside the pod's network namespace and fails the test if it does not succeed.
fn pod_exec(pod: &Pod, cmd: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.netns, cmd])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip netns exec {} {cmd}`: {e}", pod.netns));
    assert!(
        out.status.success(),
        "`ip netns exec {} {cmd} {}` failed: {}",
        pod.netns,
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn netns_path(pod: &Pod) -> PathBuf {
    Path::new("/run/netns").join(&pod.netns)
}

/// In `pod`, sends the service address to the pod itself on BACKEND_PORT the way kube-proxy
/// would (DNAT in nat OUTPUT), listens there, and opens one connection to the service. Returns
/// the listener, the client stream (kept open by the caller) and the original tuple.
fn dnat_connection(pod: &Pod, v6: bool) -> (TcpListener, TcpStream, Tuple) {
    let (iptables, service): (&str, SocketAddr) = if v6 {
        ("ip6tables", SERVICE_V6.parse().unwrap())
    } else {
        ("iptables", SERVICE_V4.parse().unwrap())
    };
    let backend = pod.addr(v6, BACKEND_PORT);
    let to = format!("{}", backend);
    let dst = format!(
        "{}/{}",
        service.ip(),
        if service.is_ipv4() { 32 } else { 128 }
    );
    pod_exec(
        pod,
        iptables,
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            &dst,
            "-p",
            "tcp",
            "--dport",
            &service.port().to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    );
    let listener = pod
        .run(move || TcpListener::bind(backend))
        .expect("pod thread")
        .unwrap_or_else(|e| panic!("listen on {backend} in the pod: {e}"));
    let client = pod
        .run(move || TcpStream::connect_timeout(&service, Duration::from_secs(5)))
        .expect("pod thread")
        .unwrap_or_else(|e| panic!("connect to {service} from the pod: {e}"));
    let local = client.local_addr().expect("client local address");
    // The DNAT really happened: the listener got the connection.
    let (_server, peer) = listener
        .accept()
        .expect("the backend accepts the connection");
    assert_eq!(peer, local, "the backend sees the client");
    (listener, client, Tuple::new(local, service))
}

fn check_dnat_lookup(v6: bool) {
    require_root_and(if v6 { "ip6tables" } else { "iptables" });
    let lab = Lab::new(1).expect("lab");
    let pod = lab.pod(0);
    let (_listener, client, orig) = dnat_connection(pod, v6);
    let backend = pod.addr(v6, BACKEND_PORT);

    let ct = Conntrack::open_in(&netns_path(pod)).expect("conntrack socket in the pod namespace");
    // This thread is still in the test's own namespace: the socket works from any thread.
    assert_eq!(
        ct.reply_tuple(orig).expect("lookup"),
        Some(Tuple::new(backend, orig.src)),
        "the reply tuple names the backend the DNAT chose"
    );
    // Repeated lookups on the same socket keep working.
    assert_eq!(
        ct.reply_tuple(orig).expect("second lookup"),
        Some(Tuple::new(backend, orig.src))
    );
    // From another thread too.
    let from_thread = std::thread::scope(|s| s.spawn(|| ct.reply_tuple(orig)).join())
        .expect("lookup thread")
        .expect("lookup from another thread");
    assert_eq!(from_thread, Some(Tuple::new(backend, orig.src)));

    // A connection that does not exist: no entry.
    let absent = Tuple::new(
        SocketAddr::new(orig.src.ip(), orig.src.port().wrapping_add(1).max(1)),
        SocketAddr::new(orig.dst.ip(), 81),
    );
    assert_eq!(
        ct.reply_tuple(absent).expect("lookup of an absent tuple"),
        None
    );

    // The test's own namespace has its own table, without the lab's entry.
    let own = Conntrack::open().expect("conntrack socket in the test's namespace");
    assert_eq!(
        own.reply_tuple(orig)
            .expect("lookup in the test's namespace"),
        None,
        "a socket opened outside the pod does not see the pod's conntrack entry"
    );
    drop(client);
}

#[test]
fn ipv4_dnat_lookup_names_the_backend() {
    check_dnat_lookup(false);
}

#[test]
fn ipv6_dnat_lookup_names_the_backend() {
    check_dnat_lookup(true);
}

#[test]
fn ipv4_mapped_lookup_finds_the_ipv4_entry() {
    require_root_and("iptables");
    let lab = Lab::new(1).expect("lab");
    let pod = lab.pod(0);
    let (_listener, _client, orig) = dnat_connection(pod, false);
    let map = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    let mapped = Tuple::new(map(orig.src), map(orig.dst));
    let ct = Conntrack::open_in(&netns_path(pod)).expect("conntrack socket in the pod namespace");
    assert_eq!(
        ct.reply_tuple(mapped).expect("lookup"),
        Some(Tuple::new(pod.addr(false, BACKEND_PORT), orig.src))
    );
}

#[test]
fn open_in_a_missing_namespace_fails_clearly() {
    let path = Path::new("/run/netns/fanout-no-such-namespace");
    match Conntrack::open_in(path) {
        Err(e @ ConntrackError::Namespace { .. }) => {
            assert!(e.to_string().contains("fanout-no-such-namespace"), "{e}")
        }
        other => panic!("expected a namespace error, got {other:?}"),
    }
    // A file that is not a network namespace.
    match Conntrack::open_in(Path::new("/proc/self/status")) {
        Err(ConntrackError::Namespace { .. }) => {}
        other => panic!("expected a namespace error, got {other:?}"),
    }
}
