//! The controller process: a source (manifests directory), translation,
//! publishing, and the gRPC server (delta ADS and CA) over TLS.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};
use weft_runtime::admin::{self, Handler, JSON, OPENMETRICS, TEXT};
use weft_runtime::shutdown_signal;
use weft_xds::grpc::Server;

use crate::Snapshot;
use crate::auth::{Authenticator, NodeTokens};
use crate::ca::{MeshCa, MeshCaError};
use crate::changed::Changed;
use crate::deploy::{self, WaypointGateway};
use crate::kubernetes::{self, KubeSource, StatusWriter, TokenReviewer};
use crate::metrics::{Metrics, TypeLabels};
use crate::policy::Status;
use crate::source::ManifestsDir;
use crate::translate::{self, Mesh, Translation};
use crate::xds::{Controller, Published};
use crate::{lease, root_cert};

pub const ENV_MANIFESTS_DIR: &str = "MANIFESTS_DIR";
pub const ENV_CA_DIR: &str = "CA_DIR";
pub const ENV_NODE_TOKENS: &str = "NODE_TOKENS";
pub const ENV_XDS_ADDR: &str = "XDS_ADDR";
pub const ENV_SERVER_NAMES: &str = "SERVER_NAMES";
pub const ENV_MAX_CERT_TTL: &str = "MAX_CERT_TTL_SECONDS";
pub const ENV_XDS_PUSH_CHUNK: &str = "XDS_PUSH_CHUNK";
pub const ENV_TRUST_DOMAIN: &str = "TRUST_DOMAIN";
pub const ENV_ROOT_NAMESPACE: &str = "ROOT_NAMESPACE";
pub const ENV_METRICS_ADDR: &str = "METRICS_ADDR";
pub const ENV_ZTUNNEL_SERVICE_ACCOUNT: &str = "ZTUNNEL_SERVICE_ACCOUNT";
/// Kubernetes mode: the controller's namespace (the downward API's).
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
/// Kubernetes mode: this replica's name, for leader election.
pub const ENV_POD_NAME: &str = "POD_NAME";
/// `false` lets mesh clients reach the endpoints of a service with L7
/// policy directly, around its waypoint (Istio's behaviour).
pub const ENV_L7_POLICY_WAYPOINT_ONLY: &str = "L7_POLICY_WAYPOINT_ONLY";
/// Kubernetes mode: the image of the waypoint Deployments the controller makes.
pub const ENV_WAYPOINT_IMAGE: &str = "WAYPOINT_IMAGE";
/// Kubernetes mode: the controller's address as waypoint pods dial it.
pub const ENV_WAYPOINT_XDS_ADDRESS: &str = "WAYPOINT_XDS_ADDRESS";
const DEFAULT_WAYPOINT_IMAGE: &str = "weft/waypoint:latest";
const DEFAULT_WAYPOINT_XDS_ADDRESS: &str = "weft-controller.istio-system.svc:15012";

