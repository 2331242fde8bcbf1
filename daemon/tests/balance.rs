//! Root end-to-end test of the balance verdicts with real gRPC clients (h2c) in a lab: three
//! client pods call the same three backends of a headless service side by side — one with
//! round_robin, one with pick_first, one dialling per request — and fanout's balance for each
//! (client pod, service) must carry the right verdict, with requests counted from HTTP/2.

use std::{net::SocketAddr, time::Duration};

use fanout::{
    agent::{Agent, AgentOptions},
    analysis::{AnalysisConfig, Verdict},
    identity::IdentitySource,
};
use xtask::{
    grpc::{GrpcServer, Policy, ServerOptions, Target, run_client},
    http,
    lab::Lab,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verdicts_for_round_robin_pick_first_and_dial_per_request() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root (cargo xtask test)"
    );
    // pod0..2: clients; pod3..5: backends api-3..api-5.
    let lab = Lab::new(6).expect("lab");
    let (agent, servers, dir) = clients_and_backends(
        &lab,
        &["rr", "pf", "dial"],
        3,
        Duration::from_secs(4),
        |i| ServerOptions::new(format!("api-{i}")),
    )
    .await;
    let backends: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();

    // About 10 s of calls from each client at once; the balance is read while they still run,
    // once more than a whole 4 s window has passed.
    let pace = Duration::from_millis(40);
    let runs: Vec<_> = [
        Policy::RoundRobin,
        Policy::PickFirst,
        Policy::DialPerRequest,
    ]
    .into_iter()
    .enumerate()
    .map(|(i, policy)| {
        let pod = lab.pod(i).clone();
        let target = Target::Addrs(backends.clone());
        std::thread::spawn(move || {
            run_client(&pod, policy, target, 260, pace, Duration::from_secs(30))
        })
    })
    .collect();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let (code, body) = http::get(agent.http_addr(), "/services/shop/api/balance").expect("GET");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let clients = v["clients"].as_array().expect("clients");
    let verdict_of = |client: &str| -> (String, serde_json::Value) {
        let b = clients
            .iter()
            .find(|b| b["client"]["name"] == client)
            .unwrap_or_else(|| panic!("no balance for {client}: {body}"));
        (b["verdict"].as_str().unwrap_or("").to_string(), b.clone())
    };
    let (rr, rr_b) = verdict_of("rr");
    assert_eq!(rr, Verdict::RoundRobin.as_str(), "{rr_b:#}");
    assert_eq!(rr_b["ready"], 3);
    assert_eq!(rr_b["connected"], 3);
    assert_eq!(rr_b["source"], "h2", "requests counted from HTTP/2 frames");
    assert_eq!(
        rr_b["ports_stable"], true,
        "the same 3 connections throughout"
    );
    let (pf, pf_b) = verdict_of("pf");
    assert_eq!(pf, Verdict::PickFirst.as_str(), "{pf_b:#}");
    assert_eq!(pf_b["connected"], 1);
    assert!(
        pf_b["reason"].as_str().unwrap_or("").contains("api-3"),
        "the reason names the pinned backend: {pf_b:#}"
    );
    let (dial, dial_b) = verdict_of("dial");
    assert_eq!(dial, Verdict::DialPerRequest.as_str(), "{dial_b:#}");

    // The peers API, for the round_robin client, while its connections are live.
    let (code, body) = http::get(agent.http_addr(), "/pods/shop/rr/peers").expect("GET");
    assert_eq!(code, 200, "{body}");
    let peers: serde_json::Value = serde_json::from_str(&body).expect("json");
    let list = peers["peers"].as_array().expect("peers");
    let backend_peers: Vec<&serde_json::Value> = list
        .iter()
        .filter(|p| p["peer"]["kind"] == "pod" && p["peer"]["service"]["name"] == "api")
        .collect();
    assert_eq!(backend_peers.len(), 3, "one peer per backend: {peers:#}");
    for p in &backend_peers {
        let conns = p["connections"].as_array().expect("connections");
        assert_eq!(conns.len(), 1, "one reused connection per backend: {p:#}");
        assert_eq!(conns[0]["requests"]["source"], "h2");
        assert!(conns[0]["requests"]["count"].as_u64().unwrap_or(0) > 0);
    }
    assert_eq!(peers["services"][0]["verdict"], "round_robin", "{peers:#}");
    let (code, same) = http::get(agent.http_addr(), "/pods/rr/peers?namespace=shop").expect("GET");
    assert_eq!(code, 200);
    let same: serde_json::Value = serde_json::from_str(&same).expect("json");
    assert_eq!(same["pod"], peers["pod"]);
    for (path, want) in [
        ("/pods/nope/peers", 404),
        ("/pods/shop/nope/peers", 404),
        ("/pods/shop/Bad_Name/peers", 400),
        ("/pods/rr/peers?colour=red", 400),
        ("/pods/shop/rr/peers?namespace=x", 400),
    ] {
        let (code, body) = http::get(agent.http_addr(), path).expect("GET");
        assert_eq!(code, want, "{path}: {body}");
        assert!(body.contains("\"error\""), "{path}: {body}");
    }

    // `fanout verify` against the live agent agrees: round_robin passes, pick_first fails.
    let endpoint = format!("http://{}", agent.http_addr());
    let verify = move |client: &'static str| {
        let endpoint = endpoint.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
                .args([
                    "verify",
                    "--service",
                    "shop/api",
                    "--client",
                    client,
                    "--window",
                    "1s",
                    "--endpoint",
                    &endpoint,
                ])
                .output()
                .expect("run fanout verify")
        })
    };
    let rr_out = verify("shop/rr").await.expect("join");
    assert_eq!(
        rr_out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&rr_out.stdout),
        String::from_utf8_lossy(&rr_out.stderr)
    );
    let pf_out = verify("shop/pf").await.expect("join");
    assert_eq!(pf_out.status.code(), Some(1));
    let pf_text = String::from_utf8_lossy(&pf_out.stdout);
    assert!(pf_text.contains("pick_first"), "{pf_text}");

    let reports: Vec<_> = runs
        .into_iter()
        .map(|t| t.join().expect("client thread").expect("client"))
        .collect();
    for r in &reports {
        assert_eq!(r.succeeded, 260, "{r:?}");
    }

    // Unknown service: a JSON 404.
    let (code, body) = http::get(agent.http_addr(), "/services/shop/nope/balance").expect("GET");
    assert_eq!(code, 404);
    assert!(body.contains("unknown service"), "{body}");

    agent.shutdown().await.expect("shutdown");
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A lab agent on an inventory with client pods `clients` (pods 0..) and `backends` pods after
/// them (`api-<pod index>`) behind the headless service shop/api, serving gRPC on :8080.
/// Returns the agent, the gRPC servers and the inventory's directory.
async fn clients_and_backends(
    lab: &Lab,
    clients: &[&str],
    backends: usize,
    window: Duration,
    server: impl Fn(usize) -> ServerOptions,
) -> (Agent, Vec<GrpcServer>, std::path::PathBuf) {
    let first = clients.len();
    let servers: Vec<GrpcServer> = (first..first + backends)
        .map(|i| {
            let p = lab.pod(i);
            GrpcServer::start(p, p.addr(false, 8080), server(i)).expect("server")
        })
        .collect();
    let mut y = String::from("pods:\n");
    for (i, name) in clients.iter().enumerate() {
        y.push_str(&format!(
            "  - {{name: {name}, namespace: shop, ip: {}}}\n",
            lab.pod(i).ipv4
        ));
    }
    for i in first..first + backends {
        y.push_str(&format!(
            "  - {{name: api-{i}, namespace: shop, ip: {}, labels: {{app: api}}}}\n",
            lab.pod(i).ipv4
        ));
    }
    y.push_str("services:\n  - {name: api, namespace: shop, headless: true, ports: [{port: 8080}], selector: {app: api}}\n");
    let dir = std::env::temp_dir().join(format!("fanout-balance-{}", lab.prefix));
    std::fs::create_dir_all(&dir).expect("dir");
    let inv = dir.join("inventory.yaml");
    std::fs::write(&inv, y).expect("inventory");
    let agent = Agent::start(AgentOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        poll_interval: Duration::from_millis(20),
        identity: IdentitySource::Local {
            path: inv,
            reload_every: Duration::from_secs(1),
        },
        analysis: AnalysisConfig {
            window,
            ..AnalysisConfig::default()
        },
        ..AgentOptions::default()
    })
    .await
    .expect("agent starts");
    tokio::time::timeout(Duration::from_secs(30), agent.ready())
        .await
        .expect("ready");
    (agent, servers, dir)
}

