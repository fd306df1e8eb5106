//! ztunnel: Weft's per-node L4 proxy. Captured pods' TCP connections arrive on
//! transparent listeners and travel between nodes in HBONE (mTLS) tunnels.
//!
//! Start at [`app::run`]. The connection paths are in [`proxy`]; what is known
//! about the mesh is in [`state`]; certificates in `weft_identity`; the kernel side
//! of capture in the `weft-ebpf` crate.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod metrics;
pub mod proxy;
pub mod removal;
pub mod state;
pub mod succession;
#[cfg(test)]
mod test_helpers;
pub mod xds;
