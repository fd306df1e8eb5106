//! Workload certificates: one per identity, never shared between identities,
//! renewed at half-life, and the TLS configs built from them.
//!
//! Today certificates come from a local development CA (a root key on disk);
//! the controller's CA replaces it with the xDS issue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;
use tracing::info;
use weft_api::Identity;
use weft_hbone::ca::{Ca, CaError, IssuedCert};
use weft_hbone::tls::{self, TlsError, TrustRoots};

/// Issues and caches certificates and TLS configs per identity.
#[derive(Debug)]
pub struct CertManager {
    ca: Ca,
    roots: TrustRoots,
    ttl: Duration,
    certs: Mutex<HashMap<Identity, Arc<Issued>>>,
}

/// A certificate with the TLS configs made from it.
#[derive(Debug)]
struct Issued {
    cert: IssuedCert,
    /// Renew from here on: half of the lifetime counted from issuance (the
    /// certificate's notBefore is backdated for clock skew, so not from there).
    renew_at: SystemTime,
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
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// === impl CertManager ===

impl CertManager {
    pub fn new(ca: Ca, ttl: Duration) -> Result<Self, IdentityError> {
        let roots = TrustRoots::from_pem(ca.cert_pem())?;
        Ok(CertManager {
            ca,
            roots,
            ttl,
            certs: Mutex::new(HashMap::new()),
        })
    }

    /// The mesh trust roots.
    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    fn issued(&self, id: &Identity) -> Result<Arc<Issued>, IdentityError> {
        let mut certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(issued) = certs.get(id)
            && SystemTime::now() < issued.renew_at
        {
            return Ok(issued.clone());
        }
        // Issuing with the local CA is a few hundred microseconds; holding the
        // lock keeps concurrent first connections from issuing twice.
        let now = SystemTime::now();
        let cert = self.ca.issue(id, self.ttl)?;
        let renew_at = now + cert.not_after.duration_since(now).unwrap_or_default() / 2;
        let server = tls::server_config(&cert, &self.roots)?;
        info!(
            component = "identity",
            identity = %id,
            expires = unix(cert.not_after),
            "workload certificate issued"
        );
        let issued = Arc::new(Issued {
            cert,
            renew_at,
            server,
            clients: Mutex::new(HashMap::new()),
        });
        certs.insert(id.clone(), issued.clone());
        Ok(issued)
    }

    /// Server config presenting `id`'s certificate (inbound HBONE).
    pub fn server_config(&self, id: &Identity) -> Result<Arc<ServerConfig>, IdentityError> {
        Ok(self.issued(id)?.server.clone())
    }

    /// Client config presenting `src`'s certificate and accepting only `dst`.
    pub fn client_config(
        &self,
        src: &Identity,
        dst: &Identity,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let issued = self.issued(src)?;
        let mut clients = issued.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cfg) = clients.get(dst) {
            return Ok(cfg.clone());
        }
        let cfg = tls::client_config(&issued.cert, &self.roots, vec![dst.clone()])?;
        clients.insert(dst.clone(), cfg.clone());
        Ok(cfg)
    }

    /// Issues certificates for `ids` now, so the first connection does not wait.
    pub fn prefetch<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a Identity>,
    ) -> Result<(), IdentityError> {
        for id in ids {
            self.issued(id)?;
        }
        Ok(())
    }

    /// Certificates held, for the config dump.
    pub fn dump(&self) -> Vec<CertInfo> {
        let certs = self.certs.lock().unwrap_or_else(|p| p.into_inner());
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
    #[test]
    fn per_identity_and_renewal() {
        let ca = Ca::generate("cluster.local").unwrap();
        let certs = CertManager::new(ca, Duration::from_secs(2)).unwrap();
        let a = Identity::new("cluster.local", "ns", "a").unwrap();
        let b = Identity::new("cluster.local", "ns", "b").unwrap();
        let first = certs.server_config(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &certs.server_config(&a).unwrap()));
        assert!(!Arc::ptr_eq(&first, &certs.server_config(&b).unwrap()));
        assert_eq!(certs.dump().len(), 2);
        std::thread::sleep(Duration::from_millis(1100));
        let again = certs.server_config(&a).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
    }
}
