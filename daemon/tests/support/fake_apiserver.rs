//! An in-process fake Kubernetes API server for the Kubernetes-mode tests.
//!
//! It speaks the list/watch protocol the kube-rs watcher uses, for three collections:
//! `/api/v1/pods`, `/api/v1/services` and `/apis/discovery.k8s.io/v1/endpointslices`. Checked
//! against kube-runtime 5.0: the default `ListWatch` strategy sends
//! `GET <collection>?limit=500[&labelSelector=…]`, then
//! `GET <collection>?watch=true&timeoutSeconds=290[&labelSelector=…]&allowWatchBookmarks=true`
//! `&resourceVersion=N`; streaming lists (`sendInitialEvents`) are off by default and not served.
//!
//! - LIST answers a real List object (`apiVersion`, `kind` such as `PodList`,
//!   `metadata.resourceVersion`, `items`), paginated with `limit`/`continue`.
//! - WATCH streams newline-delimited `WatchEvent`s: the history after the requested
//!   resourceVersion, then live `ADDED`/`MODIFIED`/`DELETED` events, `BOOKMARK`s (only
//!   `metadata.resourceVersion`, when `allowWatchBookmarks=true`) on demand and before
//!   `timeoutSeconds` ends the stream. A resourceVersion older than the compaction point gets the
//!   apiserver's answer: `200 OK` with one `ERROR` event carrying a `410 Gone` Status.
//!
//! Resource versions are global across kinds, as in etcd. The cluster state outlives the HTTP
//! server, so a test can stop the server (an outage: open watches are cut, the port is closed and
//! connections are refused), change objects meanwhile, and start it again on the same port.
//!
//! [`FakeApiServer::start_tls`] serves HTTPS with a certificate from its own test CA, for a
//! client using the in-cluster config (`KUBERNETES_SERVICE_HOST`, the service account's token and
//! `ca.crt`), as a daemon in a pod does.

#![allow(dead_code)] // each test uses a different part of it

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{StreamExt, stream};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, sync::oneshot, task::JoinHandle, time::Instant};

/// The collections served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Pods,
    Services,
    EndpointSlices,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Pods, Kind::Services, Kind::EndpointSlices];

    fn from_k8s_kind(kind: &str) -> Kind {
        match kind {
            "Pod" => Kind::Pods,
            "Service" => Kind::Services,
            "EndpointSlice" => Kind::EndpointSlices,
            other => panic!("the fake API server does not serve {other}"),
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Kind::Pods => "/api/v1/pods",
            Kind::Services => "/api/v1/services",
            Kind::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Kind::Pods => "Pod",
            Kind::Services => "Service",
            Kind::EndpointSlices => "EndpointSlice",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Pods | Kind::Services => "v1",
            Kind::EndpointSlices => "discovery.k8s.io/v1",
        }
    }
}

