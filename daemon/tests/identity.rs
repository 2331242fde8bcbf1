//! Root end-to-end test of identity: one client pod, three backends behind a headless service and
//! three behind a ClusterIP service (kube-proxy-style random DNAT in the lab node namespace).
//! Every connection fanout reports must carry the right client pod, service and backend pod —
//! for ClusterIP connections the backend that actually accepted it.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use fanout::{
    agent::{Agent, AgentOptions},
    conntable::Direction,
    identity::{
        IdentitySource,
        attribution::{Attribution, LocalEnd, Peer},
    },
};
use xtask::{
    http,
    lab::{self, EchoServer, Lab},
};

const VIP: &str = "10.96.0.10:80";

fn inventory(lab: &Lab) -> String {
    let mut y = String::from("pods:\n");
    y.push_str(&format!(
        "  - {{name: client, namespace: shop, ip: {}, workload: Deployment/client, labels: {{app: client}}}}\n",
        lab.pod(0).ipv4
    ));
    for i in 1..=3 {
        y.push_str(&format!(
            "  - {{name: stock-{i}, namespace: shop, ip: {}, workload: StatefulSet/stock, labels: {{app: stock}}}}\n",
            lab.pod(i).ipv4
        ));
    }
    for i in 4..=6 {
        y.push_str(&format!(
            "  - {{name: pricing-{i}, namespace: shop, ip: {}, workload: Deployment/pricing, labels: {{app: pricing}}}}\n",
            lab.pod(i).ipv4
        ));
    }
    // The node's own address, as a hostNetwork pod would have it.
    y.push_str(&format!(
        "  - {{name: node-agent, namespace: kube-system, ip: {}, host_network: true}}\n",
        lab.gateway().ipv4
    ));
    y.push_str(&format!(
        "services:\n  - {{name: stock, namespace: shop, headless: true, ports: [{{port: 8080}}], selector: {{app: stock}}}}\n  - {{name: pricing, namespace: shop, cluster_ip: {}, ports: [{{port: 80, target_port: 8080, name: grpc}}], selector: {{app: pricing}}}}\n",
        VIP.split(':').next().unwrap_or_default()
    ));
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_names_client_service_and_backend() {
    xtask::lab::require_root("the identity test loads eBPF programs and builds a lab");
    let lab = Lab::new(7).expect("lab");
    let servers: Vec<EchoServer> = (1..=6)
        .map(|i| {
            let pod = lab.pod(i);
            EchoServer::start(pod, pod.addr(false, 8080), 100, Duration::from_secs(60))
                .expect("server")
        })
        .collect();
    let vip: SocketAddr = VIP.parse().expect("vip");
    let cluster_backends: Vec<SocketAddr> = servers[3..].iter().map(|s| s.addr).collect();
    lab.add_cluster_ip(vip, &cluster_backends)
        .expect("cluster ip");

    let dir = std::env::temp_dir().join(format!("fanout-identity-{}", lab.prefix));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let inv_path = dir.join("inventory.yaml");
    std::fs::write(&inv_path, inventory(&lab)).expect("inventory");

    let agent = Agent::start(AgentOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        poll_interval: Duration::from_millis(20),
        identity: IdentitySource::Local {
            path: inv_path.clone(),
            reload_every: Duration::from_secs(1),
        },
        conntrack_netns: Some(lab.node_netns_path()),
        ..AgentOptions::default()
    })
    .await
    .expect("agent starts");
    tokio::time::timeout(Duration::from_secs(30), agent.ready())
        .await
        .expect("ready");

    // Connections through the ClusterIP until kube-proxy's random choice has reached every
    // backend (at least 12, at most 60), one directly to each headless backend, and one from
    // the node itself to stock-1.
    let client = lab.pod(0).clone();
    let mut held: Vec<TcpStream> = Vec::new();
    while held.len() < 60 && (held.len() < 12 || servers[3..].iter().any(|s| s.accepted() == 0)) {
        held.extend(lab::hold(&client, vip, 1).expect("cluster conn"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let via_vip = held.len();
    for s in &servers[..3] {
        held.extend(lab::hold(&client, s.addr, 1).expect("direct conn"));
    }
    let node = lab.gateway();
    let from_node = lab::hold(&node, servers[0].addr, 1).expect("node conn");

    // Which backend pod accepted each client address, from the servers themselves.
    let mut accepted_by: HashMap<SocketAddr, String> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let total = via_vip + 4;
    while accepted_by.len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (i, s) in servers.iter().enumerate() {
            let name = if i < 3 {
                format!("stock-{}", i + 1)
            } else {
                format!("pricing-{}", i + 1)
            };
            for p in s.peers() {
                accepted_by.insert(p, name.clone());
            }
        }
    }
    assert_eq!(accepted_by.len(), total, "every connection was accepted");
    let reached: std::collections::BTreeSet<&String> = accepted_by.values().collect();
    assert_eq!(
        reached.len(),
        6,
        "all six backends took connections: {reached:?}"
    );

    // Wait until fanout has every client connection with its ClusterIP backends resolved.
    let cn = lab.pod(0).netns_inode;
    let shared = agent.shared().clone();
    let client_view =
        |shared: &fanout::exposition::http::AppState| -> Vec<(SocketAddr, SocketAddr, Attribution)> {
            let inv = shared.identity.snapshot();
            shared.with_rows(|t| {
                t.iter()
                    .filter(|c| c.key.netns == cn && c.direction == Direction::Outbound)
                    .map(|c| {
                        (
                            c.key.local,
                            c.key.remote,
                            shared.identity.attribute(&inv, c),
                        )
                    })
                    .collect()
            })
        };
    let deadline = Instant::now() + Duration::from_secs(10);
    let view = loop {
        let v = client_view(&shared);
        let resolved = v
            .iter()
            .filter(|(_, r, a)| *r != vip || a.peer_pod().is_some())
            .count();
        if (v.len() == via_vip + 3 && resolved == via_vip + 3) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        view.len(),
        via_vip + 3,
        "every client connection: {view:#?}"
    );

    for (local, remote, at) in &view {
        let LocalEnd::Pod(me) = &at.local else {
            panic!("client end not a pod: {at:?}")
        };
        assert_eq!(
            (me.namespace.as_str(), me.name.as_str()),
            ("shop", "client")
        );
        assert_eq!(me.workload.kind, "Deployment");
        let truth = &accepted_by[local];
        match &at.peer {
            Peer::Service {
                service,
                backend,
                backend_addr,
            } => {
                assert_eq!(*remote, vip);
                assert_eq!((service.name.as_str(), service.port), ("pricing", 80));
                let b = backend
                    .as_ref()
                    .unwrap_or_else(|| panic!("no backend: {at:?}"));
                assert_eq!(&b.name, truth, "conntrack names the backend that accepted");
                assert_eq!(backend_addr.map(|a| a.port()), Some(8080));
            }
            Peer::Pod { pod, service } => {
                assert_eq!(&pod.name, truth);
                let s = service
                    .as_ref()
                    .unwrap_or_else(|| panic!("no service: {at:?}"));
                assert_eq!((s.name.as_str(), s.headless), ("stock", true));
            }
            other => panic!("unexpected peer {other:?}"),
        }
    }

    // Server side: each backend sees the client pod; stock-1 also sees the node, as a node.
    let inv = shared.identity.snapshot();
    let inbound: Vec<Attribution> = shared.with_rows(|t| {
        t.iter()
            .filter(|c| c.direction == Direction::Inbound)
            .filter(|c| lab.pods[1..].iter().any(|p| p.netns_inode == c.key.netns))
            .map(|c| shared.identity.attribute(&inv, c))
            .collect()
    });
    assert_eq!(inbound.len(), total, "{inbound:#?}");
    let from_client = inbound
        .iter()
        .filter(|a| matches!(&a.peer, Peer::Pod { pod, .. } if pod.name == "client"))
        .count();
    assert_eq!(from_client, via_vip + 3);
    assert_eq!(
        inbound.iter().filter(|a| a.peer == Peer::Node).count(),
        1,
        "the node's own connection is not taken for a pod"
    );
    assert!(inbound.iter().all(|a| matches!(&a.local, LocalEnd::Pod(_))));
    // And the node's end of it is the node.
    let node_side: Vec<Attribution> = shared.with_rows(|t| {
        t.iter()
            .filter(|c| c.key.netns == lab.node_inode)
            .map(|c| shared.identity.attribute(&inv, c))
            .collect()
    });
    assert_eq!(node_side.len(), 1);
    assert_eq!(node_side[0].local, LocalEnd::Node);

    // The HTTP view carries the same identity.
    let (code, body) =
        http::get(agent.http_addr(), &format!("/connections?netns={cn}")).expect("GET");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let services: Vec<&str> = v["connections"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["identity"]["peer"]["service"]["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        services.iter().filter(|s| **s == "pricing").count(),
        via_vip
    );
    assert_eq!(services.iter().filter(|s| **s == "stock").count(), 3);
    let metrics = shared.metrics.encode().expect("metrics");
    let found = format!("fanout_conntrack_lookups_total{{result=\"found\"}} {via_vip}\n");
    assert!(metrics.contains(&found), "{found} in {metrics}");

    drop((held, from_node));
    agent.shutdown().await.expect("shutdown");
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
