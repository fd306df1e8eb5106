//! The accepting side of HBONE: HTTP/2 over an established TLS stream, one
//! handler call per `CONNECT` request.
//!
//! Start at [`serve`]. TLS and the peer's identity are the caller's business
//! (see [`crate::tls`]); this module owns HTTP/2 limits and request parsing.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{
    CONNECTION_WINDOW, H2Stream, HANDSHAKE_TIMEOUT, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE, STREAM_WINDOW,
};

/// One `CONNECT` request, not yet answered.
#[derive(Debug)]
pub struct ConnectRequest {
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("HTTP/2 handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("HTTP/2 handshake failed (not an HBONE client?): {0}")]
    Handshake(#[source] h2::Error),
    #[error("HTTP/2 connection failed: {0}")]
    Connection(#[source] h2::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("method {0} is not CONNECT")]
    Method(Method),
    #[error("CONNECT authority {0:?} is not ip:port")]
    Authority(String),
    #[error("cannot answer the CONNECT request: {0}")]
    Respond(#[source] h2::Error),
}

/// Serves HTTP/2 on `io`, calling `handler` (spawned) for each CONNECT request.
/// Other methods get 405. Returns when the peer closes the connection.
pub async fn serve<S, F, Fut>(io: S, handler: F) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(ConnectRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(1024 * 1024)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(ServeError::Handshake)?;
    while let Some(next) = conn.accept().await {
        let (request, mut respond) = next.map_err(ServeError::Connection)?;
        if request.method() != Method::CONNECT {
            debug!(method = %request.method(), "refusing non-CONNECT request");
            let _ = respond.send_response(status(StatusCode::METHOD_NOT_ALLOWED), true);
            continue;
        }
        tokio::spawn(handler(ConnectRequest { request, respond }));
    }
    Ok(())
}

fn status(code: StatusCode) -> Response<()> {
    let mut r = Response::new(());
    *r.status_mut() = code;
    r
}

// === impl ConnectRequest ===

impl ConnectRequest {
    /// The destination the peer asks for: `:authority` as `ip:port`.
    pub fn target(&self) -> Result<SocketAddr, RequestError> {
        let authority = self
            .request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default();
        authority
            .parse()
            .map_err(|_| RequestError::Authority(authority.to_string()))
    }

    /// The original client address from `Forwarded: for=`.
    pub fn forwarded_for(&self) -> Option<IpAddr> {
        self.header("forwarded").and_then(parse_forwarded_for)
    }

    /// A request header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request.headers().get(name)?.to_str().ok()
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(self) -> Result<H2Stream, RequestError> {
        let ConnectRequest {
            request,
            mut respond,
        } = self;
        let send = respond
            .send_response(status(StatusCode::OK), false)
            .map_err(RequestError::Respond)?;
        Ok(H2Stream::new(send, request.into_body()))
    }

    /// Answers with an error status and closes the stream.
    pub fn refuse(mut self, code: StatusCode) {
        let _ = self.respond.send_response(status(code), true);
    }
}

/// Parses the first `for=` of an RFC 7239 `Forwarded` header:
/// `for=10.0.0.1`, `for="10.0.0.1:4711"`, `for="[2001:db8::1]:4711"`.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let node = value
        .split([',', ';'])
        .map(str::trim)
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
        })?
        .trim_matches('"');
    if let Ok(ip) = node.parse() {
        return Some(ip);
    }
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    node.strip_prefix('[')
        .and_then(|n| n.split(']').next())
        .and_then(|n| n.parse().ok())
}

/// The `Forwarded` header value carrying `ip`.
pub fn forwarded_header(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forwarded parsing accepts RFC 7239 forms and refuses the rest.
    #[test]
    fn forwarded_for() {
        for (input, want) in [
            ("for=10.0.0.1", Some("10.0.0.1")),
            ("For=\"10.0.0.1:4711\"", Some("10.0.0.1")),
            ("for=\"[2001:db8::1]:4711\"", Some("2001:db8::1")),
            ("for=\"[2001:db8::1]\"", Some("2001:db8::1")),
            ("proto=https;for=10.1.2.3;by=10.0.0.9", Some("10.1.2.3")),
            ("for=10.0.0.1, for=10.0.0.2", Some("10.0.0.1")),
            ("for=unknown", None),
            ("for=_hidden", None),
            ("by=10.0.0.1", None),
            ("", None),
        ] {
            assert_eq!(
                parse_forwarded_for(input),
                want.map(|w| w.parse().unwrap()),
                "{input}"
            );
        }
    }

    /// What we write is what we read.
    #[test]
    fn forwarded_round_trip() {
        for ip in ["10.0.0.1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_header(ip)), Some(ip));
        }
    }
}
