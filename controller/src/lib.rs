//! Weft's controller: Kubernetes resources (from the API server or a manifests
//! directory) in, data-plane configuration out.
//!
//! Start at [`manifests::parse`] (YAML → [`Snapshot`]) and [`translate::workloads`]
//! (snapshot → workloads and services, a pure function). Serving over xDS and
//! the mesh CA build on these.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod balance;
pub mod bypass;
pub mod ca;
pub mod changed;
pub mod crds;
pub mod deploy;
pub mod endpoints;
pub mod httproute;
pub mod kinds;
pub mod kubernetes;
pub mod l7_policy;
pub mod labels;
pub mod lease;
pub mod manifests;
pub mod metrics;
pub mod policy;
pub mod resilience;
pub mod root_cert;
pub mod routes;
pub mod service_entry;
mod snapshot;
pub mod source;
pub mod telemetry;
pub mod translate;
pub mod waypoints;
pub mod xds;

#[cfg(test)]
mod testdata;

pub use snapshot::Snapshot;
