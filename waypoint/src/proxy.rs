//! The waypoint's data path.
//!
//! Front: HBONE (mutual TLS as the waypoint's identity, the client's
//! certificate required, one CONNECT per client connection). The CONNECT
//! target (a service VIP or a pod, port) says what is being reached. The
//! first bytes decide the protocol: HTTP/1.1 is routed request by request;
//! anything else is forwarded at L4 to an endpoint of the destination.
//!
//! Back: a new HBONE stream to the chosen endpoint pod on 15008 with the
//! waypoint's own identity (`:authority` podIP:targetPort, `Forwarded`
//! carrying the client), or plain TCP to an endpoint outside the mesh.
//! HTTP/1.1 connections are pooled per endpoint and client.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};
use weft_api::{AppProtocol, Identity, Service, TunnelProtocol, WaypointRef, Workload};
use weft_hbone::client::{ConnectError, Pool};
use weft_hbone::io::{tls_accept, tls_connect};
use weft_hbone::server::{ConnectRequest, ServeOptions, StreamBudget, forwarded_header_for};
use weft_hbone::tls::{peer_identity, server_name};
use weft_identity::CertManager;

use crate::authz::{self, Decision};
use crate::breaker::{Breaker, Breakers, Limits};
use crate::cors;
use crate::fault::{ABORT_BODY, Abort};
use crate::hash::Keyed;
use crate::metrics::{Metrics, Recorded, RequestRecord};
use crate::mirror::{Copied, MIRROR_TIMEOUT, Mirror, Tee, shadow_authority};
use crate::outlier::Outliers;
use crate::path;
use crate::replay::{RETRY_BUFFER_LIMIT, Recorder};
use crate::retry::{self, NO_RETRY};
use crate::route::{Action, RequestInfo, Rule, rewrite_path};
use crate::state::{Balance, DestPolicy, Endpoint, State, Store};
use crate::trace;
use weft_runtime::metrics::Peer;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// On a port with no declared protocol: how long the first bytes may take
/// to show whether it is HTTP; after that it is forwarded as TCP (a
/// server-first protocol; declare it `tcp-…` to skip the wait).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(1);
/// On a port declared HTTP: how long a client may stay silent.
const HTTP_FIRST_BYTES: Duration = Duration::from_secs(60);
/// Idle upstream HTTP connections are closed after this long.
const HTTP_IDLE: Duration = Duration::from_secs(90);
/// Idle upstream HTTP connections kept per endpoint and client.
const HTTP_IDLE_MAX: usize = 64;
/// Upstream connect timeout when the DestinationRule sets none (Istio's).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the data path shares.
#[derive(Debug)]
pub struct Proxy {
    pub identity: Identity,
    /// The Gateway this waypoint is: only services and workloads bound to
    /// it are served.
    pub gateway: String,
    pub certs: Arc<CertManager>,
    pub store: Arc<Store>,
    pub hbone: Pool<(Identity, SocketAddr)>,
    pub http: HttpPool,
    pub metrics: Arc<Metrics>,
    /// Retries in flight against each service (Envoy's retry budget).
    pub retry_budget: retry::Budget,
    /// Each destination's circuit breakers (DestinationRule connectionPool).
    pub breakers: Breakers,
    /// Each destination's failing endpoints (DestinationRule outlierDetection).
    pub outliers: Arc<Outliers>,
    /// Mirrored requests in flight (at most [`crate::mirror::MIRRORS_IN_FLIGHT`]).
    pub mirrors: Arc<tokio::sync::Semaphore>,
    /// Makes the spans of requests (when the waypoint's Telemetry traces).
    pub tracer: crate::trace::Tracer,
    pub budget: Arc<StreamBudget>,
    pub drain: tokio::sync::watch::Receiver<bool>,
}

/// What a client connection reaches.
#[derive(Clone, Debug)]
enum Dest {
    Service(Arc<Service>),
    Workload(Arc<Workload>),
}

/// One client connection through the waypoint.
#[derive(Debug)]
struct Conn {
    proxy: Arc<Proxy>,
    /// The CONNECT target: VIP or pod, and port.
    target: SocketAddr,
    dest: Dest,
    client_ip: IpAddr,
    /// The peer ztunnel's verified identity: the client workload's.
    client_id: Option<Identity>,
    /// That identity as Istio writes principals (`<td>/ns/<ns>/sa/<sa>`),
    /// made once for all the connection's requests.
    principal: Option<String>,
}

/// How an exchange ended without response headers.
struct Failed {
    outcome: retry::Outcome,
    /// Retried until the policy's attempts ran out (Envoy's URX).
    exhausted: bool,
    /// Stopped by a circuit breaker (Envoy's UO).
    overflow: bool,
}

