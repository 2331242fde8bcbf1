//! Kubernetes mode against an in-process fake API server (see `support/fake_apiserver.rs`): the
//! real kube-rs client, watchers and reflectors talk HTTP to 127.0.0.1. No root needed.

#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use fake_apiserver::{FakeApiServer, Kind};
use fanout::identity::{
    kube::{KubeOptions, KubeSource, SERVICE_NAME_LABEL, pod_from_k8s},
    model::{Inventory, ObjectRef, TargetPort},
};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::json;
use tokio::{sync::watch, time::Instant};

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---- fixtures ----------------------------------------------------------------------------------

fn pod(
    namespace: &str,
    name: &str,
    ip: &str,
    node: &str,
    owner: Option<(&str, &str)>,
    labels: serde_json::Value,
) -> Pod {
    let owners: Vec<serde_json::Value> = owner
        .into_iter()
        .map(|(kind, name)| {
            json!({"apiVersion": "apps/v1", "kind": kind, "name": name,
                   "uid": format!("uid-{name}"), "controller": true})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "ownerReferences": owners},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .unwrap()
}

fn web_pod(name: &str, ip: &str) -> Pod {
    pod(
        "shop",
        name,
        ip,
        "node-a",
        Some(("ReplicaSet", "web-7d9f8c6b5")),
        json!({"app": "web", "pod-template-hash": "7d9f8c6b5"}),
    )
}

fn db_pod() -> Pod {
    pod(
        "shop",
        "db-0",
        "10.244.1.20",
        "node-b",
        Some(("StatefulSet", "db")),
        json!({"app": "db"}),
    )
}

fn agent_pod() -> Pod {
    let mut p = pod(
        "kube-system",
        "agent-x7k2p",
        "192.0.2.1",
        "node-a",
        Some(("DaemonSet", "agent")),
        json!({"app": "agent"}),
    );
    if let Some(spec) = p.spec.as_mut() {
        spec.host_network = Some(true);
    }
    p
}

fn web_service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                 "selector": {"app": "web"},
                 "ports": [{"name": "grpc", "port": 80, "targetPort": "grpc", "protocol": "TCP"}]}
    }))
    .unwrap()
}

fn db_service() -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "clusterIPs": ["None"], "selector": {"app": "db"},
                 "ports": [{"port": 5432, "targetPort": 5432}]}
    }))
    .unwrap()
}

/// `endpoints`: (ip, pod name, ready: Some/None = unset).
fn slice(
    name: &str,
    service: &str,
    port: (&str, u16),
    endpoints: &[(&str, &str, Option<bool>)],
) -> EndpointSlice {
    let eps: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(ip, pod, ready)| {
            let conditions = match ready {
                Some(r) => json!({"ready": r}),
                None => json!({}),
            };
            json!({"addresses": [ip], "conditions": conditions,
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "shop",
                     "labels": {SERVICE_NAME_LABEL: service,
                                "endpointslice.kubernetes.io/managed-by": "controller"}},
        "addressType": "IPv4",
        "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
        "endpoints": eps
    }))
    .unwrap()
}

fn web_slice(endpoints: &[(&str, &str, Option<bool>)]) -> EndpointSlice {
    slice("web-abc12", "web", ("grpc", 8080), endpoints)
}

fn db_slice() -> EndpointSlice {
    slice(
        "db-xyz34",
        "db",
        ("", 5432),
        &[("10.244.1.20", "db-0", None)],
    )
}

/// Three pods, a ClusterIP service with one ready and one unready endpoint, and a headless one.
fn seed(server: &FakeApiServer) {
    server.apply(&web_pod("web-7d9f8c6b5-abcde", "10.244.0.10"));
    server.apply(&db_pod());
    server.apply(&agent_pod());
    server.apply(&web_service());
    server.apply(&db_service());
    server.apply(&web_slice(&[
        ("10.244.0.10", "web-7d9f8c6b5-abcde", Some(true)),
        ("10.244.0.99", "web-7d9f8c6b5-old", Some(false)),
    ]));
    server.apply(&db_slice());
    // Not part of any service: filtered by the watch's label selector.
    let mut orphan = slice("orphan", "x", ("p", 1), &[("10.9.9.9", "x", None)]);
    orphan.metadata.labels = Some(BTreeMap::new());
    server.apply(&orphan);
}

