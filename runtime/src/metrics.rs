//! Prometheus text for a process's registry.

use prometheus_client::registry::Registry;

/// The OpenMetrics text of every metric in `registry` (what `/metrics` serves).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
