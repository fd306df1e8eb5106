//! A certificate authority for SPIFFE workload certificates.
//!
//! Used by ztunnel's development mode (a root key on disk) and by the controller's
//! mesh CA. Certificates are ECDSA P-256 with exactly one URI SAN, the identity.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use weft_api::Identity;

/// A signing CA: root (or intermediate) certificate and key.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A leaf certificate with its private key, ready for TLS.
#[derive(Clone)]
pub struct IssuedCert {
    pub identity: Identity,
    /// Leaf first, then the CA chain up to (not including) the root.
    pub chain_pem: String,
    pub key_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("CA key or certificate is invalid: {0}")]
    Invalid(#[source] rcgen::Error),
    #[error("cannot issue certificate for {identity}: {source}")]
    Issue {
        identity: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate request is invalid: {0}")]
    BadCsr(#[source] rcgen::Error),
    #[error("certificate request asks for {got}, not {want}")]
    CsrIdentity { got: String, want: String },
}

/// A key and a PEM certificate request for a workload identity, made where
/// the key stays (ztunnel); the CA sees only the request.
pub struct CertRequest {
    pub identity: Identity,
    pub csr_pem: String,
    pub key_pem: String,
}

/// A certificate signed from a request.
#[derive(Clone, Debug)]
pub struct SignedCert {
    pub cert_pem: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

fn workload_params(
    identity: &Identity,
    ttl: Duration,
) -> Result<(CertificateParams, SystemTime, SystemTime), rcgen::Error> {
    let uri = rcgen::string::Ia5String::try_from(identity.to_string())?;
    let mut params = CertificateParams::default();
    // Istio workload certificates carry no subject; the identity is the URI SAN.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let (not_before, not_after) = set_validity(&mut params, ttl);
    Ok((params, not_before, not_after))
}

/// Valid from a minute ago (clock skew between nodes) for `ttl` from now.
fn set_validity(params: &mut CertificateParams, ttl: Duration) -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    let not_before = now - Duration::from_secs(60);
    let not_after = now + ttl;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    (not_before, not_after)
}

// === impl CertRequest ===

impl CertRequest {
    /// A fresh ECDSA P-256 key and a request with the identity as its one URI SAN.
    pub fn new(identity: &Identity) -> Result<Self, CaError> {
        let err = |source| CaError::Issue {
            identity: identity.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let uri = rcgen::string::Ia5String::try_from(identity.to_string()).map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr = params.serialize_request(&key).map_err(err)?;
        Ok(CertRequest {
            identity: identity.clone(),
            csr_pem: csr.pem().map_err(err)?,
            key_pem: key.serialize_pem(),
        })
    }
}

impl std::fmt::Debug for CertRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRequest")
            .field("identity", &self.identity.to_string())
            .finish_non_exhaustive()
    }
}

// === impl Ca ===

impl Ca {
    /// Generates a self-signed root for `trust_domain`, valid ten years.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate().map_err(CaError::Invalid)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "Weft mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
        let cert = params.self_signed(&key).map_err(CaError::Invalid)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_pem,
        })
    }

    /// Loads a CA from PEM text.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Invalid)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(CaError::Invalid)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    /// Loads a CA from a certificate file and a key file.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| CaError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        Ca::from_pem(&read(cert)?, &read(key)?)
    }

    /// Signs a workload certificate from a verified request. Only its key and
    /// identity are used: the certificate gets the workload profile and
    /// `ttl`, whatever else was asked. Whether the asker is entitled to the
    /// identity is the caller's decision.
    pub fn sign_csr(&self, csr: &VerifiedCsr, ttl: Duration) -> Result<SignedCert, CaError> {
        let identity = &csr.identity;
        let err = |source| CaError::Issue {
            identity: identity.to_string(),
            source,
        };
        let (params, not_before, not_after) = workload_params(identity, ttl).map_err(err)?;
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        }
        .signed_by(&self.issuer)
        .map_err(err)?;
        Ok(SignedCert {
            cert_pem: signed.pem(),
            not_before,
            not_after,
        })
    }

    /// A serving certificate for the control plane: DNS names and IPs as SANs.
    pub fn issue_server(
        &self,
        names: &[String],
        ttl: Duration,
    ) -> Result<(SignedCert, String), CaError> {
        let err = |source| CaError::Issue {
            identity: names.join(","),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(err)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = set_validity(&mut params, ttl);
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let signed = SignedCert {
            cert_pem: cert.pem(),
            not_before,
            not_after,
        };
        Ok((signed, key.serialize_pem()))
    }

    /// The CA certificate, PEM: what peers put in their trust store.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM: for persisting a generated CA.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a fresh key and certificate for `identity`, valid for `ttl`.
    pub fn issue(&self, identity: &Identity, ttl: Duration) -> Result<IssuedCert, CaError> {
        let err = |source| CaError::Issue {
            identity: identity.to_string(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let (params, not_before, not_after) = workload_params(identity, ttl).map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(IssuedCert {
            identity: identity.clone(),
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_before,
            not_after,
        })
    }
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// A certificate request whose signature verified (the asker holds the
/// key) and the one SPIFFE identity it names.
#[derive(Clone, Debug)]
pub struct VerifiedCsr {
    identity: Identity,
    public_key: rcgen::PublicKey,
}

impl VerifiedCsr {
    /// Parses a PEM request, checks its signature and reads its one URI SAN.
    pub fn from_pem(csr_pem: &str) -> Result<Self, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        let identity = match uris.as_slice() {
            [one] => one
                .parse()
                .map_err(|e: weft_api::IdentityError| CaError::CsrIdentity {
                    got: one.to_string(),
                    want: e.to_string(),
                })?,
            _ => {
                return Err(CaError::CsrIdentity {
                    got: format!("{} URI SANs", uris.len()),
                    want: "exactly one SPIFFE identity".into(),
                });
            }
        };
        Ok(VerifiedCsr {
            identity,
            public_key: csr.public_key,
        })
    }

    /// The identity the request asks for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }
}

#[cfg(test)]
mod csr_tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa).unwrap()
    }

    /// A request is signed for exactly the identity it names, with the CA's
    /// lifetime; a request for another identity, or a tampered one, is refused.
    #[test]
    fn sign_and_refuse() {
        let ca = Ca::generate("cluster.local").unwrap();
        let req = CertRequest::new(&id("web")).unwrap();
        let csr = VerifiedCsr::from_pem(&req.csr_pem).unwrap();
        assert_eq!(csr.identity(), &id("web"));
        let signed = ca.sign_csr(&csr, Duration::from_secs(600)).unwrap();
        let life = signed.not_after.duration_since(signed.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(660));
        let issued = IssuedCert {
            identity: id("web"),
            chain_pem: signed.cert_pem,
            key_pem: req.key_pem.clone(),
            not_before: signed.not_before,
            not_after: signed.not_after,
        };
        let roots = crate::tls::TrustRoots::from_pem(ca.cert_pem()).unwrap();
        crate::tls::server_config(&issued, &roots).expect("leaf and key belong together");

        // A request naming no identity, or two, is refused.
        for sans in [
            vec![],
            vec![
                "spiffe://cluster.local/ns/shop/sa/web",
                "spiffe://cluster.local/ns/shop/sa/db",
            ],
        ] {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = sans
                .iter()
                .map(|u| SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
                .collect();
            let pem = params.serialize_request(&key).unwrap().pem().unwrap();
            let err = VerifiedCsr::from_pem(&pem).unwrap_err();
            assert!(
                matches!(err, CaError::CsrIdentity { .. }),
                "{sans:?}: {err}"
            );
        }

        // Flip a byte in the middle of the DER body: the signature no longer verifies.
        let mut lines: Vec<String> = req.csr_pem.lines().map(String::from).collect();
        let mid = lines.len() / 2;
        let mut bytes = lines[mid].clone().into_bytes();
        bytes[10] = if bytes[10] == b'A' { b'B' } else { b'A' };
        lines[mid] = String::from_utf8(bytes).unwrap();
        let err = VerifiedCsr::from_pem(&lines.join("\n")).unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)), "{err}");
        assert!(VerifiedCsr::from_pem("garbage").is_err());
    }
}