fn options(debounce_ms: u64) -> KubeOptions {
    KubeOptions {
        node_name: Some("node-a".into()),
        debounce: Duration::from_millis(debounce_ms),
    }
}

// ---- waiting -----------------------------------------------------------------------------------

fn summary(inv: &Inventory) -> String {
    let pods: Vec<String> = inv
        .pods()
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    let services: Vec<String> = inv
        .services()
        .iter()
        .map(|s| format!("{}/{} eps={}", s.namespace, s.name, s.endpoints.len()))
        .collect();
    format!("pods={pods:?} services={services:?}")
}

/// Waits (bounded) until the published inventory satisfies `pred`.
async fn wait_inventory(
    rx: &watch::Receiver<Arc<Inventory>>,
    within: Duration,
    what: &str,
    pred: impl Fn(&Inventory) -> bool,
) -> Arc<Inventory> {
    let mut rx = rx.clone();
    let deadline = Instant::now() + within;
    loop {
        let current = rx.borrow_and_update().clone();
        if pred(&current) {
            return current;
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("inventory channel closed while waiting for {what}"),
            Err(_) => panic!(
                "timed out after {within:?} waiting for {what}; last: {}",
                summary(&current)
            ),
        }
    }
}

async fn wait_synced(source: &KubeSource, within: Duration) {
    tokio::time::timeout(within, source.wait_synced())
        .await
        .unwrap_or_else(|_| panic!("not synced within {within:?}"))
        .expect("source stopped");
}