fn get_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where resources, node agents' credentials and the CA come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// One host: a manifests directory, a bootstrap token per node, the CA in a directory.
    Manifests {
        dir: PathBuf,
        node_tokens: PathBuf,
        ca_dir: PathBuf,
    },
    /// The API server (in-cluster, or the kubeconfig): node agents by
    /// TokenReview as `ztunnel_service_account` (`namespace/name`), the CA in
    /// Secrets of the root namespace.
    Kubernetes {
        ztunnel_service_account: String,
        /// The controller's own namespace (`POD_NAMESPACE`), which always
        /// gets the mesh root's ConfigMap, and holds the leader's Lease.
        namespace: String,
        /// This replica's name in the Lease (`POD_NAME`, else the host name).
        identity: String,
    },
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceConfig,
    pub xds_addr: SocketAddr,
    /// Prometheus `/metrics`, `/ready` and `/debug/status` (Istio's monitoring port).
    pub metrics_addr: SocketAddr,
    pub server_names: Vec<String>,
    pub max_cert_ttl: Duration,
    pub mesh: Mesh,
    /// Most resources in one xDS response to a client that understands the
    /// end-of-state marker (`XDS_PUSH_CHUNK`).
    pub push_chunk: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Ca(#[from] MeshCaError),
    #[error("cannot make the serving certificate: {0}")]
    Serving(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

impl Config {
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, AppError> {
        let req = |k: &str| {
            get(k)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| AppError::Config(format!("{k} is required")))
        };
        let xds_addr = get(ENV_XDS_ADDR).unwrap_or_else(|| "0.0.0.0:15012".into());
        let xds_addr = xds_addr
            .parse()
            .map_err(|e| AppError::Config(format!("{ENV_XDS_ADDR}={xds_addr:?}: {e}")))?;
        let metrics_addr = get(ENV_METRICS_ADDR).unwrap_or_else(|| "0.0.0.0:15014".into());
        let metrics_addr = metrics_addr
            .parse()
            .map_err(|e| AppError::Config(format!("{ENV_METRICS_ADDR}={metrics_addr:?}: {e}")))?;
        let ttl = get(ENV_MAX_CERT_TTL).unwrap_or_else(|| "86400".into());
        let max_cert_ttl = match ttl.parse::<u64>() {
            Ok(s) if s >= 2 => Duration::from_secs(s),
            _ => {
                return Err(AppError::Config(format!(
                    "{ENV_MAX_CERT_TTL}={ttl:?}: want whole seconds, at least 2"
                )));
            }
        };
        let chunk = get(ENV_XDS_PUSH_CHUNK).unwrap_or_else(|| crate::xds::PUSH_CHUNK.to_string());
        let push_chunk = match chunk.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(AppError::Config(format!(
                    "{ENV_XDS_PUSH_CHUNK}={chunk:?}: want a number of resources, at least 1"
                )));
            }
        };
        let names = get(ENV_SERVER_NAMES)
            .unwrap_or_else(|| "weft-controller.istio-system.svc,istiod.istio-system.svc".into());
        // A manifests directory means one host; otherwise the API server.
        let source = match get(ENV_MANIFESTS_DIR).filter(|v| !v.is_empty()) {
            Some(dir) => SourceConfig::Manifests {
                dir: PathBuf::from(dir),
                node_tokens: PathBuf::from(req(ENV_NODE_TOKENS)?),
                ca_dir: PathBuf::from(get(ENV_CA_DIR).unwrap_or_else(|| "/var/lib/weft/ca".into())),
            },
            None => SourceConfig::Kubernetes {
                ztunnel_service_account: get(ENV_ZTUNNEL_SERVICE_ACCOUNT)
                    .unwrap_or_else(|| "istio-system/ztunnel".into()),
                namespace: get(ENV_POD_NAMESPACE)
                    .or_else(|| get(ENV_ROOT_NAMESPACE))
                    .unwrap_or_else(|| "istio-system".into()),
                identity: get(ENV_POD_NAME)
                    .or_else(|| get("HOSTNAME"))
                    .unwrap_or_else(|| format!("weft-controller-{}", std::process::id())),
            },
        };
        Ok(Config {
            source,
            xds_addr,
            metrics_addr,
            server_names: names
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            max_cert_ttl,
            push_chunk,
            mesh: Mesh {
                trust_domain: get(ENV_TRUST_DOMAIN).unwrap_or_else(|| "cluster.local".into()),
                root_namespace: get(ENV_ROOT_NAMESPACE).unwrap_or_else(|| "istio-system".into()),
                l7_policy_waypoint_only: match get(ENV_L7_POLICY_WAYPOINT_ONLY).as_deref() {
                    None | Some("true") => true,
                    Some("false") => false,
                    Some(other) => {
                        return Err(AppError::Config(format!(
                            "{ENV_L7_POLICY_WAYPOINT_ONLY}={other:?}: want true or false"
                        )));
                    }
                },
                ..Mesh::default()
            },
        })
    }
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    run_reporting(cfg, |_| {}).await
}

/// The addresses a running controller listens on.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub xds: SocketAddr,
    pub metrics: SocketAddr,
}

