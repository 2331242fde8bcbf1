//! Root end-to-end tests with real gRPC library clients and servers in lab pods, run with
//! `ip netns exec`: Python grpcio (gRPC C-core, `support/grpc_py/`), Node's @grpc/grpc-js
//! (`support/grpc_js/`) and tonic (the example `grpc_tonic` of this package). No protoc: every
//! stack calls `/fanout.lab.Echo/{Call,Stream}` with opaque bytes, and all of them speak one
//! protocol (the flags of `grpc_py/client.py` and `server.py`, a `listening`/`first ok` line, one
//! JSON report when stdin closes), so one harness drives each stack through the same matrix.
//!
//! The other balance tests only use fanout's own h2c client (`xtask::grpc`); these check that
//! what real gRPC stacks do on the wire (connection preface, SETTINGS, WINDOW_UPDATE, BDP and
//! keepalive PINGs, HPACK, GOAWAY on MaxConnectionAge, TLS) gets the same verdicts, and that the
//! h2c requests fanout counts per backend equal what each server answered, exactly.
//!
//! Each stack must be installed: grpcio importable by `python3`, `grpc_js/node_modules` (both
//! installed by `cargo xtask setup`), the tonic example built (the test builds it with cargo).
//! A missing one fails its tests, naming what is missing; none is skipped.

#[path = "support/e2e.rs"]
mod e2e;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use e2e::Scrape;
use fanout::{
    agent::{Agent, AgentOptions},
    analysis::{AnalysisConfig, Verdict},
    identity::IdentitySource,
};
use xtask::{
    http,
    lab::{self, Lab, Pod},
};

/// One lab at a time: every lab uses the same pod addresses and ClusterIPs, and every agent
/// traces the whole node, so an agent next to another test's lab could take that lab's
/// connections for its own pods' (same IPs), which a real node never shows.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Python servers and clients.
const PY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_py");
/// The Node servers and clients, with their `node_modules` (`npm ci` there).
const JS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/grpc_js");
/// The name every server certificate carries (besides its pod IPs); clients check it.
const TLS_NAME: &str = "backend.fanout.test";
/// Bounds every server and client process: none outlives this.
const PROCESS_DEADLINE: Duration = Duration::from_secs(90);
/// The analysis window: short, so that a verdict holds a few seconds after the traffic starts.
const WINDOW: Duration = Duration::from_secs(4);
const H2C_PORT: u16 = 50051;
const TLS_PORT: u16 = 50443;

/// A test's scratch directory (inventory, certificates), removed on every exit path.
struct Scratch(PathBuf);

