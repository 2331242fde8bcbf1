//! Root, container-true: the Helm chart's DaemonSet, rendered offline, runs the OCI image under
//! runc with exactly the chart's container spec: its capabilities (drop ALL, add the chart's
//! list), read-only root, no new privileges, uid 0, hostNetwork (the lab node's network namespace
//! is "the node"), no hostPID, private mount, cgroup, pid and ipc namespaces, the host paths the
//! chart mounts, and its memory limit. It runs in Kubernetes mode with the in-cluster config,
//! against the fake API server over TLS, as a pod would.
//!
//! Lab gRPC clients (h2c) call a headless service; a client in the node's network namespace (a
//! hostNetwork pod) calls a ClusterIP, so its packets are DNAT'ed before they leave its own
//! namespace. The test checks readiness, that every feature is on, the verdicts, exact HTTP/2
//! request counts per backend, and the owner of a connection recovered from a non-root process.
//! A real Prometheus scrapes the container: every dashboard panel's query returns data and the
//! pick_first alert fires for the pick_first client and not for the round_robin one.
//!
//! The second test drops each capability the chart adds, one at a time, and shows what breaks.

#[path = "support/e2e.rs"]
mod e2e;
#[path = "support/fake_apiserver.rs"]
mod fake_apiserver;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use e2e::{Running, Scrape};
use fake_apiserver::FakeApiServer;
use fanout::identity::kube::SERVICE_NAME_LABEL;
use k8s_openapi::api::{
    core::v1::{Pod as K8sPod, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};
use xtask::{
    container::{self, Container, Node},
    grpc::{GrpcClient, GrpcServer, Policy, ServerOptions, Target},
    http,
    lab::{self, EchoServer, Lab, Pod},
    prom::{self, Prometheus},
};

const NODE: &str = "lab-node";
/// The balance window the test passes through the chart's `extraArgs` (the default 30 s would
/// only make the test slower).
const WINDOW_ARG: &str = "--window=8s";
const PACE: Duration = Duration::from_millis(40);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The image under test, as `layout:tag`: `FANOUT_IMAGE` (the layout `cargo xtask image` wrote
/// from the release binary; `cargo xtask test` sets it), or one built here from this test's
/// daemon binary (in cargo's test scratch directory, replaced on every run).
fn image() -> (PathBuf, &'static str) {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(layout) = std::env::var_os("FANOUT_IMAGE") {
        return (PathBuf::from(layout), xtask::image::DEFAULT_TAG);
    }
    let layout = BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fanout-image");
        let info = xtask::image::build(
            Path::new(env!("CARGO_BIN_EXE_fanout")),
            &out,
            xtask::image::DEFAULT_TAG,
        )
        .expect("build the image");
        info.layout
    });
    (layout.clone(), xtask::image::DEFAULT_TAG)
}

/// The chart rendered with `values`: its DaemonSet.
fn daemonset(values: Value) -> Value {
    let out = Command::new("python3")
        .arg(repo().join("deploy/tests/render_chart.py"))
        .args(["--values", &values.to_string()])
        .output()
        .expect("python3 (cargo xtask setup installs helm-python-sdk)");
    assert!(
        out.status.success(),
        "rendering the chart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let objects: Vec<Value> = serde_json::from_slice(&out.stdout).expect("rendered JSON");
    objects
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("the chart renders a DaemonSet")
}

fn chart_capabilities() -> Vec<String> {
    let ds = daemonset(json!({}));
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("capability").to_string())
        .collect()
}

/// The Deployment both client pods belong to (through its ReplicaSet).
const CLIENT_HASH: &str = "5f6d7c8b9";

fn k8s_pod(name: &str, ip: Ipv4Addr, app: &str) -> K8sPod {
    let mut meta = json!({"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                          "labels": {"app": app}});
    if app == "web" {
        meta["labels"]["pod-template-hash"] = json!(CLIENT_HASH);
        meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": format!("web-{CLIENT_HASH}"), "uid": "rs", "controller": true}]);
    }
    serde_json::from_value(json!({
        "metadata": meta,
        "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": "app:1"}]},
        "status": {"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                   "conditions": [{"type": "Ready", "status": "True"}]}
    }))
    .expect("pod")
}

