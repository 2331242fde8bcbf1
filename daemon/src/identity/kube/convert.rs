//! Pure conversions from Kubernetes objects to the identity model, and the stripping applied to
//! every watched object before the reflectors cache it.
//!
//! Nothing here talks to the API server. Every value comes from the server, so nothing is trusted:
//! a missing or malformed field drops that field (or the object), never panics.
//!
//! Choices worth knowing:
//! - A pod without a name or namespace is skipped. A pod without an IP (pending, not yet
//!   scheduled) is kept with no IPs: it still has a workload and a node, it just cannot be found
//!   by address. A pod in a terminal phase (`Succeeded`, `Failed`) is kept without IPs too: the
//!   node has released its address and may already have given it to another pod.
//! - Only TCP ports count (fanout traces TCP): UDP and SCTP service and slice ports are dropped.
//! - `ExternalName` services have no cluster IP and no endpoints; they are skipped.
//! - An endpoint is ready unless its slice says `conditions.ready: false` (unset means ready, as
//!   the API defines it). An address listed by two slices (during slice churn) appears once, ready
//!   if either copy is.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{
            ObjectReference, Pod as K8sPod, PodCondition, PodSpec, PodStatus,
            Service as K8sService, ServicePort as K8sServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint as K8sEndpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use tracing::debug;

use crate::identity::model::{
    Endpoint, ObjectRef, Pod, Service, ServicePort, TargetPort, Workload,
};

/// Label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label the Deployment controller puts on its ReplicaSets' pods; the ReplicaSet is named
/// `<deployment>-<hash>`.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Converts a pod. `None` when it has no name or namespace.
pub fn pod_from_k8s(p: &K8sPod) -> Option<Pod> {
    let namespace = non_empty(p.metadata.namespace.as_deref())?.to_owned();
    let name = non_empty(p.metadata.name.as_deref())?.to_owned();
    let labels = p.metadata.labels.clone().unwrap_or_default();
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let terminal = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    let ips = if terminal {
        Vec::new()
    } else {
        pod_ips(status)
    };
    let ready = !terminal
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let workload = workload_of(
        &name,
        p.metadata.owner_references.as_deref().unwrap_or_default(),
        &labels,
    );
    let images: Vec<String> = spec
        .map(|s| {
            s.containers
                .iter()
                .filter_map(|c| c.image.clone())
                .collect()
        })
        .unwrap_or_default();
    Some(Pod {
        version: super::super::model::version_of(&images, &labels),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        ips,
        workload,
        node: spec
            .and_then(|s| non_empty(s.node_name.as_deref()))
            .map(str::to_owned),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        ready,
        namespace,
        name,
    })
}

/// `status.podIPs` (falling back to `status.podIP`), parsed, without duplicates, in order.
fn pod_ips(status: Option<&PodStatus>) -> Vec<IpAddr> {
    let Some(status) = status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|i| i.ip.as_str());
    let mut ips = Vec::new();
    for raw in listed.chain(status.pod_ip.as_deref()) {
        match raw.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if raw.is_empty() => {}
            Err(_) => debug!(ip = raw, "ignoring unparsable pod IP"),
        }
    }
    ips
}

/// The workload a pod belongs to, from its controller owner reference: a ReplicaSet named
/// `<deployment>-<pod-template-hash>` is its Deployment (a ReplicaSet without that label or
/// suffix stays a ReplicaSet); StatefulSet, DaemonSet and Job are themselves; anything else (no
/// owner, a static pod owned by its Node, a custom controller) is the pod itself.
pub fn workload_of(
    pod_name: &str,
    owners: &[OwnerReference],
    labels: &BTreeMap<String, String>,
) -> Workload {
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first());
    match owner {
        Some(o) if o.kind == "ReplicaSet" && !o.name.is_empty() => {
            let deployment = labels
                .get(POD_TEMPLATE_HASH_LABEL)
                .filter(|h| !h.is_empty())
                .and_then(|h| o.name.strip_suffix(h.as_str()))
                .and_then(|rest| rest.strip_suffix('-'))
                .filter(|d| !d.is_empty());
            match deployment {
                Some(d) => workload("Deployment", d),
                None => workload("ReplicaSet", &o.name),
            }
        }
        Some(o)
            if matches!(o.kind.as_str(), "StatefulSet" | "DaemonSet" | "Job")
                && !o.name.is_empty() =>
        {
            workload(&o.kind, &o.name)
        }
        _ => workload("Pod", pod_name),
    }
}

