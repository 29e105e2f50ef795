//! The HTTP listener: `/metrics` (Prometheus/OpenMetrics text), `/livez` (every group has
//! beaten recently) and `/readyz` (Redis answers, every group runs, not shutting down).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct App {
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
}

/// Binds `listen` now (so a port in use fails startup with a clear message) and serves in
/// the background until the process exits.
pub async fn serve(
    listen: &str,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(App {
            metrics,
            health,
            shutdown,
        });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the HTTP listener failed");
        }
    });
    Ok(addr)
}

async fn metrics_text(State(app): State<App>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}

async fn livez(State(app): State<App>) -> impl IntoResponse {
    let stalled = app.health.stalled();
    if stalled.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled groups: {}\n", stalled.join(", ")),
        )
    }
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    let mut reasons = Vec::new();
    if app.shutdown.is_triggered() {
        reasons.push("shutting down".to_owned());
    }
    if !app.health.redis_up() {
        reasons.push("Redis is unreachable".to_owned());
    }
    let not_running = app.health.not_running();
    if !not_running.is_empty() {
        reasons.push(format!("groups not running: {}", not_running.join(", ")));
    }
    if reasons.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reasons.join("; ")),
        )
    }
}
