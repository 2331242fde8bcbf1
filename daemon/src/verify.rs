//! `fanout verify`: the automated form of the manual proof that a service's clients balance, for
//! use as a rollout gate.
//!
//! It asks a running agent for the service's balance (`GET /services/{ns}/{name}/balance`) at the
//! start of the window, waits `--window`, asks again, and judges every client pod seen at the end
//! (or only `--client`) with three checks:
//!
//! * **coverage**: every ready backend is a peer of the client: `connected_ready == ready`, with at
//!   least one ready backend. Strict on purpose (the agent's own `round_robin` verdict accepts 80%):
//!   the gate proves that *every* ready pod gets traffic. The backends that are ready but were not
//!   connected in the agent's window are named, with how long they have been unconnected. A pod
//!   that became ready moments ago and is not yet connected fails the gate: run it again once the
//!   new pods have been ready for a window.
//! * **reuse**: the client's connections are long-lived: the local ports it had live at the first
//!   answer (`local_ports_end` of the first GET) are all still live at the second (the same field of
//!   the second GET), and the agent saw fewer than 0.5 opens per request over its window (the
//!   `dial_per_request` threshold). A client that reconnects per call fails; so does a client with
//!   no live connection at the start of the window (nothing to prove reuse with, e.g. a client first
//!   seen during the window), and a client whose connections are rotated (MaxConnectionAge) within
//!   the window: pick a window shorter than the rotation age. The agent's own `ports_stable` /
//!   `ports_reused` over its window are quoted in the detail.
//! * **distribution**: the agent's verdict is [`Verdict::RoundRobin`] and the skew (top backend
//!   share / fair share, over the agent's window ending at the second GET) is at most 1.5. The
//!   verdicts `pick_first`, `dial_per_request` and `stale_resolver` fail it, and so does
//!   `insufficient_data` (too few requests, too short an observation, fewer than 2 ready backends,
//!   backends not resolved): a gate must not pass on no evidence.
//!
//! A client balances when all three pass. The figures other than the ports are the agent's sliding
//! window (`fanout run --window`, 30 s by default) as it stands at the end of the verify window.
//!
//! The answer is decoded into the agent's own types ([`ServiceBalanceView`] of
//! [`crate::analysis::Balance`]), which require every field: an answer with a missing or renamed
//! field, or a verdict this build does not know, is an error (exit 2), never a figure read as 0.
//!
//! Exit codes: 0 every client balances; 1 at least one does not, or there is nothing to judge: no
//! client of the service seen at all ("no client traffic to NS/NAME seen"), or the `--client` pod not
//! among the service's clients (no traffic from it seen by this agent: it did not call, it runs on
//! another node, or the name is wrong; either way nothing proves it balances, so the gate fails
//! closed with 1, as for a client that does not balance); 2 on error: bad arguments, the agent
//! unreachable, a non-200 answer (an unknown service is 404), or an answer that is not the
//! expected JSON. Every request is bounded by [`REQUEST_TIMEOUT`].
//!
//! The HTTP client is hyper-util's legacy client over its `HttpConnector`: HTTP/1.1 (framing,
//! chunked bodies, interim answers are hyper's), one connection per request and no pool (the
//! agent sheds idle connections, and the window between the two GETs can outlast its idle
//! timeout), the body collected by http-body-util's `Limited` up to [`MAX_RESPONSE_BYTES`], the
//! whole exchange under [`REQUEST_TIMEOUT`]. What stays ours is `--endpoint` parsing
//! ([`parse_endpoint`]): `http::Uri` accepts what the gate must refuse (a path, user information,
//! `https`, no port) and its errors do not say which part is wrong; every endpoint accepted is
//! also a valid `Uri`.

use std::{collections::BTreeMap, time::Duration};

use http_body_util::{BodyExt as _, Empty, LengthLimitError, Limited};
use hyper::{Request, Uri, body::Bytes, header};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;

use crate::analysis::{BackendBalance, Balance, Thresholds, Verdict};
use crate::exposition::api::{ApiError, ServiceBalanceView};
use crate::identity::model::ObjectRef;

/// Every client balances.
pub const EXIT_BALANCED: i32 = 0;
/// At least one client does not balance, or there is no client to judge.
pub const EXIT_UNBALANCED: i32 = 1;
/// Bad arguments, the agent unreachable or answering something unexpected.
pub const EXIT_ERROR: i32 = 2;

/// Bound on each request to the agent: connect, send, and read the whole answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer body accepted.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// Ports and backends listed in a detail before "… N more".
const LIST_MAX: usize = 8;

/// Runs the check; returns the process exit code (0 balanced, 1 not, 2 error).
pub async fn run(args: &crate::cli::VerifyArgs) -> i32 {
    match verify(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fanout verify: {e}");
            EXIT_ERROR
        }
    }
}

async fn verify(args: &crate::cli::VerifyArgs) -> Result<i32, String> {
    let service = parse_name("--service", &args.service)?;
    let client = args
        .client
        .as_deref()
        .map(|c| parse_name("--client", c))
        .transpose()?;
    let endpoint = parse_endpoint(&args.endpoint)?;
    let path = format!("/services/{}/{}/balance", service.namespace, service.name);

    eprintln!(
        "fanout verify: observing {service}{} for {} through the agent at {}",
        client
            .as_ref()
            .map_or_else(String::new, |c| format!(" from {c}")),
        secs(args.window.as_secs_f64()),
        endpoint.url
    );
    let start = fetch_balance(&endpoint, &path).await?;
    tokio::time::sleep(args.window).await;
    let end = fetch_balance(&endpoint, &path).await?;

    let report = evaluate(&service, client.as_ref(), args.window, &start, &end);
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| format!("encoding the report: {e}"))?;
        println!("{text}");
    } else {
        print!("{}", render(&report));
    }
    Ok(exit_code(&report))
}