/// Polls `cond` every 20 ms, bounded.
async fn wait_for(within: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An endpoint as (ip, port, pod, ready, port name).
type EndpointRow = (String, u16, Option<ObjectRef>, bool, Option<String>);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn has_pod(inv: &Inventory, name: &str) -> bool {
    inv.pods().iter().any(|p| p.name == name)
}

fn endpoint_ips(inv: &Inventory, service: &str) -> Vec<String> {
    inv.service("shop", service)
        .map(|s| s.endpoints.iter().map(|e| e.ip.to_string()).collect())
        .unwrap_or_default()
}

// ---- tests -------------------------------------------------------------------------------------

/// 1. Initial sync: partial snapshots may be published, but `synced` waits for all three lists
///    (EndpointSlices are forbidden at first); then pods, workloads, IPs, nodes, services,
///    cluster IPs, headless, ports and endpoints are all right, and the watcher sent the expected
///    list/watch requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_builds_the_inventory() {
    init_tracing();
    let server = FakeApiServer::start().await;
    seed(&server);
    server.set_forbidden(Kind::EndpointSlices, true);
    let source = KubeSource::start(server.client(), options(50));
    assert!(source.inventory.borrow().pods().is_empty(), "starts empty");

    // Pods and services are listed, slices are not: the snapshot has pods but is not synced.
    wait_inventory(
        &source.inventory,
        Duration::from_secs(10),
        "pods before slices",
        |inv| inv.pods().len() == 3 && inv.services().len() == 2,
    )
    .await;
    wait_for(Duration::from_secs(10), "a forbidden slice list", || {
        source.stats.watch_errors.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(
        !*source.synced.borrow(),
        "synced before EndpointSlices were listed"
    );

    server.set_forbidden(Kind::EndpointSlices, false);
    wait_synced(&source, Duration::from_secs(30)).await;
    // Synced means the published snapshot already includes all three lists.
    let inv = source.inventory.borrow().clone();

    // Pods: workloads, IPs, nodes, hostNetwork.
    assert_eq!(inv.pods().len(), 3, "{}", summary(&inv));
    let web = inv.pod("shop", "web-7d9f8c6b5-abcde").expect("web pod");
    assert_eq!(
        (web.workload.kind.as_str(), web.workload.name.as_str()),
        ("Deployment", "web")
    );
    assert_eq!(web.ips, vec![ip("10.244.0.10")]);
    assert_eq!(web.node.as_deref(), Some("node-a"));
    assert!(web.ready && !web.host_network);
    assert_eq!(web.uid, "uid-shop-web-7d9f8c6b5-abcde");
    let db = inv.pod("shop", "db-0").expect("db pod");
    assert_eq!(
        (db.workload.kind.as_str(), db.workload.name.as_str()),
        ("StatefulSet", "db")
    );
    assert_eq!(db.node.as_deref(), Some("node-b"));
    let agent = inv.pod("kube-system", "agent-x7k2p").expect("agent pod");
    assert_eq!(
        (agent.workload.kind.as_str(), agent.workload.name.as_str()),
        ("DaemonSet", "agent")
    );
    assert!(agent.host_network);
    assert_eq!(
        inv.pod_by_ip(ip("10.244.0.10")).map(|p| p.name.as_str()),
        Some("web-7d9f8c6b5-abcde")
    );
    assert!(
        inv.pod_by_ip(ip("192.0.2.1")).is_none(),
        "a hostNetwork IP is the node's"
    );
    assert!(inv.is_host_ip(ip("192.0.2.1")));

    // This node's pods.
    let mut local: Vec<String> = source.local_pods().iter().map(|p| p.name.clone()).collect();
    local.sort();
    assert_eq!(local, ["agent-x7k2p", "web-7d9f8c6b5-abcde"]);
    assert_eq!(source.node_name(), Some("node-a"));

    // Services.
    assert_eq!(inv.services().len(), 2);
    let web_svc = inv.service("shop", "web").expect("web service");
    assert_eq!(web_svc.cluster_ips, vec![ip("10.96.0.10")]);
    assert!(!web_svc.headless());
    assert_eq!(web_svc.ports.len(), 1);
    assert_eq!(web_svc.ports[0].port, 80);
    assert_eq!(
        web_svc.ports[0].target_port,
        TargetPort::Name("grpc".into())
    );
    let eps: Vec<EndpointRow> = web_svc
        .endpoints
        .iter()
        .map(|e| {
            (
                e.ip.to_string(),
                e.port,
                e.pod.clone(),
                e.ready,
                e.port_name.clone(),
            )
        })
        .collect();
    assert_eq!(
        eps,
        vec![
            (
                "10.244.0.10".into(),
                8080,
                Some(ObjectRef::new("shop", "web-7d9f8c6b5-abcde")),
                true,
                Some("grpc".into())
            ),
            (
                "10.244.0.99".into(),
                8080,
                Some(ObjectRef::new("shop", "web-7d9f8c6b5-old")),
                false,
                Some("grpc".into())
            ),
        ]
    );
    assert_eq!(web_svc.ready_backends(), 1);
    let hit = inv
        .service_by_cluster_addr("10.96.0.10:80".parse().unwrap())
        .expect("cluster addr");
    assert_eq!(hit.service.name, "web");

    let db_svc = inv.service("shop", "db").expect("db service");
    assert!(db_svc.headless());
    assert_eq!(db_svc.ports[0].target_port, TargetPort::Number(5432));
    assert_eq!(db_svc.endpoints.len(), 1);
    let ep = &db_svc.endpoints[0];
    assert_eq!(
        (ep.ip, ep.port, ep.ready, ep.port_name.clone()),
        (ip("10.244.1.20"), 5432, true, None)
    );
    assert_eq!(ep.pod, Some(ObjectRef::new("shop", "db-0")));
    let hits = inv.services_by_endpoint("10.244.1.20:5432".parse().unwrap());
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].service.name, "db");

    // The orphan slice was filtered out by the label selector.
    assert_eq!(source.cached_endpoint_slices().len(), 2);

    // What the kube-rs watcher actually asked for: a paginated LIST, then a WATCH from the
    // list's resourceVersion with bookmarks; no streaming list.
    let requests = server.requests();
    let pod_reqs: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods"))
        .collect();
    assert!(
        pod_reqs[0].contains("limit=500") && !pod_reqs[0].contains("watch"),
        "{pod_reqs:?}"
    );
    let watch = pod_reqs
        .iter()
        .find(|r| r.contains("watch=true"))
        .expect("a pod watch");
    assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");
    assert!(watch.contains("resourceVersion="), "{watch}");
    assert!(watch.contains("timeoutSeconds=290"), "{watch}");
    assert!(
        requests.iter().all(|r| !r.contains("sendInitialEvents")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .filter(|r| r.contains("endpointslices"))
            .all(|r| r.contains("labelSelector=kubernetes.io%2Fservice-name")),
        "{requests:?}"
    );

    source.stop().await;
}

/// 2. Live updates: an added pod and endpoint appear within a second, bookmarks are harmless,
///    deletion removes them; `stop()` closes the watches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_events_update_the_snapshot() {
    init_tracing();
    let server = FakeApiServer::start().await;
    seed(&server);
    let source = KubeSource::start(server.client(), options(200));
    wait_synced(&source, Duration::from_secs(20)).await;
    wait_for(Duration::from_secs(10), "three open watches", || {
        server.open_watches() == 3
    })
    .await;
    server.send_bookmarks();

    let started = Instant::now();
    server.apply(&web_pod("web-7d9f8c6b5-fghij", "10.244.0.11"));
    server.apply(&web_slice(&[
        ("10.244.0.10", "web-7d9f8c6b5-abcde", Some(true)),
        ("10.244.0.11", "web-7d9f8c6b5-fghij", Some(true)),
    ]));
    let inv = wait_inventory(
        &source.inventory,
        Duration::from_secs(1),
        "the new pod and endpoint",
        |inv| {
            has_pod(inv, "web-7d9f8c6b5-fghij")
                && endpoint_ips(inv, "web").contains(&"10.244.0.11".to_owned())
        },
    )
    .await;
    eprintln!("update visible after {:?}", started.elapsed());
    let new = inv.pod_by_ip(ip("10.244.0.11")).expect("new pod by IP");
    assert_eq!(new.workload.name, "web");
    assert_eq!(inv.service("shop", "web").unwrap().ready_backends(), 2);
    assert!(
        endpoint_ips(&inv, "web").iter().all(|e| e != "10.244.0.99"),
        "replaced slice"
    );

    server.send_bookmarks();
    server.delete::<Pod>("shop", "web-7d9f8c6b5-fghij");
    server.apply(&web_slice(&[(
        "10.244.0.10",
        "web-7d9f8c6b5-abcde",
        Some(true),
    )]));
    let inv = wait_inventory(
        &source.inventory,
        Duration::from_secs(1),
        "the pod and endpoint gone",
        |inv| !has_pod(inv, "web-7d9f8c6b5-fghij") && endpoint_ips(inv, "web") == ["10.244.0.10"],
    )
    .await;
    assert!(inv.pod_by_ip(ip("10.244.0.11")).is_none());

    // A deleted service disappears with it; its slice alone does not resurrect it.
    server.delete::<Service>("shop", "db");
    wait_inventory(
        &source.inventory,
        Duration::from_secs(1),
        "db service gone",
        |inv| inv.service("shop", "db").is_none(),
    )
    .await;

    assert_eq!(source.stats.restarts.load(Ordering::Relaxed), 0);
    assert!(source.stats.events.load(Ordering::Relaxed) >= 5);
    source.stop().await;
    // Writing to a connection the client dropped is how the server notices it is gone.
    wait_for(
        Duration::from_secs(10),
        "watches closed after stop()",
        || {
            server.send_bookmarks();
            server.open_watches() == 0
        },
    )
    .await;
}