impl Conn {
    /// Sends the request to `first`, and again, to another endpoint where
    /// there is one, while `policy` retries what came back and the budget
    /// and the request body allow.
    #[allow(clippy::too_many_arguments)]
    async fn attempts(
        &self,
        mut parts: http::request::Parts,
        body: Option<Arc<Recorder>>,
        policy: &retry::Policy,
        endpoints: &[Endpoint],
        (balance, hash): (&Balance, Option<u64>),
        first: Endpoint,
        record: &mut RequestRecord,
        (breaker, pool, http1): (Option<Arc<Breaker>>, &DestPolicy, bool),
    ) -> Result<Response<Incoming>, Failed> {
        let overflow = || Failed {
            outcome: retry::Outcome::Reset,
            exhausted: false,
            overflow: true,
        };
        let mut ep = first;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retrying = Vec::new();
        let mut n = 0;
        let mut next_body = None;
        loop {
            record.upstream = Some(ep.addr);
            record.destination_workload(&ep.workload);
            // The last attempt the policy allows takes the head itself.
            let mut head = if n < policy.attempts {
                parts.clone()
            } else {
                std::mem::replace(&mut parts, Request::new(()).into_parts().0)
            };
            // Each attempt is a client span, its context sent upstream.
            let attempt = record
                .trace
                .as_ref()
                .map(|t| self.proxy.tracer.attempt(t, &mut head.headers, roll()));
            let b: Body = match &body {
                None => empty(),
                Some(r) => match next_body.take().or_else(|| r.reader()) {
                    Some(b) => b.boxed(),
                    None => {
                        return Err(Failed {
                            outcome: retry::Outcome::Reset,
                            exhausted: false,
                            overflow: false,
                        });
                    }
                },
            };
            // Circuit breakers: a request slot, and for HTTP/1.1 a
            // connection (or a place in the queue for one).
            let (_slot, _connection) = match &breaker {
                None => (None, None),
                Some(br) => {
                    let Ok(slot) = br.request() else {
                        return Err(overflow());
                    };
                    let connection = if http1 {
                        match br.connection().await {
                            Ok(c) => c,
                            Err(_) => return Err(overflow()),
                        }
                    } else {
                        None
                    };
                    (Some(slot), connection)
                }
            };
            let sent = {
                let _in_flight = self.proxy.store.in_flight(ep.addr);
                let service = record.service.as_ref().map(|s| s.hostname.as_str());
                let send = self.proxy.send(
                    &ep,
                    (self.client_ip, service),
                    Request::from_parts(head, b),
                    &pool.limits,
                );
                match policy.per_try_timeout {
                    Some(t) => tokio::time::timeout(t, send).await.ok(),
                    None => Some(send.await),
                }
            };
            let outcome = match &sent {
                None => retry::Outcome::PerTryTimeout,
                Some(Ok(r)) => retry::Outcome::Response {
                    status: r.status().as_u16(),
                    grpc: r
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok()),
                    ratelimited: r.headers().contains_key("x-envoy-ratelimited"),
                },
                Some(Err(UpstreamError::Connect(e))) => {
                    debug!(endpoint = %ep.addr, error = %e, "upstream connect failed");
                    retry::Outcome::ConnectFailure
                }
                Some(Err(UpstreamError::Request(e))) => {
                    debug!(endpoint = %ep.addr, error = %e, "upstream request failed");
                    if refused_stream(e) {
                        retry::Outcome::RefusedStream
                    } else {
                        retry::Outcome::Reset
                    }
                }
            };
            if let (Some(t), Some(a)) = (record.trace.as_ref(), attempt) {
                let (status, error) = match &sent {
                    Some(Ok(r)) => (Some(r.status().as_u16()), None),
                    Some(Err(e)) => (None, Some(e.to_string())),
                    None => (None, Some("per-try timeout".to_string())),
                };
                self.proxy.tracer.end_attempt(
                    t,
                    a,
                    format!("router {} egress", record.cluster),
                    [
                        trace_attr("upstream_address", &ep.addr.to_string()),
                        trace_attr("upstream_cluster", &record.cluster),
                        trace_attr("http.method", &record.method),
                    ]
                    .into_iter()
                    .chain(record.trace_tags.iter().cloned())
                    .collect(),
                    status,
                    error.as_deref(),
                );
            }
            if let Some(d) = &pool.detection
                && self
                    .proxy
                    .outliers
                    .report(&pool.key, ep.addr, endpoints.len(), d, outcome)
            {
                info!(destination = %pool.key, endpoint = %ep.addr, "endpoint ejected (outlier detection)");
            }
            let done = |exhausted: bool, record: &mut RequestRecord| match sent {
                Some(Ok(r)) => {
                    if exhausted {
                        record.flag("URX");
                    }
                    if let Some(b) = &body {
                        b.commit();
                    }
                    Ok(r)
                }
                _ => Err(Failed {
                    outcome,
                    exhausted,
                    overflow: false,
                }),
            };
            if !policy.retries(outcome) {
                return done(false, record);
            }
            if n >= policy.attempts {
                return done(n > 0, record);
            }
            if body.as_ref().is_some_and(|b| !b.replayable()) {
                return done(false, record);
            }
            // A pod-targeted request has no service: one series for all.
            let service = record
                .service_name()
                .unwrap_or_else(|| "unknown".to_string());
            let active = self.proxy.store.load(endpoints) + 1;
            let Some(r) = self.proxy.retry_budget.try_retry(&service, active) else {
                self.proxy.metrics.retry(&service, "budget_exhausted");
                return done(false, record);
            };
            // The destination's maxRetries, on top of the budget.
            let slot = match &breaker {
                None => None,
                Some(br) => match br.retry() {
                    Some(s) => Some(s),
                    None => {
                        self.proxy.metrics.retry(&service, "overflow");
                        return done(false, record);
                    }
                },
            };
            // The next attempt's body now: the last attempt stops reading
            // the client before the backoff, so it cannot overrun the copy.
            if let Some(b) = &body {
                match b.reader() {
                    Some(r) => next_body = Some(r),
                    None => return done(false, record),
                }
            }
            retrying.push((r, slot));
            self.proxy.metrics.retry(&service, "retried");
            n += 1;
            tokio::time::sleep(policy.backoff(n, roll())).await;
            // Another endpoint than those tried, where there is one (Istio's
            // previous-hosts predicate), unless the policy allows them.
            if !policy.previous_hosts {
                tried.push(ep.addr);
            }
            if let Some(next) = self
                .proxy
                .store
                .choose(endpoints, balance, roll(), hash, &tried)
            {
                ep = next.clone();
            }
        }
    }
}

fn trace_attr(key: &str, value: &str) -> weft_xds::otlp::KeyValue {
    weft_xds::otlp::KeyValue::string(key, value)
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

/// Whether the upstream refused the stream before processing it (HTTP/2
/// REFUSED_STREAM): safe to send again.
fn refused_stream(e: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// The reply to an injected abort (Envoy's `FI`): the status with Envoy's
/// body, or a trailers-only gRPC response.
fn injected_abort(record: &mut RequestRecord, a: Abort) -> Response<Body> {
    record.flag("FI");
    match a {
        Abort::Http(status) => reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            ABORT_BODY,
        ),
        Abort::Grpc(code) => {
            let mut r = full(StatusCode::OK, Bytes::new());
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            h.insert("grpc-message", HeaderValue::from_static(ABORT_BODY));
            r
        }
    }
}

impl Conn {
    fn new(
        proxy: Arc<Proxy>,
        target: SocketAddr,
        dest: Dest,
        client_ip: IpAddr,
        client_id: Option<Identity>,
    ) -> Arc<Conn> {
        let principal = client_id.as_ref().map(|id| {
            format!(
                "{}/ns/{}/sa/{}",
                id.trust_domain(),
                id.namespace(),
                id.service_account()
            )
        });
        Arc::new(Conn {
            proxy,
            target,
            dest,
            client_ip,
            client_id,
            principal,
        })
    }
}

/// A byte stream upstream: TCP or an HBONE stream.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

// === front ===

impl Proxy {
    /// Accepts HBONE connections until the drain signal.
    pub async fn serve_hbone(self: Arc<Self>, listener: TcpListener) {
        let mut drain = self.drain.clone();
        loop {
            let (tcp, peer) = tokio::select! {
                _ = weft_hbone::server::drained(&mut drain) => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(Box::pin(self.clone().hbone_connection(tcp, peer)));
        }
    }

    async fn hbone_connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let server = match self.certs.server_config(&self.identity).await {
            Ok(s) => s,
            Err(e) => return warn!(%peer, error = %e, "no certificate to serve HBONE with"),
        };
        let accept = tls_accept(server, tcp);
        let tls = match tokio::time::timeout(weft_hbone::HANDSHAKE_TIMEOUT, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return debug!(%peer, error = %e, "TLS handshake failed"),
            Err(_) => return debug!(%peer, "TLS handshake timed out"),
        };
        let peer_id = match peer_identity(tls.get_ref().1.peer_certificates()) {
            Ok(id) => id,
            Err(e) => return debug!(%peer, error = %e, "peer identity"),
        };
        let opts = ServeOptions {
            peer: peer.ip(),
            budget: self.budget.clone(),
            idle_timeout: weft_hbone::SERVER_IDLE_TIMEOUT,
            drain: self.drain.clone(),
        };
        let this = self.clone();
        let served = weft_hbone::server::serve(
            tls,
            opts,
            || {},
            move |req| this.clone().connect(req, peer, peer_id.clone()),
        )
        .await;
        if let Err(e) = served {
            debug!(%peer, error = %e, "HBONE connection ended");
        }
    }

    /// One CONNECT: the client's connection to `target`.
    async fn connect(self: Arc<Self>, req: ConnectRequest, peer: SocketAddr, peer_id: Identity) {
        let target = match req.target() {
            Ok(t) => t,
            Err(e) => {
                debug!(%peer, error = %e, "bad CONNECT");
                return req.refuse(StatusCode::BAD_REQUEST);
            }
        };
        let dest = match self.destination(target) {
            Ok(d) => d,
            Err(why) => {
                warn!(%peer, %target, client = %peer_id, "CONNECT refused: {why}");
                return req.refuse(StatusCode::BAD_REQUEST);
            }
        };
        let client_ip = self.client_ip(req.forwarded_for(), peer.ip(), &peer_id);
        let stream = match req.accept() {
            Ok(s) => s,
            Err(e) => return debug!(%peer, error = %e, "CONNECT accept"),
        };
        let conn = Conn::new(self, target, dest, client_ip, Some(peer_id));
        conn.serve(stream).await;
    }

    /// What `target` (a VIP or a pod address, and port) reaches, if it is
    /// bound to this waypoint. Anything else is refused: a waypoint is not
    /// an open proxy into the mesh with its own identity.
    fn destination(&self, target: SocketAddr) -> Result<Dest, &'static str> {
        let state = self.store.snapshot();
        match (
            state.service_by_vip(target.ip()),
            state.workload_by_ip(target.ip()),
        ) {
            (Some(s), _) if self.is_me(s.waypoint.as_ref()) => Ok(Dest::Service(s.clone())),
            (None, Some(w)) if self.is_me(w.waypoint.as_ref()) => Ok(Dest::Workload(w.clone())),
            (Some(_), _) => Err("the service does not use this waypoint"),
            (None, Some(_)) => Err("the workload does not use this waypoint"),
            (None, None) => Err("unknown address"),
        }
    }

    /// Whether a binding names this waypoint (its Gateway's Service).
    fn is_me(&self, waypoint: Option<&WaypointRef>) -> bool {
        waypoint.is_some_and(|w| names(w, &self.gateway, self.identity.namespace()))
    }

    /// The client's address: the peer's (ztunnel dials from the client
    /// pod's own address), or a `Forwarded: for=` only when the workload
    /// at that address has the identity the peer proved.
    fn client_ip(&self, forwarded: Option<IpAddr>, peer: IpAddr, peer_id: &Identity) -> IpAddr {
        let Some(claimed) = forwarded.filter(|ip| *ip != peer) else {
            return peer;
        };
        let state = self.store.snapshot();
        let vouched = state
            .workload_by_ip(claimed)
            .is_some_and(|w| w.identity().ok().as_ref() == Some(peer_id));
        if vouched {
            claimed
        } else {
            debug!(%peer, %claimed, client = %peer_id, "Forwarded names another workload; using the peer");
            peer
        }
    }

    /// Benchmarks only: plain HTTP on `listener`, every connection handled
    /// as if it were a CONNECT to `target` (the same engine as behind HBONE,
    /// without TLS in front), so it compares with a plain proxy.
    pub async fn serve_plain(self: Arc<Self>, listener: TcpListener, target: SocketAddr) {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let dest = match self.destination(target) {
                Ok(d) => d,
                Err(why) => {
                    warn!(%target, "plain HTTP: {why}");
                    continue;
                }
            };
            let conn = Conn::new(self.clone(), target, dest, peer.ip(), None);
            tokio::spawn(conn.serve(tcp));
        }
    }
}