impl Scratch {
    fn new(lab: &Lab) -> Scratch {
        let dir = std::env::temp_dir().join(format!("fanout-real-clients-{}", lab.prefix));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tests `$scenario` with each [`Stack`], as three tests named after the stacks.
macro_rules! per_stack {
    ($scenario:ident: $grpcio:ident, $grpc_js:ident, $tonic:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $grpcio() {
            $scenario(Stack::Grpcio).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $grpc_js() {
            $scenario(Stack::GrpcJs).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $tonic() {
            $scenario(Stack::Tonic).await;
        }
    };
}

/// A gRPC implementation whose servers and clients the tests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stack {
    /// Python grpcio (gRPC C-core), from PyPI.
    Grpcio,
    /// Node's @grpc/grpc-js, from npm.
    GrpcJs,
    /// tonic over hyper and h2 (Rust). Its `round_robin` is tower's power-of-two-choices
    /// balancer over every address, its `pick_first` one channel to the first address.
    Tonic,
}

impl Stack {
    /// The program and the arguments before a role's own flags. The first call per stack fails
    /// (never skips) unless the stack can run; later calls reuse that check.
    fn command(self, role: Role) -> (PathBuf, Vec<String>) {
        static READY: [std::sync::OnceLock<PathBuf>; 3] = [const { std::sync::OnceLock::new() }; 3];
        let program = READY[self as usize].get_or_init(|| self.require()).clone();
        let role = role.as_str();
        let pre = match self {
            Stack::Grpcio => {
                let script = Path::new(PY_DIR).join(format!("{role}.py"));
                vec!["-u".into(), path_str(&script)]
            }
            Stack::GrpcJs => vec![path_str(&Path::new(JS_DIR).join(format!("{role}.js")))],
            Stack::Tonic => vec![role.to_string()],
        };
        (program, pre)
    }

    /// Panics, naming what is missing, unless the stack can run; returns its program.
    fn require(self) -> PathBuf {
        match self {
            Stack::Grpcio => {
                require_ok(
                    Command::new("python3").args(["-c", "import grpc"]),
                    "python3 cannot import grpc: the Python package grpcio is missing (install it \
                     with `cargo xtask setup` or `python3 -m pip install grpcio`)",
                );
                "python3".into()
            }
            Stack::GrpcJs => {
                require_ok(
                    Command::new("node")
                        .arg("-e")
                        .arg("require('@grpc/grpc-js')")
                        .current_dir(JS_DIR),
                    "node cannot load @grpc/grpc-js: install it with `cargo xtask setup` (or \
                     `npm ci` in daemon/tests/support/grpc_js; Node 20 or newer)",
                );
                "node".into()
            }
            Stack::Tonic => build_tonic_example(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Server,
    Client,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Client => "client",
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// Panics with `missing` and the command's stderr unless `cmd` runs and succeeds.
fn require_ok(cmd: &mut Command, missing: &str) {
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("{missing}: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => panic!("{missing}: {cmd:?}: {e}"),
    }
}

/// Builds the example `grpc_tonic` with the cargo running the tests and returns its path. It
/// builds from the workspace root for the default members, as `cargo test` there does, so the
/// features unify alike and the build is a no-op when `cargo test` built the example already
/// (`--package fanout` would resolve features anew and rebuild half the dependencies).
fn build_tonic_example() -> PathBuf {
    let out = Command::new(env!("CARGO"))
        .args(["build", "--example", "grpc_tonic"])
        .args(["--message-format", "json-render-diagnostics"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo to build the tonic example");
    assert!(
        out.status.success(),
        "cannot build the tonic example (`cargo build -p fanout --example grpc_tonic`)"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "grpc_tonic")
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .expect("cargo named the grpc_tonic executable")
}

/// A server or client process of a [`Stack`] in a pod's network namespace. Its stdout lines
/// arrive on a channel; closing its stdin asks it to stop and print its JSON report. Dropping it
/// kills it.
struct Proc {
    what: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Keepalive PINGs acknowledged, from grpcio's `http_keepalive` trace on stderr.
    keepalive_acks: Arc<AtomicU64>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    fn spawn(stack: Stack, role: Role, pod: &Pod, what: &str, args: &[String]) -> Proc {
        let (program, pre) = stack.command(role);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pod.netns])
            .arg(&program)
            .args(pre)
            .args(args);
        if stack == Stack::Grpcio && args.iter().any(|a| a == "--keepalive-ms") {
            // grpcio logs every keepalive PING it sends and every ack: count the acks. (The
            // other stacks count them themselves and report `keepalive_acks`.)
            cmd.env("GRPC_TRACE", "http_keepalive")
                .env("GRPC_VERBOSITY", "debug");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{what}: cannot start `ip netns exec … {program:?}`: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let keepalive_acks = Arc::new(AtomicU64::new(0));
        let err_pipe = child.stderr.take().expect("piped stderr");
        let (sink, acks) = (stderr.clone(), keepalive_acks.clone());
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                // gRPC's http_keepalive trace, when enabled: a keepalive PING the server acked.
                if line.contains("Finish keepalive ping") {
                    acks.fetch_add(1, Ordering::Relaxed);
                } else if let Ok(mut s) = sink.lock()
                    && s.len() < 64 * 1024
                {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Proc {
            what: what.to_string(),
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            keepalive_acks,
            stderr_reader: Some(stderr_reader),
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for a stdout line starting with `prefix`; panics with the process's stderr after
    /// `timeout` or when it exits first.
    fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(e) => {
                    // Let stderr drain a moment so that the panic says why.
                    std::thread::sleep(Duration::from_millis(200));
                    let stderr = self.stderr();
                    assert!(
                        !stderr.contains("MISSING "),
                        "{}: its gRPC library is missing: {stderr}",
                        self.what
                    );
                    panic!(
                        "{}: no `{prefix}` line ({e:?}) within {timeout:?}; stderr: {stderr}",
                        self.what
                    );
                }
            }
        }
    }

    /// Closes stdin (the process stops), reads its JSON report and reaps it. A grpcio report
    /// gains `keepalive_acks` (the keepalive PINGs acknowledged, 0 without `--keepalive-ms`);
    /// the other stacks report their own.
    fn finish(mut self) -> serde_json::Value {
        drop(self.stdin.take());
        let line = self.wait_line("{", Duration::from_secs(15));
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "{}: {status}: {}",
                    self.what,
                    self.stderr()
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The process is gone, so its stderr ends: let the reader count the last lines.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end
            && self
                .stderr_reader
                .as_ref()
                .is_some_and(|t| !t.is_finished())
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{}: {e}: {line}", self.what));
        if v.get("keepalive_acks").is_none() {
            v["keepalive_acks"] = self.keepalive_acks.load(Ordering::Relaxed).into();
        }
        v
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A CA and a server certificate signed by it for [`TLS_NAME`] and `ips`, in `dir`. Made with
/// the openssl CLI, or with Python's `cryptography` when there is no openssl.
/// Returns (ca.pem, server.pem, server.key).
fn make_certs(dir: &Path, ips: &[std::net::Ipv4Addr]) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, cert, key) = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    let sans: Vec<String> = std::iter::once(format!("DNS:{TLS_NAME}"))
        .chain(ips.iter().map(|ip| format!("IP:{ip}")))
        .collect();
    let have_openssl = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if have_openssl {
        let p = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        let (ca_key, csr, ext) = (dir.join("ca.key"), dir.join("server.csr"), dir.join("ext"));
        std::fs::write(&ext, format!("subjectAltName={}\n", sans.join(","))).expect("ext");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        run(Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", &p(&ca_key), "-out", &p(&ca)])
            .args(["-days", "1", "-subj", "/CN=fanout-test-ca"]));
        run(Command::new("openssl")
            .args(["req"])
            .args(ec)
            .args(["-keyout", &p(&key), "-out", &p(&csr)])
            .args(["-subj", &format!("/CN={TLS_NAME}")]));
        run(Command::new("openssl")
            .args(["x509", "-req", "-in", &p(&csr), "-CA", &p(&ca)])
            .args(["-CAkey", &p(&ca_key), "-CAcreateserial", "-out", &p(&cert)])
            .args(["-days", "1", "-extfile", &p(&ext)]));
    } else {
        run(Command::new("python3")
            .arg(Path::new(PY_DIR).join("certs.py"))
            .arg(dir)
            .arg(TLS_NAME)
            .args(ips.iter().map(|ip| ip.to_string())));
    }
    (ca, cert, key)
}

/// A service's backends: one server per pod.
struct Backends {
    service: &'static str,
    /// The port the servers listen on.
    port: u16,
    /// A ClusterIP in front of them ([`Backends::cluster_ip`]); None: a headless service.
    vip: Option<SocketAddr>,
    /// (backend pod name, address, server), in pod order
    servers: Vec<(String, SocketAddr, Proc)>,
}

impl Backends {
    fn start(
        stack: Stack,
        lab: &Lab,
        service: &'static str,
        pods: std::ops::Range<usize>,
        port: u16,
        extra: &[String],
    ) -> Backends {
        let servers: Vec<(String, SocketAddr, Proc)> = pods
            .map(|i| {
                let pod = lab.pod(i);
                let name = format!("{service}-{i}");
                let addr = pod.addr(false, port);
                let mut args = vec![
                    "--addr".to_string(),
                    addr.to_string(),
                    "--name".into(),
                    name.clone(),
                    "--deadline-s".into(),
                    PROCESS_DEADLINE.as_secs().to_string(),
                ];
                args.extend_from_slice(extra);
                let what = format!("{stack:?} server {name}");
                let proc = Proc::spawn(stack, Role::Server, pod, &what, &args);
                (name, addr, proc)
            })
            .collect();
        for (_, _, proc) in &servers {
            proc.wait_line("listening", Duration::from_secs(30));
        }
        Backends {
            service,
            port,
            vip: None,
            servers,
        }
    }

    /// TLS backends: a CA and a server certificate for the pods' addresses (made in `dir`), then
    /// the servers on [`TLS_PORT`]. Returns them and the CA's certificate, for the clients.
    fn start_tls(
        stack: Stack,
        lab: &Lab,
        dir: &Path,
        service: &'static str,
        pods: std::ops::Range<usize>,
    ) -> (Backends, PathBuf) {
        let ips: Vec<_> = pods.clone().map(|i| lab.pod(i).ipv4).collect();
        let (ca, cert, key) = make_certs(dir, &ips);
        let args = [
            "--tls-cert".to_string(),
            path_str(&cert),
            "--tls-key".into(),
            path_str(&key),
        ];
        let backends = Backends::start(stack, lab, service, pods, TLS_PORT, &args);
        (backends, ca)
    }

    /// Puts a ClusterIP in front of the servers: the lab node DNATs each connection to `vip` to
    /// one of them at random, as kube-proxy does.
    fn cluster_ip(mut self, lab: &Lab, vip: SocketAddr) -> Backends {
        let addrs: Vec<SocketAddr> = self.servers.iter().map(|(_, a, _)| *a).collect();
        lab.add_cluster_ip(vip, &addrs).expect("cluster ip");
        self.vip = Some(vip);
        self
    }

    /// `ipv4:VIP:P` for a ClusterIP, else `ipv4:A:P,B:P,…`: the address list a headless service
    /// resolves to, in pod order.
    fn target(&self) -> String {
        self.target_first(self.servers.len())
    }

    /// A headless service's first `n` addresses: what a client resolved before the other pods
    /// were ready.
    fn target_first(&self, n: usize) -> String {
        if let Some(vip) = self.vip {
            return format!("ipv4:{vip}");
        }
        let addrs: Vec<String> = self
            .servers
            .iter()
            .take(n)
            .map(|(_, a, _)| a.to_string())
            .collect();
        format!("ipv4:{}", addrs.join(","))
    }

    /// Stops every server; returns (name, report) in pod order.
    fn finish(self) -> Vec<(String, serde_json::Value)> {
        self.servers
            .into_iter()
            .map(|(name, _, proc)| (name, proc.finish()))
            .collect()
    }
}

/// Writes the inventory: `clients` (name, pod index) in namespace shop, and each service's
/// backend pods (labelled app=<service>) behind a headless service on their port, or behind
/// their ClusterIP.
fn inventory(lab: &Lab, dir: &Path, clients: &[(&str, usize)], services: &[&Backends]) {
    let mut y = String::from("pods:\n");
    for (name, i) in clients {
        y.push_str(&format!(
            "  - {{name: {name}, namespace: shop, ip: {}}}\n",
            lab.pod(*i).ipv4
        ));
    }
    for b in services {
        for (name, addr, _) in &b.servers {
            y.push_str(&format!(
                "  - {{name: {name}, namespace: shop, ip: {}, labels: {{app: {}}}}}\n",
                addr.ip(),
                b.service
            ));
        }
    }
    y.push_str("services:\n");
    for b in services {
        let kind = match b.vip {
            None => format!("headless: true, ports: [{{port: {}}}]", b.port),
            Some(vip) => format!(
                "cluster_ip: {}, ports: [{{port: {}, target_port: {}}}]",
                vip.ip(),
                vip.port(),
                b.port
            ),
        };
        y.push_str(&format!(
            "  - {{name: {s}, namespace: shop, {kind}, selector: {{app: {s}}}}}\n",
            s = b.service
        ));
    }
    std::fs::write(dir.join("inventory.yaml"), y).expect("inventory");
}

/// An agent on the inventory in `dir`, with a [`WINDOW`] analysis window; `conntrack_netns`: the
/// namespace whose conntrack table holds the ClusterIP NAT (the lab node's), if any.
async fn start_agent(dir: &Path, conntrack_netns: Option<PathBuf>) -> Agent {
    let path = dir.join("inventory.yaml");
    e2e::start_agent_with(|o: &mut AgentOptions| {
        o.conntrack_netns = conntrack_netns;
        o.identity = IdentitySource::Local {
            path,
            reload_every: Duration::from_secs(1),
        };
        o.analysis = AnalysisConfig {
            window: WINDOW,
            ..AnalysisConfig::default()
        };
    })
    .await
}

/// A client process of one of a service's clients.
struct Client {
    name: &'static str,
    service: &'static str,
    proc: Proc,
}

/// What a client runs: the arguments of `grpc_py/client.py` (every stack takes them).
struct ClientSpec<'a> {
    name: &'static str,
    /// `--target`; None: the whole service ([`Backends::target`]).
    target: Option<String>,
    policy: &'a str,
    pace_ms: u64,
    tls_ca: Option<&'a Path>,
    extra: &'a [&'a str],
}

impl<'a> ClientSpec<'a> {
    fn new(name: &'static str, policy: &'a str) -> Self {
        ClientSpec {
            name,
            target: None,
            policy,
            pace_ms: 40,
            tls_ca: None,
            extra: &[],
        }
    }

    fn tls(self, ca: &'a Path) -> Self {
        ClientSpec {
            tls_ca: Some(ca),
            ..self
        }
    }
}

fn client(stack: Stack, lab: &Lab, pod: usize, backends: &Backends, spec: ClientSpec) -> Client {
    let mut args = vec![
        "--target".to_string(),
        spec.target.unwrap_or_else(|| backends.target()),
        "--policy".into(),
        spec.policy.into(),
        "--pace-ms".into(),
        spec.pace_ms.to_string(),
        "--duration-s".into(),
        PROCESS_DEADLINE.as_secs().to_string(),
        "--authority".into(),
        TLS_NAME.into(),
    ];
    if let Some(ca) = spec.tls_ca {
        args.push("--tls-ca".into());
        args.push(path_str(ca));
    }
    args.extend(spec.extra.iter().map(|s| s.to_string()));
    let what = format!("{stack:?} client {}", spec.name);
    Client {
        name: spec.name,
        service: backends.service,
        proc: Proc::spawn(stack, Role::Client, lab.pod(pod), &what, &args),
    }
}

/// Starts a client per (pod, backends, spec) and waits until each has had its first call answered.
fn start_clients(
    stack: Stack,
    lab: &Lab,
    specs: Vec<(usize, &Backends, ClientSpec)>,
) -> Vec<Client> {
    let clients: Vec<Client> = specs
        .into_iter()
        .map(|(pod, backends, spec)| client(stack, lab, pod, backends, spec))
        .collect();
    for c in &clients {
        c.proc.wait_line("first ok", Duration::from_secs(30));
    }
    clients
}

fn balances(agent: &Agent, service: &str) -> Vec<serde_json::Value> {
    let path = format!("/services/shop/{service}/balance");
    let (code, body) = http::get(agent.http_addr(), &path).expect("GET balance");
    assert_eq!(code, 200, "{path}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["clients"].as_array().cloned().unwrap_or_default()
}

/// Reads the balances until every client has its expected verdict (or `timeout` passes);
/// returns the last balance of each client, by name.
fn verdicts_when(
    agent: &Agent,
    want: &[(&str, &str, Verdict)],
    timeout: Duration,
) -> BTreeMap<String, serde_json::Value> {
    let end = Instant::now() + timeout;
    loop {
        let mut got = BTreeMap::new();
        for (client, service, _) in want {
            if let Some(b) = balances(agent, service)
                .into_iter()
                .find(|b| b["client"]["name"] == *client)
            {
                got.insert(client.to_string(), b);
            }
        }
        let all = want.iter().all(|(c, _, v)| {
            got.get(*c)
                .is_some_and(|b| b["verdict"].as_str() == Some(v.as_str()))
        });
        if all || Instant::now() >= end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Waits for every client's expected verdict ([`verdicts_when`], up to 8 s), prints each
/// client's figures, and fails naming every client whose verdict differs. Returns the balances.
fn assert_verdicts(
    agent: &Agent,
    want: &[(&str, &str, Verdict)],
) -> BTreeMap<String, serde_json::Value> {
    let got = tokio::task::block_in_place(|| verdicts_when(agent, want, Duration::from_secs(8)));
    let mut wrong = Vec::new();
    for (c, _, v) in want {
        let b = got
            .get(*c)
            .unwrap_or_else(|| panic!("no balance for {c}: {got:#?}"));
        eprintln!(
            "{c}: {} source={} connected={} opens={} requests={} per_backend={}",
            b["verdict"],
            b["source"],
            b["connected"],
            b["opens"],
            b["requests"],
            b["requests_per_backend"]
        );
        if b["verdict"].as_str() != Some(v.as_str()) {
            wrong.push(format!("{c}: want {}, got {b:#}", v.as_str()));
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
    got
}

/// The connections of client pod `pod` whose requests do not come from HTTP/2 frames, with why
/// (for failure messages).
fn unparsable(agent: &Agent, pod: &str) -> String {
    let path = format!("/pods/shop/{pod}/peers?connections=1000");
    let Ok((_, body)) = http::get(agent.http_addr(), &path) else {
        return format!("GET {path} failed");
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let mut out = Vec::new();
    let mut h2 = 0;
    for p in v["peers"].as_array().into_iter().flatten() {
        for c in p["connections"].as_array().into_iter().flatten() {
            if c["requests"]["source"] == "h2" {
                h2 += 1;
            } else {
                out.push(format!("{} {}", p["peer"], c));
            }
        }
    }
    format!(
        "{h2} live connection(s) counted from frames; the others:\n{}",
        out.join("\n")
    )
}

fn scrape(agent: &Agent) -> Scrape {
    let (code, body) = http::get(agent.http_addr(), "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(&body)
}

/// Scrapes until every pod of `pods` has no live connection, as many closes as opens (at least
/// one), and `ok(scrape)` holds, or `timeout` passes; returns the last scrape either way (the
/// caller's assertions say what differs).
fn settled(
    agent: &Agent,
    pods: &[&str],
    timeout: Duration,
    ok: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let end = Instant::now() + timeout;
    loop {
        let m = scrape(agent);
        let closed = pods.iter().all(|p| {
            let pod = [("pod", *p)];
            let opened = m.sum("fanout_connections_opened_total", &pod);
            m.sum("fanout_connections_active", &pod) == 0.0
                && opened > 0.0
                && m.sum("fanout_connections_closed_total", &pod) == opened
        });
        if (closed && ok(&m)) || Instant::now() >= end {
            return m;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// fanout's requests from client pod `pod` to backend pod `backend`, from HTTP/2 frames.
fn h2_requests(m: &Scrape, pod: &str, backend: &str) -> f64 {
    // + 0.0: an empty sum is -0.0, which prints as "-0".
    m.sum(
        "fanout_requests_total",
        &[("pod", pod), ("backend_pod", backend), ("source", "h2")],
    ) + 0.0
}

/// The client's own count of successful calls per backend (from the replies).
fn per_backend(report: &serde_json::Value) -> BTreeMap<String, u64> {
    report["per_backend"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_no_failures(name: &str, report: &serde_json::Value) {
    assert_eq!(report["failed"], 0, "{name}: {report}");
    assert!(
        report["ok"].as_u64().unwrap_or(0) >= 40,
        "{name}: the client ran all along: {report}"
    );
}

per_stack!(
    h2c_and_tls:
    grpcio_h2c_and_tls_clients_get_the_verdicts_and_exact_counts,
    grpc_js_h2c_and_tls_clients_get_the_verdicts_and_exact_counts,
    tonic_h2c_and_tls_clients_get_the_verdicts_and_exact_counts
);

/// Eight clients of one stack side by side on three h2c backends (headless service `api`) and
/// three TLS backends (`secure`): round_robin, pick_first and a channel per call on each, a
/// round_robin client making server-streaming calls with keepalive PINGs every 50 ms, and a
/// round_robin client that resolved only two of `api`'s three pods (stale resolution). The
/// verdicts of the TLS clients equal those of their h2c twins; the h2c requests fanout counts per
/// (client pod, backend pod) equal what the client got from there and, summed over the clients,
/// what each server answered (unary and streaming apart).
async fn h2c_and_tls(stack: Stack) {
    let _one = SERIAL.lock().await;
    lab::require_root("the real-client tests load eBPF programs and build a lab");
    let started = Instant::now();
    // pod0..7: clients; pod8..10: api (h2c); pod11..13: secure (TLS).
    let lab = Lab::new(14).expect("lab");
    let scratch = Scratch::new(&lab);
    let dir = scratch.0.clone();
    let api = Backends::start(stack, &lab, "api", 8..11, H2C_PORT, &[]);
    let (secure, ca) = Backends::start_tls(stack, &lab, &dir, "secure", 11..14);
    let names = [
        ("rr", 0),
        ("pf", 1),
        ("dial", 2),
        ("stream", 3),
        ("stale", 4),
        ("rr-tls", 5),
        ("pf-tls", 6),
        ("dial-tls", 7),
    ];
    inventory(&lab, &dir, &names, &[&api, &secure]);
    let agent = start_agent(&dir, None).await;

    // Keepalive every 50 ms: gRPC sends a keepalive PING only after that long without reading,
    // so the gaps between the streaming calls (120 ms) carry one or two each.
    let ka = ["--stream", "--keepalive-ms", "50"];
    let stream = ClientSpec {
        pace_ms: 120,
        extra: &ka,
        ..ClientSpec::new("stream", "round_robin")
    };
    let stale = ClientSpec {
        target: Some(api.target_first(2)),
        ..ClientSpec::new("stale", "round_robin")
    };
    let clients = start_clients(
        stack,
        &lab,
        vec![
            (0, &api, ClientSpec::new("rr", "round_robin")),
            (1, &api, ClientSpec::new("pf", "pick_first")),
            (2, &api, ClientSpec::new("dial", "per_call")),
            (3, &api, stream),
            (4, &api, stale),
            (
                5,
                &secure,
                ClientSpec::new("rr-tls", "round_robin").tls(&ca),
            ),
            (6, &secure, ClientSpec::new("pf-tls", "pick_first").tls(&ca)),
            (7, &secure, ClientSpec::new("dial-tls", "per_call").tls(&ca)),
        ],
    );

    // More than a whole window of traffic, then every verdict (read again while it settles).
    tokio::time::sleep(WINDOW + Duration::from_millis(2000)).await;
    let want = [
        ("rr", "api", Verdict::RoundRobin),
        ("pf", "api", Verdict::PickFirst),
        ("dial", "api", Verdict::DialPerRequest),
        ("stream", "api", Verdict::RoundRobin),
        ("stale", "api", Verdict::StaleResolver),
        ("rr-tls", "secure", Verdict::RoundRobin),
        ("pf-tls", "secure", Verdict::PickFirst),
        ("dial-tls", "secure", Verdict::DialPerRequest),
    ];
    let got = assert_verdicts(&agent, &want);
    for c in ["rr", "pf", "dial", "stream", "stale"] {
        assert_eq!(got[c]["source"], "h2", "{c}: h2c is counted from frames");
    }
    for c in ["rr-tls", "pf-tls", "dial-tls"] {
        assert_eq!(
            got[c]["source"], "messages",
            "{c}: TLS falls back to messages"
        );
    }
    for c in ["rr", "stream", "rr-tls"] {
        assert_eq!(got[c]["connected"], 3, "{c}: {:#}", got[c]);
        assert_eq!(got[c]["ports_stable"], true, "{c}: {:#}", got[c]);
    }
    for c in ["pf", "pf-tls"] {
        assert_eq!(got[c]["connected"], 1, "{c}: {:#}", got[c]);
    }
    assert_eq!(got["stale"]["connected"], 2, "stale: {:#}", got["stale"]);

    // Stop the clients (they close their channels), then the servers.
    let reports: Vec<(&str, &str, serde_json::Value)> = clients
        .into_iter()
        .map(|c| (c.name, c.service, c.proc.finish()))
        .collect();
    for (name, _, r) in &reports {
        eprintln!("client {name}: {r}");
        assert_no_failures(name, r);
    }
    let pings = &reports
        .iter()
        .find(|(c, _, _)| *c == "stream")
        .expect("stream")
        .2["keepalive_acks"];
    assert!(
        pings.as_u64().unwrap_or(0) >= 10,
        "the streaming client's connections carried keepalive PINGs: {pings}"
    );
    let report = |n: &str| -> &serde_json::Value {
        &reports
            .iter()
            .find(|(c, _, _)| *c == n)
            .expect("a client")
            .2
    };
    let api_served = api.finish();
    let secure_served = secure.finish();
    for (name, r) in api_served.iter().chain(&secure_served) {
        eprintln!("server {name}: {r}");
    }

    // Every h2c request, exactly: per client and backend pod as the client saw it, and per
    // server as it answered (pick_first, round_robin and per-call clients call the unary method,
    // the streaming client the streaming one).
    let h2c = ["rr", "pf", "dial", "stream", "stale"];
    let m = tokio::task::block_in_place(|| {
        settled(
            &agent,
            &names.map(|(n, _)| n),
            Duration::from_secs(15),
            |m| {
                h2c.iter().all(|c| {
                    m.sum("fanout_requests_total", &[("pod", *c), ("source", "h2")])
                        == report(c)["ok"].as_f64().unwrap_or(-1.0)
                })
            },
        )
    });
    let mut table = Vec::new();
    let mut mismatches = Vec::new();
    for (server, served) in &api_served {
        let mut unary_fanout = 0.0;
        for c in h2c {
            let fanout = h2_requests(&m, c, server);
            let client_saw = per_backend(report(c)).get(server).copied().unwrap_or(0);
            table.push(format!(
                "{c} → {server}: fanout {fanout}, client {client_saw}"
            ));
            if fanout != client_saw as f64 {
                mismatches.push(format!(
                    "{c} → {server}: fanout {fanout} vs client {client_saw}"
                ));
            }
            if c != "stream" {
                unary_fanout += fanout;
            }
        }
        let stream_fanout = h2_requests(&m, "stream", server);
        table.push(format!(
            "{server}: answered unary {} streams {}; fanout unary {unary_fanout} streams \
             {stream_fanout}",
            served["unary"], served["streams"]
        ));
        if Some(unary_fanout) != served["unary"].as_f64()
            || Some(stream_fanout) != served["streams"].as_f64()
        {
            mismatches.push(format!(
                "{server}: {served} vs fanout unary {unary_fanout}, streams {stream_fanout}"
            ));
        }
    }
    eprintln!("h2c counts:\n  {}", table.join("\n  "));
    assert!(
        mismatches.is_empty(),
        "fanout's h2c counts differ:\n{}\n{m:#?}",
        mismatches.join("\n")
    );
    for c in h2c {
        let pod = [("pod", c), ("source", "messages")];
        assert_eq!(
            m.sum("fanout_requests_total", &pod),
            0.0,
            "{c}: h2c never falls back to messages"
        );
    }
    // A channel per call is a connection per call.
    let dial_opens = m.sum("fanout_connections_opened_total", &[("pod", "dial")]);
    assert_eq!(
        Some(dial_opens),
        report("dial")["channels"].as_f64(),
        "one connection per channel"
    );
    // TLS: counted from messages, never from frames, and every backend's calls land somewhere.
    for c in ["rr-tls", "pf-tls", "dial-tls"] {
        assert_eq!(
            m.sum("fanout_requests_total", &[("pod", c), ("source", "h2")]),
            0.0,
            "{c}"
        );
        assert!(
            m.sum(
                "fanout_requests_total",
                &[("pod", c), ("source", "messages")]
            ) > 0.0,
            "{c}"
        );
    }
    let tls_answered: u64 = secure_served
        .iter()
        .map(|(_, r)| r["answered"].as_u64().unwrap_or(0))
        .sum();
    let tls_ok: u64 = ["rr-tls", "pf-tls", "dial-tls"]
        .iter()
        .map(|c| report(c)["ok"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(tls_answered, tls_ok, "the TLS servers answered every call");
    eprintln!(
        "dial opens {dial_opens}; TLS messages: {}",
        ["rr-tls", "pf-tls", "dial-tls"]
            .iter()
            .map(|c| format!(
                "{c} {} (calls {})",
                m.sum(
                    "fanout_requests_total",
                    &[("pod", *c), ("source", "messages")]
                ),
                report(c)["ok"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );

    agent.shutdown().await.expect("shutdown");
    eprintln!("test took {:?}", started.elapsed());
}

per_stack!(
    max_connection_age:
    grpcio_max_connection_age_is_round_robin_with_exact_counts,
    grpc_js_max_connection_age_is_round_robin_with_exact_counts,
    tonic_max_connection_age_is_round_robin_with_exact_counts
);

/// Servers with MaxConnectionAge 2.5 s (grace 1 s) make a round_robin client reconnect every few
/// seconds: still round_robin, not dial_per_request, and every h2c request counted once, on the
/// backend that answered it, across the GOAWAYs.
async fn max_connection_age(stack: Stack) {
    let _one = SERIAL.lock().await;
    lab::require_root("the real-client tests load eBPF programs and build a lab");
    let started = Instant::now();
    let lab = Lab::new(4).expect("lab");
    let scratch = Scratch::new(&lab);
    let dir = scratch.0.clone();
    let age = ["--max-connection-age-ms".to_string(), "2500".into()];
    let api = Backends::start(stack, &lab, "api", 1..4, H2C_PORT, &age);
    inventory(&lab, &dir, &[("rr", 0)], &[&api]);
    let agent = start_agent(&dir, None).await;
    let mut clients = start_clients(
        stack,
        &lab,
        vec![(0, &api, ClientSpec::new("rr", "round_robin"))],
    );
    let c = clients.remove(0);

    tokio::time::sleep(WINDOW + Duration::from_millis(3000)).await;
    let want = [("rr", "api", Verdict::RoundRobin)];
    let got = assert_verdicts(&agent, &want);
    let b = &got["rr"];
    assert_eq!(b["source"], "h2", "{b:#}");
    assert!(
        b["opens"].as_u64().unwrap_or(0) >= 3,
        "the servers rotated the connections: {b:#}"
    );

    let r = c.proc.finish();
    eprintln!("client: {r}");
    assert_no_failures("rr", &r);
    let served = api.finish();
    // A stream a server refuses unprocessed after the client sent it (above the final GOAWAY's
    // last stream id, or REFUSED_STREAM) and that the client sends again is counted on both
    // backends: fanout counts requests sent. grpc-js retries such a call transparently and
    // the tonic client does the same by hand; both report `retried_maybe_sent`, the retried
    // attempts that may have been on the wire (h2 reports a refused stream like one it never
    // opened after the GOAWAY). grpcio's servers drain with a PING between two GOAWAYs, which
    // leaves no stream to refuse, and grpcio reports none.
    let maybe_sent = r["retried_maybe_sent"].as_f64().unwrap_or(0.0);
    let ok = r["ok"].as_f64().unwrap_or(-1.0);
    let m = tokio::task::block_in_place(|| {
        settled(&agent, &["rr"], Duration::from_secs(15), |m| {
            let counted = m.sum("fanout_requests_total", &[("pod", "rr"), ("source", "h2")]);
            counted >= ok && counted <= ok + maybe_sent
        })
    });
    let opens = m.sum("fanout_connections_opened_total", &[("pod", "rr")]);
    let mut table = Vec::new();
    let mut mismatches = Vec::new();
    let client_saw = per_backend(&r);
    let mut sent_unanswered = 0.0;
    for (server, s) in &served {
        let fanout = h2_requests(&m, "rr", server);
        let answered = s["answered"].as_f64().unwrap_or(-1.0);
        let line = format!(
            "{server}: answered {answered}, client {}, fanout {fanout}",
            client_saw.get(server).copied().unwrap_or(0)
        );
        // Exact but for refused streams, which only add (the client does not know which
        // backend refused one: their sum is bounded below).
        if fanout < answered || answered != client_saw.get(server).copied().unwrap_or(0) as f64 {
            mismatches.push(line.clone());
        }
        sent_unanswered += fanout - answered;
        table.push(line);
    }
    eprintln!(
        "max connection age: opens {opens}, retries that may have been sent {maybe_sent}\n  {}",
        table.join("\n  ")
    );
    if sent_unanswered > maybe_sent {
        mismatches.push(format!(
            "fanout counted {sent_unanswered} requests more than the servers answered; the \
             client retried {maybe_sent} that may have been sent"
        ));
    }
    assert!(opens >= 6.0, "the connections rotated: {opens}");
    assert!(
        mismatches.is_empty(),
        "fanout's h2c counts differ across GOAWAYs:\n{}",
        mismatches.join("\n")
    );
    agent.shutdown().await.expect("shutdown");
    eprintln!("test took {:?}", started.elapsed());
}

per_stack!(
    through_a_cluster_ip:
    grpcio_through_a_cluster_ip,
    grpc_js_through_a_cluster_ip,
    tonic_through_a_cluster_ip
);

/// Clients through ClusterIPs: the node picks a backend per connection. A round_robin channel to
/// a ClusterIP holds one connection, so it is pick_first in effect (the mistake fanout exists to
/// show); a channel per call through it is dial_per_request, h2c and TLS alike. Opens per backend
/// pod (found through the node's conntrack table) equal the calls each server answered (a
/// connection per call), and every h2c request of both h2c clients is counted from HTTP/2
/// frames, exactly, per backend pod.
async fn through_a_cluster_ip(stack: Stack) {
    let _one = SERIAL.lock().await;
    lab::require_root("the real-client tests load eBPF programs and build a lab");
    let started = Instant::now();
    // pod0..2: clients; pod3..5: api (h2c); pod6..8: secure (TLS).
    let lab = Lab::new(9).expect("lab");
    let scratch = Scratch::new(&lab);
    let dir = scratch.0.clone();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let tls_vip: SocketAddr = "10.96.0.11:443".parse().expect("vip");
    let api = Backends::start(stack, &lab, "api", 3..6, H2C_PORT, &[]).cluster_ip(&lab, vip);
    let (secure, ca) = Backends::start_tls(stack, &lab, &dir, "secure", 6..9);
    let secure = secure.cluster_ip(&lab, tls_vip);
    let names = [("vip-rr", 0), ("vip-dial", 1), ("vip-dial-tls", 2)];
    inventory(&lab, &dir, &names, &[&api, &secure]);
    let agent = start_agent(&dir, Some(lab.node_netns_path())).await;
    let clients = start_clients(
        stack,
        &lab,
        vec![
            (0, &api, ClientSpec::new("vip-rr", "round_robin")),
            (1, &api, ClientSpec::new("vip-dial", "per_call")),
            (
                2,
                &secure,
                ClientSpec::new("vip-dial-tls", "per_call").tls(&ca),
            ),
        ],
    );
    tokio::time::sleep(WINDOW + Duration::from_millis(2000)).await;
    let want = [
        ("vip-rr", "api", Verdict::PickFirst),
        ("vip-dial", "api", Verdict::DialPerRequest),
        ("vip-dial-tls", "secure", Verdict::DialPerRequest),
    ];
    let got = assert_verdicts(&agent, &want);
    assert_eq!(
        got["vip-rr"]["connected"], 1,
        "one connection through the VIP"
    );
    // Checked after the counts are printed: a wrong source explains wrong counts.
    let vip_dial_source = got["vip-dial"]["source"].clone();
    let vip_dial_why = unparsable(&agent, "vip-dial");
    assert_eq!(got["vip-dial-tls"]["source"], "messages");
    for c in ["vip-dial", "vip-dial-tls"] {
        assert_eq!(
            got[c]["connected"], 3,
            "the node spread the connections: {:#}",
            got[c]
        );
    }

    let reports: Vec<(&str, serde_json::Value)> = clients
        .into_iter()
        .map(|c| (c.name, c.proc.finish()))
        .collect();
    for (name, r) in &reports {
        eprintln!("client {name}: {r}");
        assert_no_failures(name, r);
    }
    let api_served = api.finish();
    let tls_served = secure.finish();
    let m = tokio::task::block_in_place(|| {
        settled(
            &agent,
            &names.map(|(n, _)| n),
            Duration::from_secs(15),
            |m| {
                let (rr, dial) = (&reports[0].1, &reports[1].1);
                m.sum(
                    "fanout_requests_total",
                    &[("pod", "vip-rr"), ("source", "h2")],
                ) == rr["ok"].as_f64().unwrap_or(-1.0)
                    && m.sum("fanout_connections_opened_total", &[("pod", "vip-dial")])
                        == dial["channels"].as_f64().unwrap_or(-1.0)
                    && m.sum(
                        "fanout_requests_total",
                        &[("pod", "vip-dial"), ("source", "h2")],
                    ) == dial["ok"].as_f64().unwrap_or(-1.0)
            },
        )
    });
    let mut table = Vec::new();
    let mut mismatches = Vec::new();
    for (server, served) in &api_served {
        let mut total = 0.0;
        let dial_saw = per_backend(&reports[1].1).get(server).copied().unwrap_or(0);
        let dial_opens = m.sum(
            "fanout_connections_opened_total",
            &[("pod", "vip-dial"), ("backend_pod", server.as_str())],
        );
        table.push(format!(
            "vip-dial → {server}: fanout opens {dial_opens}, client calls {dial_saw}"
        ));
        if dial_opens != dial_saw as f64 {
            mismatches.push(format!(
                "vip-dial → {server}: {dial_opens} opens vs {dial_saw} calls (a channel each)"
            ));
        }
        for (c, r) in &reports[..2] {
            let fanout = h2_requests(&m, c, server);
            let saw = per_backend(r).get(server).copied().unwrap_or(0);
            table.push(format!("{c} → {server}: fanout {fanout}, client {saw}"));
            if fanout != saw as f64 {
                mismatches.push(format!("{c} → {server}: fanout {fanout} vs client {saw}"));
            }
            total += fanout;
        }
        table.push(format!(
            "{server}: answered {}, fanout {total}",
            served["answered"]
        ));
        if Some(total) != served["answered"].as_f64() {
            mismatches.push(format!("{server}: answered {served} vs fanout {total}"));
        }
    }
    eprintln!(
        "h2c counts through the ClusterIP:\n  {}",
        table.join("\n  ")
    );
    for s in m
        .samples
        .iter()
        .filter(|s| s.name == "fanout_requests_total" && s.label("pod") == Some("vip-dial"))
    {
        eprintln!("  {:?} {}", s.labels, s.value);
    }
    assert_eq!(
        vip_dial_source, "h2",
        "h2c through a ClusterIP is counted from frames: {vip_dial_why}"
    );
    assert!(
        mismatches.is_empty(),
        "fanout's h2c counts differ:\n{}",
        mismatches.join("\n")
    );
    // TLS through the VIP: every connection lands on a backend pod, none unknown.
    for (server, served) in &tls_served {
        let opens = m.sum(
            "fanout_connections_opened_total",
            &[("pod", "vip-dial-tls"), ("backend_pod", server.as_str())],
        );
        eprintln!("{server}: answered {served}, fanout opens {opens}");
        assert!(opens > 0.0, "{server}");
    }
    assert!(
        m.samples
            .iter()
            .all(|s| s.label("backend_pod") != Some("_unknown")),
        "every connection was resolved to its backend pod"
    );
    agent.shutdown().await.expect("shutdown");
    eprintln!("test took {:?}", started.elapsed());
}
