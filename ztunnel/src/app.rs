//! The composition root: builds state, identity, capture, proxy and admin from
//! [`Config`], then runs until SIGTERM/SIGINT and tears capture down.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http::StatusCode;
use serde_json::json;
use tracing::{error, info, warn};
use weft_api::LocalConfig;
use weft_ebpf::routing::{PolicyRoute, RoutingError};
use weft_ebpf::{Capture, CaptureConfig, CaptureError};
use weft_hbone::ca::{Ca, CaError};
use weft_hbone::client::Pool;

use crate::admin::{self, Handler, JSON, OPENMETRICS, TEXT};
use crate::config::{
    CAPTURE_SYNC_INTERVAL, CaptureMode, Config, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT,
    REDIRECT_MARK, REDIRECT_TABLE,
};
use crate::identity::{CertManager, IdentityError};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyInputs};
use crate::state::{Store, pod_map};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot read local config {path}: {source}")]
    ReadConfig {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("local config {path} is invalid: {source}")]
    ParseConfig {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("cannot bind {what}: {source}")]
    Bind {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn read_local_config(path: &Path) -> Result<(LocalConfig, String), AppError> {
    let text = std::fs::read_to_string(path).map_err(|source| AppError::ReadConfig {
        path: path.display().to_string(),
        source,
    })?;
    let cfg = serde_yaml::from_str(&text).map_err(|source| AppError::ParseConfig {
        path: path.display().to_string(),
        source,
    })?;
    Ok((cfg, text))
}

/// Runs ztunnel until a shutdown signal.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let (local, mut last_text) = read_local_config(&cfg.local_xds_path)?;
    let state = Arc::new(Store::new(local));
    let ca = Ca::from_files(&cfg.ca_cert, &cfg.ca_key)?;
    let certs = Arc::new(CertManager::new(ca, cfg.cert_ttl)?);
    prefetch(&state, &certs, &cfg.node_name);
    let metrics = Arc::new(Metrics::default());

    let inputs = Arc::new(ProxyInputs {
        cfg: cfg.clone(),
        state: state.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        pool: Pool::default(),
    });
    let proxy = Proxy::bind(inputs).map_err(|source| AppError::Bind {
        what: "capture listeners (15001, 15006, 15008)",
        source,
    })?;

    let mut pods = BTreeMap::new();
    let (capture, mut route) = match cfg.capture {
        CaptureMode::Ebpf => {
            let route = PolicyRoute::install(REDIRECT_MARK, REDIRECT_TABLE)?;
            let mut capture = Capture::load(&CaptureConfig {
                port_outbound: OUTBOUND_PORT,
                port_inbound: INBOUND_PLAINTEXT_PORT,
                port_hbone: HBONE_PORT,
                listen_addr: cfg.listen_addr,
                redirect_mark: REDIRECT_MARK,
            })?;
            capture.sync_interfaces()?;
            pods = pod_map(&state.snapshot(), &cfg.node_name, &pods);
            capture.set_pods(&pods)?;
            (Some(Arc::new(Mutex::new(capture))), Some(route))
        }
        CaptureMode::None => (None, None),
    };

    let ready = Arc::new(AtomicBool::new(false));
    serve_admin(&cfg, &state, &certs, &metrics, capture.as_ref(), &ready).await?;
    tokio::spawn(proxy.run());
    ready.store(true, Ordering::Release);
    info!(node = %cfg.node_name, "ztunnel ready");

    let mut tick = tokio::time::interval(CAPTURE_SYNC_INTERVAL);
    let mut config_error: Option<String> = None;
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        // Local config changes (development mode): keep the last good state on error.
        match read_local_config(&cfg.local_xds_path) {
            Ok((local, text)) if text != last_text => {
                config_error = None;
                last_text = text;
                state.replace(local);
                prefetch(&state, &certs, &cfg.node_name);
                info!(path = %cfg.local_xds_path.display(), "local config reloaded");
            }
            Ok(_) => config_error = None,
            Err(e) => {
                // Once per distinct error, not once per tick.
                let text = e.to_string();
                if config_error.as_ref() != Some(&text) {
                    warn!(error = %text, "keeping the last good config");
                    config_error = Some(text);
                }
            }
        }
        if let Some(capture) = &capture {
            let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = c.sync_interfaces() {
                warn!(error = %e, "capture interface sync failed");
            }
            let next = pod_map(&state.snapshot(), &cfg.node_name, &pods);
            if next != pods {
                match c.set_pods(&next) {
                    Ok(()) => pods = next,
                    Err(e) => error!(error = %e, "capture map update failed"),
                }
            }
        }
    }
    info!("shutting down: detaching capture");
    drop(capture);
    if let Some(route) = route.as_mut() {
        route.remove()?;
    }
    Ok(())
}

