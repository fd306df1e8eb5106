//! A pretend Kubernetes API server for what ztunnel asks it on SIGTERM:
//! HTTPS on loopback inside a node's namespace, objects by path (404 for
//! the others), a bearer token checked, and a pod's service account
//! directory (`token`, `ca.crt`) to point ztunnel at.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use weft_hbone::ca::Ca;

use crate::netns::NetNs;

const TOKEN: &str = "ztunnel-sa-token";

/// A running fake API server.
#[derive(Debug)]
pub struct FakeApi {
    pub port: u16,
    /// The service account directory: `token` and `ca.crt`.
    pub sa_dir: PathBuf,
    objects: Arc<Mutex<HashMap<String, Value>>>,
    /// Every path asked, with whether the token was right.
    pub asked: Arc<Mutex<Vec<(String, bool)>>>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeApi {
    /// Starts it in `netns` on 127.0.0.1, writing the service account
    /// files under `dir`.
    pub fn start(netns: &NetNs, dir: &Path) -> Result<FakeApi> {
        let ca = Ca::generate("cluster.local")?;
        let (cert, key) = ca.issue_server(&["127.0.0.1".to_string()], Duration::from_secs(3600))?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), ca.cert_pem())?;
        std::fs::write(dir.join("token"), format!("{TOKEN}\n"))?;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let objects: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
        let asked: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (objs, log) = (objects.clone(), asked.clone());
        netns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
                let _ = ready_tx.send(listener.local_addr()?.port());
                let serve = async {
                    loop {
                        let Ok((tcp, _)) = listener.accept().await else {
                            continue;
                        };
                        let (acceptor, objs, log) = (acceptor.clone(), objs.clone(), log.clone());
                        tokio::spawn(async move {
                            let Ok(tls) = acceptor.accept(tcp).await else {
                                return;
                            };
                            let service = hyper::service::service_fn(
                                move |req: hyper::Request<hyper::body::Incoming>| {
                                    let path = req.uri().path().to_string();
                                    let authorized = req
                                        .headers()
                                        .get("authorization")
                                        .is_some_and(|v| v == format!("Bearer {TOKEN}").as_str());
                                    log.lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .push((path.clone(), authorized));
                                    let found = objs
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .get(&path)
                                        .cloned();
                                    let (status, body) = match (authorized, found) {
                                        (false, _) => {
                                            (401, r#"{"kind":"Status","code":401}"#.to_string())
                                        }
                                        (true, Some(v)) => (200, v.to_string()),
                                        (true, None) => {
                                            (404, r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#.to_string())
                                        }
                                    };
                                    async move {
                                        let mut resp = hyper::Response::new(Full::new(
                                            bytes::Bytes::from(body),
                                        ));
                                        *resp.status_mut() = hyper::StatusCode::from_u16(status)
                                            .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
                                        Ok::<_, std::convert::Infallible>(resp)
                                    }
                                },
                            );
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    () = serve => {}
                    _ = stop_rx => {}
                }
                Ok::<_, anyhow::Error>(())
            })
        })?;
        let port = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the fake API server did not start")?;
        Ok(FakeApi {
            port,
            sa_dir: dir.to_path_buf(),
            objects,
            asked,
            _stop: stop_tx,
        })
    }

    /// Serves `object` at `path` (None: removes it, 404).
    pub fn set(&self, path: &str, object: Option<Value>) {
        let mut objects = self.objects.lock().unwrap_or_else(|p| p.into_inner());
        match object {
            Some(o) => objects.insert(path.to_string(), o),
            None => objects.remove(path),
        };
    }

    /// The env that points ztunnel here, as a pod in `namespace` of
    /// DaemonSet `daemonset`.
    pub fn ztunnel_env(&self, namespace: &str, daemonset: &str) -> Vec<(String, String)> {
        [
            ("KUBERNETES_SERVICE_HOST", "127.0.0.1".to_string()),
            ("KUBERNETES_SERVICE_PORT", self.port.to_string()),
            ("KUBERNETES_SA_DIR", self.sa_dir.display().to_string()),
            ("POD_NAMESPACE", namespace.to_string()),
            ("DAEMONSET_NAME", daemonset.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}
