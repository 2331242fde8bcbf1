//! Kubernetes mode: identity from the API server.
//!
//! Three kube-rs watchers (Pods in all namespaces, Services, and `discovery.k8s.io/v1`
//! EndpointSlices labelled `kubernetes.io/service-name`) feed three reflector stores. Each watched
//! object goes through a pure stripping function ([`strip_pod`], [`strip_service`],
//! [`strip_endpoint_slice`]) before it is cached, so the caches hold only what the conversions
//! read: no managedFields, annotations, container specs or statuses. Memory stays proportional to
//! the number of objects, not to their size.
//!
//! A rebuild task turns the stores into an [`Inventory`] after changes and publishes it on a
//! [`tokio::sync::watch`] channel. The first change opens a [`KubeOptions::debounce`] window
//! (200 ms by default); whatever changed by its end goes into one rebuild, so there is at most one
//! rebuild per window, and a burst that arrives within one window (a relist, a resumed watch's
//! backlog) is published as one snapshot rather than half-applied. A snapshot is published only
//! when the converted pods or services differ from the last one.
//!
//! Sync: `synced` turns true once all three watchers have finished their initial list and a
//! snapshot built from all three has been published; it then stays true.
//!
//! Outages: watch errors (connection refused, broken streams, API errors) are counted in
//! [`KubeStats::watch_errors`] and retried with [`WatchStreamExt::default_backoff`] (0.8 s doubling
//! to 30 s, jittered). The stores keep their last contents meanwhile, so the last-known identity
//! keeps being served. A watch that breaks is resumed from its last resourceVersion; when the
//! server answers `410 Gone` (the version was compacted), the kube-rs watcher starts over with a
//! fresh LIST, and the reflector swaps the new list in atomically when it completes
//! ([`KubeStats::restarts`] counts those relists).

mod convert;

use std::{
    collections::HashMap,
    fmt::Debug,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use ::kube::{
    Api, Client,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher::{self, Event},
    },
};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Pod as K8sPod, Service as K8sService},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

pub use convert::{
    POD_TEMPLATE_HASH_LABEL, SERVICE_NAME_LABEL, pod_from_k8s, service_from_k8s,
    strip_endpoint_slice, strip_pod, strip_service, workload_of,
};

use crate::identity::model::{Inventory, Pod, Service};

/// Environment variable that carries this node's name (set from the Downward API,
/// `spec.nodeName`).
pub const NODE_NAME_ENV: &str = "NODE_NAME";

/// Default minimum interval between two inventory rebuilds.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name: its pods are those with `spec.nodeName` equal to it.
    pub node_name: Option<String>,
    /// Minimum interval between two inventory rebuilds.
    pub debounce: Duration,
}

impl Default for KubeOptions {
    fn default() -> Self {
        KubeOptions {
            node_name: None,
            debounce: DEFAULT_DEBOUNCE,
        }
    }
}

impl KubeOptions {
    /// Defaults, with the node name taken from `$NODE_NAME` when it is set and not empty.
    pub fn from_env() -> Self {
        KubeOptions {
            node_name: std::env::var(NODE_NAME_ENV).ok().filter(|n| !n.is_empty()),
            ..KubeOptions::default()
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Errors from any of the three watches: failed lists and watches (including every attempt
    /// while the API server is unreachable), broken streams, error events such as `410 Gone`.
    pub watch_errors: AtomicU64,
    /// Relists after the initial one (a watch that could not be resumed, e.g. after `410 Gone`).
    pub restarts: AtomicU64,
    /// Added, modified and deleted objects seen on the watches (initial lists excluded).
    pub events: AtomicU64,
    /// Inventory snapshots published.
    pub rebuilds: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("no Kubernetes client configuration (in-cluster or kubeconfig): {0}")]
    Client(#[from] ::kube::Error),
    #[error("the Kubernetes source stopped before its caches synced")]
    Stopped,
}

/// The three watched kinds.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Pods = 0,
    Services = 1,
    EndpointSlices = 2,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pods => "pods",
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
        }
    }
}

/// State shared by the watch tasks and the rebuild task.
#[derive(Default)]
struct Shared {
    stats: Arc<KubeStats>,
    /// Per [`Kind`]: the initial list has completed.
    listed: [AtomicBool; 3],
    /// A store changed since the last rebuild.
    dirty: AtomicBool,
    changed: Notify,
}

impl Shared {
    fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    fn all_listed(&self) -> bool {
        self.listed.iter().all(|l| l.load(Ordering::SeqCst))
    }
}

