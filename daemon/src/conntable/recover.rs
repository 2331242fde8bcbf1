//! Startup recovery: connections that existed before the tracer attached, read from
//! `/proc/.../net/tcp` and `tcp6` once per distinct network namespace.
//!
//! Namespaces are found through every thread's `/proc/<pid>/task/<tid>/ns/net` and through the
//! bind mounts in `/run/netns` (namespaces that no process lives in, as `ip netns` makes them).
//! Owners come from the socket inodes in `/proc/<pid>/fd`.
//!
//! What the scan could not read for lack of permission is counted, never skipped silently:
//! another process's `ns/net` and fd links need ptrace access to it (CAP_SYS_PTRACE in a
//! container, whose capabilities are fewer than the host's processes'), the fd directory of
//! another user's process needs CAP_DAC_READ_SEARCH, and entering a namespace from `/run/netns`
//! needs CAP_SYS_ADMIN. [`Scan`] carries those counts; the agent turns them into degraded
//! features.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use super::{Conn, ConnKey, Direction, Origin};
use crate::event::{Comm, Owner};

/// One row of /proc/net/tcp{,6}.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcSock {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Kernel TCP state number.
    pub state: u8,
    pub inode: u64,
}

const ST_LISTEN: u8 = 0x0a;

/// States of a full socket that is (or was) a connection and will still go to CLOSE.
fn is_connection_state(st: u8) -> bool {
    // ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING
    matches!(st, 0x01 | 0x04 | 0x05 | 0x08 | 0x09 | 0x0b)
}

fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The kernel prints each 32-bit word of the network-order address as a native integer.
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(w, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Ipv6Addr::from(b).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Parses the text of /proc/net/tcp or /proc/net/tcp6. Malformed rows are skipped.
pub fn parse_proc_net_tcp(text: &str) -> Vec<ProcSock> {
    text.lines().skip(1).filter_map(parse_row).collect()
}

/// One row of /proc/net/tcp: `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`.
fn parse_row(line: &str) -> Option<ProcSock> {
    let mut f = line.split_whitespace();
    let local = f.nth(1)?;
    let remote = f.next()?;
    let state = f.next()?;
    let inode = f.nth(5)?;
    Some(ProcSock {
        local: parse_addr(local)?,
        remote: parse_addr(remote)?,
        state: u8::from_str_radix(state, 16).ok()?,
        inode: inode.parse().ok()?,
    })
}

/// The listeners and connections of /proc/net/tcp or tcp6, read a line at a time: a busy node's
/// tables are mostly TIME_WAIT rows (hundreds of thousands after a burst), which would otherwise
/// be read whole into memory and parsed only to be dropped.
fn read_table(path: &Path) -> std::io::Result<Vec<ProcSock>> {
    kept_rows(std::io::BufReader::with_capacity(
        64 << 10,
        File::open(path)?,
    ))
}

/// The rows of a /proc/net/tcp text that [`connections`] can use: listeners and connections.
fn kept_rows(text: impl std::io::BufRead) -> std::io::Result<Vec<ProcSock>> {
    let mut socks = Vec::new();
    for line in text.lines().skip(1) {
        if let Some(s) = parse_row(&line?)
            && (s.state == ST_LISTEN || is_connection_state(s.state))
        {
            socks.push(s);
        }
    }
    Ok(socks)
}

/// Turns one namespace's socket rows into connections. A connection whose local port has a
/// listener in the namespace (on its address or a wildcard) was accepted; any other was dialled.
pub fn connections(netns: u32, socks: &[ProcSock], owners: &HashMap<u64, Owner>) -> Vec<Conn> {
    let listeners: HashSet<SocketAddr> = socks
        .iter()
        .filter(|s| s.state == ST_LISTEN)
        .map(|s| s.local)
        .collect();
    let listening = |local: &SocketAddr| {
        let any: IpAddr = if local.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        listeners.contains(local)
            || listeners.contains(&SocketAddr::new(any, local.port()))
            // A dual-stack [::] listener also accepts IPv4.
            || listeners.contains(&SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), local.port()))
    };
    socks
        .iter()
        .filter(|s| is_connection_state(s.state))
        .map(|s| Conn {
            key: ConnKey {
                netns,
                local: s.local,
                remote: s.remote,
            },
            direction: if listening(&s.local) {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            origin: Origin::Recovered,
            sock: 0,
            owner: owners.get(&s.inode).cloned(),
            opened_ns: None,
            backend: None,
            counters: Default::default(),
            requests: None,
        })
        .collect()
}

