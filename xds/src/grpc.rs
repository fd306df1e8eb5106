//! The two gRPC calls, over our own TLS: delta ADS
//! (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`)
//! and `istio.v1.auth.IstioCertificateService/CreateCertificate`.
//!
//! [`Server`] routes both to a [`ControlPlane`] implementation (the
//! controller); [`connect`], [`delta_ads`] and [`create_certificate`] are the
//! client side (ztunnel, benchmarks).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::codec::Streaming;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

use crate::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

pub const DELTA_ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";

/// Largest xDS request the server decodes: subscriptions and ACKs are small.
pub const MAX_XDS_REQUEST: usize = 4 << 20;
/// Largest CSR request: a PEM request is well under 2 KiB.
pub const MAX_CSR_REQUEST: usize = 64 << 10;
/// Largest xDS response the client decodes (a full push of a big cluster), as Istio's ztunnel.
pub const MAX_XDS_RESPONSE: usize = 200 << 20;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The response stream of a delta ADS call, as servers return it.
pub type BoxedDeltaStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

/// What the controller implements.
pub trait ControlPlane: Send + Sync + 'static {
    type DeltaStream: Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send + 'static;

    fn delta_aggregated_resources(
        self: Arc<Self>,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> impl Future<Output = Result<Response<Self::DeltaStream>, Status>> + Send + 'static;

    fn create_certificate(
        self: Arc<Self>,
        request: Request<IstioCertificateRequest>,
    ) -> impl Future<Output = Result<Response<IstioCertificateResponse>, Status>> + Send + 'static;
}

/// A tower service routing the two calls to a [`ControlPlane`]; anything
/// else is answered `UNIMPLEMENTED`.
#[derive(Debug)]
pub struct Server<T>(Arc<T>);

impl<T> Server<T> {
    pub fn new(inner: Arc<T>) -> Self {
        Server(inner)
    }
}

impl<T> Clone for Server<T> {
    fn clone(&self) -> Self {
        Server(self.0.clone())
    }
}

impl<T: ControlPlane> tower_service::Service<http::Request<Body>> for Server<T> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let inner = self.0.clone();
        match req.uri().path() {
            DELTA_ADS_PATH => Box::pin(async move {
                let svc = tower::service_fn(move |r| inner.clone().delta_aggregated_resources(r));
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default())
                    .max_decoding_message_size(MAX_XDS_REQUEST)
                    .max_encoding_message_size(usize::MAX);
                Ok(grpc.streaming(svc, req).await)
            }),
            CREATE_CERTIFICATE_PATH => Box::pin(async move {
                let svc = tower::service_fn(move |r| inner.clone().create_certificate(r));
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default())
                    .max_decoding_message_size(MAX_CSR_REQUEST);
                Ok(grpc.unary(svc, req).await)
            }),
            path => {
                let status = Status::unimplemented(format!("no method {path}"));
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// The TLS client config for one dial. Asked again at every dial, so a
/// control plane whose certificate moved to a new root (root rotation) is
/// trusted once the new root is known, without a restart.
pub type ClientTls = Arc<dyn Fn() -> Result<Arc<rustls::ClientConfig>, String> + Send + Sync>;

/// Where the control plane is and how to trust it.
#[derive(Clone)]
pub struct ControlPlaneAddress {
    /// `host:port` or `ip:port`; a name is resolved again at every dial,
    /// so a Service whose address changes is followed.
    pub addr: String,
    /// The name its certificate must carry.
    pub server_name: String,
    /// Trusts the mesh root (or whatever signs the control plane's certificate).
    pub tls: ClientTls,
}

impl std::fmt::Debug for ControlPlaneAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneAddress")
            .field("addr", &self.addr)
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ControlPlaneAddress {
    /// A control plane at `addr` (`host:port` or `ip:port`), trusted by one
    /// fixed config.
    pub fn fixed(
        addr: impl Into<String>,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        ControlPlaneAddress {
            addr: addr.into(),
            server_name: server_name.to_string(),
            tls: Arc::new(move || Ok(tls.clone())),
        }
    }
}

/// Whether `v` is a control plane address: `host:port` or `ip:port`
/// (`[v6]:port`).
pub fn is_address(v: &str) -> bool {
    if v.parse::<SocketAddr>().is_ok() {
        return true;
    }
    match v.rsplit_once(':') {
        Some((host, port)) => {
            port.parse::<u16>().is_ok_and(|p| p > 0)
                && !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|l| {
                    !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        }
        None => false,
    }
}

/// A lazily connecting channel over TLS; requests fail fast while the
/// control plane is unreachable and the channel reconnects on the next one.
pub fn connect(cp: &ControlPlaneAddress) -> Result<Channel, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("https://{}", cp.addr))?;
    let cp = cp.clone();
    let connector = tower::service_fn(move |_: http::Uri| {
        let cp = cp.clone();
        async move {
            let name = ServerName::try_from(cp.server_name.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let config = (cp.tls)().map_err(std::io::Error::other)?;
            let tcp = TcpStream::connect(cp.addr.as_str()).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(connector))
}

fn authorized<T>(msg: T, token: &str) -> Result<Request<T>, Status> {
    let mut req = Request::new(msg);
    let value = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| Status::invalid_argument("token is not a valid header value"))?;
    req.metadata_mut().insert("authorization", value);
    Ok(req)
}

/// Opens the delta ADS stream, sending `requests` as they come.
pub async fn delta_ads(
    channel: Channel,
    token: &str,
    requests: impl Stream<Item = DeltaDiscoveryRequest> + Send + 'static,
) -> Result<Streaming<DeltaDiscoveryResponse>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_XDS_RESPONSE);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("control plane unreachable: {e}")))?;
    let resp = grpc
        .streaming(
            authorized(requests, token)?,
            PathAndQuery::from_static(DELTA_ADS_PATH),
            ProstCodec::default(),
        )
        .await?;
    Ok(resp.into_inner())
}

/// Asks the CA to sign a CSR.
pub async fn create_certificate(
    channel: Channel,
    token: &str,
    request: IstioCertificateRequest,
) -> Result<IstioCertificateResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("CA unreachable: {e}")))?;
    let resp = grpc
        .unary(
            authorized(request, token)?,
            PathAndQuery::from_static(CREATE_CERTIFICATE_PATH),
            ProstCodec::default(),
        )
        .await?;
    Ok(resp.into_inner())
}

/// The bearer token of a request, if it carries one.
pub fn bearer_token<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.1:15012",
            "[fd00::1]:15012",
            "weft-controller.weft-system.svc:15012",
            "localhost:1",
        ] {
            assert!(is_address(ok), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.1",
            "weft-controller",
            ":15012",
            "host:0",
            "host:99999",
            "a..b:1",
            "a b:1",
            "http://x:1",
        ] {
            assert!(!is_address(bad), "{bad}");
        }
    }
}
