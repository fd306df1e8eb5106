//! HBONE: HTTP/2 `CONNECT` tunnels over mutual TLS 1.3, authenticated by SPIFFE identities.
//!
//! Start at [`tls`] (who may talk to whom), then [`server::serve`] and [`client::Pool`].
//! [`ca`] issues the certificates; [`H2Stream`] turns one CONNECT stream into a byte pipe.

#![forbid(unsafe_code)]

pub mod ca;
pub mod client;
pub mod io;
pub mod server;
mod stream;
pub mod tls;

pub use stream::H2Stream;

use std::time::Duration;

/// HBONE's port, on every captured pod address.
pub const HBONE_PORT: u16 = 15008;
/// ALPN for HBONE, as Istio's ztunnel.
pub const ALPN_H2: &[u8] = b"h2";
/// Per-stream HTTP/2 receive window: large enough that one bulk stream is not
/// throttled by round trips between nodes.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection HTTP/2 receive window, shared by the multiplexed streams.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept; fewer frame headers per byte on bulk transfers.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
/// How long a peer may take to finish the TLS and HTTP/2 handshakes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams we open on one pooled connection before opening another.
pub const MAX_STREAMS_PER_CONNECTION: usize = 100;
/// Streams a peer may open on one inbound connection (the SETTINGS value);
/// the same as our own client's per-connection cap.
pub const MAX_CONCURRENT_STREAMS: u32 = 100;
/// Largest header block a peer may send in a CONNECT request, CONTINUATION
/// frames included: past it the stream is refused, not buffered.
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;
/// Streams a peer may open and reset before we accept them (rapid reset):
/// past it the connection is closed.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// Streams we may have to reset for a peer's protocol errors before we
/// close the connection with GOAWAY.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 100;
/// Rapid reset (CVE-2023-44487), as Envoy bounds it: once a connection has
/// carried this many streams, it is closed (GOAWAY ENHANCE_YOUR_CALM) when
/// at least half of them were reset by the peer before they were answered,
/// within a second of opening.
/// The stream budget bounds the work meanwhile.
pub const PREMATURE_RESET_MIN_STREAMS: usize = 100;
/// An inbound connection with no stream for this long is closed (GOAWAY).
/// Longer than the client pool's [`POOL_IDLE_TIMEOUT`], so a healthy client
/// closes first.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// A pooled connection with no stream for this long is closed and dropped.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