/// Readers of the three reflector stores.
#[derive(Clone)]
struct Stores {
    pods: Store<K8sPod>,
    services: Store<K8sService>,
    slices: Store<EndpointSlice>,
}

/// Identity from the Kubernetes API server. Dropping it (or [`KubeSource::stop`]) ends its tasks.
pub struct KubeSource {
    /// Latest snapshot (starts empty).
    pub inventory: watch::Receiver<Arc<Inventory>>,
    /// True once Pods, Services and EndpointSlices have all been listed.
    pub synced: watch::Receiver<bool>,
    /// Counters for metrics: watch errors (incl. outages), relists/restarts.
    pub stats: Arc<KubeStats>,
    /// The client the watches use, for writers (Kubernetes Events).
    pub client: Client,
    node_name: Option<String>,
    stores: Stores,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSource {
    /// Starts the watches and the rebuild task on the current tokio runtime.
    pub fn start(client: Client, opts: KubeOptions) -> KubeSource {
        let shared = Arc::new(Shared::default());
        let (inventory_tx, inventory) = watch::channel(Arc::new(Inventory::default()));
        let (synced_tx, synced) = watch::channel(false);

        let pods_writer = Writer::<K8sPod>::default();
        let services_writer = Writer::<K8sService>::default();
        let slices_writer = Writer::<EndpointSlice>::default();
        let stores = Stores {
            pods: pods_writer.as_reader(),
            services: services_writer.as_reader(),
            slices: slices_writer.as_reader(),
        };

        let tasks = vec![
            tokio::spawn(run_watch(
                Api::<K8sPod>::all(client.clone()),
                watcher::Config::default(),
                pods_writer,
                strip_pod,
                Kind::Pods,
                shared.clone(),
            )),
            tokio::spawn(run_watch(
                Api::<K8sService>::all(client.clone()),
                watcher::Config::default(),
                services_writer,
                strip_service,
                Kind::Services,
                shared.clone(),
            )),
            tokio::spawn(run_watch(
                Api::<EndpointSlice>::all(client.clone()),
                // Only slices that belong to a Service (the label exists).
                watcher::Config::default().labels(SERVICE_NAME_LABEL),
                slices_writer,
                strip_endpoint_slice,
                Kind::EndpointSlices,
                shared.clone(),
            )),
            tokio::spawn(run_rebuild(
                stores.clone(),
                shared.clone(),
                inventory_tx,
                synced_tx,
                opts.debounce,
            )),
        ];
        info!(node = ?opts.node_name, "kubernetes identity source started");
        KubeSource {
            inventory,
            synced,
            client,
            stats: shared.stats.clone(),
            node_name: opts.node_name,
            stores,
            tasks,
        }
    }

    /// [`KubeSource::start`] with a client from the in-cluster config or the kubeconfig.
    pub async fn start_default(opts: KubeOptions) -> Result<KubeSource, KubeError> {
        let client = Client::try_default().await?;
        Ok(KubeSource::start(client, opts))
    }

    /// Aborts the tasks and waits for them to end.
    pub async fn stop(mut self) {
        let tasks = std::mem::take(&mut self.tasks);
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            // A cancelled task is the expected outcome; a panic has already been reported.
            let _ = task.await;
        }
        debug!("kubernetes identity source stopped");
    }

    /// Waits until all three caches have been listed and a snapshot built from them published.
    pub async fn wait_synced(&self) -> Result<(), KubeError> {
        let mut synced = self.synced.clone();
        synced
            .wait_for(|s| *s)
            .await
            .map(|_| ())
            .map_err(|_| KubeError::Stopped)
    }

    /// This node's name, as configured.
    pub fn node_name(&self) -> Option<&str> {
        self.node_name.as_deref()
    }

    /// The pods of the latest snapshot that run on this node (none when no node name is set).
    pub fn local_pods(&self) -> Vec<Arc<Pod>> {
        match &self.node_name {
            Some(node) => pods_on_node(&self.inventory.borrow(), node),
            None => Vec::new(),
        }
    }

    /// The cached (stripped) pods, as the reflector holds them.
    pub fn cached_pods(&self) -> Vec<Arc<K8sPod>> {
        self.stores.pods.state()
    }

    /// The cached (stripped) services.
    pub fn cached_services(&self) -> Vec<Arc<K8sService>> {
        self.stores.services.state()
    }

