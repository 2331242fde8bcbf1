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
//! * **distribution**: the agent's verdict is `round_robin` and the skew (top backend share / fair
//!   share, over the agent's window ending at the second GET) is at most 1.5. The verdicts
//!   `pick_first`, `dial_per_request` and `stale_resolver` fail it, and so does `insufficient_data`
//!   (too few requests, too short an observation, fewer than 2 ready backends, backends not
//!   resolved): a gate must not pass on no evidence.
//!
//! A client balances when all three pass. The figures other than the ports are the agent's sliding
//! window (`fanout run --window`, 30 s by default) as it stands at the end of the verify window.
//!
//! Exit codes: 0 every client balances; 1 at least one does not, or there is nothing to judge: no
//! client of the service seen at all ("no client traffic to NS/NAME seen"), or the `--client` pod not
//! among the service's clients (no traffic from it seen by this agent: it did not call, it runs on
//! another node, or the name is wrong; either way nothing proves it balances, so the gate fails
//! closed with 1, as for a client that does not balance); 2 on error: bad arguments, the agent
//! unreachable, a non-200 answer (an unknown service is 404), or an answer that is not the
//! expected JSON. Every request is bounded by [`REQUEST_TIMEOUT`].
//!
//! The HTTP client is a minimal HTTP/1.1 GET over a [`TcpStream`] (`Connection: close`, bodies
//! delimited by `Content-Length`, chunked transfer encoding, or the end of the connection).