/// Debounce: a burst of 100 changes is coalesced into a few snapshots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_are_debounced() {
    init_tracing();
    let server = FakeApiServer::start().await;
    seed(&server);
    let source = KubeSource::start(server.client(), options(200));
    wait_synced(&source, Duration::from_secs(20)).await;
    let before = source.stats.rebuilds.load(Ordering::Relaxed);
    for i in 0..100 {
        let mut p = web_pod("web-7d9f8c6b5-abcde", "10.244.0.10");
        if let Some(c) = p.spec.as_mut().and_then(|s| s.containers.first_mut()) {
            c.image = Some(format!("app:{i}"));
        }
        server.apply(&p);
    }
    wait_inventory(
        &source.inventory,
        Duration::from_secs(5),
        "the last change",
        |inv| {
            inv.pod("shop", "web-7d9f8c6b5-abcde")
                .is_some_and(|p| p.version.as_deref() == Some("app:99"))
        },
    )
    .await;
    let rebuilds = source.stats.rebuilds.load(Ordering::Relaxed) - before;
    assert!(
        (1..=5).contains(&rebuilds),
        "{rebuilds} rebuilds for one burst"
    );
    source.stop().await;
}

/// 3. Outage: the last inventory is kept and served, errors are counted, and after the server
///    comes back on the same port the watches resume (no relist) and catch up with the changes
///    made while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_keeps_the_last_inventory_and_resumes() {
    init_tracing();
    let mut server = FakeApiServer::start().await;
    seed(&server);
    let source = KubeSource::start(server.client(), options(50));
    wait_synced(&source, Duration::from_secs(20)).await;
    let before = source.inventory.borrow().clone();
    assert_eq!(before.pods().len(), 3);
    assert_eq!(source.stats.watch_errors.load(Ordering::Relaxed), 0);

    server.stop().await;
    assert!(
        tokio::net::TcpStream::connect(server.addr()).await.is_err(),
        "the port must refuse connections during the outage"
    );
    wait_for(
        Duration::from_secs(10),
        "watch errors during the outage",
        || source.stats.watch_errors.load(Ordering::Relaxed) > 0,
    )
    .await;
    // Let a few retries fail.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Still serving the last-known identity.
    assert!(*source.synced.borrow());
    let during = source.inventory.borrow().clone();
    assert_eq!(summary(&during), summary(&before));
    assert!(
        Arc::ptr_eq(&during, &before),
        "no snapshot was published during the outage"
    );
    assert_eq!(
        during.pod_by_ip(ip("10.244.1.20")).map(|p| p.name.as_str()),
        Some("db-0")
    );

    // Changes while the server is down.
    server.delete::<Pod>("shop", "db-0");
    server.apply(&web_pod("web-7d9f8c6b5-klmno", "10.244.0.12"));
    server.apply(&web_slice(&[
        ("10.244.0.10", "web-7d9f8c6b5-abcde", Some(true)),
        ("10.244.0.12", "web-7d9f8c6b5-klmno", Some(false)),
    ]));
    let mut web = web_service();
    if let Some(spec) = web.spec.as_mut() {
        spec.cluster_ips = Some(vec!["10.96.0.10".into(), "fd00:96::10".into()]);
    }
    server.apply(&web);

    let errors_while_down = source.stats.watch_errors.load(Ordering::Relaxed);
    server.restart().await;
    // Backoff is at most a few seconds after such a short outage; bound generously.
    let inv = wait_inventory(
        &source.inventory,
        Duration::from_secs(45),
        "the changes made while down",
        |inv| {
            !has_pod(inv, "db-0")
                && has_pod(inv, "web-7d9f8c6b5-klmno")
                && endpoint_ips(inv, "web").contains(&"10.244.0.12".to_owned())
                && inv
                    .service("shop", "web")
                    .is_some_and(|s| s.cluster_ips.len() == 2)
        },
    )
    .await;
    let klmno = inv.service("shop", "web").unwrap();
    assert!(
        klmno
            .endpoints
            .iter()
            .any(|e| e.ip == ip("10.244.0.12") && !e.ready)
    );
    assert!(
        inv.service_by_cluster_addr("[fd00:96::10]:80".parse().unwrap())
            .is_some()
    );
    assert!(errors_while_down > 0);
    assert!(*source.synced.borrow());
    // Resumed from the last resourceVersion: nothing had to be relisted.
    assert_eq!(source.stats.restarts.load(Ordering::Relaxed), 0);
    let requests = server.requests();
    let pod_lists = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods") && !r.contains("watch=true"))
        .count();
    assert_eq!(pod_lists, 1, "{requests:?}");

    // And it keeps following live changes after the outage.
    server.delete::<Pod>("shop", "web-7d9f8c6b5-klmno");
    wait_inventory(
        &source.inventory,
        Duration::from_secs(5),
        "live delete after the outage",
        |inv| !has_pod(inv, "web-7d9f8c6b5-klmno"),
    )
    .await;
    source.stop().await;
}