/// The inode a `kind:[inode]` link names; a link that could not be read for lack of permission
/// is counted in `denied`.
fn inode_of_link_checked(link: &Path, kind: &str, denied: &mut usize) -> Option<u64> {
    let target = match std::fs::read_link(link) {
        Ok(t) => t,
        Err(e) => {
            if is_denied(&e) {
                *denied += 1;
            }
            return None;
        }
    };
    let s = target.to_str()?;
    s.strip_prefix(kind)?
        .strip_prefix(":[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// EACCES or EPERM: the kernel refused, as opposed to a process that went away.
fn is_denied(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
}

fn numeric_dirs(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Socket inode → owning process, from every process's fd table; and how many processes'
/// fd tables could not be read for lack of permission.
fn socket_owners(proc: &Path) -> (HashMap<u64, Owner>, usize) {
    let mut owners = HashMap::new();
    let mut denied_processes = 0;
    for pid in numeric_dirs(proc) {
        let pdir = proc.join(pid.to_string());
        let comm = std::fs::read_to_string(pdir.join("comm"))
            .map(|c| Comm::from(c.trim_end()))
            .unwrap_or_default();
        let fds = match std::fs::read_dir(pdir.join("fd")) {
            Ok(fds) => fds,
            Err(e) => {
                denied_processes += usize::from(is_denied(&e));
                continue;
            }
        };
        let mut denied = 0;
        for fd in fds.flatten() {
            if let Some(inode) = inode_of_link_checked(&fd.path(), "socket", &mut denied) {
                owners.entry(inode).or_insert_with(|| Owner {
                    pid,
                    tid: pid,
                    comm,
                });
            }
        }
        denied_processes += usize::from(denied > 0);
    }
    (owners, denied_processes)
}

fn read_tables(dir: &Path) -> Vec<ProcSock> {
    let mut socks = Vec::new();
    for name in ["tcp", "tcp6"] {
        if let Ok(rows) = read_table(&dir.join(name)) {
            socks.extend(rows);
        }
    }
    socks
}

/// Reads tcp/tcp6 of a namespace no process lives in, from a thread that enters it, with the
/// namespace's [`table_id`].
fn read_tables_in(ns_file: &Path) -> std::io::Result<(Vec<ProcSock>, Option<u64>)> {
    let f = File::open(ns_file)?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: valid namespace fd; only this short-lived thread changes namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let net = Path::new("/proc/thread-self/net");
            Ok((read_tables(net), table_id(net)))
        })
        .join()
        .map_err(|_| std::io::Error::other("netns reader thread panicked"))?
    })
}

/// Result of a startup scan.
#[derive(Default, Debug)]
pub struct Scan {
    pub conns: Vec<Conn>,
    pub namespaces: usize,
    /// Network namespaces known to exist (a thread's `net/tcp` is readable, and its inode, which
    /// is per namespace, was not among those scanned) whose identity could not be read for lack
    /// of permission: their connections are missing.
    pub netns_unreachable: usize,
    /// `/run/netns` namespaces that could not be entered for lack of permission.
    pub enter_denied: usize,
    /// Processes whose fd table could not be read for lack of permission.
    pub owners_denied: usize,
    /// Connections found without an owner although their socket has an inode (an fd some process
    /// holds, in an fd table that could not be read, or one opened while the scan ran: the tracer
    /// reports those itself, with their owner, so the agent only counts the ones it keeps).
    pub ownerless: HashSet<ConnKey>,
}

