//! Types shared by Weft's controller and data plane: SPIFFE identities, workloads and services.
//!
//! Start at [`Workload`] and [`Service`]: the controller produces them from Kubernetes
//! resources, ztunnel consumes them (today from a local file, [`LocalConfig`]).

#![forbid(unsafe_code)]

pub mod authz;
mod identity;
mod workload;

pub use authz::Authorization;
pub use identity::{Identity, IdentityError};
pub use workload::{
    AppProtocol, Endpoint, LocalConfig, Service, ServicePort, TunnelProtocol, WaypointRef, Workload,
};