impl Conn {
    /// Sniffs the protocol and serves the connection.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self: Arc<Self>, mut io: S) {
        // The service port's declared protocol decides, as in Istio; only
        // an undeclared one is sniffed.
        let declared = match &self.dest {
            Dest::Service(svc) => port_protocol(svc, self.target.port()),
            Dest::Workload(_) => AppProtocol::Unknown,
        };
        if matches!(declared, AppProtocol::Tcp | AppProtocol::Tls) {
            return self.forward_tcp(io).await;
        }
        let wait = if declared.is_http() {
            HTTP_FIRST_BYTES
        } else {
            SNIFF_TIMEOUT
        };
        let mut buf = vec![0u8; 64];
        let mut have = 0;
        let deadline = tokio::time::Instant::now() + wait;
        while have < 16 {
            match tokio::time::timeout_at(deadline, io.read(&mut buf[have..])).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    if have == 0 {
                        return;
                    }
                    break;
                }
                Ok(Ok(n)) => have += n,
                Err(_) => break,
            }
            if !could_be_http(&buf[..have]) {
                break;
            }
        }
        buf.truncate(have);
        let io = Rewind {
            prefix: Bytes::from(buf),
            inner: io,
        };
        if io.prefix.starts_with(H2_PREFACE) {
            let this = self.clone();
            let service = service_fn(move |req| {
                let this = this.clone();
                async move { Ok::<_, Infallible>(this.request(req).await) }
            });
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(io), service)
                .await;
            if let Err(e) = served {
                debug!(client = %self.client_ip, error = %e, "HTTP/2 connection ended");
            }
        } else if is_http1(&io.prefix) || (declared.is_http() && !io.prefix.is_empty()) {
            let this = self.clone();
            let service = service_fn(move |req| {
                let this = this.clone();
                async move { Ok::<_, Infallible>(this.request(req).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                debug!(client = %self.client_ip, error = %e, "HTTP/1.1 connection ended");
            }
        } else if declared.is_http() {
            // Declared HTTP but silent or not HTTP: never forwarded at L4,
            // where HTTP policy could not see it.
            debug!(client = %self.client_ip, target = %self.target, "not HTTP on an HTTP port; closed");
        } else {
            self.forward_tcp(io).await;
        }
    }

    /// L4: the bytes as they are, to an endpoint of the destination.
    async fn forward_tcp<S: AsyncRead + AsyncWrite + Unpin + Send>(&self, mut io: S) {
        let state = self.proxy.store.snapshot();
        let empty = HeaderMap::new();
        let info = RequestInfo {
            method: "",
            path: "",
            query: None,
            authority: "",
            port: self.target.port(),
            headers: &empty,
        };
        if let Err(policy) = self.decide(&state, &info, true) {
            self.proxy.metrics.l4("denied");
            return info!(target: "access", client = %self.client_ip, target = %self.target, policy = %policy, "TCP connection denied");
        }
        let (endpoint, limits) = match &self.dest {
            Dest::Service(svc) => {
                let (eps, balance, policy) = state.endpoints(svc, self.target.port(), "");
                let hash = match &balance {
                    Balance::Hash(h) => h.connection_key(self.client_ip),
                    _ => None,
                };
                (
                    self.proxy
                        .store
                        .choose(&eps, &balance, roll(), hash, &[])
                        .cloned(),
                    policy.limits,
                )
            }
            Dest::Workload(w) => (
                Some(Endpoint {
                    workload: w.clone(),
                    addr: self.target,
                }),
                Limits::default(),
            ),
        };
        let Some(ep) = endpoint else {
            self.proxy.metrics.l4("no_endpoint");
            return warn!(target = %self.target, "TCP: no endpoint");
        };
        match self
            .proxy
            .upstream(
                &ep,
                Some(self.client_ip),
                match &self.dest {
                    Dest::Service(s) => Some(s.hostname.as_str()),
                    Dest::Workload(_) => None,
                },
                &limits,
            )
            .await
        {
            Ok(mut up) => {
                self.proxy.metrics.l4("forwarded");
                let dst_id = ep.workload.identity().ok();
                let svc = match &self.dest {
                    Dest::Service(s) => Some(s.as_ref()),
                    Dest::Workload(_) => None,
                };
                let labels = Metrics::tcp_labels(
                    &Peer {
                        workload: state.workload_by_ip(self.client_ip).map(|w| w.as_ref()),
                        identity: self.client_id.as_ref(),
                        service: None,
                    },
                    &Peer {
                        workload: Some(&ep.workload),
                        identity: dst_id.as_ref(),
                        service: svc,
                    },
                );
                self.proxy.metrics.tcp_opened(&labels);
                let (received, sent) = tokio::io::copy_bidirectional(&mut io, &mut up)
                    .await
                    .unwrap_or((0, 0));
                self.proxy.metrics.tcp_closed(&labels, received, sent);
            }
            Err(e) => {
                self.proxy.metrics.l4("connect_failed");
                warn!(target = %self.target, endpoint = %ep.addr, error = %e, "TCP: upstream connect failed")
            }
        }
    }

    /// One HTTP request: route, pick, forward, answer.
    async fn request(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let state = self.proxy.store.snapshot();
        let mut record = RequestRecord::new(&req, self.client_ip, self.client_id.as_ref());
        record.source(state.workload_by_ip(self.client_ip));
        record.trace = self
            .proxy
            .tracer
            .start(state.tracing(), req.headers(), roll);
        if record.trace.is_some()
            && let Some(t) = state.tracing()
        {
            record.trace_tags = trace::custom_tags(t, req.headers());
        }
        let user_agent = record.trace.as_ref().and_then(|_| {
            req.headers()
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        });
        let version = req.version();
        let mut resp = self.route(&state, req, &mut record).await;
        for (name, value) in record.cors.take().iter().flatten() {
            resp.headers_mut().insert(name, value.clone());
        }
        let size = resp.body().size_hint().exact().unwrap_or(0);
        record.finish(resp.status(), start.elapsed(), size);
        if record.grpc {
            // A trailers-only answer (an error, or an injected abort).
            record.grpc_status = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
        }
        if let Some(active) = record.trace.take() {
            let name = match &record.service {
                Some(s) => format!("{}:{}/*", s.hostname, self.target.port()),
                None => format!("{}/*", self.target),
            };
            let mut attributes = vec![
                trace_attr("http.method", &record.method),
                trace_attr(
                    "http.url",
                    &format!("http://{}{}", record.authority, record.path),
                ),
                trace_attr("http.protocol", &format!("{version:?}")),
                trace_attr("component", "proxy"),
                trace_attr("response_flags", &record.flags),
                trace_attr("upstream_cluster", &record.cluster),
                trace::peer(self.client_ip),
                trace_attr("node_id", &self.proxy.identity.to_string()),
            ];
            if let Some(ua) = user_agent {
                attributes.push(trace_attr("user_agent", &ua));
            }
            if let Some(u) = record.upstream {
                attributes.push(trace_attr("upstream_address", &u.to_string()));
            }
            if let Some(w) = &record.destination {
                attributes.push(trace_attr("istio.canonical_service", &w.canonical_name));
                attributes.push(trace_attr("istio.namespace", &w.namespace));
            }
            attributes.extend(record.trace_tags.iter().cloned());
            self.proxy
                .tracer
                .end(active, name, attributes, resp.status().as_u16());
        }
        info!(
            target: "access",
            method = %record.method,
            path = %record.path,
            authority = %record.authority,
            status = resp.status().as_u16(),
            flags = %record.flags,
            route = %record.route,
            upstream = %record.upstream.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            client = %self.client_ip,
            duration_ms = start.elapsed().as_millis() as u64,
            "request"
        );
        // The metrics go out when the body ends: its size, the whole
        // duration, a gRPC status in its trailers.
        let (parts, body) = resp.into_parts();
        let body = Recorded::new(body, record, self.proxy.metrics.clone(), start);
        Response::from_parts(parts, body.boxed())
    }

    async fn route(
        &self,
        state: &State,
        req: Request<Incoming>,
        record: &mut RequestRecord,
    ) -> Response<Body> {
        let (svc_key, dest_service) = match &self.dest {
            Dest::Service(s) => (
                Some(format!("{}/{}", s.namespace, s.hostname)),
                Some(s.clone()),
            ),
            Dest::Workload(_) => (None, None),
        };
        record.destination(dest_service.as_ref());
        let table = svc_key.as_deref().and_then(|k| state.route(k));
        // Policy, routing and the upstream all see the normalized path.
        let mut req = req;
        let Ok(path) = path::normalize(req.uri().path()) else {
            return local(record, StatusCode::BAD_REQUEST, "", "Bad Request");
        };
        let query = req.uri().query().map(str::to_string);
        if path != req.uri().path() {
            let mut uri = req.uri().clone().into_parts();
            let pq = match &query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            match pq.parse() {
                Ok(pq) => uri.path_and_query = Some(pq),
                Err(_) => return local(record, StatusCode::BAD_REQUEST, "", "Bad Request"),
            }
            match http::Uri::from_parts(uri) {
                Ok(u) => *req.uri_mut() = u,
                Err(_) => return local(record, StatusCode::BAD_REQUEST, "", "Bad Request"),
            }
        }
        let authority = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or_default()
            .to_string();
        let info = RequestInfo {
            method: req.method().as_str(),
            path: &path,
            query: query.as_deref(),
            authority: &authority,
            port: self.target.port(),
            headers: req.headers(),
        };
        // Only WebSocket may upgrade, as Envoy's default upgrade_configs: an
        // `h2c` or other upgrade would carry requests the policy never sees.
        if is_upgrade(req.headers()) && !is_websocket(req.headers()) {
            return local(record, StatusCode::FORBIDDEN, "", "");
        }
        // L7 authorization first, as Envoy's RBAC filter runs before the router.
        if let Some(denied) = self.authorize(state, &info, record) {
            return denied;
        }
        let rule: Option<&Rule> = match table {
            Some(t) => match t.find(&info) {
                Some(r) => Some(r),
                None => return local(record, StatusCode::NOT_FOUND, "NR", ""),
            },
            None => None,
        };
        if let Some(r) = rule {
            record.route = r.name.clone();
        }
        // CORS, after authorization and before faults as in Istio's filter
        // chain: a preflight is answered here; the answer to a CORS request,
        // from upstream or local (an abort, a 503), gets the allow headers.
        if let Some(c) = rule.and_then(|r| r.cors.as_ref()) {
            match c.verdict(req.method(), req.headers()) {
                cors::Verdict::Pass => {}
                cors::Verdict::Decorate(h) => record.cors = Some(h),
                cors::Verdict::Answer(h) => {
                    let mut resp = full(StatusCode::OK, Bytes::new());
                    resp.headers_mut().extend(h);
                    return resp;
                }
            }
        }
        // Faults, as Envoy's fault filter before the router: a delay, then an abort.
        if let Some(f) = rule.and_then(|r| r.fault.as_ref()) {
            if let Some(d) = f.delay(roll()) {
                record.flag("DI");
                tokio::time::sleep(d).await;
            }
            if let Some(a) = f.abort(roll()) {
                return injected_abort(record, a);
            }
        }
        // The endpoints: the rule's backend's, or the destination's.
        let (endpoints, balance, backend, upstream_protocol, pool) = match rule.map(|r| &r.action) {
            Some(Action::Direct { status, body }) => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
                let mut resp = full(status, Bytes::from(body.clone()));
                if let Some(r) = rule {
                    r.response_headers.apply(resp.headers_mut());
                }
                return resp;
            }
            Some(Action::Redirect(rd)) => {
                let scheme = rd.scheme.as_deref().unwrap_or("http");
                let host = redirect_host(&authority, rd.authority.as_deref(), rd.port, scheme);
                let matched = rule.and_then(|r| r.matches.iter().find(|m| m.matches(&info)));
                let new_path = match &rd.path {
                    Some(p) => rewrite_path(
                        &path,
                        query.as_deref(),
                        p,
                        matched.and_then(|m| m.path_prefix()),
                    ),
                    None => req
                        .uri()
                        .path_and_query()
                        .map(|p| p.to_string())
                        .unwrap_or(path.clone()),
                };
                let mut resp = full(
                    StatusCode::from_u16(rd.status).unwrap_or(StatusCode::MOVED_PERMANENTLY),
                    Bytes::new(),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("{scheme}://{host}{new_path}")) {
                    resp.headers_mut().insert(http::header::LOCATION, v);
                }
                return resp;
            }
            Some(Action::Forward(backends)) => {
                let Some(b) = Rule::pick(backends, roll() as u32) else {
                    return local(
                        record,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "UH",
                        "no healthy upstream",
                    );
                };
                let key = format!("{}/{}", b.namespace, b.hostname);
                let Some(svc) = state.service(&key) else {
                    return local(
                        record,
                        StatusCode::SERVICE_UNAVAILABLE,
                        "NC",
                        "no healthy upstream",
                    );
                };
                record.destination(Some(svc));
                let port = if b.port == 0 {
                    self.target.port()
                } else {
                    b.port
                };
                let (eps, balance, pool) = state.endpoints(svc, port, &b.subset);
                record.cluster(port, &b.subset, &svc.hostname);
                (eps, balance, Some(b), port_protocol(svc, port), pool)
            }
            None => match &self.dest {
                Dest::Service(svc) => {
                    let (eps, balance, pool) = state.endpoints(svc, self.target.port(), "");
                    record.cluster(self.target.port(), "", &svc.hostname);
                    (
                        eps,
                        balance,
                        None,
                        port_protocol(svc, self.target.port()),
                        pool,
                    )
                }
                Dest::Workload(w) => (
                    {
                        record.cluster(self.target.port(), "", self.target.ip());
                        vec![Endpoint {
                            workload: w.clone(),
                            addr: self.target,
                        }]
                    },
                    Balance::LeastRequest,
                    None,
                    AppProtocol::Unknown,
                    DestPolicy::default(),
                ),
            },
        };
        let breaker = self.proxy.breakers.get(&pool.key, pool.limits);
        // Ejected endpoints sit out (all come back if every one is out).
        let endpoints = match pool.detection {
            Some(_) => self.proxy.outliers.healthy(&pool.key, endpoints),
            None => endpoints,
        };
        // A consistent hash keys on the request (and may set a cookie on
        // the response).
        let keyed = match &balance {
            Balance::Hash(h) => h.key(req.headers(), query.as_deref(), self.client_ip, roll()),
            _ => Keyed::default(),
        };
        let Some(ep) = self
            .proxy
            .store
            .choose(&endpoints, &balance, roll(), keyed.hash, &[])
            .cloned()
        else {
            return local(
                record,
                StatusCode::SERVICE_UNAVAILABLE,
                "UH",
                "no healthy upstream",
            );
        };
        record.upstream = Some(ep.addr);
        record.destination_workload(&ep.workload);

        // The request as the upstream gets it. An upgrade (WebSocket) keeps
        // the client's side of it, to join with the upstream's after a 101.
        let client_upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        if let Some(rw) = rule.and_then(|r| r.rewrite.as_ref()) {
            if let Some(p) = &rw.path {
                let matched = rule
                    .and_then(|r| {
                        r.matches.iter().find(|m| {
                            m.matches(&info_of(
                                &parts,
                                &path,
                                query.as_deref(),
                                &authority,
                                self.target.port(),
                            ))
                        })
                    })
                    .and_then(|m| m.path_prefix());
                let new = rewrite_path(&path, query.as_deref(), p, matched);
                if let Ok(uri) = new.parse() {
                    parts.uri = uri;
                }
            }
            if let Some(a) = &rw.authority
                && let Ok(v) = HeaderValue::from_str(a)
            {
                parts.headers.insert(http::header::HOST, v);
            }
        }
        if let Some(r) = rule {
            r.request_headers.apply(&mut parts.headers);
        }
        if let Some(b) = backend {
            b.request_headers.apply(&mut parts.headers);
        }
        append_forwarded_for(&mut parts.headers, self.client_ip);
        // Hop-by-hop headers are the client connection's, not the
        // upstream's: a client's `Connection: close` must not close the
        // pooled upstream connection (an upgrade keeps its own).
        strip_hop_by_hop(&mut parts.headers, client_upgrade.is_some());
        // The upstream's protocol, as Istio decides it: the port's declared
        // one (`http` is HTTP/1.1; `http2`, `grpc` are HTTP/2), the
        // client's where it is not declared. An upgrade stays HTTP/1.1.
        let downstream = parts.version;
        let h2_upstream = client_upgrade.is_none() && upstream_is_h2(upstream_protocol, downstream);
        // Mirrors get the request as it is now, with its body copied.
        let mirrors: Vec<&Mirror> = match rule {
            Some(r) if client_upgrade.is_none() => r
                .mirrors
                .iter()
                .filter(|m| crate::fault::hit(m.percent, roll()))
                .collect(),
            _ => Vec::new(),
        };
        let body: Body = body.map_err(BoxError::from).boxed();
        let (body, mut copies) = if mirrors.is_empty() || body.is_end_stream() {
            (body, Vec::new())
        } else {
            let (tee, copies) = Tee::new(body, mirrors.len());
            (tee.boxed(), copies.into_iter().map(Some).collect())
        };
        for (i, m) in mirrors.iter().enumerate() {
            let copy = copies.get_mut(i).and_then(Option::take);
            self.mirror(
                state,
                m,
                parts.clone(),
                copy,
                rule.and_then(|r| r.timeout),
                &authority,
            );
        }
        for_upstream(&mut parts, &authority, h2_upstream);
        let default_retry;
        let policy = match rule {
            Some(r) => &r.retry,
            None => {
                default_retry = retry::Policy::istio_default();
                &default_retry
            }
        };
        // An upgrade is one exchange: never retried.
        let policy = if client_upgrade.is_some() {
            &NO_RETRY
        } else {
            policy
        };
        // The body is kept for a retry only where one may follow; a request
        // without one needs nothing kept.
        let body = if body.is_end_stream() {
            None
        } else {
            let keep = if policy.attempts == 0 {
                0
            } else {
                RETRY_BUFFER_LIMIT
            };
            Some(Recorder::new(body, keep))
        };
        let attempts = self.attempts(
            parts,
            body,
            policy,
            &endpoints,
            (&balance, keyed.hash),
            ep,
            record,
            (breaker, &pool, !h2_upstream),
        );
        // The route's timeout caps every attempt and the waits between them.
        let result = match rule.and_then(|r| r.timeout) {
            Some(t) => match tokio::time::timeout(t, attempts).await {
                Ok(r) => r,
                Err(_) => {
                    return local(
                        record,
                        StatusCode::GATEWAY_TIMEOUT,
                        "UT",
                        "upstream request timeout",
                    );
                }
            },
            None => attempts.await,
        };
        let resp = match result {
            Ok(r) => r,
            Err(Failed { overflow: true, .. }) => {
                return local(
                    record,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UO",
                    "upstream connect error or disconnect/reset before headers. reset reason: overflow",
                );
            }
            Err(Failed {
                outcome, exhausted, ..
            }) => {
                let (status, flag, text) = match outcome {
                    retry::Outcome::ConnectFailure => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        if exhausted { "UF,URX" } else { "UF" },
                        "upstream connect error or disconnect/reset before headers. reset reason: connection failure",
                    ),
                    retry::Outcome::PerTryTimeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        if exhausted { "UT,URX" } else { "UT" },
                        "upstream request timeout",
                    ),
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        if exhausted { "UC,URX" } else { "UC" },
                        "upstream connect error or disconnect/reset before headers. reset reason: connection termination",
                    ),
                };
                return local(record, status, flag, text);
            }
        };
        let mut resp = resp;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match tokio::try_join!(client_upgrade, upstream_upgrade) {
                    Ok((c, u)) => {
                        let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    }
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
            });
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(
            &mut parts.headers,
            parts.status == StatusCode::SWITCHING_PROTOCOLS,
        );
        parts.version = downstream;
        if let Some(b) = backend {
            b.response_headers.apply(&mut parts.headers);
        }
        if let Some(r) = rule {
            r.response_headers.apply(&mut parts.headers);
        }
        if let Some(c) = keyed.set_cookie {
            parts.headers.append(http::header::SET_COOKIE, c);
        }

        Response::from_parts(parts, body.map_err(BoxError::from).boxed())
    }
}

