//! The HTTP server's accept loop: HTTP/1.1 over hyper, serving the axum router, with bounds that
//! keep `/healthz` and `/metrics` answering however many sockets other pods hold open.
//!
//! `axum::serve` has no header or idle timeout and no connection cap, so a few hundred idle or
//! slowloris sockets could hold the agent's port (and, at the descriptor limit, lock out the
//! kubelet's probes). [`serve`] replaces it and keeps these invariants:
//!
//! - **At most [`Limits::max_connections`] connections are open.** A connection is counted from
//!   accept until its task ends or it is shed; the count only grows after there is room.
//! - **A prompt client always gets in unless every connection is busy.** A connection is *idle*
//!   while no request is in progress: from accept until hyper has parsed a request head (so a
//!   slowloris trickling header bytes is idle), and again once hyper has written the whole
//!   response to the socket (the body dropped and the write buffer flushed).
//!   At the cap, a new connection *sheds* the connection idle the longest (earliest moment it
//!   went idle; bytes trickling in do not refresh it) and takes its place. Only when every open
//!   connection has a request in progress is the new one *refused* (closed at once). The victim
//!   is claimed atomically (`0 → DOOMED` on its in-flight count), so a connection whose request
//!   has just started is never shed.
//! - **No connection sits forever.** A request head must arrive within
//!   [`Limits::header_read_timeout`] (hyper's timer; it restarts whenever hyper waits for a head,
//!   so it also bounds a pause between keep-alive requests); an idle connection is closed after
//!   [`Limits::idle_timeout`] (our own watchdog, whatever hyper does); a handler that runs longer
//!   than [`Limits::request_timeout`] is answered `503` with `Connection: close`, and a
//!   connection whose request (handler plus writing the response) is still in progress after
//!   twice that is closed.
//! - **Accept errors never spin or panic.** Running out of descriptors (`EMFILE`, `ENFILE`) or
//!   memory sheds the idlest connection to free one and retries after [`SHED_SETTLE`] (after
//!   [`ACCEPT_BACKOFF`] when there was nothing to shed), logging at WARN at most once per
//!   [`WARN_EVERY`] (with the count of suppressed ones);
//!   per-connection errors (`ECONNABORTED`, …) are skipped; only a listener that can no longer
//!   accept at all (`EBADF`, `EINVAL`, …) ends the server with an error.
//! - **Bounded memory.** hyper's read buffer is capped at [`MAX_BUF`] per connection, so the
//!   server's buffers are bounded by the cap; nothing a client sends is queued anywhere else.
//! - **Graceful shutdown is bounded.** When `shutdown` resolves the listener is closed, idle
//!   connections are closed at once, requests in progress may finish for
//!   [`Limits::shutdown_grace`], and whatever is left is then aborted.
//!
//! [`ServerStats`] counts accepted, shed, refused and timed-out connections and the open ones;
//! [`ServerStats::register`] adds them to a Prometheus registry. [`raise_nofile_limit`] and
//! [`connection_cap`] size the cap to the process's descriptor limit.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    pin::{Pin, pin},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    http::{HeaderValue, Request, Response, StatusCode, header},
};
use hyper::{
    body::{Body as HttpBody, Frame, Incoming, SizeHint},
    server::conn::http1,
    service::Service,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
    task::JoinSet,
};

/// Bounds of the HTTP server. The defaults are the one place these numbers live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (default 256; size it with [`connection_cap`]). At the cap a new
    /// connection sheds the idlest one, or is refused when all are busy.
    pub max_connections: usize,
    /// Time a client has to send a complete request head, counted from when the server starts
    /// waiting for one (accept, or the end of the previous response) (default 5 s).
    pub header_read_timeout: Duration,
    /// Time a connection may stay without a request in progress (default 30 s). Because hyper's
    /// header timer also runs between keep-alive requests, a keep-alive connection in practice
    /// lasts `min(header_read_timeout, idle_timeout)` between requests.
    pub idle_timeout: Duration,
    /// Time a handler may run before the client gets `503` (default 30 s); a connection still
    /// busy with one request after twice this (e.g. a client not reading the response) is closed.
    pub request_timeout: Duration,
    /// After shutdown is asked for, how long requests in progress may still finish (default 5 s).
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// The same limits with every duration in `[1 ms, 1 day]` (so deadlines cannot overflow and
    /// a zero cannot disable a bound) and a cap of at least one connection.
    fn sanitized(&self) -> Self {
        let clamp = |d: Duration| d.clamp(Duration::from_millis(1), MAX_TIMEOUT);
        Self {
            max_connections: self.max_connections.max(1),
            header_read_timeout: clamp(self.header_read_timeout),
            idle_timeout: clamp(self.idle_timeout),
            request_timeout: clamp(self.request_timeout),
            shutdown_grace: clamp(self.shutdown_grace),
        }
    }
}