use std::{collections::BTreeMap, fmt, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::analysis::Thresholds;

/// Every client balances.
pub const EXIT_BALANCED: i32 = 0;
/// At least one client does not balance, or there is no client to judge.
pub const EXIT_UNBALANCED: i32 = 1;
/// Bad arguments, the agent unreachable or answering something unexpected.
pub const EXIT_ERROR: i32 = 2;

/// Bound on each request to the agent: connect, send, and read the whole answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer accepted.
const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// The largest header block accepted.
const MAX_HEADER_BYTES: usize = 64 << 10;
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
    let start = fetch_snapshot(&endpoint, &path).await?;
    tokio::time::sleep(args.window).await;
    let end = fetch_snapshot(&endpoint, &path).await?;

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

async fn fetch_snapshot(endpoint: &Endpoint, path: &str) -> Result<Snapshot, String> {
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
    serde_json::from_slice(&resp.body).map_err(|e| {
        format!(
            "the agent at {} answered {url} with unexpected JSON: {e}",
            endpoint.url
        )
    })
}

/// The `error` of a JSON error body, else the start of the body as text.
fn error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ApiError {
        error: String,
    }
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

/// A namespaced Kubernetes object, `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Name {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Kubernetes namespace or object name: DNS-1123 characters, at most 253.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Parses `NAMESPACE/NAME`; `flag` names the option in the error.
pub fn parse_name(flag: &str, s: &str) -> Result<Name, String> {
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
    Ok(Name {
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// The agent's address, `http://HOST:PORT[/]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The host to connect to, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// `HOST:PORT` as given (the Host header).
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
    Ok(Endpoint {
        host: host.into(),
        port,
        authority: authority.into(),
        url: format!("http://{authority}"),
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 GET

/// An HTTP answer, its body decoded from the transfer encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub reason: String,
    pub body: Vec<u8>,
}

/// `GET path` with `Connection: close`, the whole exchange bounded by `timeout`.
pub async fn http_get(
    endpoint: &Endpoint,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    match tokio::time::timeout(timeout, get(endpoint, path)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no complete answer within {}",
            secs(timeout.as_secs_f64())
        )),
    }
}

async fn get(endpoint: &Endpoint, path: &str) -> Result<HttpResponse, String> {
    let mut stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\nUser-Agent: fanout-verify\r\n\
         Connection: close\r\n\r\n",
        endpoint.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer: {e}"))?;
        let eof = n == 0;
        buf.extend_from_slice(&chunk[..n]);
        if let Some(resp) = parse_response(&buf, eof)? {
            return Ok(resp);
        }
        if eof {
            // parse_response never asks for more once the connection has ended.
            return Err("the connection closed before the answer was complete".into());
        }
        if buf.len() > MAX_RESPONSE_BYTES + MAX_HEADER_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            ));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response from the bytes read so far. `Ok(None)`: more bytes are needed (never when
/// `eof`: a response cut short by the end of the connection is an error). Interim 1xx responses
/// are skipped.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<HttpResponse>, String> {
    let mut buf = buf;
    loop {
        let Some(head_len) = find(buf, b"\r\n\r\n") else {
            if buf.len() > MAX_HEADER_BYTES {
                return Err(format!(
                    "the header is larger than {MAX_HEADER_BYTES} bytes"
                ));
            }
            return if eof {
                Err(if buf.is_empty() {
                    "the connection closed without an answer".into()
                } else {
                    "the connection closed in the middle of the header".into()
                })
            } else {
                Ok(None)
            };
        };
        let head = std::str::from_utf8(&buf[..head_len])
            .map_err(|_| "the header is not valid UTF-8".to_string())?;
        let rest = &buf[head_len + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let (status, reason) = parse_status_line(status_line)?;
        let mut content_length: Option<usize> = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                return Err(format!("malformed header line {line:?}"));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse::<usize>()
                    .map_err(|_| format!("invalid Content-Length {value:?}"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err("conflicting Content-Length headers".into());
                }
                content_length = Some(n);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                let last = value.rsplit(',').next().unwrap_or_default().trim();
                if last.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else {
                    return Err(format!("unsupported Transfer-Encoding {value:?}"));
                }
            }
        }
        if (100..200).contains(&status) {
            buf = rest;
            continue;
        }
        let done = |body: Vec<u8>| {
            Ok(Some(HttpResponse {
                status,
                reason: reason.clone(),
                body,
            }))
        };
        if status == 204 || status == 304 {
            return done(Vec::new());
        }
        if chunked {
            return match decode_chunked(rest)? {
                Some(body) => done(body),
                None if eof => Err("the connection closed in the middle of a chunked body".into()),
                None => Ok(None),
            };
        }
        if let Some(len) = content_length {
            if len > MAX_RESPONSE_BYTES {
                return Err(format!(
                    "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                ));
            }
            return if rest.len() >= len {
                done(rest[..len].to_vec())
            } else if eof {
                Err(format!(
                    "the connection closed after {} of {len} body bytes",
                    rest.len()
                ))
            } else {
                Ok(None)
            };
        }
        // No length: the body runs to the end of the connection.
        return if eof { done(rest.to_vec()) } else { Ok(None) };
    }
}

fn parse_status_line(line: &str) -> Result<(u16, String), String> {
    let bad = || format!("malformed status line {line:?}");
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad());
    }
    let code = parts.next().ok_or_else(bad)?;
    if code.len() != 3 {
        return Err(bad());
    }
    let status = code.parse::<u16>().map_err(|_| bad())?;
    let reason = parts.next().unwrap_or_default().trim().to_string();
    Ok((status, reason))
}

/// Decodes a chunked body. `Ok(None)` when incomplete; trailers are read and dropped.
pub fn decode_chunked(mut buf: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = find(buf, b"\r\n") else {
            return if buf.len() > 1024 {
                Err("chunk size line too long".into())
            } else {
                Ok(None)
            };
        };
        let line = std::str::from_utf8(&buf[..eol])
            .map_err(|_| "chunk size line is not valid UTF-8".to_string())?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("invalid chunk size {size_text:?}"))?;
        buf = &buf[eol + 2..];
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(eol) = find(buf, b"\r\n") else {
                    return Ok(None);
                };
                if eol == 0 {
                    return Ok(Some(body));
                }
                buf = &buf[eol + 2..];
            }
        }
        if body.len().saturating_add(size) > MAX_RESPONSE_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_RESPONSE_BYTES} bytes"
            ));
        }
        let Some(data) = buf.get(..size) else {
            return Ok(None);
        };
        match buf.get(size..size + 2) {
            None => return Ok(None),
            Some(b"\r\n") => {}
            Some(_) => return Err("a chunk does not end with CRLF".into()),
        }
        body.extend_from_slice(data);
        buf = &buf[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's answer (the fields of `analysis::Balance` that verify reads)

/// `GET /services/{ns}/{name}/balance`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Snapshot {
    #[serde(default)]
    pub clients: Vec<ClientBalance>,
}

