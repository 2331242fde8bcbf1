//! Network-namespace lab: N "pods" (network namespaces) joined by veth pairs to a bridge inside a
//! lab "node" namespace. Addresses exist only inside the lab's namespaces (10.244.S.0/24 and
//! fd00:244:S::/64, S unique per lab of a process), so lab traffic never leaves them.
//!
//! Every lab gets a unique name prefix (`fo<pid>x<n>`). Dropping the [`Lab`] deletes its namespaces
//! (also on panic unwinding); a lab whose creating process died without cleaning up (SIGKILL) is
//! swept by the next [`Lab::new`] or by `cargo xtask lab clean`.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Every lab namespace name starts with this.
pub const PREFIX: &str = "fo";
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source} (is iproute2 installed? run `cargo xtask setup`)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("network namespace {name}: {source}")]
    Netns {
        name: String,
        source: std::io::Error,
    },
    #[error("lab thread panicked")]
    Panicked,
}

/// One pod: a network namespace with `eth0` on the lab bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    /// Inode of the network namespace: what the kernel reports as the socket's netns.
    pub netns_inode: u32,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

pub struct Lab {
    pub prefix: String,
    /// The lab's /24 is 10.244.`subnet`.0/24 (and fd00:244:`subnet`::/64): labs made by one
    /// process at the same time never share pod IPs, like pods of one cluster.
    pub subnet: u8,
    /// The node namespace holding the bridge.
    pub node: String,
    pub node_inode: u32,
    pub pods: Vec<Pod>,
    namespaces: Vec<String>,
}

