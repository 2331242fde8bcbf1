//! `fanout verify` end to end, without root: the real binary against a scripted agent on
//! 127.0.0.1 that serves `GET /services/{ns}/{name}/balance`. The answers are the JSON of real
//! `fanout::analysis::Balance` figures, computed by the real analyzer from synthetic connections,
//! so the schema and the verdicts are the agent's own. The first GET and the later ones get
//! different answers (the start and the end of the verify window).

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use fanout::{
    analysis::{AnalysisConfig, Analyzer, ConnId, ConnOpen, Counters, Nanos, RequestSource},
    exposition::api::ServiceBalanceView,
    identity::model::ObjectRef,
};
use serde_json::{Value, json};

const S: Nanos = 1_000_000_000;
const MS: Nanos = 1_000_000;
/// Any run of the binary longer than this fails the test (the window is 1 s).
const RUN_LIMIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Figures from the real analyzer

fn pod(name: &str) -> ObjectRef {
    ObjectRef::new("shop", name)
}

fn service() -> ObjectRef {
    ObjectRef::new("shop", "api")
}

/// Drives an analyzer with synthetic connections of clients of shop/api.
struct Sim {
    a: Analyzer,
    next_id: u64,
}

/// A live connection: its id and cumulative requests.
struct Conn {
    id: ConnId,
    requests: u64,
}

impl Sim {
    /// shop/api with `ready` ready backends api-1..api-N since `at`.
    fn new(ready: usize, at: Nanos) -> Self {
        let mut a = Analyzer::new(AnalysisConfig::default()).expect("analyzer");
        a.set_ready_backends(
            &service(),
            (1..=ready).map(|i| pod(&format!("api-{i}"))),
            at,
        );
        Sim { a, next_id: 1 }
    }

    fn open(&mut self, client: &str, backend: &str, port: u16, at: Nanos) -> Conn {
        let id = ConnId(self.next_id);
        self.next_id += 1;
        assert!(self.a.on_open(ConnOpen {
            id,
            client: pod(client),
            service: service(),
            backend: Some(pod(backend)),
            local_port: port,
            at,
            recovered: false,
        }));
        Conn { id, requests: 0 }
    }

    fn send(&mut self, c: &mut Conn, requests: u64, at: Nanos) {
        c.requests += requests;
        let counters = Counters {
            bytes_sent: c.requests * 100,
            bytes_received: c.requests * 200,
            messages_sent: c.requests,
            messages_received: c.requests,
            requests: c.requests,
            source: RequestSource::H2,
        };
        assert!(self.a.on_sample(c.id, at, &counters));
    }

    fn close(&mut self, c: Conn, at: Nanos, lifetime: Duration) {
        assert!(self.a.on_close(c.id, at, Some(lifetime)));
    }

    /// The agent's answer at `now`.
    fn answer(&self, now: Nanos) -> Value {
        let view = ServiceBalanceView {
            service: service(),
            clients: self
                .a
                .evaluate(now)
                .into_iter()
                .filter(|b| b.service == service())
                .collect(),
        };
        serde_json::to_value(view).expect("json")
    }
}

const T0: Nanos = 1000 * S;

/// The start and end answers of one scenario.
type Answers = (Value, Value);

/// A client holding one long-lived connection to each of `backends` (local ports from `port`),
/// sending `per_second` requests on each every second.
struct Steady<'a> {
    client: &'a str,
    backends: &'a [&'a str],
    port: u16,
    per_second: u64,
}

fn round_robin(client: &str, port: u16) -> Steady<'_> {
    Steady {
        client,
        backends: &["api-1", "api-2", "api-3"],
        port,
        per_second: 5,
    }
}

fn pick_first(client: &str, port: u16) -> Steady<'_> {
    Steady {
        client,
        backends: &["api-1"],
        port,
        per_second: 15,
    }
}

