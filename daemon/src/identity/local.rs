//! Local mode: identity from an inventory file (YAML), the embedded default used by the demo and
//! the tests. The file is re-read when it changes; a malformed file is rejected with the file,
//! line, column and field, and on reload the last good inventory stays in force.
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
    time::{Duration, SystemTime},
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
}

impl InventoryError {
    /// Line of the error in the file (1-based), when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            InventoryError::Parse { line, .. } => *line,
            InventoryError::Read { .. } => None,
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
    #[serde(default)]
    pods: Vec<PodEntry>,
    #[serde(default)]
    services: Vec<ServiceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawPod")]
struct PodEntry(Pod);

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
        Ok(PodEntry(Pod {
            uid: format!("local/{}/{}", r.namespace, r.name),
            namespace: r.namespace,
            name: r.name,
            ips,
            labels: r.labels,
            workload,
            node: r.node,
            host_network: r.host_network,
            ready: r.ready,
        }))
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
    let pods: Vec<Pod> = doc.pods.into_iter().map(|p| p.0).collect();
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
            for pod in pods.iter().filter(|p| {
                p.namespace == svc.namespace
                    && !p.host_network
                    && entry
                        .selector
                        .iter()
                        .all(|(k, v)| p.labels.get(k) == Some(v))
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

pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// What the reloader reports after each attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Loaded,
    Rejected(String),
}

/// Modification time and size of a file: what the reloader compares.
pub type FileStamp = Option<(SystemTime, u64)>;

pub fn stamp(path: &Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Watches `path` (polling its modification time and size every `every`) and publishes each
/// good version on `tx`. `loaded` is the stamp taken *before* the version in force was read, so
/// that an edit racing the first load is not missed. `report` hears about every reload attempt.
/// Runs until `tx` has no receivers left.
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
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        let p = path.clone();
        let result = tokio::task::spawn_blocking(move || load(&p))
            .await
            .unwrap_or_else(|e| {
                Err(InventoryError::Read {
                    file: path.display().to_string(),
                    source: std::io::Error::other(e),
                })
            });
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
                tracing::error!(error = %e, "inventory reload rejected; the last good one stays in force");
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
    fn empty_file_is_an_empty_inventory() {
        let inv = parse("", "empty.yaml").unwrap();
        assert!(inv.pods().is_empty());
    }

    #[tokio::test]
    async fn reload_keeps_the_last_good_inventory() {
        let dir = std::env::temp_dir().join(format!("fanout-inv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("inv.yaml");
        std::fs::write(&path, GOOD).unwrap();
        let loaded = stamp(&path);
        let (tx, mut rx) = watch::channel(Arc::new(load(&path).unwrap()));
        let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let o = outcomes.clone();
        let task = tokio::spawn(watch_file(
            path.clone(),
            Duration::from_millis(20),
            loaded,
            tx,
            move |r| o.lock().unwrap().push(r.clone()),
        ));
        let wait_outcomes = |n: usize| {
            let outcomes = outcomes.clone();
            async move {
                for _ in 0..250 {
                    if outcomes.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("no reload seen");
            }
        };
        // A broken edit is rejected and the old inventory stays.
        std::fs::write(&path, "pods:\n  - name: x\n    ip: nope\n").unwrap();
        wait_outcomes(1).await;
        assert!(
            matches!(&outcomes.lock().unwrap()[0], ReloadOutcome::Rejected(m) if m.contains("line 3"))
        );
        assert_eq!(rx.borrow().pods().len(), 4);
        // A good edit replaces it.
        std::fs::write(&path, "pods:\n  - {name: only, ip: 10.1.1.1}\n").unwrap();
        wait_outcomes(2).await;
        assert_eq!(outcomes.lock().unwrap()[1], ReloadOutcome::Loaded);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().pods().len(), 1);
        drop(rx);
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
