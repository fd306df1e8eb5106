//! Small HTTP/1 servers: admin (`/config_dump`), Prometheus (`/metrics`), readiness
//! (`/healthz/ready`). Each is a plain function from path to response.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// A TCP listener on `addr` with SO_REUSEADDR and SO_REUSEPORT, so a process
/// taking over from a running one binds beside it; `transparent` adds
/// IP_TRANSPARENT (connections for any address steered to it).
pub fn reuse_port_listener(addr: SocketAddr, transparent: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if transparent {
        socket.set_ip_transparent_v4(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A response: status, content type, body.
pub type Reply = (StatusCode, &'static str, String);

/// Maps a request path to a reply.
pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

pub const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";
/// What Prometheus negotiates for the OpenMetrics text prometheus-client writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `addr` now (so a busy port fails startup) and serves `handler` in
/// the background; returns the address bound (port 0 gets the kernel's
/// choice). SO_REUSEPORT: a process taking over from a running one (a
/// restart handover) binds beside it.
pub async fn serve(
    name: &'static str,
    addr: SocketAddr,
    handler: Handler,
) -> std::io::Result<SocketAddr> {
    let listener = reuse_port_listener(addr, false)?;
    let addr = listener.local_addr()?;
    info!(component = name, address = %addr, "listener established");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (status, content_type, body) = if req.method() == http::Method::GET {
                        handler(req.uri().path())
                    } else {
                        (StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into())
                    };
                    let resp = Response::builder()
                        .status(status)
                        .header(header::CONTENT_TYPE, content_type)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap_or_default();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(error) = conn.await {
                    debug!(component = name, %error, "admin connection error");
                }
            });
        }
    });
    Ok(addr)
}
