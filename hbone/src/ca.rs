//! A certificate authority for SPIFFE workload certificates.
//!
//! Used by ztunnel's development mode (a root key on disk) and by the controller's
//! mesh CA. Certificates are ECDSA P-256 with exactly one URI SAN, the identity.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
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
        let uri = rcgen::string::Ia5String::try_from(identity.to_string()).map_err(err)?;
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
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(60);
        let not_after = now + ttl;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
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