/// 4. 410 Gone: the history is compacted past the client's resourceVersion (with a pod added and
///    one deleted during the compaction, never sent as events); the watcher gets 410, relists,
///    and the snapshot is right; watching resumes from the new list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gone_410_relists() {
    init_tracing();
    let server = FakeApiServer::start().await;
    seed(&server);
    let source = KubeSource::start(server.client(), options(50));
    wait_synced(&source, Duration::from_secs(20)).await;
    wait_for(Duration::from_secs(10), "three open watches", || {
        server.open_watches() == 3
    })
    .await;
    let lists_before = server
        .requests()
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert_eq!(lists_before, 3);

    server.compact_with(|c| {
        c.apply(&web_pod("web-7d9f8c6b5-pqrst", "10.244.0.13"));
        c.delete::<Pod>("shop", "db-0");
        c.apply(&web_slice(&[(
            "10.244.0.13",
            "web-7d9f8c6b5-pqrst",
            Some(true),
        )]));
    });
    let inv = wait_inventory(
        &source.inventory,
        Duration::from_secs(30),
        "the relisted state",
        |inv| {
            has_pod(inv, "web-7d9f8c6b5-pqrst")
                && !has_pod(inv, "db-0")
                && endpoint_ips(inv, "web") == ["10.244.0.13"]
        },
    )
    .await;
    assert_eq!(inv.pods().len(), 3, "{}", summary(&inv));
    assert!(inv.pod_by_ip(ip("10.244.1.20")).is_none());
    // Every kind was expired; pods and slices certainly relisted.
    wait_for(Duration::from_secs(30), "three relists", || {
        source.stats.restarts.load(Ordering::Relaxed) >= 3
    })
    .await;
    assert!(
        source.stats.watch_errors.load(Ordering::Relaxed) >= 3,
        "the 410s are counted"
    );
    let requests = server.requests();
    let lists = requests
        .iter()
        .filter(|r| !r.contains("watch=true"))
        .count();
    assert!(lists >= 6, "expected fresh LISTs after 410: {requests:?}");
    assert!(*source.synced.borrow());

    // Watching resumed from the new list's version.
    server.apply(&web_pod("web-7d9f8c6b5-uvwxy", "10.244.0.14"));
    wait_inventory(
        &source.inventory,
        Duration::from_secs(5),
        "a live add after the relist",
        |inv| has_pod(inv, "web-7d9f8c6b5-uvwxy"),
    )
    .await;
    source.stop().await;
}

