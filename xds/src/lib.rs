//! The control-plane wire: Istio's ztunnel xDS (delta ADS with
//! `istio.workload.Address` and `istio.security.Authorization`) and CA
//! (`IstioCertificateService`), shared by the controller (server) and
//! ztunnel (client).
//!
//! Start at [`proto`] for the messages, [`convert`] for how Weft's types map
//! onto them, and [`grpc`] for the calls.

#![forbid(unsafe_code)]

pub mod client;
pub mod convert;
pub mod grpc;
pub mod otlp;
pub mod proto;
pub mod types;

/// Type URL of workload and service resources.
pub const ADDRESS_TYPE: &str = types::ADDRESS.type_url;
/// Type URL of L4 authorization resources.
pub const AUTHORIZATION_TYPE: &str = types::AUTHORIZATION.type_url;

/// The `Node.client_features` entry of a client that understands the
/// end-of-state marker. Such a client may get a large push in several
/// responses: every one but the last carries [`PARTIAL`] as its
/// `system_version_info`, and the type counts as known only once a
/// response without it has arrived. A client that does not announce it
/// (Istio's ztunnel) gets each push whole, in one response.
pub const END_OF_STATE_FEATURE: &str = "weft.xds.end-of-state";

/// `system_version_info` of a response that is part of a larger push:
/// more of the same state follows.
pub const PARTIAL: &str = "partial";

/// Packs a message into `Any` under `type_url`.
pub fn to_any(type_url: &str, msg: &impl prost::Message) -> proto::discovery::SharedAny {
    proto::discovery::SharedAny {
        type_url: type_url.to_string(),
        value: msg.encode_to_vec().into(),
    }
}

/// A resource version: a stable hash of its encoding (FNV-1a, 64 bits), so
/// the same content has the same version across controller restarts and a
/// reconnecting client with current resources is not sent them again.
pub fn version_of(bytes: &[u8]) -> String {
    format!("{:016x}", fnv1a(bytes))
}

/// FNV-1a, 64 bits: stable across processes and releases (resource
/// versions, the waypoint's consistent hashing).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
