//! The mesh CA: a root (or a user's intermediate) persisted in a directory,
//! signing workload certificates for the node agents entitled to them.
//!
//! Directory layout, as Istio's `cacerts` plug-in: `ca-cert.pem`, `ca-key.pem`,
//! `root-cert.pem` and optionally `cert-chain.pem` for a user-supplied
//! intermediate; otherwise `root-cert.pem` and `root-key.pem`, generated on
//! first start.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use tracing::info;
use weft_hbone::ca::{Ca, CaError, SignedCert, VerifiedCsr};

/// The CA and the chain that goes with every certificate it signs.
#[derive(Debug)]
pub struct MeshCa {
    ca: Ca,
    /// Intermediates between the signing CA and the root (the signing CA
    /// itself included when it is not the root), leaf side first.
    intermediates: Vec<String>,
    root_pem: String,
    max_ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MeshCaError {
    #[error("CA directory {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("CA directory {0}: {1}")]
    Layout(String, String),
}

/// Splits concatenated PEM certificates into one string per certificate.
pub fn split_pem(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in pem.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

// === impl MeshCa ===

impl MeshCa {
    /// Loads the CA from `dir`, or generates a root there on first start.
    pub fn load_or_generate(
        dir: &Path,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<Self, MeshCaError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| MeshCaError::Io { path, source }
        };
        let files: BTreeMap<String, String> = [
            "ca-cert.pem",
            "ca-key.pem",
            "root-cert.pem",
            "root-key.pem",
            "cert-chain.pem",
        ]
        .into_iter()
        .filter_map(|name| {
            let p = dir.join(name);
            p.exists().then(|| {
                fs::read_to_string(&p)
                    .map(|t| (name.to_string(), t))
                    .map_err(io(&p))
            })
        })
        .collect::<Result<_, _>>()?;
        if let Some(ca) = Self::from_files(&files, &dir.display().to_string(), max_ttl)? {
            return Ok(ca);
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let (ca, files) = Self::generate(trust_domain, max_ttl)?;
        for (name, text) in &files {
            let path = dir.join(name);
            fs::write(&path, text).map_err(io(&path))?;
            if name.ends_with("key.pem") {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
            }
        }
        info!(dir = %dir.display(), "mesh CA: generated a new root");
        Ok(ca)
    }

    /// The CA in `files` (file name → PEM, from a directory or a Secret named
    /// `place`), if they hold one: Istio's `cacerts` layout (`ca-cert.pem`,
    /// `ca-key.pem`, `root-cert.pem`, optional `cert-chain.pem`), or a root
    /// (`root-cert.pem`, `root-key.pem`).
    pub fn from_files(
        files: &BTreeMap<String, String>,
        place: &str,
        max_ttl: Duration,
    ) -> Result<Option<Self>, MeshCaError> {
        let get = |name: &str| files.get(name).filter(|t| !t.trim().is_empty());
        let layout = |m: &str| Err(MeshCaError::Layout(place.to_string(), m.to_string()));
        if get("ca-cert.pem").is_some() || get("ca-key.pem").is_some() {
            let (Some(cert), Some(key), Some(root_pem)) =
                (get("ca-cert.pem"), get("ca-key.pem"), get("root-cert.pem"))
            else {
                return layout("a plugged-in CA needs ca-cert.pem, ca-key.pem and root-cert.pem");
            };
            let ca = Ca::from_pem(cert, key)?;
            // cert-chain.pem runs from the signing CA to the root; the root is sent separately.
            let chain = get("cert-chain.pem").unwrap_or(cert);
            let root = split_pem(root_pem);
            let intermediates = split_pem(chain)
                .into_iter()
                .filter(|c| !root.contains(c))
                .collect();
            info!(%place, "mesh CA: plugged-in intermediate");
            return Ok(Some(MeshCa {
                ca,
                intermediates,
                root_pem: root_pem.clone(),
                max_ttl,
            }));
        }
        if let (Some(root_pem), Some(key)) = (get("root-cert.pem"), get("root-key.pem")) {
            let ca = Ca::from_pem(root_pem, key)?;
            info!(%place, "mesh CA: existing root");
            return Ok(Some(MeshCa {
                ca,
                intermediates: Vec::new(),
                root_pem: root_pem.clone(),
                max_ttl,
            }));
        }
        Ok(None)
    }

    /// A new self-signed root, and the files that persist it.
    pub fn generate(
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<(Self, BTreeMap<String, String>), MeshCaError> {
        let ca = Ca::generate(trust_domain)?;
        let root_pem = ca.cert_pem().to_string();
        let files = BTreeMap::from([
            ("root-cert.pem".to_string(), root_pem.clone()),
            ("root-key.pem".to_string(), ca.key_pem().to_string()),
        ]);
        let mesh = MeshCa {
            ca,
            intermediates: Vec::new(),
            root_pem,
            max_ttl,
        };
        Ok((mesh, files))
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Signs `csr` (its identity already authorized by the caller) and
    /// returns Istio's chain: leaf first, intermediates, root last.
    pub fn sign(
        &self,
        csr: &VerifiedCsr,
        ttl: Duration,
    ) -> Result<(SignedCert, Vec<String>), CaError> {
        let ttl = ttl.min(self.max_ttl);
        let signed = self.ca.sign_csr(csr, ttl)?;
        let mut chain = vec![signed.cert_pem.clone()];
        chain.extend(self.intermediates.iter().cloned());
        chain.push(self.root_pem.clone());
        Ok((signed, chain))
    }

    /// The control plane's own serving certificate chain and key.
    pub fn serving_cert(&self, names: &[String]) -> Result<(String, String), CaError> {
        let (cert, key) = self
            .ca
            .issue_server(names, Duration::from_secs(365 * 24 * 3600))?;
        let mut chain = cert.cert_pem;
        for c in &self.intermediates {
            chain.push_str(c);
        }
        Ok((chain, key))
    }
}

#[cfg(test)]
mod tests {
    use weft_api::Identity;
    use weft_hbone::ca::CertRequest;

    use super::*;

    /// First start generates and persists a root; the second start reuses it;
    /// a half plugged-in CA is refused with what is missing.
    #[test]
    fn persisted_root() {
        let dir = std::env::temp_dir().join(format!("weft-ca-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ttl = Duration::from_secs(3600);
        let first = MeshCa::load_or_generate(&dir, "cluster.local", ttl).unwrap();
        let mode = fs::metadata(dir.join("root-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = MeshCa::load_or_generate(&dir, "cluster.local", ttl).unwrap();
        assert_eq!(first.root_pem(), second.root_pem());

        let id = Identity::new("cluster.local", "shop", "web").unwrap();
        let req = CertRequest::new(&id).unwrap();
        let csr = VerifiedCsr::from_pem(&req.csr_pem).unwrap();
        let (signed, chain) = second
            .sign(&csr, Duration::from_secs(10 * 24 * 3600))
            .unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1], first.root_pem());
        let life = signed.not_after.duration_since(signed.not_before).unwrap();
        assert_eq!(
            life,
            ttl + Duration::from_secs(60),
            "clamped to the maximum"
        );

        fs::write(dir.join("ca-cert.pem"), first.root_pem()).unwrap();
        let err = MeshCa::load_or_generate(&dir, "cluster.local", ttl).unwrap_err();
        assert!(err.to_string().contains("ca-key.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A user's intermediate (Istio's `cacerts` layout) signs leaves that
    /// chain through it to the root, and the chain sent is leaf, intermediate, root.
    #[test]
    fn plugged_in_intermediate() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, UnixTime};

        let dir = std::env::temp_dir().join(format!("weft-ca-int-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let ca_params = || {
            let mut p = CertificateParams::default();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            p
        };
        let root_key = KeyPair::generate().unwrap();
        let root = ca_params().self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(ca_params(), root_key);
        let int_key = KeyPair::generate().unwrap();
        let int = ca_params().signed_by(&int_key, &root_issuer).unwrap();
        fs::write(dir.join("root-cert.pem"), root.pem()).unwrap();
        fs::write(dir.join("ca-cert.pem"), int.pem()).unwrap();
        fs::write(dir.join("ca-key.pem"), int_key.serialize_pem()).unwrap();
        fs::write(
            dir.join("cert-chain.pem"),
            format!("{}{}", int.pem(), root.pem()),
        )
        .unwrap();

        let ca = MeshCa::load_or_generate(&dir, "cluster.local", Duration::from_secs(600)).unwrap();
        let id = Identity::new("cluster.local", "shop", "web").unwrap();
        let csr = VerifiedCsr::from_pem(&CertRequest::new(&id).unwrap().csr_pem).unwrap();
        let (_, chain) = ca.sign(&csr, Duration::from_secs(600)).unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        assert_eq!(
            (chain[1].as_str(), chain[2].as_str()),
            (int.pem().as_str(), root.pem().as_str())
        );
        assert!(
            !dir.join("root-key.pem").exists(),
            "a plugged-in CA never generates a root"
        );

        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der(&chain[2])).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&der(&chain[0]), &[der(&chain[1])], UnixTime::now())
            .expect("the leaf chains through the intermediate to the root");
        fs::remove_dir_all(&dir).unwrap();
    }
}