/// `ready` ready backends; the clients connect at T0 and send every second; the answers are taken
/// at T0 + 40 s and T0 + 41 s (more than the agent's 30 s window after T0).
fn steady(ready: usize, clients: &[Steady]) -> Answers {
    let mut sim = Sim::new(ready, T0);
    let mut conns = Vec::new();
    for c in clients {
        for (b, port) in c.backends.iter().zip(c.port..) {
            conns.push((sim.open(c.client, b, port, T0), c.per_second));
        }
    }
    let mut start = Value::Null;
    for s in 1..=41 {
        for (c, n) in &mut conns {
            sim.send(c, *n, T0 + s * S);
        }
        if s == 40 {
            start = sim.answer(T0 + 40 * S);
        }
    }
    (start, sim.answer(T0 + 41 * S))
}

/// A client that dials per call: every 100 ms a connection opens on a new port, carries one
/// request and closes after 20 ms. The answers are taken while one is live, so each shows one
/// local port, a different one at the start and at the end.
fn dial_per_request() -> Answers {
    let mut sim = Sim::new(3, T0);
    let mut start = Value::Null;
    let mut end = Value::Null;
    for n in 0..=410u64 {
        let at = T0 + n * 100 * MS;
        let backend = format!("api-{}", n % 3 + 1);
        let port = 50000 + u16::try_from(n).expect("small");
        let mut c = sim.open("frontend", &backend, port, at);
        sim.send(&mut c, 1, at + 10 * MS);
        if n == 400 {
            start = sim.answer(at + 15 * MS);
        }
        if n == 410 {
            end = sim.answer(at + 15 * MS);
        }
        sim.close(c, at + 20 * MS, Duration::from_millis(20));
    }
    (start, end)
}

/// Four ready backends; the client holds connections to api-1 and api-2 only.
fn stale_resolver() -> Answers {
    steady(
        4,
        &[Steady {
            client: "frontend",
            backends: &["api-1", "api-2"],
            port: 40001,
            per_second: 10,
        }],
    )
}

/// Three requests in the whole window.
fn insufficient_data() -> Answers {
    let mut sim = Sim::new(3, T0);
    let mut c = sim.open("frontend", "api-1", 40001, T0);
    sim.send(&mut c, 3, T0 + 35 * S);
    (sim.answer(T0 + 40 * S), sim.answer(T0 + 41 * S))
}

// ---------------------------------------------------------------------------------------------
// The scripted agent

struct Script {
    /// The answer to the first GET for shop/api.
    start: Value,
    /// The answer to every later GET.
    end: Value,
    gets: AtomicUsize,
}

async fn balance(
    State(script): State<Arc<Script>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    if (namespace.as_str(), name.as_str()) != ("shop", "api") {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("unknown service {namespace}/{name}")})),
        )
            .into_response();
    }
    let n = script.gets.fetch_add(1, Ordering::SeqCst);
    Json(if n == 0 {
        script.start.clone()
    } else {
        script.end.clone()
    })
    .into_response()
}

/// The scripted agent, serving until dropped.
struct Agent {
    endpoint: String,
    script: Arc<Script>,
    _rt: tokio::runtime::Runtime,
}

impl Agent {
    fn start((start, end): Answers) -> Self {
        let script = Arc::new(Script {
            start,
            end,
            gets: AtomicUsize::new(0),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let app = Router::new()
            .route("/services/{namespace}/{name}/balance", get(balance))
            .with_state(script.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(listener, app).await;
        });
        Agent {
            endpoint: format!("http://127.0.0.1:{port}"),
            script,
            _rt: rt,
        }
    }

    fn gets(&self) -> usize {
        self.script.gets.load(Ordering::SeqCst)
    }
}

/// An agent on a raw socket answering every GET with `body` in chunked transfer encoding, in
/// small chunks written separately.
fn chunked_agent(body: String) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for _ in 0..2 {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            );
            for chunk in body.as_bytes().chunks(700) {
                let _ = s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes());
                let _ = s.write_all(chunk);
                let _ = s.write_all(b"\r\n");
                let _ = s.flush();
            }
            let _ = s.write_all(b"0\r\n\r\n");
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// A port on 127.0.0.1 with nothing listening.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