/// Longest accepted duration for any limit.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Per-connection cap of hyper's read buffer (request head plus buffered body bytes); larger heads
/// get `431`. hyper's default would be about 400 KiB per connection.
pub const MAX_BUF: usize = 64 * 1024;
/// Pause after an accept error that is not about one connection (descriptors, memory) when no
/// idle connection could be shed to free a descriptor.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Pause after shedding a connection to free a descriptor, for its task to close it.
pub const SHED_SETTLE: Duration = Duration::from_millis(5);
/// At most one WARN per this interval for accept errors.
pub const WARN_EVERY: Duration = Duration::from_secs(10);
/// Descriptors kept for the daemon's own use when sizing the cap (see [`connection_cap`]).
pub const FD_RESERVE: u64 = 128;
/// The cap [`connection_cap`] never goes below because of the descriptor limit.
pub const MIN_CAP: usize = 16;

/// Which bound closed a connection (label `phase` of `fanout_http_connections_timed_out_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutPhase {
    /// No complete request head within [`Limits::header_read_timeout`].
    Header,
    /// No request within [`Limits::idle_timeout`].
    Idle,
    /// A handler or the writing of its response overran [`Limits::request_timeout`].
    Request,
}

impl TimeoutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Idle => "idle",
            Self::Request => "request",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub phase: &'static str,
}

/// Counters of the HTTP server. Clones share the values; export with [`ServerStats::register`].
#[derive(Clone, Debug, Default)]
pub struct ServerStats {
    /// Connections accepted (including those then refused).
    pub accepted: Counter,
    /// Connections closed at once because the cap was reached and every connection was busy.
    pub refused: Counter,
    /// Idle connections closed to make room (for a new connection or a free descriptor).
    pub shed: Counter,
    /// Connections closed by a timeout, by phase (`header`, `idle`, `request`; `request` also
    /// counts handlers answered `503`).
    pub timed_out: Family<TimeoutLabels, Counter>,
    /// `accept()` failures (descriptors, memory, aborted handshakes).
    pub accept_errors: Counter,
    /// Connections open now.
    pub open: Gauge,
}

impl ServerStats {
    /// Registers the counters as `fanout_http_connections_*` (and `fanout_http_accept_errors`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "fanout_http_connections_accepted",
            "Connections accepted by the HTTP server",
            self.accepted.clone(),
        );
        registry.register(
            "fanout_http_connections_refused",
            "Connections closed at once: at the cap with every connection busy",
            self.refused.clone(),
        );
        registry.register(
            "fanout_http_connections_shed",
            "Idle HTTP connections closed to make room for a new one",
            self.shed.clone(),
        );
        registry.register(
            "fanout_http_connections_timed_out",
            "HTTP connections closed (or requests answered 503) by a timeout, by phase",
            self.timed_out.clone(),
        );
        registry.register(
            "fanout_http_accept_errors",
            "accept() failures of the HTTP listener",
            self.accept_errors.clone(),
        );
        registry.register(
            "fanout_http_connections_open",
            "HTTP connections open now",
            self.open.clone(),
        );
    }

    /// Connections closed by `phase` so far.
    pub fn timed_out_total(&self, phase: TimeoutPhase) -> u64 {
        self.timed_out
            .get_or_create(&TimeoutLabels {
                phase: phase.as_str(),
            })
            .get()
    }

    fn time_out(&self, phase: TimeoutPhase) {
        self.timed_out
            .get_or_create(&TimeoutLabels {
                phase: phase.as_str(),
            })
            .inc();
    }
}

/// Listen backlog of the API socket (the kernel caps it at `net.core.somaxconn`). The accept
/// loop drains it quickly, but a burst of connects (a flood, or many scrapers at once) arrives
/// faster than any loop accepts: with the runtime's default of 128 a burst of a few hundred
/// overflowed the queue, and the kernel then drops SYNs, so a probe's connect waits a full SYN
/// retransmit (1 s), as long as a kubelet probe's default timeout.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` and listens with [`LISTEN_BACKLOG`] (address reuse on, as `TcpListener::bind`).
pub fn listen(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `/proc/sys/fs/nr_open` when the hard
/// limit is unlimited) and returns the soft limit `(before, after)`.
pub fn raise_nofile_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    let target = if lim.rlim_max == libc::RLIM_INFINITY {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(1 << 20)
    } else {
        lim.rlim_max
    };
    if target <= before {
        return Ok((before, before));
    }
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, target))
}

