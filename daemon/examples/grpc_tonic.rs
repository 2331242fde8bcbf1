//! A real gRPC client and server on tonic (hyper 1, h2 0.4, tower; rustls with ring for TLS) for
//! fanout's root end-to-end tests (`tests/real_clients.rs`, stack `Tonic`): the same protocol as
//! `tests/support/grpc_py/client.py` and `server.py`, with no protoc and no build script. Messages
//! are opaque bytes (a byte [`Codec`]); the client calls through [`tonic::client::Grpc`], the server
//! is a hand-written tower service routing the two paths to [`tonic::server::Grpc`], as tonic's
//! codegen would.
//!
//! `grpc_tonic server --addr HOST:PORT --name NAME [--tls-cert PEM --tls-key PEM]
//! [--max-connection-age-ms MS] [--deadline-s S]` serves `/fanout.lab.Echo/Call` (unary: the reply
//! is `<name>\n<request>`) and `/fanout.lab.Echo/Stream` (server streaming: `<name>\n<i>` for i in
//! 0..3). It prints `listening <port>` once bound, serves until stdin closes, SIGTERM or
//! `--deadline-s`, stops (GOAWAY to every connection, 1 s of grace) and prints one JSON line
//! `{"name", "answered", "unary", "streams"}` (a stream counts once its three messages were sent).
//! MaxConnectionAge is tonic's `Server::max_connection_age`: a graceful shutdown (GOAWAY, in-flight
//! calls finish) of each connection that old. hyper's HTTP/2 server acks every PING and has no
//! ping-strike policy, so clients may ping as often as they like.
//!
//! `grpc_tonic client --target ipv4:A:P[,B:P…] --policy pick_first|round_robin|per_call
//! [--tls-ca PEM] [--authority NAME] [--pace-ms MS] [--duration-s S] [--max-calls N] [--stream]
//! [--keepalive-ms MS]` calls `Call` (or `Stream`) one call at a time, `--pace-ms` apart, until
//! stdin closes or `--duration-s` passes. It prints `first ok` after the first success, then one
//! JSON line `{"ok", "failed", "per_backend": {name: n}, "channels", "errors": [...], "retried",
//! "retried_maybe_sent", "keepalive_acks"}`. tonic has no gRPC load-balancing policies, so the policies map to:
//! - `pick_first`: one channel to the FIRST address of the list (tonic has no pick_first over an
//!   address list; gRPC's pick_first also uses the first address while it answers);
//! - `round_robin`: `Channel::balance_list` over every address: tower's power-of-two-choices
//!   balancer (least pending requests of two random ready backends), one connection per address;
//!   tonic's balancing, not a strict rotation, but it spreads calls over every backend;
//! - `per_call`: a new channel (`Endpoint::connect`) to the first address for each call, dropped
//!   after it: one TCP connection per call.
//!
//! tonic has no transparent retry either: a call its balancer put on a connection that a
//! MaxConnectionAge GOAWAY is closing fails ("operation was canceled: connection closed", or h2's
//! GOAWAY error for a stream opened after it). Such a call was never processed by the server, so
//! the client sends it again, as gRPC's transparent retry does (at most twice; `retried` counts
//! these): `ok` stays equal to what the servers answered. `retried_maybe_sent` counts those whose
//! failed attempt may have been on the wire: h2 reports a stream the server refused after it was
//! sent (above the final GOAWAY's last stream id, or REFUSED_STREAM) with the same error as a
//! stream it did not open because the GOAWAY had arrived; only hyper's cancellation is certainly
//! before sending.
//!
//! TLS: the CA of `--tls-ca`, the server name checked (and sent as SNI) is `--authority`.
//! Keepalive: hyper's HTTP/2 keepalive (`http2_keep_alive_interval`, `keep_alive_while_idle`, 5 s
//! timeout); BDP pings (adaptive window) stay off, so every PING the client sends is a keepalive.
//! `keepalive_acks` counts their acks: h2 emits the trace event `recv PING USER ack` (target
//! `h2::proto::ping_pong`) for each ack of a user PING, which is how hyper sends keepalives; a small
//! tracing layer counts those (0 without `--keepalive-ms`: no PING is sent then).
//! stdout carries only `listening`, `first ok` and the JSON line; diagnostics go to stderr
//! (`RUST_LOG` turns on tracing output there).
//!
//! Interop note: h2 (hence this server) resets with PROTOCOL_ERROR every request whose
//! `:authority` is not a valid URI authority, and grpcio sends its whole target
//! (`127.0.0.1:1,127.0.0.1:2`) as `:authority` for an address list: grpcio clients of a list
//! cannot call tonic servers (a single address works). The tests pair each stack with itself.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    io::{Read as _, Write as _},
    net::{SocketAddr, ToSocketAddrs as _},
    path::PathBuf,
    pin::Pin,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::Stream;