/// As [`run`], and calls `bound` once both listeners are bound, with the
/// kernel's choice where the config asks for port 0: a caller that starts
/// several controllers never races another process for a free port.
pub async fn run_reporting(cfg: Config, bound: impl FnOnce(Bound)) -> Result<(), AppError> {
    let metrics = Arc::new(Metrics::default());
    // Kubernetes mode: how to give up the lead on SIGTERM.
    let mut lease_stop = None;
    let (source, auth, ca) = match &cfg.source {
        SourceConfig::Manifests {
            dir,
            node_tokens,
            ca_dir,
        } => {
            let ca = MeshCa::load_or_generate(ca_dir, &cfg.mesh.trust_domain, cfg.max_cert_ttl)?;
            let tokens = NodeTokens::load(node_tokens).map_err(AppError::Config)?;
            (
                Source::Manifests(ManifestsDir::new(dir), {
                    let changed = Arc::new(Changed::default());
                    crate::changed::watch_dir(dir, changed.clone());
                    changed
                }),
                Authenticator::Tokens(tokens),
                ca,
            )
        }
        SourceConfig::Kubernetes {
            ztunnel_service_account,
            namespace,
            identity,
        } => {
            let client = kube::Client::try_default()
                .await
                .map_err(|e| AppError::Config(format!("no Kubernetes API server: {e}")))?;
            let ca = kubernetes::load_or_create_ca(
                client.clone(),
                &cfg.mesh.root_namespace,
                &cfg.mesh.trust_domain,
                cfg.max_cert_ttl,
            )
            .await?;
            let source = KubeSource::start(client.clone());
            source.ready(ISTIO_CRD_GRACE).await;
            let auth = Authenticator::Kubernetes(TokenReviewer::new(
                client.clone(),
                ztunnel_service_account,
                &cfg.mesh.trust_domain,
                Some(source.pods()),
            ));
            // One replica writes to the cluster; all serve.
            let (stop_tx, stop_rx) = watch::channel(false);
            let leader = lease::elect(
                client.clone(),
                namespace,
                identity,
                lease::Timing::default(),
                stop_rx,
            );
            lease_stop = Some((stop_tx, leader.clone()));
            let (tx, rx) = watch::channel(Vec::new());
            tokio::spawn(write_statuses(
                StatusWriter::new(client.clone()).instance(identity),
                rx,
                leader.clone(),
            ));
            let (wtx, wrx) = watch::channel(Vec::new());
            let settings = deploy::Settings {
                image: get_env(ENV_WAYPOINT_IMAGE).unwrap_or_else(|| DEFAULT_WAYPOINT_IMAGE.into()),
                xds_address: get_env(ENV_WAYPOINT_XDS_ADDRESS)
                    .unwrap_or_else(|| DEFAULT_WAYPOINT_XDS_ADDRESS.into()),
                trust_domain: cfg.mesh.trust_domain.clone(),
            };
            tokio::spawn(deploy_waypoints(
                deploy::Deployer::new(client.clone(), settings),
                wrx,
                leader.clone(),
            ));
            let (rtx, rrx) = watch::channel(BTreeSet::new());
            tokio::spawn(root_cert::run(
                root_cert::RootPublisher::new(client, ca.root_pem()),
                namespace.clone(),
                rrx,
                leader,
            ));
            let cluster = Cluster {
                source: Box::new(source),
                statuses: tx,
                waypoints: wtx,
                namespaces: rtx,
            };
            (Source::Kubernetes(cluster), auth, ca)
        }
    };
    let (cert, key) = ca
        .serving_cert(&cfg.server_names)
        .map_err(|e| AppError::Serving(e.to_string()))?;
    let tls = weft_hbone::tls::control_plane_server_config(&cert, &key)
        .map_err(|e| AppError::Serving(e.to_string()))?;

    let (publish, published) = watch::channel(Arc::new(Published::default()));
    let mut publisher = Publisher {
        source,
        mesh: cfg.mesh.clone(),
        publish,
        last: None,
        metrics: metrics.clone(),
        status: Arc::new(Mutex::new("[]\n".into())),
    };
    // Woken by the source's own change notifications (watch events, inotify):
    // no fixed poll. The generation is taken before the first read, so a
    // change that lands while it runs wakes the translate thread.
    let changed = match &publisher.source {
        Source::Manifests(_, changed) => changed.clone(),
        Source::Kubernetes(c) => c.source.changes(),
    };
    let mut seen = changed.generation();
    // The first state is read before serving, so no client sees an empty mesh.
    publisher.poll();
    let metrics_addr =
        serve_metrics(cfg.metrics_addr, metrics.clone(), publisher.status.clone()).await?;
    // Reading, translating and encoding take tens of milliseconds at 10k
    // pods: on a thread of their own, never on the runtime that serves xDS.
    let runtime = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("translate".into())
        .spawn(move || {
            let _in_runtime = runtime.enter();
            loop {
                if let Some(g) = changed.wait_after(seen, None) {
                    seen = g;
                }
                publisher.poll();
            }
        })
        .map_err(|e| AppError::Config(format!("cannot start the translate thread: {e}")))?;

    let controller = Arc::new(Controller::new(
        published,
        auth,
        ca,
        metrics,
        cfg.push_chunk,
    ));
    let listener = TcpListener::bind(cfg.xds_addr)
        .await
        .map_err(|source| AppError::Bind {
            addr: cfg.xds_addr,
            source,
        })?;
    let xds_addr = listener.local_addr().map_err(|source| AppError::Bind {
        addr: cfg.xds_addr,
        source,
    })?;
    info!(address = %xds_addr, "controller serving xDS and CA");
    bound(Bound {
        xds: xds_addr,
        metrics: metrics_addr,
    });
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .serve_with_incoming_shutdown(Server::new(controller), ReceiverStream::new(rx), async {
            let _ = stopped.await;
        });
    let mut server = std::pin::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        () = shutdown_signal() => {
            // GOAWAY to every client; xDS streams never end by themselves,
            // so they are cut at the deadline: clients reconnect to another
            // replica, or to this one's successor, and resume from their
            // last state.
            let _ = stop.send(());
            // Give the lease up so another replica writes at once.
            if let Some((stop, mut leader)) = lease_stop.take() {
                let _ = stop.send(true);
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    leader.wait_for(|leads| !*leads),
                )
                .await;
            }
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(served) => served?,
                Err(_) => info!(grace = ?SHUTDOWN_GRACE, "closing the open xDS streams without waiting for their clients"),
            }
        }
    }
    info!("controller stopped");
    Ok(())
}

