//! Root tests of the per-connection counters kept in the kernel: exact payload bytes and send
//! calls, gRPC requests counted from cleartext HTTP/2 frames by the cgroup_skb scanner, the
//! fallback to messages (with the reason) for TLS, the final counters in close records, and
//! requests counted on a connection whose client namespace NATs it.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use fanout::{
    agent::{Agent, AgentOptions},
    conntable::{Direction, RequestSource, Requests},
    event::{Counters, H2Final},
};
use fanout_common::RecordKind;
use xtask::lab;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The writes of an h2c client making `calls` unary calls: preface, SETTINGS, then HEADERS and
/// DATA per call on streams 1, 3, 5, …
fn h2c_writes(calls: u32) -> Vec<Vec<u8>> {
    let mut w = vec![
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        frame(0x4, 0, 0, &[]),
    ];
    for i in 0..calls {
        let stream = 2 * i + 1;
        w.push(frame(
            0x1,
            0x4,
            stream,
            &[0x83, 0x86, 0x44, 0x05, b'/', b'x', b'/', b'y', 0, 0],
        ));
        w.push(frame(
            0x0,
            0x1,
            stream,
            &[
                0, 0, 0, 0, 15, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
            ],
        ));
    }
    w
}

fn send_all(s: &mut TcpStream, writes: &[Vec<u8>]) -> Counters {
    let mut c = Counters::default();
    for w in writes {
        s.write_all(w).expect("write");
        c.bytes_sent += w.len() as u64;
        c.msgs_sent += 1;
        // Keep every write its own segment, like an interactive client.
        std::thread::sleep(Duration::from_millis(1));
    }
    c
}

async fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_agent() -> Agent {
    let agent = Agent::start(AgentOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        poll_interval: Duration::from_millis(20),
        ..AgentOptions::default()
    })
    .await
    .expect("agent starts");
    tokio::time::timeout(Duration::from_secs(30), agent.ready())
        .await
        .expect("ready");
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_messages_and_grpc_requests_are_counted_exactly() {
    xtask::lab::require_root("the counters test loads eBPF programs and builds a lab");
    let (lab, server) = lab::client_server(false, 4).expect("lab");
    let agent = start_agent().await;
    let mut events = agent.subscribe();

    let calls = 25;
    let h2_writes = h2c_writes(calls);
    // A TLS client's first record is a handshake record holding a ClientHello (type 1); the
    // rest are application data records.
    let tls_writes: Vec<Vec<u8>> = (0..5)
        .map(|i| match i {
            0 => vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00],
            _ => vec![0x17, 0x03, 0x03, 0x00, 0x04, i, i, i, i],
        })
        .collect();
    let to = server.addr;
    let (mut h2c, mut tls, sent_h2, sent_tls) = lab
        .pod(0)
        .run(move || {
            let mut a = TcpStream::connect(to).expect("connect");
            let mut b = TcpStream::connect(to).expect("connect");
            a.set_nodelay(true).expect("nodelay");
            b.set_nodelay(true).expect("nodelay");
            let ca = send_all(&mut a, &h2_writes);
            let cb = send_all(&mut b, &tls_writes);
            (a, b, ca, cb)
        })
        .expect("lab");
    let (h2_local, tls_local) = (
        h2c.local_addr().expect("addr"),
        tls.local_addr().expect("addr"),
    );

    let cn = lab.pod(0).netns_inode;
    let sn = lab.pod(1).netns_inode;
    let shared = agent.shared().clone();
    let find = |netns: u32, local: Option<SocketAddr>, remote: Option<SocketAddr>| {
        shared.with_rows(|t| {
            t.iter()
                .find(|c| {
                    c.key.netns == netns
                        && local.is_none_or(|l| c.key.local == l)
                        && remote.is_none_or(|r| c.key.remote == r)
                })
                .cloned()
        })
    };
    let client_h2 = wait("h2c counters", || {
        find(cn, Some(h2_local), None)
            .filter(|c| c.counters.msgs_sent == sent_h2.msgs_sent && c.requests.is_some())
    })
    .await;
    assert_eq!(client_h2.direction, Direction::Outbound);
    assert_eq!(
        client_h2.counters.bytes_sent, sent_h2.bytes_sent,
        "exact bytes"
    );
    assert_eq!(
        client_h2.counters.msgs_sent, sent_h2.msgs_sent,
        "exact send calls"
    );
    assert_eq!(
        client_h2.requests,
        Some(Requests {
            count: u64::from(calls),
            source: RequestSource::H2,
            unparsable: None
        }),
        "one request per client-initiated stream"
    );

    let client_tls = wait("tls counters", || {
        find(cn, Some(tls_local), None)
            .filter(|c| c.counters.msgs_sent == sent_tls.msgs_sent && c.requests.is_some())
    })
    .await;
    assert_eq!(client_tls.counters.bytes_sent, sent_tls.bytes_sent);
    assert_eq!(
        client_tls.requests,
        Some(Requests {
            count: sent_tls.msgs_sent,
            source: RequestSource::Messages,
            unparsable: Some("tls")
        }),
        "not parsable: messages stand in for requests, and say why"
    );

    // The server side is in the table; its counters come with its close (inbound connections
    // are not sampled live), and it has no request figure: requests are counted on the client.
    let server_h2 = wait("server row", || find(sn, None, Some(h2_local))).await;
    assert_eq!(server_h2.direction, Direction::Inbound);
    assert_eq!(
        server_h2.requests, None,
        "requests are counted on the client side"
    );

    // Closing: the close records carry the final counters.
    h2c.flush().expect("flush");
    drop(h2c);
    tls.flush().expect("flush");
    drop(tls);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut closed, mut server_closed) = (Vec::new(), Vec::new());
    while (closed.len() < 2 || server_closed.len() < 2) && Instant::now() < deadline {
        if let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
            && ev.kind == RecordKind::Close
        {
            if ev.netns == cn {
                closed.push(ev);
            } else if ev.netns == sn {
                server_closed.push(ev);
            }
        }
    }
    assert_eq!(closed.len(), 2, "both client connections closed");
    // The server read every byte the client sent.
    let server = server_closed
        .iter()
        .find(|e| e.remote == h2_local)
        .expect("the server side of the h2c connection closed");
    let got = server.counters.expect("close carries counters");
    assert_eq!(got.bytes_recv, sent_h2.bytes_sent);
    assert!(got.msgs_recv >= 1);
    assert_eq!(server.h2, None, "the server side is not scanned");
    for ev in closed {
        let want = if ev.local == h2_local {
            sent_h2
        } else {
            sent_tls
        };
        let got = ev.counters.expect("close carries counters");
        assert_eq!(
            (got.bytes_sent, got.msgs_sent),
            (want.bytes_sent, want.msgs_sent)
        );
    }
    agent.shutdown().await.expect("shutdown");
}