/// What an open watch receives.
enum WatchMsg {
    Event(&'static str, Arc<Value>),
    Bookmark(u64),
    /// The server went down: cut the connection mid-stream.
    Abort,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Arc<Value>>,
    /// Events after the compaction point, oldest first.
    history: Vec<(u64, &'static str, Arc<Value>)>,
    /// Watches from a resourceVersion older than this get 410 Gone.
    compacted: u64,
    watches: Vec<mpsc::UnboundedSender<WatchMsg>>,
}

impl Collection {
    fn publish(&mut self, rv: u64, typ: &'static str, obj: Arc<Value>) {
        self.history.push((rv, typ, obj.clone()));
        self.watches
            .retain(|w| w.send(WatchMsg::Event(typ, obj.clone())).is_ok());
    }
}

#[derive(Default)]
struct Cluster {
    rv: u64,
    collections: HashMap<Kind, Collection>,
    /// Events created (`POST /apis/events.k8s.io/v1/namespaces/{ns}/events`), as sent.
    events: Vec<Value>,
    /// Every request's path and query, in arrival order.
    requests: Vec<String>,
    /// Kinds answered with 403 Forbidden (as if RBAC were missing).
    forbidden: Vec<Kind>,
    /// Between `stop()` and `restart()`: a request that still reaches the server on a connection
    /// accepted before the outage gets a 500 (never a watch that would outlive the outage).
    down: bool,
}

impl Cluster {
    fn collection(&mut self, kind: Kind) -> &mut Collection {
        self.collections.entry(kind).or_default()
    }

    fn apply_value(&mut self, kind: Kind, mut obj: Value, publish: bool) -> u64 {
        self.rv += 1;
        let rv = self.rv;
        let (namespace, name) = object_key(&obj);
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        if meta.get("uid").is_none() {
            meta["uid"] = json!(format!("uid-{namespace}-{name}"));
        }
        let obj = Arc::new(obj);
        let col = self.collection(kind);
        let typ = match col.objects.insert((namespace, name), obj.clone()) {
            Some(_) => "MODIFIED",
            None => "ADDED",
        };
        if publish {
            col.publish(rv, typ, obj);
        }
        rv
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str, publish: bool) -> bool {
        let key = (namespace.to_owned(), name.to_owned());
        let Some(old) = self.collection(kind).objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        let rv = self.rv;
        let mut obj = (*old).clone();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        if publish {
            self.collection(kind).publish(rv, "DELETED", Arc::new(obj));
        }
        true
    }
}

fn object_key(obj: &Value) -> (String, String) {
    let meta = &obj["metadata"];
    let namespace = meta["namespace"]
        .as_str()
        .expect("object without namespace");
    let name = meta["name"].as_str().expect("object without name");
    (namespace.to_owned(), name.to_owned())
}

fn to_value<K: Serialize>(obj: &K) -> Value {
    serde_json::to_value(obj).expect("serializable object")
}

/// Changes made while compacting: stored, but never sent to watches nor kept in history.
pub struct Compaction<'a> {
    cluster: &'a mut Cluster,
}

impl Compaction<'_> {
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&mut self, obj: &K) {
        let kind = Kind::from_k8s_kind(K::KIND);
        self.cluster.apply_value(kind, to_value(obj), false);
    }

    pub fn delete<K: k8s_openapi::Resource>(&mut self, namespace: &str, name: &str) {
        let kind = Kind::from_k8s_kind(K::KIND);
        assert!(
            self.cluster.delete(kind, namespace, name, false),
            "no {namespace}/{name}"
        );
    }
}

type Shared = Arc<Mutex<Cluster>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Cluster> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Running {
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

pub struct FakeApiServer {
    shared: Shared,
    addr: SocketAddr,
    running: Option<Running>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The CA that signed the HTTPS certificate (PEM), for the client's `ca.crt`.
    pub ca_pem: Option<String>,
}

/// Accepts TCP connections and completes the TLS handshake before axum sees them.
struct TlsListener {
    inner: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.inner.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, addr),
                Err(err) => eprintln!("fake apiserver: TLS handshake with {addr}: {err}"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// A test CA and a server certificate for `ip` signed by it: (CA PEM, server config).
fn test_tls(ip: std::net::IpAddr) -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fanout test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("server params");
    params.subject_alt_names = vec![SanType::IpAddress(ip)];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kubernetes");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone(), ca.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server TLS config");
    (ca.pem(), Arc::new(config))
}

