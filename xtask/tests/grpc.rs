//! Root tests: the gRPC lab workloads produce each load-balancing behaviour for real, between
//! pod network namespaces (1 client pod + 3 backend pods serving h2c on their pod IPs).
//!
//! They need root (they create network namespaces) and fail, rather than skip, without it.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use xtask::{
    grpc::{ClientReport, GrpcClient, GrpcServer, Policy, ServerOptions, Target, run_client},
    lab::Lab,
};

const PORT: u16 = 8080;
const DEADLINE: Duration = Duration::from_secs(60);
const PACE: Duration = Duration::from_millis(2);

fn require_root() {
    xtask::lab::require_root("the gRPC lab tests create network namespaces");
}

/// A lab of 4 pods: pod0 is the client, pods 1..=3 run `backend-1..=3`.
struct Fixture {
    // Declared first so that the servers stop before the lab is torn down.
    servers: Vec<GrpcServer>,
    lab: Lab,
}

impl Fixture {
    fn new(v6: bool, max_connection_age: Option<Duration>) -> Fixture {
        require_root();
        let lab = Lab::new(4).expect("lab");
        let servers = (1..=3)
            .map(|i| {
                let pod = lab.pod(i);
                let opts = ServerOptions {
                    max_connection_age,
                    deadline: DEADLINE,
                    ..ServerOptions::new(format!("backend-{i}"))
                };
                GrpcServer::start(pod, pod.addr(v6, PORT), opts).expect("gRPC server")
            })
            .collect();
        Fixture { servers, lab }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.servers.iter().map(|s| s.addr).collect()
    }

    fn run(&self, policy: Policy, target: Target, calls: usize, pace: Duration) -> ClientReport {
        run_client(self.lab.pod(0), policy, target, calls, pace, DEADLINE).expect("client")
    }

    fn connections(&self) -> Vec<u64> {
        self.servers.iter().map(|s| s.stats().connections).collect()
    }

    fn calls(&self) -> Vec<u64> {
        self.servers.iter().map(|s| s.stats().calls).collect()
    }
}

fn all_succeeded(r: &ClientReport, calls: usize) {
    assert_eq!(r.attempted, calls, "{r:#?}");
    assert_eq!(r.succeeded, calls, "every call succeeds: {r:#?}");
}

#[test]
fn pick_first_pins_one_backend() {
    let f = Fixture::new(false, None);
    let r = f.run(Policy::PickFirst, Target::Addrs(f.addrs()), 60, PACE);
    all_succeeded(&r, 60);
    assert_eq!(
        r.per_backend.len(),
        1,
        "one backend serves every call: {r:#?}"
    );
    assert_eq!(
        r.calls_to("backend-1"),
        60,
        "the first address wins: {r:#?}"
    );
    assert_eq!(r.connections_opened, 1, "{r:#?}");
    assert_eq!(r.resolutions, 1, "{r:#?}");
    assert_eq!(r.connections[0].calls, 60, "{r:#?}");
    assert_eq!(f.connections(), [1, 0, 0]);
    assert_eq!(f.calls(), [60, 0, 0]);
    let s = f.servers[0].stats();
    assert_eq!(
        s.per_connection.into_iter().collect::<Vec<_>>(),
        [(r.connections[0].local, 60)],
        "the server saw one client connection carrying all calls"
    );

    // The first address refuses connections: pick_first moves on to the next one.
    let dead = f.lab.pod(1).addr(false, PORT + 1);
    let addrs = vec![dead, f.servers[1].addr, f.servers[2].addr];
    let r = f.run(Policy::PickFirst, Target::Addrs(addrs), 20, PACE);
    all_succeeded(&r, 20);
    assert_eq!(r.connect_failures, 1, "{r:#?}");
    assert_eq!(r.connections_opened, 1, "{r:#?}");
    assert_eq!(r.calls_to("backend-2"), 20, "{r:#?}");
    assert_eq!(f.calls(), [60, 20, 0]);
}

