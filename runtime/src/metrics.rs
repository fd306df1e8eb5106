//! Prometheus text for a process's registry, and the source and destination
//! labels Istio's standard metrics share (TCP in ztunnel and the waypoint,
//! HTTP in the waypoint).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::registry::Registry;
use weft_api::{Identity, Service, Workload};

/// The OpenMetrics text of every metric in `registry` (what `/metrics` serves).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Istio's `source_*` and `destination_*` labels, flattened into each
/// metric's label set (`#[prometheus(flatten)]`). Unknown values are
/// `unknown`, as Istio writes them.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
}

/// One end of a connection or request, as far as it is known.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peer<'a> {
    pub workload: Option<&'a Workload>,
    pub identity: Option<&'a Identity>,
    /// The destination's service (unused for a source).
    pub service: Option<&'a Service>,
}

impl PeerLabels {
    pub fn new(src: &Peer<'_>, dst: &Peer<'_>) -> Self {
        const UNKNOWN: &str = "unknown";
        let name = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            w.map(f)
                .filter(|s| !s.is_empty())
                .unwrap_or(UNKNOWN)
                .to_string()
        };
        let principal =
            |id: Option<&Identity>| id.map_or_else(|| UNKNOWN.into(), ToString::to_string);
        let svc = |f: fn(&Service) -> &str| dst.service.map_or(UNKNOWN, f).to_string();
        PeerLabels {
            source_workload: name(src.workload, |w| &w.workload_name),
            source_canonical_service: name(src.workload, |w| &w.canonical_name),
            source_canonical_revision: name(src.workload, |w| &w.canonical_revision),
            source_workload_namespace: name(src.workload, |w| &w.namespace),
            source_principal: principal(src.identity),
            source_app: name(src.workload, |w| &w.canonical_name),
            source_version: name(src.workload, |w| &w.canonical_revision),
            source_cluster: "Kubernetes".into(),
            destination_service: svc(|s| &s.hostname),
            destination_service_namespace: svc(|s| &s.namespace),
            destination_service_name: svc(|s| &s.name),
            destination_workload: name(dst.workload, |w| &w.workload_name),
            destination_canonical_service: name(dst.workload, |w| &w.canonical_name),
            destination_canonical_revision: name(dst.workload, |w| &w.canonical_revision),
            destination_workload_namespace: name(dst.workload, |w| &w.namespace),
            destination_principal: principal(dst.identity),
            destination_app: name(dst.workload, |w| &w.canonical_name),
            destination_version: name(dst.workload, |w| &w.canonical_revision),
            destination_cluster: "Kubernetes".into(),
        }
    }
}

/// Istio's TCP label set (`istio_tcp_*`).
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: SecurityPolicy,
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    #[default]
    source,
    destination,
    /// A waypoint, for the connections it forwards at L4 (Istio's).
    waypoint,
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    #[default]
    unknown,
    mutual_tls,
    none,
}

impl TcpLabels {
    pub fn new(
        reporter: Reporter,
        src: &Peer<'_>,
        dst: &Peer<'_>,
        security: SecurityPolicy,
    ) -> Self {
        TcpLabels {
            reporter,
            peers: PeerLabels::new(src, dst),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: security,
        }
    }
}
