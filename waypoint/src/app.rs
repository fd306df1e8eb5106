//! The waypoint's composition root: identity and config from the
//! controller, the HBONE listener once both are here, readiness and
//! metrics, and a drain on SIGTERM.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use tracing::{info, warn};
use weft_hbone::client::Pool;
use weft_hbone::server::StreamBudget;
use weft_identity::{CertManager, RemoteSigner};
use weft_runtime::admin::{self, Handler, JSON, OPENMETRICS, TEXT};
use weft_xds::client::AdsClient;
use weft_xds::grpc::ControlPlaneAddress;

use crate::config::{Config, MAX_STREAMS};
use crate::metrics::Metrics;
use crate::proxy::{HttpPool, Proxy};
use crate::state::{self, Store};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("control plane: {0}")]
    ControlPlane(String),
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the waypoint until SIGTERM or Ctrl-C.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let root = std::fs::read_to_string(&cfg.root_cert).map_err(|source| AppError::Read {
        path: cfg.root_cert.display().to_string(),
        source,
    })?;
    weft_hbone::tls::control_plane_client_config(&root)
        .map_err(|e| AppError::ControlPlane(e.to_string()))?;
    // Trust the controller by the root file as it is at each dial, plus
    // every root the CA has sent (root rotation), as ztunnel does.
    let learned: Arc<OnceLock<Arc<CertManager>>> = Arc::new(OnceLock::new());
    let (file, known) = (cfg.root_cert.clone(), learned.clone());
    let tls = move || {
        let mut pem =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        if let Some(certs) = known.get() {
            pem.push('\n');
            pem.push_str(&certs.trusted_pem());
        }
        weft_hbone::tls::control_plane_client_config(&pem).map_err(|e| e.to_string())
    };
    let cp = ControlPlaneAddress {
        addr: cfg.xds_address.clone(),
        server_name: cfg.xds_server_name.clone(),
        tls: Arc::new(tls),
    };
    let channel =
        weft_xds::grpc::connect(&cp).map_err(|e| AppError::ControlPlane(e.to_string()))?;
    let signer = RemoteSigner {
        channel: channel.clone(),
        token_path: cfg.token_path.clone(),
    };
    let certs = Arc::new(
        CertManager::new(Box::new(signer), &root, cfg.cert_ttl)
            .map_err(|e| AppError::ControlPlane(e.to_string()))?,
    );
    let _ = learned.set(certs.clone());

    let store = Arc::new(Store::default());
    let ns = cfg.identity.namespace();
    let node_id = format!(
        "router~0.0.0.0~{}.{ns}~{ns}.svc.cluster.local",
        cfg.pod_name
    );
    let node = weft_xds::client::node(node_id, &cfg.node_name);
    let client = state::client(
        AdsClient::new(channel, cfg.token_path.clone(), node),
        store.clone(),
    );
    let synced = client.synced();
    tokio::spawn(client.run());
    let (wanted, wanted_rx) = tokio::sync::watch::channel(BTreeSet::from([cfg.identity.clone()]));
    tokio::spawn(certs.clone().refresh(wanted_rx));

    let metrics = Arc::new(Metrics::default());
    let outliers = Arc::new(crate::outlier::Outliers::default());
    let ready = Arc::new(AtomicBool::new(false));
    serve_admin(&cfg, &metrics, &outliers, &ready).await?;

    let shutdown = weft_runtime::shutdown_signal();
    tokio::pin!(shutdown);
    // Listen once the config and our certificate are here: before that a
    // client could only be refused.
    loop {
        let has_cert = certs.server_config(&cfg.identity).await.is_ok();
        if synced.load(Ordering::Acquire) && has_cert {
            break;
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let (tracer, spans) = crate::trace::Tracer::new(metrics.clone());
    let proxy = Arc::new(Proxy {
        identity: cfg.identity.clone(),
        gateway: cfg.gateway.clone(),
        certs,
        store,
        hbone: Pool::default(),
        http: HttpPool::default(),
        retry_budget: crate::retry::Budget::default(),
        breakers: crate::breaker::Breakers::default(),
        outliers,
        metrics,
        mirrors: Arc::new(tokio::sync::Semaphore::new(
            crate::mirror::MIRRORS_IN_FLIGHT,
        )),
        tracer,
        budget: StreamBudget::new(MAX_STREAMS, MAX_STREAMS / 2),
        drain: drain_rx,
    });
    tokio::spawn(crate::trace::export(
        proxy.clone(),
        spans,
        crate::trace::resource(&cfg.gateway, cfg.identity.namespace()),
    ));
    let listener =
        admin::reuse_port_listener(cfg.listen_addr, false).map_err(|source| AppError::Bind {
            what: "HBONE (15008)",
            source,
        })?;
    info!(address = %cfg.listen_addr, identity = %cfg.identity, "waypoint ready");
    ready.store(true, Ordering::Release);
    let serving = tokio::spawn(proxy.clone().serve_hbone(listener));
    if let Some((addr, target)) = cfg.plain_http {
        let plain = admin::reuse_port_listener(addr, false).map_err(|source| AppError::Bind {
            what: "plain HTTP (benchmarks)",
            source,
        })?;
        warn!(address = %addr, %target, "plain HTTP listener for benchmarks: no TLS, no client identity");
        tokio::spawn(proxy.clone().serve_plain(plain, target));
    }
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {
                proxy.http.evict_idle();
                proxy.hbone.evict_idle(weft_hbone::POOL_IDLE_TIMEOUT);
            }
        }
    }
    ready.store(false, Ordering::Release);
    let _ = drain_tx.send(true);
    drop(wanted);
    info!(deadline = ?cfg.drain_duration, "draining");
    if tokio::time::timeout(cfg.drain_duration, serving)
        .await
        .is_err()
    {
        warn!("drain deadline passed");
    }
    Ok(())
}

async fn serve_admin(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    outliers: &Arc<crate::outlier::Outliers>,
    ready: &Arc<AtomicBool>,
) -> Result<(), AppError> {
    let m = metrics.clone();
    let o = outliers.clone();
    let stats: Handler = Arc::new(move |path| match path {
        "/metrics" | "/stats/prometheus" => (StatusCode::OK, OPENMETRICS, m.encode()),
        // Endpoints ejected by outlier detection, now.
        "/debug/outliers" => (StatusCode::OK, JSON, o.ejected_json()),
        _ => (StatusCode::NOT_FOUND, TEXT, "try /metrics\n".into()),
    });
    admin::serve("stats", cfg.stats_addr, stats)
        .await
        .map_err(|source| AppError::Bind {
            what: "stats (15020)",
            source,
        })?;
    let r = ready.clone();
    let readiness: Handler = Arc::new(move |path| match path {
        "/healthz/ready" if r.load(Ordering::Acquire) => (StatusCode::OK, TEXT, "ready\n".into()),
        "/healthz/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: waiting for config and certificate, or draining\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, "try /healthz/ready\n".into()),
    });
    admin::serve("readiness", cfg.readiness_addr, readiness)
        .await
        .map_err(|source| AppError::Bind {
            what: "readiness (15021)",
            source,
        })?;
    Ok(())
}