#[test]
fn round_robin_spreads_evenly() {
    for v6 in [false, true] {
        let f = Fixture::new(v6, None);
        let r = f.run(Policy::RoundRobin, Target::Addrs(f.addrs()), 60, PACE);
        all_succeeded(&r, 60);
        for i in 1..=3 {
            assert_eq!(r.calls_to(&format!("backend-{i}")), 20, "v6={v6}: {r:#?}");
        }
        assert_eq!(
            r.connections_opened, 3,
            "one connection per backend: {r:#?}"
        );
        assert_eq!(r.resolutions, 1, "{r:#?}");
        let mut locals = r.local_addrs();
        locals.sort();
        locals.dedup();
        assert_eq!(locals.len(), 3, "three distinct local ports: {r:#?}");
        assert_eq!(f.connections(), [1, 1, 1], "v6={v6}");
        // Each backend saw exactly one client port, which carried its 20 calls: the local ports
        // stayed the same for the whole run.
        for (s, c) in f.servers.iter().zip(&r.connections) {
            assert_eq!(c.remote, s.addr);
            assert_eq!(c.calls, 20);
            let per: Vec<_> = s.stats().per_connection.into_iter().collect();
            assert_eq!(per, [(c.local, 20)], "v6={v6} {}", s.name);
        }
    }
}

#[test]
fn dial_per_request_opens_a_connection_per_call() {
    let f = Fixture::new(false, None);
    let r = f.run(Policy::DialPerRequest, Target::Addrs(f.addrs()), 30, PACE);
    all_succeeded(&r, 30);
    assert_eq!(r.connections_opened, 30, "{r:#?}");
    assert!(r.connections.iter().all(|c| c.calls == 1), "{r:#?}");
    // Addresses are taken in rotation: call i goes to address i mod 3.
    for (i, c) in r.connections.iter().enumerate() {
        assert_eq!(c.remote, f.servers[i % 3].addr, "{r:#?}");
    }
    for i in 1..=3 {
        assert_eq!(r.calls_to(&format!("backend-{i}")), 10, "{r:#?}");
    }
    assert_eq!(f.connections(), [10, 10, 10]);
    assert_eq!(f.calls(), [10, 10, 10]);
    for s in &f.servers {
        let st = s.stats();
        assert_eq!(st.per_connection.values().sum::<u64>(), 10, "{st:#?}");
        assert!(st.per_connection.values().all(|&n| n <= 2), "{st:#?}");
    }
}

#[test]
fn round_robin_does_not_discover_backends_added_later() {
    let f = Fixture::new(false, None);
    let addrs = f.addrs();
    let list = Arc::new(Mutex::new(addrs[..2].to_vec()));
    let resolved = Arc::new(AtomicUsize::new(0));
    let (list2, resolved2) = (list.clone(), resolved.clone());
    let resolver = Target::Resolver(Arc::new(move || {
        resolved2.fetch_add(1, Ordering::Relaxed);
        list2.lock().expect("resolver list").clone()
    }));
    let client =
        GrpcClient::start(f.lab.pod(0), Policy::RoundRobin, resolver, DEADLINE).expect("client");
    let first = client.calls(20, PACE).expect("first batch");
    all_succeeded(&first, 20);
    assert_eq!(first.connections_opened, 2, "{first:#?}");
    assert_eq!(first.calls_to("backend-1"), 10, "{first:#?}");
    assert_eq!(first.calls_to("backend-2"), 10, "{first:#?}");

    // A third pod joins the service while the client's connections stay up.
    list.lock().expect("resolver list").push(addrs[2]);
    let second = client.calls(60, PACE).expect("second batch");
    all_succeeded(&second, 60);
    assert_eq!(
        second.calls_to("backend-3"),
        0,
        "never discovered: {second:#?}"
    );
    assert_eq!(second.calls_to("backend-1"), 30, "{second:#?}");
    assert_eq!(second.calls_to("backend-2"), 30, "{second:#?}");
    assert_eq!(second.connections_opened, 0, "{second:#?}");
    assert_eq!(second.resolutions, 0, "no re-resolution: {second:#?}");
    let total = client.finish().expect("finish");
    assert_eq!(total.resolutions, 1, "{total:#?}");
    assert_eq!(resolved.load(Ordering::Relaxed), 1);
    assert_eq!(f.connections(), [1, 1, 0]);
    assert_eq!(f.calls(), [40, 40, 0]);
}

