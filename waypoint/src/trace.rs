//! Distributed tracing, as Envoy's tracer does it in a waypoint: each
//! request continues the client's trace (W3C `traceparent`/`tracestate`,
//! or B3, single or multi header) or starts one; it becomes one server span
//! and one client span per upstream attempt, retries included, each
//! attempt's context sent upstream in both formats. A trace the client
//! decided on keeps its decision; a new one is sampled at the Telemetry's
//! `randomSamplingPercentage`. Sampled spans go to the collector over
//! OTLP/gRPC in batches (see [`export`]); a full queue drops spans rather
//! than hold a request.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use weft_xds::otlp;
use weft_xds::proto::waypoint as pb;

use crate::breaker::Limits;
use crate::metrics::Metrics;
use crate::proxy::{Body, BoxError, Proxy};

/// Spans waiting for the exporter; more are dropped (counted).
const QUEUE: usize = 4096;
/// Spans per export request.
const BATCH: usize = 512;
/// A batch goes out at least this often while spans wait.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// One export's limit, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The trace a request arrived in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub parent: [u8; 8],
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
    pub tracestate: Option<String>,
}

/// `2N` lowercase hex digits (W3C and B3 both), not all zero.
fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (out != [0u8; N]).then_some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A B3 trace id: 16 or 32 hex digits (a short one is the low half).
fn b3_trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        32 => hex_bytes::<16>(s),
        16 => {
            let low = hex_bytes::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "true" | "d" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

impl Incoming {
    /// The request's trace context: W3C first, then B3 single, then B3
    /// multi. Malformed headers are ignored, as if absent.
    pub fn from_headers(h: &HeaderMap) -> Option<Incoming> {
        let text = |n: &HeaderName| h.get(n).and_then(|v| v.to_str().ok());
        if let Some(tp) = text(&TRACEPARENT) {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            if parts.len() >= 4
                && parts[0].len() == 2
                && parts[0] != "ff"
                && (parts[0] != "00" || parts.len() == 4)
                && let (Some(trace_id), Some(parent), Ok(flags)) = (
                    hex_bytes::<16>(parts[1]),
                    hex_bytes::<8>(parts[2]),
                    u8::from_str_radix(parts[3], 16),
                )
                && parts[3].len() == 2
            {
                return Some(Incoming {
                    trace_id,
                    parent,
                    sampled: Some(flags & 1 == 1),
                    tracestate: text(&TRACESTATE).map(str::to_string),
                });
            }
        }
        if let Some(single) = text(&B3) {
            let parts: Vec<&str> = single.split('-').collect();
            if parts.len() >= 2
                && let (Some(trace_id), Some(parent)) =
                    (b3_trace_id(parts[0]), hex_bytes::<8>(parts[1]))
            {
                return Some(Incoming {
                    trace_id,
                    parent,
                    sampled: parts.get(2).and_then(|s| b3_sampled(s)),
                    tracestate: None,
                });
            }
        }
        let trace_id = b3_trace_id(text(&B3_TRACE)?)?;
        let parent = hex_bytes::<8>(text(&B3_SPAN)?)?;
        let sampled = if text(&B3_FLAGS) == Some("1") {
            Some(true)
        } else {
            text(&B3_SAMPLED).and_then(b3_sampled)
        };
        Some(Incoming {
            trace_id,
            parent,
            sampled,
            tracestate: None,
        })
    }
}

/// Whether a roll (uniform over u64) falls within `percent` (0 to 100),
/// to a millionth of a percent.
fn sample(percent: f64, roll: u64) -> bool {
    ((roll % 100_000_000) as f64) < percent * 1_000_000.0
}

/// A request's server span, while it runs.
#[derive(Debug)]
pub struct Active {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    pub sampled: bool,
    tracestate: Option<String>,
    start: SystemTime,
    /// Sampled and reported: its spans go to the exporter.
    report: bool,
}

/// One upstream attempt's client span.
#[derive(Debug)]
pub struct Attempt {
    pub span_id: [u8; 8],
    start: SystemTime,
}

/// Makes spans and hands the sampled ones to the exporter.
#[derive(Debug)]
pub struct Tracer {
    queue: mpsc::Sender<otlp::Span>,
    ids: AtomicU64,
    /// Counts the spans a full queue drops.
    metrics: Arc<Metrics>,
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Tracer {
    /// The tracer, and the receiving end its exporter reads.
    pub fn new(metrics: Arc<Metrics>) -> (Tracer, mpsc::Receiver<otlp::Span>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        (
            Tracer {
                queue,
                ids: AtomicU64::new(0),
                metrics,
            },
            rx,
        )
    }

    /// A fresh non-zero id from `roll`, mixed with a counter so that two
    /// threads never make the same one.
    fn id(&self, roll: u64) -> u64 {
        let mut z = roll ^ self.ids.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)).max(1)
    }

    /// Starts a request's server span when `tracing` is on: in the client's
    /// trace, or a new one sampled at the configured share.
    pub fn start(
        &self,
        tracing: Option<&pb::Tracing>,
        headers: &HeaderMap,
        roll: impl Fn() -> u64,
    ) -> Option<Active> {
        let t = tracing?;
        let incoming = Incoming::from_headers(headers);
        // `b3: 0`, `b3: 1`, `b3: d`: a decision without a trace (B3 single).
        let decided = headers
            .get(B3)
            .and_then(|v| v.to_str().ok())
            .and_then(b3_sampled);
        let (trace_id, parent, sampled, tracestate) = match incoming {
            Some(i) => (
                i.trace_id,
                Some(i.parent),
                i.sampled
                    .unwrap_or_else(|| sample(t.sampling_percent, roll())),
                i.tracestate,
            ),
            None => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&self.id(roll()).to_be_bytes());
                id[8..].copy_from_slice(&self.id(roll()).to_be_bytes());
                let sampled = decided.unwrap_or_else(|| sample(t.sampling_percent, roll()));
                (id, None, sampled, None)
            }
        };
        Some(Active {
            trace_id,
            span_id: self.id(roll()).to_be_bytes(),
            parent,
            sampled,
            tracestate,
            start: SystemTime::now(),
            report: sampled && !t.disable_reporting,
        })
    }

    /// An upstream attempt of `active`: its span, and its context in the
    /// request's headers (replacing the client's).
    pub fn attempt(&self, active: &Active, headers: &mut HeaderMap, roll: u64) -> Attempt {
        let span_id = self.id(roll).to_be_bytes();
        let flags = if active.sampled { "01" } else { "00" };
        let set = |h: &mut HeaderMap, n: HeaderName, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(n, v);
            }
        };
        set(
            headers,
            TRACEPARENT,
            format!("00-{}-{}-{flags}", hex(&active.trace_id), hex(&span_id)),
        );
        match &active.tracestate {
            Some(ts) => set(headers, TRACESTATE, ts.clone()),
            None => {
                headers.remove(TRACESTATE);
            }
        }
        headers.remove(B3);
        headers.remove(B3_FLAGS);
        set(headers, B3_TRACE, hex(&active.trace_id));
        set(headers, B3_SPAN, hex(&span_id));
        set(headers, B3_PARENT, hex(&active.span_id));
        set(
            headers,
            B3_SAMPLED,
            if active.sampled { "1" } else { "0" }.to_string(),
        );
        Attempt {
            span_id,
            start: SystemTime::now(),
        }
    }

    /// Ends an attempt's client span; `status` is the upstream's, or `None`
    /// when it gave no answer (`error` says why).
    pub fn end_attempt(
        &self,
        active: &Active,
        attempt: Attempt,
        name: String,
        mut attributes: Vec<otlp::KeyValue>,
        status: Option<u16>,
        error: Option<&str>,
    ) {
        if !active.report {
            return;
        }
        if let Some(s) = status {
            attributes.push(otlp::KeyValue::int("http.status_code", i64::from(s)));
        }
        if let Some(e) = error {
            attributes.push(otlp::KeyValue::string("error.message", e));
        }
        let failed = status.is_none_or(|s| s >= 500);
        self.emit(otlp::Span {
            trace_id: active.trace_id.to_vec(),
            span_id: attempt.span_id.to_vec(),
            trace_state: active.tracestate.clone().unwrap_or_default(),
            parent_span_id: active.span_id.to_vec(),
            name,
            kind: otlp::SPAN_KIND_CLIENT,
            start_time_unix_nano: unix_nanos(attempt.start),
            end_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes,
            status: Some(status_of(failed)),
            flags: 1,
        });
    }

    /// Ends the server span with the response's status.
    pub fn end(
        &self,
        active: Active,
        name: String,
        mut attributes: Vec<otlp::KeyValue>,
        status: u16,
    ) {
        if !active.report {
            return;
        }
        attributes.push(otlp::KeyValue::int("http.status_code", i64::from(status)));
        self.emit(otlp::Span {
            trace_id: active.trace_id.to_vec(),
            span_id: active.span_id.to_vec(),
            trace_state: active.tracestate.unwrap_or_default(),
            parent_span_id: active.parent.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            kind: otlp::SPAN_KIND_SERVER,
            start_time_unix_nano: unix_nanos(active.start),
            end_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes,
            status: Some(status_of(status >= 500)),
            flags: 1,
        });
    }

    fn emit(&self, span: otlp::Span) {
        if self.queue.try_send(span).is_err() {
            self.metrics.spans("dropped", 1);
        }
    }
}

