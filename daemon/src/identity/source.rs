//! Starting an identity source and keeping [`Identity`] up to date from it.
//!
//! Invariants: the source's tasks only replace the inventory snapshot and the synced flag of the
//! shared [`Identity`] (which locks internally, and nothing else while it does); what the
//! exposition counts (reloads, sync) is reported through the callbacks, so this module knows
//! nothing of metrics.

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use super::{
    Identity, IdentitySource,
    kube::{KubeOptions, KubeSource},
    local::{self, InventoryError, ReloadOutcome},
};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("Kubernetes client: {0}")]
    Kube(String),
}

/// How the source reports what the exposition counts.
pub struct Callbacks {
    /// An inventory file load: true when it was loaded.
    pub reloaded: Box<dyn Fn(bool) + Send + Sync>,
    /// The identity became synced (or not).
    pub synced: Box<dyn Fn(bool) + Send + Sync>,
}

/// Loads the identity source, pushes its tasks to `tasks`, and returns the Kubernetes source to
/// stop at shutdown, if any. A bad inventory file is an error here, at startup.
pub async fn start(
    source: &IdentitySource,
    identity: Arc<Identity>,
    cb: Callbacks,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<Option<KubeSource>, SourceError> {
    let cb = Arc::new(cb);
    match source {
        IdentitySource::None => {
            identity.set_synced(true);
            Ok(None)
        }
        IdentitySource::Local { path, reload_every } => {
            let loaded = local::stamp(path);
            let inv = Arc::new(local::load(path)?);
            tracing::info!(
                file = %path.display(),
                pods = inv.pods().len(),
                services = inv.services().len(),
                "inventory loaded"
            );
            identity.replace(inv.clone());
            identity.set_synced(true);
            (cb.reloaded)(true);
            (cb.synced)(true);
            let (tx, mut rx) = watch::channel(inv);
            let c = cb.clone();
            tasks.push(tokio::spawn(local::watch_file(
                path.clone(),
                *reload_every,
                loaded,
                tx,
                move |outcome| (c.reloaded)(*outcome == ReloadOutcome::Loaded),
            )));
            tasks.push(tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let inv = rx.borrow_and_update().clone();
                    identity.replace(inv);
                }
            }));
            Ok(None)
        }
        IdentitySource::Kube {
            node_name,
            kubeconfig,
        } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            let source = KubeSource::start(
                client,
                KubeOptions {
                    node_name: node_name.clone(),
                    debounce: Duration::from_millis(200),
                },
            );
            let (mut inv_rx, mut synced_rx) = (source.inventory.clone(), source.synced.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = inv_rx.changed() => {
                            if r.is_err() { return; }
                            let inv = inv_rx.borrow_and_update().clone();
                            identity.replace(inv);
                        }
                        r = synced_rx.changed() => {
                            if r.is_err() { return; }
                            let synced = *synced_rx.borrow_and_update();
                            identity.set_synced(synced);
                            (cb.synced)(synced);
                        }
                    }
                }
            }));
            Ok(Some(source))
        }
    }
}

/// A Kubernetes client from `kubeconfig`, else in-cluster config or the default kubeconfig.
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, SourceError> {
    let err = |e: &dyn std::fmt::Display| SourceError::Kube(e.to_string());
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| SourceError::Kube(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| SourceError::Kube(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer().await.map_err(|e| err(&e))?,
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}