#[test]
fn max_connection_age_makes_round_robin_reconnect() {
    let age = Duration::from_secs(1);
    let f = Fixture::new(false, Some(age));
    // ~3.5 s of calls, 50 ms apart.
    let r = f.run(
        Policy::RoundRobin,
        Target::Addrs(f.addrs()),
        70,
        Duration::from_millis(50),
    );
    all_succeeded(&r, 70);
    assert!(r.resolutions >= 3, "re-resolves after each GOAWAY: {r:#?}");
    for s in &f.servers {
        let st = s.stats();
        assert!(
            st.connections >= 3,
            "periodic reconnects to {}: {st:#?}",
            s.name
        );
        assert!(st.goaways >= 2, "{}: {st:#?}", s.name);
        assert!(r.connections_to(s.addr) >= 3, "{}: {r:#?}", s.name);
        assert!(r.calls_to(&s.name) > 0, "{r:#?}");
    }
    let by_server: Vec<_> = r.connections.iter().filter(|c| c.ended_by_server).collect();
    assert!(by_server.len() >= 6, "{r:#?}");
    for c in by_server {
        let life = c.lifetime.expect("closed connections have a lifetime");
        assert!(
            life >= age - Duration::from_millis(50) && life < age * 3,
            "lives about max_connection_age: {c:?}"
        );
        assert!(c.calls > 0, "{c:?}");
    }
}

#[test]
fn pick_first_through_a_cluster_ip_pins_one_backend() {
    let f = Fixture::new(false, None);
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    f.lab.add_cluster_ip(vip, &f.addrs()).expect("cluster ip");
    let r = f.run(Policy::PickFirst, Target::Vip(vip), 60, PACE);
    all_succeeded(&r, 60);
    assert_eq!(
        r.per_backend.len(),
        1,
        "one backend serves every call: {r:#?}"
    );
    assert_eq!(r.per_backend.values().sum::<usize>(), 60, "{r:#?}");
    assert_eq!(r.connections_opened, 1, "{r:#?}");
    assert_eq!(r.connections[0].remote, vip, "{r:#?}");
    assert_eq!(
        f.connections().iter().sum::<u64>(),
        1,
        "{:?}",
        f.connections()
    );
    let name = r.per_backend.keys().next().expect("a backend");
    let chosen = f
        .servers
        .iter()
        .find(|s| &s.name == name)
        .expect("the backend that answered");
    let st = chosen.stats();
    assert_eq!(st.calls, 60, "{st:#?}");
    // The backend sees the client's own address: the DNAT rewrote only the destination.
    let per: Vec<_> = st.per_connection.into_iter().collect();
    assert_eq!(per, [(r.connections[0].local, 60)]);
}

