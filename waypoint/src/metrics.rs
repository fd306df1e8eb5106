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
use weft_runtime::metrics::{Peer, PeerLabels, Reporter, SecurityPolicy, TcpLabels};

/// Istio's request label set.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: &'static str,
    #[prometheus(flatten)]
    pub peers: PeerLabels,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: String,
    pub connection_security_policy: &'static str,
}

/// What became of a connection forwarded at L4 (`forwarded`, `denied`,
/// `no_endpoint`, `connect_failed`), or of trace spans (`exported`,
/// `failed`, `dropped`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// Retries the waypoint made or refused, and mirrored requests, by the
/// service they went to.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub destination_service: String,
    /// Retries: `retried`, `budget_exhausted` or `overflow`. Mirrors:
    /// `responded`, `failed`, `timeout` or `dropped`.
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
    l4: Family<OutcomeLabel, Counter>,
    retries: Family<OutcomeLabels, Counter>,
    mirrors: Family<OutcomeLabels, Counter>,
    spans: Family<OutcomeLabel, Counter>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
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
        let l4 = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "weft_waypoint_l4_connections",
            "Connections the waypoint forwarded at L4 (not HTTP), by outcome",
            l4.clone(),
        );
        let retries = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "weft_waypoint_upstream_retries",
            "Upstream retries, by destination service and outcome",
            retries.clone(),
        );
        let mirrors = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "weft_waypoint_mirror_requests",
            "Mirrored requests, by the service mirrored to and outcome",
            mirrors.clone(),
        );
        let spans = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "weft_waypoint_spans",
            "Trace spans: exported, failed (the collector did not take them) or dropped (queue full)",
            spans.clone(),
        );
        let tcp = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<TcpLabels, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let tcp_opened = tcp(
            &mut registry,
            "istio_tcp_connections_opened",
            "Connections forwarded at L4, opened",
        );
        let tcp_closed = tcp(
            &mut registry,
            "istio_tcp_connections_closed",
            "Connections forwarded at L4, closed",
        );
        let tcp_sent = tcp(
            &mut registry,
            "istio_tcp_sent_bytes",
            "Bytes sent to the client on connections forwarded at L4",
        );
        let tcp_received = tcp(
            &mut registry,
            "istio_tcp_received_bytes",
            "Bytes received from the client on connections forwarded at L4",
        );
        Metrics {
            l4,
            retries,
            mirrors,
            spans,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
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
        self.l4.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Counts a retry (`retried`) or one the budget refused (`budget_exhausted`).
    pub fn retry(&self, service: &str, outcome: &'static str) {
        self.retries
            .get_or_create(&OutcomeLabels {
                destination_service: service.to_string(),
                outcome,
            })
            .inc();
    }

    /// Istio's TCP labels for a connection the waypoint forwards at L4.
    pub fn tcp_labels(src: &Peer<'_>, dst: &Peer<'_>) -> TcpLabels {
        TcpLabels::new(Reporter::waypoint, src, dst, SecurityPolicy::mutual_tls)
    }

    /// A connection forwarded at L4 opened.
    pub fn tcp_opened(&self, labels: &TcpLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    /// It closed, having received `received` bytes from the client and
    /// sent it `sent`.
    pub fn tcp_closed(&self, labels: &TcpLabels, received: u64, sent: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_received.get_or_create(labels).inc_by(received);
        self.tcp_sent.get_or_create(labels).inc_by(sent);
    }

    /// Counts `n` spans by what became of them.
    pub fn spans(&self, outcome: &'static str, n: u64) {
        self.spans
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n);
    }

    /// Counts a mirrored request: `responded` (any status), `failed` (no
    /// answer), `timeout`, or `dropped` (not sent: too many in flight, no
    /// endpoint, or its body could not be copied).
    pub fn mirror(&self, service: &str, outcome: &'static str) {
        self.mirrors
            .get_or_create(&OutcomeLabels {
                destination_service: service.to_string(),
                outcome,
            })
            .inc();
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
    /// Envoy's response flags, comma-separated in the order set; `-`: none.
    pub flags: String,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The request's server span, when the waypoint traces.
    pub trace: Option<crate::trace::Active>,
    /// The Telemetry's custom tags, valued for this request: on each span.
    pub trace_tags: Vec<weft_xds::otlp::KeyValue>,
    /// CORS headers for the answer, whatever it is, once the route's
    /// policy has allowed the request's origin.
    pub cors: Option<http::HeaderMap>,
    /// A gRPC request (`content-type: application/grpc...`).
    pub grpc: bool,
    /// The answer's `grpc-status`, from its headers or its trailers.
    pub grpc_status: Option<String>,
    /// The upstream cluster as Envoy names it in spans
    /// (`outbound|<port>|<subset>|<host>`).
    pub cluster: String,
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
            grpc: req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            source_principal: principal.cloned(),
            request_bytes: req.body().size_hint().exact().unwrap_or(0),
            flags: "-".into(),
            ..RequestRecord::default()
        }
    }

    /// Sets a response flag (Envoy's: NR no route, UH no healthy upstream,
    /// UF upstream connect failure, UT upstream timeout, NC no cluster, …).
    /// A flag already set is not repeated; `DI` then `UF` is `DI,UF`.
    pub fn flag(&mut self, flag: &str) {
        for f in flag.split(',').filter(|f| !f.is_empty()) {
            if self.flags == "-" {
                self.flags = f.to_string();
            } else if !self.flags.split(',').any(|g| g == f) {
                self.flags.push(',');
                self.flags.push_str(f);
            }
        }
    }

    pub fn source(&mut self, w: Option<&Arc<Workload>>) {
        self.source = w.cloned();
    }

    pub fn destination(&mut self, svc: Option<&Arc<Service>>) {
        if let Some(s) = svc {
            self.service = Some(s.clone());
        }
    }

    /// The destination service's hostname, once known.
    pub fn service_name(&self) -> Option<String> {
        self.service.as_ref().map(|s| s.hostname.clone())
    }

    /// Names the upstream cluster as Envoy does in spans; formatted only
    /// when the request is traced (it is used nowhere else).
    pub fn cluster(&mut self, port: u16, subset: &str, host: impl std::fmt::Display) {
        if self.trace.is_some() {
            self.cluster = format!("outbound|{port}|{subset}|{host}");
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
        let dst_id = self.destination.as_ref().and_then(|w| w.identity().ok());
        let src = Peer {
            workload: self.source.as_deref(),
            identity: self.source_principal.as_ref(),
            service: None,
        };
        let dst = Peer {
            workload: self.destination.as_deref(),
            identity: dst_id.as_ref(),
            service: self.service.as_deref(),
        };
        HttpLabels {
            reporter: "waypoint",
            peers: PeerLabels::new(&src, &dst),
            request_protocol: if self.grpc { "grpc" } else { "http" },
            response_code: self.status,
            grpc_response_status: self.grpc_status.clone().unwrap_or_default(),
            response_flags: self.flags.clone(),
            connection_security_policy: "mutual_tls",
        }
    }
}