impl FakeApiServer {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let mut server = FakeApiServer {
            shared: Shared::default(),
            addr,
            running: None,
            tls: None,
            ca_pem: None,
        };
        server.serve(listener);
        server
    }

    /// Serves HTTPS on `listener` (bound by the caller, e.g. inside a network namespace), with a
    /// certificate for the listener's IP signed by a fresh test CA ([`FakeApiServer::ca_pem`]).
    pub async fn start_tls(listener: std::net::TcpListener) -> FakeApiServer {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let addr = listener.local_addr().expect("local addr");
        let (ca_pem, config) = test_tls(addr.ip());
        let mut server = FakeApiServer {
            shared: Shared::default(),
            addr,
            running: None,
            tls: Some(tokio_rustls::TlsAcceptor::from(config)),
            ca_pem: Some(ca_pem),
        };
        server.serve(listener);
        server
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` (created) and returns its path: what the
    /// agent's `--kubeconfig` reads.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        std::fs::create_dir_all(dir).expect("kubeconfig dir");
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake, namespace: default}}\ncurrent-context: fake\n",
                self.url()
            ),
        )
        .expect("kubeconfig");
        path
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("server url"));
        kube::Client::try_from(config).expect("kube client")
    }

    fn serve(&mut self, listener: TcpListener) {
        let app = Router::new()
            .route(
                Kind::Pods.path(),
                get(
                    |s: State<Shared>, q: Query<HashMap<String, String>>, uri: Uri| async move {
                        handle(Kind::Pods, s, q, uri)
                    },
                ),
            )
            .route(
                Kind::Services.path(),
                get(
                    |s: State<Shared>, q: Query<HashMap<String, String>>, uri: Uri| async move {
                        handle(Kind::Services, s, q, uri)
                    },
                ),
            )
            .route(
                Kind::EndpointSlices.path(),
                get(
                    |s: State<Shared>, q: Query<HashMap<String, String>>, uri: Uri| async move {
                        handle(Kind::EndpointSlices, s, q, uri)
                    },
                ),
            )
            .route(
                "/apis/events.k8s.io/v1/namespaces/{namespace}/events",
                axum::routing::post(
                    |s: State<Shared>,
                     axum::extract::Path(namespace): axum::extract::Path<String>,
                     body: Bytes| async move { create_event(s, namespace, body) },
                ),
            )
            .fallback(|uri: Uri| async move {
                status_response(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{uri} not found"),
                )
            })
            .with_state(self.shared.clone());
        let (shutdown, signal) = oneshot::channel::<()>();
        let tls = self.tls.clone();
        let task = tokio::spawn(async move {
            let stop = async move {
                let _ = signal.await;
            };
            let served = match tls {
                None => {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                }
                Some(acceptor) => {
                    let listener = TlsListener {
                        inner: listener,
                        acceptor,
                    };
                    axum::serve(listener, app)
                        .with_graceful_shutdown(stop)
                        .await
                }
            };
            if let Err(err) = served {
                eprintln!("fake apiserver: {err}");
            }
        });
        self.running = Some(Running { shutdown, task });
    }

    /// Simulates an outage: cuts every open watch mid-stream, closes idle connections and the
    /// listening socket (new connections are refused). The cluster state is kept.
    pub async fn stop(&mut self) {
        let Some(running) = self.running.take() else {
            return;
        };
        let _ = running.shutdown.send(());
        {
            let mut cluster = lock(&self.shared);
            cluster.down = true;
            for col in cluster.collections.values_mut() {
                for w in col.watches.drain(..) {
                    let _ = w.send(WatchMsg::Abort);
                }
            }
        }
        let abort = running.task.abort_handle();
        if tokio::time::timeout(Duration::from_secs(5), running.task)
            .await
            .is_err()
        {
            abort.abort();
        }
    }

    /// Serves again on the same port, with the state as it is now.
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "server still running");
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(err) if Instant::now() < deadline => {
                    eprintln!("fake apiserver: rebinding {}: {err}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("cannot rebind {}: {err}", self.addr),
            }
        };
        lock(&self.shared).down = false;
        self.serve(listener);
    }

    /// Creates or replaces an object; open watches get ADDED or MODIFIED.
    pub fn apply<K: k8s_openapi::Resource + Serialize>(&self, obj: &K) -> u64 {
        let kind = Kind::from_k8s_kind(K::KIND);
        lock(&self.shared).apply_value(kind, to_value(obj), true)
    }

    /// Deletes an object; open watches get DELETED.
    pub fn delete<K: k8s_openapi::Resource>(&self, namespace: &str, name: &str) {
        let kind = Kind::from_k8s_kind(K::KIND);
        assert!(
            lock(&self.shared).delete(kind, namespace, name, true),
            "no {namespace}/{name} to delete"
        );
    }

    /// Simulates etcd compaction past every client: applies `changes` silently (not sent to
    /// watches, not kept in history), moves the compaction point to the newest resourceVersion
    /// and ends every open watch. A watch resumed from any version a client has seen gets
    /// `410 Gone`, so the changes only become visible through a new LIST.
    pub fn compact_with(&self, changes: impl FnOnce(&mut Compaction<'_>)) {
        let mut cluster = lock(&self.shared);
        // Stands for a write elsewhere in the cluster: versions are global.
        cluster.rv += 1;
        changes(&mut Compaction {
            cluster: &mut cluster,
        });
        let rv = cluster.rv;
        for col in cluster.collections.values_mut() {
            col.compacted = rv;
            col.history.clear();
            col.watches.clear(); // ends the streams cleanly, as a watch timeout would
        }
    }

    /// Sends a BOOKMARK at the current resourceVersion to every open watch that allows them.
    pub fn send_bookmarks(&self) {
        let mut cluster = lock(&self.shared);
        let rv = cluster.rv;
        for col in cluster.collections.values_mut() {
            col.watches
                .retain(|w| w.send(WatchMsg::Bookmark(rv)).is_ok());
        }
    }

    /// Answers LIST and WATCH of `kind` with 403 Forbidden (as without RBAC) while `on`.
    pub fn set_forbidden(&self, kind: Kind, on: bool) {
        let mut cluster = lock(&self.shared);
        cluster.forbidden.retain(|k| *k != kind);
        if on {
            cluster.forbidden.push(kind);
        }
    }

    /// Path and query of every request so far.
    /// The Events created so far, as the client sent them.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.shared).events.clone()
    }

    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared).requests.clone()
    }

    /// Watches whose client is still connected.
    pub fn open_watches(&self) -> usize {
        let mut cluster = lock(&self.shared);
        cluster
            .collections
            .values_mut()
            .map(|col| {
                col.watches.retain(|w| !w.is_closed());
                col.watches.len()
            })
            .sum()
    }

    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).rv
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.task.abort();
        }
    }
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = status_json(code.as_u16(), reason, message);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

/// `labelSelector` terms: `k`, `!k`, `k=v`, `k==v`, `k!=v`, comma-separated (all must match).
fn selector_matches(selector: Option<&str>, obj: &Value) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &obj["metadata"]["labels"];
    let label = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
    selector.split(',').all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            label(k) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            label(k) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            label(k).is_none()
        } else {
            label(term).is_some()
        }
    })
}

fn handle(
    kind: Kind,
    State(shared): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
    uri: Uri,
) -> Response {
    let mut cluster = lock(&shared);
    cluster.requests.push(uri.to_string());
    if cluster.down {
        let msg = "the apiserver is shutting down";
        return status_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", msg);
    }
    if cluster.forbidden.contains(&kind) {
        let msg = format!("{} is forbidden", kind.path());
        return status_response(StatusCode::FORBIDDEN, "Forbidden", &msg);
    }
    let selector = q.get("labelSelector").map(String::as_str);
    if matches!(q.get("watch").map(String::as_str), Some("true" | "1")) {
        watch(&mut cluster, kind, &q, selector)
    } else {
        list(&mut cluster, kind, &q, selector)
    }
}

fn list(
    cluster: &mut Cluster,
    kind: Kind,
    q: &HashMap<String, String>,
    selector: Option<&str>,
) -> Response {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    // continue = "<rv>|<namespace>|<name>" of the last item of the previous page.
    let (rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '|');
            match (
                parts.next().and_then(|r| r.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => (rv, Some((ns.to_owned(), name.to_owned()))),
                _ => return status_response(StatusCode::BAD_REQUEST, "BadRequest", "bad continue"),
            }
        }
        None => (cluster.rv, None),
    };
    let col = cluster.collection(kind);
    let mut items: Vec<(&(String, String), &Arc<Value>)> = col
        .objects
        .iter()
        .filter(|(key, _)| after.as_ref().is_none_or(|a| *key > a))
        .filter(|(_, obj)| selector_matches(selector, obj))
        .collect();
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        items.truncate(limit);
        if let Some(((ns, name), _)) = items.last() {
            metadata["continue"] = json!(format!("{rv}|{ns}|{name}"));
        }
    }
    let body = json!({
        "apiVersion": kind.api_version(),
        "kind": format!("{}List", kind.kind()),
        "metadata": metadata,
        "items": items.iter().map(|(_, obj)| Value::clone(obj)).collect::<Vec<_>>(),
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn event_line(typ: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": typ, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark_line(kind: Kind, rv: u64) -> Bytes {
    let obj = json!({
        "kind": kind.kind(), "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string()}
    });
    event_line("BOOKMARK", &obj)
}

fn watch(
    cluster: &mut Cluster,
    kind: Kind,
    q: &HashMap<String, String>,
    selector: Option<&str>,
) -> Response {
    let current = cluster.rv;
    let bookmarks = q.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let col = cluster.collection(kind);
    let mut first: Vec<Bytes> = Vec::new();
    match q.get("resourceVersion").map(String::as_str) {
        // Unset or 0: "any version": synthetic ADDED events for the current state first.
        None | Some("" | "0") => {
            for obj in col.objects.values() {
                if selector_matches(selector, obj) {
                    first.push(event_line("ADDED", obj));
                }
            }
        }
        Some(rv) => {
            let Ok(rv) = rv.parse::<u64>() else {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "bad resourceVersion",
                );
            };
            if rv < col.compacted {
                let message = format!("too old resource version: {rv} ({})", col.compacted);
                let error = event_line("ERROR", &status_json(410, "Expired", &message));
                return watch_response(Body::from(error));
            }
            for (_, typ, obj) in col.history.iter().filter(|(v, _, _)| *v > rv) {
                if selector_matches(selector, obj) {
                    first.push(event_line(typ, obj));
                }
            }
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    col.watches.push(tx);

    let selector = selector.map(str::to_owned);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let state = LiveWatch {
        rx,
        finished: false,
        last_rv: current,
    };
    let live = stream::unfold(state, move |mut st| {
        let selector = selector.clone();
        async move {
            if st.finished {
                return None;
            }
            let item: Option<Result<Bytes, io::Error>> = tokio::select! {
                msg = st.rx.recv() => match msg {
                    Some(WatchMsg::Event(typ, obj)) => {
                        let rv = obj["metadata"]["resourceVersion"].as_str();
                        if let Some(rv) = rv.and_then(|v| v.parse().ok()) {
                            st.last_rv = rv;
                        }
                        let matches = selector_matches(selector.as_deref(), &obj);
                        matches.then(|| Ok(event_line(typ, &obj)))
                    }
                    Some(WatchMsg::Bookmark(rv)) => {
                        st.last_rv = rv;
                        bookmarks.then(|| Ok(bookmark_line(kind, rv)))
                    }
                    Some(WatchMsg::Abort) => {
                        st.finished = true;
                        Some(Err(io::Error::other("apiserver outage")))
                    }
                    None => return None, // compaction: the watch ends cleanly
                },
                _ = tokio::time::sleep_until(deadline) => {
                    // The apiserver sends a last bookmark before a watch times out.
                    st.finished = true;
                    bookmarks.then(|| Ok(bookmark_line(kind, st.last_rv)))
                }
            };
            Some((item, st))
        }
    })
    .filter_map(|item| async move { item });
    let body = stream::iter(first.into_iter().map(Ok::<_, io::Error>)).chain(live);
    watch_response(Body::from_stream(body))
}

struct LiveWatch {
    rx: mpsc::UnboundedReceiver<WatchMsg>,
    finished: bool,
    /// Newest resourceVersion delivered (for the closing bookmark).
    last_rv: u64,
}

fn watch_response(body: Body) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Creates an Event as the API server does: 201 with the object, its namespace checked against
/// the path.
fn create_event(State(shared): State<Shared>, namespace: String, body: Bytes) -> Response {
    let Ok(mut ev) = serde_json::from_slice::<Value>(&body) else {
        return status_response(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let in_body = ev["metadata"]["namespace"].as_str().unwrap_or(&namespace);
    if in_body != namespace {
        return status_response(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    let mut cluster = lock(&shared);
    cluster.requests.push(format!("POST events {namespace}"));
    cluster.rv += 1;
    ev["metadata"]["namespace"] = json!(namespace);
    ev["metadata"]["resourceVersion"] = json!(cluster.rv.to_string());
    cluster.events.push(ev.clone());
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        ev.to_string(),
    )
        .into_response()
}
