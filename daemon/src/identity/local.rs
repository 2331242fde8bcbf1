//! Local mode: identity from an inventory file (YAML), the embedded default used by the demo and
//! the tests. The file is re-read when it changes; a malformed file is rejected with the file,
//! line, column and field, and on reload the last good inventory stays in force.
//!
//! A file that names no pods (0 bytes, only whitespace and comments, or no `pods` key) is refused:
//! it is far more likely a truncated or botched write than a wish to forget every pod. An
//! inventory that is empty on purpose says `pods: []`.
//!
//! Reloading ([`watch_file`]) follows symlinks to the final file and compares its identity
//! (device, inode) as well as its size, mtime and ctime, so a file replaced by `rename(2)` (even
//! with an older mtime) and a Kubernetes ConfigMap volume (whose `..data` symlink kubelet
//! re-points) are both picked up. A changed file is read only once it has held still for
//! [`SETTLE`]; writers should still write a temporary file and rename it over the inventory.
//!
//! ```yaml
//! pods:
//!   - name: client            # required
//!     namespace: default      # default: default
//!     ip: 10.244.0.2          # or ips: [10.244.0.2, fd00:244::2]
//!     labels: {app: client}
//!     workload: Deployment/client   # optional Kind/name; default: the pod itself
//!     ready: true             # default: true
//!     host_network: false     # default: false
//!     node: node-a            # optional
//!     image: shop/client:1.4  # optional; named when the client's verdict regresses
//! services:
//!   - name: pricing
//!     namespace: default
//!     headless: true          # or cluster_ip: 10.96.0.10 (exactly one of the two)
//!     ports:
//!       - port: 80
//!         target_port: 8080   # default: port
//!         name: grpc          # optional
//!     selector: {app: pricing}   # endpoints: the pods in the namespace with these labels
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use tokio::sync::watch;

use super::model::{
    Endpoint, Inventory, ObjectRef, Pod, Service, ServicePort, TargetPort, Workload,
};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("inventory {file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// serde_yaml's message names the field path and carries "at line L column C".
    #[error("inventory {file}: {message}")]
    Parse {
        file: String,
        message: String,
        line: Option<usize>,
    },
    /// The file names no pods and does not say `pods: []`.
    #[error(
        "inventory {file}: {reason}; refusing to drop every pod's identity (an inventory that is \
         empty on purpose says `pods: []`)"
    )]
    Empty { file: String, reason: &'static str },
}

impl InventoryError {
    /// Line of the error in the file (1-based), when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            InventoryError::Parse { line, .. } => *line,
            InventoryError::Read { .. } | InventoryError::Empty { .. } => None,
        }
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// `None` when the key is missing or has no value; `pods: []` is `Some` and empty.
    #[serde(default)]
    pods: Option<Vec<PodEntry>>,
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

/// A pod and its labels, which only the file's service selectors need: the inventory keeps no
/// labels (a map per pod for nothing, once the endpoints are made).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawPod")]
struct PodEntry(Pod, BTreeMap<String, String>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    ip: Option<IpAddr>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    workload: Option<String>,
    #[serde(default = "yes")]
    ready: bool,
    #[serde(default)]
    host_network: bool,
    node: Option<String>,
    /// The image(s) the pod runs, for the regression report (optional).
    image: Option<String>,
}

impl TryFrom<RawPod> for PodEntry {
    type Error = String;