impl Conn {
    /// Sends a copy of the request to mirror `m`, on its own task, its host
    /// suffixed `-shadow`; `copy` brings the body once the client has sent
    /// it (none: the request has no body). Nothing of it reaches the client.
    fn mirror(
        &self,
        state: &State,
        m: &Mirror,
        mut parts: http::request::Parts,
        copy: Option<tokio::sync::oneshot::Receiver<Copied>>,
        timeout: Option<Duration>,
        authority: &str,
    ) {
        let metrics = &self.proxy.metrics;
        let Some(svc) = state.service(&m.service) else {
            debug!(mirror = %m.service, "mirror: no such service");
            return metrics.mirror(&m.service, "dropped");
        };
        let port = if m.port == 0 {
            self.target.port()
        } else {
            m.port
        };
        let (endpoints, balance, pool) = state.endpoints(svc, port, &m.subset);
        let Some(ep) = self
            .proxy
            .store
            .choose(&endpoints, &balance, roll(), None, &[])
            .cloned()
        else {
            return metrics.mirror(&svc.hostname, "dropped");
        };
        let Ok(permit) = self.proxy.mirrors.clone().try_acquire_owned() else {
            return metrics.mirror(&svc.hostname, "dropped");
        };
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or(authority);
        let shadow = shadow_authority(host);
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            parts.headers.insert(http::header::HOST, v);
        }
        let h2 = upstream_is_h2(port_protocol(svc, port), parts.version);
        for_upstream(&mut parts, &shadow, h2);
        let proxy = self.proxy.clone();
        let client = self.client_ip;
        let service = svc.hostname.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let exchange = async {
                let body = match copy {
                    None => empty(),
                    Some(rx) => match rx.await {
                        Ok(c) => c.body(),
                        Err(_) => return "dropped",
                    },
                };
                let req = Request::from_parts(parts, body);
                match proxy
                    .send(&ep, (client, Some(service.as_str())), req, &pool.limits)
                    .await
                {
                    Ok(resp) => {
                        // Read to the end and dropped, so the connection
                        // can carry the next one.
                        let mut body = resp.into_body();
                        while let Some(Ok(_)) = body.frame().await {}
                        "responded"
                    }
                    Err(e) => {
                        debug!(endpoint = %ep.addr, error = %e, "mirror failed");
                        "failed"
                    }
                }
            };
            let outcome = tokio::time::timeout(timeout.unwrap_or(MIRROR_TIMEOUT), exchange)
                .await
                .unwrap_or("timeout");
            proxy.metrics.mirror(&service, outcome);
        });
    }

    /// The policies' decision on a request (or, `tcp`, a connection
    /// forwarded at L4). `Err` names the DENY that matched, or is empty when
    /// no ALLOW did.
    fn decide(&self, state: &State, info: &RequestInfo<'_>, tcp: bool) -> Result<(), String> {
        // A service target is decided by its own policies; a pod target by
        // those of every service it backs, so that dialing the pod is never
        // a way around a service's policy.
        let (one, many): ([&str; 1], Vec<&str>);
        let services: &[&str] = match &self.dest {
            Dest::Service(s) => {
                one = [s.hostname.as_str()];
                &one
            }
            Dest::Workload(w) => {
                many = state
                    .services_of(&w.uid)
                    .iter()
                    .map(|s| s.hostname.as_str())
                    .collect();
                &many
            }
        };
        let req = authz::Request {
            services,
            tcp,
            source_ip: self.client_ip,
            // No X-Forwarded-For hop is trusted (Envoy's default in a
            // waypoint): the client cannot name its own address.
            remote_ip: self.client_ip,
            principal: self.principal.as_deref(),
            namespace: self.client_id.as_ref().map(Identity::namespace),
            host: info.authority,
            method: info.method,
            path: info.path,
            port: info.port,
            destination_ip: self.target.ip(),
            headers: info.headers,
        };
        let (decision, dry_run) = authz::evaluate(state.policies(), &req);
        for policy in dry_run {
            info!(target: "access", %policy, method = %info.method, path = %info.path, client = %self.client_ip, "dry-run policy matched; not enforced");
        }
        match decision {
            Decision::Allow => Ok(()),
            Decision::Deny { policy } => Err(policy),
        }
    }

    /// The L7 policies' decision; `Some(403)` when denied.
    fn authorize(
        &self,
        state: &State,
        info: &RequestInfo<'_>,
        record: &mut RequestRecord,
    ) -> Option<Response<Body>> {
        let policy = self.decide(state, info, false).err()?;
        record.route = if policy.is_empty() {
            "no ALLOW policy matched".into()
        } else {
            format!("denied by {policy}")
        };
        Some(reply(StatusCode::FORBIDDEN, "RBAC: access denied"))
    }
}

