//! On SIGTERM: a rollout, or ztunnel leaving this node for good?
//!
//! A rollout must keep capture (the next ztunnel adopts it; until then
//! captured pods' traffic is dropped, never sent in plaintext). A removal
//! (`helm uninstall`, or the node no longer selected by the DaemonSet) must
//! take capture away, or the node's captured pods would be cut off with no
//! proxy to serve them. As istio-cni does, ztunnel asks the API server
//! whether its DaemonSet still exists and still selects this node. When it
//! cannot tell (no API server configured, a failed request), it keeps
//! capture: the safe side.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use serde_json::Value;
use tokio_rustls::TlsConnector;
use tracing::debug;

/// In-cluster access to the API server, as every pod gets it.
pub const ENV_HOST: &str = "KUBERNETES_SERVICE_HOST";
pub const ENV_PORT: &str = "KUBERNETES_SERVICE_PORT";
/// The DaemonSet this ztunnel belongs to: `POD_NAMESPACE` / `DAEMONSET_NAME`.
pub const ENV_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_DAEMONSET: &str = "DAEMONSET_NAME";
/// The pod's service account credentials (`KUBERNETES_SA_DIR` moves them).
pub const ENV_SA_DIR: &str = "KUBERNETES_SA_DIR";
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Each question to the API server gets this long.
const TIMEOUT: Duration = Duration::from_secs(3);

/// What to do with capture on the way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it: a successor takes over (or we cannot tell).
    Keep(String),
    /// Remove it: no ztunnel will serve this node again.
    Remove(String),
}

/// How to ask the API server about this ztunnel's DaemonSet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterAccess {
    /// `host:port`.
    pub api: String,
    pub host: String,
    pub token: PathBuf,
    pub ca: PathBuf,
    pub namespace: String,
    pub daemonset: String,
    pub node: String,
}

impl ClusterAccess {
    /// From the pod's environment; none outside Kubernetes.
    pub fn from_env(get: &dyn Fn(&str) -> Option<String>, node: &str) -> Option<Self> {
        let host = get(ENV_HOST).filter(|h| !h.is_empty())?;
        let port = get(ENV_PORT).unwrap_or_else(|| "443".into());
        let namespace = get(ENV_NAMESPACE).filter(|n| !n.is_empty())?;
        let daemonset = get(ENV_DAEMONSET).filter(|n| !n.is_empty())?;
        let dir = PathBuf::from(get(ENV_SA_DIR).unwrap_or_else(|| SA_DIR.into()));
        let api = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Some(ClusterAccess {
            api,
            host,
            token: dir.join("token"),
            ca: dir.join("ca.crt"),
            namespace,
            daemonset,
            node: node.to_string(),
        })
    }

    /// Asks, and decides.
    pub async fn check(&self) -> Verdict {
        let ds = format!(
            "/apis/apps/v1/namespaces/{}/daemonsets/{}",
            self.namespace, self.daemonset
        );
        let daemonset = match self.get(&ds).await {
            Ok(d) => d,
            Err(e) => return Verdict::Keep(format!("cannot tell ({e})")),
        };
        let node = if daemonset.is_some() {
            match self.get(&format!("/api/v1/nodes/{}", self.node)).await {
                Ok(n) => n,
                Err(e) => return Verdict::Keep(format!("cannot tell ({e})")),
            }
        } else {
            None
        };
        decide(daemonset.as_ref(), node.as_ref())
    }

    /// GET `path`: the object, or None when it does not exist (404).
    async fn get(&self, path: &str) -> Result<Option<Value>, String> {
        tokio::time::timeout(TIMEOUT, self.get_inner(path))
            .await
            .map_err(|_| format!("GET {path}: timed out"))?
    }

    async fn get_inner(&self, path: &str) -> Result<Option<Value>, String> {
        let token = std::fs::read_to_string(&self.token)
            .map_err(|e| format!("{}: {e}", self.token.display()))?;
        let ca = std::fs::read(&self.ca).map_err(|e| format!("{}: {e}", self.ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile_certs(&ca)? {
            roots.add(cert).map_err(|e| format!("CA: {e}"))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| format!("{}: {e}", self.host))?;
        let tcp = tokio::net::TcpStream::connect(&self.api)
            .await
            .map_err(|e| format!("{}: {e}", self.api))?;
        let tls = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {}: {e}", self.api))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "API server connection ended");
            }
        });
        let req = http::Request::get(path)
            .header("host", &self.host)
            .header("authorization", format!("Bearer {}", token.trim()))
            .header("accept", "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("GET {path}: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("GET {path}: {e}"))?
            .to_bytes();
        match status.as_u16() {
            200 => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| format!("GET {path}: {e}")),
            // Only the API server's own word that the object does not exist:
            // a 404 from a server still starting (its API group not yet
            // served) is no answer.
            404 if not_found(&body) => Ok(None),
            s => Err(format!("GET {path}: HTTP {s}")),
        }
    }
}