use http::uri::PathAndQuery;
use tokio::{sync::watch, time::Instant};
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    server::{NamedService, ServerStreamingService, UnaryService},
    transport::{
        Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
        server::TcpIncoming,
    },
};
use tracing_subscriber::{Layer as _, layer::SubscriberExt as _, util::SubscriberInitExt as _};

const SERVICE: &str = "fanout.lab.Echo";
const CALL: &str = "/fanout.lab.Echo/Call";
const STREAM: &str = "/fanout.lab.Echo/Stream";
/// Every call's deadline (grpc-timeout, and the client's own bound), as the Python client's.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping servers wait for their connections to close (grpcio's `stop(1.0)`).
const GRACE: Duration = Duration::from_secs(1);
/// The errors a client report keeps, and how long each may be.
const MAX_ERRORS: usize = 10;
const MAX_ERROR_LEN: usize = 300;
/// A streaming reply has 3 messages: a longer one is read this far, then counted as wrong.
const MAX_STREAM_MESSAGES: usize = 16;
/// How often a call the server certainly did not process is sent again.
const TRANSPARENT_RETRIES: u32 = 2;
/// h2's trace event for an acknowledged user PING (hyper's keepalive).
const PING_ACK_TARGET: &str = "h2::proto::ping_pong";
const PING_ACK_MESSAGE: &str = "recv PING USER ack";

#[derive(Parser)]
#[command(
    name = "grpc_tonic",
    about = "tonic gRPC client and server of fanout's tests"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Serve `/fanout.lab.Echo/{Call,Stream}` until stdin closes, SIGTERM or the deadline.
    Server(ServerArgs),
    /// Call a target with a policy until stdin closes or the duration passes.
    Client(ClientArgs),
}

#[derive(Args)]
struct ServerArgs {
    /// host:port to listen on.
    #[arg(long)]
    addr: String,
    /// Backend name put in every reply.
    #[arg(long)]
    name: String,
    /// Certificate chain (PEM): TLS instead of h2c.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// GOAWAY each connection once it is this old (0: never).
    #[arg(long)]
    max_connection_age_ms: Option<u64>,
    #[arg(long, default_value_t = 120.0)]
    deadline_s: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Policy {
    PickFirst,
    RoundRobin,
    PerCall,
}

#[derive(Args)]
struct ClientArgs {
    /// `ipv4:A:P,B:P` (an address list, as a headless service resolves) or `ipv4:VIP:P`.
    #[arg(long)]
    target: String,
    #[arg(long, value_enum)]
    policy: Policy,
    /// CA certificate (PEM): TLS instead of h2c.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// TLS: the name the certificate is checked against.
    #[arg(long, default_value = "backend.fanout.test")]
    authority: String,
    #[arg(long, default_value_t = 40.0)]
    pace_ms: f64,
    #[arg(long, default_value_t = 60.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 100_000)]
    max_calls: u64,
    /// Server-streaming calls.
    #[arg(long)]
    stream: bool,
    /// HTTP/2 keepalive PINGs this often (0: none).
    #[arg(long)]
    keepalive_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let acks = Arc::new(AtomicU64::new(0));
    let counting = matches!(&cli.role, Role::Client(a) if a.keepalive_ms.is_some_and(|ms| ms > 0));
    init_tracing(counting.then(|| acks.clone()));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the tokio runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = match cli.role {
        Role::Server(a) => rt.block_on(server(a)),
        Role::Client(a) => rt.block_on(client(a, acks)),
    };
    // Connection tasks may still be closing: do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("grpc_tonic: {e}");
            ExitCode::from(2)
        }
    }
}