fn workload(kind: &str, name: &str) -> Workload {
    Workload {
        kind: kind.to_owned(),
        name: name.to_owned(),
    }
}

/// Converts a service and its EndpointSlices. `slices` should be the slices labelled
/// `kubernetes.io/service-name=<service>` in the service's namespace; any other slice is ignored.
/// `None` for a service without name or namespace and for `ExternalName` services.
pub fn service_from_k8s(s: &K8sService, slices: &[&EndpointSlice]) -> Option<Service> {
    let namespace = non_empty(s.metadata.namespace.as_deref())?.to_owned();
    let name = non_empty(s.metadata.name.as_deref())?.to_owned();
    let spec = s.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return None;
    }
    Some(Service {
        cluster_ips: spec.map(cluster_ips).unwrap_or_default(),
        ports: spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| ports.iter().filter_map(service_port).collect())
            .unwrap_or_default(),
        endpoints: endpoints(&namespace, &name, slices),
        namespace,
        name,
    })
}

/// `spec.clusterIPs` (falling back to `spec.clusterIP`); empty for a headless service (`None`).
fn cluster_ips(spec: &ServiceSpec) -> Vec<IpAddr> {
    let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
    let mut ips = Vec::new();
    for raw in listed.chain(spec.cluster_ip.as_deref()) {
        if raw.is_empty() || raw == "None" {
            continue;
        }
        match raw.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) => debug!(ip = raw, "ignoring unparsable cluster IP"),
        }
    }
    ips
}