/// A `Status` that says NotFound.
fn not_found(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|v| v["kind"] == "Status" && v["reason"] == "NotFound")
}

fn rustls_pemfile_certs(
    pem: &[u8],
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA: {e}"))?;
    if certs.is_empty() {
        return Err("CA: no certificate".into());
    }
    Ok(certs)
}

/// The DaemonSet (absent: deleted) and the node: remove capture when the
/// DaemonSet is gone or going, or no longer selects the node by its
/// `nodeSelector`.
pub fn decide(daemonset: Option<&Value>, node: Option<&Value>) -> Verdict {
    let Some(ds) = daemonset else {
        return Verdict::Remove("the DaemonSet no longer exists".into());
    };
    if !ds["metadata"]["deletionTimestamp"].is_null() {
        return Verdict::Remove("the DaemonSet is being deleted".into());
    }
    let Some(node) = node else {
        // The node's pods go with it: nothing to release.
        return Verdict::Keep("the node is not known to the API server".into());
    };
    let labels: BTreeMap<&str, &str> = node["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
        .collect();
    let selector = &ds["spec"]["template"]["spec"]["nodeSelector"];
    for (k, v) in selector.as_object().into_iter().flatten() {
        if labels.get(k.as_str()) != v.as_str().as_ref() {
            return Verdict::Remove(format!(
                "the DaemonSet no longer selects this node ({k}={})",
                v.as_str().unwrap_or_default()
            ));
        }
    }
    Verdict::Keep("the DaemonSet still selects this node: a rollout".into())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rollout_or_removal() {
        let ds = json!({"metadata": {"name": "ztunnel"},
            "spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}}});
        let node = json!({"metadata": {"name": "n1", "labels": {"kubernetes.io/os": "linux", "zone": "a"}}});
        assert!(matches!(decide(Some(&ds), Some(&node)), Verdict::Keep(_)));
        assert_eq!(
            decide(None, None),
            Verdict::Remove("the DaemonSet no longer exists".into())
        );
        let mut deleting = ds.clone();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-12-06T00:00:00Z");
        assert!(
            matches!(decide(Some(&deleting), Some(&node)), Verdict::Remove(m) if m.contains("being deleted"))
        );
        let windows = json!({"metadata": {"labels": {"kubernetes.io/os": "windows"}}});
        assert!(
            matches!(decide(Some(&ds), Some(&windows)), Verdict::Remove(m) if m.contains("no longer selects"))
        );
        let unlabelled = json!({"metadata": {"name": "n1"}});
        assert!(matches!(
            decide(Some(&ds), Some(&unlabelled)),
            Verdict::Remove(_)
        ));
        assert!(matches!(decide(Some(&ds), None), Verdict::Keep(_)));
        assert!(not_found(
            br#"{"kind":"Status","reason":"NotFound","code":404}"#
        ));
        assert!(!not_found(b"404 page not found"));
        // No selector: every node.
        let everywhere = json!({"spec": {"template": {"spec": {}}}});
        assert!(matches!(
            decide(Some(&everywhere), Some(&unlabelled)),
            Verdict::Keep(_)
        ));
    }

    #[test]
    fn access_from_the_pod_environment() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(ClusterAccess::from_env(&env(&[]), "n1"), None);
        let a = ClusterAccess::from_env(
            &env(&[
                (ENV_HOST, "10.96.0.1"),
                (ENV_PORT, "443"),
                (ENV_NAMESPACE, "weft-system"),
                (ENV_DAEMONSET, "ztunnel"),
            ]),
            "n1",
        )
        .unwrap();
        assert_eq!(a.api, "10.96.0.1:443");
        assert_eq!(a.token, PathBuf::from(SA_DIR).join("token"));
        let v6 = ClusterAccess::from_env(
            &env(&[
                (ENV_HOST, "fd00::1"),
                (ENV_NAMESPACE, "weft-system"),
                (ENV_DAEMONSET, "ztunnel"),
            ]),
            "n1",
        )
        .unwrap();
        assert_eq!(v6.api, "[fd00::1]:443");
    }
}