/// The keepalive-ack counter (when `acks`), and tracing output on stderr when `RUST_LOG` is set.
fn init_tracing(acks: Option<Arc<AtomicU64>>) {
    let counter = acks.map(|n| {
        PingAcks(n).with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(PING_ACK_TARGET, tracing::Level::TRACE),
        )
    });
    let fmt = std::env::var_os("RUST_LOG").map(|_| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(tracing_subscriber::EnvFilter::from_default_env())
    });
    if counter.is_none() && fmt.is_none() {
        return;
    }
    if let Err(e) = tracing_subscriber::registry()
        .with(counter)
        .with(fmt)
        .try_init()
    {
        eprintln!("cannot install the tracing subscriber: {e}");
    }
}

/// Counts h2's `recv PING USER ack` events: the acks of hyper's keepalive PINGs.
struct PingAcks(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PingAcks {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != PING_ACK_TARGET {
            return;
        }
        let mut is_ack = MessageIs(PING_ACK_MESSAGE, false);
        event.record(&mut is_ack);
        if is_ack.1 {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether an event's `message` is the given text.
struct MessageIs(&'static str, bool);

impl tracing::field::Visit for MessageIs {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.1 = value == self.0;
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.1 = format!("{value:?}") == self.0;
        }
    }
}

/// Writes one line to stdout and flushes it (an error, not a panic, when stdout is gone).
fn say(line: &str) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

fn secs(what: &str, s: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s).map_err(|e| format!("{what} {s}: {e}"))
}

/// A flag that turns true when stdin reaches EOF (or fails): read on a plain thread, so that
/// nothing waits for it at exit.
fn stdin_closed() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            let _ = tx.send(true);
        });
    if let Err(e) = spawned {
        // Without the reader the process stops at its deadline only.
        eprintln!("cannot watch stdin: {e}");
    }
    rx
}

/// Waits until `flag` is true; forever if its sender is gone without setting it.
async fn until_set(mut flag: watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

// ===== the byte codec =====

/// Messages are opaque bytes: the codec copies them in and out of the gRPC frames.
#[derive(Clone, Copy, Debug, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        // tonic hands over exactly one message's bytes.
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// ===== the server =====

#[derive(Default)]
struct Counts {
    unary: AtomicU64,
    streams: AtomicU64,
}

/// `fanout.lab.Echo`: what tonic's codegen makes of a service with one unary and one
/// server-streaming method, written by hand.
#[derive(Clone)]
struct EchoServer {
    name: Bytes,
    counts: Arc<Counts>,
}

impl EchoServer {
    /// `<name>\n<tail>`
    fn reply(&self, tail: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(self.name.len() + 1 + tail.len());
        b.put_slice(&self.name);
        b.put_u8(b'\n');
        b.put_slice(tail);
        b.freeze()
    }
}

impl NamedService for EchoServer {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;
type ReplyStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

impl<B> tower::Service<http::Request<B>> for EchoServer
where
    B: tonic::transport::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|p| p.strip_prefix(<Self as NamedService>::NAME))
            .and_then(|p| p.strip_prefix('/'));
        match method {
            Some("Call") => {
                let method = CallMethod(self.clone());
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(BytesCodec);
                    Ok(grpc.unary(method, req).await)
                })
            }
            Some("Stream") => {
                let method = StreamMethod(self.clone());
                Box::pin(async move {
                    let mut grpc = tonic::server::Grpc::new(BytesCodec);
                    Ok(grpc.server_streaming(method, req).await)
                })
            }
            _ => Box::pin(async move {
                Ok(Status::unimplemented(format!("no method {}", req.uri().path())).into_http())
            }),
        }
    }
}