fn info_of<'a>(
    parts: &'a http::request::Parts,
    path: &'a str,
    query: Option<&'a str>,
    authority: &'a str,
    port: u16,
) -> RequestInfo<'a> {
    RequestInfo {
        method: parts.method.as_str(),
        path,
        query,
        authority,
        port,
        headers: &parts.headers,
    }
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1 (those `Connection`
/// names, and the fixed ones), as Envoy does; `upgrade` keeps `Connection`
/// and `Upgrade` for a WebSocket handshake. `TE: trailers` stays (gRPC).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !(t.is_empty() || (upgrade && t == "upgrade")))
        .collect();
    for name in &named {
        headers.remove(name.as_str());
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(http::header::CONNECTION);
        headers.remove(http::header::UPGRADE);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(http::header::TE);
    }
}

/// An HTTP/1.1 upgrade request (WebSocket).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The protocol declared for `port` of `svc` (Unknown when none).
fn port_protocol(svc: &Service, port: u16) -> AppProtocol {
    svc.ports
        .iter()
        .find(|p| p.port == port)
        .map_or(AppProtocol::Unknown, |p| p.protocol)
}

/// The Location's host\[:port\] for a redirect from `authority` (a plain
/// HTTP request) to `scheme`, as Envoy builds it: a redirect host replaces
/// host and port (its own port, if written); otherwise the request's port is
/// kept, unless the scheme changes and it was http's own 80. A redirect port
/// replaces either. The scheme's well-known port is never written (80 for
/// http, 443 for https). IPv6 literals keep their brackets.
/// Whether a request goes upstream over HTTP/2: the port's declared
/// protocol, or the client's where it declares none.
fn upstream_is_h2(protocol: AppProtocol, downstream: http::Version) -> bool {
    match protocol {
        AppProtocol::Http2 | AppProtocol::Grpc => true,
        AppProtocol::Http11 => false,
        _ => downstream == http::Version::HTTP_2,
    }
}

