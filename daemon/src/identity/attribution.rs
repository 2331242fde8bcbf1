//! Attribution: a connection's two ends in terms of pods and services.
//!
//! * Local end: the pod whose (non-hostNetwork) IP is the socket's local address, else the pod
//!   already known to live in the socket's network namespace (sockets on loopback inside a pod),
//!   else `node`: hostNetwork pods and the node's own processes are never taken for a pod.
//! * Remote end: a ClusterIP service (with the backend kube-proxy chose, from conntrack), a pod
//!   (with the service it serves on that port, preferring a headless one: that is how clients
//!   reach pods directly), `node` (a hostNetwork or node address), `loopback`, or `external`.

use std::{net::SocketAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::model::{Inventory, ObjectRef, Pod, ServiceHit, Workload};
use crate::keyed::Map;

/// A service and the port a connection used.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The service port (the ClusterIP port, or for a headless service the port itself).
    pub port: u16,
    #[serde(deserialize_with = "Option::deserialize")]
    pub port_name: Option<String>,
    pub headless: bool,
}

impl ServiceRef {
    fn from_hit(hit: &ServiceHit) -> Self {
        ServiceRef {
            namespace: hit.service.namespace.clone(),
            name: hit.service.name.clone(),
            port: hit.port().port,
            port_name: hit.port().name.clone(),
            headless: hit.service.headless(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub workload: Workload,
}

impl PodRef {
    fn of(pod: &Pod) -> Self {
        PodRef {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            workload: pod.workload.clone(),
        }
    }

    pub fn id(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LocalEnd {
    Pod(PodRef),
    /// The node itself, a hostNetwork pod, or a namespace no known pod lives in.
    Node,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Peer {
    /// Through a ClusterIP. `backend` is the pod kube-proxy sent the connection to, when the
    /// conntrack lookup found it.
    Service {
        service: ServiceRef,
        #[serde(deserialize_with = "Option::deserialize")]
        backend: Option<PodRef>,
        #[serde(deserialize_with = "Option::deserialize")]
        backend_addr: Option<SocketAddr>,
    },
    /// Directly to (or from) a pod; `service` when the pod serves one on that port.
    Pod {
        pod: PodRef,
        #[serde(deserialize_with = "Option::deserialize")]
        service: Option<ServiceRef>,
    },
    /// A node address or hostNetwork pod.
    Node,
    Loopback,
    External,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attribution {
    pub local: LocalEnd,
    pub peer: Peer,
}

impl Attribution {
    /// The service this connection talks to, if any.
    pub fn service(&self) -> Option<&ServiceRef> {
        match &self.peer {
            Peer::Service { service, .. } => Some(service),
            Peer::Pod { service, .. } => service.as_ref(),
            _ => None,
        }
    }

    /// The pod at the other end (the backend for a ClusterIP connection).
    pub fn peer_pod(&self) -> Option<&PodRef> {
        match &self.peer {
            Peer::Service { backend, .. } => backend.as_ref(),
            Peer::Pod { pod, .. } => Some(pod),
            _ => None,
        }
    }
}

/// Which pod lives in which network namespace, learnt from sockets whose local address is a pod
/// IP. Lets loopback sockets inside a pod be attributed to it.
#[derive(Default, Debug)]
pub struct NetnsPods {
    map: Map<u32, ObjectRef>,
}

impl NetnsPods {
    pub fn learn(&mut self, netns: u32, pod: &Pod) {
        // Every open of a pod's socket comes here: no allocation when nothing changes.
        let known = self
            .map
            .get(&netns)
            .is_some_and(|p| p.name == pod.name && p.namespace == pod.namespace);
        if netns != 0 && !known {
            self.map.insert(netns, pod.id());
        }
    }

    pub fn get(&self, netns: u32) -> Option<&ObjectRef> {
        self.map.get(&netns)
    }

    /// The namespaces learnt to be `pod`'s.
    pub fn netns_of(&self, pod: &ObjectRef) -> Vec<u32> {
        self.map
            .iter()
            .filter(|(_, p)| *p == pod)
            .map(|(ns, _)| *ns)
            .collect()
    }

    /// Forgets namespaces whose pod is gone from the inventory.
    pub fn retain_known(&mut self, inv: &Inventory) {
        self.map
            .retain(|_, p| inv.pod(&p.namespace, &p.name).is_some());
    }
}

/// The local pod of a socket in `netns` bound to `local`.
pub fn local_pod<'a>(
    inv: &'a Inventory,
    netns_pods: &NetnsPods,
    netns: u32,
    local: SocketAddr,
) -> Option<&'a Arc<Pod>> {
    inv.pod_by_ip(local.ip()).or_else(|| {
        let id = netns_pods.get(netns)?;
        inv.pod(&id.namespace, &id.name)
    })
}

/// Attributes a connection. `backend` is the conntrack reply source for a ClusterIP connection.
pub fn attribute(
    inv: &Inventory,
    netns_pods: &NetnsPods,
    netns: u32,
    local: SocketAddr,
    remote: SocketAddr,
    backend: Option<SocketAddr>,
) -> Attribution {
    let local_end = match local_pod(inv, netns_pods, netns, local) {
        Some(p) => LocalEnd::Pod(PodRef::of(p)),
        None => LocalEnd::Node,
    };
    let peer = if let Some(hit) = inv.service_by_cluster_addr(remote) {
        Peer::Service {
            service: ServiceRef::from_hit(hit),
            backend: backend
                .and_then(|b| inv.pod_by_ip(b.ip()))
                .map(|p| PodRef::of(p)),
            backend_addr: backend,
        }
    } else if let Some(pod) = inv.pod_by_ip(remote.ip()) {
        let hits = inv.services_by_endpoint(remote);
        let hit = hits
            .iter()
            .find(|h| h.service.headless())
            .or_else(|| hits.first());
        Peer::Pod {
            pod: PodRef::of(pod),
            service: hit.map(ServiceRef::from_hit),
        }
    } else if remote.ip().is_loopback() {
        Peer::Loopback
    } else if inv.is_host_ip(remote.ip()) {
        Peer::Node
    } else {
        Peer::External
    };
    Attribution {
        local: local_end,
        peer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::model::tests::{pod, service};

    fn inv() -> Inventory {
        let mut host = pod("kube-system", "agent", "192.0.2.1");
        host.host_network = true;
        Inventory::new(
            vec![
                pod("default", "client", "10.244.0.2"),
                pod("default", "b1", "10.244.0.3"),
                pod("default", "b2", "10.244.0.4"),
                host,
            ],
            vec![
                service(
                    "default",
                    "api",
                    Some("10.96.0.10"),
                    &[("b1", "10.244.0.3"), ("b2", "10.244.0.4")],
                ),
                service(
                    "default",
                    "api-headless",
                    None,
                    &[("b1", "10.244.0.3"), ("b2", "10.244.0.4")],
                ),
            ],
        )
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cluster_ip_connection_names_the_backend_from_conntrack() {
        let inv = inv();
        let at = attribute(
            &inv,
            &NetnsPods::default(),
            1,
            a("10.244.0.2:40000"),
            a("10.96.0.10:80"),
            Some(a("10.244.0.4:8080")),
        );
        assert!(matches!(&at.local, LocalEnd::Pod(p) if p.name == "client"));
        let Peer::Service {
            service, backend, ..
        } = &at.peer
        else {
            panic!("{at:?}")
        };
        assert_eq!(
            (service.name.as_str(), service.port, service.headless),
            ("api", 80, false)
        );
        assert_eq!(backend.as_ref().unwrap().name, "b2");
        assert_eq!(at.peer_pod().unwrap().name, "b2");
        // Without conntrack the service is still known, the backend not.
        let at = attribute(
            &inv,
            &NetnsPods::default(),
            1,
            a("10.244.0.2:40000"),
            a("10.96.0.10:80"),
            None,
        );
        assert!(at.peer_pod().is_none());
        assert_eq!(at.service().unwrap().name, "api");
    }

    #[test]
    fn direct_pod_connection_prefers_the_headless_service() {
        let inv = inv();
        let at = attribute(
            &inv,
            &NetnsPods::default(),
            1,
            a("10.244.0.2:40000"),
            a("10.244.0.3:8080"),
            None,
        );
        let Peer::Pod { pod, service } = &at.peer else {
            panic!("{at:?}")
        };
        assert_eq!(pod.name, "b1");
        let s = service.as_ref().unwrap();
        assert_eq!((s.name.as_str(), s.headless), ("api-headless", true));
        // A port the pod serves no service on.
        let at = attribute(
            &inv,
            &NetnsPods::default(),
            1,
            a("10.244.0.2:40000"),
            a("10.244.0.3:9999"),
            None,
        );
        assert!(matches!(&at.peer, Peer::Pod { service: None, .. }));
    }

    #[test]
    fn inbound_side_sees_the_client_pod() {
        let inv = inv();
        let at = attribute(
            &inv,
            &NetnsPods::default(),
            2,
            a("10.244.0.3:8080"),
            a("10.244.0.2:40000"),
            None,
        );
        assert!(matches!(&at.local, LocalEnd::Pod(p) if p.name == "b1"));
        assert!(matches!(&at.peer, Peer::Pod { pod, service: None } if pod.name == "client"));
    }

    #[test]
    fn node_host_network_loopback_and_external() {
        let inv = inv();
        let none = NetnsPods::default();
        let at = attribute(
            &inv,
            &none,
            1,
            a("192.0.2.1:5000"),
            a("10.244.0.3:8080"),
            None,
        );
        assert_eq!(at.local, LocalEnd::Node, "hostNetwork pod is not a pod end");
        let at = attribute(
            &inv,
            &none,
            1,
            a("10.244.0.2:5000"),
            a("192.0.2.1:10250"),
            None,
        );
        assert_eq!(at.peer, Peer::Node);
        let at = attribute(
            &inv,
            &none,
            1,
            a("127.0.0.1:5000"),
            a("127.0.0.1:6000"),
            None,
        );
        assert_eq!((at.local, at.peer), (LocalEnd::Node, Peer::Loopback));
        let at = attribute(
            &inv,
            &none,
            1,
            a("10.244.0.2:5000"),
            a("203.0.113.9:443"),
            None,
        );
        assert_eq!(at.peer, Peer::External);
    }

    #[test]
    fn loopback_sockets_in_a_known_pod_namespace_belong_to_the_pod() {
        let inv = inv();
        let mut ns = NetnsPods::default();
        ns.learn(7, inv.pod("default", "client").unwrap());
        let at = attribute(
            &inv,
            &ns,
            7,
            a("127.0.0.1:5000"),
            a("127.0.0.1:15001"),
            None,
        );
        assert!(matches!(&at.local, LocalEnd::Pod(p) if p.name == "client"));
        let gone = Inventory::new(vec![], vec![]);
        ns.retain_known(&gone);
        assert!(ns.get(7).is_none());
    }
}