struct CallMethod(EchoServer);

impl UnaryService<Bytes> for CallMethod {
    type Response = Bytes;
    type Future = std::future::Ready<Result<tonic::Response<Bytes>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        self.0.counts.unary.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(tonic::Response::new(self.0.reply(request.get_ref()))))
    }
}

struct StreamMethod(EchoServer);

impl ServerStreamingService<Bytes> for StreamMethod {
    type Response = Bytes;
    type ResponseStream = ReplyStream;
    type Future = std::future::Ready<Result<tonic::Response<ReplyStream>, Status>>;

    fn call(&mut self, _: tonic::Request<Bytes>) -> Self::Future {
        let server = self.0.clone();
        // Three messages; asked for a fourth, the stream ends and counts itself (its three
        // messages went into the response body).
        let stream = futures::stream::unfold(0u8, move |i| {
            let server = server.clone();
            async move {
                if i < 3 {
                    Some((Ok(server.reply(i.to_string().as_bytes())), i + 1))
                } else {
                    server.counts.streams.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        });
        std::future::ready(Ok(tonic::Response::new(Box::pin(stream) as ReplyStream)))
    }
}

async fn server(a: ServerArgs) -> Result<(), String> {
    let addr: SocketAddr = a
        .addr
        .to_socket_addrs()
        .map_err(|e| format!("--addr {}: {e}", a.addr))?
        .next()
        .ok_or_else(|| format!("--addr {}: no address", a.addr))?;
    let deadline = secs("--deadline-s", a.deadline_s)?;
    let mut builder = Server::builder();
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let cert = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
        let key = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(|e| format!("TLS: {e}"))?;
    }
    if let Some(ms) = a.max_connection_age_ms.filter(|ms| *ms > 0) {
        // A graceful shutdown of each connection this old: GOAWAY, in-flight calls finish. No
        // `max_connection_age_grace`: with one, tonic 0.14 skips the GOAWAY and just closes the
        // connection at age + grace.
        builder = builder.max_connection_age(Duration::from_millis(ms));
    }
    let incoming = TcpIncoming::bind(addr)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?
        .with_nodelay(Some(true));
    let port = incoming
        .local_addr()
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?
        .port();
    let counts = Arc::new(Counts::default());
    let echo = EchoServer {
        name: Bytes::from(a.name.clone().into_bytes()),
        counts: counts.clone(),
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("SIGTERM handler: {e}"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = builder.serve_with_incoming_shutdown(echo, incoming, async {
        let _ = stop_rx.await;
    });
    let mut serve = std::pin::pin!(serve);
    say(&format!("listening {port}"))?;
    let stdin = stdin_closed();
    let early = tokio::select! {
        r = &mut serve => Some(r),
        () = until_set(stdin) => None,
        _ = sigterm.recv() => None,
        () = tokio::time::sleep(deadline) => None,
    };
    if let Some(r) = early {
        return Err(match r {
            Ok(()) => "the server stopped by itself".to_string(),
            Err(e) => format!("serving: {e}"),
        });
    }
    // Stop accepting, GOAWAY every connection, and give them GRACE to close.
    let _ = stop_tx.send(());
    match tokio::time::timeout(GRACE, &mut serve).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("serving: {e}"),
        Err(_) => eprintln!("connections still open after {GRACE:?}: stopping anyway"),
    }
    let (unary, streams) = (
        counts.unary.load(Ordering::Relaxed),
        counts.streams.load(Ordering::Relaxed),
    );
    let report = serde_json::json!({
        "name": a.name,
        "answered": unary + streams,
        "unary": unary,
        "streams": streams,
    });
    say(&report.to_string())
}

// ===== the client =====

/// The addresses of `ipv4:A:P,B:P,…`.
fn parse_target(target: &str) -> Result<Vec<SocketAddr>, String> {
    let list = target
        .strip_prefix("ipv4:")
        .ok_or_else(|| format!("--target {target}: want ipv4:A:P[,B:P…]"))?;
    let addrs = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<SocketAddr>()
                .map_err(|e| format!("--target {target}: {s}: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(format!("--target {target}: no address"));
    }
    Ok(addrs)
}

/// A status, with the chain of errors under it, cut to MAX_ERROR_LEN.
fn describe(status: &Status) -> String {
    let mut s = format!("{:?}: {}", status.code(), status.message());
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        // tonic's messages often repeat their source's: name each text once.
        let text = e.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = e.source();
    }
    cut(s)
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_ERROR_LEN {
        let mut end = MAX_ERROR_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The backend name at the head of a reply.
fn backend_of(reply: &[u8]) -> String {
    let head = reply.split(|b| *b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(head).into_owned()
}

fn request() -> tonic::Request<Bytes> {
    let mut r = tonic::Request::new(Bytes::from_static(b"hello"));
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// One call on `channel`; returns the backend that answered.
async fn one_call(channel: Channel, stream: bool) -> Result<String, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::from_error(Box::new(e)))?;
    if stream {
        let path = PathAndQuery::from_static(STREAM);
        let mut replies = grpc
            .server_streaming(request(), path, BytesCodec)
            .await?
            .into_inner();
        let mut messages = Vec::new();
        while let Some(m) = replies.message().await? {
            messages.push(m);
            if messages.len() > MAX_STREAM_MESSAGES {
                break;
            }
        }
        match messages.first() {
            Some(first) if messages.len() == 3 => Ok(backend_of(first)),
            _ => Err(Status::new(
                Code::Internal,
                format!("stream sent {} messages", messages.len()),
            )),
        }
    } else {
        let path = PathAndQuery::from_static(CALL);
        let reply = grpc.unary(request(), path, BytesCodec).await?;
        Ok(backend_of(reply.get_ref()))
    }
}

/// One attempt of a call, bounded by CALL_TIMEOUT: on `shared`, or on a channel of its own (to
/// `first`, dropped with its connection after the call) when there is no shared channel.
async fn attempt_call(
    shared: Option<&Channel>,
    first: &Endpoint,
    stream: bool,
) -> Result<String, Status> {
    let call = async {
        match shared {
            Some(channel) => one_call(channel.clone(), stream).await,
            None => {
                let channel = first
                    .connect()
                    .await
                    .map_err(|e| Status::from_error(Box::new(e)))?;
                one_call(channel, stream).await
            }
        }
    };
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no reply within {CALL_TIMEOUT:?}"
        ))),
    }
}

