//! Istio's HTTP metrics as a waypoint reports them (`reporter="waypoint"`),
//! so existing dashboards work: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes`,
//! `istio_response_bytes`, with Istio's label set and response flags.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use weft_api::{Identity, Service, Workload};

/// Istio's request label set.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: &'static str,
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
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// What became of a connection forwarded at L4.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct L4Labels {
    /// `forwarded`, `denied`, `no_endpoint`, `connect_failed`.
    pub outcome: &'static str,
}

/// Istio's buckets for request durations (milliseconds).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for sizes (bytes): 1 to 10^9 by factors of 10.
const SIZE_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram>,
    request_bytes: Family<HttpLabels, Histogram>,
    response_bytes: Family<HttpLabels, Histogram>,
    l4: Family<L4Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<HttpLabels, Counter>::default();
        let duration = Family::<HttpLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(DURATION_BUCKETS)) as fn() -> Histogram,
        );
        let sizes = || {
            Family::<HttpLabels, Histogram>::new_with_constructor(
                (|| Histogram::new(SIZE_BUCKETS)) as fn() -> Histogram,
            )
        };
        let (request_bytes, response_bytes) = (sizes(), sizes());
        registry.register(
            "istio_requests",
            "Requests through the waypoint",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes",
            response_bytes.clone(),
        );
        let l4 = Family::<L4Labels, Counter>::default();
        registry.register(
            "weft_waypoint_l4_connections",
            "Connections the waypoint forwarded at L4 (not HTTP), by outcome",
            l4.clone(),
        );
        Metrics {
            l4,
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        weft_runtime::metrics::encode(&self.registry)
    }

    /// Counts a connection handled at L4.
    pub fn l4(&self, outcome: &'static str) {
        self.l4.get_or_create(&L4Labels { outcome }).inc();
    }

    pub fn record(&self, r: &RequestRecord) {
        let labels = r.labels();
        self.requests.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(r.duration.as_secs_f64() * 1000.0);
        self.request_bytes
            .get_or_create(&labels)
            .observe(r.request_bytes as f64);
        self.response_bytes
            .get_or_create(&labels)
            .observe(r.response_bytes as f64);
    }
}

/// What one request did, for its metrics and its access-log line.
#[derive(Debug, Default)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub client: Option<IpAddr>,
    pub source: Option<Arc<Workload>>,
    pub source_principal: Option<Identity>,
    pub service: Option<Arc<Service>>,
    pub destination: Option<Arc<Workload>>,
    pub route: String,
    pub upstream: Option<SocketAddr>,
    pub status: u16,
    pub flags: &'static str,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl RequestRecord {
    pub fn new(req: &Request<Incoming>, client: IpAddr, principal: Option<&Identity>) -> Self {
        RequestRecord {
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            authority: req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            client: Some(client),
            source_principal: principal.cloned(),
            request_bytes: req.body().size_hint().exact().unwrap_or(0),
            flags: "-",
            ..RequestRecord::default()
        }
    }

    /// Sets a response flag (Envoy's: NR no route, UH no healthy upstream,
    /// UF upstream connect failure, UT upstream timeout, NC no cluster, …).
    pub fn flag(&mut self, flag: &'static str) {
        self.flags = flag;
    }

    pub fn source(&mut self, w: Option<&Arc<Workload>>) {
        self.source = w.cloned();
    }

    pub fn destination(&mut self, svc: Option<&Arc<Service>>) {
        if let Some(s) = svc {
            self.service = Some(s.clone());
        }
    }

    pub fn destination_workload(&mut self, w: &Arc<Workload>) {
        self.destination = Some(w.clone());
    }

    pub fn finish(&mut self, status: StatusCode, duration: Duration, response_bytes: u64) {
        self.status = status.as_u16();
        self.duration = duration;
        self.response_bytes = response_bytes;
    }

    fn labels(&self) -> HttpLabels {
        let name = |w: &Option<Arc<Workload>>, f: fn(&Workload) -> &str| {
            w.as_deref()
                .map(f)
                .filter(|s| !s.is_empty())
                .unwrap_or("unknown")
                .to_string()
        };
        let svc = |f: fn(&Service) -> &str| {
            self.service
                .as_deref()
                .map(f)
                .unwrap_or("unknown")
                .to_string()
        };
        let dst_principal = self
            .destination
            .as_ref()
            .and_then(|w| w.identity().ok())
            .map(|i| i.to_string())
            .unwrap_or_else(|| "unknown".into());
        HttpLabels {
            reporter: "waypoint",
            source_workload: name(&self.source, |w| &w.workload_name),
            source_canonical_service: name(&self.source, |w| &w.canonical_name),
            source_canonical_revision: name(&self.source, |w| &w.canonical_revision),
            source_workload_namespace: name(&self.source, |w| &w.namespace),
            source_principal: self
                .source_principal
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| "unknown".into()),
            source_app: name(&self.source, |w| &w.canonical_name),
            source_version: name(&self.source, |w| &w.canonical_revision),
            source_cluster: "Kubernetes".into(),
            destination_service: svc(|s| &s.hostname),
            destination_service_namespace: svc(|s| &s.namespace),
            destination_service_name: svc(|s| &s.name),
            destination_workload: name(&self.destination, |w| &w.workload_name),
            destination_canonical_service: name(&self.destination, |w| &w.canonical_name),
            destination_canonical_revision: name(&self.destination, |w| &w.canonical_revision),
            destination_workload_namespace: name(&self.destination, |w| &w.namespace),
            destination_principal: dst_principal,
            destination_app: name(&self.destination, |w| &w.canonical_name),
            destination_version: name(&self.destination, |w| &w.canonical_revision),
            destination_cluster: "Kubernetes".into(),
            request_protocol: "http",
            response_code: self.status,
            grpc_response_status: String::new(),
            response_flags: self.flags,
            connection_security_policy: "mutual_tls",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels() {
        let m = Metrics::default();
        let r = RequestRecord {
            status: 503,
            flags: "UF",
            duration: Duration::from_millis(3),
            ..RequestRecord::default()
        };
        m.record(&r);
        let text = m.encode();
        assert!(
            text.contains("istio_requests_total{reporter=\"waypoint\""),
            "{text}"
        );
        assert!(text.contains("response_code=\"503\""), "{text}");
        assert!(text.contains("response_flags=\"UF\""), "{text}");
        assert!(
            text.contains("istio_request_duration_milliseconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("istio_response_bytes_count{"), "{text}");
    }
}