    fn try_from(r: RawPod) -> Result<Self, String> {
        if r.name.is_empty() {
            return Err("pod `name` must not be empty".into());
        }
        let mut ips = r.ips;
        if let Some(ip) = r.ip {
            ips.insert(0, ip);
        }
        if ips.is_empty() {
            return Err(format!("pod {}: needs `ip` or `ips`", r.name));
        }
        let workload = match r.workload {
            None => Workload {
                kind: "Pod".into(),
                name: r.name.clone(),
            },
            Some(w) => match w.split_once('/') {
                Some((kind, name)) if !kind.is_empty() && !name.is_empty() => Workload {
                    kind: kind.into(),
                    name: name.into(),
                },
                _ => {
                    return Err(format!(
                        "pod {}: `workload` must be Kind/name (e.g. Deployment/{}), got {w:?}",
                        r.name, r.name
                    ));
                }
            },
        };
        let version = super::model::version_of(&r.image.into_iter().collect::<Vec<_>>(), &r.labels);
        Ok(PodEntry(
            Pod {
                uid: format!("local/{}/{}", r.namespace, r.name),
                namespace: r.namespace,
                name: r.name,
                ips,
                workload,
                node: r.node,
                host_network: r.host_network,
                ready: r.ready,
                version,
            },
            r.labels,
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: u16,
    target_port: Option<u16>,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawService")]
struct ServiceEntry {
    service: Service,
    selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    headless: bool,
    cluster_ip: Option<IpAddr>,
    ports: Vec<RawPort>,
    #[serde(default)]
    selector: BTreeMap<String, String>,
}

impl TryFrom<RawService> for ServiceEntry {
    type Error = String;

    fn try_from(r: RawService) -> Result<Self, String> {
        let cluster_ips = match (r.headless, r.cluster_ip) {
            (true, None) => Vec::new(),
            (false, Some(ip)) => vec![ip],
            (true, Some(_)) => {
                return Err(format!(
                    "service {}: `headless: true` and `cluster_ip` exclude each other",
                    r.name
                ));
            }
            (false, None) => {
                return Err(format!(
                    "service {}: needs `cluster_ip` or `headless: true`",
                    r.name
                ));
            }
        };
        if r.ports.is_empty() {
            return Err(format!("service {}: needs at least one port", r.name));
        }
        let mut names = HashSet::new();
        if r.ports.len() > 1 && r.ports.iter().any(|p| p.name.is_none()) {
            return Err(format!(
                "service {}: with several ports every port needs a `name`",
                r.name
            ));
        }
        let ports = r
            .ports
            .into_iter()
            .map(|p| {
                if let Some(n) = &p.name
                    && !names.insert(n.clone())
                {
                    return Err(format!("service {}: port name {n:?} used twice", r.name));
                }
                Ok(ServicePort {
                    name: p.name,
                    port: p.port,
                    target_port: TargetPort::Number(p.target_port.unwrap_or(p.port)),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(ServiceEntry {
            service: Service {
                namespace: r.namespace,
                name: r.name,
                cluster_ips,
                ports,
                endpoints: Vec::new(),
            },
            selector: r.selector,
        })
    }
}

/// Parses inventory text. `file` names the source in errors.
pub fn parse(text: &str, file: &str) -> Result<Inventory, InventoryError> {
    let parse_err = |message: String, line: Option<usize>| InventoryError::Parse {
        file: file.to_string(),
        message,
        line,
    };
    let doc: File = serde_yaml::from_str(text)
        .map_err(|e| parse_err(e.to_string(), e.location().map(|l| l.line())))?;
    let Some(pods) = doc.pods else {
        return Err(InventoryError::Empty {
            file: file.to_string(),
            reason: if is_blank(text) {
                "the file is empty"
            } else {
                "the file has no `pods` list"
            },
        });
    };
    let (pods, labels): (Vec<Pod>, Vec<BTreeMap<String, String>>) =
        pods.into_iter().map(|p| (p.0, p.1)).unzip();
    let mut seen = HashSet::new();
    for (i, p) in pods.iter().enumerate() {
        if !seen.insert(p.id()) {
            return Err(parse_err(
                format!("pods[{i}]: pod {} is listed twice", p.id()),
                None,
            ));
        }
    }
    let mut seen_ips = HashSet::new();
    for (i, p) in pods.iter().enumerate().filter(|(_, p)| !p.host_network) {
        for ip in &p.ips {
            if !seen_ips.insert(*ip) {
                return Err(parse_err(
                    format!(
                        "pods[{i}]: IP {ip} of pod {} belongs to another pod too",
                        p.id()
                    ),
                    None,
                ));
            }
        }
    }
    let mut seen = HashSet::new();
    let mut services = Vec::new();
    for (i, entry) in doc.services.into_iter().enumerate() {
        let mut svc = entry.service;
        if !seen.insert(svc.id()) {
            return Err(parse_err(
                format!("services[{i}]: service {} is listed twice", svc.id()),
                None,
            ));
        }
        // Endpoints: pods of the namespace that match the selector, one per pod IP and port.
        if !entry.selector.is_empty() {
            for (pod, _) in pods.iter().zip(&labels).filter(|(p, labels)| {
                p.namespace == svc.namespace
                    && !p.host_network
                    && entry.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
            }) {
                for ip in &pod.ips {
                    for port in &svc.ports {
                        let TargetPort::Number(target) = port.target_port else {
                            continue;
                        };
                        svc.endpoints.push(Endpoint {
                            pod: Some(ObjectRef::new(&pod.namespace, &pod.name)),
                            ip: *ip,
                            port: target,
                            port_name: port.name.clone(),
                            ready: pod.ready,
                        });
                    }
                }
            }
        }
        services.push(svc);
    }
    Ok(Inventory::new(pods, services))
}

/// Whether `text` holds no YAML content: only whitespace, comments and document markers.
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
    })
}

/// Files larger than this are refused rather than read (a wrong path such as a device or a log).
const MAX_BYTES: u64 = 64 << 20;

/// Reads and parses the inventory at `path` (following symlinks). Used at startup; an empty file
/// is an error like any other (see [`InventoryError::Empty`]).
pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let file = path.display().to_string();
    let read_err = |source| InventoryError::Read {
        file: file.clone(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read_err)?;
    let text = read_text(&mut f).map_err(read_err)?;
    parse(&text, &file)
}

fn read_text(f: &mut std::fs::File) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    f.take(MAX_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {} MiB",
            MAX_BYTES >> 20
        )));
    }
    Ok(text)
}

/// What the reloader reports after each attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Loaded,
    Rejected(String),
}

