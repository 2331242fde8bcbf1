//! HTTP: `/metrics` (OpenMetrics), `/healthz` (readiness), `/livez` (liveness), `/features`,
//! `/connections` (the live table, a page at a time) and the balance APIs.
//!
//! Invariants: handlers hold no state of the data path. They read what is shared read-mostly
//! ([`AppState`]: metrics, features, identity, readiness) and ask the pipeline the rest, as
//! queries answered over a oneshot; answers are the API types of [`super::api`], bounded in size.
//! A malformed name or query is a JSON `400`, an unknown object or path a JSON `404`.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Path, Query as QueryParams, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::{api, metrics::Metrics, server::ServerStats};
use crate::{
    conntable::Conn,
    event::EventTap,
    features::Features,
    identity::{Identity, attribution::Attribution, model::ObjectRef},
    pipeline::{
        self, Handle, Query,
        query::{ConnFilter, DEFAULT_PAGE, DEFAULT_PEER_CONNECTIONS, MAX_PAGE, parse_cursor},
    },
};

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `/livez` fails once the pipeline has not turned for this long.
pub const LIVENESS_STALE: std::time::Duration = std::time::Duration::from_secs(30);

/// What the handlers (and embedders) share. Read-mostly: nothing here belongs to the data path.
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub identity: Arc<Identity>,
    pub features: Arc<Features>,
    /// The pipeline, for queries.
    pub pipeline: Handle,
    /// Startup recovery is done.
    pub ready: Arc<AtomicBool>,
    /// When the pipeline last turned (monotonic ns; 0 before its first turn).
    pub heartbeat: Arc<AtomicU64>,
    pub events: EventTap,
    pub http: ServerStats,
}

impl AppState {
    /// Ready: programs attached, startup recovery done, identity synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.identity.is_synced()
    }

    /// Live: the pipeline turned within [`LIVENESS_STALE`], or has not had its first turn yet.
    pub fn is_live(&self) -> bool {
        let beat = self.heartbeat.load(Ordering::Acquire);
        beat == 0
            || pipeline::monotonic_ns().saturating_sub(beat) < LIVENESS_STALE.as_nanos() as u64
    }

    /// Every row of the connection table, now.
    pub async fn rows(&self) -> Vec<Conn> {
        self.pipeline.rows().await
    }

    /// Runs `f` over every row, now, from synchronous code on a multi-thread runtime (tests and
    /// embedders): the pipeline answers while this thread waits.
    pub fn with_rows<T>(&self, f: impl FnOnce(&[Conn]) -> T) -> T {
        let rows = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.pipeline.rows())
        });
        f(&rows)
    }

    /// Every row with its attribution, now.
    pub async fn attributed(&self) -> Vec<(Conn, Attribution)> {
        let rows = self.rows().await;
        let inv = self.identity.snapshot();
        rows.into_iter()
            .map(|c| {
                let a = self.identity.attribute(&inv, &c);
                (c, a)
            })
            .collect()
    }
}

pub fn router(shared: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/features", get(features))
        .route("/connections", get(connections))
        .route("/services/{namespace}/{name}/balance", get(service_balance))
        .route("/pods/{name}/peers", get(pod_peers_default_ns))
        .route("/pods/{namespace}/{name}/peers", get(pod_peers))
        .route("/regressions", get(regressions))
        .fallback(not_found)
        .with_state(shared)
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(api::ApiError::new(msg))).into_response()
}

fn gone() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the agent is shutting down",
    )
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn metrics(State(shared): State<Arc<AppState>>) -> Response {
    match shared.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed"),
    }
}

async fn healthz(State(shared): State<Arc<AppState>>) -> Response {
    if shared.is_ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn livez(State(shared): State<Arc<AppState>>) -> Response {
    if shared.is_live() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the pipeline stalled\n").into_response()
    }
}

async fn features(State(shared): State<Arc<AppState>>) -> Response {
    Json(api::FeaturesView {
        features: shared.features.snapshot(),
    })
    .into_response()
}

/// `?netns=INODE&limit=N&after=CURSOR`.
fn conn_filter(q: &HashMap<String, String>) -> Result<ConnFilter, String> {
    let mut f = ConnFilter {
        limit: DEFAULT_PAGE,
        ..ConnFilter::default()
    };
    for (k, v) in q {
        match k.as_str() {
            "netns" => {
                f.netns =
                    Some(v.parse::<u32>().map_err(|_| {
                        format!("netns must be a namespace inode number, got {v:?}")
                    })?)
            }
            "limit" => {
                f.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| format!("limit must be from 1 to {MAX_PAGE}, got {v:?}"))?
            }
            "after" => {
                f.after = Some(parse_cursor(v).ok_or_else(|| {
                    format!("after must be the `next` cursor of a previous page, got {v:?}")
                })?)
            }
            other => {
                return Err(format!(
                    "unknown query parameter {other:?} (known: netns, limit, after)"
                ));
            }
        }
    }
    Ok(f)
}

