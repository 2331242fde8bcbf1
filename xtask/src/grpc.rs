//! gRPC lab workloads: real unary gRPC calls over cleartext HTTP/2 (h2c, prior knowledge) between
//! lab pods, with the client-side load-balancing policies whose effect fanout makes visible.
//!
//! There is no protobuf here: a call is an HTTP/2 `POST` to [`METHOD`] with
//! `content-type: application/grpc` and `te: trailers`, whose body is one length-prefixed message
//! (see [`frame`]) of opaque bytes. The server answers `:status 200`, one framed message, and the
//! trailer `grpc-status: 0`. The reply message is `<server name>\n<request message>`, so the client
//! knows which backend answered (see [`parse_reply`]). The client sends the HTTP/2 preface
//! directly (no TLS, no HTTP/1.1 upgrade), so every frame is visible in clear on the wire.
//!
//! - [`GrpcServer`] serves calls inside a pod, optionally with a maximum connection age (GOAWAY
//!   after that age, like gRPC servers' `MaxConnectionAge`), and counts connections and calls.
//! - [`GrpcClient`] (and the one-shot [`run_client`]) makes calls from a pod with one of the
//!   [`Policy`]s over a [`Target`].
//!
//! Every workload runs on its own thread that has entered the pod's network namespace, with a
//! current-thread tokio runtime: every socket it opens belongs to the pod. Every loop is bounded
//! by a count and a deadline.

use std::{
    collections::BTreeMap,
    fmt,
    net::{SocketAddr, TcpListener as StdTcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::Poll,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bytes::{BufMut as _, Bytes, BytesMut};
use h2::{RecvStream, client::SendRequest, server::SendResponse};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinSet,
};

use crate::lab::{LabError, Pod};

/// The one method every lab server implements (unary, opaque bytes in and out).
pub const METHOD: &str = "/fanout.lab.Echo/Call";
/// How long a server or client runs at most unless told otherwise.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);
/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 1 << 20;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a closing connection may take to finish before it is dropped outright.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `Drop`/`finish` wait for a workload thread before leaving it behind.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A call refused by connections that are going away is tried this many times in all.
const MAX_ATTEMPTS: usize = 5;
/// At most this many error strings are kept in a report.
const MAX_ERRORS: usize = 32;

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

/// Frames one gRPC message: compressed flag 0, 4-byte big-endian length, the message.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    // Messages are bounded by MAX_MESSAGE well below u32::MAX.
    b.put_u32(u32::try_from(msg.len()).unwrap_or(u32::MAX));
    b.put_slice(msg);
    b.freeze()
}

/// Errors decoding a framed gRPC message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("message frame truncated: {0} bytes")]
    Truncated(usize),
    #[error("compressed messages are not supported (flag {0})")]
    Compressed(u8),
    #[error("message length {declared} but {actual} bytes follow")]
    Length { declared: usize, actual: usize },
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
}

/// Decodes exactly one framed gRPC message (the whole body of a unary request or response).
pub fn unframe(buf: &[u8]) -> Result<&[u8], FrameError> {
    let Some((head, rest)) = buf.split_first_chunk::<5>() else {
        return Err(FrameError::Truncated(buf.len()));
    };
    if head[0] != 0 {
        return Err(FrameError::Compressed(head[0]));
    }
    let declared = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if declared > MAX_MESSAGE {
        return Err(FrameError::TooLarge(declared));
    }
    if declared != rest.len() {
        return Err(FrameError::Length {
            declared,
            actual: rest.len(),
        });
    }
    Ok(rest)
}

/// Splits a reply message into (server name, echoed request).
pub fn parse_reply(reply: &[u8]) -> Option<(&str, &[u8])> {
    let nl = reply.iter().position(|&b| b == b'\n')?;
    let name = std::str::from_utf8(&reply[..nl]).ok()?;
    Some((name, &reply[nl + 1..]))
}

