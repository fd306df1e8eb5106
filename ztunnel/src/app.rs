//! The composition root: builds state, identity, capture, proxy and admin from
//! [`Config`], then runs until SIGTERM/SIGINT. Capture stays pinned when
//! ztunnel exits (fail closed); [`uninstall`] is what removes it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tracing::{error, info, warn};
use weft_api::LocalConfig;
use weft_ebpf::routing::{PolicyRoute, RoutingError};
use weft_ebpf::{Capture, CaptureConfig, CaptureError};
use weft_hbone::ca::{Ca, CaError};
use weft_hbone::client::Pool;
use weft_hbone::server::StreamBudget;

use crate::config::{
    CAPTURE_SYNC_INTERVAL, CaptureMode, Config, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    INBOUND_STREAMS_PEER_SHARE, OUTBOUND_PORT, REDIRECT_MARK, REDIRECT_TABLE, Source,
};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyInputs};
use crate::removal::Verdict;
use crate::state::{Store, pod_map};
use crate::succession::{self, Succession};
use weft_identity::{CertManager, IdentityError, LocalSigner, RemoteSigner};
use weft_runtime::admin::{self, Handler, JSON, OPENMETRICS, TEXT};
use weft_runtime::shutdown_signal;
use weft_xds::grpc::ControlPlaneAddress;

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
    Tls(#[from] weft_hbone::tls::TlsError),
    #[error("control plane address: {0}")]
    ControlPlane(String),
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
    let state = Arc::new(Store::new(LocalConfig::default()));
    let metrics = Arc::new(Metrics::default());
    let mut synced = Arc::new(AtomicBool::new(false));
    let mut local_text = None;
    let certs = match &cfg.source {
        Source::Local {
            xds_path,
            ca_cert,
            ca_key,
        } => {
            let (local, text) = read_local_config(xds_path)?;
            state.replace(local);
            local_text = Some(text);
            synced.store(true, Ordering::Release);
            let ca = Ca::from_files(ca_cert, ca_key)?;
            let root = ca.cert_pem().to_string();
            Arc::new(CertManager::new(
                Box::new(LocalSigner(ca)),
                &root,
                cfg.cert_ttl,
            )?)
        }
        Source::Controller {
            address,
            server_name,
            root_cert,
            token_path,
        } => {
            let root =
                std::fs::read_to_string(root_cert).map_err(|source| AppError::ReadConfig {
                    path: root_cert.display().to_string(),
                    source,
                })?;
            // Checked now, so a bad file fails startup.
            weft_hbone::tls::control_plane_client_config(&root)?;
            // At each dial: the root file as it is now (Kubernetes updates a
            // mounted ConfigMap in place) and every root the CA has sent, so
            // a controller whose certificate moved to a new root is trusted.
            let learned: Arc<OnceLock<Arc<CertManager>>> = Arc::new(OnceLock::new());
            let (file, known) = (root_cert.clone(), learned.clone());
            let tls = move || {
                let mut pem = std::fs::read_to_string(&file)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                if let Some(certs) = known.get() {
                    pem.push('\n');
                    pem.push_str(&certs.trusted_pem());
                }
                weft_hbone::tls::control_plane_client_config(&pem).map_err(|e| e.to_string())
            };
            let cp = ControlPlaneAddress {
                addr: address.clone(),
                server_name: server_name.clone(),
                tls: Arc::new(tls),
            };
            let channel =
                weft_xds::grpc::connect(&cp).map_err(|e| AppError::ControlPlane(e.to_string()))?;
            let client = crate::xds::client(
                channel.clone(),
                token_path.clone(),
                &cfg.node_name,
                state.clone(),
                metrics.clone(),
            );
            synced = client.synced();
            tokio::spawn(client.run());
            let signer = RemoteSigner {
                channel,
                token_path: token_path.clone(),
            };
            let certs = Arc::new(CertManager::new(Box::new(signer), &root, cfg.cert_ttl)?);
            let _ = learned.set(certs.clone());
            certs
        }
    };

    // First of all, tell a predecessor on this node that it is superseded:
    // it then answers not ready, so a ready answer on the shared port is
    // always ours, and it will not remove the capture this process adopts.
    let succession = Succession::claim(&succession::socket_name(&cfg.bpf_pin_dir)).await;

    // Capture first, adopting what a previous ztunnel pinned: its pod map
    // stays as it is until this process knows the mesh, so pods captured
    // before stay captured (their SYNs are dropped until we listen).
    let mut pods = BTreeMap::new();
    let capture = match cfg.capture {
        CaptureMode::Ebpf => {
            PolicyRoute::install(REDIRECT_MARK, REDIRECT_TABLE)?;
            if let Err(e) = weft_ebpf::routing::enable_request_migration() {
                warn!(error = %e, "cannot set net.ipv4.tcp_migrate_req: a restart may reset connections queued on the old listeners");
            }
            let mut capture = Capture::load(&CaptureConfig {
                port_outbound: OUTBOUND_PORT,
                port_inbound: INBOUND_PLAINTEXT_PORT,
                port_hbone: HBONE_PORT,
                listen_addr: cfg.listen_addr,
                redirect_mark: REDIRECT_MARK,
                pin_dir: cfg.bpf_pin_dir.clone(),
            })?;
            // No VIPs known yet: the node's addresses pinned before stay as
            // they are (none added, so no VIP is taken for one) until the
            // state is here.
            capture.sync_interfaces(None)?;
            pods = capture.pods();
            Some(Arc::new(Mutex::new(capture)))
        }
        CaptureMode::None => None,
    };

    let ready = Arc::new(AtomicBool::new(false));
    let admin = Admin {
        capture: capture.as_ref(),
        ready: &ready,
        succession: &succession,
    };
    serve_admin(&cfg, &state, &certs, &metrics, admin).await?;

    // Listeners open once the first full state is here: before that a
    // captured connection could only be refused, while a SYN that finds no
    // listener is dropped and retried by the client.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    while !synced.load(Ordering::Acquire) {
        tokio::select! {
            _ = &mut shutdown => {
                info!("shut down before the first state; capture stays pinned");
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let inputs = Arc::new(ProxyInputs {
        cfg: cfg.clone(),
        state: state.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        pools: (0..cfg.worker_threads).map(|_| Pool::default()).collect(),
        drain: drain_rx,
        open: Arc::default(),
        streams: StreamBudget::new(
            cfg.max_connections,
            cfg.max_connections / INBOUND_STREAMS_PEER_SHARE,
        ),
    });
    let pool_owner = inputs.clone();
    // Connections admitted from here on were checked against this state or
    // a newer one: a newer one at the first tick means a revalidation.
    let serving_since = state.generation();
    let proxy = Proxy::start(inputs)
        .await
        .map_err(|source| AppError::Bind {
            what: "capture listeners (15001, 15006, 15008) and their workers",
            source,
        })?;
    let proxy = tokio::spawn(proxy.finished());
    // The one certificate refresher: this node's captured identities,
    // fetched ahead of their first connection and renewed at half-life.
    let (wanted, wanted_rx) = tokio::sync::watch::channel(BTreeSet::new());
    tokio::spawn(certs.clone().refresh(wanted_rx));

    let mut tick = tokio::time::interval(CAPTURE_SYNC_INTERVAL);
    let mut config_error: Option<String> = None;
    // The state's generation last seen, not the state: holding it would
    // make every update copy the state instead of changing it in place.
    let mut seen: Option<u64> = None;
    // The mesh's VIPs, never node addresses; known once the state is.
    let mut vips = None;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        // Local config changes (development mode): keep the last good state on error.
        if let (Source::Local { xds_path, .. }, Some(last_text)) =
            (&cfg.source, local_text.as_mut())
        {
            match read_local_config(xds_path) {
                Ok((local, text)) if text != *last_text => {
                    config_error = None;
                    *last_text = text;
                    state.replace(local);
                    info!(path = %xds_path.display(), "local config reloaded");
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
        }
        let generation = state.generation();
        let snap = state.snapshot();
        if seen != Some(generation) {
            // A new state: its policies apply to open connections too.
            if (seen.is_some() || generation != serving_since) && !pool_owner.open.is_empty() {
                let closed = pool_owner.open.revalidate(&snap, &pool_owner.metrics);
                if closed > 0 {
                    info!(closed, "open connections the new policies deny were closed");
                }
            }
            vips = None;
            seen = Some(generation);
            let ids = local_identities(&snap, &cfg.node_name);
            wanted.send_if_modified(|w| {
                let changed = *w != ids;
                *w = ids;
                changed
            });
        }
        if vips.is_none() && synced.load(Ordering::Acquire) {
            vips = Some(snap.vips_v4());
        }
        for pool in &pool_owner.pools {
            pool.evict_idle(weft_hbone::POOL_IDLE_TIMEOUT);
        }
        // Ready means the pods this state says are captured are: a client
        // that waits for readiness never talks to them around ztunnel.
        let mut captured_as_stated = true;
        if let Some(capture) = &capture {
            let mut c = capture.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = c.sync_interfaces(vips.as_ref()) {
                warn!(error = %e, "capture interface sync failed");
            }
            let next = pod_map(&snap, &cfg.node_name, &pods);
            if next != pods {
                match c.set_pods(&next) {
                    Ok(()) => pods = next,
                    Err(e) => {
                        error!(error = %e, "capture map update failed");
                        captured_as_stated = false;
                    }
                }
            }
        }
        if synced.load(Ordering::Acquire)
            && captured_as_stated
            && !ready.swap(true, Ordering::AcqRel)
        {
            info!(node = %cfg.node_name, "ztunnel ready");
        }
    }
    // A rollout keeps capture for the successor; a removal takes it away
    // once drained, so no pod is left captured with no proxy.
    let verdict = removal_verdict(&cfg, &succession).await;
    match &verdict {
        Verdict::Keep(why) => info!(reason = %why, "stopping; capture stays for the next ztunnel"),
        Verdict::Remove(why) => {
            warn!(reason = %why, "stopping for good on this node; capture goes once drained")
        }
    }
    // Drain: no longer ready, listeners close (a new ztunnel bound beside
    // this one takes their queued connections), HBONE servers send GOAWAY,
    // open connections get `drain_duration` to finish.
    ready.store(false, Ordering::Release);
    let _ = drain_tx.send(true);
    info!(deadline = ?cfg.drain_duration, "draining");
    match tokio::time::timeout(cfg.drain_duration, proxy).await {
        Ok(_) => info!("drained: every connection finished"),
        Err(_) => {
            warn!(deadline = ?cfg.drain_duration, "drain deadline passed; closing the connections left")
        }
    }
    drop(capture);
    if let Verdict::Remove(_) = verdict {
        // Asked again now, after the drain: a ztunnel that started
        // meanwhile (a reinstall), or a DaemonSet that is back, keeps it.
        match removal_verdict(&cfg, &succession).await {
            Verdict::Remove(why) => {
                if cfg.capture == CaptureMode::Ebpf {
                    info!(reason = %why, "removal confirmed");
                    uninstall(&cfg.bpf_pin_dir)?;
                }
                return Ok(());
            }
            Verdict::Keep(why) => {
                info!(reason = %why, "not a removal after all; capture stays")
            }
        }
    }
    // Capture stays: until a ztunnel listens again, captured pods' traffic
    // is dropped, never sent in plaintext.
    info!("shutting down; capture stays pinned (`ztunnel uninstall` removes it)");
    Ok(())
}

/// Whether stopping now is a removal: not while a newer ztunnel runs on
/// the node (a rollout), and only on the API server's word.
async fn removal_verdict(cfg: &Config, succession: &Succession) -> Verdict {
    if succession.superseded() {
        Verdict::Keep("a newer ztunnel runs on this node: a rollout".into())
    } else if let Some(access) = &cfg.cluster {
        access.check().await
    } else {
        Verdict::Keep("no API server to ask".into())
    }
}

/// Removes capture from this node for good: every pinned link and map under
/// `pin_dir`, and the policy route. Captured pods then talk directly again.
pub fn uninstall(pin_dir: &Path) -> Result<(), AppError> {
    let removed = weft_ebpf::uninstall(pin_dir)?;
    PolicyRoute::uninstall(REDIRECT_MARK, REDIRECT_TABLE)?;
    info!(pin_dir = %pin_dir.display(), pins = removed.len(), "capture uninstalled");
    Ok(())
}

/// The identities of this node's captured pods: the certificates to hold.
fn local_identities(snap: &crate::state::State, node: &str) -> BTreeSet<weft_api::Identity> {
    snap.workloads()
        .filter(|w| w.node == node && w.protocol == weft_api::TunnelProtocol::Hbone)
        .filter_map(|w| w.identity().ok())
        .collect()
}

/// What the admin endpoints report besides the state.
struct Admin<'a> {
    capture: Option<&'a Arc<Mutex<Capture>>>,
    ready: &'a Arc<AtomicBool>,
    succession: &'a Succession,
}

async fn serve_admin(
    cfg: &Config,
    state: &Arc<Store>,
    certs: &Arc<CertManager>,
    metrics: &Arc<Metrics>,
    Admin {
        capture,
        ready,
        succession,
    }: Admin<'_>,
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
            let config = st.snapshot().config();
            let dump = json!({
                "node": node,
                "workloads": config.workloads,
                "services": config.services,
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

    let (r, succ) = (ready.clone(), succession.clone());
    let pid = std::process::id();
    // Under SO_REUSEPORT the probe may reach either ztunnel of a rollout:
    // the superseded one never says ready, and the answer names its process.
    let readiness: Handler = Arc::new(move |path| match path {
        "/healthz/ready" if succ.superseded() => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("superseded by a newer ztunnel (pid {pid})\n"),
        ),
        "/healthz/ready" if r.load(Ordering::Acquire) => {
            (StatusCode::OK, TEXT, format!("ready (pid {pid})\n"))
        }
        "/healthz/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            format!("not ready (pid {pid})\n"),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, "try /healthz/ready\n".into()),
    });
    admin::serve("readiness", cfg.readiness_addr, readiness)
        .await
        .map_err(bind_err("readiness"))?;
    Ok(())
}
