//! The dialing side of HBONE: HTTP/2 connections over TLS, pooled per key, and
//! `CONNECT` streams on them.
//!
//! Start at [`Pool::stream`]. The caller supplies how to open a connection (TCP +
//! TLS with the right identities); the pool reuses it for up to
//! [`MAX_STREAMS_PER_CONNECTION`] concurrent streams and opens more beyond that.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

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
}

/// Decrements the connection's stream count when the stream ends.
#[derive(Debug)]
struct StreamGuard(Arc<AtomicUsize>);

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
    /// key wait for one dial instead of each opening a connection.
    pub async fn stream<F, Fut, S, E>(
        &self,
        key: &K,
        target: SocketAddr,
        headers: HeaderMap,
        dial: F,
    ) -> Result<H2Stream, ConnectError>
    where
        F: FnOnce() -> Fut,
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
            match list
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
                    };
                    list.push(c.clone());
                    c
                }
            }
        };
        shared.streams.fetch_add(1, Ordering::AcqRel);
        let guard = StreamGuard(shared.streams.clone());
        let stream = connect(shared.send, target, headers).await?;
        Ok(stream.with_guard(Box::new(guard)))
    }

    /// Open pooled connections, for metrics and tests.
    pub fn connections(&self) -> usize {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns
            .values()
            .map(|slot| slot.try_lock().map(|l| l.len()).unwrap_or(0))
            .sum()
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
