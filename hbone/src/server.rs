//! The accepting side of HBONE: HTTP/2 over an established TLS stream, one
//! handler call per `CONNECT` request.
//!
//! Start at [`serve`]. TLS and the peer's identity are the caller's business
//! (see [`crate::tls`]); this module owns HTTP/2 limits and request parsing.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use crate::{
    CONNECTION_WINDOW, H2Stream, HANDSHAKE_TIMEOUT, MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE,
    MAX_HEADER_LIST_SIZE, MAX_LOCAL_ERROR_RESET_STREAMS, MAX_PENDING_ACCEPT_RESET_STREAMS,
    PREMATURE_RESET_MIN_STREAMS, STREAM_WINDOW,
};

/// One `CONNECT` request, not yet answered. Holds its share of the
/// [`StreamBudget`] until it is dropped.
#[derive(Debug)]
pub struct ConnectRequest {
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    _permit: StreamPermit,
    /// The connection's count of streams the peer reset before they were
    /// answered, within [`PREMATURE_RESET_LIFETIME`] of opening them.
    premature: Arc<AtomicUsize>,
    opened: Instant,
}

/// A stream reset by its peer sooner than this after it opened counts as a
/// premature reset (Envoy's `premature_reset_min_stream_lifetime_seconds`):
/// a client that gives up on a slow dial later is not an attacker.
const PREMATURE_RESET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(1);

/// How many CONNECT streams a server runs at once, in total and per peer
/// address. A stream is taken only with a permit, before its task is
/// spawned: one peer cannot hold more than its share, however many
/// connections it opens.
#[derive(Debug)]
pub struct StreamBudget {
    total: usize,
    per_peer: usize,
    used: Mutex<Used>,
}

#[derive(Debug, Default)]
struct Used {
    total: usize,
    by_peer: HashMap<IpAddr, usize>,
}

/// One admitted stream's share of a [`StreamBudget`], returned on drop.
#[derive(Debug)]
pub struct StreamPermit {
    budget: Arc<StreamBudget>,
    peer: IpAddr,
}

/// Options of one served connection.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The peer's address, for its share of the budget.
    pub peer: IpAddr,
    pub budget: Arc<StreamBudget>,
    /// Close (GOAWAY) after this long without a stream.
    pub idle_timeout: std::time::Duration,
    /// When this becomes `true`: GOAWAY, let open streams finish (drain).
    pub drain: tokio::sync::watch::Receiver<bool>,
}

/// What a served connection came to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Served {
    /// Streams refused (REFUSED_STREAM) for want of budget; each was also
    /// reported to `on_refused` as it happened.
    pub refused: usize,
    /// Closed for being idle.
    pub idle: bool,
    /// Closed for rapid reset (see [`crate::PREMATURE_RESET_MIN_STREAMS`]).
    pub rapid_reset: bool,
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

/// Serves HTTP/2 on `io`, calling `handler` (spawned) for each CONNECT request
/// the budget admits; the others are reset with REFUSED_STREAM (safe to
/// retry). Other methods get 405. Returns when the peer closes the
/// connection, or after `opts.idle_timeout` without a stream.
pub async fn serve<S, F, Fut, R>(
    io: S,
    opts: ServeOptions,
    on_refused: R,
    handler: F,
) -> Result<Served, ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(ConnectRequest) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    R: Fn(),
{
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_send_buffer_size(1024 * 1024)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ServeError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(ServeError::Handshake)?;
    let mut served = Served::default();
    // Streams running on this connection, and when the last one ended.
    let active = Arc::new(AtomicUsize::new(0));
    let last_active = Arc::new(Mutex::new(Instant::now()));
    let mut closing = false;
    let mut drain = opts.drain.clone();
    let premature = Arc::new(AtomicUsize::new(0));
    let mut streams = 0usize;
    loop {
        let reset = premature.load(Ordering::Relaxed);
        if !closing && streams >= PREMATURE_RESET_MIN_STREAMS && reset * 2 >= streams {
            warn!(peer = %opts.peer, streams, reset, "rapid reset: closing the connection");
            conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
            closing = true;
            served.rapid_reset = true;
        }
        // While streams run the connection is not idle: look again a full
        // timeout later (not at once, which would spin).
        let idle_for = if active.load(Ordering::Acquire) > 0 {
            std::time::Duration::ZERO
        } else {
            last_active.lock().map(|t| t.elapsed()).unwrap_or_default()
        };
        let wait = opts.idle_timeout.saturating_sub(idle_for);
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = drained(&mut drain), if !closing => {
                debug!(peer = %opts.peer, "draining: GOAWAY");
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
            _ = tokio::time::sleep(wait), if !closing => {
                let idle = active.load(Ordering::Acquire) == 0
                    && last_active.lock().map(|t| t.elapsed() >= opts.idle_timeout).unwrap_or(false);
                if idle {
                    debug!(peer = %opts.peer, "closing idle HBONE connection");
                    conn.graceful_shutdown();
                    closing = true;
                    served.idle = true;
                }
                continue;
            }
        };
        let Some(next) = next else { break };
        let (request, mut respond) = match next {
            Ok(n) => n,
            // Our own GOAWAY for rapid reset ends the connection.
            Err(_) if served.rapid_reset => break,
            Err(e) => return Err(ServeError::Connection(e)),
        };
        streams += 1;
        if request.method() != Method::CONNECT {
            debug!(method = %request.method(), "refusing non-CONNECT request");
            let _ = respond.send_response(status(StatusCode::METHOD_NOT_ALLOWED), true);
            continue;
        }
        let Some(permit) = opts.budget.try_acquire(opts.peer) else {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
            served.refused += 1;
            on_refused();
            continue;
        };
        active.fetch_add(1, Ordering::AcqRel);
        let fut = handler(ConnectRequest {
            request,
            respond,
            _permit: permit,
            premature: premature.clone(),
            opened: Instant::now(),
        });
        let (active, last_active) = (active.clone(), last_active.clone());
        tokio::spawn(async move {
            fut.await;
            if active.fetch_sub(1, Ordering::AcqRel) == 1
                && let Ok(mut t) = last_active.lock()
            {
                *t = Instant::now();
            }
        });
    }
    Ok(served)
}