/// The connection cap for `requested` connections under a soft descriptor limit of
/// `nofile_soft`: at most half of the descriptors left after [`FD_RESERVE`] for the daemon's own
/// use (maps, perf buffers, the API server's connections, …), never below [`MIN_CAP`] because of
/// the limit, never above `requested`, and at least 1.
pub fn connection_cap(requested: usize, nofile_soft: u64) -> usize {
    let by_fds = usize::try_from(nofile_soft.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX);
    requested.max(1).min(by_fds.max(MIN_CAP))
}

/// Serves `router` on `listener` over HTTP/1.1 within `limits` until `shutdown` resolves, then
/// drains (see the module doc). Returns an error only when the listener can no longer accept.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stats: ServerStats,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let limits = limits.sanitized();
    let clock = Clock::new();
    let table = Arc::new(ConnTable::new(limits.max_connections, stats.open.clone()));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        .max_buf_size(MAX_BUF);
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut warn = WarnLimiter::default();
    let mut next_id: u64 = 0;
    let mut shutdown = pin!(shutdown);
    let mut result = Ok(());

    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                log_join(joined);
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        // Completed tasks are reaped here too, so a steady flood cannot grow the set.
        while let Some(joined) = tasks.try_join_next() {
            log_join(joined);
        }
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                stats.accept_errors.inc();
                let pause = match classify_accept_error(&e) {
                    AcceptError::Connection => {
                        tracing::debug!(error = %e, "accept: connection failed before accept");
                        continue;
                    }
                    AcceptError::Resources => {
                        let shed = table.shed_idlest();
                        if shed {
                            stats.shed.inc();
                        }
                        warn.warn(|suppressed| {
                            tracing::warn!(
                                error = %e,
                                shed,
                                suppressed,
                                "HTTP accept failed (out of descriptors or memory); backing off"
                            );
                        });
                        // A shed connection frees its descriptor as soon as its task runs: retry
                        // soon. With nothing to shed, wait longer.
                        if shed { SHED_SETTLE } else { ACCEPT_BACKOFF }
                    }
                    AcceptError::Fatal => {
                        tracing::error!(error = %e, "HTTP listener cannot accept; stopping");
                        result = Err(e);
                        break;
                    }
                    AcceptError::Other => {
                        warn.warn(|suppressed| {
                            tracing::warn!(error = %e, suppressed, "HTTP accept failed; backing off");
                        });
                        ACCEPT_BACKOFF
                    }
                };
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        stats.accepted.inc();

        if table.len() >= limits.max_connections {
            if table.shed_idlest() {
                stats.shed.inc();
            } else {
                stats.refused.inc();
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        next_id = next_id.wrapping_add(1);
        let state = Arc::new(ConnState::new(next_id, clock.now_ns()));
        if !table.insert(state.clone()) {
            // Unreachable: this loop is the only inserter and made room above.
            stats.refused.inc();
            continue;
        }
        let service = ConnService {
            inner: TowerToHyperService::new(router.clone()),
            state: state.clone(),
            clock: clock.clone(),
            request_timeout: limits.request_timeout,
            stats: stats.clone(),
        };
        let io = TrackedIo {
            inner: stream,
            state: state.clone(),
            clock: clock.clone(),
        };
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tasks.spawn(run_connection(
            conn,
            Registered {
                table: table.clone(),
                state,
            },
            clock.clone(),
            limits.clone(),
            stats.clone(),
            drain_rx.clone(),
        ));
    }

    // Stop accepting, close idle connections, let requests in progress finish for a while.
    drop(listener);
    let _ = drain_tx.send(true);
    let deadline = tokio::time::Instant::now() + limits.shutdown_grace;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(joined) => log_join(joined),
                None => break,
            },
            () = tokio::time::sleep_until(deadline) => {
                tracing::info!(left = tasks.len(), "HTTP shutdown grace over; closing the rest");
                break;
            }
        }
    }
    tasks.shutdown().await;
    result
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined
        && e.is_panic()
    {
        tracing::error!(error = %e, "HTTP connection task panicked");
    }
}