fn balance_of(agent: &Agent, client: &str) -> serde_json::Value {
    let (code, body) = http::get(agent.http_addr(), "/services/shop/api/balance").expect("GET");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["clients"]
        .as_array()
        .and_then(|c| c.iter().find(|b| b["client"]["name"] == client).cloned())
        .unwrap_or_else(|| panic!("no balance for {client}: {body}"))
}

/// A round_robin client whose resolver answered before two of the four ready backends existed:
/// it never connects to them while its connections stay up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_resolver_is_flagged_with_the_backends_it_never_found() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root (cargo xtask test)"
    );
    let lab = Lab::new(5).expect("lab");
    let (agent, servers, dir) =
        clients_and_backends(&lab, &["client"], 4, Duration::from_secs(3), |i| {
            ServerOptions::new(format!("api-{i}"))
        })
        .await;
    let resolved: Vec<SocketAddr> = servers[..2].iter().map(|s| s.addr).collect();
    let pod = lab.pod(0).clone();
    let run = std::thread::spawn(move || {
        let target = Target::Resolver(std::sync::Arc::new(move || resolved.clone()));
        run_client(
            &pod,
            Policy::RoundRobin,
            target,
            200,
            Duration::from_millis(40),
            Duration::from_secs(30),
        )
    });
    tokio::time::sleep(Duration::from_millis(6000)).await;
    let b = balance_of(&agent, "client");
    assert_eq!(b["verdict"], Verdict::StaleResolver.as_str(), "{b:#}");
    let reason = b["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("api-3") && reason.contains("api-4"),
        "{reason}"
    );
    assert_eq!(
        (b["ready"].as_u64(), b["connected"].as_u64()),
        (Some(4), Some(2))
    );
    let report = run.join().expect("thread").expect("client");
    assert_eq!(report.succeeded, 200);
    assert_eq!(servers[2].stats().calls + servers[3].stats().calls, 0);
    agent.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Servers that rotate connections (MaxConnectionAge) make a round_robin client reconnect every
/// second: churn with long-lived connections is round_robin, not a dial per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_rotation_is_not_dial_per_request() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root (cargo xtask test)"
    );
    let lab = Lab::new(4).expect("lab");
    let (agent, servers, dir) =
        clients_and_backends(&lab, &["client"], 3, Duration::from_secs(4), |i| {
            let mut o = ServerOptions::new(format!("api-{i}"));
            o.max_connection_age = Some(Duration::from_millis(1200));
            o
        })
        .await;
    let backends: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let pod = lab.pod(0).clone();
    let run = std::thread::spawn(move || {
        run_client(
            &pod,
            Policy::RoundRobin,
            Target::Addrs(backends),
            220,
            Duration::from_millis(40),
            Duration::from_secs(30),
        )
    });
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let b = balance_of(&agent, "client");
    assert_eq!(b["verdict"], Verdict::RoundRobin.as_str(), "{b:#}");
    assert!(
        b["opens"].as_u64().unwrap_or(0) >= 3,
        "connections rotated: {b:#}"
    );
    let report = run.join().expect("thread").expect("client");
    assert_eq!(report.succeeded, 220);
    assert!(servers.iter().map(|s| s.stats().goaways).sum::<u64>() >= 3);
    agent.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}
