//! The dialing side of HBONE: HTTP/2 connections over TLS, pooled per key, and
//! `CONNECT` streams on them.
//!
//! Start at [`Pool::stream`]. The caller supplies how to open a connection (TCP +
//! TLS with the right identities); the pool reuses it for up to
//! [`MAX_STREAMS_PER_CONNECTION`] concurrent streams and opens more beyond that.
//! [`Pool::evict_idle`] drops connections without streams, and empty keys.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{HeaderMap, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

use crate::{
    CONNECTION_WINDOW, H2Stream, HANDSHAKE_TIMEOUT, MAX_FRAME_SIZE, MAX_STREAMS_PER_CONNECTION,
    STREAM_WINDOW,
};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("opening the HBONE connection failed: {0}")]
    Dial(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("HTTP/2 handshake did not finish within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("HTTP/2 error: {0}")]
    H2(#[from] h2::Error),
    #[error("CONNECT {target} refused by the peer with status {status}")]
    Refused {
        target: SocketAddr,
        status: StatusCode,
    },
}

/// An HTTP/2 connection shared by streams.
#[derive(Clone, Debug)]
struct Shared {
    send: SendRequest<Bytes>,
    streams: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    /// When the last stream ended (or the connection opened).
    idle_since: Arc<Mutex<Instant>>,
}

/// Decrements the connection's stream count when the stream ends.
#[derive(Debug)]
struct StreamGuard {
    streams: Arc<AtomicUsize>,
    idle_since: Arc<Mutex<Instant>>,
}

/// HBONE connections keyed by `K` (e.g. source identity, destination identity, peer).
#[derive(Debug)]
pub struct Pool<K> {
    conns: Mutex<HashMap<K, Arc<tokio::sync::Mutex<Vec<Shared>>>>>,
}

/// Performs the HTTP/2 client handshake on `io` and spawns the connection task.
pub async fn handshake<S>(io: S) -> Result<(SendRequest<Bytes>, Arc<AtomicBool>), ConnectError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(1024 * 1024)
        .handshake::<_, Bytes>(io);
    let (send, conn) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| ConnectError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%error, "HBONE connection ended");
        }
        done.store(true, Ordering::Release);
    });
    Ok((send, closed))
}

/// Opens one CONNECT stream to `target` on `send`.
pub async fn connect(
    send: SendRequest<Bytes>,
    target: SocketAddr,
    headers: HeaderMap,
) -> Result<H2Stream, ConnectError> {
    let mut send = send.ready().await?;
    let mut request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .map_err(|e| ConnectError::Dial(e.into()))?;
    *request.headers_mut() = headers;
    let (response, send_stream) = send.send_request(request, false)?;
    let response = response.await?;
    if response.status() != StatusCode::OK {
        return Err(ConnectError::Refused {
            target,
            status: response.status(),
        });
    }
    Ok(H2Stream::new(send_stream, response.into_body()))
}

// === impl Pool ===