enum AcceptError {
    /// About one connection that is gone; the next accept is fine.
    Connection,
    /// Out of descriptors or memory: free one, back off.
    Resources,
    /// The listener itself is unusable.
    Fatal,
    /// Anything else: back off and retry.
    Other,
}

fn classify_accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(
            libc::ECONNABORTED
            | libc::ECONNRESET
            | libc::EPROTO
            | libc::EPERM
            | libc::EINTR
            | libc::EAGAIN
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT,
        ) => AcceptError::Connection,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Resources,
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT) => AcceptError::Fatal,
        _ => AcceptError::Other,
    }
}

/// At most one message per [`WARN_EVERY`]; counts the ones it held back.
#[derive(Default)]
struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnLimiter {
    fn warn(&mut self, emit: impl FnOnce(u64)) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.saturating_duration_since(last) < WARN_EVERY => {
                self.suppressed = self.suppressed.saturating_add(1);
            }
            _ => {
                emit(self.suppressed);
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

/// Monotonic nanoseconds since the server started; cheap to store in an atomic.
#[derive(Clone)]
struct Clock {
    epoch: Instant,
}

impl Clock {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, ns: u64) -> tokio::time::Instant {
        let at = self
            .epoch
            .checked_add(Duration::from_nanos(ns))
            .or_else(|| Instant::now().checked_add(MAX_TIMEOUT))
            .unwrap_or_else(Instant::now);
        tokio::time::Instant::from_std(at)
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `in_flight` of a connection picked for closing: no request may start on it any more.
const DOOMED: u32 = u32::MAX;

/// What the accept loop, the connection's watchdog and its service share about one connection.
struct ConnState {
    id: u64,
    /// Requests in progress (HTTP/1.1 serves one at a time), or [`DOOMED`].
    in_flight: AtomicU32,
    /// When `in_flight` last changed (ns on the server's [`Clock`]): for an idle connection, when it
    /// went idle; for a busy one, when its request started. Written *before* `in_flight` changes,
    /// so a reader never pairs a new state with an older (earlier) time.
    since: AtomicU64,
    /// Responses whose body hyper dropped but has not flushed yet (still counted in `in_flight`).
    written: AtomicU32,
    /// Wakes the watchdog: the connection went idle or was doomed.
    wake: Notify,
}

impl ConnState {
    fn new(id: u64, now_ns: u64) -> Self {
        Self {
            id,
            in_flight: AtomicU32::new(0),
            since: AtomicU64::new(now_ns),
            written: AtomicU32::new(0),
            wake: Notify::new(),
        }
    }

    /// Claims an idle connection for closing; false if a request is in progress (or it was
    /// already claimed).
    fn try_doom(&self) -> bool {
        let doomed = self
            .in_flight
            .compare_exchange(0, DOOMED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if doomed {
            self.wake.notify_one();
        }
        doomed
    }

    fn is_doomed(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == DOOMED
    }

    /// Idle since this time (ns), or `None` when busy or doomed.
    fn idle_since(&self) -> Option<u64> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| self.since.load(Ordering::Acquire))
    }
}

/// Marks a request in progress from `Service::call` until its response body is dropped by hyper
/// (all of it encoded, or the connection ending); the connection stays busy until hyper has also
/// flushed the response to the socket (see [`TrackedIo`]).
struct BusyGuard {
    state: Arc<ConnState>,
}

impl BusyGuard {
    fn begin(state: &Arc<ConnState>, clock: &Clock) -> Option<Self> {
        state.since.store(clock.now_ns(), Ordering::Release);
        state
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != DOOMED && n < DOOMED - 1).then_some(n + 1)
            })
            .ok()?;
        Some(Self {
            state: state.clone(),
        })
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.state.written.fetch_add(1, Ordering::AcqRel);
    }
}

impl ConnState {
    /// hyper flushed its write buffer: requests whose response body was dropped before are done.
    fn flushed(&self, now_ns: u64) {
        let done = self.written.swap(0, Ordering::AcqRel);
        if done == 0 {
            return;
        }
        self.since.store(now_ns, Ordering::Release);
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != DOOMED).then(|| n.saturating_sub(done))
            });
        self.wake.notify_one();
    }
}

/// The socket as hyper sees it. hyper calls `poll_flush` once its write buffer is empty, so a
/// flush after a response body was dropped means the whole response reached the kernel and the
/// connection is idle again.
struct TrackedIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    clock: Clock,
}