async fn fetch_balance(endpoint: &Endpoint, path: &str) -> Result<ServiceBalanceView, String> {
    let url = format!("{}{path}", endpoint.url);
    let resp = http_get(endpoint, path, REQUEST_TIMEOUT)
        .await
        .map_err(|e| format!("cannot get {url} from the agent at {}: {e}", endpoint.url))?;
    if resp.status != 200 {
        return Err(format!(
            "the agent at {} answered {} {} for {url}: {}",
            endpoint.url,
            resp.status,
            resp.reason,
            error_text(&resp.body)
        ));
    }
    decode_balance(endpoint, &url, &resp.body)
}

/// The balance answer of `url`, every field required.
fn decode_balance(
    endpoint: &Endpoint,
    url: &str,
    body: &[u8],
) -> Result<ServiceBalanceView, String> {
    serde_json::from_slice(body).map_err(|e| {
        format!(
            "the agent at {} answered {url} with unexpected JSON: {e}",
            endpoint.url
        )
    })
}

/// The `error` of a JSON error body, else the start of the body as text.
fn error_text(body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<ApiError>(body) {
        return e.error;
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    text.chars().take(200).collect()
}

// ---------------------------------------------------------------------------------------------
// Arguments

/// A Kubernetes namespace or object name: DNS-1123 characters, at most 253.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Parses `NAMESPACE/NAME`; `flag` names the option in the error.
pub fn parse_name(flag: &str, s: &str) -> Result<ObjectRef, String> {
    let usage =
        |why: &str| format!("{flag} {s:?} {why}: expected NAMESPACE/NAME, for example shop/api");
    let Some((namespace, name)) = s.split_once('/') else {
        return Err(usage("has no namespace"));
    };
    if name.contains('/') {
        return Err(usage("has more than one '/'"));
    }
    for (what, v) in [("namespace", namespace), ("name", name)] {
        if v.is_empty() {
            return Err(usage(&format!("has an empty {what}")));
        }
        if !valid_name(v) {
            return Err(usage(&format!(
                "has an invalid {what} {v:?} (lowercase letters, digits, '-' and '.' only)"
            )));
        }
    }
    Ok(ObjectRef::new(namespace, name))
}

/// The agent's address, `http://HOST:PORT[/]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// `HOST:PORT` as given.
    pub authority: String,
    /// `http://HOST:PORT`, without a trailing slash.
    pub url: String,
}

/// Parses `http://HOST:PORT[/]`. Only plain HTTP: the agent serves no TLS.
pub fn parse_endpoint(s: &str) -> Result<Endpoint, String> {
    let usage = |why: &str| format!("--endpoint {s:?} {why}: expected http://HOST:PORT");
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(usage("has no scheme"));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(usage(&format!(
            "uses {scheme:?}: only plain http is supported (the agent serves no TLS)"
        )));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if !path.is_empty() && path != "/" {
        return Err(usage(&format!("has a path {path:?}")));
    }
    if authority.contains('@') {
        return Err(usage("has user information"));
    }
    if authority.contains(['?', '#']) {
        return Err(usage("has a query or fragment"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err(usage("has an unclosed '['"));
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(usage("has no port"));
        };
        (host, port)
    } else {
        let Some((host, port)) = authority.rsplit_once(':') else {
            return Err(usage("has no port"));
        };
        if host.contains(':') {
            return Err(usage("has an IPv6 address without brackets"));
        }
        (host, port)
    };
    if host.is_empty() {
        return Err(usage("has no host"));
    }
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => p,
        _ => return Err(usage(&format!("has an invalid port {port:?}"))),
    };
    let url = format!("http://{authority}");
    if let Err(e) = format!("{url}/").parse::<Uri>() {
        return Err(usage(&format!("is not a valid URI ({e})")));
    }
    Ok(Endpoint {
        host: host.into(),
        port,
        authority: authority.into(),
        url,
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP GET (hyper-util's client)

/// An HTTP answer, its body decoded from the transfer encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    /// The reason phrase the agent sent (the canonical one for the status when it sent that).
    pub reason: String,
    pub body: Vec<u8>,
}

/// `GET path`, the whole exchange bounded by `timeout` and the body by [`MAX_RESPONSE_BYTES`].
pub async fn http_get(
    endpoint: &Endpoint,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    get_within(endpoint, path, timeout, MAX_RESPONSE_BYTES).await
}

async fn get_within(
    endpoint: &Endpoint,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<HttpResponse, String> {
    match tokio::time::timeout(timeout, get(endpoint, path, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no complete answer within {}",
            secs(timeout.as_secs_f64())
        )),
    }
}

async fn get(endpoint: &Endpoint, path: &str, max_body: usize) -> Result<HttpResponse, String> {
    let uri: Uri = format!("{}{path}", endpoint.url)
        .parse()
        .map_err(|e| format!("invalid request path {path:?}: {e}"))?;
    let request = Request::get(uri)
        .header(header::ACCEPT, "application/json")
        .header(header::USER_AGENT, "fanout-verify")
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    // Host is set by the client from the URI.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(HttpConnector::new());
    let resp = client.request(request).await.map_err(|e| {
        let what = if e.is_connect() {
            "connecting"
        } else {
            "no answer"
        };
        format!("{what}: {}", causes(&e))
    })?;
    let status = resp.status();
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(str::to_string))
        .unwrap_or_default();
    let body = Limited::new(resp.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                format!("the answer is larger than {max_body} bytes")
            } else {
                format!("reading the answer: {}", causes(&*e))
            }
        })?
        .to_bytes();
    Ok(HttpResponse {
        status: status.as_u16(),
        reason,
        body: body.to_vec(),
    })
}