fn status_of(failed: bool) -> otlp::Status {
    otlp::Status {
        message: String::new(),
        code: if failed {
            otlp::STATUS_ERROR
        } else {
            otlp::STATUS_UNSET
        },
    }
}

/// A gRPC message: uncompressed, length-prefixed.
fn grpc_frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("a BytesMut grows");
    b.freeze()
}

/// Sends the queued spans to the collector the current Telemetry names, in
/// batches of up to [`BATCH`] at least every [`FLUSH_EVERY`], over one
/// HTTP/2 connection kept between batches (HBONE when the collector is in
/// the mesh). A batch that cannot be sent is dropped and counted.
pub async fn export(
    proxy: Arc<Proxy>,
    mut rx: mpsc::Receiver<otlp::Span>,
    resource: Vec<otlp::KeyValue>,
) {
    let mut conn: Option<(
        std::net::SocketAddr,
        hyper::client::conn::http2::SendRequest<Body>,
    )> = None;
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let request = otlp::ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(otlp::Resource {
                    attributes: resource.clone(),
                }),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(otlp::InstrumentationScope {
                        name: "weft-waypoint".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                    }),
                    spans: batch,
                }],
            }],
        };
        let sent = tokio::time::timeout(EXPORT_TIMEOUT, send(&proxy, &mut conn, &request)).await;
        match sent {
            Ok(Ok(())) => proxy.metrics.spans("exported", n),
            Ok(Err(e)) => {
                conn = None;
                warn!(error = %e, spans = n, "span export failed");
                proxy.metrics.spans("failed", n);
            }
            Err(_) => {
                conn = None;
                warn!(spans = n, "span export timed out");
                proxy.metrics.spans("failed", n);
            }
        }
    }
}