/// A pod as the API server sends it: managedFields, annotations, containers, full status.
fn big_pod() -> Pod {
    let managed: Vec<serde_json::Value> = (0..50)
        .map(|i| {
            json!({"manager": format!("controller-{i}"), "operation": "Update", "apiVersion": "v1",
                   "fieldsType": "FieldsV1",
                   "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}},
                                "f:status": {"f:conditions": {"k:{\"type\":\"Ready\"}": {}}}}})
        })
        .collect();
    let env: Vec<serde_json::Value> = (0..100)
        .map(|i| json!({"name": format!("VAR_{i}"), "value": "some value"}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {
            "name": "big-7d9f8c6b5-zzzzz", "namespace": "shop",
            "labels": {"app": "big", "pod-template-hash": "7d9f8c6b5"},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "x".repeat(16384),
                            "prometheus.io/scrape": "true"},
            "managedFields": managed,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "big-7d9f8c6b5", "uid": "rs", "controller": true}]
        },
        "spec": {"nodeName": "node-a",
                 "containers": [{"name": "app", "image": "registry.example/big:1", "env": env}],
                 "volumes": [{"name": "data", "emptyDir": {}}]},
        "status": {"phase": "Running", "podIP": "10.244.0.50", "podIPs": [{"ip": "10.244.0.50"}],
                   "hostIP": "192.0.2.1",
                   "conditions": [{"type": "Ready", "status": "True", "message": "m"},
                                  {"type": "Initialized", "status": "True"}],
                   "containerStatuses": [{"name": "app", "image": "i", "imageID": "sha256:x",
                                          "ready": true, "restartCount": 0}]}
    }))
    .unwrap()
}