/// The innermost useful words of an error chain: its causes, outermost first, without the
/// generic wrappers' repetition ("client error (Connect): tcp connect error: Connection refused"
/// reads "tcp connect error: Connection refused").
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !parts.last().is_some_and(|p| p.ends_with(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

// ---------------------------------------------------------------------------------------------
// The decision (pure)

/// The largest skew that passes distribution (the agent's `round_robin` bound).
pub fn max_skew() -> f64 {
    Thresholds::default().round_robin_max_skew
}

/// Opens per request at and above which connections are not reused (the agent's
/// `dial_per_request` bound).
pub fn max_opens_per_request() -> f64 {
    Thresholds::default().dial_opens_per_request
}

/// One check's outcome and the figures behind it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    pub pass: bool,
    pub detail: String,
}

impl Check {
    fn pass(detail: String) -> Self {
        Check { pass: true, detail }
    }
    fn fail(detail: String) -> Self {
        Check {
            pass: false,
            detail,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Checks {
    pub coverage: Check,
    pub reuse: Check,
    pub distribution: Check,
}

/// The figures a client was judged on.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figures {
    pub ready: usize,
    pub connected: usize,
    pub connected_ready: usize,
    pub coverage: Option<f64>,
    /// Ready backends not connected in the agent's window.
    pub not_connected: Vec<String>,
    pub requests: u64,
    pub requests_per_backend: BTreeMap<String, u64>,
    pub skew: Option<f64>,
    pub opens_per_request: Option<f64>,
    /// Live local ports at the first answer.
    pub ports_start: Vec<u16>,
    /// Live local ports at the second answer.
    pub ports_end: Vec<u16>,
    /// How many of `ports_start` are in `ports_end`.
    pub ports_kept: usize,
    /// The agent's window, in seconds.
    pub agent_window_seconds: f64,
}

/// The judgement of one client pod.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClientResult {
    pub client: String,
    pub checks: Checks,
    pub verdict: Verdict,
    pub reason: String,
    pub pass: bool,
    pub figures: Figures,
}

impl ClientResult {
    /// One line: who does not balance and why (the agent's reason, then each failing check).
    pub fn failure_line(&self) -> String {
        let mut line = format!(
            "{} does not balance ({}: {})",
            self.client, self.verdict, self.reason
        );
        for (name, c) in [
            ("coverage", &self.checks.coverage),
            ("reuse", &self.checks.reuse),
            ("distribution", &self.checks.distribution),
        ] {
            if !c.pass {
                line.push_str(&format!("; {name} failed: {}", c.detail));
            }
        }
        line
    }
}

/// The whole verdict, as `--json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub service: String,
    pub window_seconds: f64,
    pub balanced: bool,
    pub clients: Vec<ClientResult>,
    /// Why there is nothing to judge, when `clients` is empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Judges the clients of `end` (only `client` if given) against `start`.
pub fn evaluate(
    service: &ObjectRef,
    client: Option<&ObjectRef>,
    window: Duration,
    start: &ServiceBalanceView,
    end: &ServiceBalanceView,
) -> Report {
    let wanted = |c: &&Balance| client.is_none_or(|w| &c.client == w);
    let mut clients: Vec<ClientResult> = end
        .clients
        .iter()
        .filter(wanted)
        .map(|e| {
            let s = start.clients.iter().find(|s| s.client == e.client);
            judge(s, e)
        })
        .collect();
    clients.sort_by(|a, b| a.client.cmp(&b.client));
    clients.dedup_by(|a, b| a.client == b.client);
    let message = clients.is_empty().then(|| match client {
        Some(c) => format!(
            "no traffic from {c} to {service} seen by the agent (it did not call the service, \
             it runs on another node, or the name is wrong)"
        ),
        None => format!("no client traffic to {service} seen"),
    });
    Report {
        service: service.to_string(),
        window_seconds: window.as_secs_f64(),
        balanced: !clients.is_empty() && clients.iter().all(|c| c.pass),
        clients,
        message,
    }
}

/// 0 when balanced, 1 otherwise.
pub fn exit_code(report: &Report) -> i32 {
    if report.balanced {
        EXIT_BALANCED
    } else {
        EXIT_UNBALANCED
    }
}

/// Judges one client from its first answer (None: not seen then) and its last.
pub fn judge(start: Option<&Balance>, end: &Balance) -> ClientResult {
    let ports_start = start.map(|s| s.local_ports_end.clone()).unwrap_or_default();
    let ports_kept = ports_start
        .iter()
        .filter(|p| end.local_ports_end.contains(p))
        .count();
    let not_connected: Vec<&BackendBalance> = end
        .backends
        .iter()
        .filter(|b| b.ready && !b.connected)
        .collect();
    let checks = Checks {
        coverage: coverage_check(end, &not_connected),
        reuse: reuse_check(start, end, &ports_start, ports_kept),
        distribution: distribution_check(end),
    };
    let pass = checks.coverage.pass && checks.reuse.pass && checks.distribution.pass;
    ClientResult {
        client: end.client.to_string(),
        verdict: end.verdict,
        reason: end.reason.clone(),
        pass,
        figures: Figures {
            ready: end.ready,
            connected: end.connected,
            connected_ready: end.connected_ready,
            coverage: end.coverage,
            not_connected: not_connected.iter().map(|b| b.name.clone()).collect(),
            requests: end.requests,
            requests_per_backend: end.requests_per_backend.clone(),
            skew: end.skew,
            opens_per_request: end.opens_per_request,
            ports_start,
            ports_end: end.local_ports_end.clone(),
            ports_kept,
            agent_window_seconds: end.window_seconds,
        },
        checks,
    }
}

fn coverage_check(end: &Balance, not_connected: &[&BackendBalance]) -> Check {
    if end.ready == 0 {
        return Check::fail(format!(
            "no ready backends are known for the service ({} connected)",
            end.connected
        ));
    }
    let cov = end
        .coverage
        .unwrap_or(end.connected_ready as f64 / end.ready as f64);
    let head = format!(
        "{} of {} ready backends connected (coverage {})",
        end.connected_ready,
        end.ready,
        pct(cov)
    );
    if end.connected_ready >= end.ready {
        return Check::pass(head);
    }
    if not_connected.is_empty() {
        return Check::fail(head);
    }
    let names: Vec<String> = not_connected
        .iter()
        .map(|b| match b.unconnected_seconds {
            Some(s) => format!("{} (for {})", b.name, secs(s)),
            None => b.name.clone(),
        })
        .collect();
    Check::fail(format!(
        "{head}; ready but never connected: {}",
        list(&names)
    ))
}

fn reuse_check(start: Option<&Balance>, end: &Balance, ports_start: &[u16], kept: usize) -> Check {
    let opr_limit = max_opens_per_request();
    let agent = {
        let mut s = match (end.ports_stable, end.ports_reused) {
            (true, _) => format!(
                "the agent saw the same ports over its {} window",
                secs(end.window_seconds)
            ),
            (false, Some(r)) => format!(
                "the agent saw {} of its window-start ports still live",
                pct(r)
            ),
            (false, None) => "the agent saw no live port at its window start".to_string(),
        };
        match end.opens_per_request {
            Some(opr) => s.push_str(&format!(
                ", {} open(s) for {} requests ({opr:.2} per request)",
                end.opens, end.requests
            )),
            None => s.push_str(&format!(", {} open(s), no requests", end.opens)),
        }
        if end.ports_truncated || start.is_some_and(|s| s.ports_truncated) {
            s.push_str(", port lists truncated to the lowest ports");
        }
        s
    };
    if start.is_none() {
        return Check::fail(format!(
            "not seen at the start of the window: no connection to prove reuse ({agent})"
        ));
    }
    if ports_start.is_empty() {
        return Check::fail(format!(
            "no live connection at the start of the window: nothing was reused ({agent})"
        ));
    }
    let ports = format!(
        "start {}, end {}",
        ports_list(ports_start),
        ports_list(&end.local_ports_end)
    );
    if kept < ports_start.len() {
        return Check::fail(format!(
            "only {kept} of {} local port(s) live at the start were still live at the end \
             ({ports}): the client reconnected; {agent}",
            ports_start.len()
        ));
    }
    if let Some(opr) = end.opens_per_request
        && opr >= opr_limit
    {
        return Check::fail(format!(
            "{opr:.2} opens per request (at least {opr_limit}): the client dials per call; {agent}"
        ));
    }
    Check::pass(format!(
        "the same {} local port(s) live at both ends of the window ({}); {agent}",
        ports_start.len(),
        ports_list(ports_start)
    ))
}

fn distribution_check(end: &Balance) -> Check {
    let limit = max_skew();
    let per_backend: Vec<String> = end
        .requests_per_backend
        .iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let figures = format!(
        "skew {} over {} requests ({})",
        end.skew.map_or_else(|| "n/a".into(), |s| format!("{s:.2}")),
        end.requests,
        if per_backend.is_empty() {
            "no backend".to_string()
        } else {
            list(&per_backend)
        }
    );
    match end.verdict {
        Verdict::InsufficientData => {
            return Check::fail(format!(
                "insufficient data: too little evidence to prove balance, and a gate does not \
                 pass without it ({figures})"
            ));
        }
        v @ (Verdict::PickFirst | Verdict::DialPerRequest | Verdict::StaleResolver) => {
            return Check::fail(format!("verdict {v}; {figures}"));
        }
        Verdict::RoundRobin => {}
    }
    match end.skew {
        None => Check::fail(format!("no request with a known backend; {figures}")),
        Some(s) if s.is_nan() || s > limit => Check::fail(format!("{figures}: skew above {limit}")),
        Some(_) => Check::pass(format!("{figures}, skew at most {limit}")),
    }
}

// ---------------------------------------------------------------------------------------------
// Output

/// The table, one line per failing client, and a summary.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    if report.clients.is_empty() {
        out.push_str(&format!(
            "FAIL {}\n",
            report
                .message
                .as_deref()
                .unwrap_or("no client traffic seen")
        ));
        return out;
    }
    let header = [
        "CLIENT",
        "READY",
        "CONNECTED",
        "COVERAGE",
        "REQUESTS",
        "SKEW",
        "PORTS REUSED",
        "VERDICT",
        "RESULT",
    ];
    let rows: Vec<[String; 9]> = report
        .clients
        .iter()
        .map(|c| {
            let f = &c.figures;
            [
                c.client.clone(),
                f.ready.to_string(),
                f.connected.to_string(),
                f.coverage.map_or_else(|| "-".into(), pct),
                f.requests.to_string(),
                f.skew.map_or_else(|| "-".into(), |s| format!("{s:.2}")),
                if f.ports_start.is_empty() {
                    "-".into()
                } else {
                    format!("{}/{}", f.ports_kept, f.ports_start.len())
                },
                c.verdict.to_string(),
                if c.pass { "PASS" } else { "FAIL" }.into(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(widths.iter()).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    let failing: Vec<&ClientResult> = report.clients.iter().filter(|c| !c.pass).collect();
    out.push('\n');
    for c in &failing {
        out.push_str(&format!("FAIL {}\n", c.failure_line()));
    }
    let window = secs(report.window_seconds);
    if failing.is_empty() {
        out.push_str(&format!(
            "PASS {}: all {} client(s) balance: every ready backend connected, the same \
             connections over {window}, skew at most {}\n",
            report.service,
            report.clients.len(),
            max_skew()
        ));
    } else {
        out.push_str(&format!(
            "FAIL {}: {} of {} client(s) do not balance\n",
            report.service,
            failing.len(),
            report.clients.len()
        ));
    }
    out
}

// Shares and durations read the same in verify's output as in the agent's reasons.
use crate::analysis::{pct, secs};

/// Up to [`LIST_MAX`] items, then "… N more".
fn list(items: &[String]) -> String {
    let mut s = items
        .iter()
        .take(LIST_MAX)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > LIST_MAX {
        s.push_str(&format!(", … {} more", items.len() - LIST_MAX));
    }
    s
}

fn ports_list(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "none".into();
    }
    let items: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("[{}]", list(&items))
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::analysis::{LIFETIME_BOUNDS_SECONDS, LifetimeHistogram, RequestSource};

    fn name(s: &str) -> ObjectRef {
        parse_name("--service", s).expect("valid name")
    }

    #[test]
    fn names_are_namespace_slash_name() {
        assert_eq!(
            parse_name("--service", "shop/api"),
            Ok(ObjectRef::new("shop", "api"))
        );
        for bad in [
            "shop",
            "/api",
            "shop/",
            "shop/api/x",
            "Shop/api",
            "shop/a_b",
            "",
            "/",
        ] {
            let err = parse_name("--service", bad).expect_err(bad);
            assert!(
                err.contains("--service") && err.contains("NAMESPACE/NAME"),
                "{err}"
            );
        }
        let err = parse_name("--client", "frontend").expect_err("no namespace");
        assert!(
            err.starts_with("--client \"frontend\" has no namespace"),
            "{err}"
        );
    }

    #[test]
    fn endpoints_are_plain_http_host_port() {
        let e = parse_endpoint("http://127.0.0.1:9990").expect("plain");
        assert_eq!(
            (e.host.as_str(), e.port, e.url.as_str()),
            ("127.0.0.1", 9990, "http://127.0.0.1:9990")
        );
        let e = parse_endpoint("http://localhost:80/").expect("trailing slash");
        assert_eq!((e.host.as_str(), e.port), ("localhost", 80));
        let e = parse_endpoint("http://[::1]:9990/").expect("v6");
        assert_eq!(
            (e.host.as_str(), e.authority.as_str(), e.url.as_str()),
            ("::1", "[::1]:9990", "http://[::1]:9990")
        );
        for (bad, why) in [
            ("https://127.0.0.1:9990", "only plain http"),
            ("127.0.0.1:9990", "no scheme"),
            ("http://127.0.0.1", "no port"),
            ("http://127.0.0.1:0", "invalid port"),
            ("http://127.0.0.1:99999", "invalid port"),
            ("http://127.0.0.1:+80", "invalid port"),
            ("http://:9990", "no host"),
            ("http://127.0.0.1:9990/metrics", "path"),
            ("http://u@127.0.0.1:9990", "user"),
            ("http://::1:9990", "brackets"),
            ("http://[::1:9990", "unclosed"),
        ] {
            let err = parse_endpoint(bad).expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
            assert!(err.contains("http://HOST:PORT"), "{err}");
        }
    }

    /// Serves one connection on 127.0.0.1: reads the request head, writes `pieces` a few ms
    /// apart, then closes.
    async fn one_shot_server(pieces: Vec<Vec<u8>>) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                for p in pieces {
                    let _ = s.write_all(&p).await;
                    let _ = s.flush().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        parse_endpoint(&format!("http://127.0.0.1:{port}")).expect("endpoint")
    }

    async fn answer(pieces: &[&[u8]], max_body: usize) -> Result<HttpResponse, String> {
        let ep = one_shot_server(pieces.iter().map(|p| p.to_vec()).collect()).await;
        get_within(&ep, "/x", Duration::from_secs(5), max_body).await
    }

    #[tokio::test]
    async fn bodies_by_length_chunked_and_to_the_end() {
        let r = answer(
            &[b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n{}\r\n"],
            1024,
        )
        .await
        .expect("content-length");
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        assert_eq!(r.body, b"{}\r\n");

        // Chunks split across writes, a chunk extension, a trailer.
        let r = answer(
            &[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4;ext=1\r\n{\"a",
                b"\"\r\n3\r\n:1}\r\n",
                b"0\r\nx-trailer: y\r\n\r\n",
            ],
            1024,
        )
        .await
        .expect("chunked");
        assert_eq!(r.body, b"{\"a\":1}");

        let r = answer(&[b"HTTP/1.0 200 OK\r\n\r\nuntil the ", b"end"], 1024)
            .await
            .expect("to the end of the connection");
        assert_eq!(r.body, b"until the end");

        let r = answer(
            &[b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"],
            1024,
        )
        .await
        .expect("interim answer skipped");
        assert_eq!((r.status, r.body.len()), (204, 0));

        let r = answer(
            &[b"HTTP/1.1 404 Nope\r\ncontent-type: application/json\r\ncontent-length: 37\r\n\r\n{\"error\": \"unknown service shop/x\"}\r\n"],
            1024,
        )
        .await
        .expect("404");
        assert_eq!((r.status, r.reason.as_str()), (404, "Nope"));
        assert_eq!(error_text(&r.body), "unknown service shop/x");
    }

    #[tokio::test]
    async fn broken_or_oversized_answers_are_errors() {
        let err = answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"], 1024)
            .await
            .expect_err("short body");
        assert!(err.starts_with("reading the answer: "), "{err}");

        let err = answer(
            &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab"],
            1024,
        )
        .await
        .expect_err("chunked body cut short");
        assert!(err.starts_with("reading the answer: "), "{err}");

        let err = answer(
            &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
            1024,
        )
        .await
        .expect_err("bad chunk size");
        assert!(err.starts_with("reading the answer: "), "{err}");

        for raw in [
            &b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"",
        ] {
            let err = answer(&[raw], 1024).await.expect_err("not HTTP");
            assert!(err.starts_with("no answer: "), "{raw:?}: {err}");
        }

        let body = vec![b'x'; 64];
        let mut by_length = b"HTTP/1.1 200 OK\r\ncontent-length: 64\r\n\r\n".to_vec();
        by_length.extend_from_slice(&body);
        let mut chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for c in body.chunks(10) {
            chunked.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            chunked.extend_from_slice(c);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        for raw in [by_length, chunked] {
            let err = answer(&[&raw], 16).await.expect_err("too large");
            assert_eq!(err, "the answer is larger than 16 bytes");
            assert_eq!(answer(&[&raw], 64).await.expect("at the limit").body, body);
        }
    }

    #[tokio::test]
    async fn connect_failures_and_timeouts_are_errors() {
        // Nothing listening: refused.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let ep = parse_endpoint(&format!("http://127.0.0.1:{port}")).expect("endpoint");
        let err = http_get(&ep, "/x", Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(err.starts_with("connecting: "), "{err}");
        assert!(err.contains("refused"), "{err}");

        // A server that accepts and never answers: the timeout bounds the request.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let hold = tokio::spawn(async move {
            let conn = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(conn);
        });
        let ep = parse_endpoint(&format!("http://127.0.0.1:{port}")).expect("endpoint");
        let err = http_get(&ep, "/x", Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert_eq!(err, "no complete answer within 200 ms");
        hold.abort();
    }

    /// A client of shop/api over 3 ready backends, each connected with about a third of 300
    /// requests, over connections on `ports`: what the agent reports for a round_robin client.
    fn balance(client: &str, verdict: Verdict, ports: &[u16]) -> Balance {
        let backend = |name: &str, requests: u64| BackendBalance {
            backend: ObjectRef::new("shop", name),
            name: name.into(),
            ready: true,
            connected: true,
            live_connections: 1,
            connections: 1,
            opens: 0,
            closes: 0,
            requests,
            share: Some(requests as f64 / 300.0),
            mean_lifetime_seconds: Some(120.0),
            unconnected_seconds: None,
        };
        let backends = vec![
            backend("api-1", 100),
            backend("api-2", 99),
            backend("api-3", 101),
        ];
        Balance {
            client: ObjectRef::new("shop", client),
            service: ObjectRef::new("shop", "api"),
            window_seconds: 30.0,
            span_seconds: 30.0,
            observed_seconds: 120.0,
            ready: 3,
            connected: 3,
            connected_ready: 3,
            coverage: Some(1.0),
            requests: 300,
            requests_unattributed: 0,
            requests_per_backend: backends
                .iter()
                .map(|b| (b.name.clone(), b.requests))
                .collect(),
            skew: Some(1.01),
            live_connections: ports.len() as u64,
            connections: ports.len() as u64,
            opens: 0,
            closes: 0,
            opens_per_sec: 0.0,
            closes_per_sec: 0.0,
            opens_per_request: Some(0.0),
            mean_lifetime_seconds: Some(120.0),
            lifetimes: LifetimeHistogram {
                bounds_seconds: Cow::Borrowed(&LIFETIME_BOUNDS_SECONDS),
                counts: vec![0; LIFETIME_BOUNDS_SECONDS.len() + 1],
                count: 0,
                sum_seconds: 0.0,
            },
            local_ports_start: ports.to_vec(),
            local_ports_end: ports.to_vec(),
            ports_stable: !ports.is_empty(),
            ports_reused: (!ports.is_empty()).then_some(1.0),
            ports_truncated: false,
            source: Some(RequestSource::H2),
            bytes_sent: 30_000,
            bytes_received: 90_000,
            messages_sent: 300,
            messages_received: 300,
            backends,
            verdict,
            reason: format!("the agent's reason for {verdict}"),
            advice: None,
        }
    }

    fn view(clients: &[Balance]) -> ServiceBalanceView {
        ServiceBalanceView {
            service: ObjectRef::new("shop", "api"),
            clients: clients.to_vec(),
        }
    }

    fn judge_one(start: &Balance, end: &Balance) -> ClientResult {
        let report = evaluate(
            &name("shop/api"),
            None,
            Duration::from_secs(60),
            &view(std::slice::from_ref(start)),
            &view(std::slice::from_ref(end)),
        );
        assert_eq!(report.clients.len(), 1);
        report.clients[0].clone()
    }

    #[test]
    fn answers_decode_into_the_agents_types_or_fail() {
        let ep = parse_endpoint("http://127.0.0.1:9990").expect("endpoint");
        let url = "http://127.0.0.1:9990/services/shop/api/balance";
        let good = view(&[balance("frontend", Verdict::RoundRobin, &[40001])]);
        let json = serde_json::to_value(&good).expect("json");
        let back = decode_balance(&ep, url, json.to_string().as_bytes()).expect("decodes");
        assert_eq!(back, good);

        // A renamed field is an error, not a 0 or a None.
        for field in ["connected_ready", "skew", "local_ports_end"] {
            let mut bad = json.clone();
            let c = bad["clients"][0].as_object_mut().expect("client");
            let v = c.remove(field).expect("field");
            c.insert(format!("{field}_v2"), v);
            let err = decode_balance(&ep, url, bad.to_string().as_bytes()).expect_err(field);
            assert!(
                err.starts_with(&format!(
                    "the agent at http://127.0.0.1:9990 answered {url} with unexpected JSON: \
                     missing field `{field}`"
                )),
                "{err}"
            );
        }
        // So is a verdict this build does not know: a gate cannot judge it.
        let mut bad = json.clone();
        bad["clients"][0]["verdict"] = "something_new".into();
        let err = decode_balance(&ep, url, bad.to_string().as_bytes()).expect_err("verdict");
        assert!(err.contains("unknown variant `something_new`"), "{err}");
        // Fields added by a newer agent are ignored.
        let mut newer = json.clone();
        newer["clients"][0]["p99_seconds"] = 0.25.into();
        assert_eq!(
            decode_balance(&ep, url, newer.to_string().as_bytes()).expect("newer agent"),
            good
        );
    }

    #[test]
    fn round_robin_with_stable_ports_balances() {
        let b = balance("frontend", Verdict::RoundRobin, &[40001, 40002, 40003]);
        let r = judge_one(&b, &b);
        assert!(r.pass, "{r:?}");
        assert!(r.checks.coverage.detail.contains("3 of 3 ready backends"));
        assert!(r.checks.reuse.detail.contains("the same 3 local port(s)"));
        assert!(r.checks.distribution.detail.contains("api-2 99"));
        assert_eq!(r.figures.ports_kept, 3);
        // A new connection at the end (say to a new backend) does not undo reuse.
        let mut end = b.clone();
        end.local_ports_end = vec![40001, 40002, 40003, 40004];
        assert!(judge_one(&b, &end).checks.reuse.pass);
    }

    #[test]
    fn pick_first_fails_coverage_and_distribution() {
        let mut b = balance("frontend", Verdict::PickFirst, &[40001]);
        b.connected = 1;
        b.connected_ready = 1;
        b.coverage = Some(1.0 / 3.0);
        b.skew = Some(3.0);
        b.requests_per_backend = [("api-1", 300), ("api-2", 0), ("api-3", 0)]
            .map(|(n, r)| (n.to_string(), r))
            .into();
        b.backends[1].connected = false;
        b.backends[1].unconnected_seconds = Some(45.0);
        b.backends[2].connected = false;
        let r = judge_one(&b, &b);
        assert!(!r.pass);
        assert!(r.checks.reuse.pass, "one long-lived connection is reused");
        assert!(!r.checks.coverage.pass);
        assert!(
            r.checks
                .coverage
                .detail
                .contains("1 of 3 ready backends connected (coverage 33%); ready but never connected: api-2 (for 45 s), api-3"),
            "{}",
            r.checks.coverage.detail
        );
        assert!(!r.checks.distribution.pass);
        assert!(r.checks.distribution.detail.contains("verdict pick_first"));
        let line = r.failure_line();
        assert!(line.starts_with("shop/frontend does not balance (pick_first: the agent's reason"));
        assert!(line.contains("coverage failed") && line.contains("distribution failed"));
        assert!(!line.contains("reuse failed"), "{line}");
    }

    #[test]
    fn reconnecting_fails_reuse() {
        let mut start = balance("frontend", Verdict::DialPerRequest, &[50001]);
        start.opens = 300;
        start.opens_per_request = Some(1.0);
        start.ports_stable = false;
        start.ports_reused = Some(0.0);
        let mut end = start.clone();
        end.local_ports_end = vec![50999];
        let r = judge_one(&start, &end);
        assert!(!r.pass);
        assert!(r.checks.coverage.pass);
        assert!(!r.checks.reuse.pass);
        assert!(
            r.checks
                .reuse
                .detail
                .starts_with("only 0 of 1 local port(s) live at the start were still live at the end (start [50001], end [50999])"),
            "{}",
            r.checks.reuse.detail
        );
        assert!(
            r.checks
                .reuse
                .detail
                .contains("300 open(s) for 300 requests (1.00 per request)")
        );

        // The same port by chance, but one open per request: still not reuse.
        let r = judge_one(&start, &start);
        assert!(!r.checks.reuse.pass);
        assert!(
            r.checks.reuse.detail.contains("dials per call"),
            "{}",
            r.checks.reuse.detail
        );

        // Not seen at the start, or nothing live then: nothing proves reuse.
        let rr = balance("frontend", Verdict::RoundRobin, &[40001]);
        let report = evaluate(
            &name("shop/api"),
            None,
            Duration::from_secs(60),
            &view(&[]),
            &view(std::slice::from_ref(&rr)),
        );
        assert!(!report.balanced);
        assert!(
            report.clients[0]
                .checks
                .reuse
                .detail
                .starts_with("not seen at the start")
        );
        let empty = balance("frontend", Verdict::RoundRobin, &[]);
        let r = judge_one(&empty, &rr);
        assert!(
            r.checks
                .reuse
                .detail
                .starts_with("no live connection at the start")
        );
    }

    #[test]
    fn stale_resolver_names_the_unconnected_backends() {
        let mut b = balance("frontend", Verdict::StaleResolver, &[40001, 40002]);
        b.ready = 4;
        b.connected = 2;
        b.connected_ready = 2;
        b.coverage = Some(0.5);
        b.skew = Some(2.0);
        b.requests_per_backend = [("api-1", 150), ("api-2", 150), ("api-3", 0), ("api-4", 0)]
            .map(|(n, r)| (n.to_string(), r))
            .into();
        let mut api3 = b.backends[2].clone();
        (api3.connected, api3.unconnected_seconds) = (false, Some(45.0));
        let mut api4 = api3.clone();
        (api4.name, api4.unconnected_seconds) = ("api-4".into(), Some(31.5));
        b.backends.truncate(2);
        b.backends.extend([api3, api4]);
        let r = judge_one(&b, &b);
        assert!(!r.pass);
        assert_eq!(r.figures.not_connected, ["api-3", "api-4"]);
        assert!(
            r.checks
                .coverage
                .detail
                .ends_with("ready but never connected: api-3 (for 45 s), api-4 (for 32 s)"),
            "{}",
            r.checks.coverage.detail
        );
        assert!(r.checks.reuse.pass);
        assert!(!r.checks.distribution.pass);
    }

    #[test]
    fn insufficient_data_and_skew_do_not_pass() {
        let mut b = balance("frontend", Verdict::InsufficientData, &[40001]);
        b.requests = 3;
        let r = judge_one(&b, &b);
        assert!(!r.pass);
        assert!(
            r.checks
                .distribution
                .detail
                .starts_with("insufficient data")
        );

        let mut b = balance("frontend", Verdict::RoundRobin, &[40001]);
        b.skew = Some(1.6);
        let r = judge_one(&b, &b);
        assert!(!r.checks.distribution.pass);
        assert!(r.checks.distribution.detail.contains("skew above 1.5"));
        b.skew = None;
        assert!(!judge_one(&b, &b).checks.distribution.pass);
        b.skew = Some(1.5);
        assert!(
            judge_one(&b, &b).checks.distribution.pass,
            "1.5 is the bound"
        );
        let mut b = balance("frontend", Verdict::RoundRobin, &[40001]);
        b.ready = 0;
        b.coverage = None;
        let r = judge_one(&b, &b);
        assert!(!r.checks.coverage.pass);
        assert!(r.checks.coverage.detail.starts_with("no ready backends"));
    }

    #[test]
    fn reports_filter_clients_and_fail_closed_on_none() {
        let good = balance("good", Verdict::RoundRobin, &[1, 2, 3]);
        let bad = balance("bad", Verdict::PickFirst, &[4]);
        let snap = view(&[good, bad]);
        let svc = name("shop/api");
        let w = Duration::from_secs(1);
        let all = evaluate(&svc, None, w, &snap, &snap);
        assert_eq!(
            all.clients
                .iter()
                .map(|c| (c.client.as_str(), c.pass))
                .collect::<Vec<_>>(),
            [("shop/bad", false), ("shop/good", true)]
        );
        assert!(!all.balanced);
        assert_eq!(exit_code(&all), EXIT_UNBALANCED);
        let only_good = evaluate(&svc, Some(&name("shop/good")), w, &snap, &snap);
        assert!(only_good.balanced);
        assert_eq!(exit_code(&only_good), EXIT_BALANCED);
        let absent = evaluate(&svc, Some(&name("shop/nobody")), w, &snap, &snap);
        assert!(!absent.balanced && absent.clients.is_empty());
        assert!(
            absent
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("no traffic from shop/nobody"))
        );
        let none = evaluate(&svc, None, w, &snap, &view(&[]));
        assert_eq!(exit_code(&none), EXIT_UNBALANCED);
        assert_eq!(
            none.message.as_deref(),
            Some("no client traffic to shop/api seen")
        );
        assert!(render(&none).contains("no client traffic to shop/api seen"));

        let json = serde_json::to_value(&all).expect("json");
        assert_eq!(json["service"], "shop/api");
        assert_eq!(json["balanced"], false);
        assert_eq!(json["window_seconds"], 1.0);
        assert_eq!(json["clients"][1]["checks"]["reuse"]["pass"], true);
        assert_eq!(json["clients"][0]["verdict"], "pick_first");
        assert!(json.get("message").is_none());
    }

    #[test]
    fn table_lines_up() {
        let good = balance("good", Verdict::RoundRobin, &[1, 2, 3]);
        let mut bad = balance("a-much-longer-client-name", Verdict::PickFirst, &[4]);
        bad.skew = Some(3.0);
        let snap = view(&[good, bad]);
        let report = evaluate(
            &name("shop/api"),
            None,
            Duration::from_secs(60),
            &snap,
            &snap,
        );
        let text = render(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLIENT "), "{text}");
        assert!(lines[0].ends_with("VERDICT      RESULT"), "{text}");
        let col = lines[0].find("READY").expect("READY");
        assert_eq!(lines[1].find(" 3 ").map(|i| i + 1), Some(col), "{text}");
        assert!(
            lines[1].starts_with("shop/a-much-longer-client-name  3"),
            "{text}"
        );
        assert!(lines[1].ends_with("pick_first   FAIL"), "{text}");
        assert!(
            lines[2].contains("100%") && lines[2].contains("3/3"),
            "{text}"
        );
        assert!(lines[2].ends_with("round_robin  PASS"), "{text}");
        assert_eq!(lines[3], "");
        assert!(
            lines[4]
                .starts_with("FAIL shop/a-much-longer-client-name does not balance (pick_first")
        );
        assert_eq!(lines[5], "FAIL shop/api: 1 of 2 client(s) do not balance");
    }
}