/// The inode of a namespace's `net/tcp` entry: procfs makes one per network namespace, and it
/// is readable without ptrace access, so it tells namespaces apart even where `ns/net` is not
/// readable.
fn table_id(net_dir: &Path) -> Option<u64> {
    std::fs::metadata(net_dir.join("tcp")).ok().map(|m| m.ino())
}

/// The TCP tables of every network namespace that can be reached, one read per namespace.
#[derive(Default, Debug)]
pub struct Tables {
    /// Per namespace (inode): its sockets.
    pub namespaces: Vec<(u32, Vec<ProcSock>)>,
    /// See [`Scan::netns_unreachable`].
    pub netns_unreachable: usize,
    /// See [`Scan::enter_denied`].
    pub enter_denied: usize,
}

impl Tables {
    /// The namespaces read.
    pub fn covered(&self) -> HashSet<u32> {
        self.namespaces.iter().map(|(ns, _)| *ns).collect()
    }
}

/// Reads the TCP table of every network namespace: through a thread of each (found in
/// `<proc>/<pid>/task/<tid>/ns/net`), and of the namespaces in `netns_dirs` that no process
/// lives in, from a thread that enters them.
pub fn tables(proc: &Path, netns_dirs: &[PathBuf]) -> Tables {
    let mut seen: HashSet<u32> = HashSet::new();
    // Namespaces by their net/tcp inode: those read, and those whose ns/net was denied.
    let mut tables_seen: HashSet<u64> = HashSet::new();
    let mut tables_denied: HashSet<u64> = HashSet::new();
    let mut out = Tables::default();
    for pid in numeric_dirs(proc) {
        let tdir = proc.join(pid.to_string()).join("task");
        for tid in numeric_dirs(&tdir) {
            let task = tdir.join(tid.to_string());
            let mut denied = 0;
            let Some(ns) = inode_of_link_checked(&task.join("ns/net"), "net", &mut denied) else {
                if denied > 0
                    && let Some(t) = table_id(&task.join("net"))
                {
                    tables_denied.insert(t);
                }
                continue;
            };
            let ns = ns as u32;
            if !seen.insert(ns) {
                continue;
            }
            let net = task.join("net");
            if let Some(t) = table_id(&net) {
                tables_seen.insert(t);
            }
            out.namespaces.push((ns, read_tables(&net)));
        }
    }
    for dir in netns_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            let ns = meta.ino() as u32;
            if !seen.insert(ns) {
                continue;
            }
            match read_tables_in(&e.path()) {
                Ok((socks, table)) => {
                    tables_seen.extend(table);
                    out.namespaces.push((ns, socks));
                }
                Err(err) => {
                    if is_denied(&err) {
                        out.enter_denied += 1;
                    }
                    tracing::debug!(path = %e.path().display(), %err, "cannot read namespace")
                }
            }
        }
    }
    out.netns_unreachable = tables_denied.difference(&tables_seen).count();
    out
}

/// Turns read tables into connections, with owners from every process's fd table.
pub fn with_owners(proc: &Path, tables: Tables) -> Scan {
    let (owners, owners_denied) = socket_owners(proc);
    let mut out = Scan {
        namespaces: tables.namespaces.len(),
        netns_unreachable: tables.netns_unreachable,
        enter_denied: tables.enter_denied,
        owners_denied,
        ..Scan::default()
    };
    for (ns, socks) in &tables.namespaces {
        for s in socks
            .iter()
            .filter(|s| is_connection_state(s.state) && s.inode != 0)
            .filter(|s| !owners.contains_key(&s.inode))
        {
            tracing::debug!(netns = ns, local = %s.local, remote = %s.remote, inode = s.inode,
                "connection found without an owner");
            out.ownerless.insert(ConnKey {
                netns: *ns,
                local: s.local,
                remote: s.remote,
            });
        }
        out.conns.extend(connections(*ns, socks, &owners));
    }
    out
}

