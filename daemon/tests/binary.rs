//! Root test of the `fanout` binary itself: HTTP endpoints, live lab connections in /connections,
//! bad input answered with errors, and teardown: after SIGTERM and after SIGKILL (each in the
//! middle of a connection burst) nothing the daemon loaded or attached is left in the kernel.
//!
//! What the daemon owns is read from its own file descriptors (/proc/<pid>/fdinfo of each
//! `bpf-prog` and `bpf_link` fd): that is strictly this pid's, so other daemons loading the same
//! programs at the same time never count. bpftool (Debian's has no `pids` in its JSON) then says
//! what the kernel knows about those ids. On this kind of kernel it reports:
//! - each raw tracepoint program with a `"type": "raw_tracepoint"` link (the daemon's fdinfo of
//!   that link: `link_type: raw_tracepoint`, `tp_name`);
//! - `h2_egress` as `"type": "cgroup_skb"` with a `"type": "cgroup"` link (`cgroup_id` of the
//!   cgroup2 root, `attach_type: cgroup_inet_egress`), also listed by `bpftool cgroup show <root>`
//!   (which prints nothing at all, not `[]`, when nothing is attached).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::{fs::MetadataExt as _, process::ExitStatusExt as _},
    },
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;
use xtask::{http, lab};

/// How a program of the daemon is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// A raw tracepoint, by its name: a raw_tracepoint link.
    RawTracepoint(&'static str),
    /// cgroup_skb egress on the host's cgroup v2 root: a cgroup link.
    CgroupEgress,
}

/// Every program the daemon loads and attaches on this kernel, by program name.
/// (The accept syscalls' tracepoints are attached only where the length hooks are missing.)
const EXPECTED: [(&str, Hook); 4] = [
    (
        "inet_sock_set_state_raw",
        Hook::RawTracepoint("inet_sock_set_state"),
    ),
    (
        "sock_send_length_raw",
        Hook::RawTracepoint("sock_send_length"),
    ),
    (
        "sock_recv_length_raw",
        Hook::RawTracepoint("sock_recv_length"),
    ),
    ("h2_egress", Hook::CgroupEgress),
];

/// How long the kernel gets to free a dead daemon's objects (it does so asynchronously).
const RELEASE_LIMIT: Duration = Duration::from_secs(10);

/// Whether the kernel's name of a program is `want`. The kernel keeps at most 15 characters
/// (bpftool prints the full name when BTF has it): [`record_attached`] also checks each one's
/// hook.
fn name_is(kernel: &str, want: &str) -> bool {
    kernel == want || (kernel.len() == 15 && want.starts_with(kernel))
}

/// The host's cgroup v2 root: the first cgroup2 mount in /proc/self/mountinfo that is its
/// hierarchy's root (mount root `/`, cgroup id 1), where the daemon attaches h2_egress.
struct CgroupRoot {
    path: PathBuf,
    /// Its cgroup id (the kernfs inode), as links report it.
    id: u64,
}

fn cgroup_root() -> CgroupRoot {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    let mut seen = Vec::new();
    for line in info.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.get(sep + 1) != Some(&"cgroup2") || fields.len() < 5 {
            continue;
        }
        let path = PathBuf::from(fields[4].replace("\\040", " "));
        let id = std::fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
        if fields[3] == "/" && id == 1 {
            return CgroupRoot { path, id };
        }
        seen.push(format!(
            "{} (root {}, cgroup id {id})",
            path.display(),
            fields[3]
        ));
    }
    panic!(
        "no cgroup v2 hierarchy root mounted here (cgroup2 mounts: {seen:?}): the daemon \
         attaches h2_egress there and this test checks it"
    );
}

/// A link as the daemon's fdinfo describes it.
#[derive(Clone, Debug, Default)]
struct FdLink {
    prog_id: u32,
    /// `raw_tracepoint` or `cgroup`.
    link_type: String,
    tp_name: Option<String>,
    cgroup_id: Option<u64>,
}