/// Makes `parts` (as the client sent them, `authority` its host) a request
/// of the upstream's version.
fn for_upstream(parts: &mut http::request::Parts, authority: &str, h2_upstream: bool) {
    if !h2_upstream && parts.version == http::Version::HTTP_2 {
        // h2 → HTTP/1.1: the authority becomes Host, the URI its path.
        if !parts.headers.contains_key(http::header::HOST)
            && let Ok(v) = HeaderValue::from_str(authority)
        {
            parts.headers.insert(http::header::HOST, v);
        }
        if let Some(pq) = parts.uri.path_and_query().cloned() {
            parts.uri = http::Uri::from(pq);
        }
        parts.version = http::Version::HTTP_11;
    }
    if h2_upstream {
        parts.version = http::Version::HTTP_2;
        // The URI carries scheme and authority.
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(|| authority.to_string());
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        if let Ok(uri) = format!("http://{host}{pq}").parse() {
            parts.uri = uri;
        }
    }
}

fn redirect_host(authority: &str, host: Option<&str>, port: Option<u16>, scheme: &str) -> String {
    let (host, kept) = match host {
        Some(h) => split_authority(h),
        None => {
            let (h, p) = split_authority(authority);
            (h, p.filter(|p| scheme == "http" || *p != "80"))
        }
    };
    let port = port.map(|p| p.to_string()).or(kept.map(str::to_string));
    let well_known = match scheme {
        "https" => "443",
        _ => "80",
    };
    match port {
        Some(p) if p != well_known => format!("{host}:{p}"),
        _ => host.to_string(),
    }
}

