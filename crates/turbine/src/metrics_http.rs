//! A worker process's own `/metrics`: Prometheus text of its collectors, on a port of its
//! own, since a worker has no HTTP frontend to add them to.

use std::net::SocketAddr;

use anyhow::Context;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

/// Binds `addr` and serves `registry` on `GET /metrics` until `shutdown` completes; returns
/// the bound address (port 0 picks one) once it is listening.
pub async fn serve(
    addr: SocketAddr,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr().context("reading the metrics address")?;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { render(&registry) }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::warn!(error = %e, "the metrics server failed");
        }
    });
    Ok(bound)
}

fn render(registry: &Registry) -> axum::response::Response {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}")).into_response(),
    }
}