/// What the kernel-side counter sees: the client speaks cleartext HTTP/2 with prior knowledge
/// (the connection preface first, no TLS, no HTTP/1.1 upgrade), and a call is a HEADERS frame
/// and a DATA frame carrying the 5-byte gRPC message framing, on one stream.
#[test]
fn client_speaks_h2c_with_grpc_framing() {
    use std::io::{Read as _, Write as _};
    use std::time::Instant;

    require_root();
    let lab = Lab::new(2).expect("lab");
    let server = lab.pod(1);
    let listener = server
        .run(|| std::net::TcpListener::bind(server.addr(false, PORT)))
        .expect("lab")
        .expect("listen");
    // A raw TCP server: records what the client sends, answers nothing but its SETTINGS.
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).expect("settings");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let end = Instant::now() + Duration::from_secs(5);
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < end && !has_end_stream_data(&raw) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                Err(_) => {}
            }
        }
        raw
    });
    let to = server.addr(false, PORT);
    let r = run_client(
        lab.pod(0),
        Policy::PickFirst,
        Target::Addrs(vec![to]),
        1,
        Duration::ZERO,
        Duration::from_secs(2),
    )
    .expect("client");
    assert_eq!(r.succeeded, 0, "the raw server never answers: {r:#?}");
    let raw = reader.join().expect("reader");
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    assert!(raw.starts_with(PREFACE), "h2c preface first: {raw:02x?}");
    let frames = h2_frames(&raw[PREFACE.len()..]);
    assert_eq!(
        frames.first().map(|f| f.0),
        Some(4),
        "SETTINGS after the preface"
    );
    let headers = frames.iter().find(|f| f.0 == 1).expect("a HEADERS frame");
    assert_eq!(headers.2, 1, "on stream 1");
    assert_ne!(headers.1 & 0x4, 0, "END_HEADERS");
    let data = frames.iter().find(|f| f.0 == 0).expect("a DATA frame");
    assert_eq!(data.2, 1, "on stream 1");
    assert_ne!(data.1 & 0x1, 0, "END_STREAM: a unary request");
    assert_eq!(
        data.3,
        xtask::grpc::frame(b"call 1").to_vec(),
        "gRPC message framing"
    );
}

/// (type, flags, stream id, payload) of each complete HTTP/2 frame in `b`.
fn h2_frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
        if b.len() < 9 + len {
            break;
        }
        let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff;
        out.push((b[3], b[4], id, b[9..9 + len].to_vec()));
        b = &b[9 + len..];
    }
    out
}

fn has_end_stream_data(raw: &[u8]) -> bool {
    raw.get(24..)
        .is_some_and(|b| h2_frames(b).iter().any(|f| f.0 == 0 && f.1 & 0x1 != 0))
}

/// MaxConnectionAge is the usual fix for pick_first behind a ClusterIP: every reconnect goes
/// through the DNAT again. The client reconnects after each GOAWAY and keeps going. The servers
/// listen dual-stack on `[::]` and still report the client's IPv4 address.
#[test]
fn max_connection_age_makes_pick_first_reconnect_through_a_cluster_ip() {
    require_root();
    let age = Duration::from_secs(1);
    let lab = Lab::new(4).expect("lab");
    let servers: Vec<GrpcServer> = (1..=3)
        .map(|i| {
            let opts = ServerOptions {
                max_connection_age: Some(age),
                deadline: DEADLINE,
                ..ServerOptions::new(format!("backend-{i}"))
            };
            let any: SocketAddr = format!("[::]:{PORT}").parse().expect("addr");
            GrpcServer::start(lab.pod(i), any, opts).expect("gRPC server")
        })
        .collect();
    let backends: Vec<SocketAddr> = (1..=3).map(|i| lab.pod(i).addr(false, PORT)).collect();
    let vip: SocketAddr = "10.96.0.11:80".parse().expect("vip");
    lab.add_cluster_ip(vip, &backends).expect("cluster ip");
    let r = run_client(
        lab.pod(0),
        Policy::PickFirst,
        Target::Vip(vip),
        70,
        Duration::from_millis(50),
        DEADLINE,
    )
    .expect("client");
    all_succeeded(&r, 70);
    assert!(
        r.connections_opened >= 3,
        "reconnects after each GOAWAY: {r:#?}"
    );
    assert!(r.resolutions >= 3, "{r:#?}");
    assert!(r.connections.iter().all(|c| c.remote == vip), "{r:#?}");
    let stats: Vec<_> = servers.iter().map(GrpcServer::stats).collect();
    let accepted: u64 = stats.iter().map(|s| s.connections).sum();
    assert_eq!(accepted, r.connections_opened as u64, "{stats:#?}");
    let client_ip = std::net::IpAddr::from(lab.pod(0).ipv4);
    for s in &stats {
        assert!(
            s.per_connection.keys().all(|a| a.ip() == client_ip),
            "IPv4 client addresses: {s:#?}"
        );
    }
    drop(servers);
}
