//! The HTTP listener: `/metrics` (Prometheus/OpenMetrics text), `/livez` (every group has
//! beaten recently) and `/readyz` (Redis answers, every group runs, not shutting down);
//! with `http.console = true`, the web console at `/` (`crate::console`).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::console::Console;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct App {
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
}

/// Binds `listen` now (so a port in use fails startup with a clear message) and serves
/// until the process exits, on a thread and runtime of its own: a handler that wedges the
/// daemon's runtime must not also silence the endpoints that report it.
pub fn serve(
    listen: &str,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
    console: Option<Console>,
) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let mut app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(App {
            metrics,
            health,
            shutdown,
        });
    if let Some(console) = &console {
        app = app.merge(console.clone().routes());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some(console) = console {
                    tokio::spawn(console.sample_forever());
                }
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "the HTTP listener failed");
                        return;
                    }
                };
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the HTTP listener failed");
                }
            })
        })?;
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