/// Whether a failed call was certainly not processed by the server, so that it may go again
/// (gRPC's transparent retry), and how: hyper cancelled it before writing it (its connection
/// closed first), or the server refused its stream (a GOAWAY whose last stream id is below the
/// call's stream, or REFUSED_STREAM: RFC 9113 §8.7). None: it may have been processed. These are
/// the races of a balancer picking a connection that MaxConnectionAge is closing.
fn never_processed(status: &Status) -> Option<Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_canceled)
        {
            return Some(Refusal::Cancelled);
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let refused = h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            return (h2.is_remote() && refused).then_some(Refusal::ByServer);
        }
        source = e.source();
    }
    None
}

/// Why a call was not processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// hyper cancelled it before writing it: nothing went on the wire.
    Cancelled,
    /// The server's GOAWAY or REFUSED_STREAM: its HEADERS were sent and refused, or never sent
    /// because the GOAWAY had arrived (h2 reports both alike).
    ByServer,
}

async fn client(a: ClientArgs, acks: Arc<AtomicU64>) -> Result<(), String> {
    let addrs = parse_target(&a.target)?;
    let pace = secs("--pace-ms", a.pace_ms / 1000.0)?;
    let duration = secs("--duration-s", a.duration_s)?;
    let keepalive = a
        .keepalive_ms
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis);
    let tls = match &a.tls_ca {
        Some(ca) => {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            Some(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(pem))
                    .domain_name(a.authority.clone()),
            )
        }
        None => None,
    };
    let endpoint = |addr: SocketAddr| -> Result<Endpoint, String> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut e = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            // No BDP pings: every PING is a keepalive (and counted as one).
            .http2_adaptive_window(false);
        if let Some(interval) = keepalive {
            e = e
                .http2_keep_alive_interval(interval)
                .keep_alive_while_idle(true)
                .keep_alive_timeout(Duration::from_secs(5));
        }
        if let Some(tls) = &tls {
            e = e.tls_config(tls.clone()).map_err(|e| format!("TLS: {e}"))?;
        }
        Ok(e)
    };
    // parse_target returns at least one address.
    let first = endpoint(*addrs.first().ok_or("no address")?)?;
    let mut channels = 0u64;
    let shared = match a.policy {
        // tonic has no pick_first over an address list: one channel to the first address,
        // connected on the first call (as gRPC's channels are).
        Policy::PickFirst => Some(first.connect_lazy()),
        // tower's power-of-two-choices balancer over one lazy connection per address.
        Policy::RoundRobin => {
            let all = addrs
                .iter()
                .map(|addr| endpoint(*addr))
                .collect::<Result<Vec<_>, _>>()?;
            Some(Channel::balance_list(all.into_iter()))
        }
        Policy::PerCall => None,
    };
    if shared.is_some() {
        channels += 1;
    }

    let stop = stdin_closed();
    let end = Instant::now() + duration;
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut per_backend: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: Vec<String> = Vec::new();
    let (mut retried, mut retried_maybe_sent) = (0u64, 0u64);
    for _ in 0..a.max_calls {
        if *stop.borrow() || Instant::now() >= end {
            break;
        }
        // gRPC's transparent retry: a call the server certainly did not process (its
        // connection was going away, as after a MaxConnectionAge GOAWAY) goes again.
        let mut result = Err(Status::unknown("no attempt"));
        for attempt in 0..=TRANSPARENT_RETRIES {
            if shared.is_none() {
                channels += 1;
            }
            result = attempt_call(shared.as_ref(), &first, a.stream).await;
            match &result {
                Err(status) if attempt < TRANSPARENT_RETRIES => {
                    let Some(refusal) = never_processed(status) else {
                        break;
                    };
                    retried += 1;
                    if refusal == Refusal::ByServer {
                        retried_maybe_sent += 1;
                    }
                    eprintln!("transparent retry after: {}", describe(status));
                }
                _ => break,
            }
        }
        match result {
            Ok(name) => {
                ok += 1;
                *per_backend.entry(name).or_default() += 1;
                if ok == 1 {
                    say("first ok")?;
                }
            }
            Err(status) => {
                failed += 1;
                if errors.len() < MAX_ERRORS {
                    errors.push(describe(&status));
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pace) => {}
            () = until_set(stop.clone()) => {}
        }
    }
    // Close the channel, and let its connections send their GOAWAY and FIN.
    drop(shared);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = serde_json::json!({
        "ok": ok,
        "failed": failed,
        "per_backend": per_backend,
        "channels": channels,
        "errors": errors,
        "retried": retried,
        "retried_maybe_sent": retried_maybe_sent,
        "keepalive_acks": acks.load(Ordering::Relaxed),
    });
    say(&report.to_string())
}
