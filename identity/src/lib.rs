//! Workload identities for Weft's proxies: one certificate per SPIFFE
//! identity, from the mesh CA, renewed at half-life, and the TLS configs made
//! from them. ztunnel uses it for its pods; the waypoint for itself.
//!
//! Start at [`CertManager`]; where certificates come from is a [`Signer`]
//! ([`LocalSigner`] in development mode, [`RemoteSigner`] for the mesh CA).
//! TLS configs and the CA's certificate shapes are `weft_hbone`'s.

#![forbid(unsafe_code)]

mod manager;
mod signer;

pub use manager::{CertInfo, CertManager, IdentityError};
pub use signer::{LocalSigner, RemoteSigner, SignError, Signed, Signer};