async fn connections(
    State(shared): State<Arc<AppState>>,
    QueryParams(q): QueryParams<HashMap<String, String>>,
) -> Response {
    let filter = match conn_filter(&q) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match shared
        .pipeline
        .ask(|reply| Query::Connections { filter, reply })
        .await
    {
        Some(page) => Json(page).into_response(),
        None => gone(),
    }
}

/// Per client pod of a service: ready versus connected backends, requests per backend, skew,
/// verdict and reason, over the sliding window.
async fn regressions(State(shared): State<Arc<AppState>>) -> Response {
    match shared
        .pipeline
        .ask(|reply| Query::Regressions { reply })
        .await
    {
        Some(view) => Json(view).into_response(),
        None => gone(),
    }
}

async fn service_balance(
    State(shared): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    for (what, v) in [("namespace", &namespace), ("service name", &name)] {
        if !valid_name(v) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{what} {v:?} is not a valid Kubernetes name"),
            );
        }
    }
    let service = ObjectRef::new(&namespace, &name);
    match shared
        .pipeline
        .ask(|reply| Query::ServiceBalance { service, reply })
        .await
    {
        Some(Some(view)) => Json(view).into_response(),
        Some(None) => error(
            StatusCode::NOT_FOUND,
            format!("unknown service {namespace}/{name}"),
        ),
        None => gone(),
    }
}

/// A Kubernetes object name or namespace: DNS-1123 characters, at most 253.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The query of a peers request: `?connections=N` (connections listed per peer), and, where the
/// path has no namespace, `?namespace=NS` (default `default`). Returns (namespace, limit).
fn peers_query(
    q: HashMap<String, String>,
    namespace_in_path: bool,
) -> Result<(Option<String>, usize), String> {
    let (mut namespace, mut limit) = (None, DEFAULT_PEER_CONNECTIONS);
    for (k, v) in q {
        match k.as_str() {
            "namespace" if !namespace_in_path => namespace = Some(v),
            "connections" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| format!("connections must be from 1 to {MAX_PAGE}, got {v:?}"))?
            }
            other if namespace_in_path => {
                return Err(format!(
                    "unknown query parameter {other:?} (known: connections; the namespace is in \
                     the path)"
                ));
            }
            other => {
                return Err(format!(
                    "unknown query parameter {other:?} (known: namespace, connections)"
                ));
            }
        }
    }
    Ok((namespace, limit))
}

async fn pod_peers_default_ns(
    State(shared): State<Arc<AppState>>,
    Path(name): Path<String>,
    QueryParams(q): QueryParams<HashMap<String, String>>,
) -> Response {
    match peers_query(q, false) {
        Ok((namespace, limit)) => {
            let namespace = namespace.unwrap_or_else(|| "default".into());
            peers_of(&shared, &namespace, &name, limit).await
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn pod_peers(
    State(shared): State<Arc<AppState>>,
    Path((namespace, name)): Path<(String, String)>,
    QueryParams(q): QueryParams<HashMap<String, String>>,
) -> Response {
    match peers_query(q, true) {
        Ok((_, limit)) => peers_of(&shared, &namespace, &name, limit).await,
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// Every peer of a pod (pod, service, node or external; IP and port) with its connections, and
/// the balance verdict per service the pod calls.
async fn peers_of(shared: &AppState, namespace: &str, name: &str, limit: usize) -> Response {
    for (what, v) in [("namespace", namespace), ("pod name", name)] {
        if !valid_name(v) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{what} {v:?} is not a valid Kubernetes name"),
            );
        }
    }
    let pod = ObjectRef::new(namespace, name);
    match shared
        .pipeline
        .ask(|reply| Query::PodPeers { pod, limit, reply })
        .await
    {
        Some(Some(view)) => Json(view).into_response(),
        Some(None) => error(
            StatusCode::NOT_FOUND,
            format!("unknown pod {namespace}/{name}"),
        ),
        None => gone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_queries_are_checked() {
        let q = |pairs: &[(&str, &str)]| {
            conn_filter(
                &pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        assert_eq!(q(&[]).unwrap().limit, DEFAULT_PAGE);
        assert_eq!(q(&[("netns", "7"), ("limit", "5")]).unwrap().netns, Some(7));
        assert!(q(&[("limit", "0")]).is_err());
        assert!(q(&[("limit", "100000")]).is_err());
        assert!(q(&[("after", "nope")]).is_err());
        assert!(q(&[("colour", "red")]).is_err());
        assert!(
            q(&[("after", "1/10.0.0.1:1/10.0.0.2:2")])
                .unwrap()
                .after
                .is_some()
        );
    }
}
