//! Who may talk to whom: rustls configs for HBONE and SPIFFE identity checks.
//!
//! Both sides present a workload certificate and verify the peer's chain against
//! the mesh roots. The client also checks that the server's URI SAN is one of the
//! identities the destination's config expects; the server reads the client's
//! identity with [`peer_identity`] and hands it to authorization.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use weft_api::Identity;

use crate::ALPN_H2;
use crate::ca::IssuedCert;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in PEM {what}")]
    NoCertificate { what: &'static str },
    #[error("no private key in PEM")]
    NoKey,
    #[error("cannot parse PEM {what}: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid trust root: {0}")]
    Root(#[source] rustls::Error),
    #[error("cannot build TLS config: {0}")]
    Config(#[source] rustls::Error),
    #[error("cannot build client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate cannot be parsed")]
    BadPeerCertificate,
    #[error("peer certificate has {0} URI SANs; a workload certificate has exactly one")]
    UriSanCount(usize),
    #[error("peer identity is invalid: {0}")]
    BadIdentity(#[from] weft_api::IdentityError),
}

/// The mesh trust roots, parsed once and shared by every config.
#[derive(Clone, Debug)]
pub struct TrustRoots(Arc<RootCertStore>);

/// Server verifier: the chain must lead to the mesh roots and the leaf's identity
/// must be one the destination is expected to have.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The peer identity did not match what the destination's config expects.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {got} is not the expected {expected}")]
struct IdentityMismatch {
    got: String,
    expected: String,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// === impl TrustRoots ===

impl TrustRoots {
    /// Parses one or more PEM CA certificates.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        for cert in parse_certs(pem, "trust roots")? {
            store.add(cert).map_err(TlsError::Root)?;
        }
        Ok(TrustRoots(Arc::new(store)))
    }
}

/// TLS 1.3 server config presenting `cert` and requiring a client certificate
/// that chains to `roots`.
pub fn server_config(cert: &IssuedCert, roots: &TrustRoots) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots.0.clone(), provider()).build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            parse_certs(&cert.chain_pem, "chain")?,
            parse_key(&cert.key_pem)?,
        )
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS 1.3 client config presenting `cert` and accepting only a server whose
/// identity is one of `expected`.
pub fn client_config(
    cert: &IssuedCert,
    roots: &TrustRoots,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = IdentityVerifier {
        roots: roots.0.clone(),
        expected,
        algorithms: provider().signature_verification_algorithms,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(
            parse_certs(&cert.chain_pem, "chain")?,
            parse_key(&cert.key_pem)?,
        )
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // HBONE names peers by address, not DNS: no SNI.
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// The SPIFFE identity of a verified peer: its leaf's single URI SAN.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, TlsError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_of(leaf)
}

fn identity_of(leaf: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|_| TlsError::BadPeerCertificate)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| TlsError::BadPeerCertificate)?;
    let uris: Vec<&str> = san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] => Ok(uri.parse()?),
        other => Err(TlsError::UriSanCount(other.len())),
    }
}

/// The server name rustls needs for a connection to `ip`; not checked by our verifier.
pub fn server_name(ip: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(ip.into())
}

fn parse_certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|source| TlsError::Pem {
            what: "key",
            source,
        })?
        .ok_or(TlsError::NoKey)
}

// === impl IdentityVerifier ===

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let got = identity_of(end_entity).map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        if self.expected.contains(&got) {
            return Ok(ServerCertVerified::assertion());
        }
        let expected = self
            .expected
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" or ");
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(IdentityMismatch {
                got: got.to_string(),
                expected,
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The config only offers TLS 1.3.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Validity and identity of the first certificate in a PEM chain.
pub fn leaf_info(
    chain_pem: &str,
) -> Result<(std::time::SystemTime, std::time::SystemTime, Identity), TlsError> {
    let certs = parse_certs(chain_pem, "chain")?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|_| TlsError::BadPeerCertificate)?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    };
    let validity = cert.validity();
    Ok((
        at(validity.not_before),
        at(validity.not_after),
        identity_of(leaf)?,
    ))
}

/// TLS 1.3 server config for the control plane: presents `chain_pem`, asks
/// no client certificate (node agents authenticate with a bearer token).
pub fn control_plane_server_config(
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(parse_certs(chain_pem, "chain")?, parse_key(key_pem)?)
        .map_err(TlsError::Config)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS 1.3 client config for the control plane: its certificate must chain to
/// `roots_pem` and carry the server name dialled (standard WebPKI checks).
pub fn control_plane_client_config(roots_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = TrustRoots::from_pem(roots_pem)?;
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_root_certificates(roots.0)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::Ca;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "shop", sa).unwrap()
    }

    /// An issued certificate carries exactly its identity as the URI SAN.
    #[test]
    fn issued_identity_round_trips() {
        let ca = Ca::generate("cluster.local").unwrap();
        let cert = ca.issue(&id("reviews"), Duration::from_secs(3600)).unwrap();
        let der = parse_certs(&cert.chain_pem, "chain").unwrap();
        assert_eq!(peer_identity(Some(&der)).unwrap(), id("reviews"));
    }

    /// A certificate without a URI SAN (the CA itself) is not an identity.
    #[test]
    fn ca_cert_has_no_identity() {
        let ca = Ca::generate("cluster.local").unwrap();
        let der = parse_certs(ca.cert_pem(), "root").unwrap();
        assert!(matches!(
            peer_identity(Some(&der)),
            Err(TlsError::UriSanCount(0))
        ));
        assert!(matches!(
            peer_identity(None),
            Err(TlsError::NoPeerCertificate)
        ));
    }

    /// A reloaded CA issues certificates that verify against the original root.
    #[test]
    fn ca_reload() {
        let ca = Ca::generate("cluster.local").unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let cert = again.issue(&id("a"), Duration::from_secs(60)).unwrap();
        let roots = TrustRoots::from_pem(ca.cert_pem()).unwrap();
        server_config(&cert, &roots).unwrap();
        client_config(&cert, &roots, vec![id("b")]).unwrap();
    }
}