impl tokio::io::AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Ok(())) = res {
            self.state.flushed(self.clock.now_ns());
        }
        res
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The open connections. Only the accept loop inserts; a connection leaves when its task ends
/// or when it is shed, whichever comes first, and `open` follows the size exactly.
struct ConnTable {
    max: usize,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    open: Gauge,
}

impl ConnTable {
    fn new(max: usize, open: Gauge) -> Self {
        Self {
            max,
            conns: Mutex::new(HashMap::with_capacity(max.min(4096))),
            open,
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
        // Nothing panics while holding the lock; recover the map anyway if something did.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    /// Adds a connection if there is room.
    fn insert(&self, state: Arc<ConnState>) -> bool {
        let mut conns = self.lock();
        if conns.len() >= self.max {
            return false;
        }
        conns.insert(state.id, state);
        self.open.inc();
        debug_assert!(conns.len() <= self.max);
        true
    }

    fn remove(&self, id: u64) {
        if self.lock().remove(&id).is_some() {
            self.open.dec();
        }
    }

    /// Closes the connection that has been idle the longest (earliest `since` among those with
    /// no request in progress) and removes it at once; false when every connection is busy.
    fn shed_idlest(&self) -> bool {
        let mut conns = self.lock();
        let mut idle: Vec<(u64, u64)> = conns
            .values()
            .filter_map(|c| c.idle_since().map(|since| (since, c.id)))
            .collect();
        idle.sort_unstable();
        for (_, id) in idle {
            let claimed = conns.get(&id).is_some_and(|c| c.try_doom());
            if claimed {
                conns.remove(&id);
                self.open.dec();
                return true;
            }
        }
        false
    }
}

/// Removes the connection from the table when its task ends (or is aborted).
struct Registered {
    table: Arc<ConnTable>,
    state: Arc<ConnState>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.table.remove(self.state.id);
    }
}

type Conn = http1::Connection<TokioIo<TrackedIo>, ConnService>;

/// Drives one connection and its watchdog (idle and request deadlines, shedding, draining).
async fn run_connection(
    conn: Conn,
    registered: Registered,
    clock: Clock,
    limits: Limits,
    stats: ServerStats,
    mut drain: watch::Receiver<bool>,
) {
    let state = registered.state.clone();
    let mut conn = pin!(conn);
    let mut draining = false;
    loop {
        if state.is_doomed() {
            // Shed by the accept loop, or closed by draining or the idle watchdog below.
            return;
        }
        if draining && state.try_doom() {
            return;
        }
        let now = clock.now_ns();
        let since = state.since.load(Ordering::Acquire);
        let busy = state.in_flight.load(Ordering::Acquire) != 0;
        let deadline = if busy {
            since.saturating_add(ns(limits.request_timeout).saturating_mul(2))
        } else {
            since.saturating_add(ns(limits.idle_timeout))
        };
        if now >= deadline {
            if busy {
                stats.time_out(TimeoutPhase::Request);
                return;
            }
            if state.try_doom() {
                stats.time_out(TimeoutPhase::Idle);
                return;
            }
            // A request started just now: look again.
            continue;
        }
        let wake = state.wake.notified();
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    if e.is_timeout() {
                        stats.time_out(TimeoutPhase::Header);
                    } else {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
                return;
            }
            () = tokio::time::sleep_until(clock.instant(deadline)) => {}
            () = wake => {}
            _ = drain.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The router behind a per-connection request timeout and busy marking.
#[derive(Clone)]
struct ConnService {
    inner: TowerToHyperService<Router>,
    state: Arc<ConnState>,
    clock: Clock,
    request_timeout: Duration,
    stats: ServerStats,
}

impl Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let Some(busy) = BusyGuard::begin(&self.state, &self.clock) else {
            // Picked for closing while this head was being parsed.
            return Box::pin(async {
                Ok(closing(StatusCode::SERVICE_UNAVAILABLE, "closing\n", None))
            });
        };
        let response = self.inner.call(req);
        let timeout = self.request_timeout;
        let stats = self.stats.clone();
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(Ok(resp)) => Ok(resp.map(|body| TrackedBody {
                    inner: body,
                    _busy: Some(busy),
                })),
                Ok(Err(never)) => match never {},
                Err(_) => {
                    stats.time_out(TimeoutPhase::Request);
                    Ok(closing(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "request timed out\n",
                        Some(busy),
                    ))
                }
            }
        })
    }
}