/// Identity and version of the final file a path leads to (symlinks followed): what the reloader
/// compares. Device and inode tell a file renamed into place (or a ConfigMap's re-pointed `..data`)
/// from the old one whatever their mtimes; size, mtime and ctime tell an edit in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// The file's [`FileId`], `None` when it cannot be stat'ed (missing, dangling symlink).
pub type FileStamp = Option<FileId>;

pub fn stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path).ok().map(|m| FileId::of(&m))
}

/// How long a changed file must hold still (same [`FileStamp`] at both ends) before it is read.
/// A writer that pauses longer than this mid-file can still be read half-written, which is why
/// writers should write a temporary file and rename it into place.
pub const SETTLE: Duration = Duration::from_millis(200);

/// A file still changing after this long is logged (once per change), as it is not read meanwhile.
const STILL_MOVING: Duration = Duration::from_secs(10);

/// Reads the file `path` leads to, provided it still is the version `expected` and stays that
/// version during the read (the open descriptor pins the inode, so a rename mid-read cannot mix
/// two files). `None`: the file changed again meanwhile; try again on a later check.
fn load_settled(path: &Path, expected: FileStamp) -> Option<Result<Inventory, InventoryError>> {
    let file = path.display().to_string();
    let read_err = |source| InventoryError::Read {
        file: file.clone(),
        source,
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(_) if stamp(path) != expected => return None,
        Err(e) => return Some(Err(read_err(e))),
    };
    let before = match f.metadata() {
        Ok(m) => FileId::of(&m),
        Err(e) => return Some(Err(read_err(e))),
    };
    if Some(before) != expected {
        return None;
    }
    let text = match read_text(&mut f) {
        Ok(text) => text,
        Err(e) => return Some(Err(read_err(e))),
    };
    match f.metadata() {
        Ok(m) if FileId::of(&m) == before => Some(parse(&text, &file)),
        Ok(_) => None,
        Err(e) => Some(Err(read_err(e))),
    }
}