fn is_tcp(protocol: Option<&str>) -> bool {
    matches!(protocol, None | Some("TCP"))
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn service_port(p: &K8sServicePort) -> Option<ServicePort> {
    if !is_tcp(p.protocol.as_deref()) {
        return None;
    }
    let port = port_number(p.port)?;
    let target_port = match &p.target_port {
        // Unset (or 0) defaults to the service port, as the API server does.
        None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
        Some(IntOrString::Int(n)) => TargetPort::Number(port_number(*n)?),
        Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
        Some(IntOrString::String(s)) => match s.parse::<u16>() {
            Ok(n) if n != 0 => TargetPort::Number(n),
            _ => TargetPort::Name(s.clone()),
        },
    };
    Some(ServicePort {
        name: non_empty(p.name.as_deref()).map(str::to_owned),
        port,
        target_port,
    })
}

fn slice_belongs(slice: &EndpointSlice, namespace: &str, service: &str) -> bool {
    slice.metadata.namespace.as_deref() == Some(namespace)
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .is_some_and(|s| s == service)
}

/// Every address × every TCP port of every slice of the service, sorted and deduplicated.
fn endpoints(namespace: &str, service: &str, slices: &[&EndpointSlice]) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for slice in slices
        .iter()
        .filter(|s| slice_belongs(s, namespace, service))
    {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices name hosts, not addresses.
        }
        let ports: Vec<(u16, Option<String>)> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| is_tcp(p.protocol.as_deref()))
            .filter_map(|p| {
                let port = port_number(p.port?)?;
                Some((port, non_empty(p.name.as_deref()).map(str::to_owned)))
            })
            .collect();
        for ep in slice.endpoints.iter().flatten() {
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let pod = ep.target_ref.as_ref().and_then(|r| pod_ref(r, namespace));
            for raw in &ep.addresses {
                let Ok(ip) = raw.parse::<IpAddr>() else {
                    debug!(ip = raw.as_str(), "ignoring unparsable endpoint address");
                    continue;
                };
                for (port, port_name) in &ports {
                    out.push(Endpoint {
                        pod: pod.clone(),
                        ip,
                        port: *port,
                        port_name: port_name.clone(),
                        ready,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| {
        (a.ip, a.port, &a.port_name, !a.ready).cmp(&(b.ip, b.port, &b.port_name, !b.ready))
    });
    // Ready copies sort first, so the one kept is ready if any copy is.
    out.dedup_by(|later, kept| {
        let same =
            (later.ip, later.port, &later.port_name) == (kept.ip, kept.port, &kept.port_name);
        if same && kept.pod.is_none() {
            kept.pod = later.pod.take();
        }
        same
    });
    out
}

fn pod_ref(r: &ObjectReference, default_namespace: &str) -> Option<ObjectRef> {
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    let name = non_empty(r.name.as_deref())?;
    let namespace = non_empty(r.namespace.as_deref()).unwrap_or(default_namespace);
    Some(ObjectRef::new(namespace, name))
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

/// Metadata reduced to name, namespace and (when asked) uid and labels.
fn slim_meta(meta: &mut ObjectMeta, keep_uid: bool, keep_labels: bool) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: if keep_uid { meta.uid.take() } else { None },
        labels: if keep_labels {
            meta.labels.take()
        } else {
            None
        },
        ..ObjectMeta::default()
    }
}

/// Drops everything [`pod_from_k8s`] does not read, before the pod is cached: managedFields,
/// annotations, containers (but for their name and image), volumes, container statuses and so
/// on. What is kept: metadata name/namespace/uid/labels, owner references (kind, name,
/// controller), `spec.nodeName`, `spec.hostNetwork`, the containers' name and image,
/// `status.phase`, `status.podIP(s)` and the Ready condition's type and status. `pod_from_k8s` gives the same result before and after.
pub fn strip_pod(p: &mut K8sPod) {
    let owners = p.metadata.owner_references.take().map(|owners| {
        owners
            .into_iter()
            .map(|o| OwnerReference {
                kind: o.kind,
                name: o.name,
                controller: o.controller,
                ..OwnerReference::default()
            })
            .collect()
    });
    let mut metadata = slim_meta(&mut p.metadata, true, true);
    metadata.owner_references = owners;
    let spec = p.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        host_network: s.host_network,
        // Only the images (the pod's version in a regression report).
        containers: s
            .containers
            .into_iter()
            .map(|c| k8s_openapi::api::core::v1::Container {
                name: c.name,
                image: c.image,
                ..Default::default()
            })
            .collect(),
        ..PodSpec::default()
    });
    let status = p.status.take().map(|s| PodStatus {
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| PodCondition {
                    type_: c.type_,
                    status: c.status,
                    ..PodCondition::default()
                })
                .collect()
        }),
        ..PodStatus::default()
    });
    *p = K8sPod {
        metadata,
        spec,
        status,
    };
}

/// Drops everything [`service_from_k8s`] does not read: keeps name, namespace, `spec.type`,
/// `spec.clusterIP(s)` and the ports' name, port, protocol and targetPort.
pub fn strip_service(s: &mut K8sService) {
    let metadata = slim_meta(&mut s.metadata, false, false);
    let spec = s.spec.take().map(|spec| ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| K8sServicePort {
                    name: p.name,
                    port: p.port,
                    protocol: p.protocol,
                    target_port: p.target_port,
                    ..K8sServicePort::default()
                })
                .collect()
        }),
        ..ServiceSpec::default()
    });
    *s = K8sService {
        metadata,
        spec,
        status: None,
    };
}