/// `host[:port]` or `[v6][:port]` → host (brackets kept) and port.
fn split_authority(a: &str) -> (&str, Option<&str>) {
    if a.starts_with('[') {
        return match a.find(']') {
            Some(end) => (&a[..=end], a[end + 1..].strip_prefix(':')),
            None => (a, None),
        };
    }
    match a.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (a, None),
    }
}

/// Whether `w` is the Service of Gateway `namespace/gateway`
/// (`<gateway>.<namespace>.svc.<domain>`; an unresolvable binding's
/// `.waypoint.invalid` name never is).
fn names(w: &WaypointRef, gateway: &str, namespace: &str) -> bool {
    w.namespace == namespace
        && w.hostname
            .strip_prefix(gateway)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_prefix(namespace))
            .is_some_and(|r| r.starts_with(".svc."))
}

/// An upgrade to WebSocket, the only one the waypoint carries.
fn is_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"))
}

/// Appends the client to `X-Forwarded-For`, as Envoy does for the app and
/// for the waypoint's own `remoteIpBlocks`.
fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => format!("{prev}, {client}"),
        _ => client.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

fn full(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Full::new(body).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r
}

/// A local reply with its response flag.
fn local(
    record: &mut RequestRecord,
    status: StatusCode,
    flag: &'static str,
    text: &str,
) -> Response<Body> {
    record.flag(flag);
    reply(status, text)
}

/// A local reply, as Envoy gives them: status and a short text body.
fn reply(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = full(status, Bytes::copy_from_slice(text.as_bytes()));
    if !text.is_empty() {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
    }
    r
}

/// A cheap random number (xorshift, seeded per thread from the clock).
pub(crate) fn roll() -> u64 {
    use std::cell::Cell;
    thread_local! {
        static SEED: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9e37_79b9_7f4a_7c15);
            t | 1
        });
    }
    SEED.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Whether the bytes so far could still be the start of an HTTP request.
fn could_be_http(b: &[u8]) -> bool {
    if H2_PREFACE.starts_with(&b[..b.len().min(H2_PREFACE.len())]) {
        return true;
    }
    let token = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    token == b.len() || (token >= 3 && b.get(token) == Some(&b' '))
}

/// An HTTP/1.x request line starts with a method token and a space.
fn is_http1(b: &[u8]) -> bool {
    let token = b.iter().take_while(|c| c.is_ascii_uppercase()).count();
    (3..=10).contains(&token) && b.get(token) == Some(&b' ') && !b.starts_with(b"PRI ")
}

// === back ===

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(String),
    #[error("request: {0}")]
    Request(#[source] hyper::Error),
}

impl Proxy {
    /// A byte stream to `ep`: HBONE to a meshed pod (the waypoint's identity,
    /// the pod's required), plain TCP otherwise. `client`, the address the
    /// request came from, goes in HBONE's `Forwarded` (none for the
    /// waypoint's own traffic).
    pub(crate) async fn upstream(
        &self,
        ep: &Endpoint,
        client: Option<IpAddr>,
        service: Option<&str>,
        limits: &Limits,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let connect_timeout = limits.connect_timeout.unwrap_or(CONNECT_TIMEOUT);
        if ep.workload.protocol != TunnelProtocol::Hbone {
            let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(ep.addr))
                .await
                .map_err(|_| UpstreamError::Connect(format!("{}: connect timed out", ep.addr)))?
                .map_err(|e| UpstreamError::Connect(format!("{}: {e}", ep.addr)))?;
            let _ = tcp.set_nodelay(true);
            return Ok(Box::new(tcp));
        }
        let dst_id = ep
            .workload
            .identity()
            .map_err(|e| UpstreamError::Connect(format!("{}: {e}", ep.workload.uid)))?;
        let tls = self
            .certs
            .client_config(&self.identity, &dst_id)
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        let hbone_addr = SocketAddr::new(ep.addr.ip(), weft_hbone::HBONE_PORT);
        let mut headers = HeaderMap::new();
        if let Some(client) = client
            && let Ok(v) = HeaderValue::from_str(&forwarded_header_for(client, service))
        {
            headers.insert("forwarded", v);
        }
        let stream = self
            .hbone
            .stream(&(dst_id, hbone_addr), ep.addr, headers, || {
                let tls = tls.clone();
                async move {
                    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(hbone_addr))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                    tcp.set_nodelay(true)?;
                    let handshake = tls_connect(tls, server_name(hbone_addr.ip()), tcp);
                    tokio::time::timeout(weft_hbone::HANDSHAKE_TIMEOUT, handshake)
                        .await
                        .map_err(|_| {
                            std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "TLS handshake timed out",
                            )
                        })?
                }
            })
            .await
            .map_err(|e: ConnectError| UpstreamError::Connect(e.to_string()))?;
        Ok(Box::new(stream))
    }

    /// Sends `req` to `ep` on a pooled connection, or a new one, within the
    /// destination's per-connection `limits`.
    async fn send(
        self: &Arc<Self>,
        ep: &Endpoint,
        (client, service): (IpAddr, Option<&str>),
        req: Request<Body>,
        limits: &Limits,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let key = (ep.addr, client);
        let idle = limits.idle_timeout.map_or(HTTP_IDLE, |t| t.min(HTTP_IDLE));
        let max_uses = limits.max_requests_per_connection;
        if req.version() == http::Version::HTTP_2 {
            let mut sender = match self.http.h2(&key, idle, max_uses) {
                Some(s) => s,
                None => {
                    let io = self.upstream(ep, Some(client), service, limits).await?;
                    let (sender, conn) = hyper::client::conn::http2::handshake(
                        TokioExecutor::new(),
                        TokioIo::new(io),
                    )
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    if max_uses != 1 {
                        self.http.put_h2(key, sender.clone());
                    }
                    sender
                }
            };
            return sender
                .send_request(req)
                .await
                .map_err(UpstreamError::Request);
        }
        let (mut sender, uses) = match self.http.take(&key, idle) {
            Some(s) => s,
            None => {
                let io = self.upstream(ep, Some(client), service, limits).await?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Connect(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(error = %e, "upstream HTTP connection ended");
                    }
                });
                (sender, 0)
            }
        };
        let resp = sender
            .send_request(req)
            .await
            .map_err(UpstreamError::Request)?;
        // Back to the pool once the response body is done, unless it has
        // carried its `maxRequestsPerConnection`.
        let uses = uses + 1;
        if max_uses == 0 || uses < max_uses {
            let this = self.clone();
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    this.http.put(key, sender, uses);
                }
            });
        }
        Ok(resp)
    }
}

