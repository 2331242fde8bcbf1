//! Root end-to-end test of Kubernetes mode through the daemon core: the agent reads a kubeconfig
//! that points at the in-process fake API server, reports ready only once every cache synced,
//! and attributes real lab connections through a ClusterIP to the pods the API server names.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Kind};
use fanout::{
    agent::{Agent, AgentOptions},
    analysis::AnalysisConfig,
    conntable::Direction,
    identity::{
        IdentitySource,
        attribution::{LocalEnd, Peer},
        kube::SERVICE_NAME_LABEL,
    },
};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;
use xtask::{
    grpc::{GrpcClient, GrpcServer, Policy, ServerOptions, Target},
    http,
    lab::{self, EchoServer, Lab},
};

fn pod(name: &str, ip: std::net::Ipv4Addr, app: &str, hash: &str) -> Pod {
    pod_with_image(name, ip, app, hash, "app:1")
}

fn pod_with_image(name: &str, ip: std::net::Ipv4Addr, app: &str, hash: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {"app": app, "pod-template-hash": hash},
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": format!("{app}-{hash}"), "uid": "u", "controller": true}]},
        "spec": {"nodeName": "lab-node", "containers": [{"name": "app", "image": image}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

async fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_gates_readiness_and_attributes_lab_connections() {
    xtask::lab::require_root("the kube-mode agent test loads eBPF programs and builds a lab");
    let lab = Lab::new(3).expect("lab");
    let servers: Vec<EchoServer> = (1..=2)
        .map(|i| {
            let p = lab.pod(i);
            EchoServer::start(p, p.addr(false, 8080), 100, Duration::from_secs(60)).expect("server")
        })
        .collect();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    lab.add_cluster_ip(vip, &[servers[0].addr, servers[1].addr])
        .expect("cluster ip");

    let api = FakeApiServer::start().await;
    api.apply(&pod(
        "client-5f6d7c8b9-aaaaa",
        lab.pod(0).ipv4,
        "client",
        "5f6d7c8b9",
    ));
    api.apply(&pod(
        "web-7d9f8c6b5-bbbbb",
        lab.pod(1).ipv4,
        "web",
        "7d9f8c6b5",
    ));
    api.apply(&pod(
        "web-7d9f8c6b5-ccccc",
        lab.pod(2).ipv4,
        "web",
        "7d9f8c6b5",
    ));
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": "web"},
                 "ports": [{"name": "grpc", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .expect("service");
    api.apply(&svc);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "web-x1", "namespace": "shop",
                     "labels": {SERVICE_NAME_LABEL: "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [lab.pod(1).ipv4.to_string()], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "web-7d9f8c6b5-bbbbb", "namespace": "shop"}},
            {"addresses": [lab.pod(2).ipv4.to_string()], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "web-7d9f8c6b5-ccccc", "namespace": "shop"}}
        ]
    }))
    .expect("slice");
    api.apply(&slice);
    // EndpointSlices cannot be listed yet: the caches cannot sync.
    api.set_forbidden(Kind::EndpointSlices, true);

    let dir = std::env::temp_dir().join(format!("fanout-kube-{}", lab.prefix));
    let kubeconfig = api.kubeconfig(&dir);

    let agent = Agent::start(AgentOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        poll_interval: Duration::from_millis(20),
        identity: IdentitySource::Kube {
            node_name: Some("lab-node".into()),
            kubeconfig: Some(kubeconfig),
        },
        conntrack_netns: Some(lab.node_netns_path()),
        ..AgentOptions::default()
    })
    .await
    .expect("agent starts");
    let addr = agent.http_addr();

    // Not ready while a cache cannot sync, even after recovery is done.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, _) = http::get(addr, "/healthz").expect("healthz");
    assert_eq!(code, 503, "not ready before every cache synced");
    api.set_forbidden(Kind::EndpointSlices, false);
    wait("ready", Duration::from_secs(20), || {
        matches!(http::get(addr, "/healthz"), Ok((200, _))).then_some(())
    })
    .await;

    let held = lab::hold(lab.pod(0), vip, 6).expect("connections");
    let mut accepted_by: HashMap<SocketAddr, &str> = HashMap::new();
    wait("accepts", Duration::from_secs(10), || {
        for (s, name) in servers
            .iter()
            .zip(["web-7d9f8c6b5-bbbbb", "web-7d9f8c6b5-ccccc"])
        {
            for p in s.peers() {
                accepted_by.insert(p, name);
            }
        }
        (accepted_by.len() == 6).then_some(())
    })
    .await;

    let cn = lab.pod(0).netns_inode;
    let shared = agent.shared().clone();
    let view = wait("attributed connections", Duration::from_secs(10), || {
        let inv = shared.identity.snapshot();
        let v: Vec<_> = shared.with_rows(|t| {
            t.iter()
                .filter(|c| c.key.netns == cn && c.direction == Direction::Outbound)
                .map(|c| (c.key.local, shared.identity.attribute(&inv, c)))
                .collect()
        });
        (v.len() == 6 && v.iter().all(|(_, a)| a.peer_pod().is_some())).then_some(v)
    })
    .await;
    for (local, at) in &view {
        let LocalEnd::Pod(me) = &at.local else {
            panic!("{at:?}")
        };
        assert_eq!(me.name, "client-5f6d7c8b9-aaaaa");
        assert_eq!(
            (me.workload.kind.as_str(), me.workload.name.as_str()),
            ("Deployment", "client")
        );
        let Peer::Service {
            service, backend, ..
        } = &at.peer
        else {
            panic!("{at:?}")
        };
        assert_eq!(
            (service.namespace.as_str(), service.name.as_str()),
            ("shop", "web")
        );
        let backend = backend.as_ref().map(|b| b.name.as_str());
        assert_eq!(backend, Some(accepted_by[local]), "backend from conntrack");
    }
    let metrics = shared.metrics.encode().expect("metrics");
    assert!(metrics.contains("fanout_identity_synced 1"), "{metrics}");

    drop(held);
    agent.shutdown().await.expect("shutdown");
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rollout that silently reverts a client to pick_first: Deployment/cart's first pod (image
/// cart:1) balances round_robin over the three pods of a headless service; its replacement
/// (cart:2, a new ReplicaSet) pins one. The agent counts the regression, lists it under
/// `/regressions` with the images before and after, and writes a Warning Event
/// `BalanceRegressed` on the new pod through the API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_that_reverts_to_pick_first_writes_an_event_on_the_pod() {
    xtask::lab::require_root("the kube-mode agent test loads eBPF programs and builds a lab");
    // pod0: cart (old), pod1: cart (new), pod2..4: backends.
    let lab = Lab::new(5).expect("lab");
    let servers: Vec<GrpcServer> = (2..5)
        .map(|i| {
            let p = lab.pod(i);
            GrpcServer::start(
                p,
                p.addr(false, 8080),
                ServerOptions::new(format!("api-{i}")),
            )
            .expect("server")
        })
        .collect();
    let api = FakeApiServer::start().await;
    api.apply(&pod_with_image(
        "cart-aaaa1111-old01",
        lab.pod(0).ipv4,
        "cart",
        "aaaa1111",
        "shop/cart:1",
    ));
    api.apply(&pod_with_image(
        "cart-bbbb2222-new01",
        lab.pod(1).ipv4,
        "cart",
        "bbbb2222",
        "shop/cart:2",
    ));
    let mut endpoints = Vec::new();
    for i in 2..5 {
        let name = format!("api-7d9f8c6b5-{i}");
        api.apply(&pod(&name, lab.pod(i).ipv4, "api", "7d9f8c6b5"));
        endpoints.push(
            json!({"addresses": [lab.pod(i).ipv4.to_string()], "conditions": {"ready": true},
                              "targetRef": {"kind": "Pod", "name": name, "namespace": "shop"}}),
        );
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "api", "namespace": "shop"},
        "spec": {"clusterIP": "None", "selector": {"app": "api"},
                 "ports": [{"name": "grpc", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]}
    }))
    .expect("service");
    api.apply(&svc);
    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "api-x1", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "api"}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .expect("slice");
    api.apply(&slice);

    let dir = std::env::temp_dir().join(format!("fanout-kube-rollout-{}", lab.prefix));
    let kubeconfig = api.kubeconfig(&dir);
    let agent = Agent::start(AgentOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        poll_interval: Duration::from_millis(20),
        identity: IdentitySource::Kube {
            node_name: Some("lab-node".into()),
            kubeconfig: Some(kubeconfig),
        },
        analysis: AnalysisConfig {
            window: Duration::from_secs(4),
            ..AnalysisConfig::default()
        },
        ..AgentOptions::default()
    })
    .await
    .expect("agent starts");
    let addr = agent.http_addr();
    wait("ready", Duration::from_secs(20), || {
        matches!(http::get(addr, "/healthz"), Ok((200, _))).then_some(())
    })
    .await;

    let backends: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let pace = Duration::from_millis(40);
    let deadline = Duration::from_secs(60);
    // The old pod balances until its verdict is remembered (verdicts are taken every 5 s).
    let old = GrpcClient::start(
        lab.pod(0),
        Policy::RoundRobin,
        Target::Addrs(backends.clone()),
        deadline,
    )
    .expect("old client");
    let stop_old = old.stop_handle();
    let old_run = std::thread::spawn(move || {
        old.calls(100_000, pace)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let rr = |body: &str| body.contains("\"verdict\":\"round_robin\"");
    wait(
        "round_robin for the old pod",
        Duration::from_secs(20),
        || {
            http::get(addr, "/services/shop/api/balance")
                .ok()
                .filter(|(c, b)| *c == 200 && rr(b))
                .map(|_| ())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // The rollout: the new pod pins one backend; the old one goes away.
    let new = GrpcClient::start(
        lab.pod(1),
        Policy::PickFirst,
        Target::Addrs(backends.clone()),
        deadline,
    )
    .expect("new client");
    let stop_new = new.stop_handle();
    let new_run = std::thread::spawn(move || {
        new.calls(100_000, pace)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    stop_old.stop();
    old_run
        .join()
        .expect("old client thread")
        .expect("old client");

    let event = wait(
        "the BalanceRegressed Event",
        Duration::from_secs(30),
        || {
            api.events()
                .into_iter()
                .find(|e| e["reason"] == "BalanceRegressed")
        },
    )
    .await;
    stop_new.stop();
    new_run
        .join()
        .expect("new client thread")
        .expect("new client");
    assert_eq!(event["type"], "Warning", "{event:#}");
    assert_eq!(event["regarding"]["kind"], "Pod", "{event:#}");
    assert_eq!(
        event["regarding"]["name"], "cart-bbbb2222-new01",
        "{event:#}"
    );
    assert_eq!(event["metadata"]["namespace"], "shop", "{event:#}");
    assert_eq!(event["reportingController"], "fanout", "{event:#}");
    let note = event["note"].as_str().unwrap_or("");
    assert!(
        note.contains("shop/Deployment/cart now pick_first for service shop/api (was round_robin)")
            && note.contains("it ran shop/cart:1 and now runs shop/cart:2"),
        "{note}"
    );

    let (code, body) = http::get(addr, "/regressions").expect("GET /regressions");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let r = &v["regressions"][0];
    assert_eq!(r["workload"], "Deployment/cart", "{v:#}");
    assert_eq!(
        (r["from"].as_str(), r["to"].as_str()),
        (Some("round_robin"), Some("pick_first"))
    );
    assert_eq!(r["version_before"], "shop/cart:1", "{v:#}");
    assert_eq!(r["version_after"], "shop/cart:2", "{v:#}");
    let metrics = agent.shared().metrics.encode().expect("metrics");
    assert!(
        metrics.contains("fanout_regression_events_total{result=\"ok\"} 1"),
        "{metrics}"
    );

    agent.shutdown().await.expect("shutdown");
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
}
