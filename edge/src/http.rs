//! The edge's HTTP endpoint: `/healthz` (the process is alive), `/readyz` (listeners bound, a PBX
//! backend healthy, not draining, and — for an edge of a cluster — the cluster's state applied or
//! the sync grace over) and `/metrics` (Prometheus / OpenMetrics text).

use crate::backend::Backends;
use crate::metrics::Metrics;
use axum::{
    extract::State, http::header, http::StatusCode, response::IntoResponse, routing::get, Router,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub backends: Arc<Backends>,
    /// Cleared when shutdown starts, so load balancers stop sending before the drain.
    pub accepting: Arc<AtomicBool>,
    /// Set once the first cluster snapshot is applied (or the sync grace ended; at once without
    /// controllers), so traffic is not sent to an edge that does not yet know the bans and
    /// registrations.
    pub synced: Arc<AtomicBool>,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if !s.accepting.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !s.synced.load(Ordering::Relaxed) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the cluster's bans and registrations\n",
        )
    } else if !s.backends.any_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy PBX backend\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            sipwarden_shared::promtext::CONTENT_TYPE,
        )],
        s.metrics.encode(),
    )
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, state: HttpState, stop: CancellationToken) {
    let _ = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
}