/// An upstream HTTP/1.1 connection: idle since when, and how many requests
/// it has carried.
type Idle = (Instant, SendRequest<Body>, u32);

/// Idle upstream HTTP/1.1 connections, and the one shared HTTP/2
/// connection (with when it last carried a request), by (endpoint, client).
/// Both are closed after [`HTTP_IDLE`] unused.
#[derive(Debug, Default)]
pub struct HttpPool {
    idle: Mutex<HashMap<(SocketAddr, IpAddr), Vec<Idle>>>,
    /// With when it last carried a request, and how many it has carried.
    h2: Mutex<HashMap<(SocketAddr, IpAddr), Shared>>,
}

type H2Sender = hyper::client::conn::http2::SendRequest<Body>;
/// The shared HTTP/2 connection: last used, requests carried, sender.
type Shared = (Instant, u32, H2Sender);

impl HttpPool {
    /// The shared HTTP/2 connection to `key`, unless idle longer than
    /// `idle`; one that reaches `max_uses` requests (0: no limit) is handed
    /// out a last time and no longer shared.
    fn h2(&self, key: &(SocketAddr, IpAddr), idle: Duration, max_uses: u32) -> Option<H2Sender> {
        let mut h2 = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        let (used, uses, s) = h2.get_mut(key)?;
        if s.is_closed() || used.elapsed() >= idle {
            h2.remove(key);
            return None;
        }
        *used = Instant::now();
        *uses += 1;
        let sender = s.clone();
        if max_uses > 0 && *uses >= max_uses {
            h2.remove(key);
        }
        Some(sender)
    }

    fn put_h2(&self, key: (SocketAddr, IpAddr), s: H2Sender) {
        self.h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, (Instant::now(), 1, s));
    }

    /// An idle HTTP/1.1 connection to `key`, idle less than `idle`, and
    /// the requests it has carried.
    fn take(&self, key: &(SocketAddr, IpAddr), idle: Duration) -> Option<(SendRequest<Body>, u32)> {
        let mut pool = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = pool.get_mut(key)?;
        while let Some((at, s, uses)) = list.pop() {
            if at.elapsed() < idle && s.is_ready() {
                return Some((s, uses));
            }
        }
        pool.remove(key);
        None
    }

    fn put(&self, key: (SocketAddr, IpAddr), s: SendRequest<Body>, uses: u32) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(key).or_default();
        // Stale entries are swept by `evict_idle` and skipped by `take`;
        // sweeping here too, on every response, cost a clock read per entry.
        if list.len() >= HTTP_IDLE_MAX {
            list.retain(|(at, s, _)| at.elapsed() < HTTP_IDLE && !s.is_closed());
        }
        if list.len() < HTTP_IDLE_MAX {
            list.push((Instant::now(), s, uses));
        }
    }

    /// Drops connections idle too long or closed, and keys left empty.
    pub fn evict_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|_, list| {
            list.retain(|(at, s, _)| at.elapsed() < HTTP_IDLE && !s.is_closed());
            !list.is_empty()
        });
        drop(idle);
        self.h2
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            // Dropping the last sender closes the connection once its
            // streams finish.
            .retain(|_, (used, _, s)| used.elapsed() < HTTP_IDLE && !s.is_closed());
    }
}

/// A stream whose first bytes were already read (to sniff the protocol):
/// they are served again before the rest.
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing() {
        assert!(is_http1(b"GET / HTTP/1.1\r\n"));
        assert!(is_http1(b"DELETE /x HTTP/1.1"));
        assert!(!is_http1(b"PRI * HTTP/2.0\r\n"));
        assert!(!is_http1(b"\x16\x03\x01\x02"), "TLS is forwarded as TCP");
        assert!(!is_http1(b"hello"));
        assert!(could_be_http(b"GE"));
        assert!(could_be_http(b"PRI * HT"));
        assert!(!could_be_http(b"\x16\x03"));
        assert!(!could_be_http(b"SSH-2.0"));
    }

    #[test]
    fn only_its_own_bindings() {
        let r = |ns: &str, host: &str| WaypointRef {
            namespace: ns.into(),
            hostname: host.into(),
            port: 15008,
        };
        assert!(names(
            &r("shop", "waypoint.shop.svc.cluster.local"),
            "waypoint",
            "shop"
        ));
        for (w, why) in [
            (r("shop", "other.shop.svc.cluster.local"), "another gateway"),
            (
                r("ops", "waypoint.ops.svc.cluster.local"),
                "another namespace",
            ),
            (
                r("shop", "waypoint2.shop.svc.cluster.local"),
                "a longer name",
            ),
            (r("shop", "waypoint.shop.waypoint.invalid"), "unresolvable"),
            (
                r("shop", "waypoint.shopping.svc.cluster.local"),
                "a longer namespace",
            ),
        ] {
            assert!(!names(&w, "waypoint", "shop"), "{why}");
        }
    }

    #[test]
    fn redirect_hosts() {
        for (authority, host, port, scheme, want) in [
            ("reviews:9080", None, None, "http", "reviews:9080"),
            ("reviews:9080", Some("new"), None, "http", "new"),
            ("reviews:9080", Some("new"), Some(8443), "https", "new:8443"),
            ("reviews:9080", None, None, "https", "reviews:9080"),
            ("reviews:80", None, None, "https", "reviews"),
            ("reviews:9080", None, Some(443), "https", "reviews"),
            ("reviews:80", None, None, "http", "reviews"),
            ("reviews", None, Some(81), "http", "reviews:81"),
            ("[fd00::1]:9080", None, None, "http", "[fd00::1]:9080"),
            (
                "[fd00::1]",
                Some("[fd00::2]:7"),
                None,
                "http",
                "[fd00::2]:7",
            ),
        ] {
            assert_eq!(
                redirect_host(authority, host, port, scheme),
                want,
                "{authority} {host:?}"
            );
        }
    }

    #[test]
    fn only_websocket_upgrades() {
        let h = |upgrade: &str| {
            let mut h = HeaderMap::new();
            h.insert("upgrade", upgrade.parse().unwrap());
            h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
            h
        };
        assert!(is_upgrade(&h("websocket")) && is_websocket(&h("WebSocket")));
        assert!(is_upgrade(&h("h2c")) && !is_websocket(&h("h2c")));
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "x-kept"]);
        let mut ws = HeaderMap::new();
        ws.insert("connection", "Upgrade".parse().unwrap());
        ws.insert("upgrade", "websocket".parse().unwrap());
        strip_hop_by_hop(&mut ws, true);
        assert!(is_upgrade(&ws), "a WebSocket handshake keeps its headers");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        append_forwarded_for(&mut h, "10.0.0.2".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.2");
    }
}
