//! Identity: which pod and service sits on each end of a connection.
//!
//! Sources produce [`model::Inventory`] snapshots: the local inventory file (the embedded default,
//! used by the demo and the tests) or Kubernetes watches. Attribution maps a socket to its local
//! pod and its peer (pod, service, node or external); connections to a ClusterIP are resolved to
//! the backend kube-proxy chose through the node's conntrack table.

pub mod attribution;
pub mod conntrack;
pub mod kube;
pub mod local;
pub mod model;
pub mod source;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use self::{
    attribution::{Attribution, NetnsPods, attribute},
    model::Inventory,
};
use crate::conntable::{Conn, Direction};

/// Where identity comes from.
#[derive(Clone, Debug, Default)]
pub enum IdentitySource {
    /// No identity: every end is `node` or `external`.
    #[default]
    None,
    /// An inventory file, re-read when it changes.
    Local {
        path: PathBuf,
        reload_every: Duration,
    },
    /// Kubernetes watches: the given kubeconfig file, else in-cluster config or the default
    /// kubeconfig.
    Kube {
        node_name: Option<String>,
        kubeconfig: Option<PathBuf>,
    },
}

/// The identity in force: the current inventory snapshot and what was learnt about namespaces.
pub struct Identity {
    inventory: RwLock<Arc<Inventory>>,
    netns_pods: Mutex<NetnsPods>,
    synced: AtomicBool,
}

impl Default for Identity {
    fn default() -> Self {
        Identity {
            inventory: RwLock::new(Arc::new(Inventory::default())),
            netns_pods: Mutex::new(NetnsPods::default()),
            synced: AtomicBool::new(false),
        }
    }
}

impl Identity {
    /// The inventory in force (cheap: an Arc clone).
    pub fn snapshot(&self) -> Arc<Inventory> {
        self.inventory
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Puts a new inventory in force.
    pub fn replace(&self, inv: Arc<Inventory>) {
        if let Ok(mut ns) = self.netns_pods.lock() {
            ns.retain_known(&inv);
        }
        match self.inventory.write() {
            Ok(mut g) => *g = inv,
            Err(p) => *p.into_inner() = inv,
        }
    }

    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::Release);
    }

    /// Whether the source has delivered a complete first view (always true for local files once
    /// loaded, and for no identity at all).
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Remembers the pod that lives in a connection's namespace, from its local pod IP.
    pub fn learn(&self, inv: &Inventory, conn: &Conn) {
        if let Some(pod) = inv.pod_by_ip(conn.key.local.ip())
            && let Ok(mut ns) = self.netns_pods.lock()
        {
            ns.learn(conn.key.netns, pod);
        }
    }

    /// The network namespaces learnt to be `pod`'s (its connections live there).
    pub fn netns_of(&self, pod: &model::ObjectRef) -> Vec<u32> {
        self.netns_pods
            .lock()
            .map(|ns| ns.netns_of(pod))
            .unwrap_or_default()
    }

    /// Attributes one connection with the given inventory.
    pub fn attribute(&self, inv: &Inventory, conn: &Conn) -> Attribution {
        let ns = self.netns_pods.lock();
        let empty = NetnsPods::default();
        let ns = ns.as_deref().unwrap_or(&empty);
        attribute(
            inv,
            ns,
            conn.key.netns,
            conn.key.local,
            conn.key.remote,
            conn.backend,
        )
    }

    /// Whether an opened connection needs a conntrack lookup to find its backend: it was dialled
    /// from here to a ClusterIP.
    pub fn needs_backend(inv: &Inventory, conn: &Conn) -> bool {
        conn.direction == Direction::Outbound
            && conn.backend.is_none()
            && inv.service_by_cluster_addr(conn.key.remote).is_some()
    }
}