/// A response body that records its request's metrics when it ends (or
/// is dropped, the client gone): the duration and size of the whole
/// exchange, and a gRPC status from the trailers, as Envoy's stats do.
pub struct Recorded {
    inner: crate::proxy::Body,
    record: Option<RequestRecord>,
    metrics: Arc<Metrics>,
    start: std::time::Instant,
    bytes: u64,
}

impl std::fmt::Debug for Recorded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorded")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Recorded {
    pub fn new(
        inner: crate::proxy::Body,
        record: RequestRecord,
        metrics: Arc<Metrics>,
        start: std::time::Instant,
    ) -> Self {
        Recorded {
            inner,
            record: Some(record),
            metrics,
            start,
            bytes: 0,
        }
    }

    fn finish(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.duration = self.start.elapsed();
            r.response_bytes = self.bytes;
            self.metrics.record(&r);
        }
    }
}

impl http_body::Body for Recorded {
    type Data = bytes::Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if let (Some(t), Some(r)) = (f.trailers_ref(), this.record.as_mut())
                    && let Some(v) = t.get("grpc-status").and_then(|v| v.to_str().ok())
                {
                    r.grpc_status = Some(v.to_string());
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            _ => this.finish(),
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gRPC answer is counted when its body ends, with the status from
    /// its trailers and the bytes it carried.
    #[tokio::test]
    async fn recorded_at_the_end_of_the_body() {
        use http_body_util::BodyExt;
        let m = Arc::new(Metrics::default());
        let record = RequestRecord {
            flags: "-".into(),
            grpc: true,
            status: 200,
            ..RequestRecord::default()
        };
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"12345"))
            .map_err(crate::proxy::BoxError::from)
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        let recorded = Recorded::new(body, record, m.clone(), std::time::Instant::now());
        assert!(
            !m.encode().contains("istio_requests_total{"),
            "not before the end"
        );
        let _ = recorded.collect().await;
        let text = m.encode();
        assert!(
            text.contains("request_protocol=\"grpc\"")
                && text.contains("grpc_response_status=\"14\""),
            "{text}"
        );
        assert!(text.contains("istio_response_bytes_sum{"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_response_bytes_sum{") && l.ends_with(" 5.0")),
            "{text}"
        );
    }

    #[test]
    fn flags_accumulate() {
        let mut r = RequestRecord {
            flags: "-".into(),
            ..RequestRecord::default()
        };
        r.flag("");
        assert_eq!(r.flags, "-");
        r.flag("DI");
        r.flag("UF,URX");
        r.flag("DI");
        assert_eq!(r.flags, "DI,UF,URX");
    }

    #[test]
    fn istio_names_and_labels() {
        let m = Metrics::default();
        let r = RequestRecord {
            status: 503,
            flags: "UF".into(),
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
        assert!(
            text.contains("source_workload=\"unknown\"")
                && text.contains("destination_service_name=\"unknown\""),
            "the shared peer labels are flattened in: {text}"
        );
    }
}
