//! Workload certificates: one per identity, never shared between identities,
//! renewed at half-life, and the TLS configs built from them.
//!
//! Certificates come from the mesh CA (the controller) over gRPC, the key
//! never leaving this node; or, in development mode, from a local CA key.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost_types::{Struct, Value, value::Kind};
use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;
use tonic::transport::Channel;
use tracing::{info, warn};
use weft_api::Identity;
use weft_hbone::ca::{Ca, CaError, CertRequest, IssuedCert};
use weft_hbone::tls::{self, TlsError, TrustRoots};
use weft_xds::proto::ca::IstioCertificateRequest;

/// Where certificates come from.
#[derive(Debug)]
pub enum Signer {
    /// Development mode: a CA key on this node.
    Local(Box<Ca>),
    /// The mesh CA (the controller), over gRPC with this node's token.
    Remote {
        channel: Channel,
        token_path: PathBuf,
    },
}

/// Issues and caches certificates and TLS configs per identity.
#[derive(Debug)]
pub struct CertManager {
    signer: Signer,
    /// Mesh roots, PEM: the configured ones plus any the CA has sent.
    roots_pem: Mutex<BTreeSet<String>>,
    roots: Mutex<TrustRoots>,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<Issued>>>,
    /// Held while asking the signer, so concurrent first connections ask once.
    issuing: tokio::sync::Mutex<()>,
}

/// A certificate with the TLS configs made from it.
#[derive(Debug)]
struct Issued {
    cert: IssuedCert,
    /// Renew from here on: half of the lifetime counted from issuance (the
    /// certificate's notBefore is backdated for clock skew, so not from there).
    renew_at: SystemTime,
    roots: TrustRoots,
    server: Arc<ServerConfig>,
    clients: Mutex<HashMap<Identity, Arc<ClientConfig>>>,
}

/// What the admin config dump shows of a certificate.
#[derive(Debug, Serialize)]
pub struct CertInfo {
    pub identity: String,
    pub not_before: u64,
    pub not_after: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot read the node token {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mesh CA refused {identity}: {status}")]
    Refused { identity: String, status: String },
    #[error("mesh CA answered for {identity} with an unusable chain: {why}")]
    BadChain { identity: String, why: String },
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// === impl CertManager ===

impl CertManager {
    /// `roots_pem`: the mesh roots to trust from the start (the local CA's
    /// certificate, or the root file a node agent is given).
    pub fn new(signer: Signer, roots_pem: &str, ttl: Duration) -> Result<Self, IdentityError> {
        let roots = TrustRoots::from_pem(roots_pem)?;
        Ok(CertManager {
            signer,
            roots_pem: Mutex::new(BTreeSet::from([roots_pem.to_string()])),
            roots: Mutex::new(roots),
            ttl,
            certs: Mutex::new(HashMap::new()),
            issuing: tokio::sync::Mutex::new(()),
        })
    }

    /// Every mesh root trusted now, PEM: the configured ones and those the CA sent.
    pub fn trusted_pem(&self) -> String {
        lock(&self.roots_pem)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The mesh trust roots.
    pub fn roots(&self) -> TrustRoots {
        lock(&self.roots).clone()
    }

    /// The cached certificate for `id`, while it is valid; else a new one.
    async fn issued(&self, id: &Identity) -> Result<Arc<Issued>, IdentityError> {
        let valid = |i: &Arc<Issued>| SystemTime::now() < i.cert.not_after;
        if let Some(i) = lock(&self.certs).get(id).filter(|i| valid(i)) {
            return Ok(i.clone());
        }
        let _guard = self.issuing.lock().await;
        if let Some(i) = lock(&self.certs).get(id).filter(|i| valid(i)) {
            return Ok(i.clone());
        }
        self.issue(id).await
    }

    /// Asks the signer for a new certificate for `id` and caches it.
    async fn issue(&self, id: &Identity) -> Result<Arc<Issued>, IdentityError> {
        let now = SystemTime::now();
        let cert = match &self.signer {
            Signer::Local(ca) => ca.issue(id, self.ttl)?,
            Signer::Remote {
                channel,
                token_path,
            } => self.issue_remote(id, channel.clone(), token_path).await?,
        };
        let renew_at = now + cert.not_after.duration_since(now).unwrap_or_default() / 2;
        let roots = self.roots();
        let server = tls::server_config(&cert, &roots)?;
        info!(
            component = "identity",
            identity = %id,
            expires = unix(cert.not_after),
            "workload certificate issued"
        );
        let issued = Arc::new(Issued {
            cert,
            renew_at,
            roots,
            server,
            clients: Mutex::new(HashMap::new()),
        });
        lock(&self.certs).insert(id.clone(), issued.clone());
        Ok(issued)
    }

    async fn issue_remote(
        &self,
        id: &Identity,
        channel: Channel,
        token_path: &PathBuf,
    ) -> Result<IssuedCert, IdentityError> {
        let token = std::fs::read_to_string(token_path).map_err(|source| IdentityError::Token {
            path: token_path.display().to_string(),
            source,
        })?;
        let req = CertRequest::new(id)?;
        // As Istio's node agent: name the identity asked for on the pod's behalf.
        let metadata = Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            )]
            .into(),
        };
        let request = IstioCertificateRequest {
            csr: req.csr_pem.clone(),
            validity_duration: i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        };
        let resp = weft_xds::grpc::create_certificate(channel, token.trim(), request)
            .await
            .map_err(|s| IdentityError::Refused {
                identity: id.to_string(),
                status: format!("{:?}: {}", s.code(), s.message()),
            })?;
        let bad = |why: String| IdentityError::BadChain {
            identity: id.to_string(),
            why,
        };
        let chain = resp.cert_chain;
        if chain.len() < 2 {
            return Err(bad(format!(
                "{} certificates; want at least leaf and root",
                chain.len()
            )));
        }
        let (leaf_and_intermediates, root) = chain.split_at(chain.len() - 1);
        let chain_pem = leaf_and_intermediates.concat();
        let (not_before, not_after, got) =
            tls::leaf_info(&chain_pem).map_err(|e| bad(e.to_string()))?;
        if &got != id {
            return Err(bad(format!("the leaf is for {got}")));
        }
        self.add_root(&root[0])?;
        Ok(IssuedCert {
            identity: id.clone(),
            chain_pem,
            key_pem: req.key_pem,
            not_before,
            not_after,
        })
    }