async fn send(
    proxy: &Arc<Proxy>,
    conn: &mut Option<(
        std::net::SocketAddr,
        hyper::client::conn::http2::SendRequest<Body>,
    )>,
    request: &otlp::ExportTraceServiceRequest,
) -> Result<(), BoxError> {
    let state = proxy.store.snapshot();
    let t = state.tracing().ok_or("tracing is off")?;
    let key = format!("{}/{}", t.namespace, t.hostname);
    let svc = state
        .service(&key)
        .ok_or_else(|| format!("collector {key}: no such service"))?;
    let port = u16::try_from(t.port).map_err(|_| "collector port out of range")?;
    let (endpoints, balance, _) = state.endpoints(svc, port, "");
    // The endpoint in use while it is still one of the collector's.
    let keep = conn
        .as_ref()
        .is_some_and(|(addr, s)| !s.is_closed() && endpoints.iter().any(|e| e.addr == *addr));
    if !keep {
        let ep = proxy
            .store
            .choose(&endpoints, &balance, crate::proxy::roll(), None, &[])
            .cloned()
            .ok_or_else(|| format!("collector {key}: no endpoint on port {port}"))?;
        let io = proxy.upstream(&ep, None, None, &Limits::default()).await?;
        let (sender, c) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
        tokio::spawn(async move {
            if let Err(e) = c.await {
                debug!(error = %e, "collector connection ended");
            }
        });
        *conn = Some((ep.addr, sender));
    }
    let Some((_, sender)) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let req = Request::post(format!("http://{}:{port}{}", t.hostname, otlp::EXPORT_PATH))
        .version(http::Version::HTTP_2)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(
            Full::new(grpc_frame(request))
                .map_err(BoxError::from)
                .boxed(),
        )?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let head_status = resp.headers().get("grpc-status").cloned();
    if !resp.status().is_success() {
        return Err(format!("collector answered HTTP {}", resp.status()).into());
    }
    let collected = resp.into_body().collect().await?;
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head_status);
    match status.as_ref().and_then(|s| s.to_str().ok()) {
        Some("0") => Ok(()),
        other => Err(format!("collector answered grpc-status {other:?}").into()),
    }
}

