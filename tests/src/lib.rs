//! The local lab: Kubernetes nodes and pods played by network namespaces on one
//! Linux host, ztunnel running in each node, config from Kubernetes YAML.
//!
//! Start at [`Lab::up`]. [`netns`] runs code inside a namespace; [`apps`] has the
//! small servers and clients the demo and tests put in pods. Everything a lab
//! creates is removed when it drops, on Ctrl-C, and by [`lab::down_stale`] after
//! a crash. Used by `cargo xtask lab|demo|bench` and by the tests in `tests/`.

pub mod apps;
pub mod bookinfo;
pub mod chart;
pub mod check;
pub mod kubeapi;
pub mod lab;
pub mod netns;
pub mod otlp;
pub mod peer;
pub mod relay;
pub mod rollout;
pub mod tcpdump;

pub use lab::{Lab, LabOptions};
pub use netns::NetNs;
