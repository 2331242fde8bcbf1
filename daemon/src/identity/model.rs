//! Who is who: pods, services and their endpoints, with the lookups attribution needs (by IP, by
//! IP:port). Both sources (the local inventory file and Kubernetes) produce these same types; an
//! [`Inventory`] is an immutable snapshot that is swapped whole when the source changes.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::keyed::{Map, Set};

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The controller a pod belongs to: Deployment (through its ReplicaSet), StatefulSet, DaemonSet,
/// Job (CronJob jobs keep the Job), or the pod itself.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub ips: Vec<IpAddr>,
    pub workload: Workload,
    /// Node the pod is scheduled on, when known.
    pub node: Option<String>,
    /// Shares the node's network namespace: its IP is the node's, not its own.
    pub host_network: bool,
    pub ready: bool,
    /// What the pod runs, shown when a client's verdict regresses: its container images
    /// (comma-separated, in spec order), or else the `pod-template-hash` or
    /// `controller-revision-hash` label ([`version_of`]).
    pub version: Option<String>,
}

impl Pod {
    pub fn id(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// A pod's version for the regression report: the images when known, else the template hash
/// label its controller sets.
pub fn version_of(images: &[String], labels: &BTreeMap<String, String>) -> Option<String> {
    if !images.is_empty() {
        return Some(images.join(","));
    }
    ["pod-template-hash", "controller-revision-hash"]
        .iter()
        .find_map(|l| labels.get(*l))
        .map(|h| format!("template {h}"))
}

/// A service port's target: a number, or the name of a container port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
}

/// One backend of a service: an address and port, usually a pod's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The backing pod, when the endpoint names one.
    pub pod: Option<ObjectRef>,
    pub ip: IpAddr,
    /// The port the backend listens on (the resolved target port).
    pub port: u16,
    /// Name of the service port this endpoint port serves (None for a single unnamed port).
    pub port_name: Option<String>,
    pub ready: bool,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Empty for a headless service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn id(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    pub fn headless(&self) -> bool {
        self.cluster_ips.is_empty()
    }

    /// Ready backends (distinct pods, or distinct addresses where no pod is named).
    pub fn ready_backends(&self) -> usize {
        let mut seen = HashSet::new();
        self.endpoints
            .iter()
            .filter(|e| e.ready)
            .filter(|e| seen.insert(e.pod.clone().map(Ok).unwrap_or(Err(e.ip))))
            .count()
    }

    /// The service port an endpoint port belongs to.
    pub fn port_for_endpoint(&self, ep: &Endpoint) -> Option<&ServicePort> {
        match &ep.port_name {
            Some(n) => self.ports.iter().find(|p| p.name.as_deref() == Some(n)),
            None if self.ports.len() == 1 => self.ports.first(),
            None => self.ports.iter().find(|p| match &p.target_port {
                TargetPort::Number(t) => *t == ep.port,
                TargetPort::Name(_) => false,
            }),
        }
    }
}

/// Where an address:port points inside a service.
#[derive(Clone, Debug)]
pub struct ServiceHit {
    pub service: Arc<Service>,
    /// Index into `service.ports`.
    pub port: usize,
}

impl ServiceHit {
    pub fn port(&self) -> &ServicePort {
        &self.service.ports[self.port]
    }
}

/// An immutable snapshot of the cluster (or the local inventory) with lookup indices.
#[derive(Default, Debug)]
pub struct Inventory {
    pods: Vec<Arc<Pod>>,
    services: Vec<Arc<Service>>,
    pod_by_ip: Map<IpAddr, Arc<Pod>>,
    /// By namespace, then name: found from two `&str` without making an [`ObjectRef`].
    pod_by_ref: Map<String, Map<String, Arc<Pod>>>,
    /// IPs of hostNetwork pods (node addresses): never attributed to one pod.
    host_ips: Set<IpAddr>,
    by_cluster_addr: Map<SocketAddr, ServiceHit>,
    by_endpoint_addr: Map<SocketAddr, Vec<ServiceHit>>,
}

impl Inventory {
    pub fn new(pods: Vec<Pod>, services: Vec<Service>) -> Self {
        let pods: Vec<Arc<Pod>> = pods.into_iter().map(Arc::new).collect();
        let services: Vec<Arc<Service>> = services.into_iter().map(Arc::new).collect();
        let mut inv = Inventory {
            pods: pods.clone(),
            services: services.clone(),
            ..Default::default()
        };
        for pod in &pods {
            inv.pod_by_ref
                .entry(pod.namespace.clone())
                .or_default()
                .insert(pod.name.clone(), pod.clone());
            for ip in &pod.ips {
                if pod.host_network {
                    inv.host_ips.insert(*ip);
                } else {
                    inv.pod_by_ip.insert(*ip, pod.clone());
                }
            }
        }
        for svc in &services {
            for (i, port) in svc.ports.iter().enumerate() {
                for ip in &svc.cluster_ips {
                    inv.by_cluster_addr.insert(
                        SocketAddr::new(*ip, port.port),
                        ServiceHit {
                            service: svc.clone(),
                            port: i,
                        },
                    );
                }
            }
            for ep in &svc.endpoints {
                if let Some(i) = svc
                    .port_for_endpoint(ep)
                    .and_then(|p| svc.ports.iter().position(|q| q == p))
                {
                    inv.by_endpoint_addr
                        .entry(ep.addr())
                        .or_default()
                        .push(ServiceHit {
                            service: svc.clone(),
                            port: i,
                        });
                }
            }
        }
        inv
    }