/// The resource every span is reported under: the waypoint as Istio names
/// it (`service.name` is `<gateway>.<namespace>`).
pub fn resource(gateway: &str, namespace: &str) -> Vec<otlp::KeyValue> {
    vec![
        otlp::KeyValue::string("service.name", format!("{gateway}.{namespace}")),
        otlp::KeyValue::string("k8s.namespace.name", namespace),
        otlp::KeyValue::string("istio.canonical_service", gateway),
    ]
}

/// The Telemetry's custom tags, valued for a request with `headers`: a
/// literal, a request header, or an environment variable of the waypoint
/// (each with its default when absent).
pub fn custom_tags(tracing: &pb::Tracing, headers: &HeaderMap) -> Vec<otlp::KeyValue> {
    use pb::custom_tag::Value;
    tracing
        .custom_tags
        .iter()
        .map(|t| {
            let value = match &t.value {
                Some(Value::Literal(v)) => v.clone(),
                Some(Value::Header(h)) => headers
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map_or_else(|| t.default_value.clone(), str::to_string),
                Some(Value::Environment(e)) => {
                    std::env::var(e).unwrap_or_else(|_| t.default_value.clone())
                }
                None => t.default_value.clone(),
            };
            otlp::KeyValue::string(&t.name, value)
        })
        .collect()
}