    /// Trusts `pem` as a mesh root too (root rotation: old and new side by side).
    fn add_root(&self, pem: &str) -> Result<(), IdentityError> {
        let mut set = lock(&self.roots_pem);
        if set.contains(pem) || set.iter().any(|r| r.contains(pem.trim())) {
            return Ok(());
        }
        let all: String = set
            .iter()
            .map(String::as_str)
            .chain([pem])
            .collect::<Vec<_>>()
            .join("\n");
        let roots = TrustRoots::from_pem(&all)?;
        set.insert(pem.to_string());
        *lock(&self.roots) = roots;
        info!(
            component = "identity",
            roots = set.len(),
            "mesh trust roots updated"
        );
        Ok(())
    }

    /// Server config presenting `id`'s certificate (inbound HBONE).
    pub async fn server_config(&self, id: &Identity) -> Result<Arc<ServerConfig>, IdentityError> {
        Ok(self.issued(id).await?.server.clone())
    }

    /// Client config presenting `src`'s certificate and accepting only `dst`.
    pub async fn client_config(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let issued = self.issued(src).await?;
        let mut clients = lock(&issued.clients);
        if let Some(cfg) = clients.get(dst) {
            return Ok(cfg.clone());
        }
        let cfg = tls::client_config(&issued.cert, &issued.roots, vec![dst.clone()])?;
        clients.insert(dst.clone(), cfg.clone());
        Ok(cfg)
    }

    /// Issues certificates for `ids` now, so the first connection does not wait.
    pub async fn prefetch(&self, ids: impl IntoIterator<Item = Identity>) {
        for id in ids {
            if let Err(e) = self.issued(&id).await {
                warn!(component = "identity", identity = %id, error = %e, "cannot get a certificate; will retry");
            }
        }
    }

    /// Renews every certificate past its half-life. A failed renewal keeps
    /// the current certificate (it is still valid) and is retried next time.
    /// Connections already open are never touched: TLS sessions outlive the
    /// certificate that set them up.
    pub async fn renew_due(&self) {
        let now = SystemTime::now();
        let due: Vec<Identity> = lock(&self.certs)
            .iter()
            .filter(|(_, i)| now >= i.renew_at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let _guard = self.issuing.lock().await;
            if let Err(e) = self.issue(&id).await {
                warn!(component = "identity", identity = %id, error = %e, "renewal failed; keeping the current certificate");
            }
        }
    }

    /// Drops certificates of identities no longer on this node.
    pub fn retain(&self, keep: &BTreeSet<Identity>) {
        lock(&self.certs).retain(|id, _| keep.contains(id));
    }

    /// Certificates held, for the config dump.
    pub fn dump(&self) -> Vec<CertInfo> {
        let certs = lock(&self.certs);
        let mut out: Vec<CertInfo> = certs
            .values()
            .map(|i| CertInfo {
                identity: i.cert.identity.to_string(),
                not_before: unix(i.cert.not_before),
                not_after: unix(i.cert.not_after),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Certificates are per identity, cached until half-life, then renewed.
    #[tokio::test]
    async fn per_identity_and_renewal() {
        let ca = Ca::generate("cluster.local").unwrap();
        let root = ca.cert_pem().to_string();
        let certs =
            CertManager::new(Signer::Local(Box::new(ca)), &root, Duration::from_secs(2)).unwrap();
        let a = Identity::new("cluster.local", "ns", "a").unwrap();
        let b = Identity::new("cluster.local", "ns", "b").unwrap();
        let first = certs.server_config(&a).await.unwrap();
        assert!(Arc::ptr_eq(&first, &certs.server_config(&a).await.unwrap()));
        assert!(!Arc::ptr_eq(
            &first,
            &certs.server_config(&b).await.unwrap()
        ));
        assert_eq!(certs.dump().len(), 2);
        certs.renew_due().await;
        assert!(
            Arc::ptr_eq(&first, &certs.server_config(&a).await.unwrap()),
            "not due yet"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        certs.renew_due().await;
        let again = certs.server_config(&a).await.unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
    }
}
