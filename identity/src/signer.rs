//! Where certificates come from: the mesh CA over gRPC (`CreateCertificate`,
//! Istio's shape), or a CA key on this node in development mode.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use prost_types::{Struct, Value, value::Kind};
use tonic::transport::Channel;
use weft_api::Identity;
use weft_hbone::ca::{Ca, CertRequest};
use weft_xds::proto::ca::IstioCertificateRequest;

/// A signed certificate as the CA returns it.
#[derive(Debug, Clone)]
pub struct Signed {
    /// Leaf first, then intermediates, PEM.
    pub chain_pem: String,
    /// The root (bundle) the CA vouches with, PEM, if it sent one.
    pub roots_pem: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("cannot read the node token {path}: {source}")]
    Token {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mesh CA refused: {0}")]
    Refused(String),
    #[error("mesh CA answered with {0} certificates; want at least leaf and root")]
    ShortChain(usize),
    #[error("local CA: {0}")]
    Local(String),
}

/// The future a [`Signer`] returns.
pub type SignFuture<'a> = Pin<Box<dyn Future<Output = Result<Signed, SignError>> + Send + 'a>>;

/// Signs a CSR for an identity. Implementations: [`LocalSigner`],
/// [`RemoteSigner`]; tests bring their own (a CA that hangs, say).
pub trait Signer: Send + Sync + std::fmt::Debug {
    fn sign<'a>(&'a self, id: &'a Identity, req: &'a CertRequest, ttl: Duration) -> SignFuture<'a>;
}

/// Development mode: a CA key on this node.
#[derive(Debug)]
pub struct LocalSigner(pub Ca);

/// The mesh CA (the controller), over gRPC with this node's token.
#[derive(Debug)]
pub struct RemoteSigner {
    pub channel: Channel,
    /// Re-read on every request (a projected token rotates).
    pub token_path: PathBuf,
}

// === impl LocalSigner ===

impl Signer for LocalSigner {
    fn sign<'a>(&'a self, id: &'a Identity, req: &'a CertRequest, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            let csr = weft_hbone::ca::VerifiedCsr::from_pem(&req.csr_pem)
                .map_err(|e| SignError::Local(e.to_string()))?;
            if csr.identity() != id {
                return Err(SignError::Local(format!(
                    "the CSR is for {}, not {id}",
                    csr.identity()
                )));
            }
            let signed = self
                .0
                .sign_csr(&csr, ttl)
                .map_err(|e| SignError::Local(e.to_string()))?;
            split_chain(vec![signed.cert_pem, self.0.cert_pem().to_string()])
        })
    }
}

// === impl RemoteSigner ===

impl Signer for RemoteSigner {
    fn sign<'a>(&'a self, id: &'a Identity, req: &'a CertRequest, ttl: Duration) -> SignFuture<'a> {
        Box::pin(async move {
            let token = tokio::fs::read_to_string(&self.token_path)
                .await
                .map_err(|source| SignError::Token {
                    path: self.token_path.display().to_string(),
                    source,
                })?;
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
                validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                metadata: Some(metadata),
            };
            let resp =
                weft_xds::grpc::create_certificate(self.channel.clone(), token.trim(), request)
                    .await
                    .map_err(|s| SignError::Refused(format!("{:?}: {}", s.code(), s.message())))?;
            split_chain(resp.cert_chain)
        })
    }
}

/// `[leaf, intermediates…, root]` → the chain to present and the root.
fn split_chain(mut chain: Vec<String>) -> Result<Signed, SignError> {
    if chain.len() < 2 {
        return Err(SignError::ShortChain(chain.len()));
    }
    let root = chain.pop();
    Ok(Signed {
        chain_pem: chain.concat(),
        roots_pem: root,
    })
}