/// The client's address as a span attribute.
pub fn peer(ip: IpAddr) -> otlp::KeyValue {
    otlp::KeyValue::string("peer.address", ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v)))
            .collect()
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn contexts_from_headers() {
        let w3c = Incoming::from_headers(&headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]))
        .unwrap();
        assert_eq!(hex(&w3c.trace_id), TRACE);
        assert_eq!(hex(&w3c.parent), SPAN);
        assert_eq!(w3c.sampled, Some(true));
        assert_eq!(w3c.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        let multi = Incoming::from_headers(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
        ]))
        .unwrap();
        assert_eq!(hex(&multi.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(multi.sampled, Some(false));
        let single = Incoming::from_headers(&headers(&[(
            "b3",
            "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        )]))
        .unwrap();
        assert_eq!(single.sampled, Some(true));
        assert_eq!(hex(&single.trace_id), TRACE);
        // No decision: the waypoint's sampling decides.
        let undecided =
            Incoming::from_headers(&headers(&[("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN)]))
                .unwrap();
        assert_eq!(undecided.sampled, None);
        // Malformed or zero ids are no context.
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(
                Incoming::from_headers(&HeaderMap::from_iter([(
                    TRACEPARENT,
                    HeaderValue::from_static(bad)
                )])),
                None,
                "{bad}"
            );
        }
    }

    fn tracing(percent: f64) -> pb::Tracing {
        pb::Tracing {
            sampling_percent: percent,
            ..Default::default()
        }
    }

    /// A client's decision stands; a new trace is sampled at the share; an
    /// attempt sends the trace on with its own span id, in both formats.
    #[test]
    fn decisions_and_propagation() {
        let (tracer, mut rx) = Tracer::new(Arc::new(Metrics::default()));
        let sampled_in = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let a = tracer
            .start(Some(&tracing(0.0)), &sampled_in, || 7)
            .unwrap();
        assert!(a.sampled, "the client's decision, though the share is 0");
        assert_eq!(hex(&a.trace_id), TRACE);
        let mut up = headers(&[("b3", "1"), ("x-b3-flags", "1")]);
        let attempt = tracer.attempt(&a, &mut up, 11);
        let tp = up.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(tp, format!("00-{TRACE}-{}-01", hex(&attempt.span_id)));
        assert_eq!(
            up.get("x-b3-parentspanid").unwrap(),
            hex(&a.span_id).as_str()
        );
        assert_eq!(up.get("x-b3-sampled").unwrap(), "1");
        assert!(up.get("b3").is_none() && up.get("x-b3-flags").is_none());
        assert_ne!(attempt.span_id, a.span_id);
        tracer.end_attempt(&a, attempt, "router".into(), Vec::new(), Some(503), None);
        let span_id = a.span_id;
        tracer.end(a, "server".into(), Vec::new(), 200);
        let client = rx.try_recv().unwrap();
        assert_eq!(client.kind, otlp::SPAN_KIND_CLIENT);
        assert_eq!(client.parent_span_id, span_id.to_vec());
        assert_eq!(client.status.unwrap().code, otlp::STATUS_ERROR);
        let server = rx.try_recv().unwrap();
        assert_eq!(server.kind, otlp::SPAN_KIND_SERVER);
        assert_eq!(hex(&server.parent_span_id), SPAN);

        // New traces at 25%: about a quarter sampled; off: no span at all.
        let mut n = 0u64;
        let sampled = (0..4000)
            .filter(|_| {
                n += 1;
                tracer
                    .start(Some(&tracing(25.0)), &HeaderMap::new(), || {
                        n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    })
                    .unwrap()
                    .sampled
            })
            .count();
        assert!((800..=1200).contains(&sampled), "{sampled} of 4000");
        assert!(tracer.start(None, &sampled_in, || 1).is_none());
        // `b3: 0` alone: the client decided not to sample, whatever the share.
        let no = tracer
            .start(Some(&tracing(100.0)), &headers(&[("b3", "0")]), || 5)
            .unwrap();
        assert!(!no.sampled);
    }

    /// Unsampled or unreported spans never reach the queue; a full queue
    /// drops and counts.
    #[test]
    fn what_reaches_the_queue() {
        let metrics = Arc::new(Metrics::default());
        let (tracer, mut rx) = Tracer::new(metrics.clone());
        let not_sampled = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]);
        let a = tracer
            .start(Some(&tracing(100.0)), &not_sampled, || 3)
            .unwrap();
        tracer.end(a, "s".into(), Vec::new(), 200);
        let mut quiet = tracing(100.0);
        quiet.disable_reporting = true;
        let a = tracer.start(Some(&quiet), &HeaderMap::new(), || 3).unwrap();
        assert!(a.sampled);
        tracer.end(a, "s".into(), Vec::new(), 200);
        assert!(rx.try_recv().is_err());
        for _ in 0..QUEUE + 5 {
            let a = tracer
                .start(Some(&tracing(100.0)), &HeaderMap::new(), || 3)
                .unwrap();
            tracer.end(a, "s".into(), Vec::new(), 200);
        }
        assert!(
            metrics
                .encode()
                .contains("weft_waypoint_spans_total{outcome=\"dropped\"} 5"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn custom_tag_values() {
        use pb::custom_tag::Value;
        let t = pb::Tracing {
            custom_tags: vec![
                pb::CustomTag {
                    name: "team".into(),
                    value: Some(Value::Literal("shop".into())),
                    default_value: String::new(),
                },
                pb::CustomTag {
                    name: "user".into(),
                    value: Some(Value::Header("x-user".into())),
                    default_value: "anonymous".into(),
                },
                pb::CustomTag {
                    name: "zone".into(),
                    value: Some(Value::Environment("WEFT_TEST_SURELY_UNSET".into())),
                    default_value: "none".into(),
                },
            ],
            ..Default::default()
        };
        let text = |h: &HeaderMap| -> Vec<String> {
            custom_tags(&t, h)
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.text()))
                .collect()
        };
        assert_eq!(
            text(&headers(&[("x-user", "jason")])),
            ["team=shop", "user=jason", "zone=none"]
        );
        assert_eq!(
            text(&HeaderMap::new()),
            ["team=shop", "user=anonymous", "zone=none"]
        );
    }

    #[test]
    fn grpc_frames() {
        let msg = otlp::ExportTraceServiceRequest::default();
        assert_eq!(&grpc_frame(&msg)[..], &[0, 0, 0, 0, 0]);
    }
}