impl<K: Hash + Eq + Clone> Default for Pool<K> {
    fn default() -> Self {
        Pool {
            conns: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Pool<K> {
    /// A CONNECT stream to `target` over a pooled connection for `key`, dialing
    /// a new one with `dial` when none has room. Concurrent callers for the same
    /// key wait for one dial instead of each opening a connection. A stream the
    /// peer never processed (it sent GOAWAY, draining for a restart, or
    /// REFUSED_STREAM) is retried once on another connection.
    pub async fn stream<F, Fut, S, E>(
        &self,
        key: &K,
        target: SocketAddr,
        headers: HeaderMap,
        dial: F,
    ) -> Result<H2Stream, ConnectError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<S, E>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut retried = false;
        loop {
            // Counted in `checkout`, under the key's lock, so eviction
            // never takes a connection just handed out.
            let shared = self.checkout(key, &dial).await?;
            let guard = StreamGuard {
                streams: shared.streams.clone(),
                idle_since: shared.idle_since.clone(),
            };
            match connect(shared.send.clone(), target, headers.clone()).await {
                Ok(stream) => return Ok(stream.with_guard(Box::new(guard))),
                Err(ConnectError::H2(e)) if !retried && unprocessed(&e) => {
                    debug!(error = %e, "HBONE connection going away; retrying on another");
                    shared.closed.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A pooled connection for `key` with room for a stream, dialled if needed.
    async fn checkout<F, Fut, S, E>(&self, key: &K, dial: &F) -> Result<Shared, ConnectError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<S, E>>,
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        let slot = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.entry(key.clone()).or_default().clone()
        };
        let shared = {
            let mut list = slot.lock().await;
            list.retain(|c| !c.closed.load(Ordering::Acquire));
            let chosen = match list
                .iter()
                .find(|c| c.streams.load(Ordering::Acquire) < MAX_STREAMS_PER_CONNECTION)
            {
                Some(c) => c.clone(),
                None => {
                    let io = dial().await.map_err(|e| ConnectError::Dial(Box::new(e)))?;
                    let (send, closed) = handshake(io).await?;
                    let c = Shared {
                        send,
                        streams: Arc::new(AtomicUsize::new(0)),
                        closed,
                        idle_since: Arc::new(Mutex::new(Instant::now())),
                    };
                    list.push(c.clone());
                    c
                }
            };
            chosen.streams.fetch_add(1, Ordering::AcqRel);
            chosen
        };
        Ok(shared)
    }

    /// Drops connections that are closed or have had no stream for `idle`
    /// (dropping the last handle closes the HTTP/2 connection), and keys left
    /// with none, so the pool does not grow with every peer ever dialled.
    /// A key being dialled right now is left alone. Returns the connections
    /// still pooled.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut open = 0;
        conns.retain(|_, slot| {
            let Ok(mut list) = slot.try_lock() else {
                return true;
            };
            list.retain(|c| {
                let unused = c.streams.load(Ordering::Acquire) == 0
                    && c.idle_since
                        .lock()
                        .map(|t| t.elapsed() >= idle)
                        .unwrap_or(false);
                !c.closed.load(Ordering::Acquire) && !unused
            });
            open += list.len();
            !list.is_empty()
        });
        open
    }
}

/// Whether the peer refused a stream without processing it, so that it is
/// safe to send again: the connection is going away, or the stream was
/// refused (RFC 9113 §8.7).
fn unprocessed(e: &h2::Error) -> bool {
    e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.streams.fetch_sub(1, Ordering::AcqRel) == 1
            && let Ok(mut t) = self.idle_since.lock()
        {
            *t = Instant::now();
        }
    }
}

/// A W3C `traceparent` for one HBONE connection: a random trace and span,
/// not sampled, as Istio's ztunnel puts on its CONNECTs so that both ends
/// can name the connection alike.
pub fn traceparent() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    // The system's generator does not fail on Linux; zeros would only make
    // an id a receiver ignores.
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("00-{}-{}-00", hex(&b[..16]), hex(&b[16..]))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::server::{ServeOptions, StreamBudget, serve};

    /// A CONNECT server on the far end of an in-memory pipe that echoes
    /// each tunnel; `budget` bounds its streams.
    fn dial(
        budget: Arc<StreamBudget>,
    ) -> impl Future<Output = Result<tokio::io::DuplexStream, std::io::Error>> {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let opts = ServeOptions {
            peer: IpAddr::from([10, 0, 0, 1]),
            budget,
            idle_timeout: Duration::from_secs(60),
            drain: tokio::sync::watch::channel(false).1,
        };
        tokio::spawn(serve(
            far,
            opts,
            || {},
            |req| async move {
                if let Ok(mut tunnel) = req.accept() {
                    let mut buf = [0u8; 5];
                    if tunnel.read_exact(&mut buf).await.is_ok() {
                        let _ = tunnel.write_all(&buf).await;
                        let _ = tunnel.shutdown().await;
                    }
                }
            },
        ));
        async move { Ok(near) }
    }

    #[test]
    fn traceparents_are_w3c_and_fresh() {
        let a = traceparent();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4, "{a}");
        assert_eq!((parts[0], parts[3]), ("00", "00"));
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16));
        assert!(
            parts[1]
                .bytes()
                .chain(parts[2].bytes())
                .all(|b| b.is_ascii_hexdigit())
        );
        assert_ne!(a, traceparent());
    }

    /// A pooled connection is reused while it has streams, dropped once it has
    /// had none for the idle time, and its key goes with it.
    #[tokio::test]
    async fn idle_connections_are_evicted() {
        let pool: Pool<u8> = Pool::default();
        let budget = StreamBudget::new(10, 10);
        let target: SocketAddr = "10.0.0.2:80".parse().unwrap_or_else(|_| unreachable!());
        let mut a = pool
            .stream(&1, target, HeaderMap::new(), || dial(budget.clone()))
            .await
            .expect("first stream");
        let _b = pool
            .stream(&1, target, HeaderMap::new(), || dial(budget.clone()))
            .await
            .expect("second stream, same connection");
        assert_eq!(
            pool.evict_idle(Duration::ZERO),
            1,
            "in use: kept, and shared"
        );
        a.write_all(b"hello").await.expect("write");
        let mut back = [0u8; 5];
        a.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"hello");
        drop((a, _b));
        assert_eq!(
            pool.evict_idle(Duration::from_secs(60)),
            1,
            "not idle long enough"
        );
        assert_eq!(pool.evict_idle(Duration::ZERO), 0, "idle: dropped");
        assert!(
            pool.conns.lock().map(|c| c.is_empty()).unwrap_or(false),
            "key removed"
        );
    }
}