/// How long a stopping controller lets its streams end after GOAWAY; well
/// inside Kubernetes' grace period, so it exits within 5 s of SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Where the publisher reads from.
enum Source {
    /// With what wakes the publisher when the directory changes.
    Manifests(ManifestsDir, Arc<Changed>),
    Kubernetes(Cluster),
}

/// The API server source, and where each translation's results go back to
/// the cluster.
struct Cluster {
    source: Box<KubeSource>,
    /// Statuses to write back.
    statuses: watch::Sender<Vec<(Status, Option<i64>)>>,
    /// Waypoint Gateways to deploy.
    waypoints: watch::Sender<Vec<WaypointGateway>>,
    /// Every namespace: the mesh root's ConfigMap goes to them.
    namespaces: watch::Sender<BTreeSet<String>>,
}

impl Source {
    /// The merged snapshot and the problems reading it, when anything changed.
    fn poll(&mut self) -> Option<(Arc<Snapshot>, Vec<String>)> {
        match self {
            Source::Manifests(dir, _) => match dir.poll() {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "cannot list the manifests directory; keeping the last good state");
                    None
                }
            },
            Source::Kubernetes(c) => c.source.poll(),
        }
    }
}

/// How long to wait for the security.istio.io kinds to list before serving without them.
const ISTIO_CRD_GRACE: Duration = Duration::from_secs(10);

/// Deploys each waypoint Gateway's objects as the set changes.
async fn deploy_waypoints(
    mut deployer: deploy::Deployer,
    mut rx: watch::Receiver<Vec<WaypointGateway>>,
    mut leader: watch::Receiver<bool>,
) {
    // Also on a tick: a parametersRef ConfigMap is read at each round, and
    // its changes land within [`deploy::RESYNC`].
    let mut tick = tokio::time::interval(deploy::RESYNC);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            changed = leader.changed() => {
                if changed.is_err() {
                    return;
                }
                deployer.forget();
            }
            _ = tick.tick() => {}
        }
        if *leader.borrow() {
            let gateways = rx.borrow_and_update().clone();
            deployer.apply(&gateways).await;
        }
    }
}

/// Writes each translation's statuses back, newest first; a slow API server
/// delays status, never the data plane.
async fn write_statuses(
    mut writer: StatusWriter,
    mut rx: watch::Receiver<Vec<(Status, Option<i64>)>>,
    mut leader: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            changed = leader.changed() => {
                if changed.is_err() {
                    return;
                }
                writer.forget();
            }
        }
        if *leader.borrow() {
            let statuses = rx.borrow_and_update().clone();
            writer.write(&statuses).await;
        }
    }
}

/// Reads the source, translates, publishes; keeps what the next round needs.
struct Publisher {
    source: Source,
    mesh: Mesh,
    publish: watch::Sender<Arc<Published>>,
    last: Option<Translation>,
    metrics: Arc<Metrics>,
    /// `/debug/status`: every policy resource's status, as JSON.
    status: Arc<Mutex<String>>,
}

