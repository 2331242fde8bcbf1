//! HTTP: `/metrics` (OpenMetrics), `/healthz` (readiness), `/livez` (liveness), `/features`,
//! `/connections` (the live table as JSON) and the balance APIs.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;

use crate::agent::Shared;
use crate::conntable::{Conn, Direction, Origin};
use crate::event::Owner;
use crate::identity::attribution::Attribution;

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/features", get(features))
        .route("/connections", get(connections))
        .route("/services/{namespace}/{name}/balance", get(service_balance))
        .route("/pods/{name}/peers", get(pod_peers_default_ns))
        .route("/pods/{namespace}/{name}/peers", get(pod_peers))
        .fallback(not_found)
        .with_state(shared)
}

#[derive(Serialize)]
struct ApiError {
    error: String,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    shared.refresh_gauges();
    match shared.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed"),
    }
}

async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn livez(State(shared): State<Arc<Shared>>) -> Response {
    if shared.is_live() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "housekeeping stalled\n").into_response()
    }
}

#[derive(Serialize)]
struct FeaturesView {
    features: Vec<crate::features::Status>,
}

async fn features(State(shared): State<Arc<Shared>>) -> Response {
    Json(FeaturesView {
        features: shared.features.snapshot(),
    })
    .into_response()
}

#[derive(Serialize, Debug)]
pub struct ConnView {
    pub netns: u32,
    pub local: String,
    pub remote: String,
    pub direction: Direction,
    pub origin: Origin,
    pub owner: Option<Owner>,
    /// Seconds since the connection established, when the tracer saw it open.
    pub age_seconds: Option<f64>,
    /// Which pod this end is and what the peer is (pod, service with backend, node, external).
    pub identity: Attribution,
    /// Payload bytes and send/receive calls, counted in the kernel.
    pub counters: crate::event::Counters,
    /// Requests sent (outbound connections), with their source: `h2` or `messages`.
    pub requests: Option<crate::conntable::Requests>,
}

impl ConnView {
    fn new(c: &Conn, now_ns: u64, identity: Attribution) -> Self {
        ConnView {
            netns: c.key.netns,
            local: c.key.local.to_string(),
            remote: c.key.remote.to_string(),
            direction: c.direction,
            origin: c.origin,
            owner: c.owner.clone(),
            age_seconds: c.opened_ns.map(|t| now_ns.saturating_sub(t) as f64 / 1e9),
            identity,
            counters: c.counters,
            requests: c.requests,
        }
    }
}

async fn connections(
    State(shared): State<Arc<Shared>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut netns = None;
    for (k, v) in &q {
        match k.as_str() {
            "netns" => match v.parse::<u32>() {
                Ok(n) => netns = Some(n),
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("netns must be a namespace inode number, got {v:?}"),
                    );
                }
            },
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {other:?} (known: netns)"),
                );
            }
        }
    }
    let now = crate::agent::monotonic_ns();
    let inv = shared.identity.snapshot();
    let mut out: Vec<ConnView> = shared.with_table(|t| {
        t.iter()
            .filter(|c| netns.is_none_or(|n| c.key.netns == n))
            .map(|c| ConnView::new(c, now, shared.identity.attribute(&inv, c)))
            .collect()
    });
    out.sort_by(|a, b| (a.netns, &a.local, &a.remote).cmp(&(b.netns, &b.local, &b.remote)));
    Json(out).into_response()
}

/// Per client pod of a service: ready versus connected backends, requests per backend, skew,
/// verdict and reason, over the sliding window.
async fn service_balance(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let service = crate::identity::model::ObjectRef::new(&namespace, &name);
    let known = shared
        .identity
        .snapshot()
        .service(&namespace, &name)
        .is_some();
    let now = crate::agent::monotonic_ns();
    let balances: Vec<_> = shared
        .analyzer()
        .evaluate(now)
        .into_iter()
        .filter(|b| b.service == service)
        .collect();
    if !known && balances.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown service {namespace}/{name}"),
        );
    }
    Json(serde_json::json!({
        "service": service,
        "clients": balances,
    }))
    .into_response()
}

/// A Kubernetes object name or namespace: DNS-1123 characters, at most 253.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

async fn pod_peers_default_ns(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut namespace = "default".to_string();
    for (k, v) in q {
        match k.as_str() {
            "namespace" => namespace = v,
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unknown query parameter {other:?} (known: namespace)"),
                );
            }
        }
    }
    peers_of(&shared, &namespace, &name)
}

async fn pod_peers(
    State(shared): State<Arc<Shared>>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(k) = q.keys().next() {
        return error(
            StatusCode::BAD_REQUEST,
            format!("unknown query parameter {k:?} (the namespace is in the path)"),
        );
    }
    peers_of(&shared, &namespace, &name)
}

#[derive(Serialize)]
struct PeerConn {
    local_port: u16,
    direction: Direction,
    state: &'static str,
    origin: Origin,
    age_seconds: Option<f64>,
    counters: crate::event::Counters,
    requests: Option<crate::conntable::Requests>,
}

#[derive(Serialize)]
struct PeerView {
    peer: crate::identity::attribution::Peer,
    remote: String,
    connections: Vec<PeerConn>,
}

/// Every peer of a pod (pod, service, node or external; IP and port) with its connections, and
/// the balance verdict per service the pod calls.
fn peers_of(shared: &Shared, namespace: &str, name: &str) -> Response {
    for (what, v) in [("namespace", namespace), ("pod name", name)] {
        if !valid_name(v) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("{what} {v:?} is not a valid Kubernetes name"),
            );
        }
    }
    let inv = shared.identity.snapshot();
    if inv.pod(namespace, name).is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown pod {namespace}/{name}"),
        );
    }
    let now = crate::agent::monotonic_ns();
    let mut peers: Vec<PeerView> = Vec::new();
    shared.with_table(|t| {
        for c in t.iter() {
            let at = shared.identity.attribute(&inv, c);
            let crate::identity::attribution::LocalEnd::Pod(me) = &at.local else {
                continue;
            };
            if me.namespace != namespace || me.name != name {
                continue;
            }
            let remote = c.key.remote.to_string();
            let conn = PeerConn {
                local_port: c.key.local.port(),
                direction: c.direction,
                state: "established",
                origin: c.origin,
                age_seconds: c.opened_ns.map(|t| now.saturating_sub(t) as f64 / 1e9),
                counters: c.counters,
                requests: c.requests,
            };
            match peers
                .iter_mut()
                .find(|p| p.remote == remote && p.peer == at.peer)
            {
                Some(p) => p.connections.push(conn),
                None => peers.push(PeerView {
                    peer: at.peer.clone(),
                    remote,
                    connections: vec![conn],
                }),
            }
        }
    });
    peers.sort_by(|a, b| a.remote.cmp(&b.remote));
    let client = crate::identity::model::ObjectRef::new(namespace, name);
    let services: Vec<_> = shared
        .analyzer()
        .evaluate(now)
        .into_iter()
        .filter(|b| b.client == client)
        .map(|b| {
            serde_json::json!({
                "service": b.service,
                "verdict": b.verdict,
                "reason": b.reason,
                "ready": b.ready,
                "connected": b.connected,
                "coverage": b.coverage,
                "skew": b.skew,
                "requests_per_backend": b.requests_per_backend,
            })
        })
        .collect();
    Json(serde_json::json!({
        "pod": client,
        "peers": peers,
        "services": services,
    }))
    .into_response()
}
