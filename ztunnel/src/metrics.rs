//! Istio's standard TCP metrics, so existing dashboards work, plus capture and
//! refusal counters of our own (`weft_*`).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
pub use weft_runtime::metrics::{Peer, PeerLabels, Reporter, SecurityPolicy, TcpLabels};

/// Why a connection was refused before any upstream was reached.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RefusalReason {
    unknown_source,
    unknown_destination,
    no_endpoints,
    loop_detected,
    tls_handshake,
    bad_request,
    identity_mismatch,
    upstream_connect,
    hbone_connect,
    overloaded,
    /// Several workloads claim the destination address.
    ambiguous_address,
    /// An authorization policy (or PeerAuthentication STRICT) denied it.
    policy_denied,
    /// Bound to a waypoint that is unknown or has no ready pod: refused,
    /// never sent around it.
    waypoint_unavailable,
}

/// A policy decision that denied, or a dry-run policy that matched.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub direction: Direction,
    /// `namespace/name`; empty for a default deny (ALLOW policies apply, none matched).
    pub policy: String,
    pub reason: PolicyReason,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PolicyReason {
    deny_matched,
    no_allow_matched,
    policy_unavailable,
    dry_run_matched,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub reason: RefusalReason,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    outbound,
    inbound,
    inbound_plaintext,
}

/// Which xDS type an apply was of.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsLabels {
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedirectLabels {
    pub path: &'static str,
}

/// The registry and every family in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub redirects: Family<RedirectLabels, Counter>,
    pub policy_denials: Family<PolicyLabels, Counter>,
    pub policy_dry_run: Family<PolicyLabels, Counter>,
    pub unenforceable: Counter,
    /// Time to apply one xDS response to the state proxies read, by type.
    pub xds_apply: Family<XdsLabels, Histogram, fn() -> Histogram>,
}

// === impl Metrics ===

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            opened: Family::default(),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            refused: Family::default(),
            redirects: Family::default(),
            policy_denials: Family::default(),
            policy_dry_run: Family::default(),
            unenforceable: Counter::default(),
            // 50 µs to about 1.6 s.
            xds_apply: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
            }),
        };
        m.registry.register(
            "istio_tcp_connections_opened",
            "Total TCP connections opened",
            m.opened.clone(),
        );
        m.registry.register(
            "istio_tcp_connections_closed",
            "Total TCP connections closed",
            m.closed.clone(),
        );
        m.registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in response (destination to source)",
            m.sent.clone(),
        );
        m.registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in request (source to destination)",
            m.received.clone(),
        );
        m.registry.register(
            "weft_connections_refused",
            "Connections refused before reaching an upstream, by reason",
            m.refused.clone(),
        );
        m.registry.register(
            "weft_capture_redirects",
            "TCP segments and SYNs steered by the eBPF capture program, by path",
            m.redirects.clone(),
        );
        m.registry.register(
            "weft_policy_denials",
            "Connections denied by authorization policy, by deciding policy",
            m.policy_denials.clone(),
        );
        m.registry.register(
            "weft_policy_dry_run_matches",
            "Connections a dry-run (or AUDIT) policy matched; never enforced",
            m.policy_dry_run.clone(),
        );
        m.registry.register(
            "weft_xds_apply_seconds",
            "Time to apply one xDS response to the state the proxies read, by type",
            m.xds_apply.clone(),
        );
        m.registry.register(
            "weft_policy_unenforceable_conditions",
            "Policy conditions received that ztunnel cannot evaluate, applied so the policy denies more",
            m.unenforceable.clone(),
        );
        m
    }
}

impl Metrics {
    /// Prometheus (OpenMetrics) text of every metric.
    pub fn encode(&self) -> String {
        weft_runtime::metrics::encode(&self.registry)
    }

    pub fn refuse(&self, direction: Direction, reason: RefusalReason) {
        self.refused
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    /// Brings a counter mirrored from the kernel up to `total`.
    pub fn set_redirects(&self, path: &'static str, total: u64) {
        let c = self.redirects.get_or_create(&RedirectLabels { path });
        let cur = c.get();
        if total > cur {
            c.inc_by(total - cur);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text output carries Istio's names with `_total` and its labels.
    #[test]
    fn istio_names() {
        let m = Metrics::default();
        let labels = TcpLabels::new(
            Reporter::destination,
            &Peer::default(),
            &Peer::default(),
            SecurityPolicy::mutual_tls,
        );
        m.opened.get_or_create(&labels).inc();
        m.received.get_or_create(&labels).inc_by(42);
        m.refuse(Direction::inbound, RefusalReason::tls_handshake);
        let text = m.encode();
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"destination\""));
        assert!(text.contains("connection_security_policy=\"mutual_tls\"} 1"));
        assert!(text.contains("istio_tcp_received_bytes_total{"));
        assert!(text.contains("} 42"));
        assert!(text.contains(
            "weft_connections_refused_total{direction=\"inbound\",reason=\"tls_handshake\"} 1"
        ));
    }
}