/// One client's [`crate::analysis::Balance`], as the agent serves it.
#[derive(Clone, Debug, Deserialize)]
pub struct ClientBalance {
    pub client: Name,
    #[serde(default)]
    pub window_seconds: f64,
    #[serde(default)]
    pub ready: usize,
    #[serde(default)]
    pub connected: usize,
    #[serde(default)]
    pub connected_ready: usize,
    #[serde(default)]
    pub coverage: Option<f64>,
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub requests_unattributed: u64,
    #[serde(default)]
    pub requests_per_backend: BTreeMap<String, u64>,
    #[serde(default)]
    pub skew: Option<f64>,
    #[serde(default)]
    pub opens: u64,
    #[serde(default)]
    pub opens_per_request: Option<f64>,
    #[serde(default)]
    pub local_ports_end: Vec<u16>,
    #[serde(default)]
    pub ports_stable: bool,
    #[serde(default)]
    pub ports_reused: Option<f64>,
    #[serde(default)]
    pub ports_truncated: bool,
    #[serde(default)]
    pub backends: Vec<BackendFigures>,
    pub verdict: String,
    #[serde(default)]
    pub reason: String,
}

/// One backend of a [`ClientBalance`].
#[derive(Clone, Debug, Deserialize)]
pub struct BackendFigures {
    pub name: String,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub unconnected_seconds: Option<f64>,
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
    pub verdict: String,
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
    service: &Name,
    client: Option<&Name>,
    window: Duration,
    start: &Snapshot,
    end: &Snapshot,
) -> Report {
    let wanted = |c: &&ClientBalance| client.is_none_or(|w| &c.client == w);
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
pub fn judge(start: Option<&ClientBalance>, end: &ClientBalance) -> ClientResult {
    let ports_start = start.map(|s| s.local_ports_end.clone()).unwrap_or_default();
    let ports_kept = ports_start
        .iter()
        .filter(|p| end.local_ports_end.contains(p))
        .count();
    let not_connected: Vec<&BackendFigures> = end
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
        verdict: end.verdict.clone(),
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

fn coverage_check(end: &ClientBalance, not_connected: &[&BackendFigures]) -> Check {
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

fn reuse_check(
    start: Option<&ClientBalance>,
    end: &ClientBalance,
    ports_start: &[u16],
    kept: usize,
) -> Check {
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

fn distribution_check(end: &ClientBalance) -> Check {
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
    match end.verdict.as_str() {
        "insufficient_data" => {
            return Check::fail(format!(
                "insufficient data: too little evidence to prove balance, and a gate does not \
                 pass without it ({figures})"
            ));
        }
        v @ ("pick_first" | "dial_per_request" | "stale_resolver") => {
            return Check::fail(format!("verdict {v}; {figures}"));
        }
        "round_robin" => {}
        other => return Check::fail(format!("unknown verdict {other:?}; {figures}")),
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
                c.verdict.clone(),
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
    use super::*;
    use serde_json::{Value, json};

    fn name(s: &str) -> Name {
        parse_name("--service", s).expect("valid name")
    }

    #[test]
    fn names_are_namespace_slash_name() {
        assert_eq!(
            parse_name("--service", "shop/api"),
            Ok(Name {
                namespace: "shop".into(),
                name: "api".into()
            })
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

    #[test]
    fn responses_with_content_length() {
        let raw =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4\r\n\r\n{}\r\n";
        let r = parse_response(raw, false).expect("ok").expect("complete");
        assert_eq!((r.status, r.reason.as_str()), (200, "OK"));
        assert_eq!(r.body, b"{}\r\n");
        // Every prefix is incomplete, not an error, until the connection ends.
        for n in 0..raw.len() {
            assert_eq!(parse_response(&raw[..n], false), Ok(None), "prefix {n}");
            assert!(
                parse_response(&raw[..n], true).is_err(),
                "prefix {n} at eof"
            );
        }
        let raw = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc";
        assert!(parse_response(raw, true).is_err(), "conflicting lengths");
    }

    #[test]
    fn responses_chunked_and_to_eof() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nx-trailer: y\r\n\r\n";
        let r = parse_response(raw, false).expect("ok").expect("complete");
        assert_eq!(r.body, b"{\"a\":1}");
        for n in 0..raw.len() {
            assert_eq!(parse_response(&raw[..n], false), Ok(None), "prefix {n}");
            assert!(
                parse_response(&raw[..n], true).is_err(),
                "prefix {n} at eof"
            );
        }
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(bad, false).is_err());
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n";
        assert!(
            parse_response(bad, false).is_err(),
            "chunk longer than its size"
        );
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert!(parse_response(bad, true).is_err());

        let raw = b"HTTP/1.0 200 OK\r\n\r\nuntil the end";
        assert_eq!(parse_response(raw, false), Ok(None));
        let r = parse_response(raw, true).expect("ok").expect("complete");
        assert_eq!(r.body, b"until the end");

        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        let r = parse_response(raw, false).expect("ok").expect("complete");
        assert_eq!((r.status, r.body.len()), (204, 0));

        for bad in [&b"SSH-2.0-OpenSSH\r\n\r\n"[..], b"HTTP/1.1 2000 OK\r\n\r\n"] {
            assert!(parse_response(bad, true).is_err());
        }
        assert!(parse_response(b"", true).is_err());
    }

    /// Serves `answer` (written in pieces) to one connection on 127.0.0.1.
    async fn one_shot_server(pieces: Vec<Vec<u8>>) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut req = vec![0u8; 4096];
                let _ = s.read(&mut req).await;
                for p in pieces {
                    let _ = s.write_all(&p).await;
                    let _ = s.flush().await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        parse_endpoint(&format!("http://127.0.0.1:{port}")).expect("endpoint")
    }

    #[tokio::test]
    async fn get_over_a_socket() {
        let ep = one_shot_server(vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab".to_vec(),
            b"c\r\n".to_vec(),
            b"0\r\n\r\n".to_vec(),
        ])
        .await;
        let r = http_get(&ep, "/x", Duration::from_secs(5))
            .await
            .expect("get");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abc"[..]));

        let ep = one_shot_server(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc".to_vec(),
        ])
        .await;
        let err = http_get(&ep, "/x", Duration::from_secs(5))
            .await
            .expect_err("short body");
        assert!(err.contains("3 of 10"), "{err}");

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
        assert!(err.contains("within 200 ms"), "{err}");
        hold.abort();
    }

    fn balance(client: &str, verdict: &str, ports: &[u16]) -> Value {
        json!({
            "client": {"namespace": "shop", "name": client},
            "service": {"namespace": "shop", "name": "api"},
            "window_seconds": 30.0,
            "ready": 3, "connected": 3, "connected_ready": 3, "coverage": 1.0,
            "requests": 300, "requests_unattributed": 0,
            "requests_per_backend": {"api-1": 100, "api-2": 99, "api-3": 101},
            "skew": 1.01, "opens": 0, "opens_per_request": 0.0,
            "local_ports_start": ports, "local_ports_end": ports,
            "ports_stable": true, "ports_reused": 1.0, "ports_truncated": false,
            "backends": [
                {"name": "api-1", "ready": true, "connected": true, "unconnected_seconds": null},
                {"name": "api-2", "ready": true, "connected": true, "unconnected_seconds": null},
                {"name": "api-3", "ready": true, "connected": true, "unconnected_seconds": null}
            ],
            "verdict": verdict,
            "reason": format!("the agent's reason for {verdict}"),
        })
    }

    fn snapshot(clients: &[Value]) -> Snapshot {
        serde_json::from_value(
            json!({"service": {"namespace": "shop", "name": "api"}, "clients": clients}),
        )
        .expect("snapshot")
    }

    fn judge_one(start: &Value, end: &Value) -> ClientResult {
        let report = evaluate(
            &name("shop/api"),
            None,
            Duration::from_secs(60),
            &snapshot(std::slice::from_ref(start)),
            &snapshot(std::slice::from_ref(end)),
        );
        assert_eq!(report.clients.len(), 1);
        report.clients[0].clone()
    }

    #[test]
    fn round_robin_with_stable_ports_balances() {
        let b = balance("frontend", "round_robin", &[40001, 40002, 40003]);
        let r = judge_one(&b, &b);
        assert!(r.pass, "{r:?}");
        assert!(r.checks.coverage.detail.contains("3 of 3 ready backends"));
        assert!(r.checks.reuse.detail.contains("the same 3 local port(s)"));
        assert!(r.checks.distribution.detail.contains("api-2 99"));
        assert_eq!(r.figures.ports_kept, 3);
        // A new connection at the end (say to a new backend) does not undo reuse.
        let mut end = b.clone();
        end["local_ports_end"] = json!([40001, 40002, 40003, 40004]);
        assert!(judge_one(&b, &end).checks.reuse.pass);
    }

    #[test]
    fn pick_first_fails_coverage_and_distribution() {
        let mut b = balance("frontend", "pick_first", &[40001]);
        b["connected"] = json!(1);
        b["connected_ready"] = json!(1);
        b["coverage"] = json!(1.0 / 3.0);
        b["skew"] = json!(3.0);
        b["requests_per_backend"] = json!({"api-1": 300, "api-2": 0, "api-3": 0});
        b["backends"][1]["connected"] = json!(false);
        b["backends"][1]["unconnected_seconds"] = json!(45.0);
        b["backends"][2]["connected"] = json!(false);
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
        let mut start = balance("frontend", "dial_per_request", &[50001]);
        start["opens"] = json!(300);
        start["opens_per_request"] = json!(1.0);
        start["ports_stable"] = json!(false);
        start["ports_reused"] = json!(0.0);
        let mut end = start.clone();
        end["local_ports_end"] = json!([50999]);
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
        let rr = balance("frontend", "round_robin", &[40001]);
        let report = evaluate(
            &name("shop/api"),
            None,
            Duration::from_secs(60),
            &snapshot(&[]),
            &snapshot(std::slice::from_ref(&rr)),
        );
        assert!(!report.balanced);
        assert!(
            report.clients[0]
                .checks
                .reuse
                .detail
                .starts_with("not seen at the start")
        );
        let empty = balance("frontend", "round_robin", &[]);
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
        let mut b = balance("frontend", "stale_resolver", &[40001, 40002]);
        b["ready"] = json!(4);
        b["connected"] = json!(2);
        b["connected_ready"] = json!(2);
        b["coverage"] = json!(0.5);
        b["skew"] = json!(2.0);
        b["requests_per_backend"] = json!({"api-1": 150, "api-2": 150, "api-3": 0, "api-4": 0});
        b["backends"] = json!([
            {"name": "api-1", "ready": true, "connected": true},
            {"name": "api-2", "ready": true, "connected": true},
            {"name": "api-3", "ready": true, "connected": false, "unconnected_seconds": 45.0},
            {"name": "api-4", "ready": true, "connected": false, "unconnected_seconds": 31.5}
        ]);
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
        let mut b = balance("frontend", "insufficient_data", &[40001]);
        b["requests"] = json!(3);
        let r = judge_one(&b, &b);
        assert!(!r.pass);
        assert!(
            r.checks
                .distribution
                .detail
                .starts_with("insufficient data")
        );

        let mut b = balance("frontend", "round_robin", &[40001]);
        b["skew"] = json!(1.6);
        let r = judge_one(&b, &b);
        assert!(!r.checks.distribution.pass);
        assert!(r.checks.distribution.detail.contains("skew above 1.5"));
        b["skew"] = Value::Null;
        assert!(!judge_one(&b, &b).checks.distribution.pass);
        b["skew"] = json!(1.5);
        assert!(
            judge_one(&b, &b).checks.distribution.pass,
            "1.5 is the bound"
        );
        b["verdict"] = json!("something_new");
        assert!(
            judge_one(&b, &b)
                .checks
                .distribution
                .detail
                .contains("unknown verdict")
        );

        let mut b = balance("frontend", "round_robin", &[40001]);
        b["ready"] = json!(0);
        b["coverage"] = Value::Null;
        let r = judge_one(&b, &b);
        assert!(!r.checks.coverage.pass);
        assert!(r.checks.coverage.detail.starts_with("no ready backends"));
    }

    #[test]
    fn reports_filter_clients_and_fail_closed_on_none() {
        let good = balance("good", "round_robin", &[1, 2, 3]);
        let bad = balance("bad", "pick_first", &[4]);
        let snap = snapshot(&[good, bad]);
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
        let none = evaluate(&svc, None, w, &snap, &snapshot(&[]));
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
        let good = balance("good", "round_robin", &[1, 2, 3]);
        let mut bad = balance("a-much-longer-client-name", "pick_first", &[4]);
        bad["skew"] = json!(3.0);
        let snap = snapshot(&[good, bad]);
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