    pub fn pods(&self) -> &[Arc<Pod>] {
        &self.pods
    }

    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The pod that owns `ip` (hostNetwork pods own none).
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.pod_by_ip.get(&ip)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        self.pod_by_ref.get(namespace)?.get(name)
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Arc<Service>> {
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// Whether `ip` belongs to a hostNetwork pod (a node address).
    pub fn is_host_ip(&self, ip: IpAddr) -> bool {
        self.host_ips.contains(&ip)
    }

    /// The service whose cluster IP and port are `addr`.
    pub fn service_by_cluster_addr(&self, addr: SocketAddr) -> Option<&ServiceHit> {
        self.by_cluster_addr.get(&addr)
    }

    /// Services that list `addr` as an endpoint (how headless services are reached).
    pub fn services_by_endpoint(&self, addr: SocketAddr) -> &[ServiceHit] {
        self.by_endpoint_addr
            .get(&addr)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn pod(ns: &str, name: &str, ip: &str) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            ips: vec![ip.parse().unwrap()],
            workload: Workload {
                kind: "Pod".into(),
                name: name.into(),
            },
            node: None,
            host_network: false,
            ready: true,
            version: None,
        }
    }

    pub(crate) fn service(
        ns: &str,
        name: &str,
        cluster_ip: Option<&str>,
        eps: &[(&str, &str)],
    ) -> Service {
        Service {
            namespace: ns.into(),
            name: name.into(),
            cluster_ips: cluster_ip.iter().map(|i| i.parse().unwrap()).collect(),
            ports: vec![ServicePort {
                name: Some("grpc".into()),
                port: 80,
                target_port: TargetPort::Number(8080),
            }],
            endpoints: eps
                .iter()
                .map(|(pod, ip)| Endpoint {
                    pod: Some(ObjectRef::new(ns, *pod)),
                    ip: ip.parse().unwrap(),
                    port: 8080,
                    port_name: Some("grpc".into()),
                    ready: true,
                })
                .collect(),
        }
    }

    #[test]
    fn indices_find_pods_services_and_endpoints() {
        let mut host = pod("kube-system", "node-exporter", "192.0.2.10");
        host.host_network = true;
        let inv = Inventory::new(
            vec![
                pod("default", "a", "10.244.0.2"),
                pod("default", "b", "10.244.0.3"),
                host,
            ],
            vec![
                service("default", "svc", Some("10.96.0.10"), &[("b", "10.244.0.3")]),
                service("default", "headless", None, &[("b", "10.244.0.3")]),
            ],
        );
        assert_eq!(
            inv.pod_by_ip("10.244.0.3".parse().unwrap()).unwrap().name,
            "b"
        );
        assert!(inv.pod_by_ip("192.0.2.10".parse().unwrap()).is_none());
        assert!(inv.is_host_ip("192.0.2.10".parse().unwrap()));
        let hit = inv
            .service_by_cluster_addr("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!((hit.service.name.as_str(), hit.port().port), ("svc", 80));
        assert!(
            inv.service_by_cluster_addr("10.96.0.10:81".parse().unwrap())
                .is_none()
        );
        let eps = inv.services_by_endpoint("10.244.0.3:8080".parse().unwrap());
        let names: Vec<&str> = eps.iter().map(|h| h.service.name.as_str()).collect();
        assert_eq!(names, ["svc", "headless"]);
        assert!(inv.service("default", "headless").unwrap().headless());
        assert_eq!(inv.service("default", "svc").unwrap().ready_backends(), 1);
        assert_eq!(inv.pod("default", "a").unwrap().ips.len(), 1);
    }
}
