//! Root test of the `fanout` binary itself: HTTP endpoints, live lab connections in /connections,
//! bad input answered with errors, and SIGTERM detaching every program it attached.

use std::{
    collections::BTreeSet,
    net::{SocketAddr, TcpListener},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use xtask::{http, lab};

const OUR_PROGRAMS: [&str; 3] = ["inet_sock_set_state", "sys_exit_accept4", "sys_exit_accept"];

/// Ids of loaded eBPF programs with fanout's program names.
fn fanout_program_ids() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        // The kernel keeps at most 15 characters of a program name.
        .filter(|p| {
            p.name_as_str()
                .is_some_and(|n| OUR_PROGRAMS.iter().any(|o| &o[..o.len().min(15)] == n))
        })
        .map(|p| p.id())
        .collect()
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

    let before = fanout_program_ids();
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
        match http::get(addr, "/healthz") {
            Ok((200, _)) => Some(()),
            _ => None,
        }
    });
    let ours: BTreeSet<u32> = fanout_program_ids().difference(&before).copied().collect();
    assert_eq!(ours.len(), 3, "three programs attached: {ours:?}");

    // Three held connections show up with namespace, tuple, direction and owner.
    let to = server.addr;
    let held = lab::hold(&client, to, 3).expect("connect");
    let cn = lab.pod(0).netns_inode;
    let path = format!("/connections?netns={cn}");
    let conns = wait_for("3 connections", Duration::from_secs(10), || {
        let (code, body) = http::get(addr, &path).ok()?;
        assert_eq!(code, 200, "{body}");
        let v: Vec<serde_json::Value> = serde_json::from_str(&body).expect("JSON array");
        (v.len() == 3).then_some(v)
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

    // SIGTERM: exits 0 and leaves nothing attached.
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let status = wait_for("exit", Duration::from_secs(10), || {
        daemon.0.try_wait().expect("wait")
    });
    assert!(status.success(), "exit status {status}");
    let still: BTreeSet<u32> = fanout_program_ids().intersection(&ours).copied().collect();
    assert!(
        still.is_empty(),
        "programs still loaded after SIGTERM: {still:?}"
    );
    drop(held);
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
