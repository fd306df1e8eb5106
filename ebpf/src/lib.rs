//! Captures pods' TCP traffic into ztunnel with tc eBPF programs and `bpf_sk_assign`.
//!
//! Start at [`Capture::load`]. The C program is `bpf/capture.bpf.c`; its compiled
//! object is committed (`bpf/capture.bpf.o`, rebuilt by `cargo xtask ebpf`, checked
//! fresh in CI) so a plain `cargo build` needs no clang. [`routing`] installs the
//! policy route that delivers assigned segments locally.

#![forbid(unsafe_code)]

mod capture;
pub mod names;
pub mod routing;

pub use capture::{
    Capture, CaptureConfig, CaptureError, Counters, MIN_KERNEL, check_kernel, uninstall,
};