    /// The cached (stripped) EndpointSlices.
    pub fn cached_endpoint_slices(&self) -> Vec<Arc<EndpointSlice>> {
        self.stores.slices.state()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The pods of `inventory` scheduled on `node`.
pub fn pods_on_node(inventory: &Inventory, node: &str) -> Vec<Arc<Pod>> {
    inventory
        .pods()
        .iter()
        .filter(|p| p.node.as_deref() == Some(node))
        .cloned()
        .collect()
}

/// Runs one watcher into its reflector store, forever: errors are counted, logged and retried
/// with the default backoff.
async fn run_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
    strip: fn(&mut K),
    kind: Kind,
    shared: Arc<Shared>,
) where
    K: ::kube::Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let stream = watcher::watcher(api, config)
        .modify(strip)
        .default_backoff();
    let mut stream = pin!(reflector::reflector(writer, stream));
    let mut lists = 0u64;
    let stats = &shared.stats;
    while let Some(item) = stream.next().await {
        match item {
            Ok(Event::Init) => debug!(kind = kind.name(), "listing"),
            Ok(Event::InitApply(_)) => {}
            Ok(Event::InitDone) => {
                lists += 1;
                if lists == 1 {
                    info!(kind = kind.name(), "initial list complete");
                } else {
                    stats.restarts.fetch_add(1, Ordering::Relaxed);
                    info!(kind = kind.name(), "relist complete");
                }
                shared.listed[kind as usize].store(true, Ordering::SeqCst);
                shared.mark_dirty();
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => {
                stats.events.fetch_add(1, Ordering::Relaxed);
                shared.mark_dirty();
            }
            Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                info!(
                    kind = kind.name(),
                    detail = status.message.as_str(),
                    "resourceVersion expired (410 Gone); relisting"
                );
            }
            Err(err) => {
                stats.watch_errors.fetch_add(1, Ordering::Relaxed);
                warn!(
                    kind = kind.name(),
                    error = %err,
                    "watch failed; serving the last-known objects and retrying with backoff"
                );
            }
        }
    }
    // The watcher never ends and the default backoff never gives up.
    warn!(kind = kind.name(), "watch stream ended");
}

/// Rebuilds and publishes the inventory after changes: the first change opens a `debounce`
/// window, everything that changed by its end goes into one rebuild. So at most one rebuild per
/// `debounce`, and a change is visible `debounce` (plus the rebuild) after it arrived.
async fn run_rebuild(
    stores: Stores,
    shared: Arc<Shared>,
    inventory_tx: watch::Sender<Arc<Inventory>>,
    synced_tx: watch::Sender<bool>,
    debounce: Duration,
) {
    loop {
        shared.changed.notified().await;
        // Collect the rest of the burst (a resumed watch's backlog, a rollout) into this rebuild.
        tokio::time::sleep(debounce).await;
        if !shared.dirty.swap(false, Ordering::SeqCst) {
            continue; // a wakeup for changes an earlier rebuild already covered
        }
        // Read before the stores: a kind marked listed has its list in its store already.
        let all_listed = shared.all_listed();
        let (pods, services) = snapshot(&stores);
        let unchanged = {
            let current = inventory_tx.borrow();
            current.pods().iter().map(|p| &**p).eq(pods.iter())
                && current.services().iter().map(|s| &**s).eq(services.iter())
        };
        if !unchanged {
            debug!(
                pods = pods.len(),
                services = services.len(),
                "publishing inventory"
            );
            // Count before publishing: whoever sees the snapshot also sees the count.
            shared.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            inventory_tx.send_replace(Arc::new(Inventory::new(pods, services)));
        }
        if all_listed {
            synced_tx.send_if_modified(|synced| {
                let first = !*synced;
                if first {
                    info!("kubernetes identity synced");
                }
                *synced = true;
                first
            });
        }
    }
}

/// Converts the stores' contents, sorted by namespace and name.
fn snapshot(stores: &Stores) -> (Vec<Pod>, Vec<Service>) {
    let mut pods: Vec<Pod> = stores
        .pods
        .state()
        .iter()
        .filter_map(|p| pod_from_k8s(p))
        .collect();
    pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let slices = stores.slices.state();
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in &slices {
        let namespace = slice.metadata.namespace.as_deref();
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if let (Some(namespace), Some(service)) = (namespace, service) {
            by_service
                .entry((namespace, service.as_str()))
                .or_default()
                .push(slice);
        }
    }
    for group in by_service.values_mut() {
        group.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }

    let mut services: Vec<Service> = stores
        .services
        .state()
        .iter()
        .filter_map(|s| {
            let key = (
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default(),
            );
            let slices = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
            service_from_k8s(s, slices)
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    (pods, services)
}