/// The BPF programs and links a process holds file descriptors of, by id.
#[derive(Debug, Default)]
struct Held {
    progs: BTreeSet<u32>,
    links: BTreeMap<u32, FdLink>,
}

fn held_by(pid: u32) -> Held {
    let mut held = Held::default();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return held;
    };
    for fd in fds.filter_map(|e| e.ok()) {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        if target != "anon_inode:bpf-prog" && target != "anon_inode:bpf_link" {
            continue;
        }
        let name = fd.file_name();
        let Ok(info) =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", name.to_string_lossy()))
        else {
            continue;
        };
        let kv: BTreeMap<&str, &str> = info
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
        if target == "anon_inode:bpf-prog" {
            if let Some(id) = num("prog_id") {
                held.progs.insert(id as u32);
            }
        } else if let Some(id) = num("link_id") {
            held.links.insert(
                id as u32,
                FdLink {
                    prog_id: num("prog_id").unwrap_or(0) as u32,
                    link_type: kv.get("link_type").unwrap_or(&"").to_string(),
                    tp_name: kv.get("tp_name").map(|s| s.to_string()),
                    cgroup_id: num("cgroup_id"),
                },
            );
        }
    }
    held
}

/// `bpftool --json <args>`, bounded. Empty output (what `cgroup show` prints for nothing
/// attached) is an empty array.
fn bpftool(args: &[&str]) -> Value {
    let mut child = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running bpftool (Debian: apt-get install bpftool): {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let mut child = Reap(child);
    let status = wait_for(
        &format!("bpftool {args:?}"),
        Duration::from_secs(10),
        || child.0.try_wait().expect("wait bpftool"),
    );
    let out = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    assert!(
        status.success(),
        "bpftool {args:?}: {status}: {}{}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    if out.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(Vec::new());
    }
    serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "bpftool {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    })
}

/// bpftool's objects of one kind (`prog`, `link`), by id.
fn kernel(kind: &str) -> BTreeMap<u32, Value> {
    let Value::Array(all) = bpftool(&[kind, "show"]) else {
        panic!("bpftool {kind} show: not an array");
    };
    all.into_iter()
        .filter_map(|o| Some((o["id"].as_u64()? as u32, o)))
        .collect()
}

/// Program ids attached to the cgroup (directly, not inherited).
fn cgroup_progs(root: &CgroupRoot) -> Vec<Value> {
    match bpftool(&["cgroup", "show", &root.path.to_string_lossy()]) {
        Value::Array(a) => a,
        other => panic!("bpftool cgroup show: not an array: {other}"),
    }
}

/// What one daemon created, recorded while it ran.
#[derive(Debug)]
struct Attached {
    pid: u32,
    /// Program id → name.
    progs: BTreeMap<u32, String>,
    /// Link id → the program id it attaches.
    links: BTreeMap<u32, u32>,
    /// Link ids by program name (for the checker's own test).
    link_of: BTreeMap<&'static str, u32>,
    /// The h2_egress program id, attached to `root`.
    h2: u32,
}

/// Records every program and link the daemon `pid` owns and checks that they are exactly the
/// expected programs, each attached where it belongs.
fn record_attached(pid: u32, root: &CgroupRoot) -> Attached {
    // The daemon answers /healthz once attached; still, give a slow start a bounded wait and
    // then judge whatever it holds.
    let end = Instant::now() + Duration::from_secs(15);
    let held = loop {
        let h = held_by(pid);
        if (h.progs.len() >= EXPECTED.len() && h.links.len() >= EXPECTED.len())
            || Instant::now() >= end
        {
            break h;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let kprogs = kernel("prog");
    let klinks = kernel("link");
    let listing: Vec<String> = held
        .progs
        .iter()
        .map(|id| match kprogs.get(id) {
            Some(p) => format!("{id}:{}:{}", p["name"], p["type"]),
            None => format!("{id}:(not listed by bpftool)"),
        })
        .collect();
    let fail = |what: String| -> ! {
        panic!(
            "daemon pid {pid}: {what}; it holds programs {listing:?} and links {:?}",
            held.links
        )
    };
    if held.progs.len() != EXPECTED.len() || held.links.len() != EXPECTED.len() {
        fail(format!(
            "must own exactly {} programs, one link each: {:?}",
            EXPECTED.len(),
            EXPECTED.map(|(n, _)| n)
        ));
    }

    let mut att = Attached {
        pid,
        progs: BTreeMap::new(),
        links: BTreeMap::new(),
        link_of: BTreeMap::new(),
        h2: 0,
    };
    for (name, hook) in EXPECTED {
        // The program with this name whose link goes where this one belongs.
        let found: Vec<u32> = held
            .progs
            .iter()
            .copied()
            .filter(|id| {
                kprogs
                    .get(id)
                    .and_then(|p| p["name"].as_str())
                    .is_some_and(|n| name_is(n, name))
            })
            .filter(|id| {
                held.links.values().any(|l| {
                    l.prog_id == *id
                        && match hook {
                            Hook::RawTracepoint(tp) => l.tp_name.as_deref() == Some(tp),
                            Hook::CgroupEgress => l.link_type == "cgroup",
                        }
                })
            })
            .collect();
        let [id] = found[..] else {
            fail(format!(
                "{name} ({hook:?}) must be exactly one attached program, found {found:?}"
            ));
        };
        let ty = kprogs[&id]["type"].as_str().unwrap_or("");
        let want_ty = match hook {
            Hook::RawTracepoint(_) => "raw_tracepoint",
            Hook::CgroupEgress => "cgroup_skb",
        };
        assert_eq!(ty, want_ty, "program {name} (id {id}) type");
        let links: Vec<(&u32, &FdLink)> =
            held.links.iter().filter(|(_, l)| l.prog_id == id).collect();
        let [(&link_id, fd)] = links[..] else {
            panic!("program {name} (id {id}) must have exactly one link, has {links:?}");
        };
        let k = klinks
            .get(&link_id)
            .unwrap_or_else(|| panic!("link {link_id} of {name} not listed by bpftool"));
        assert_eq!(
            k["prog_id"].as_u64(),
            Some(id as u64),
            "link {link_id}: {k}"
        );
        match hook {
            Hook::RawTracepoint(tp) => {
                assert_eq!(k["type"], "raw_tracepoint", "link {link_id} of {name}: {k}");
                assert_eq!(
                    fd.link_type, "raw_tracepoint",
                    "link {link_id} of {name}: {fd:?}"
                );
                assert_eq!(fd.tp_name.as_deref(), Some(tp), "{name}: {fd:?}");
            }
            Hook::CgroupEgress => {
                assert_eq!(k["type"], "cgroup", "link {link_id} of {name}: {k}");
                assert_eq!(k["attach_type"], "cgroup_inet_egress", "{name}: {k}");
                assert_eq!(k["cgroup_id"].as_u64(), Some(root.id), "{name}: {k}");
                assert_eq!(fd.link_type, "cgroup", "{name}: {fd:?}");
                assert_eq!(fd.cgroup_id, Some(root.id), "{name}: {fd:?}");
                let on_root = cgroup_progs(root);
                assert!(
                    on_root.iter().any(|p| p["id"].as_u64() == Some(id as u64)
                        && p["attach_type"] == "cgroup_inet_egress"),
                    "bpftool cgroup show {} lacks {name} (id {id}): {on_root:?}",
                    root.path.display()
                );
                att.h2 = id;
            }
        }
        att.progs.insert(id, name.to_string());
        att.links.insert(link_id, id);
        att.link_of.insert(name, link_id);
    }
    // Four distinct programs and their four links: everything the daemon holds.
    if att.progs.len() != EXPECTED.len() || att.links.len() != EXPECTED.len() {
        fail(format!("two expected programs resolved to one: {att:?}"));
    }
    att
}

/// Waits up to `limit` for every recorded program and link to leave the kernel and for
/// h2_egress to leave the cgroup root. Returns what is still there at the deadline.
fn leaks(att: &Attached, root: &CgroupRoot, limit: Duration) -> Option<String> {
    let end = Instant::now() + limit;
    loop {
        let kprogs = kernel("prog");
        let klinks = kernel("link");
        // Ids are allocated cyclically, so one seen again with the same name or program is ours.
        let progs: Vec<String> = att
            .progs
            .iter()
            .filter(|(id, name)| {
                kprogs
                    .get(id)
                    .and_then(|p| p["name"].as_str())
                    .is_some_and(|n| name_is(n, name))
            })
            .map(|(id, name)| format!("{id} ({name})"))
            .collect();
        let links: Vec<String> = att
            .links
            .iter()
            .filter(|(id, prog)| {
                klinks
                    .get(id)
                    .is_some_and(|l| l["prog_id"].as_u64() == Some(**prog as u64))
            })
            .map(|(id, prog)| {
                let ty = klinks[id]["type"].as_str().unwrap_or("?");
                format!("{id} ({ty} link of program {prog})")
            })
            .collect();
        let on_root = cgroup_progs(root)
            .iter()
            .any(|p| p["id"].as_u64() == Some(att.h2 as u64));
        if progs.is_empty() && links.is_empty() && !on_root {
            return None;
        }
        if Instant::now() >= end {
            return Some(format!(
                "daemon pid {} left behind after {limit:?}: program ids {progs:?}; link ids \
                 {links:?}; h2_egress (id {}) {} on {}",
                att.pid,
                att.h2,
                if on_root {
                    "STILL ATTACHED"
                } else {
                    "detached"
                },
                root.path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_nothing_left(att: &Attached, root: &CgroupRoot, after: &str) {
    if let Some(leaked) = leaks(att, root, RELEASE_LIMIT) {
        panic!("LEAKED after {after}: {leaked}");
    }
}

/// Starts `fanout run` on a free loopback port and waits for /healthz.
fn start_daemon() -> (Reap, SocketAddr) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut daemon = Reap(
        Command::new(env!("CARGO_BIN_EXE_fanout"))
            .args([
                "run",
                "--listen",
                &addr.to_string(),
                "--poll-interval",
                "20ms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn fanout"),
    );
    wait_for("healthz", Duration::from_secs(30), || {
        if let Some(s) = daemon.0.try_wait().expect("wait") {
            panic!("fanout exited before serving: {s}");
        }
        match http::get(addr, "/healthz") {
            Ok((200, _)) => Some(()),
            _ => None,
        }
    });
    (daemon, addr)
}

/// Sends `signal` and waits (bounded) for the daemon to exit.
fn kill_and_reap(daemon: &mut Reap, signal: i32) -> ExitStatus {
    // SAFETY: plain kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(daemon.0.id() as i32, signal) };
    wait_for("exit", Duration::from_secs(10), || {
        daemon.0.try_wait().expect("wait")
    })
}

/// Short loopback connections in a loop (connect, a byte each way, close), so that every hook
/// fires while the daemon is killed. Stops when dropped; every step is bounded.
struct Burst {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Burst {
    fn start() -> Burst {
        let listener = TcpListener::bind("127.0.0.1:0").expect("burst listener");
        let to = listener.local_addr().expect("burst addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut b = [0u8; 1];
                    if s.read(&mut b).is_ok_and(|n| n == 1) {
                        let _ = s.write_all(&b);
                        let _ = s.read(&mut b);
                    }
                }
            })
        };
        let client = {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                    let mut b = [0u8; 1];
                    if s.write_all(b"x").is_ok() && s.read(&mut b).is_ok_and(|n| n == 1) {
                        let _ = s.shutdown(Shutdown::Write);
                        let _ = s.read(&mut b);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let burst = Burst {
            stop,
            done,
            threads: vec![server, client],
        };
        wait_for("a burst under way", Duration::from_secs(10), || {
            (burst.done() >= 50).then_some(())
        });
        burst
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Takes a reference to a link by id (BPF_LINK_GET_FD_BY_ID), as a leak would: it outlives
/// the daemon until dropped.
fn grab_link(id: u32) -> OwnedFd {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    // union bpf_attr for *_GET_FD_BY_ID: the id, next_id, open_flags.
    let attr: [u32; 3] = [id, 0, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of a valid, initialised attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_LINK_GET_FD_BY_ID {id}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Kills the daemon whatever happens in the test.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn binary_serves_endpoints_and_detaches_on_sigterm() {
    lab::require_root("this test runs the daemon, which loads eBPF programs");
    let (lab, server) = lab::client_server(false, 3).expect("lab");
    let client = lab.pod(0).clone();

    let root = cgroup_root();
    let (mut daemon, addr) = start_daemon();
    let att = record_attached(daemon.0.id(), &root);

    // Three held connections show up with namespace, tuple, direction and owner.
    let to = server.addr;
    let held = lab::hold(&client, to, 3).expect("connect");
    let cn = lab.pod(0).netns_inode;
    let path = format!("/connections?netns={cn}");
    let conns = wait_for("3 connections", Duration::from_secs(10), || {
        let (code, body) = http::get(addr, &path).ok()?;
        assert_eq!(code, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON page");
        let v: Vec<serde_json::Value> = page["connections"].as_array().cloned().expect("rows");
        (v.len() == 3 && page["total"] == 3 && page["next"].is_null()).then_some(v)
    });
    let locals: BTreeSet<String> = held
        .iter()
        .map(|s| s.local_addr().expect("local").to_string())
        .collect();
    for c in &conns {
        assert_eq!(c["netns"], cn);
        assert_eq!(c["direction"], "outbound");
        assert_eq!(c["origin"], "traced");
        assert_eq!(c["remote"], to.to_string());
        assert!(locals.contains(c["local"].as_str().unwrap_or("")), "{c}");
        assert_eq!(c["owner"]["pid"], std::process::id());
        assert!(c["age_seconds"].as_f64().is_some_and(|a| a >= 0.0));
    }

    let (code, metrics) = http::get(addr, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    for name in [
        "fanout_records_total{kind=\"established\"}",
        "fanout_tcp_connections_opened_total{direction=\"outbound\"}",
        "fanout_tcp_connections_active ",
        "fanout_events_lost_total{reason=\"ring_full\"} 0",
        "fanout_build_info{",
    ] {
        assert!(metrics.contains(name), "{name} missing from:\n{metrics}");
    }

    // Bad input gets an error, never a crash.
    let (code, body) = http::get(addr, "/connections?netns=abc").expect("bad netns");
    assert_eq!(code, 400);
    assert!(body.contains("\"error\""), "{body}");
    let (code, _) = http::get(addr, "/connections?color=red").expect("unknown param");
    assert_eq!(code, 400);
    let (code, _) = http::get(addr, "/nope").expect("unknown path");
    assert_eq!(code, 404);
    assert_eq!(http::get(addr, "/healthz").expect("still alive").0, 200);

    // SIGTERM in the middle of a connection burst: exits 0 and leaves nothing in the kernel.
    let burst = Burst::start();
    let status = kill_and_reap(&mut daemon, libc::SIGTERM);
    assert!(status.success(), "exit status {status}");
    drop(burst);
    assert_nothing_left(&att, &root, "SIGTERM");
    drop(held);
}

#[test]
fn binary_leaves_nothing_attached_after_sigkill_mid_burst() {
    lab::require_root("this test runs the daemon, which loads eBPF programs");
    let root = cgroup_root();
    let (mut daemon, _) = start_daemon();
    let att = record_attached(daemon.0.id(), &root);
    let burst = Burst::start();
    let status = kill_and_reap(&mut daemon, libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "exit status {status}");
    drop(burst);
    assert_nothing_left(&att, &root, "SIGKILL");
}

/// The teardown check fails when something outlives the daemon: a reference taken on a
/// raw tracepoint link and on the cgroup link keeps them (and their programs) in the kernel after
/// SIGKILL, and the check names exactly those ids; once released, it passes.
#[test]
fn teardown_check_names_what_outlives_the_daemon() {
    lab::require_root("this test runs the daemon, which loads eBPF programs");
    let root = cgroup_root();
    let (mut daemon, _) = start_daemon();
    let att = record_attached(daemon.0.id(), &root);
    let tp_link = att.link_of["inet_sock_set_state_raw"];
    let cg_link = att.link_of["h2_egress"];
    let leaked = [grab_link(tp_link), grab_link(cg_link)];
    let status = kill_and_reap(&mut daemon, libc::SIGKILL);
    assert_eq!(status.signal(), Some(libc::SIGKILL), "exit status {status}");
    let report = leaks(&att, &root, Duration::from_secs(2)).expect("the held links are reported");
    let tp_prog = att.links[&tp_link];
    for must in [
        format!("{tp_link} (raw_tracepoint link of program {tp_prog})"),
        format!("{cg_link} (cgroup link of program {})", att.h2),
        format!("{tp_prog} (inet_sock_set_state_raw)"),
        format!("{} (h2_egress)", att.h2),
        "STILL ATTACHED".to_string(),
    ] {
        assert!(report.contains(&must), "{must} missing from: {report}");
    }
    // Nothing else: the other programs and links went with the daemon.
    for (id, name) in &att.progs {
        if *id != tp_prog && *id != att.h2 {
            assert!(!report.contains(&format!("{id} ({name})")), "{report}");
        }
    }
    drop(leaked);
    assert_nothing_left(&att, &root, "releasing the held links");
}

/// Sets this process's open-files limit (soft and hard) to `n`, or raises the soft one to `n`.
fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit with a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A node agent's liveness must not be in the hands of any pod that can reach its port: with
/// its descriptors limited to 1024 (`ulimit -n 1024`), 1100 idle sockets and 200 slowloris
/// sockets (headers trickled a byte a second) do not stop /healthz and /metrics from answering,
/// and the shed connections are counted.
#[test]
fn the_api_keeps_answering_under_a_flood_of_idle_and_slow_sockets() {
    use std::io::{Read as _, Write as _};
    use std::os::unix::process::CommandExt as _;
    lab::require_root("the flood test runs the daemon");
    // Room for our own 1300 sockets.
    set_nofile(4096, 4096).expect("raise the test's own open-files limit");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
    cmd.args(["run", "--listen", &addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe setrlimit between fork and exec.
    unsafe {
        cmd.pre_exec(|| set_nofile(1024, 1024));
    }
    let mut daemon = Reap(cmd.spawn().expect("spawn fanout"));
    wait_for("healthz", Duration::from_secs(30), || {
        if let Some(s) = daemon.0.try_wait().expect("wait") {
            panic!("fanout exited before serving: {s}");
        }
        matches!(http::get(addr, "/healthz"), Ok((200, _))).then_some(())
    });
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    // With the runtime's default backlog of 128 the burst overflowed the accept queue and
    // connects (probes included) waited for SYN retransmits.
    assert_eq!(idle.len(), 1100, "every connect of the burst completed");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<_> = (0..200)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
                    return;
                };
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
                let end = Instant::now() + Duration::from_secs(30);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                    if s.write_all(b"X").is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    for path in ["/healthz", "/metrics"].iter().cycle().take(40) {
        let start = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut head = [0u8; 12];
        s.read_exact(&mut head)
            .unwrap_or_else(|e| panic!("{path} under the flood: {e}"));
        assert_eq!(&head[9..12], b"200", "{path}");
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{path} took {:?}",
            start.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in slow {
        let _ = t.join();
    }
    drop(idle);
    let (_, metrics) = http::get(addr, "/metrics").expect("metrics");
    let shed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fanout_http_connections_shed_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(shed > 0.0, "the flood was shed and counted");
    kill_and_reap(&mut daemon, libc::SIGTERM);
}

#[test]
fn bad_command_lines_are_rejected_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "--ring-bytes", "12345"])
        .output()
        .expect("run fanout");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("power of two"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run", "--poll-interval", "soon"])
        .output()
        .expect("run fanout");
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
}
