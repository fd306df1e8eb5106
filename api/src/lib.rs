//! Types shared by Weft's controller and data plane: SPIFFE identities, workloads and services.
//!
//! Start at [`Workload`] and [`Service`]: the controller produces them from Kubernetes
//! resources, ztunnel consumes them (today from a local file, [`LocalConfig`]).

#![forbid(unsafe_code)]

mod identity;
mod workload;

pub use identity::{Identity, IdentityError};
pub use workload::{Endpoint, LocalConfig, Service, ServicePort, TunnelProtocol, Workload};