/// Drops everything [`service_from_k8s`] does not read from a slice: keeps name, namespace, the
/// `kubernetes.io/service-name` label, the address type, the ports' name, port and protocol, and
/// per endpoint its addresses, `conditions.ready` and the target reference's kind, name and
/// namespace.
pub fn strip_endpoint_slice(s: &mut EndpointSlice) {
    let mut metadata = slim_meta(&mut s.metadata, false, true);
    metadata.labels = metadata.labels.and_then(|mut labels| {
        let service = labels.remove(SERVICE_NAME_LABEL)?;
        Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_owned(), service)]))
    });
    let endpoints = s.endpoints.take().map(|eps| {
        eps.into_iter()
            .map(|ep| K8sEndpoint {
                addresses: ep.addresses,
                conditions: ep.conditions.map(|c| EndpointConditions {
                    ready: c.ready,
                    ..EndpointConditions::default()
                }),
                target_ref: ep.target_ref.map(|r| ObjectReference {
                    kind: r.kind,
                    name: r.name,
                    namespace: r.namespace,
                    ..ObjectReference::default()
                }),
                ..K8sEndpoint::default()
            })
            .collect()
    });
    let ports = s.ports.take().map(|ports| {
        ports
            .into_iter()
            .map(|p| EndpointPort {
                name: p.name,
                port: p.port,
                protocol: p.protocol,
                ..EndpointPort::default()
            })
            .collect()
    });
    *s = EndpointSlice {
        metadata,
        address_type: std::mem::take(&mut s.address_type),
        endpoints,
        ports,
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::identity::model::Inventory;

    fn pod(v: serde_json::Value) -> K8sPod {
        serde_json::from_value(v).unwrap()
    }

    fn svc(v: serde_json::Value) -> K8sService {
        serde_json::from_value(v).unwrap()
    }

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    fn owned_pod(kind: &str, owner: &str, hash: Option<&str>) -> K8sPod {
        let mut labels = serde_json::Map::new();
        labels.insert("app".into(), "web".into());
        if let Some(h) = hash {
            labels.insert(POD_TEMPLATE_HASH_LABEL.into(), h.into());
        }
        pod(json!({
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u1", "labels": labels,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": kind, "name": owner,
                                     "uid": "o1", "controller": true}]
            },
            "spec": {"containers": [], "nodeName": "node-a"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
    }

    fn workload_for(kind: &str, owner: &str, hash: Option<&str>) -> (String, String) {
        let w = pod_from_k8s(&owned_pod(kind, owner, hash))
            .unwrap()
            .workload;
        (w.kind, w.name)
    }

    fn wl(kind: &str, name: &str) -> (String, String) {
        (kind.to_owned(), name.to_owned())
    }

    #[test]
    fn workloads_resolve_through_owner_references() {
        assert_eq!(
            workload_for("ReplicaSet", "web-7d9f8c6b5", Some("7d9f8c6b5")),
            wl("Deployment", "web")
        );
        assert_eq!(
            workload_for("ReplicaSet", "my-api-v2-5c4b", Some("5c4b")),
            wl("Deployment", "my-api-v2")
        );
        // A bare ReplicaSet: no hash label, or a name that does not end in it.
        assert_eq!(
            workload_for("ReplicaSet", "web-abc", None),
            wl("ReplicaSet", "web-abc")
        );
        assert_eq!(
            workload_for("ReplicaSet", "web-abc", Some("zzz")),
            wl("ReplicaSet", "web-abc")
        );
        assert_eq!(
            workload_for("ReplicaSet", "abc", Some("abc")),
            wl("ReplicaSet", "abc")
        );
        assert_eq!(
            workload_for("StatefulSet", "db", None),
            wl("StatefulSet", "db")
        );
        assert_eq!(
            workload_for("DaemonSet", "agent", None),
            wl("DaemonSet", "agent")
        );
        assert_eq!(
            workload_for("Job", "backup-2891", None),
            wl("Job", "backup-2891")
        );
        // Static pods are owned by their Node; custom controllers are unknown: the pod itself.
        assert_eq!(workload_for("Node", "node-a", None), wl("Pod", "p"));
        assert_eq!(workload_for("Rollout", "r", None), wl("Pod", "p"));

        let bare = pod(json!({"metadata": {"name": "solo", "namespace": "ns"}}));
        let w = pod_from_k8s(&bare).unwrap().workload;
        assert_eq!((w.kind.as_str(), w.name.as_str()), ("Pod", "solo"));
    }

    #[test]
    fn the_controller_owner_wins_over_other_owners() {
        let owners: Vec<OwnerReference> = serde_json::from_value(json!([
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": "1"},
            {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "db", "uid": "2",
             "controller": true}
        ]))
        .unwrap();
        let w = workload_of("db-0", &owners, &BTreeMap::new());
        assert_eq!((w.kind.as_str(), w.name.as_str()), ("StatefulSet", "db"));
    }

    #[test]
    fn pod_fields_are_converted() {
        let p = pod_from_k8s(&owned_pod("StatefulSet", "db", None)).unwrap();
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()),
            ("ns", "p", "u1")
        );
        assert_eq!(p.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(p.node.as_deref(), Some("node-a"));
        assert!(p.ready);
        assert!(!p.host_network);

        let dual = pod(json!({
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"containers": [], "hostNetwork": true},
            "status": {"podIP": "10.0.0.6",
                       "podIPs": [{"ip": "10.0.0.6"}, {"ip": "fd00::6"}, {"ip": "garbage"}],
                       "conditions": [{"type": "Ready", "status": "False"},
                                      {"type": "PodScheduled", "status": "True"}]}
        }));
        let d = pod_from_k8s(&dual).unwrap();
        let want: Vec<IpAddr> = vec!["10.0.0.6".parse().unwrap(), "fd00::6".parse().unwrap()];
        assert_eq!(d.ips, want);
        assert!(d.host_network);
        assert!(!d.ready);
        assert_eq!(d.node, None);

        // Only the legacy singular field.
        let old = pod(json!({"metadata": {"name": "o", "namespace": "ns"},
                             "status": {"podIP": "10.0.0.7"}}));
        assert_eq!(
            pod_from_k8s(&old).unwrap().ips,
            vec!["10.0.0.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn pods_without_ips_are_kept_without_ips_and_nameless_pods_are_skipped() {
        let pending = pod(json!({"metadata": {"name": "pending", "namespace": "ns"},
                                 "status": {"phase": "Pending"}}));
        let p = pod_from_k8s(&pending).unwrap();
        assert!(p.ips.is_empty());
        assert!(!p.ready);

        // A finished pod's address has been released (and may belong to another pod now).
        let done = pod(json!({"metadata": {"name": "done", "namespace": "ns"},
                              "status": {"phase": "Succeeded", "podIP": "10.0.0.9",
                                         "conditions": [{"type": "Ready", "status": "True"}]}}));
        let d = pod_from_k8s(&done).unwrap();
        assert!(d.ips.is_empty());
        assert!(!d.ready);

        assert!(pod_from_k8s(&pod(json!({"metadata": {"namespace": "ns"}}))).is_none());
        assert!(pod_from_k8s(&pod(json!({"metadata": {"name": "x"}}))).is_none());
        assert!(pod_from_k8s(&pod(json!({"metadata": {"name": "", "namespace": "ns"}}))).is_none());
    }

    fn grpc_slice(name: &str, service: &str, endpoints: serde_json::Value) -> EndpointSlice {
        slice(json!({
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {SERVICE_NAME_LABEL: service,
                                    "endpointslice.kubernetes.io/managed-by": "x"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8080, "protocol": "TCP"},
                      {"name": "metrics", "port": 9090}],
            "endpoints": endpoints
        }))
    }

    #[test]
    fn cluster_ip_service_with_named_target_ports_and_endpoints() {
        let s = svc(json!({
            "metadata": {"name": "api", "namespace": "ns"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                     "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                     "ports": [{"name": "grpc", "port": 80, "targetPort": "grpc"},
                               {"name": "metrics", "port": 9090, "targetPort": 9090},
                               {"name": "plain", "port": 81},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }));
        let a = grpc_slice(
            "api-abc",
            "api",
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "ns"}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "api-2"}},
                {"addresses": ["10.0.0.4"],
                 "targetRef": {"kind": "Node", "name": "n"}}
            ]),
        );
        let other = grpc_slice("other-x", "other", json!([{"addresses": ["10.0.0.99"]}]));
        let out = service_from_k8s(&s, &[&a, &other]).unwrap();

        let want_ips: Vec<IpAddr> = vec![
            "10.96.0.10".parse().unwrap(),
            "fd00:96::10".parse().unwrap(),
        ];
        assert_eq!(out.cluster_ips, want_ips);
        assert!(!out.headless());
        assert_eq!(
            out.ports,
            vec![
                ServicePort {
                    name: Some("grpc".into()),
                    port: 80,
                    target_port: TargetPort::Name("grpc".into())
                },
                ServicePort {
                    name: Some("metrics".into()),
                    port: 9090,
                    target_port: TargetPort::Number(9090)
                },
                ServicePort {
                    name: Some("plain".into()),
                    port: 81,
                    target_port: TargetPort::Number(81)
                },
            ]
        );
        // 3 addresses × 2 ports; the other service's slice is ignored.
        assert_eq!(out.endpoints.len(), 6);
        let grpc: Vec<(String, bool, Option<String>)> = out
            .endpoints
            .iter()
            .filter(|e| e.port_name.as_deref() == Some("grpc"))
            .map(|e| {
                (
                    e.ip.to_string(),
                    e.ready,
                    e.pod.as_ref().map(|p| p.to_string()),
                )
            })
            .collect();
        assert_eq!(
            grpc,
            vec![
                ("10.0.0.2".into(), true, Some("ns/api-1".into())),
                ("10.0.0.3".into(), false, Some("ns/api-2".into())),
                // Unset ready counts as ready; a non-Pod target names no pod.
                ("10.0.0.4".into(), true, None),
            ]
        );
        assert!(
            out.endpoints
                .iter()
                .all(|e| e.port == 8080 || e.port == 9090)
        );
        assert_eq!(out.ready_backends(), 2);

        // The inventory maps each endpoint port back to its service port by name.
        let inv = Inventory::new(vec![], vec![out]);
        let hits = inv.services_by_endpoint("10.0.0.2:8080".parse().unwrap());
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].port().port, 80);
        let hit = inv
            .service_by_cluster_addr("[fd00:96::10]:9090".parse().unwrap())
            .unwrap();
        assert_eq!(hit.port().name.as_deref(), Some("metrics"));
    }

    #[test]
    fn headless_service_with_unnamed_port() {
        let s = svc(json!({
            "metadata": {"name": "db", "namespace": "ns"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"],
                     "ports": [{"port": 5432, "targetPort": 5432}]}
        }));
        let sl = slice(json!({
            "metadata": {"name": "db-1", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "", "port": 5432, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.1.2"], "conditions": {"ready": true},
                           "targetRef": {"kind": "Pod", "name": "db-0", "namespace": "ns"}}]
        }));
        let out = service_from_k8s(&s, &[&sl]).unwrap();
        assert!(out.headless());
        assert_eq!(out.ports.len(), 1);
        assert_eq!(out.ports[0].name, None);
        assert_eq!(out.endpoints.len(), 1);
        assert_eq!(out.endpoints[0].port_name, None);
        assert_eq!(out.endpoints[0].addr(), "10.0.1.2:5432".parse().unwrap());
        let inv = Inventory::new(vec![], vec![out]);
        assert_eq!(
            inv.services_by_endpoint("10.0.1.2:5432".parse().unwrap())
                .len(),
            1
        );

        // Only the singular field, headless.
        let old = svc(json!({"metadata": {"name": "h", "namespace": "ns"},
                             "spec": {"clusterIP": "None"}}));
        assert!(service_from_k8s(&old, &[]).unwrap().headless());
    }

    #[test]
    fn endpoints_are_deduplicated_across_slices_and_odd_slices_skipped() {
        let s = svc(json!({"metadata": {"name": "api", "namespace": "ns"},
                           "spec": {"clusterIP": "10.96.0.10",
                                    "ports": [{"name": "grpc", "port": 80,
                                               "targetPort": "grpc"}]}}));
        let old = grpc_slice(
            "api-old",
            "api",
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}
            ]),
        );
        let new = grpc_slice(
            "api-new",
            "api",
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "api-1"}}
            ]),
        );
        let fqdn = slice(json!({
            "metadata": {"name": "api-f", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "api"}},
            "addressType": "FQDN",
            "ports": [{"name": "grpc", "port": 8080}],
            "endpoints": [{"addresses": ["example.com"]}]
        }));
        let other_ns = slice(json!({
            "metadata": {"name": "api-o", "namespace": "elsewhere",
                         "labels": {SERVICE_NAME_LABEL: "api"}},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 8080}],
            "endpoints": [{"addresses": ["10.9.9.9"]}]
        }));
        let out = service_from_k8s(&s, &[&old, &new, &fqdn, &other_ns]).unwrap();
        let grpc: Vec<&Endpoint> = out
            .endpoints
            .iter()
            .filter(|e| e.port_name.as_deref() == Some("grpc"))
            .collect();
        assert_eq!(grpc.len(), 1);
        assert!(grpc[0].ready);
        assert_eq!(grpc[0].pod, Some(ObjectRef::new("ns", "api-1")));
    }

    #[test]
    fn external_name_and_nameless_services_are_skipped() {
        let ext = svc(json!({"metadata": {"name": "ext", "namespace": "ns"},
                             "spec": {"type": "ExternalName", "externalName": "example.com"}}));
        assert!(service_from_k8s(&ext, &[]).is_none());
        let nameless = svc(json!({"metadata": {"namespace": "ns"}, "spec": {}}));
        assert!(service_from_k8s(&nameless, &[]).is_none());
        let no_spec = svc(json!({"metadata": {"name": "s", "namespace": "ns"}}));
        let s = service_from_k8s(&no_spec, &[]).unwrap();
        assert!(s.ports.is_empty() && s.endpoints.is_empty());
    }

    /// A pod as the API server sends it: managedFields, annotations, full spec and status.
    pub(crate) fn big_pod() -> K8sPod {
        let managed: Vec<serde_json::Value> = (0..20)
            .map(|i| {
                json!({"manager": format!("controller-{i}"), "operation": "Update",
                            "apiVersion": "v1", "fieldsType": "FieldsV1",
                            "fieldsV1": {"f:metadata": {"f:labels": {"f:app": {}}},
                                         "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {}}}}})
            })
            .collect();
        pod(json!({
            "metadata": {
                "name": "web-7d9f8c6b5-x2x9z", "namespace": "shop", "uid": "uid-web",
                "resourceVersion": "12345", "generateName": "web-7d9f8c6b5-",
                "creationTimestamp": "2024-01-01T00:00:00Z",
                "labels": {"app": "web", POD_TEMPLATE_HASH_LABEL: "7d9f8c6b5"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(4096)
                },
                "managedFields": managed,
                "finalizers": ["example.com/keep"],
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                     "name": "web-7d9f8c6b5", "uid": "rs-uid",
                                     "controller": true, "blockOwnerDeletion": true}]
            },
            "spec": {
                "nodeName": "node-a",
                "containers": [{"name": "app", "image": "registry.example/web:1",
                                "args": vec!["--flag"; 50],
                                "env": (0..50)
                                    .map(|i| json!({"name": format!("E{i}"), "value": "v"}))
                                    .collect::<Vec<_>>(),
                                "ports": [{"name": "grpc", "containerPort": 8080}]}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            },
            "status": {
                "phase": "Running", "hostIP": "192.0.2.1", "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}], "qosClass": "Burstable",
                "conditions": [
                    {"type": "Initialized", "status": "True"},
                    {"type": "Ready", "status": "True",
                     "lastTransitionTime": "2024-01-01T00:00:00Z",
                     "message": "ok", "reason": "r"},
                    {"type": "ContainersReady", "status": "True"}
                ],
                "containerStatuses": [{"name": "app", "image": "registry.example/web:1",
                                       "imageID": "sha256:abc", "ready": true, "restartCount": 3,
                                       "started": true, "containerID": "containerd://abc"}]
            }
        }))
    }

    #[test]
    fn stripping_keeps_only_what_conversion_reads() {
        let full = big_pod();
        let mut stripped = full.clone();
        strip_pod(&mut stripped);
        assert_eq!(pod_from_k8s(&stripped), pod_from_k8s(&full));
        let w = pod_from_k8s(&stripped).unwrap().workload;
        assert_eq!((w.kind.as_str(), w.name.as_str()), ("Deployment", "web"));
        assert_eq!(
            pod_from_k8s(&stripped).unwrap().version.as_deref(),
            Some("registry.example/web:1")
        );

        let before = serde_json::to_string(&full).unwrap();
        let after = serde_json::to_string(&stripped).unwrap();
        for gone in [
            "managedFields",
            "annotations",
            "last-applied",
            "args",
            "env",
            "volumes",
            "containerStatuses",
            "hostIP",
            "lastTransitionTime",
            "Initialized",
            "rs-uid",
            "resourceVersion",
            "finalizers",
        ] {
            assert!(!after.contains(gone), "{gone} survived stripping: {after}");
        }
        assert!(
            after.len() * 10 < before.len(),
            "{} vs {} bytes",
            after.len(),
            before.len()
        );
        // Stripping is idempotent.
        let mut twice = stripped.clone();
        strip_pod(&mut twice);
        assert_eq!(twice, stripped);
    }

    #[test]
    fn stripping_services_and_slices_keeps_conversion_results() {
        let mut s = svc(json!({
            "metadata": {"name": "api", "namespace": "ns", "uid": "u",
                         "annotations": {"a": "b"}, "managedFields": [{"manager": "m"}]},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "selector": {"app": "api"}, "sessionAffinity": "None",
                     "ports": [{"name": "grpc", "port": 80, "targetPort": "grpc", "protocol": "TCP",
                                "appProtocol": "h2c"}]},
            "status": {"loadBalancer": {}}
        }));
        let mut sl = grpc_slice(
            "api-abc",
            "api",
            json!([
                {"addresses": ["10.0.0.2"], "conditions": {"ready": true, "serving": true},
                 "nodeName": "node-a", "zone": "z1", "hints": {"forZones": [{"name": "z1"}]},
                 "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "ns", "uid": "pu",
                               "resourceVersion": "9"}}
            ]),
        );
        sl.metadata.managed_fields = Some(vec![Default::default()]);
        let want = service_from_k8s(&s, &[&sl]);
        strip_service(&mut s);
        strip_endpoint_slice(&mut sl);
        assert_eq!(service_from_k8s(&s, &[&sl]), want);
        let s_json = serde_json::to_string(&s).unwrap();
        let sl_json = serde_json::to_string(&sl).unwrap();
        for gone in [
            "annotations",
            "managedFields",
            "selector",
            "appProtocol",
            "loadBalancer",
        ] {
            assert!(!s_json.contains(gone), "{gone} survived: {s_json}");
        }
        for gone in [
            "managedFields",
            "managed-by",
            "zone",
            "hints",
            "serving",
            "nodeName",
            "\"pu\"",
        ] {
            assert!(!sl_json.contains(gone), "{gone} survived: {sl_json}");
        }
        assert!(sl_json.contains(SERVICE_NAME_LABEL));
    }
}