/// Watches `path` and publishes each good version on `tx`.
///
/// Every `every` the reloader stats the file (following symlinks). When the [`FileStamp`]
/// differs from the version last tried, it waits until two consecutive stamps taken [`SETTLE`]
/// apart agree, then reads and parses the file; a change is thus applied between `every` and
/// `every + SETTLE` after the last write. Each attempt, good or bad, is passed to `report`
/// exactly once; a bad version (unreadable, malformed, empty, missing) is logged at WARN, the
/// last good inventory stays in force, and the next change is tried afresh.
///
/// `loaded` is the stamp taken *before* the version in force was read, so that an edit racing
/// the first load is not missed. Runs until `tx` has no receivers left.
pub async fn watch_file(
    path: PathBuf,
    every: Duration,
    loaded: FileStamp,
    tx: watch::Sender<Arc<Inventory>>,
    report: impl Fn(&ReloadOutcome) + Send,
) {
    let mut last = loaded;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if tx.is_closed() {
            return;
        }
        let seen = stamp(&path);
        if seen == last {
            continue;
        }
        // Changed: wait until it holds still.
        let mut settled = seen;
        let mut waited = Duration::ZERO;
        loop {
            tokio::time::sleep(SETTLE).await;
            if tx.is_closed() {
                return;
            }
            let again = stamp(&path);
            if again == settled {
                break;
            }
            settled = again;
            waited += SETTLE;
            if waited == STILL_MOVING {
                tracing::warn!(
                    file = %path.display(),
                    "inventory keeps changing; waiting for it to hold still before reading it"
                );
            }
        }
        if settled == last {
            continue;
        }
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || load_settled(&p, settled))
            .await
            .unwrap_or_else(|e| {
                Some(Err(InventoryError::Read {
                    file: path.display().to_string(),
                    source: std::io::Error::other(e),
                }))
            });
        let Some(result) = read else {
            tracing::debug!(file = %path.display(), "inventory changed while read; retrying");
            continue;
        };
        last = settled;
        match result {
            Ok(inv) => {
                tracing::info!(
                    file = %path.display(),
                    pods = inv.pods().len(),
                    services = inv.services().len(),
                    "inventory reloaded"
                );
                let _ = tx.send(Arc::new(inv));
                report(&ReloadOutcome::Loaded);
            }
            Err(e) => {
                tracing::warn!(
                    file = %path.display(),
                    error = %e,
                    "inventory reload rejected; the last good one stays in force"
                );
                report(&ReloadOutcome::Rejected(e.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
pods:
  - name: client
    ip: 10.244.0.2
    labels: {app: client}
    workload: Deployment/client
  - name: pricing-0
    namespace: shop
    ips: [10.244.0.3, fd00:244::3]
    labels: {app: pricing}
  - name: pricing-1
    namespace: shop
    ip: 10.244.0.4
    labels: {app: pricing}
    ready: false
  - name: node-agent
    ip: 192.0.2.1
    host_network: true
    labels: {app: pricing}
services:
  - name: pricing
    namespace: shop
    cluster_ip: 10.96.0.10
    ports: [{port: 80, target_port: 8080, name: grpc}]
    selector: {app: pricing}
  - name: pricing-headless
    namespace: shop
    headless: true
    ports: [{port: 8080}]
    selector: {app: pricing}
";

    #[test]
    fn parses_pods_services_and_derives_endpoints() {
        let inv = parse(GOOD, "inv.yaml").unwrap();
        assert_eq!(inv.pods().len(), 4);
        let client = inv.pod("default", "client").unwrap();
        assert_eq!(client.workload.kind, "Deployment");
        let p0 = inv.pod("shop", "pricing-0").unwrap();
        assert_eq!(p0.workload.name, "pricing-0");
        assert_eq!(p0.ips.len(), 2);
        let svc = inv.service("shop", "pricing").unwrap();
        assert!(!svc.headless());
        // pricing-0 has two IPs, pricing-1 one; the hostNetwork pod is not an endpoint.
        assert_eq!(svc.endpoints.len(), 3);
        assert_eq!(svc.ready_backends(), 1, "pricing-1 is not ready");
        assert!(svc.endpoints.iter().all(|e| e.port == 8080));
        let headless = inv.service("shop", "pricing-headless").unwrap();
        assert!(headless.headless());
        assert_eq!(headless.ports[0].target_port, TargetPort::Number(8080));
        assert_eq!(
            inv.services_by_endpoint("10.244.0.4:8080".parse().unwrap())
                .len(),
            2
        );
    }

    fn err(text: &str) -> InventoryError {
        match parse(text, "bad.yaml") {
            Err(e) => e,
            Ok(_) => panic!("accepted:\n{text}"),
        }
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err("pods:\n  - name: a\n    ip: 10.0.0.300\n");
        let msg = e.to_string();
        assert!(msg.starts_with("inventory bad.yaml: pods[0].ip"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert_eq!(e.line(), Some(3));

        let msg = err("pods:\n  - name: a\n    ipp: 10.0.0.1\n").to_string();
        assert!(msg.contains("unknown field `ipp`"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");

        // Checks made after a whole entry is read name the entry and its position.
        let msg = err("pods:\n  - name: a\n").to_string();
        assert!(msg.contains("pod a: needs `ip` or `ips`"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");

        let msg = err("services:\n  - name: s\n    ports: [{port: 80}]\n").to_string();
        assert!(
            msg.contains("needs `cluster_ip` or `headless: true`"),
            "{msg}"
        );
        let msg = err(
            "services:\n  - name: s\n    headless: true\n    cluster_ip: 10.96.0.1\n    ports: [{port: 80}]\n",
        )
        .to_string();
        assert!(msg.contains("exclude each other"), "{msg}");
        let msg = err("services:\n  - name: s\n    headless: true\n    ports: [{port: 70000}]\n")
            .to_string();
        assert!(msg.contains("services[0].ports[0].port"), "{msg}");
        let msg =
            err("pods:\n  - {name: a, ip: 10.0.0.1}\n  - {name: a, ip: 10.0.0.2}\n").to_string();
        assert!(msg.contains("listed twice"), "{msg}");
        let msg =
            err("pods:\n  - {name: a, ip: 10.0.0.1}\n  - {name: b, ip: 10.0.0.1}\n").to_string();
        assert!(msg.contains("another pod"), "{msg}");
        let msg = err("pods:\n  - {name: a, ip: 10.0.0.1, workload: Deployment}\n").to_string();
        assert!(msg.contains("Kind/name"), "{msg}");
        let msg = err("pods: [\n").to_string();
        assert!(msg.contains("bad.yaml"), "{msg}");
    }

    #[test]
    fn a_file_naming_no_pods_is_refused_unless_it_says_pods_empty() {
        for text in [
            "",
            "   \n\n",
            "# nothing yet\n\n  # still nothing\n",
            "---\n",
        ] {
            let e = err(text);
            assert!(matches!(e, InventoryError::Empty { .. }), "{text:?}: {e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with("inventory bad.yaml: the file is empty"),
                "{msg}"
            );
            assert!(msg.contains("`pods: []`"), "{msg}");
        }
        for text in [
            "pods:\n",
            "pods: ~\n",
            "services:\n  - {name: s, headless: true, ports: [{port: 80}]}\n",
        ] {
            let msg = err(text).to_string();
            assert!(msg.contains("no `pods` list"), "{text:?}: {msg}");
        }
        let inv = parse("# deliberately empty\npods: []\n", "empty.yaml").unwrap();
        assert!(inv.pods().is_empty());
        let inv = parse(
            "pods: []\nservices:\n  - {name: s, headless: true, ports: [{port: 80}]}\n",
            "x",
        )
        .unwrap();
        assert_eq!(inv.services().len(), 1);
    }

    /// A directory under the temp dir, unique to the test, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("fanout-inv-{name}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `n` pods p0..p(n-1), one line each, with the given IP prefix.
    fn pods(n: usize, net: u8) -> String {
        let mut y = String::from("pods:\n");
        for i in 0..n {
            y.push_str(&format!("  - {{name: p{i:03}, ip: 10.{net}.0.{i}}}\n"));
        }
        y
    }

    /// The reloader running on a file, as agent.rs starts it: stamp, load, watch. Records each
    /// outcome with the pod count in force right after it.
    struct Watched {
        rx: watch::Receiver<Arc<Inventory>>,
        seen: Arc<std::sync::Mutex<Option<watch::Receiver<Arc<Inventory>>>>>,
        outcomes: Arc<std::sync::Mutex<Vec<(ReloadOutcome, usize)>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Watched {
        fn start(path: &Path) -> Watched {
            let loaded = stamp(path);
            let (tx, rx) = watch::channel(Arc::new(load(path).unwrap()));
            let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
            // Dropped by stop(), so that the channel closes and the reloader ends.
            let seen = Arc::new(std::sync::Mutex::new(Some(rx.clone())));
            let o = outcomes.clone();
            let task = tokio::spawn(watch_file(
                path.to_path_buf(),
                Duration::from_millis(20),
                loaded,
                tx,
                {
                    let seen = seen.clone();
                    move |r| {
                        let pods = seen
                            .lock()
                            .unwrap()
                            .as_ref()
                            .map(|rx| rx.borrow().pods().len());
                        o.lock().unwrap().push((r.clone(), pods.unwrap_or(0)));
                    }
                },
            ));
            Watched {
                rx,
                seen,
                outcomes,
                task,
            }
        }

        /// Waits for the `n`th outcome (1-based) and returns it.
        async fn outcome(&self, n: usize) -> (ReloadOutcome, usize) {
            for _ in 0..500 {
                if let Some(o) = self.outcomes.lock().unwrap().get(n - 1) {
                    return o.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("no reload #{n}; seen: {:?}", self.outcomes.lock().unwrap());
        }

        fn pods(&self) -> usize {
            self.rx.borrow().pods().len()
        }

        async fn stop(self) {
            let Watched {
                rx,
                seen,
                outcomes,
                task,
            } = self;
            drop(rx);
            seen.lock().unwrap().take();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the reloader stops once nobody listens")
                .unwrap();
            drop(outcomes);
        }
    }

    fn rejected(o: &(ReloadOutcome, usize)) -> &str {
        match &o.0 {
            ReloadOutcome::Rejected(m) => m,
            ReloadOutcome::Loaded => panic!("loaded: {o:?}"),
        }
    }

    #[tokio::test]
    async fn reload_keeps_the_last_good_inventory() {
        let dir = TempDir::new("bad");
        let path = dir.0.join("inv.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let w = Watched::start(&path);
        // A broken edit is rejected and the old inventory stays.
        std::fs::write(&path, "pods:\n  - name: x\n    ip: nope\n").unwrap();
        let o = w.outcome(1).await;
        assert!(rejected(&o).contains("line 3"), "{o:?}");
        assert_eq!(o.1, 4);
        // A good edit replaces it.
        std::fs::write(&path, "pods:\n  - {name: only, ip: 10.1.1.1}\n").unwrap();
        assert_eq!(w.outcome(2).await, (ReloadOutcome::Loaded, 1));
        // A deleted file is one failed reload, not one per check.
        std::fs::remove_file(&path).unwrap();
        let o = w.outcome(3).await;
        assert!(rejected(&o).contains("inv.yaml"), "{o:?}");
        tokio::time::sleep(SETTLE * 2).await;
        assert_eq!(w.outcomes.lock().unwrap().len(), 3);
        assert_eq!(w.pods(), 1);
        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(w.outcome(4).await, (ReloadOutcome::Loaded, 4));
        w.stop().await;
    }

    #[test]
    fn an_empty_file_is_refused_at_startup() {
        let dir = TempDir::new("startup");
        let path = dir.0.join("inv.yaml");
        std::fs::write(&path, "").unwrap();
        let msg = load(&path).unwrap_err().to_string();
        assert!(
            msg.starts_with(&format!("inventory {}: the file is empty", path.display())),
            "{msg}"
        );
        std::fs::write(&path, "\n  \n# generated\n").unwrap();
        assert!(matches!(load(&path), Err(InventoryError::Empty { .. })));
        std::fs::write(&path, "pods: []\n").unwrap();
        assert!(load(&path).unwrap().pods().is_empty());
    }

    #[tokio::test]
    async fn an_empty_file_is_a_failed_reload() {
        let dir = TempDir::new("empty");
        let path = dir.0.join("inv.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let w = Watched::start(&path);
        std::fs::write(&path, "").unwrap();
        let o = w.outcome(1).await;
        assert!(rejected(&o).contains("the file is empty"), "{o:?}");
        assert_eq!(o.1, 4, "the last good inventory stays");
        std::fs::write(&path, "# regenerating\n\n").unwrap();
        let o = w.outcome(2).await;
        assert!(rejected(&o).contains("the file is empty"), "{o:?}");
        assert_eq!(w.pods(), 4);
        // An inventory that is empty on purpose is applied.
        std::fs::write(&path, "pods: []\n").unwrap();
        assert_eq!(w.outcome(3).await, (ReloadOutcome::Loaded, 0));
        w.stop().await;
    }

    #[tokio::test]
    async fn a_file_being_written_is_not_applied_half_written() {
        // A round proves something only if the writer's pause stayed under SETTLE (a busy
        // machine can stretch a sleep); a round where it did not is run again.
        for round in 0..5 {
            let dir = TempDir::new("partial");
            let path = dir.0.join("inv.yaml");
            std::fs::write(&path, pods(3, 1)).unwrap();
            let w = Watched::start(&path);
            // The first half of the new file is a valid inventory by itself: 20 of 40 pods.
            let full = pods(40, 2);
            let half = full
                .lines()
                .take(21)
                .map(|l| format!("{l}\n"))
                .collect::<String>();
            assert_eq!(parse(&half, "half").unwrap().pods().len(), 20);
            let rest = full[half.len()..].to_string();
            let p = path.clone();
            let writer = std::thread::spawn(move || {
                use std::io::Write;
                let mut f = std::fs::File::create(&p).unwrap();
                f.write_all(half.as_bytes()).unwrap();
                let paused = std::time::Instant::now();
                // Several checks (every 20 ms) see the half, but it does not hold still for
                // SETTLE.
                std::thread::sleep(Duration::from_millis(60));
                let paused = paused.elapsed();
                f.write_all(rest.as_bytes()).unwrap();
                paused
            });
            let first = w.outcome(1).await;
            let paused = writer.join().unwrap();
            tokio::time::sleep(SETTLE * 2).await;
            let outcomes = w.outcomes.lock().unwrap().clone();
            w.stop().await;
            if paused >= SETTLE {
                eprintln!("round {round}: the writer paused {paused:?}; again");
                continue;
            }
            assert_eq!(first, (ReloadOutcome::Loaded, 40));
            assert_eq!(outcomes, [first], "one reload, of the whole file");
            return;
        }
        panic!("the writer never paused less than {SETTLE:?}");
    }

    /// Sets `path`'s mtime to `to`.
    fn set_mtime(path: &Path, to: std::time::SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(to)
            .unwrap();
    }

    fn mtime(path: &Path) -> std::time::SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[tokio::test]
    async fn a_configmap_volume_update_is_picked_up() {
        use std::os::unix::fs::symlink;
        // kubelet's layout: the key is a symlink into `..data`, itself a symlink to a
        // timestamped directory; an update writes a new directory and re-points `..data`.
        let dir = TempDir::new("configmap");
        let d = &dir.0;
        let v1 = d.join("..2026_11_30_12_00_00.1");
        std::fs::create_dir(&v1).unwrap();
        std::fs::write(v1.join("inventory.yaml"), pods(3, 1)).unwrap();
        symlink("..2026_11_30_12_00_00.1", d.join("..data")).unwrap();
        symlink("..data/inventory.yaml", d.join("inventory.yaml")).unwrap();
        let path = d.join("inventory.yaml");
        let w = Watched::start(&path);
        assert_eq!(w.pods(), 3);
        let old_mtime = mtime(&v1.join("inventory.yaml"));

        // The new version has the same size and mtime as the old one: only the file's identity
        // tells them apart.
        let v2 = d.join("..2026_11_30_12_05_00.2");
        std::fs::create_dir(&v2).unwrap();
        let new = pods(3, 2).replace("p002", "q002");
        assert_eq!(new.len(), pods(3, 1).len());
        std::fs::write(v2.join("inventory.yaml"), &new).unwrap();
        set_mtime(&v2.join("inventory.yaml"), old_mtime);
        symlink("..2026_11_30_12_05_00.2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(&v1).unwrap();

        assert_eq!(w.outcome(1).await, (ReloadOutcome::Loaded, 3));
        assert!(w.rx.borrow().pod("default", "q002").is_some());
        assert!(w.rx.borrow().pod("default", "p002").is_none());
        w.stop().await;
    }

    #[tokio::test]
    async fn a_file_renamed_into_place_is_picked_up_whatever_its_mtime() {
        let dir = TempDir::new("rename");
        let path = dir.0.join("inv.yaml");
        std::fs::write(&path, pods(2, 1)).unwrap();
        let w = Watched::start(&path);

        // An older mtime than the file it replaces (e.g. `mv` of a file prepared earlier).
        let tmp = dir.0.join("inv.yaml.tmp");
        std::fs::write(&tmp, pods(2, 2).replace("p001", "r001")).unwrap();
        set_mtime(&tmp, mtime(&path) - Duration::from_secs(3600));
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(w.outcome(1).await, (ReloadOutcome::Loaded, 2));
        assert!(w.rx.borrow().pod("default", "r001").is_some());

        // Same size and the very same mtime as the file it replaces.
        std::fs::write(&tmp, pods(2, 3).replace("p001", "s001")).unwrap();
        set_mtime(&tmp, mtime(&path));
        assert_eq!(
            std::fs::metadata(&tmp).unwrap().len(),
            std::fs::metadata(&path).unwrap().len()
        );
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(w.outcome(2).await, (ReloadOutcome::Loaded, 2));
        assert!(w.rx.borrow().pod("default", "s001").is_some());
        w.stop().await;
    }
}