fn run(cmd: &str, args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| LabError::Spawn {
            cmd: cmd.to_string(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<(), LabError> {
    run("ip", args).map(|_| ())
}

/// Inode of a named network namespace.
pub fn netns_inode(name: &str) -> Result<u32, LabError> {
    let path = Path::new(NETNS_DIR).join(name);
    std::fs::metadata(&path)
        .map(|m| m.ino() as u32)
        .map_err(|source| LabError::Netns {
            name: name.to_string(),
            source,
        })
}

/// Pid encoded in a lab prefix `fo<pid>x<n>`.
fn owner_pid(ns: &str) -> Option<u32> {
    let rest = ns.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// Deletes lab namespaces whose creating process is gone (or all lab namespaces with `all`).
/// Returns the names deleted.
pub fn sweep(all: bool) -> Vec<String> {
    let Ok(out) = run("ip", &["netns", "list"]) else {
        return Vec::new();
    };
    let mut deleted = Vec::new();
    for line in out.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = owner_pid(name) else { continue };
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        if (all || !alive) && ip(&["netns", "del", name]).is_ok() {
            deleted.push(name.to_string());
        }
    }
    deleted
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Creates a lab with `pods` pod namespaces. Pod `i` gets 10.244.S.(i+2)/24 and
    /// fd00:244:S::(i+2)/64, where S is the lab's [`Lab::subnet`]; the node is .1 ([`Lab::gateway`]).
    pub fn new(pods: usize) -> Result<Lab, LabError> {
        sweep(false);
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}x{seq}", std::process::id());
        let subnet = (seq % 256) as u8;
        let (gw4, gw6) = (
            Ipv4Addr::new(10, 244, subnet, 1),
            Ipv6Addr::new(0xfd00, 0x244, u16::from(subnet), 0, 0, 0, 0, 1),
        );
        let node = format!("{prefix}-node");
        let mut lab = Lab {
            prefix: prefix.clone(),
            subnet,
            node: node.clone(),
            node_inode: 0,
            pods: Vec::new(),
            namespaces: Vec::new(),
        };
        // From here on, Drop cleans up whatever was created if a step fails.
        ip(&["netns", "add", &node])?;
        lab.namespaces.push(node.clone());
        lab.node_inode = netns_inode(&node)?;
        ip(&["-n", &node, "link", "set", "lo", "up"])?;
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &node, "link", "set", "br0", "up"])?;
        // The bridge is the pods' gateway, so that traffic to service IPs goes through the node
        // namespace, and bridged traffic passes iptables (br_netfilter) like on a kubenet node:
        // that is what lets DNAT'ed replies between pods on one bridge be un-NATed.
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{gw4}/24"),
            "dev",
            "br0",
        ])?;
        ip(&[
            "-n",
            &node,
            "addr",
            "add",
            &format!("{gw6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        let node_ns = Pod {
            name: "node".into(),
            netns: node.clone(),
            netns_inode: lab.node_inode,
            ipv4: gw4,
            ipv6: gw6,
        };
        node_ns
            .run(|| -> std::io::Result<()> {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
                std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")?;
                std::fs::write("/proc/sys/net/bridge/bridge-nf-call-iptables", "1")?;
                std::fs::write("/proc/sys/net/bridge/bridge-nf-call-ip6tables", "1")
            })?
            .map_err(|source| LabError::Netns {
                name: node.clone(),
                source,
            })?;
        for i in 0..pods {
            let name = format!("pod{i}");
            let netns = format!("{prefix}-{name}");
            ip(&["netns", "add", &netns])?;
            lab.namespaces.push(netns.clone());
            let host_end = format!("veth{i}");
            ip(&[
                "-n", &node, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ])?;
            ip(&["-n", &node, "link", "set", &host_end, "master", "br0", "up"])?;
            let last = u8::try_from(i + 2).map_err(|_| LabError::Command {
                cmd: "lab".into(),
                stderr: "at most 250 pods".into(),
            })?;
            let ipv4 = Ipv4Addr::new(10, 244, subnet, last);
            let ipv6 = Ipv6Addr::new(
                0xfd00,
                0x244,
                u16::from(subnet),
                0,
                0,
                0,
                0,
                u16::from(last),
            );
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ipv4}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ipv6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                "default",
                "via",
                &gw4.to_string(),
            ])?;
            ip(&[
                "-n",
                &netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gw6.to_string(),
            ])?;
            let pod = Pod {
                name,
                netns_inode: netns_inode(&netns)?,
                netns,
                ipv4,
                ipv6,
            };
            // Like a busy client node: reuse TIME_WAIT ports for new connections and use a
            // wide port range, so that bounded load loops do not run out of ports.
            pod.run(|| {
                std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
                std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000")
            })?
            .map_err(|source| LabError::Netns {
                name: pod.netns.clone(),
                source,
            })?;
            lab.pods.push(pod);
        }
        Ok(lab)
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    /// Runs a command inside the node namespace (e.g. iptables rules that mimic kube-proxy).
    pub fn node_exec(&self, cmd: &str, args: &[&str]) -> Result<String, LabError> {
        let mut full = vec!["netns", "exec", &self.node, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Makes `vip` a ClusterIP the way kube-proxy (iptables mode) does: DNAT in the node
    /// namespace to one of `backends`, chosen at random per connection. IPv4 or IPv6.
    pub fn add_cluster_ip(&self, vip: SocketAddr, backends: &[SocketAddr]) -> Result<(), LabError> {
        let tool = if vip.is_ipv4() {
            "iptables"
        } else {
            "ip6tables"
        };
        // One chain per VIP (FNV-1a of the address keeps the name short and unique).
        let hash = vip.to_string().bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        let chain = format!("FO-SVC-{hash:08X}");
        let mask = if vip.is_ipv4() { "/32" } else { "/128" };
        let dst = format!("{}{mask}", vip.ip());
        // The node's own connections (hostNetwork clients) are routed before OUTPUT's DNAT: the
        // VIP needs a route, as a real node's default route gives it. It never leaves the lab:
        // the DNAT rewrites it to a pod address on the bridge first.
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        self.node_exec("ip", &[family, "route", "replace", &dst, "dev", "br0"])?;
        let port = vip.port().to_string();
        // A fresh chain per service port; PREROUTING for pod traffic, OUTPUT for the node's own.
        let _ = self.node_exec(tool, &["-t", "nat", "-N", &chain]);
        for hook in ["PREROUTING", "OUTPUT"] {
            self.node_exec(
                tool,
                &[
                    "-t", "nat", "-A", hook, "-d", &dst, "-p", "tcp", "--dport", &port, "-j",
                    &chain,
                ],
            )?;
        }
        let n = backends.len();
        for (i, b) in backends.iter().enumerate() {
            let to = b.to_string();
            let left = n - i;
            if left > 1 {
                let p = format!("{:.5}", 1.0 / left as f64);
                self.node_exec(
                    tool,
                    &[
                        "-t",
                        "nat",
                        "-A",
                        &chain,
                        "-p",
                        "tcp",
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ],
                )?;
            } else {
                self.node_exec(
                    tool,
                    &[
                        "-t",
                        "nat",
                        "-A",
                        &chain,
                        "-p",
                        "tcp",
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// The node's address on the lab bridge: the pods' gateway (and what the node's own
    /// connections to pods come from).
    pub fn gateway(&self) -> Pod {
        Pod {
            name: "node".into(),
            netns: self.node.clone(),
            netns_inode: self.node_inode,
            ipv4: Ipv4Addr::new(10, 244, self.subnet, 1),
            ipv6: Ipv6Addr::new(0xfd00, 0x244, u16::from(self.subnet), 0, 0, 0, 0, 1),
        }
    }

    /// Path of the node namespace (for `fanout run --conntrack-netns`).
    pub fn node_netns_path(&self) -> std::path::PathBuf {
        Path::new(NETNS_DIR).join(&self.node)
    }

    /// Deletes every namespace of the lab. Idempotent.
    pub fn teardown(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("lab teardown: {e}");
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Moves the calling thread into network namespace `netns`.
fn enter(netns: &str) -> Result<(), LabError> {
    let err = |source| LabError::Netns {
        name: netns.to_string(),
        source,
    };
    let f = File::open(Path::new(NETNS_DIR).join(netns)).map_err(err)?;
    // SAFETY: valid namespace fd; only the calling thread changes namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

impl Pod {
    /// Runs `f` on a thread inside this pod's network namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, LabError> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&self.netns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| LabError::Panicked)?
        })
    }

    /// Starts `f` on a thread inside this pod's network namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<Result<T, LabError>> {
        let netns = self.netns.clone();
        std::thread::spawn(move || {
            enter(&netns)?;
            Ok(f())
        })
    }

    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        if v6 {
            SocketAddr::new(self.ipv6.into(), port)
        } else {
            SocketAddr::new(self.ipv4.into(), port)
        }
    }
}

/// A TCP server in a pod: accepts, reads until EOF, echoes a byte, closes. Stops when dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU32>,
    peers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<Result<(), LabError>>>,
}

impl EchoServer {
    /// Listens on `addr` inside `pod` (use port 0 for any) and serves at most `max_conns`
    /// connections or until `deadline` passes.
    pub fn start(
        pod: &Pod,
        addr: SocketAddr,
        max_conns: u32,
        deadline: Duration,
    ) -> Result<EchoServer, LabError> {
        let listener = pod.run(move || TcpListener::bind(addr))?;
        let listener = listener.map_err(|source| LabError::Netns {
            name: pod.netns.clone(),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| LabError::Netns {
            name: pod.netns.clone(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| LabError::Netns {
                name: pod.netns.clone(),
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU32::new(0));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, accepted2, peers2) = (stop.clone(), accepted.clone(), peers.clone());
        // Accepting needs no namespace switch: the listener already belongs to the pod. Each
        // connection gets its own thread so that long-lived ones do not hold up the rest.
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + deadline;
            let mut conns = Vec::new();
            while !stop2.load(Ordering::Relaxed)
                && Instant::now() < end
                && accepted2.load(Ordering::Relaxed) < max_conns
            {
                if !readable(&listener, 50) {
                    conns.retain(|t: &JoinHandle<()>| !t.is_finished());
                    continue;
                }
                if let Ok((s, peer)) = listener.accept() {
                    accepted2.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut p) = peers2.lock() {
                        p.push(peer);
                    }
                    let stop3 = stop2.clone();
                    conns.push(std::thread::spawn(move || echo(s, &stop3, end)));
                }
                conns.retain(|t: &JoinHandle<()>| !t.is_finished());
            }
            for t in conns {
                let _ = t.join();
            }
            Ok(())
        });
        Ok(EchoServer {
            addr,
            stop,
            accepted,
            peers,
            thread: Some(thread),
        })
    }

    pub fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Remote addresses of the connections accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to `ms` for `listener` to have a connection to accept.
fn readable(listener: &TcpListener, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// A two-pod lab with an echo server in pod1 (on IPv6 with `v6`, any port): the usual client →
/// server fixture. The server accepts at most `max_conns` connections within a minute.
pub fn client_server(v6: bool, max_conns: u32) -> Result<(Lab, EchoServer), LabError> {
    let lab = Lab::new(2)?;
    let pod = lab.pod(1);
    let server = EchoServer::start(pod, pod.addr(v6, 0), max_conns, Duration::from_secs(60))?;
    Ok((lab, server))
}

/// Opens `n` connections from `pod` to `to` and keeps them open (closed when dropped).
pub fn hold(pod: &Pod, to: SocketAddr, n: usize) -> Result<Vec<TcpStream>, LabError> {
    pod.run(move || {
        (0..n)
            .map(|_| TcpStream::connect(to))
            .collect::<std::io::Result<Vec<_>>>()
    })?
    .map_err(|source| LabError::Netns {
        name: pod.netns.clone(),
        source,
    })
}

/// Echoes the first byte of every read until EOF, `stop`, or `end`.
fn echo(mut s: TcpStream, stop: &AtomicBool, end: Instant) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let _ = s.write_all(&buf[..n.min(1)]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Opens `count` connections from `pod` to `to`, one at a time: connect, send a byte, read the
/// echo, close. Returns the local address of each connection. Bounded by `deadline`.
pub fn connect_many(
    pod: &Pod,
    to: SocketAddr,
    count: usize,
    deadline: Duration,
) -> Result<Vec<SocketAddr>, LabError> {
    pod.run(move || {
        let end = Instant::now() + deadline;
        let mut locals = Vec::with_capacity(count);
        for _ in 0..count {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(mut s) = TcpStream::connect_timeout(&to, left) else {
                continue;
            };
            let Ok(local) = s.local_addr() else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"x");
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            let _ = s.shutdown(Shutdown::Write);
            let _ = s.read(&mut b);
            locals.push(local);
        }
        locals
    })
}

/// Fails the calling test unless it runs as root: root lab tests never skip silently. `what`
/// says what the test needs root for.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "{what}: run as root (cargo xtask test)");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root: the ClusterIP DNAT spreads connections over every backend and every connection
    /// lands (replies are un-NATed across the bridge), for IPv4 and IPv6.
    #[test]
    fn cluster_ip_reaches_every_backend() {
        require_root("lab tests create network namespaces and iptables rules");
        let lab = Lab::new(4).expect("lab");
        for (v6, vip) in [(false, "10.96.0.10:80"), (true, "[fd00:96::10]:80")] {
            let vip: SocketAddr = vip.parse().expect("vip");
            let servers: Vec<EchoServer> = (1..4)
                .map(|i| {
                    let pod = lab.pod(i);
                    EchoServer::start(pod, pod.addr(v6, 8080), 100, Duration::from_secs(60))
                        .expect("server")
                })
                .collect();
            let backends: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
            lab.add_cluster_ip(vip, &backends).expect("cluster ip");
            let done = connect_many(lab.pod(0), vip, 60, Duration::from_secs(30)).expect("lab");
            assert_eq!(done.len(), 60, "every connection through the VIP lands");
            std::thread::sleep(Duration::from_millis(200));
            let per: Vec<u32> = servers.iter().map(EchoServer::accepted).collect();
            assert_eq!(per.iter().sum::<u32>(), 60, "{per:?}");
            assert!(
                per.iter().all(|&n| n > 0),
                "random DNAT reaches all: {per:?}"
            );
        }
    }

    #[test]
    fn prefix_encodes_owner_pid() {
        assert_eq!(owner_pid("fo1234x0-pod1"), Some(1234));
        assert_eq!(owner_pid("fo1234x17-node"), Some(1234));
        assert_eq!(owner_pid("cni-1234"), None);
        assert_eq!(owner_pid("foo-x"), None);
    }
}
