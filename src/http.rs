//! The HTTP endpoints (`Application.http.listen`): `/metrics` (Prometheus), `/livez`,
//! `/readyz` and `/status` (JSON), all read from the [`Registry`].
//!
//! | path | answer |
//! |---|---|
//! | `/livez` | 200 while the process runs |
//! | `/readyz` | 200 when every active worker is connected to both servers, not blocked, and progressed within `max(3 × wait_duration, 30 s)`; otherwise 503 with one line per reason. Standby workers are ready |
//! | `/metrics` | Prometheus text format, every metric labelled by queue |
//! | `/status` | JSON: per worker role, state, batch, lag, pending events, connections, counters |

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::stats::{Registry, WorkerState, WorkerStats};

/// Serves the endpoints on `listener` until `stop`.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, stop: CancellationToken) {
    let app = Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .with_state(registry);
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%address, "serving /metrics, /livez, /readyz, /status");
    let shutdown = async move { stop.cancelled().await };
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!(%address, %error, "the HTTP endpoints stopped");
    }
}

async fn readyz(State(registry): State<Arc<Registry>>) -> Response {
    let reasons = registry.unready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", reasons.join("\n")),
        )
            .into_response()
    }
}

async fn metrics_text(State(registry): State<Arc<Registry>>) -> Response {
    let body = metrics::prometheus(&registry.workers());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn status(State(registry): State<Arc<Registry>>) -> Response {
    let workers: Vec<Value> = registry
        .workers()
        .iter()
        .map(|stats| worker_status(stats))
        .collect();
    axum::Json(json!({ "workers": workers })).into_response()
}

/// One worker's `/status` entry.
pub fn worker_status(stats: &WorkerStats) -> Value {
    let counters: serde_json::Map<String, Value> = metrics::COUNTERS
        .iter()
        .map(|counter| (counter.name.to_owned(), json!((counter.read)(stats).get())))
        .collect();
    let unready = stats.unready_reason();
    json!({
        "queue": stats.queue,
        "role": if stats.state() == WorkerState::Standby { "standby" } else { "active" },
        "state": stats.state().name(),
        "ready": unready.is_none(),
        "unready_reason": unready,
        "batch_id": stats.current_batch(),
        "lag_seconds": stats.lag().map(|lag| lag.as_secs_f64()),
        "pending_events": stats.pending_events(),
        "in_flight": stats.in_flight(),
        "postgresql_connected": stats.postgres_connected(),
        "rabbitmq_connected": stats.broker_connected(),
        "blocked": stats.blocked(),
        "last_error": stats.last_error(),
        "seconds_since_progress": stats.since_progress().as_secs_f64(),
        "counters": counters,
    })
}