/// A response after which hyper closes the connection.
fn closing(
    status: StatusCode,
    body: &'static str,
    busy: Option<BusyGuard>,
) -> Response<TrackedBody> {
    let mut resp = Response::new(TrackedBody {
        inner: Body::from(body),
        _busy: busy,
    });
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The response body, holding the connection busy until hyper drops it.
struct TrackedBody {
    inner: Body,
    _busy: Option<BusyGuard>,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::atomic::{AtomicI64, AtomicUsize},
    };

    use axum::{extract::State, routing::get};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        sync::oneshot,
        task::JoinHandle,
        time::timeout,
    };

    use super::*;

    /// A burst of connects larger than the runtime's default backlog (128) completes its
    /// handshakes while nothing accepts: none waits for a SYN retransmit.
    #[tokio::test]
    async fn a_connect_burst_fits_the_listen_backlog() {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let burst = tokio::task::spawn_blocking(move || {
            (0..300)
                .map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .unwrap();
        assert_eq!(burst.map(|v| v.len()).unwrap(), 300);
        drop(listener);
    }

    struct Server {
        addr: SocketAddr,
        stats: ServerStats,
        /// Requests that entered `/slow`.
        slow_entered: Arc<AtomicUsize>,
        stop: Option<oneshot::Sender<()>>,
        handle: JoinHandle<io::Result<()>>,
    }

    impl Server {
        async fn start(limits: Limits, slow: Duration) -> Server {
            let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
            let addr = listener.local_addr().unwrap();
            let slow_entered = Arc::new(AtomicUsize::new(0));
            let router = Router::new()
                .route("/healthz", get(|| async { "ok" }))
                .route("/big", get(|| async { "x".repeat(BIG) }))
                .route(
                    "/slow",
                    get(move |State(entered): State<Arc<AtomicUsize>>| async move {
                        entered.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(slow).await;
                        "done"
                    }),
                )
                .with_state(slow_entered.clone());
            let stats = ServerStats::default();
            let (stop, stopped) = oneshot::channel::<()>();
            let handle = tokio::spawn(serve(listener, router, limits, stats.clone(), async {
                let _ = stopped.await;
            }));
            Server {
                addr,
                stats,
                slow_entered,
                stop: Some(stop),
                handle,
            }
        }

        async fn wait_slow_entered(&self, n: usize) {
            for _ in 0..200 {
                if self.slow_entered.load(Ordering::SeqCst) >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "only {} requests entered /slow",
                self.slow_entered.load(Ordering::SeqCst)
            );
        }

        async fn stop(mut self) -> io::Result<()> {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            timeout(Duration::from_secs(5), self.handle)
                .await
                .expect("serve did not return")
                .unwrap()
        }
    }

    /// Size of `/big`: far more than the socket buffers hold, so writing it waits for the client.
    const BIG: usize = 8 << 20;

    fn limits(max_connections: usize) -> Limits {
        Limits {
            max_connections,
            ..Limits::default()
        }
    }

    /// Sends a request and reads the whole (`Connection: close`) response.
    async fn request(stream: &mut TcpStream, path: &str) -> io::Result<String> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    async fn fetch(addr: SocketAddr, path: &str) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        request(&mut stream, path).await
    }

    /// How long until the server closes `stream` (EOF or reset), reading and discarding data;
    /// `None` if still open after `within`.
    async fn closed_after(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut buf = [0u8; 1024];
        timeout(within, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .map(|()| start.elapsed())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthz_answers_through_idle_and_slowloris_flood() {
        let _ = raise_nofile_limit();
        let cap = 32;
        let server = Server::start(limits(cap), Duration::ZERO).await;

        // Highest number of open connections seen while the test runs.
        let peak = Arc::new(AtomicI64::new(0));
        let sampler = {
            let (open, peak) = (server.stats.open.clone(), peak.clone());
            tokio::spawn(async move {
                for _ in 0..10_000 {
                    peak.fetch_max(open.get(), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            })
        };

        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(TcpStream::connect(server.addr).await.unwrap());
        }
        let mut slowloris = JoinSet::new();
        for _ in 0..100 {
            let mut s = TcpStream::connect(server.addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
            slowloris.spawn(async move {
                for &b in b"X-Slow: 1234567890" {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if s.write_all(&[b]).await.is_err() {
                        return;
                    }
                }
            });
        }
        for _ in 0..200 {
            if server.stats.accepted.get() >= 300 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(server.stats.accepted.get(), 300);

        for i in 0..20 {
            let start = Instant::now();
            let resp = timeout(Duration::from_secs(1), fetch(server.addr, "/healthz"))
                .await
                .unwrap_or_else(|_| panic!("probe {i} timed out"))
                .unwrap();
            assert!(resp.starts_with("HTTP/1.1 200"), "probe {i}: {resp}");
            assert!(resp.ends_with("ok"), "probe {i}: {resp}");
            assert!(start.elapsed() < Duration::from_secs(1));
            tokio::time::sleep(Duration::from_millis(60)).await;
        }

        let shed = server.stats.shed.get();
        assert!(shed >= 300 - cap as u64, "shed {shed}");
        assert_eq!(server.stats.refused.get(), 0);
        sampler.abort();
        peak.fetch_max(server.stats.open.get(), Ordering::Relaxed);
        let peak = peak.load(Ordering::Relaxed);
        assert!(peak > 0 && peak <= cap as i64, "peak open {peak}");
        slowloris.abort_all();
        drop(idle);
        server.stop().await.unwrap();
    }

    #[tokio::test]
    async fn silent_and_slowloris_connections_hit_the_header_timeout() {
        let server = Server::start(
            Limits {
                header_read_timeout: Duration::from_millis(300),
                idle_timeout: Duration::from_secs(10),
                ..Limits::default()
            },
            Duration::ZERO,
        )
        .await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let mut trickle = TcpStream::connect(server.addr).await.unwrap();
        trickle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let trickling = tokio::spawn(async move {
            for &b in b"Host: xxxxxxxxxxxxxxxxxxxx" {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if trickle.write_all(&[b]).await.is_err() {
                    break;
                }
            }
            trickle
        });
        let after = closed_after(&mut silent, Duration::from_secs(2))
            .await
            .expect("silent connection still open");
        assert!(
            after >= Duration::from_millis(250),
            "closed after {after:?}"
        );
        let mut trickle = trickling.await.unwrap();
        assert!(
            closed_after(&mut trickle, Duration::from_millis(500))
                .await
                .is_some(),
            "slowloris connection still open"
        );
        assert_eq!(server.stats.timed_out_total(TimeoutPhase::Header), 2);
        assert_eq!(server.stats.open.get(), 0);
        server.stop().await.unwrap();
    }

    #[tokio::test]
    async fn keep_alive_connection_closes_after_idle_timeout() {
        let server = Server::start(
            Limits {
                header_read_timeout: Duration::from_secs(5),
                idle_timeout: Duration::from_millis(300),
                ..Limits::default()
            },
            Duration::ZERO,
        )
        .await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // Two keep-alive requests on the same connection, then silence.
        for _ in 0..2 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut resp = Vec::new();
            timeout(Duration::from_secs(1), async {
                let mut buf = [0u8; 512];
                while !resp.ends_with(b"\r\n\r\nok") {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0, "closed early");
                    resp.extend_from_slice(&buf[..n]);
                }
            })
            .await
            .expect("no keep-alive response");
            assert!(resp.starts_with(b"HTTP/1.1 200"));
        }
        let after = closed_after(&mut stream, Duration::from_secs(2))
            .await
            .expect("idle keep-alive connection still open");
        assert!(
            after >= Duration::from_millis(250),
            "closed after {after:?}"
        );
        assert_eq!(server.stats.timed_out_total(TimeoutPhase::Idle), 1);
        assert_eq!(server.stats.timed_out_total(TimeoutPhase::Header), 0);
        server.stop().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_connection_is_refused_when_all_are_busy() {
        let server = Server::start(limits(4), Duration::from_millis(800)).await;
        let mut busy = JoinSet::new();
        for _ in 0..4 {
            let addr = server.addr;
            busy.spawn(async move { fetch(addr, "/slow").await });
        }
        server.wait_slow_entered(4).await;

        let mut extra = TcpStream::connect(server.addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        assert!(
            closed_after(&mut extra, Duration::from_secs(1))
                .await
                .is_some(),
            "connection beyond the cap was not closed"
        );
        assert_eq!(server.stats.refused.get(), 1);
        assert_eq!(server.stats.shed.get(), 0);

        for _ in 0..4 {
            let resp = timeout(Duration::from_secs(3), busy.join_next())
                .await
                .unwrap()
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(
                resp.starts_with("HTTP/1.1 200") && resp.ends_with("done"),
                "{resp}"
            );
        }
        let resp = fetch(server.addr, "/healthz").await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        server.stop().await.unwrap();
    }

    #[tokio::test]
    async fn slow_handler_is_answered_503() {
        let server = Server::start(
            Limits {
                request_timeout: Duration::from_millis(200),
                ..Limits::default()
            },
            Duration::from_secs(5),
        )
        .await;
        let start = Instant::now();
        let resp = timeout(Duration::from_secs(2), fetch(server.addr, "/slow"))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(server.stats.timed_out_total(TimeoutPhase::Request), 1);
        server.stop().await.unwrap();
    }

    #[test]
    fn connection_cap_math() {
        // Plenty of descriptors: the request wins.
        assert_eq!(connection_cap(256, 1 << 20), 256);
        // The classic 1024: (1024 - 128) / 2 = 448 ≥ 256.
        assert_eq!(connection_cap(256, 1024), 256);
        assert_eq!(connection_cap(1000, 1024), 448);
        // Tight limits: half of what is left after the reserve, but never below the floor.
        assert_eq!(connection_cap(256, 256), 64);
        assert_eq!(connection_cap(256, 160), MIN_CAP);
        assert_eq!(connection_cap(256, 0), MIN_CAP);
        // A smaller request is kept; zero means one.
        assert_eq!(connection_cap(4, 20), 4);
        assert_eq!(connection_cap(0, 1 << 20), 1);
        // No overflow at the extremes.
        assert_eq!(
            connection_cap(usize::MAX, u64::MAX),
            usize::try_from((u64::MAX - FD_RESERVE) / 2).unwrap_or(usize::MAX)
        );
    }

    #[test]
    fn nofile_limit_only_goes_up() {
        let (before, after) = raise_nofile_limit().unwrap();
        assert!(after >= before);
        let (again_before, again_after) = raise_nofile_limit().unwrap();
        assert_eq!(again_before, after);
        assert_eq!(again_after, after);
    }

    #[test]
    fn limits_are_sanitized() {
        let l = Limits {
            max_connections: 0,
            header_read_timeout: Duration::ZERO,
            idle_timeout: Duration::MAX,
            request_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::MAX,
        }
        .sanitized();
        assert_eq!(l.max_connections, 1);
        assert_eq!(l.header_read_timeout, Duration::from_millis(1));
        assert_eq!(l.idle_timeout, MAX_TIMEOUT);
        assert_eq!(l.request_timeout, Duration::from_secs(1));
        assert_eq!(l.shutdown_grace, MAX_TIMEOUT);
    }

    #[tokio::test]
    async fn graceful_shutdown_lets_requests_finish_and_closes_idle() {
        let server = Server::start(limits(8), Duration::from_millis(400)).await;
        let addr = server.addr;
        let in_flight = tokio::spawn(async move { fetch(addr, "/slow").await });
        let mut idle = TcpStream::connect(addr).await.unwrap();
        server.wait_slow_entered(1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(server.stats.open.get(), 2);

        let start = Instant::now();
        let stats = server.stats.clone();
        let stopping = tokio::spawn(server.stop());
        assert!(
            closed_after(&mut idle, Duration::from_secs(1))
                .await
                .is_some(),
            "idle connection kept open during shutdown"
        );
        let resp = timeout(Duration::from_secs(2), in_flight)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 200") && resp.ends_with("done"),
            "{resp}"
        );
        stopping.await.unwrap().unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(stats.open.get(), 0);
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }

    #[tokio::test]
    async fn response_being_written_is_not_cut_by_shutdown() {
        let server = Server::start(limits(8), Duration::ZERO).await;
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream
            .write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // The handler is done at once; the response sits in hyper's buffer until we read.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stats = server.stats.clone();
        let stopping = tokio::spawn(server.stop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(stats.open.get(), 1, "connection closed mid-response");
        let mut buf = Vec::new();
        timeout(Duration::from_secs(3), stream.read_to_end(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 200"));
        assert!(buf.ends_with(&b"x".repeat(1024)));
        assert!(buf.len() > BIG, "got {} bytes", buf.len());
        stopping.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_grace_bounds_a_long_request() {
        let server = Server::start(
            Limits {
                shutdown_grace: Duration::from_millis(200),
                ..Limits::default()
            },
            Duration::from_secs(10),
        )
        .await;
        let addr = server.addr;
        let in_flight = tokio::spawn(async move { fetch(addr, "/slow").await });
        server.wait_slow_entered(1).await;
        let start = Instant::now();
        server.stop().await.unwrap();
        let took = start.elapsed();
        assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
        // The request was cut off: no response, just the connection closing.
        let resp = timeout(Duration::from_secs(1), in_flight)
            .await
            .unwrap()
            .unwrap();
        assert!(!resp.is_ok_and(|r| r.starts_with("HTTP/1.1 200")));
    }
}
