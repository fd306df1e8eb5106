//! Weft's waypoint: the per-namespace L7 proxy (routing, retries, L7 policy).
//!
//! Nothing is here yet; the L4 data path and the controller come first. See
//! `ARCHITECTURE.md` for where it will sit in the packet path.

#![forbid(unsafe_code)]