/// Resolves once `drain` turns `true`; never, if its sender is gone without
/// having asked for a drain.
pub async fn drained(drain: &mut tokio::sync::watch::Receiver<bool>) {
    if drain.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}

// === impl StreamBudget ===

impl StreamBudget {
    pub fn new(total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(StreamBudget {
            total,
            per_peer,
            used: Mutex::new(Used::default()),
        })
    }

    /// A permit for one more stream from `peer`, if the budget has room.
    pub fn try_acquire(self: &Arc<Self>, peer: IpAddr) -> Option<StreamPermit> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        let mine = used.by_peer.get(&peer).copied().unwrap_or(0);
        if used.total >= self.total || mine >= self.per_peer {
            return None;
        }
        used.total += 1;
        used.by_peer.insert(peer, mine + 1);
        Some(StreamPermit {
            budget: self.clone(),
            peer,
        })
    }

    /// Streams admitted and not yet finished: in total, and `peer`'s.
    pub fn in_use(&self, peer: IpAddr) -> (usize, usize) {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        (used.total, used.by_peer.get(&peer).copied().unwrap_or(0))
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|p| p.into_inner());
        used.total = used.total.saturating_sub(1);
        if let Some(n) = used.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                used.by_peer.remove(&self.peer);
            }
        }
    }
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

    /// The service the client reached, from `Forwarded: host=` (a claim:
    /// trust it only among the destination's own services).
    pub fn forwarded_host(&self) -> Option<&str> {
        self.header("forwarded")
            .and_then(|v| forwarded_param(v, "host"))
    }

    /// A request header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.request.headers().get(name)?.to_str().ok()
    }

    /// Answers 200 and returns the tunnel, which keeps the stream's permit.
    pub fn accept(self) -> Result<H2Stream, RequestError> {
        let ConnectRequest {
            request,
            mut respond,
            _permit,
            premature,
            opened,
        } = self;
        let send = respond
            .send_response(status(StatusCode::OK), false)
            .inspect_err(|_| {
                if opened.elapsed() < PREMATURE_RESET_LIFETIME {
                    premature.fetch_add(1, Ordering::Relaxed);
                }
            })
            .map_err(RequestError::Respond)?;
        Ok(H2Stream::new(send, request.into_body()).with_guard(Box::new(_permit)))
    }

    /// Answers with an error status and closes the stream.
    pub fn refuse(mut self, code: StatusCode) {
        if self.respond.send_response(status(code), true).is_err()
            && self.opened.elapsed() < PREMATURE_RESET_LIFETIME
        {
            self.premature.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Parses the first `for=` of an RFC 7239 `Forwarded` header:
/// `for=10.0.0.1`, `for="10.0.0.1:4711"`, `for="[2001:db8::1]:4711"`.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let node = forwarded_param(value, "for")?;
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

/// The first `name=` parameter of a `Forwarded` value, unquoted.
fn forwarded_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    value
        .split([',', ';'])
        .map(str::trim)
        .find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
        })
        .map(|v| v.trim_matches('"'))
}

/// The `Forwarded` header value carrying `ip` and, when the client reached
/// a service, its hostname (RFC 7239 `host=`), so the far end can name the
/// service in its metrics.
pub fn forwarded_header_for(ip: IpAddr, host: Option<&str>) -> String {
    let for_ = forwarded_header(ip);
    match host.filter(|h| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    }) {
        Some(h) => format!("{for_};host={h}"),
        None => for_,
    }
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
    fn forwarded_host() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let v = forwarded_header_for(ip, Some("reviews.shop.svc.cluster.local"));
        assert_eq!(v, "for=10.0.0.1;host=reviews.shop.svc.cluster.local");
        assert_eq!(parse_forwarded_for(&v), Some(ip));
        assert_eq!(
            forwarded_param(&v, "host"),
            Some("reviews.shop.svc.cluster.local")
        );
        assert_eq!(forwarded_header_for(ip, Some("a;b")), "for=10.0.0.1");
        assert_eq!(forwarded_header_for(ip, None), "for=10.0.0.1");
    }

    #[test]
    fn forwarded_round_trip() {
        for ip in ["10.0.0.1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_header(ip)), Some(ip));
        }
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    /// The budget holds per peer and in total, and permits return on drop.
    #[test]
    fn per_peer_and_total() {
        let budget = StreamBudget::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let a1 = budget.try_acquire(a);
        let a2 = budget.try_acquire(a);
        assert!(a1.is_some() && a2.is_some());
        assert!(budget.try_acquire(a).is_none(), "a's share is spent");
        let b1 = budget.try_acquire(b);
        assert!(b1.is_some(), "b has its own share");
        assert!(budget.try_acquire(b).is_none(), "the total is spent");
        assert_eq!(budget.in_use(a), (3, 2));
        drop(a1);
        assert!(budget.try_acquire(b).is_some(), "a permit came back");
        drop((a2, b1));
        assert_eq!(budget.in_use(a), (0, 0));
    }
}
