//! What every Weft process runs besides its job: small admin HTTP servers
//! ([`admin::serve`]), Prometheus text ([`metrics::encode`]) and the shutdown
//! signal ([`shutdown_signal`]).

#![forbid(unsafe_code)]

pub mod admin;
pub mod metrics;

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