// ---------------------------------------------------------------------------------------------
// Running the binary

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `fanout verify ARGS`, killed and failed if it runs longer than [`RUN_LIMIT`].
fn verify(args: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("verify")
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fanout");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + RUN_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("fanout verify {args:?} ran longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run = Run {
        code: status.code().expect("exited, not killed"),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    };
    eprintln!(
        "--- fanout verify {args:?} -> {}\n--- stdout\n{}--- stderr\n{}",
        run.code, run.stdout, run.stderr
    );
    run
}

fn verify_api(agent_endpoint: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        "--service",
        "shop/api",
        "--window",
        "1s",
        "--endpoint",
        agent_endpoint,
    ];
    args.extend_from_slice(extra);
    verify(&args)
}

/// The FAIL line of `client`.
fn fail_line<'a>(run: &'a Run, client: &str) -> &'a str {
    let prefix = format!("FAIL {client} does not balance");
    run.stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{}", run.stdout))
}

/// The table row of `client`.
fn row<'a>(run: &'a Run, client: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(client))
        .unwrap_or_else(|| panic!("no row for {client} in:\n{}", run.stdout))
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn round_robin_with_stable_ports_passes() {
    let agent = Agent::start(steady(3, &[round_robin("frontend", 40001)]));
    let run = verify_api(&agent.endpoint, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let header = run.stdout.lines().next().expect("header");
    for col in [
        "CLIENT",
        "READY",
        "CONNECTED",
        "COVERAGE",
        "REQUESTS",
        "SKEW",
        "PORTS REUSED",
        "VERDICT",
        "RESULT",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let cells: Vec<&str> = row(&run, "shop/frontend").split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "shop/frontend",
            "3",
            "3",
            "100%",
            "450",
            "1.00",
            "3/3",
            "round_robin",
            "PASS"
        ]
    );
    assert!(
        run.stdout
            .contains("PASS shop/api: all 1 client(s) balance: every ready backend connected, the same connections over 1.0 s, skew at most 1.5"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("FAIL"), "{}", run.stdout);
    assert_eq!(agent.gets(), 2, "one GET at each end of the window");
}

#[test]
fn pick_first_fails_naming_the_pinned_and_unconnected_backends() {
    let agent = Agent::start(steady(3, &[pick_first("frontend", 40001)]));
    let run = verify_api(&agent.endpoint, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let cells: Vec<&str> = row(&run, "shop/frontend").split_whitespace().collect();
    assert_eq!(
        cells[1..],
        ["3", "1", "33%", "450", "3.00", "1/1", "pick_first", "FAIL"]
    );
    let line = fail_line(&run, "shop/frontend");
    assert!(
        line.contains("(pick_first: one backend (api-1) took 100%"),
        "{line}"
    );
    assert!(
        line.contains(
            "coverage failed: 1 of 3 ready backends connected (coverage 33%); ready but never \
             connected: api-2 (for 41 s), api-3 (for 41 s)"
        ),
        "{line}"
    );
    assert!(line.contains("distribution failed: verdict pick_first; skew 3.00 over 450 requests (api-1 450, api-2 0, api-3 0)"), "{line}");
    assert!(
        !line.contains("reuse failed"),
        "its one connection is reused: {line}"
    );
    assert!(
        run.stdout
            .contains("FAIL shop/api: 1 of 1 client(s) do not balance")
    );
}

#[test]
fn dial_per_request_fails_reuse() {
    let agent = Agent::start(dial_per_request());
    let run = verify_api(&agent.endpoint, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let cells: Vec<&str> = row(&run, "shop/frontend").split_whitespace().collect();
    assert_eq!(cells[6..], ["0/1", "dial_per_request", "FAIL"]);
    let line = fail_line(&run, "shop/frontend");
    assert!(line.contains("(dial_per_request: "), "{line}");
    assert!(
        line.contains(
            "reuse failed: only 0 of 1 local port(s) live at the start were still live at the end \
             (start [50400], end [50410]): the client reconnected"
        ),
        "{line}"
    );
    assert!(line.contains("(1.00 per request)"), "{line}");
    assert!(
        !line.contains("coverage failed"),
        "kube-proxy spreads the dials: {line}"
    );
}

#[test]
fn stale_resolver_fails_coverage_naming_the_never_connected() {
    let agent = Agent::start(stale_resolver());
    let run = verify_api(&agent.endpoint, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let line = fail_line(&run, "shop/frontend");
    assert!(
        line.contains("(stale_resolver: 2 of 4 ready backends (api-3, api-4)"),
        "{line}"
    );
    assert!(
        line.contains(
            "coverage failed: 2 of 4 ready backends connected (coverage 50%); ready but never \
             connected: api-3 (for 41 s), api-4 (for 41 s)"
        ),
        "{line}"
    );
    assert!(!line.contains("reuse failed"), "{line}");
}

#[test]
fn insufficient_data_is_not_a_pass() {
    let agent = Agent::start(insufficient_data());
    let run = verify_api(&agent.endpoint, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let line = fail_line(&run, "shop/frontend");
    assert!(
        line.contains("(insufficient_data: only 3 request(s)"),
        "{line}"
    );
    assert!(
        line.contains("distribution failed: insufficient data: too little evidence"),
        "{line}"
    );
}

#[test]
fn json_report_parses_and_matches() {
    let agent = Agent::start(steady(
        3,
        &[round_robin("good", 40001), pick_first("pinned", 41001)],
    ));
    let run = verify_api(&agent.endpoint, &["--json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).expect("stdout is one JSON object");
    assert_eq!(v["service"], "shop/api");
    assert_eq!(v["window_seconds"], 1.0);
    assert_eq!(v["balanced"], false);
    let clients = v["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 2);
    let good = &clients[0];
    assert_eq!(good["client"], "shop/good");
    assert_eq!(good["pass"], true);
    assert_eq!(good["verdict"], "round_robin");
    for check in ["coverage", "reuse", "distribution"] {
        assert_eq!(good["checks"][check]["pass"], true, "{check}");
        assert!(good["checks"][check]["detail"].is_string());
    }
    let pinned = &clients[1];
    assert_eq!(pinned["client"], "shop/pinned");
    assert_eq!(pinned["pass"], false);
    assert_eq!(pinned["verdict"], "pick_first");
    assert!(
        pinned["reason"]
            .as_str()
            .is_some_and(|r| r.contains("api-1"))
    );
    assert_eq!(pinned["checks"]["coverage"]["pass"], false);
    assert_eq!(pinned["checks"]["reuse"]["pass"], true);
    assert_eq!(pinned["checks"]["distribution"]["pass"], false);
    assert_eq!(
        pinned["figures"]["not_connected"],
        json!(["api-2", "api-3"])
    );

    // Only the good client: balanced.
    let agent = Agent::start(steady(
        3,
        &[round_robin("good", 40001), pick_first("pinned", 41001)],
    ));
    let run = verify_api(&agent.endpoint, &["--json", "--client", "shop/good"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let v: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(v["balanced"], true);
    assert_eq!(v["clients"].as_array().map(Vec::len), Some(1));
}

#[test]
fn client_filter() {
    let answers = steady(
        3,
        &[round_robin("good", 40001), pick_first("pinned", 41001)],
    );
    let agent = Agent::start(answers.clone());
    let run = verify_api(&agent.endpoint, &["--client", "shop/good"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stdout.contains("shop/pinned"), "{}", run.stdout);

    let agent = Agent::start(answers.clone());
    let run = verify_api(&agent.endpoint, &["--client", "shop/pinned"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    fail_line(&run, "shop/pinned");
    assert!(!run.stdout.contains("shop/good"), "{}", run.stdout);

    // A client the agent saw no traffic from: nothing proves it balances.
    let agent = Agent::start(answers);
    let run = verify_api(&agent.endpoint, &["--client", "shop/nobody"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("FAIL no traffic from shop/nobody to shop/api seen by the agent"),
        "{}",
        run.stdout
    );
}

#[test]
fn no_client_at_all_fails() {
    let empty = json!({"service": service(), "clients": []});
    let agent = Agent::start((empty.clone(), empty.clone()));
    let run = verify_api(&agent.endpoint, &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stdout.contains("no client traffic to shop/api seen"),
        "{}",
        run.stdout
    );
    let agent = Agent::start((empty.clone(), empty));
    let run = verify_api(&agent.endpoint, &["--json"]);
    assert_eq!(run.code, 1);
    let v: Value = serde_json::from_str(&run.stdout).expect("json");
    assert_eq!(v["balanced"], false);
    assert_eq!(v["clients"], json!([]));
    assert_eq!(v["message"], "no client traffic to shop/api seen");
}

#[test]
fn an_answer_missing_a_field_is_an_error() {
    // Without `service`, or with a client's `skew` renamed: not "no clients", not "no skew".
    let (start, mut end) = steady(3, &[round_robin("frontend", 40001)]);
    let skew = end["clients"][0]
        .as_object_mut()
        .expect("client")
        .remove("skew")
        .expect("skew");
    end["clients"][0]["skew_ratio"] = skew;
    for (answers, missing) in [
        ((json!({"clients": []}), json!({"clients": []})), "service"),
        ((start, end), "skew"),
    ] {
        let agent = Agent::start(answers);
        let run = verify_api(&agent.endpoint, &[]);
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stdout.is_empty(), "{}", run.stdout);
        assert!(
            run.stderr.contains(&format!(
                "answered {}/services/shop/api/balance with unexpected JSON: missing field `{missing}`",
                agent.endpoint
            )),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn chunked_answers_are_read() {
    let (start, _) = steady(3, &[round_robin("frontend", 40001)]);
    let endpoint = chunked_agent(start.to_string());
    let run = verify_api(&endpoint, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        row(&run, "shop/frontend").ends_with("PASS"),
        "{}",
        run.stdout
    );
}

#[test]
fn unreachable_agent_is_an_error() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let run = verify(&[
        "--service",
        "shop/api",
        "--window",
        "60s",
        "--endpoint",
        &endpoint,
    ]);
    assert_eq!(run.code, 2);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&endpoint),
        "names the endpoint: {}",
        run.stderr
    );
    assert!(run.stderr.contains("refused"), "{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "fails at the first GET, without waiting the window"
    );
}

#[test]
fn unknown_service_is_an_error() {
    let agent = Agent::start(steady(3, &[round_robin("frontend", 40001)]));
    let run = verify(&[
        "--service",
        "shop/nope",
        "--window",
        "1s",
        "--endpoint",
        &agent.endpoint,
    ]);
    assert_eq!(run.code, 2);
    assert!(run.stdout.is_empty(), "{}", run.stdout);
    assert!(
        run.stderr.contains(&format!(
            "the agent at {} answered 404 Not Found for {}/services/shop/nope/balance: unknown \
             service shop/nope",
            agent.endpoint, agent.endpoint
        )),
        "{}",
        run.stderr
    );
}

#[test]
fn bad_arguments_are_errors() {
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    for (args, expect) in [
        (
            vec!["--service", "api", "--endpoint", endpoint.as_str()],
            "--service \"api\" has no namespace: expected NAMESPACE/NAME",
        ),
        (
            vec!["--service", "shop/api/x", "--endpoint", endpoint.as_str()],
            "--service \"shop/api/x\" has more than one '/'",
        ),
        (
            vec![
                "--service",
                "shop/api",
                "--client",
                "frontend",
                "--endpoint",
                endpoint.as_str(),
            ],
            "--client \"frontend\" has no namespace",
        ),
        (
            vec![
                "--service",
                "shop/api",
                "--endpoint",
                "https://127.0.0.1:9990",
            ],
            "only plain http is supported",
        ),
        (
            vec!["--service", "shop/api", "--endpoint", "127.0.0.1:9990"],
            "has no scheme: expected http://HOST:PORT",
        ),
        (
            vec!["--service", "shop/api", "--window", "0s"],
            "must be greater than zero",
        ),
    ] {
        let run = verify(&args);
        assert_eq!(run.code, 2, "{args:?}");
        assert!(run.stderr.contains(expect), "{args:?}: {}", run.stderr);
        assert!(run.stdout.is_empty(), "{args:?}: {}", run.stdout);
    }
}
