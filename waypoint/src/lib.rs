//! Weft's waypoint: the L7 proxy a namespace's services (or workloads) are
//! bound to. It terminates HBONE from ztunnels, routes each HTTP request by
//! its service's route table, and originates HBONE to the chosen endpoint.
//!
//! Start at [`route`] (the pure route table), then [`proxy`] (the data path)
//! and [`app`] (the composition root).

#![forbid(unsafe_code)]

pub mod app;
pub mod authz;
pub mod breaker;
pub mod config;
pub mod cors;
pub mod fault;
pub mod hash;
pub mod metrics;
pub mod mirror;
pub mod outlier;
pub mod path;
pub mod proxy;
pub mod replay;
pub mod retry;
pub mod route;
pub mod state;
pub mod trace;