fn push_error(errors: &mut Vec<String>, e: String) {
    if errors.len() < MAX_ERRORS {
        errors.push(e);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

/// Joins `thread` if it ends within `timeout`; otherwise leaves it running (it is bounded by its
/// own deadline) and says so.
fn join_bounded<T>(thread: JoinHandle<T>, timeout: Duration, what: &str) -> Option<T> {
    let end = Instant::now() + timeout;
    while !thread.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    if thread.is_finished() {
        thread.join().ok()
    } else {
        eprintln!("grpc: {what} did not stop within {timeout:?}; leaving it to its deadline");
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// How a [`GrpcServer`] behaves. Build with [`ServerOptions::new`] and struct update syntax.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Reported in every reply: what the client's per-backend counts are keyed by.
    pub name: String,
    /// Like gRPC's `MaxConnectionAge`: once a connection is this old the server sends GOAWAY
    /// (HTTP/2 graceful shutdown: GOAWAY, PING, final GOAWAY), lets in-flight calls finish and
    /// closes the connection. No jitter. `None`: connections live as long as the client wants.
    pub max_connection_age: Option<Duration>,
    /// Like `MaxConnectionAgeGrace`: how long after the GOAWAY a connection may stay before it
    /// is closed outright.
    pub max_connection_age_grace: Duration,
    /// The server stops by itself after this long.
    pub deadline: Duration,
}

impl ServerOptions {
    pub fn new(name: impl Into<String>) -> ServerOptions {
        ServerOptions {
            name: name.into(),
            max_connection_age: None,
            max_connection_age_grace: Duration::from_secs(5),
            deadline: DEFAULT_DEADLINE,
        }
    }
}

/// What a server has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// TCP connections accepted.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Calls answered with `grpc-status: 0`.
    pub calls: u64,
    /// Successful calls per client address (`ip:port` of the client's end). A client address
    /// appears as soon as its connection is accepted, with 0 calls. Two connections from the
    /// same client address (a reused port) share one entry.
    pub per_connection: BTreeMap<SocketAddr, u64>,
    /// Graceful shutdowns (GOAWAY) started because of `max_connection_age`.
    pub goaways: u64,
    /// Calls answered with an error status.
    pub failed_calls: u64,
    /// The first few errors (handshakes, bad requests, I/O).
    pub errors: Vec<String>,
}

struct ServerShared {
    name: String,
    stats: Mutex<ServerStats>,
}

impl ServerShared {
    fn update(&self, f: impl FnOnce(&mut ServerStats)) {
        if let Ok(mut s) = self.stats.lock() {
            f(&mut s);
        }
    }
}

/// A gRPC server listening in a pod. Stops (and closes every connection) when dropped, or when
/// its deadline passes.
pub struct GrpcServer {
    /// The address it listens on (the real port if started with port 0).
    pub addr: SocketAddr,
    pub name: String,
    shared: Arc<ServerShared>,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<Result<(), LabError>>>,
}

impl GrpcServer {
    /// Listens on `addr` inside `pod` (port 0 for any) and serves unary calls over h2c. Listen
    /// on `[::]:port` to serve IPv4 and IPv6 with one server.
    pub fn start(pod: &Pod, addr: SocketAddr, opts: ServerOptions) -> Result<GrpcServer> {
        let listener = pod
            .run(move || -> std::io::Result<StdTcpListener> {
                let l = StdTcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?
            .with_context(|| format!("listen on {addr} in {}", pod.netns))?;
        let addr = listener.local_addr().context("listener address")?;
        let rt = runtime()?;
        let shared = Arc::new(ServerShared {
            name: opts.name.clone(),
            stats: Mutex::new(ServerStats::default()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let shared2 = shared.clone();
        let thread = pod.spawn(move || {
            rt.block_on(serve(listener, opts, shared2, stop_rx));
            // Dropping the runtime here drops every connection task and closes its socket.
        });
        Ok(GrpcServer {
            addr,
            name: shared.name.clone(),
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// A snapshot of the server's counters.
    pub fn stats(&self) -> ServerStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Stops the server, closes its connections, and returns the final counters.
    pub fn stop(mut self) -> ServerStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let what = format!("gRPC server {}", self.name);
            if let Some(Err(e)) = join_bounded(t, JOIN_TIMEOUT, &what) {
                eprintln!("grpc: {what}: {e}");
            }
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(
    listener: StdTcpListener,
    opts: ServerOptions,
    shared: Arc<ServerShared>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            shared.update(|s| push_error(&mut s.errors, format!("listener: {e}")));
            return;
        }
    };
    let end = tokio::time::Instant::now() + opts.deadline;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            // Also fires when the GrpcServer is gone (sender dropped).
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(end) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            acc = listener.accept() => match acc {
                Ok((sock, peer)) => {
                    // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
                    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                    shared.update(|s| {
                        s.connections += 1;
                        s.active += 1;
                        s.per_connection.entry(peer).or_insert(0);
                    });
                    conns.spawn(serve_conn(sock, peer, opts.clone(), shared.clone()));
                }
                Err(e) => {
                    shared.update(|s| push_error(&mut s.errors, format!("accept: {e}")));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// Decrements the active count however a connection task ends (also when it is dropped).
struct ActiveGuard(Arc<ServerShared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.update(|s| s.active = s.active.saturating_sub(1));
    }
}

async fn serve_conn(
    sock: TcpStream,
    peer: SocketAddr,
    opts: ServerOptions,
    shared: Arc<ServerShared>,
) {
    let _guard = ActiveGuard(shared.clone());
    let _ = sock.set_nodelay(true);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2::server::handshake(sock)).await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            shared.update(|s| push_error(&mut s.errors, format!("handshake from {peer}: {e}")));
            return;
        }
        Err(_) => {
            shared.update(|s| push_error(&mut s.errors, format!("handshake from {peer}: timeout")));
            return;
        }
    };
    let born = tokio::time::Instant::now();
    // Far enough to never fire within any deadline.
    let never = born + Duration::from_secs(365 * 24 * 3600);
    let mut goaway_at: Option<tokio::time::Instant> = None;
    let mut calls = JoinSet::new();
    loop {
        let timer = match (goaway_at, opts.max_connection_age) {
            (Some(at), _) => at + opts.max_connection_age_grace,
            (None, Some(age)) => born + age,
            (None, None) => never,
        };
        tokio::select! {
            req = conn.accept() => match req {
                Some(Ok((req, respond))) => {
                    calls.spawn(serve_call(req, respond, peer, shared.clone()));
                }
                Some(Err(e)) => {
                    // A client going away abruptly is normal; anything else is worth a note.
                    if !e.is_io() && !e.is_go_away() {
                        shared.update(|s| push_error(&mut s.errors, format!("connection from {peer}: {e}")));
                    }
                    break;
                }
                // Closed: by the client, or the graceful shutdown has completed.
                None => break,
            },
            _ = tokio::time::sleep_until(timer) => {
                if goaway_at.is_some() {
                    // Grace is over: close with whatever is still in flight.
                    break;
                }
                conn.graceful_shutdown();
                goaway_at = Some(tokio::time::Instant::now());
                shared.update(|s| s.goaways += 1);
            }
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
    // Dropping `conn` closes the socket; dropping `calls` aborts unfinished calls.
}

/// A gRPC error status: code and message.
#[derive(Debug)]
struct Status(u32, String);

async fn serve_call(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    shared: Arc<ServerShared>,
) {
    let result = answer(req, &shared.name).await;
    let ok = match result {
        Ok(reply) => send_reply(&mut respond, reply).await,
        Err(Status(code, msg)) => {
            let mut resp = grpc_response();
            let h = resp.headers_mut();
            h.insert("grpc-status", HeaderValue::from(code));
            if let Ok(v) = HeaderValue::from_str(&msg) {
                h.insert("grpc-message", v);
            }
            // Trailers-only response: the status goes in the headers, which end the stream.
            let _ = respond.send_response(resp, true);
            Err(format!("call from {peer}: status {code}: {msg}"))
        }
    };
    shared.update(|s| match ok {
        Ok(()) => {
            s.calls += 1;
            *s.per_connection.entry(peer).or_insert(0) += 1;
        }
        Err(e) => {
            s.failed_calls += 1;
            push_error(&mut s.errors, e);
        }
    });
}

fn grpc_response() -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// Reads and checks the request; returns the reply message.
async fn answer(req: Request<RecvStream>, name: &str) -> Result<Vec<u8>, Status> {
    let (parts, mut body) = req.into_parts();
    if parts.method != Method::POST {
        return Err(Status(12, format!("method {} is not POST", parts.method)));
    }
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if !grpc {
        return Err(Status(3, "content-type is not application/grpc".into()));
    }
    if parts.uri.path() != METHOD {
        return Err(Status(12, format!("unknown method {}", parts.uri.path())));
    }
    let buf = read_body(&mut body)
        .await
        .map_err(|e| Status(13, format!("request body: {e}")))?;
    let msg = unframe(&buf).map_err(|e| Status(13, e.to_string()))?;
    let mut reply = Vec::with_capacity(name.len() + 1 + msg.len());
    reply.extend_from_slice(name.as_bytes());
    reply.push(b'\n');
    reply.extend_from_slice(msg);
    Ok(reply)
}

async fn send_reply(respond: &mut SendResponse<Bytes>, reply: Vec<u8>) -> Result<(), String> {
    let mut stream = respond
        .send_response(grpc_response(), false)
        .map_err(|e| format!("send headers: {e}"))?;
    stream
        .send_data(frame(&reply), false)
        .map_err(|e| format!("send data: {e}"))?;
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    stream
        .send_trailers(trailers)
        .map_err(|e| format!("send trailers: {e}"))
}

/// Reads a whole request or response body (bounded by [`MAX_MESSAGE`]).
async fn read_body(body: &mut RecvStream) -> Result<BytesMut, String> {
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if buf.len() + chunk.len() > MAX_MESSAGE + 5 {
            return Err(format!("body larger than {} bytes", MAX_MESSAGE + 5));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// Client-side load balancing, as gRPC clients do it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// gRPC's default. Resolve, try the addresses in order, keep the first connection that
    /// works, and send every call over it (multiplexed). When that connection goes away (GOAWAY
    /// or close), resolve again and connect the same way.
    PickFirst,
    /// One connection per resolved address; calls rotate over the connections that are up, in
    /// address order. The target is resolved again only when a connection goes away (GOAWAY or
    /// close, noticed before the next call): addresses added to the resolver meanwhile are not
    /// discovered while every connection stays up.
    RoundRobin,
    /// A new TCP + HTTP/2 connection for every call, closed after it. Resolves for every call
    /// and takes the addresses in rotation: call `i` goes to address `i mod n`.
    DialPerRequest,
}

/// What a client calls.
#[derive(Clone)]
pub enum Target {
    /// A fixed address list, what a DNS lookup of a headless service returns.
    Addrs(Vec<SocketAddr>),
    /// A resolver, called whenever the client (re-)resolves; it may return different addresses
    /// over time.
    Resolver(Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync>),
    /// A ClusterIP: one virtual address, DNAT'ed per connection by the node.
    Vip(SocketAddr),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addrs(a) => f.debug_tuple("Addrs").field(a).finish(),
            Target::Resolver(_) => f.write_str("Resolver(..)"),
            Target::Vip(v) => f.debug_tuple("Vip").field(v).finish(),
        }
    }
}

impl Target {
    fn resolve(&self) -> Vec<SocketAddr> {
        let mut addrs = match self {
            Target::Addrs(a) => a.clone(),
            Target::Resolver(f) => f(),
            Target::Vip(v) => vec![*v],
        };
        // Deduplicate, keeping the first occurrence's position.
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(*a));
        addrs
    }
}

/// One connection a client opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionRecord {
    /// The client's end (pod IP and local port).
    pub local: SocketAddr,
    /// The address dialled (a backend, or the VIP for [`Target::Vip`]).
    pub remote: SocketAddr,
    /// Calls that succeeded over it.
    pub calls: usize,
    /// From the end of the HTTP/2 handshake until the client saw it end or closed it; `None`
    /// while it is open.
    pub lifetime: Option<Duration>,
    /// The server ended it (GOAWAY or close) rather than this client.
    pub ended_by_server: bool,
}

/// What a client did. [`GrpcClient::calls`] returns one per batch (counts of that batch, the
/// connections opened during it); [`GrpcClient::finish`] and [`run_client`] the totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientReport {
    /// Calls started.
    pub attempted: usize,
    /// Calls that got `grpc-status: 0` and a well-formed reply echoing the request.
    pub succeeded: usize,
    /// Calls that were refused by a connection that was going away (GOAWAY) and sent again on
    /// another connection, as gRPC's transparent retry does (at most 5 tries in all). Counted
    /// once per call.
    pub retried: usize,
    /// Successful calls per server name (from the replies).
    pub per_backend: BTreeMap<String, usize>,
    /// Connections established (TCP connect and HTTP/2 handshake both done).
    pub connections_opened: usize,
    /// Connection attempts that failed (refused, timed out, handshake failed).
    pub connect_failures: usize,
    /// Times the target was resolved.
    pub resolutions: usize,
    /// The connections opened, in order.
    pub connections: Vec<ConnectionRecord>,
    /// The first few errors.
    pub errors: Vec<String>,
}

impl ClientReport {
    /// Calls that did not succeed.
    pub fn failed(&self) -> usize {
        self.attempted - self.succeeded
    }

    /// The local address of every connection opened, in order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.connections.iter().map(|c| c.local).collect()
    }

    /// Connections opened to `remote`.
    pub fn connections_to(&self, remote: SocketAddr) -> usize {
        self.connections
            .iter()
            .filter(|c| c.remote == remote)
            .count()
    }

    /// Successful calls served by the backend named `name`.
    pub fn calls_to(&self, name: &str) -> usize {
        self.per_backend.get(name).copied().unwrap_or(0)
    }

    /// What happened since `earlier` (a snapshot of the same client).
    fn since(&self, earlier: &ClientReport) -> ClientReport {
        let per_backend = self
            .per_backend
            .iter()
            .map(|(k, &v)| {
                (
                    k.clone(),
                    v - earlier.per_backend.get(k).copied().unwrap_or(0),
                )
            })
            .filter(|&(_, v)| v > 0)
            .collect();
        ClientReport {
            attempted: self.attempted - earlier.attempted,
            succeeded: self.succeeded - earlier.succeeded,
            retried: self.retried - earlier.retried,
            per_backend,
            connections_opened: self.connections_opened - earlier.connections_opened,
            connect_failures: self.connect_failures - earlier.connect_failures,
            resolutions: self.resolutions - earlier.resolutions,
            connections: self.connections[earlier.connections.len()..].to_vec(),
            errors: self.errors[earlier.errors.len()..].to_vec(),
        }
    }
}

/// Live counters of a running client (see [`GrpcClient::progress`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub attempted: usize,
    pub succeeded: usize,
    pub connections_opened: usize,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicUsize,
    succeeded: AtomicUsize,
    connections_opened: AtomicUsize,
}

/// Stops a running client from any thread: the current batch ends after the call in flight,
/// and the client closes its connections.
#[derive(Clone)]
pub struct StopHandle(Arc<watch::Sender<bool>>);

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

enum Cmd {
    Batch {
        calls: usize,
        pace: Duration,
        reply: std::sync::mpsc::Sender<ClientReport>,
    },
    Finish,
}

/// A gRPC client living in a pod. Its connections persist between batches of calls, so a test
/// can change the world (add a backend to the resolver, say) between two batches.
///
/// ```no_run
/// # use xtask::{grpc::*, lab::Lab};
/// # use std::time::Duration;
/// # fn f(lab: &Lab, addrs: Vec<std::net::SocketAddr>) -> anyhow::Result<()> {
/// let client = GrpcClient::start(lab.pod(0), Policy::RoundRobin, Target::Addrs(addrs),
///                                Duration::from_secs(30))?;
/// let first = client.calls(20, Duration::from_millis(5))?;
/// let total = client.finish()?;
/// # Ok(()) }
/// ```
pub struct GrpcClient {
    cmds: mpsc::UnboundedSender<Cmd>,
    stop: StopHandle,
    counters: Arc<Counters>,
    report: Arc<Mutex<ClientReport>>,
    end: Instant,
    thread: Option<JoinHandle<Result<(), LabError>>>,
}

impl GrpcClient {
    /// Starts a client in `pod`. It connects on the first call. It stops by itself once
    /// `deadline` has passed (calls in progress end then too).
    pub fn start(
        pod: &Pod,
        policy: Policy,
        target: Target,
        deadline: Duration,
    ) -> Result<GrpcClient> {
        let rt = runtime()?;
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let report = Arc::new(Mutex::new(ClientReport::default()));
        let end = Instant::now() + deadline;
        let actor = Actor {
            policy,
            target,
            end: tokio::time::Instant::from_std(end),
            stop: stop_rx,
            counters: counters.clone(),
            shared: report.clone(),
            report: ClientReport::default(),
            conns: Vec::new(),
            next: 0,
            seq: 0,
        };
        let thread = pod.spawn(move || rt.block_on(actor.run(cmd_rx)));
        Ok(GrpcClient {
            cmds,
            stop: StopHandle(Arc::new(stop_tx)),
            counters,
            report,
            end,
            thread: Some(thread),
        })
    }

    /// Makes `n` calls one after the other, waiting `pace` after each, and returns what this
    /// batch did. Ends early at the client's deadline or when stopped.
    pub fn calls(&self, n: usize, pace: Duration) -> Result<ClientReport> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.cmds
            .send(Cmd::Batch {
                calls: n,
                pace,
                reply,
            })
            .map_err(|_| anyhow!("the gRPC client has stopped"))?;
        let wait = self.end.saturating_duration_since(Instant::now()) + JOIN_TIMEOUT;
        rx.recv_timeout(wait)
            .map_err(|e| anyhow!("the gRPC client did not finish the batch: {e}"))
    }

    /// Live counters (updated after every call and connection).
    pub fn progress(&self) -> Progress {
        Progress {
            attempted: self.counters.attempted.load(Ordering::Relaxed),
            succeeded: self.counters.succeeded.load(Ordering::Relaxed),
            connections_opened: self.counters.connections_opened.load(Ordering::Relaxed),
        }
    }

    /// The totals as of the end of the last batch.
    pub fn report(&self) -> ClientReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// A handle that stops this client from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Closes every connection, stops the client and returns the totals.
    pub fn finish(mut self) -> Result<ClientReport> {
        self.shutdown()?;
        Ok(self.report())
    }

    fn shutdown(&mut self) -> Result<()> {
        let _ = self.cmds.send(Cmd::Finish);
        let Some(t) = self.thread.take() else {
            return Ok(());
        };
        // A batch in progress finishes first; it is bounded by the deadline.
        let wait = self.end.saturating_duration_since(Instant::now()) + JOIN_TIMEOUT;
        match join_bounded(t, wait, "gRPC client") {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(e.into()),
            None => bail!("the gRPC client thread did not stop"),
        }
    }
}

impl Drop for GrpcClient {
    fn drop(&mut self) {
        self.stop.stop();
        if let Err(e) = self.shutdown() {
            eprintln!("grpc: {e}");
        }
    }
}

/// Runs a client in `pod` that makes `calls` calls (waiting `pace` after each) with `policy`
/// over `target`, closes its connections, and returns what it did. Blocks; bounded by
/// `deadline`.
pub fn run_client(
    pod: &Pod,
    policy: Policy,
    target: Target,
    calls: usize,
    pace: Duration,
    deadline: Duration,
) -> Result<ClientReport> {
    let client = GrpcClient::start(pod, policy, target, deadline)?;
    client.calls(calls, pace)?;
    client.finish()
}

/// An open client connection.
struct Conn {
    /// Index into `report.connections`.
    rec: usize,
    remote: SocketAddr,
    send: SendRequest<Bytes>,
    /// Drives the HTTP/2 connection; ends when it closes.
    driver: tokio::task::JoinHandle<()>,
    opened: tokio::time::Instant,
}

impl Conn {
    /// Whether new calls can still go over this connection: not closed, no GOAWAY received.
    fn usable(&mut self) -> bool {
        if self.driver.is_finished() {
            return false;
        }
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        !matches!(self.send.poll_ready(&mut cx), Poll::Ready(Err(_)))
    }
}

/// Why a call failed.
enum CallError {
    /// The call never reached the server (the connection was going away): safe to send again.
    Refused(String),
    Failed(String),
}

struct Actor {
    policy: Policy,
    target: Target,
    end: tokio::time::Instant,
    stop: watch::Receiver<bool>,
    counters: Arc<Counters>,
    shared: Arc<Mutex<ClientReport>>,
    /// Cumulative.
    report: ClientReport,
    /// PickFirst: at most one. RoundRobin: one per address of the last resolution that
    /// connected, in address order.
    conns: Vec<Conn>,
    /// Round-robin position, and DialPerRequest's rotation.
    next: usize,
    /// Calls made, to make every request message distinct.
    seq: u64,
}

impl Actor {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        loop {
            let cmd = tokio::select! {
                c = cmds.recv() => c,
                _ = tokio::time::sleep_until(self.end) => None,
                _ = self.stop.changed() => None,
            };
            match cmd {
                Some(Cmd::Batch { calls, pace, reply }) => {
                    let before = self.report.clone();
                    self.batch(calls, pace).await;
                    self.publish();
                    let _ = reply.send(self.report.since(&before));
                }
                Some(Cmd::Finish) | None => break,
            }
        }
        for c in std::mem::take(&mut self.conns) {
            self.close(c, false, true).await;
        }
        self.publish();
    }

    fn publish(&self) {
        if let Ok(mut r) = self.shared.lock() {
            *r = self.report.clone();
        }
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow() || tokio::time::Instant::now() >= self.end
    }

    fn error(&mut self, e: String) {
        push_error(&mut self.report.errors, e);
    }

    async fn batch(&mut self, calls: usize, pace: Duration) {
        for _ in 0..calls {
            if self.stopped() {
                break;
            }
            self.one_call().await;
            if !pace.is_zero() {
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pace) => {}
                    _ = tokio::time::sleep_until(self.end) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }

    async fn one_call(&mut self) {
        self.report.attempted += 1;
        self.counters.attempted.fetch_add(1, Ordering::Relaxed);
        self.seq += 1;
        let msg = format!("call {}", self.seq).into_bytes();
        let ok = match self.policy {
            Policy::DialPerRequest => self.call_dialled(&msg).await,
            Policy::PickFirst | Policy::RoundRobin => self.call_pooled(&msg).await,
        };
        if ok {
            self.report.succeeded += 1;
            self.counters.succeeded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// PickFirst and RoundRobin: over the pooled connections. When the connection picked turns
    /// out to be going away (several may get their GOAWAY at about the same time), the call is
    /// sent again on the next one, up to `MAX_ATTEMPTS` times in all.
    async fn call_pooled(&mut self, msg: &[u8]) -> bool {
        for attempt in 0..MAX_ATTEMPTS {
            self.prepare().await;
            if self.conns.is_empty() {
                self.error("no connection to any resolved address".into());
                return false;
            }
            let i = match self.policy {
                Policy::RoundRobin => {
                    let i = self.next % self.conns.len();
                    self.next = self.next.wrapping_add(1);
                    i
                }
                _ => 0,
            };
            let (remote, send) = (self.conns[i].remote, self.conns[i].send.clone());
            match self.unary(send, remote, msg).await {
                Ok(name) => {
                    let rec = self.conns[i].rec;
                    self.report.connections[rec].calls += 1;
                    *self.report.per_backend.entry(name).or_insert(0) += 1;
                    return true;
                }
                Err(CallError::Refused(e)) => {
                    // The connection is going away; `prepare` replaces it.
                    if attempt == 0 {
                        self.report.retried += 1;
                    }
                    if attempt + 1 == MAX_ATTEMPTS {
                        self.error(e);
                    }
                }
                Err(CallError::Failed(e)) => {
                    self.error(e);
                    return false;
                }
            }
        }
        false
    }

    /// Drops connections that went away and, if any did (or there are none), resolves again and
    /// connects as the policy says.
    async fn prepare(&mut self) {
        let mut dropped = false;
        let mut i = 0;
        while i < self.conns.len() {
            if self.conns[i].usable() {
                i += 1;
            } else {
                let c = self.conns.remove(i);
                self.close(c, true, false).await;
                dropped = true;
            }
        }
        if !dropped && !self.conns.is_empty() {
            return;
        }
        let addrs = self.resolve();
        match self.policy {
            Policy::PickFirst => {
                if self.conns.is_empty() {
                    for a in addrs {
                        if self.stopped() {
                            break;
                        }
                        if let Some(c) = self.open(a).await {
                            self.conns.push(c);
                            break;
                        }
                    }
                }
            }
            _ => {
                // Keep live connections to addresses still resolved, connect to the others,
                // close the ones no longer resolved; order follows the resolution.
                let mut old = std::mem::take(&mut self.conns);
                for a in addrs {
                    if let Some(pos) = old.iter().position(|c| c.remote == a) {
                        self.conns.push(old.remove(pos));
                    } else if !self.stopped()
                        && let Some(c) = self.open(a).await
                    {
                        self.conns.push(c);
                    }
                }
                for c in old {
                    self.close(c, false, false).await;
                }
            }
        }
    }

    fn resolve(&mut self) -> Vec<SocketAddr> {
        self.report.resolutions += 1;
        let addrs = self.target.resolve();
        if addrs.is_empty() {
            self.error("the target resolved to no address".into());
        }
        addrs
    }

    /// DialPerRequest: connect, call, close.
    async fn call_dialled(&mut self, msg: &[u8]) -> bool {
        let addrs = self.resolve();
        if addrs.is_empty() {
            return false;
        }
        let a = addrs[self.next % addrs.len()];
        self.next = self.next.wrapping_add(1);
        let Some(c) = self.open(a).await else {
            return false;
        };
        let result = self.unary(c.send.clone(), a, msg).await;
        let ok = match result {
            Ok(name) => {
                self.report.connections[c.rec].calls += 1;
                *self.report.per_backend.entry(name).or_insert(0) += 1;
                true
            }
            Err(CallError::Refused(e) | CallError::Failed(e)) => {
                self.error(e);
                false
            }
        };
        self.close(c, false, true).await;
        ok
    }

    /// TCP connect and HTTP/2 handshake (prior knowledge), bounded in time.
    async fn open(&mut self, addr: SocketAddr) -> Option<Conn> {
        let left = self
            .end
            .saturating_duration_since(tokio::time::Instant::now());
        let connect = async {
            let sock = tokio::time::timeout(CONNECT_TIMEOUT.min(left), TcpStream::connect(addr))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| format!("connect: {e}"))?;
            let _ = sock.set_nodelay(true);
            let local = sock
                .local_addr()
                .map_err(|e| format!("local address: {e}"))?;
            let (send, conn) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT.min(left), h2::client::handshake(sock))
                    .await
                    .map_err(|_| "HTTP/2 handshake timed out".to_string())?
                    .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            Ok::<_, String>((local, send, conn))
        };
        match connect.await {
            Ok((local, send, conn)) => {
                let driver = tokio::spawn(async move {
                    let _ = conn.await;
                });
                self.report.connections_opened += 1;
                self.counters
                    .connections_opened
                    .fetch_add(1, Ordering::Relaxed);
                self.report.connections.push(ConnectionRecord {
                    local,
                    remote: addr,
                    calls: 0,
                    lifetime: None,
                    ended_by_server: false,
                });
                Some(Conn {
                    rec: self.report.connections.len() - 1,
                    remote: addr,
                    send,
                    driver,
                    opened: tokio::time::Instant::now(),
                })
            }
            Err(e) => {
                self.report.connect_failures += 1;
                self.error(format!("{addr}: {e}"));
                None
            }
        }
    }

    /// Closes a connection: dropping the last request handle makes h2 send GOAWAY and close.
    /// With `wait`, waits (bounded) for the close; otherwise it finishes in the background.
    async fn close(&mut self, c: Conn, by_server: bool, wait: bool) {
        let rec = &mut self.report.connections[c.rec];
        rec.lifetime = Some(c.opened.elapsed());
        rec.ended_by_server = by_server;
        drop(c.send);
        let driver = c.driver;
        let abort = driver.abort_handle();
        let finish = async move {
            if tokio::time::timeout(CLOSE_TIMEOUT, driver).await.is_err() {
                abort.abort();
            }
        };
        if wait {
            finish.await;
        } else {
            tokio::spawn(finish);
        }
    }

    /// One unary call over `send`; returns the name of the server that answered.
    async fn unary(
        &mut self,
        send: SendRequest<Bytes>,
        authority: SocketAddr,
        msg: &[u8],
    ) -> Result<String, CallError> {
        let left = self
            .end
            .saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(CALL_TIMEOUT.min(left), unary_call(send, authority, msg)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Failed(format!("call to {authority}: timed out"))),
        }
    }
}

/// Whether an h2 error means the request was never processed (sent above the GOAWAY's last
/// stream id, or refused): gRPC retries those transparently.
fn refused(e: &h2::Error) -> bool {
    (e.is_go_away() && e.is_remote()) || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

async fn unary_call(
    send: SendRequest<Bytes>,
    authority: SocketAddr,
    msg: &[u8],
) -> Result<String, CallError> {
    let fail =
        |what: &str, e: String| CallError::Failed(format!("call to {authority}: {what}: {e}"));
    let mut send = send
        .ready()
        .await
        .map_err(|e| CallError::Refused(format!("call to {authority}: connection: {e}")))?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{authority}{METHOD}"))
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(())
        .map_err(|e| fail("request", e.to_string()))?;
    let (response, mut stream) = send
        .send_request(req, false)
        .map_err(|e| CallError::Refused(format!("call to {authority}: send: {e}")))?;
    let classify = |what: &str, e: h2::Error| {
        if refused(&e) {
            CallError::Refused(format!("call to {authority}: {what}: {e}"))
        } else {
            fail(what, e.to_string())
        }
    };
    stream
        .send_data(frame(msg), true)
        .map_err(|e| classify("send data", e))?;
    let resp = response.await.map_err(|e| classify("response", e))?;
    let (parts, mut body) = resp.into_parts();
    if parts.status != StatusCode::OK {
        return Err(fail("HTTP status", parts.status.to_string()));
    }
    // Trailers-only response: the status is in the headers.
    if let Some(Status(code, m)) = grpc_status(&parts.headers)
        && (code != 0 || body.is_end_stream())
    {
        return Err(fail("grpc-status", format!("{code} {m}")));
    }
    let buf = read_body(&mut body)
        .await
        .map_err(|e| fail("response body", e))?;
    let trailers = body
        .trailers()
        .await
        .map_err(|e| fail("trailers", e.to_string()))?
        .unwrap_or_default();
    match grpc_status(&trailers) {
        Some(Status(0, _)) => {}
        Some(Status(code, m)) => return Err(fail("grpc-status", format!("{code} {m}"))),
        None => return Err(fail("trailers", "no grpc-status".into())),
    }
    let reply = unframe(&buf).map_err(|e| fail("reply", e.to_string()))?;
    let (name, echo) = parse_reply(reply).ok_or_else(|| fail("reply", "no server name".into()))?;
    if echo != msg {
        return Err(fail("reply", "does not echo the request".into()));
    }
    Ok(name.to_string())
}

fn grpc_status(h: &HeaderMap) -> Option<Status> {
    let code = h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let msg = h
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some(Status(code, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = frame(b"hello");
        assert_eq!(&f[..], b"\0\0\0\0\x05hello");
        assert_eq!(unframe(&f), Ok(&b"hello"[..]));
        assert_eq!(unframe(&frame(b"")), Ok(&b""[..]));
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(unframe(b"\0\0\0"), Err(FrameError::Truncated(3)));
        assert_eq!(unframe(b"\x01\0\0\0\0"), Err(FrameError::Compressed(1)));
        assert_eq!(
            unframe(b"\0\0\0\0\x03ab"),
            Err(FrameError::Length {
                declared: 3,
                actual: 2
            })
        );
        assert_eq!(
            unframe(b"\0\x7f\0\0\0"),
            Err(FrameError::TooLarge(0x7f00_0000))
        );
    }

    #[test]
    fn parses_replies() {
        assert_eq!(
            parse_reply(b"backend-1\ncall 1"),
            Some(("backend-1", &b"call 1"[..]))
        );
        assert_eq!(parse_reply(b"no newline"), None);
    }

    #[test]
    fn resolution_dedups_in_order() {
        let a: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:1".parse().expect("addr");
        assert_eq!(Target::Addrs(vec![b, a, b]).resolve(), vec![b, a]);
        assert_eq!(Target::Vip(a).resolve(), vec![a]);
    }
}