fn prefetch(state: &Store, certs: &CertManager, node: &str) {
    let snap = state.snapshot();
    let ids: Vec<_> = snap
        .config()
        .workloads
        .iter()
        .filter(|w| w.node == node && w.protocol == weft_api::TunnelProtocol::Hbone)
        .filter_map(|w| w.identity().ok())
        .collect();
    if let Err(e) = certs.prefetch(&ids) {
        error!(error = %e, "cannot issue workload certificates");
    }
}

async fn serve_admin(
    cfg: &Config,
    state: &Arc<Store>,
    certs: &Arc<CertManager>,
    metrics: &Arc<Metrics>,
    capture: Option<&Arc<Mutex<Capture>>>,
    ready: &Arc<AtomicBool>,
) -> Result<(), AppError> {
    let bind_err = |what| move |source| AppError::Bind { what, source };

    let (st, ce, cap, node) = (
        state.clone(),
        certs.clone(),
        capture.cloned(),
        cfg.node_name.clone(),
    );
    let config_dump: Handler = Arc::new(move |path| match path {
        "/config_dump" => {
            let capture = cap.as_ref().map(|c| {
                let c = c.lock().unwrap_or_else(|p| p.into_inner());
                json!({
                    "interfaces": c.interfaces(),
                    "captured": c.captured(),
                    "draining": c.draining(),
                    "counters": c.counters(),
                })
            });
            let snap = st.snapshot();
            let dump = json!({
                "node": node,
                "workloads": snap.config().workloads,
                "services": snap.config().services,
                "certificates": ce.dump(),
                "capture": capture,
            });
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default();
            (StatusCode::OK, JSON, body)
        }
        _ => (StatusCode::NOT_FOUND, TEXT, "try /config_dump\n".into()),
    });
    admin::serve("admin", cfg.admin_addr, config_dump)
        .await
        .map_err(bind_err("admin"))?;

    let (m, cap) = (metrics.clone(), capture.cloned());
    let stats: Handler = Arc::new(move |path| match path {
        "/metrics" | "/stats/prometheus" => {
            if let Some(c) = &cap {
                let counters = c.lock().unwrap_or_else(|p| p.into_inner()).counters();
                for (path, total) in counters {
                    m.set_redirects(path, total);
                }
            }
            (StatusCode::OK, OPENMETRICS, m.encode())
        }
        _ => (StatusCode::NOT_FOUND, TEXT, "try /metrics\n".into()),
    });
    admin::serve("stats", cfg.stats_addr, stats)
        .await
        .map_err(bind_err("stats"))?;

    let r = ready.clone();
    let readiness: Handler = Arc::new(move |path| match path {
        "/healthz/ready" if r.load(Ordering::Acquire) => (StatusCode::OK, TEXT, "ready\n".into()),
        "/healthz/ready" => (StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into()),
        _ => (StatusCode::NOT_FOUND, TEXT, "try /healthz/ready\n".into()),
    });
    admin::serve("readiness", cfg.readiness_addr, readiness)
        .await
        .map_err(bind_err("readiness"))?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