impl Publisher {
    fn poll(&mut self) {
        let (source, mesh, publish, last) =
            (&mut self.source, &self.mesh, &self.publish, &mut self.last);
        let started = std::time::Instant::now();
        let Some((snap, problems)) = source.poll() else {
            return;
        };
        let read = started.elapsed();
        let t = translate::translate(&snap, mesh, last.as_ref());
        let translated = started.elapsed();
        for p in &problems {
            warn!(component = "source", problem = %p, "resource left out");
        }
        for e in &t.errors {
            warn!(component = "translate", problem = %e, "resource left out");
        }
        for s in t.statuses() {
            let resource = format!("{} {}/{}", s.kind, s.namespace, s.name);
            if s.accepted && s.reason != "UnsupportedValue" {
                debug!(%resource, reason = s.reason, message = %s.message, "status");
            } else {
                warn!(%resource, accepted = s.accepted, reason = s.reason, message = %s.message, "status");
            }
        }
        let cfg = &t.config;
        let next = Published::build(
            cfg,
            &t.l7.resources,
            &publish.borrow(),
            last.as_ref().map(|l| &l.config),
        );
        info!(
            workloads = cfg.workloads.len(),
            services = cfg.services.len(),
            policies = cfg.policies.len(),
            changed = next.changed(),
            read_ms = read.as_millis() as u64,
            translate_ms = (translated - read).as_millis() as u64,
            encode_ms = (started.elapsed() - translated).as_millis() as u64,
            "config published"
        );
        let m = &self.metrics;
        m.publishes.inc();
        m.publish_seconds.observe(started.elapsed().as_secs_f64());
        m.config_errors
            .set((problems.len() + t.errors.len()) as i64);
        for ty in weft_xds::types::REGISTRY {
            let n = next.resources.get(ty.type_url).map_or(0, BTreeMap::len);
            m.resources
                .get_or_create(&TypeLabels { r#type: ty.name })
                .set(n as i64);
        }
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status_json(&t);
        publish.send_replace(Arc::new(next));
        if let Source::Kubernetes(Cluster {
            statuses,
            waypoints,
            namespaces,
            ..
        }) = source
        {
            let all: BTreeSet<String> = snap.namespaces.keys().cloned().collect();
            namespaces.send_if_modified(|cur| {
                let changed = *cur != all;
                *cur = all;
                changed
            });
            let gateways = crate::waypoints::waypoints(&snap)
                .0
                .into_values()
                .map(|w| {
                    let g = snap.gateways.get(&w.key());
                    WaypointGateway {
                        uid: g.and_then(|g| g.metadata.uid.clone()).unwrap_or_default(),
                        infrastructure: g
                            .and_then(|g| g.spec.infrastructure.clone())
                            .unwrap_or_default(),
                        namespace: w.namespace,
                        name: w.name,
                    }
                })
                .collect();
            waypoints.send_if_modified(|cur| {
                let changed = *cur != gateways;
                *cur = gateways;
                changed
            });
            let generation = |s: &Status| {
                crate::kinds::generation(&snap, s.kind, &format!("{}/{}", s.namespace, s.name))
            };
            let with_generations = t.statuses().map(|s| (s.clone(), generation(s))).collect();
            statuses.send_replace(with_generations);
        }
        *last = Some(t);
    }
}

/// Every policy resource's status and every refusal, for `/debug/status`.
fn status_json(t: &Translation) -> String {
    let statuses: Vec<serde_json::Value> = t
        .statuses()
        .map(|s| {
            serde_json::json!({
                "kind": s.kind,
                "namespace": s.namespace,
                "name": s.name,
                "conditions": [{
                    "type": if matches!(s.kind, "Service" | "ServiceEntry") { s.condition } else { "Accepted" },
                    "status": if s.accepted { "True" } else { "False" },
                    "reason": s.reason,
                    "message": s.message,
                }],
            })
        })
        .collect();
    serde_json::to_string_pretty(&statuses).unwrap_or_default() + "\n"
}

/// `/metrics` (OpenMetrics text), `/ready`, `/debug/status` (JSON).
async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<String>>,
) -> Result<SocketAddr, AppError> {
    let handler: Handler = Arc::new(move |path| match path {
        "/metrics" => (StatusCode::OK, OPENMETRICS, metrics.encode()),
        "/ready" => (StatusCode::OK, TEXT, "ready\n".into()),
        "/debug/status" => (
            StatusCode::OK,
            JSON,
            status.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            TEXT,
            "try /metrics, /ready or /debug/status\n".into(),
        ),
    });
    admin::serve("metrics", addr, handler)
        .await
        .map_err(|source| AppError::Bind { addr, source })
}