/// 5. Stripping: the objects the reflectors cache carry no managedFields, annotations, container
///    specs or statuses, and converting them gives exactly what the full object gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_objects_are_stripped() {
    init_tracing();
    let server = FakeApiServer::start().await;
    seed(&server);
    let big = big_pod();
    server.apply(&big);
    let mut web = web_service();
    web.metadata.annotations = Some(BTreeMap::from([("a".into(), "y".repeat(8192))]));
    web.metadata.managed_fields = Some(vec![Default::default(); 10]);
    server.apply(&web);
    let source = KubeSource::start(server.client(), options(50));
    wait_synced(&source, Duration::from_secs(20)).await;

    let cached = source.cached_pods();
    let cached_big = cached
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some("big-7d9f8c6b5-zzzzz"))
        .expect("big pod cached");
    let json = serde_json::to_string(&**cached_big).unwrap();
    for gone in [
        "managedFields",
        "annotations",
        "last-applied",
        "VAR_",
        "volumes",
        "containerStatuses",
        "hostIP",
        "Initialized",
        "resourceVersion",
    ] {
        assert!(!json.contains(gone), "{gone} is cached: {json}");
    }
    assert!(
        json.len() < 1024,
        "cached pod is {} bytes: {json}",
        json.len()
    );
    for p in &cached {
        assert!(p.metadata.managed_fields.is_none() && p.metadata.annotations.is_none());
        // Containers keep their name and image (the pod's version), nothing else.
        assert!(p.spec.as_ref().is_none_or(|s| s.containers.iter().all(|c| {
            c.env.is_none() && c.args.is_none() && c.command.is_none() && c.ports.is_none()
        })));
    }
    for s in source.cached_services() {
        assert!(s.metadata.managed_fields.is_none() && s.metadata.annotations.is_none());
        assert!(s.spec.as_ref().is_some_and(|s| s.selector.is_none()));
    }
    for s in source.cached_endpoint_slices() {
        let labels = s.metadata.labels.clone().unwrap_or_default();
        assert_eq!(labels.keys().collect::<Vec<_>>(), [SERVICE_NAME_LABEL]);
    }

    // The snapshot equals the conversion of the full, unstripped object.
    let inv = source.inventory.borrow().clone();
    let got = inv
        .pod("shop", "big-7d9f8c6b5-zzzzz")
        .expect("big pod in inventory");
    let mut want = pod_from_k8s(&big).expect("convertible");
    want.uid = "uid-shop-big-7d9f8c6b5-zzzzz".into(); // assigned by the server
    assert_eq!(**got, want);
    assert_eq!(
        (got.workload.kind.as_str(), got.workload.name.as_str()),
        ("Deployment", "big")
    );
    source.stop().await;
}