/// A process of another user (nobody) in a pod, holding one TCP connection open: recovering its
/// connection's owner needs CAP_DAC_READ_SEARCH (its fd directory) and CAP_SYS_PTRACE (its fd
/// links and network namespace).
struct Holder {
    child: Child,
}

impl Holder {
    fn start(pod: &Pod, to: SocketAddr) -> Holder {
        const SCRIPT: &str = "import socket, sys, time\n\
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)\n\
            print(s.getsockname()[1], flush=True)\n\
            time.sleep(600)\n";
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns])
            .args([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
            ])
            .args(["/usr/bin/python3", "-c", SCRIPT])
            .arg(to.ip().to_string())
            .arg(to.port().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the holder (setpriv, /usr/bin/python3)");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("holder output");
        assert!(
            line.trim().parse::<u16>().is_ok(),
            "the holder connected: {line:?}"
        );
        Holder { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A lab "cluster": the node namespace, client and backend pods, the API server, a ClusterIP.
/// Pods: 0 rr, 1 pf (clients, both of Deployment/web), 2 holder, 3..=5 api-3..api-5 (gRPC
/// backends), 6 echo.
struct Cluster {
    lab: Lab,
    _api: FakeApiServer,
    node: Node,
    servers: Vec<GrpcServer>,
    vip: SocketAddr,
    holder: Holder,
    _echo: EchoServer,
    dir: PathBuf,
}

impl Cluster {
    async fn start() -> Cluster {
        let lab = Lab::new(7).expect("lab");
        let gw = lab.gateway();
        let gw_ip = gw.ipv4;
        let listener = gw
            .run(move || std::net::TcpListener::bind((gw_ip, 0)))
            .expect("node namespace")
            .expect("bind the API server on the node address");
        let api = FakeApiServer::start_tls(listener).await;
        for (i, name, app) in [
            (0, "rr", "web"),
            (1, "pf", "web"),
            (2, "holder", "holder"),
            (6, "echo", "echo"),
        ] {
            api.apply(&k8s_pod(name, lab.pod(i).ipv4, app));
        }
        let servers: Vec<GrpcServer> = (3..=5)
            .map(|i| {
                let p = lab.pod(i);
                api.apply(&k8s_pod(&format!("api-{i}"), p.ipv4, "api"));
                GrpcServer::start(
                    p,
                    p.addr(false, 9090),
                    ServerOptions::new(format!("api-{i}")),
                )
                .expect("server")
            })
            .collect();
        let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
        let backends: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        lab.add_cluster_ip(vip, &backends).expect("cluster ip");
        for (name, cluster_ip, port) in [("api", "None", 9090), ("api-vip", "10.96.0.10", 80)] {
            let mut spec = json!({"selector": {"app": "api"}, "clusterIP": cluster_ip,
                "ports": [{"name": "grpc", "port": port, "targetPort": 9090, "protocol": "TCP"}]});
            if cluster_ip != "None" {
                spec["clusterIPs"] = json!([cluster_ip]);
                spec["type"] = json!("ClusterIP");
            }
            let svc: Service = serde_json::from_value(
                json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec}),
            )
            .expect("service");
            api.apply(&svc);
            let endpoints: Vec<Value> = (3..=5)
                .map(|i| {
                    json!({"addresses": [lab.pod(i).ipv4.to_string()],
                           "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": format!("api-{i}"),
                                         "namespace": "shop"}})
                })
                .collect();
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}-x1"), "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: name}},
                "addressType": "IPv4",
                "ports": [{"name": "grpc", "port": 9090, "protocol": "TCP"}],
                "endpoints": endpoints
            }))
            .expect("slice");
            api.apply(&slice);
        }
        let echo_pod = lab.pod(6);
        let echo = EchoServer::start(
            echo_pod,
            echo_pod.addr(false, 7000),
            10,
            Duration::from_secs(600),
        )
        .expect("echo server");
        let holder = Holder::start(lab.pod(2), echo.addr);

        let dir = std::env::temp_dir().join(format!("fanout-container-{}", lab.prefix));
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).expect("dir");
        std::fs::write(sa.join("token"), "fanout-test-token").expect("token");
        std::fs::write(sa.join("namespace"), "fanout").expect("namespace");
        std::fs::write(sa.join("ca.crt"), api.ca_pem.clone().expect("CA")).expect("ca.crt");
        let node = Node {
            name: NODE.into(),
            netns: lab.node_netns_path(),
            api: (api.addr().ip(), api.addr().port()),
            service_account: sa,
        };
        Cluster {
            lab,
            _api: api,
            node,
            servers,
            vip,
            holder,
            _echo: echo,
            dir,
        }
    }

    /// Starts the chart's container rendered with `values`.
    fn run_chart(&self, values: Value) -> Agent {
        let (layout, tag) = image();
        let entrypoint = container::image_entrypoint(&layout, tag).expect("image entrypoint");
        let ds = daemonset(values);
        let plan = container::plan(&ds, "fanout", &entrypoint, &self.node).expect("plan");
        let port = plan.metrics_port.expect("a metrics port");
        let c = Container::start(&format!("{}:{tag}", layout.display()), &plan, &self.node)
            .expect("start the container");
        Agent {
            c,
            node: self.lab.gateway(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            plan,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The daemon in its container, reached from the node's network namespace.
struct Agent {
    c: Container,
    node: Pod,
    addr: SocketAddr,
    plan: container::Plan,
}

enum Start {
    Ready,
    Exited(String),
}

impl Agent {
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let (addr, path) = (self.addr, path.to_string());
        self.node.run(move || http::get(addr, &path).ok()).ok()?
    }

    fn json(&self, path: &str) -> Value {
        let (code, body) = self.get(path).unwrap_or_else(|| panic!("GET {path}"));
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    fn scrape(&self) -> Scrape {
        let (code, body) = self.get("/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        Scrape::parse(&body)
    }

    /// Waits until /healthz answers 200 or the container stops.
    fn started(&self, limit: Duration) -> Start {
        let end = Instant::now() + limit;
        loop {
            if let Some((200, _)) = self.get("/healthz") {
                return Start::Ready;
            }
            if self.c.status() == "stopped" {
                return Start::Exited(self.c.logs());
            }
            assert!(
                Instant::now() < end,
                "not ready after {limit:?}:\n{}",
                self.c.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn features(&self) -> Vec<(String, String, Value)> {
        self.json("/features")["features"]
            .as_array()
            .expect("features")
            .iter()
            .map(|f| {
                (
                    f["feature"].as_str().unwrap_or("").to_string(),
                    f["state"].as_str().unwrap_or("").to_string(),
                    f.clone(),
                )
            })
            .collect()
    }

    /// Waits until no feature is `unknown` (recovery finishes after readiness is possible).
    fn settled_features(&self) -> Vec<(String, String, Value)> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let f = self.features();
            if f.iter().all(|(_, state, _)| state != "unknown") {
                return f;
            }
            assert!(Instant::now() < end, "features undetermined: {f:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn metrics_when(&self, limit: Duration, ready: impl Fn(&Scrape) -> bool) -> Scrape {
        let end = Instant::now() + limit;
        loop {
            let m = self.scrape();
            if ready(&m) {
                return m;
            }
            assert!(
                Instant::now() < end,
                "the metrics did not settle in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn balance_of(&self, client: &str) -> Value {
        let v = self.json("/services/shop/api/balance");
        v["clients"]
            .as_array()
            .and_then(|c| c.iter().find(|b| b["client"]["name"] == client).cloned())
            .unwrap_or(Value::Null)
    }
}

fn state_of<'a>(features: &'a [(String, String, Value)], name: &str) -> &'a str {
    features
        .iter()
        .find(|(f, _, _)| f == name)
        .map(|(_, s, _)| s.as_str())
        .unwrap_or_else(|| panic!("no feature {name}: {features:?}"))
}

/// The node's namespaces differ from the daemon's own where the chart makes them private.
fn assert_isolated(agent: &Agent) {
    let pid = agent.c.pid().expect("container pid");
    for ns in ["mnt", "cgroup", "pid", "ipc"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("ns link");
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("ns link");
        assert_ne!(theirs, ours, "the container has its own {ns} namespace");
    }
    let net = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
    let node = format!("net:[{}]", agent.node.netns_inode);
    assert_eq!(
        net.to_string_lossy(),
        node,
        "hostNetwork: the node's namespace"
    );
    // Its /sys/fs/cgroup is its own cgroup, not the host's root: the scanner must not go there.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim()
        .to_string();
    let want: u64 = agent
        .plan
        .capabilities
        .iter()
        .map(|c| match c.as_str() {
            "CAP_DAC_READ_SEARCH" => 1u64 << 2,
            "CAP_NET_ADMIN" => 1 << 12,
            "CAP_SYS_PTRACE" => 1 << 19,
            "CAP_PERFMON" => 1 << 38,
            "CAP_BPF" => 1 << 39,
            other => panic!("unexpected capability {other}"),
        })
        .sum();
    assert_eq!(
        u64::from_str_radix(&caps, 16).expect("hex"),
        want,
        "the daemon holds exactly the chart's capabilities"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_runs_true_in_a_container_and_prometheus_alerts_on_it() {
    lab::require_root("the container test runs runc and builds a lab");
    let cluster = Cluster::start().await;
    // FANOUT_TEST_LOG (e.g. fanout=debug) sets the chart's logLevel, for looking into a failure.
    let log = std::env::var("FANOUT_TEST_LOG").unwrap_or_else(|_| "info".into());
    let agent = cluster.run_chart(json!({"extraArgs": [WINDOW_ARG], "logLevel": log}));
    if let Start::Exited(logs) = agent.started(Duration::from_secs(60)) {
        panic!("the daemon exited:\n{logs}");
    }
    assert_isolated(&agent);
    for (name, state, f) in agent.settled_features() {
        assert_eq!(state, "on", "{name}: {f:#}\n{}", agent.c.logs());
    }
    let features = agent.features();
    let h2 = &features
        .iter()
        .find(|(n, _, _)| n == "h2_requests")
        .expect("h2")
        .2;
    assert!(
        h2["detail"]
            .as_str()
            .unwrap_or("")
            .contains("/host/sys/fs/cgroup"),
        "the host's cgroup2 root, through the chart's mount: {h2:#}"
    );
    let m = agent.scrape();
    for f in [
        "h2_requests",
        "byte_counters",
        "accept_owner",
        "recovery_netns",
        "recovery_owner",
        "conntrack",
    ] {
        assert_eq!(
            m.one("fanout_feature_enabled", &[("feature", f)]),
            1.0,
            "{f}"
        );
    }
    // The non-root holder's connection predates the daemon: recovered with its owner.
    let conns = agent.json("/connections");
    let held: Vec<&Value> = conns["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| c["netns"] == cluster.lab.pod(2).netns_inode)
        .collect();
    assert_eq!(held.len(), 1, "{conns:#}");
    assert_eq!(held[0]["origin"], "recovered");
    assert_eq!(
        held[0]["owner"]["pid"].as_u64(),
        Some(u64::from(cluster.holder.pid())),
        "{:#}",
        held[0]
    );

    // A real Prometheus in the node's namespace scrapes the container and evaluates the shipped
    // rules (alert `for:` shortened to 5 s).
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/fanout.rules.yaml"))
        .expect("rule file");
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         rule_files: [fanout.rules.yaml]\n\
         scrape_configs:\n\
         \x20 - job_name: fanout\n\
         \x20   honor_labels: true\n\
         \x20   static_configs: [{{targets: ['{}'], labels: {{node: {NODE}}}}}]\n",
        agent.addr
    );
    let prom = Prometheus::start(
        &cluster.lab.gateway(),
        &config,
        &[("fanout.rules.yaml", prom::with_short_for(&rules, "5s"))],
        &cluster.dir.join("prometheus"),
    )
    .expect("prometheus");

    // A rollout that goes wrong: Deployment/web balances with its first pod (rr); then a pod of
    // a bad image joins and pins one backend (pf).
    let backends: Vec<SocketAddr> = cluster.servers.iter().map(|s| s.addr).collect();
    let rr = Running::start(
        cluster.lab.pod(0),
        Policy::RoundRobin,
        Target::Addrs(backends.clone()),
        PACE,
    );
    let end = Instant::now() + Duration::from_secs(40);
    while agent.balance_of("rr")["verdict"] != "round_robin" {
        assert!(Instant::now() < end, "rr: {:#}", agent.balance_of("rr"));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The possible regressions of Deployment/web are exported at 0 once its verdict is
    // remembered, and Prometheus has scraped them before anything changes.
    let regression = r#"fanout_lb_verdict_changes_total{workload="Deployment/web",from="round_robin",to="pick_first"}"#;
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let r = prom.query(regression).expect("query");
        if r.first().and_then(|s| s["value"][1].as_str()) == Some("0") {
            break;
        }
        assert!(Instant::now() < end, "{regression} at 0: {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let pf = Running::start(
        cluster.lab.pod(1),
        Policy::PickFirst,
        Target::Addrs(backends.clone()),
        PACE,
    );

    // A hostNetwork client: in the node's own namespace, through the ClusterIP. kube-proxy's
    // DNAT in OUTPUT rewrites its packets before they leave; its requests still come from
    // HTTP/2 frames, exactly.
    let host_client = GrpcClient::start(
        &cluster.lab.gateway(),
        Policy::PickFirst,
        Target::Vip(cluster.vip),
        e2e::CLIENT_DEADLINE,
    )
    .expect("host client");
    let report = host_client.calls(30, PACE).expect("calls");
    assert_eq!(report.failed(), 0, "{report:?}");
    let node_inode = cluster.lab.node_inode;
    let vip = cluster.vip.to_string();
    let end = Instant::now() + Duration::from_secs(10);
    let host_conn = loop {
        let conns = agent.json("/connections");
        let found = conns["connections"].as_array().and_then(|cs| {
            cs.iter()
                .find(|c| {
                    c["netns"] == node_inode
                        && c["remote"] == vip
                        && c["requests"]["count"] == report.succeeded
                })
                .cloned()
        });
        if let Some(c) = found {
            break c;
        }
        assert!(
            Instant::now() < end,
            "the host client's connection with {} requests: {conns:#}",
            report.succeeded
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(host_conn["requests"]["source"], "h2", "{host_conn:#}");
    assert_eq!(
        host_conn["identity"]["local"]["kind"], "node",
        "{host_conn:#}"
    );
    assert!(
        host_conn["identity"]["peer"]["backend"]["name"]
            .as_str()
            .is_some_and(|b| b.starts_with("api-")),
        "conntrack named the backend: {host_conn:#}"
    );
    host_client.finish().expect("host client");

    // Verdicts, once a window has passed with both clients calling.
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let (r, p) = (agent.balance_of("rr"), agent.balance_of("pf"));
        if r["verdict"] == "round_robin" && p["verdict"] == "pick_first" {
            assert_eq!(r["source"], "h2", "{r:#}");
            assert_eq!(
                (r["ready"].as_u64(), r["connected"].as_u64()),
                (Some(3), Some(3))
            );
            assert_eq!(p["connected"], 1, "{p:#}");
            break;
        }
        assert!(Instant::now() < end, "verdicts: rr {r:#} pf {p:#}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every dashboard panel's query returns data, through Prometheus.
    let out = Command::new("python3")
        .arg(repo().join("deploy/tests/dashboard_queries.py"))
        .args([
            "--namespace",
            "shop",
            "--service",
            "api",
            "--client",
            ".*",
            "--rate-interval",
            "1m",
        ])
        .output()
        .expect("dashboard_queries.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queries: Vec<Value> = serde_json::from_slice(&out.stdout).expect("queries");
    assert!(queries.len() >= 10, "{queries:?}");
    let end = Instant::now() + Duration::from_secs(60);
    let mut empty: Vec<String>;
    loop {
        empty = Vec::new();
        for q in &queries {
            let expr = q["expr"].as_str().expect("expr");
            match prom.query(expr) {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => empty.push(format!("{} [{}]: {expr}", q["panel"], q["refId"])),
                Err(e) => panic!("{}: {e}", q["panel"]),
            }
        }
        if empty.is_empty() || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );

    // The pick_first alert fires for the pick_first client, and no alert for the other.
    let end = Instant::now() + Duration::from_secs(60);
    let firing = loop {
        let firing = prom.firing().expect("alerts");
        let pinned = firing.iter().any(|a| {
            a["labels"]["alertname"] == "FanoutPickFirstSuspected" && a["labels"]["pod"] == "pf"
        });
        if pinned {
            break firing;
        }
        assert!(
            Instant::now() < end,
            "FanoutPickFirstSuspected not firing for pf: {firing:#?}\ntargets: {:#?}\n{}",
            prom.targets(),
            prom.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    let pinned = firing
        .iter()
        .find(|a| a["labels"]["alertname"] == "FanoutPickFirstSuspected")
        .expect("alert");
    let end = Instant::now() + Duration::from_secs(60);
    let regressed = loop {
        let firing = prom.firing().expect("alerts");
        if let Some(a) = firing
            .iter()
            .find(|a| a["labels"]["alertname"] == "FanoutVerdictRegressed")
        {
            break a.clone();
        }
        assert!(
            Instant::now() < end,
            "FanoutVerdictRegressed not firing: {firing:#?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(
        (
            &regressed["labels"]["workload"],
            &regressed["labels"]["from"],
            &regressed["labels"]["to"],
            &regressed["labels"]["service"]
        ),
        (
            &json!("Deployment/web"),
            &json!("round_robin"),
            &json!("pick_first"),
            &json!("api")
        ),
        "{regressed:#}"
    );
    let summary = pinned["annotations"]["summary"].as_str().unwrap_or("");
    assert!(
        summary.contains("shop/pf") && summary.contains("api") && summary.contains("api-"),
        "the summary names client, service and backend: {summary}"
    );
    for a in &firing {
        assert_ne!(
            a["labels"]["pod"], "rr",
            "no alert for the round_robin client: {a:#}"
        );
        assert!(
            ![
                "FanoutFeatureDegraded",
                "FanoutAgentDown",
                "FanoutEventsLost"
            ]
            .contains(&a["labels"]["alertname"].as_str().unwrap_or("")),
            "{a:#}"
        );
    }

    // Exact request counts per backend pod once the clients closed their connections.
    let reports = [("rr", rr.stop()), ("pf", pf.stop())];
    let m = agent.metrics_when(Duration::from_secs(15), |m| {
        reports.iter().all(|(c, _)| {
            let pod = [("pod", *c)];
            m.sum("fanout_connections_active", &pod) == 0.0
                && m.sum("fanout_connections_opened_total", &pod)
                    == m.sum("fanout_connections_closed_total", &pod)
        })
    });
    for (client, r) in &reports {
        assert_eq!(r.failed(), 0, "{r:?}");
        for (backend, calls) in &r.per_backend {
            let l = [
                ("pod", *client),
                ("backend_pod", backend.as_str()),
                ("source", "h2"),
            ];
            assert_eq!(
                m.one("fanout_requests_total", &l),
                *calls as f64,
                "{client} {backend}"
            );
        }
        assert_eq!(
            m.sum(
                "fanout_requests_total",
                &[("pod", *client), ("source", "h2")]
            ),
            r.succeeded as f64,
            "{client}"
        );
        assert_eq!(
            m.sum(
                "fanout_requests_total",
                &[("pod", *client), ("source", "messages")]
            ),
            0.0,
            "{client}"
        );
    }

    // Within the chart's memory limit, and an orderly stop on SIGTERM.
    let peak = agent.c.memory_peak();
    eprintln!(
        "container memory peak: {peak:?} bytes (limit {:?})",
        agent.plan.memory_limit
    );
    if let (Some(peak), Some(limit)) = (peak, agent.plan.memory_limit) {
        assert!(peak < limit, "{peak} >= {limit}");
    }
    assert!(
        agent.c.terminate(Duration::from_secs(20)),
        "stops on SIGTERM within the grace period"
    );
    assert!(
        agent.c.logs().contains("eBPF programs detached"),
        "{}",
        agent.c.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_capability_the_chart_adds_is_needed() {
    lab::require_root("the container test runs runc and builds a lab");
    let cluster = Cluster::start().await;
    let caps = chart_capabilities();
    assert_eq!(
        caps,
        [
            "BPF",
            "PERFMON",
            "NET_ADMIN",
            "SYS_PTRACE",
            "DAC_READ_SEARCH"
        ],
        "the list this test proves"
    );
    for cap in &caps {
        let fewer: Vec<&String> = caps.iter().filter(|c| *c != cap).collect();
        let agent = cluster.run_chart(json!({
            "extraArgs": [WINDOW_ARG],
            "securityContext": {"capabilities": {"add": fewer}},
        }));
        match (cap.as_str(), agent.started(Duration::from_secs(60))) {
            ("BPF" | "PERFMON", Start::Exited(logs)) => {
                assert!(
                    logs.contains(&format!("missing CAP_{cap}")) && logs.contains("add "),
                    "without {cap} the daemon refuses to start and says what to add:\n{logs}"
                );
            }
            ("BPF" | "PERFMON", Start::Ready) => panic!("ready without {cap}"),
            (_, Start::Exited(logs)) => panic!("exited without {cap}:\n{logs}"),
            (cap, Start::Ready) => {
                let f = agent.settled_features();
                let off: Vec<&str> = f
                    .iter()
                    .filter(|(_, s, _)| s == "off")
                    .map(|(n, _, _)| n.as_str())
                    .collect();
                let want: &[&str] = match cap {
                    "NET_ADMIN" => &["h2_requests", "conntrack"],
                    "SYS_PTRACE" => &["recovery_netns"],
                    "DAC_READ_SEARCH" => &["recovery_owner"],
                    other => panic!("no expectation for {other}"),
                };
                assert_eq!(off, want, "without {cap}: {f:#?}");
                for name in want {
                    let fix = f
                        .iter()
                        .find(|(n, _, _)| n == name)
                        .and_then(|(_, _, v)| v["fix"].as_str().map(String::from))
                        .unwrap_or_default();
                    assert!(fix.contains(cap), "{name}'s fix names {cap}: {fix}");
                    assert_eq!(
                        agent
                            .scrape()
                            .one("fanout_feature_enabled", &[("feature", name)]),
                        0.0
                    );
                }
                let logs = agent.c.logs();
                assert!(
                    want.iter()
                        .all(|n| logs.contains(&format!("feature off: {n}"))
                            && logs.contains("WARN")),
                    "a WARN line per degraded feature:\n{logs}"
                );
                assert_eq!(state_of(&f, "byte_counters"), "on");
            }
        }
    }
}