/// Scans every network namespace on the host for existing connections, with their owners.
pub fn scan(proc: &Path, netns_dirs: &[PathBuf]) -> Scan {
    // Tables first, then owners: a socket read in a table keeps its fd through the owner scan
    // unless it closes meanwhile, and then its close is traced.
    with_owners(proc, tables(proc, netns_dirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 1002 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0000000000000000 20 4 30 10 -1
   3: 0100007F:D432 0100007F:1F90 06 00000000:00000000 03:00001000 00000000     0        0 0 3 0000000000000000
   4: garbage
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 000000000000000000000000010000000:0050 x 01
   2: 0000000000000000FFFF00000200F40A:0050 0000000000000000FFFF00000300F40A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 20 4 30 10 -1
   3: 000000FD44020000000000000200000:0050 x 01
   4: 00FD440200000000000000000200000000:1 x 01
   5: 440200FD000000000000000002000000:0050 440200FD000000000000000003000000:9C41 08 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn parses_ipv4_rows() {
        let socks = parse_proc_net_tcp(TCP);
        assert_eq!(socks.len(), 4, "garbage row skipped");
        assert_eq!(socks[0].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(socks[0].state, ST_LISTEN);
        assert_eq!(socks[1].remote, "127.0.0.1:54321".parse().unwrap());
        assert_eq!(socks[1].inode, 1002);
    }

    #[test]
    fn parses_ipv6_rows_and_mapped_ipv4() {
        let socks = parse_proc_net_tcp(TCP6);
        assert_eq!(socks.len(), 3, "{socks:?}");
        assert_eq!(socks[1].local, "10.244.0.2:80".parse().unwrap());
        assert_eq!(socks[1].remote, "10.244.0.3:40000".parse().unwrap());
        assert_eq!(
            socks[2].local,
            "[fd00:244::2]:80".parse::<SocketAddr>().unwrap(),
            "words are native-endian u32s"
        );
    }

    #[test]
    fn reading_a_table_keeps_listeners_and_connections_only() {
        let all = parse_proc_net_tcp(TCP);
        let read = kept_rows(TCP.as_bytes()).unwrap();
        let kept: Vec<&ProcSock> = all
            .iter()
            .filter(|s| s.state == ST_LISTEN || is_connection_state(s.state))
            .collect();
        assert!(kept.len() < all.len(), "the sample has rows to drop");
        assert_eq!(read.iter().collect::<Vec<_>>(), kept);
    }

    #[test]
    fn directions_from_listeners_and_states_filtered() {
        let mut owners = HashMap::new();
        owners.insert(
            1003,
            Owner {
                pid: 10,
                tid: 10,
                comm: "client".into(),
            },
        );
        let conns = connections(7, &parse_proc_net_tcp(TCP), &owners);
        assert_eq!(conns.len(), 2, "listener and TIME_WAIT are not connections");
        let inbound = conns.iter().find(|c| c.key.local.port() == 8080).unwrap();
        assert_eq!(inbound.direction, Direction::Inbound);
        let outbound = conns.iter().find(|c| c.key.local.port() == 54321).unwrap();
        assert_eq!(outbound.direction, Direction::Outbound);
        assert_eq!(outbound.owner.as_ref().unwrap().pid, 10);
        assert!(
            conns
                .iter()
                .all(|c| c.origin == Origin::Recovered && c.key.netns == 7)
        );
        // A dual-stack [::] listener makes mapped IPv4 connections inbound.
        let v6 = connections(8, &parse_proc_net_tcp(TCP6), &owners);
        assert_eq!(v6.len(), 2);
        assert!(v6.iter().all(|c| c.direction == Direction::Inbound));
    }

    #[test]
    fn scans_own_namespace_and_finds_own_connection() {
        // Unprivileged: our own process and its sockets are readable.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        let scan = scan(Path::new("/proc"), &[]);
        assert!(scan.namespaces >= 1);
        let local = c.local_addr().unwrap();
        let mine = scan
            .conns
            .iter()
            .find(|x| x.key.local == local && x.key.remote == l.local_addr().unwrap())
            .expect("own connection recovered");
        assert_eq!(mine.direction, Direction::Outbound);
        assert_eq!(mine.owner.as_ref().map(|o| o.pid), Some(std::process::id()));
    }
}