/// A client whose own namespace rewrites its connection the way kube-proxy does for a
/// hostNetwork pod calling a ClusterIP (DNAT in nat OUTPUT, which runs before the egress hook):
/// its packets carry the backend's address while its socket names the service. The scanner
/// keeps its state with the socket, not under a key made of addresses, so the requests count
/// live and in the close record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_count_on_a_connection_its_own_namespace_dnats() {
    xtask::lab::require_root("the counters test loads eBPF programs and builds a lab");
    let iptables = Command::new("iptables").arg("--version").output();
    assert!(
        iptables.is_ok_and(|o| o.status.success()),
        "`iptables` is missing: this test adds a DNAT rule (install the iptables package, or run \
         `cargo xtask setup`)"
    );
    let (lab, server) = lab::client_server(false, 2).expect("lab");
    let client = lab.pod(0);
    let service: SocketAddr = "10.96.0.10:80".parse().expect("service address");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.netns,
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
        ])
        .args([
            "-d",
            "10.96.0.10/32",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "DNAT",
        ])
        .args(["--to-destination", &server.addr.to_string()])
        .output()
        .expect("run iptables in the client pod");
    assert!(
        out.status.success(),
        "adding the DNAT rule failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = start_agent().await;
    let mut events = agent.subscribe();

    let calls = 12;
    let writes = h2c_writes(calls);
    let (mut conn, sent) = client
        .run(move || {
            let mut s = TcpStream::connect_timeout(&service, Duration::from_secs(5))
                .expect("connect to the service");
            s.set_nodelay(true).expect("nodelay");
            let sent = send_all(&mut s, &writes);
            (s, sent)
        })
        .expect("lab");
    let local = conn.local_addr().expect("addr");
    let want = Requests {
        count: u64::from(calls),
        source: RequestSource::H2,
        unparsable: None,
    };
    let cn = client.netns_inode;
    let shared = agent.shared().clone();
    let row = wait("the DNATed connection's requests", || {
        shared.with_rows(|t| {
            t.iter()
                .find(|c| c.key.netns == cn && c.key.local == local)
                .filter(|c| c.counters.msgs_sent == sent.msgs_sent)
                .cloned()
        })
    })
    .await;
    assert_eq!(row.key.remote, service, "the socket names the service");
    assert_eq!(row.requests, Some(want), "live requests");

    conn.flush().expect("flush");
    drop(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut close = None;
    while close.is_none() && Instant::now() < deadline {
        if let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await
            && ev.kind == RecordKind::Close
            && ev.netns == cn
            && ev.local == local
        {
            close = Some(ev);
        }
    }
    let close = close.expect("the client's close record");
    assert_eq!(
        close.h2,
        Some(H2Final {
            status: 1,
            requests: u64::from(calls)
        }),
        "the close carries the final request count"
    );
    agent.shutdown().await.expect("shutdown");
}
