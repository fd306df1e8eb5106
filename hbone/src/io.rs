//! [`ReadAhead`]: large socket reads under a TLS stack that asks for little.
//!
//! rustls reads the socket at most 4 KiB at a time (its deframer grows by
//! 4 KiB per read, up to one record). Under a bulk transfer that is one
//! `recvmsg` per 4 KiB: measured on the lab, the receiving ztunnel's CPU
//! per GB was mostly those syscalls. Below the TLS stream, this wrapper
//! reads up to [`READ_AHEAD`] at once and serves the small reads from
//! memory: one syscall per 256 KiB for one copy of bytes that are in cache.
//! The buffer exists only while it holds bytes or data keeps coming; an
//! idle connection holds none.
//!
//! [`tls_connect`] and [`tls_accept`] start an HBONE TLS handshake over a TCP
//! stream, with this wrapper under it and the send buffer sized for bulk.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{Accept, Connect, TlsAcceptor, TlsConnector};
use tokio_util::io::poll_read_buf;

/// How much one socket read may take. Under a bulk transfer the receiving
/// ztunnel's reads fill it: at 64 KiB that was 80k `recvfrom` for 4.9 GB,
/// each a pass through the socket lock and an ACK or window update the
/// sender's kernel must process. 256 KiB took the CPU per GB of both
/// ztunnels to 0.88 and 0.97 of 64 KiB's (two A/B runs); 1 MiB did no
/// better than 256 KiB (0.98). The buffer is only held while data flows.
pub const READ_AHEAD: usize = 256 * 1024;

/// Encrypted bytes a TLS connection may hold before its writer must hand
/// them to the socket. rustls's default, 64 KiB, makes every socket write
/// four records: under a bulk transfer that is one `writev` per 64 KiB and,
/// as 64 KiB of records is a little more than one 64 KiB TCP segment train
/// (45 MSS), a second, small packet after each, through every hop to the
/// peer. Measured on the lab's underlay: 865 packets of 464 bytes for 1219
/// full ones; with 256 KiB, 264 for 1443. The cost: a connection whose
/// peer stops reading holds up to this much (h2 above it may hold up to
/// 1 MiB per stream, `max_send_buffer_size`), and a stream's bytes may wait
/// behind this much of another's.
pub const TLS_SEND_BUFFER: usize = 256 * 1024;

/// The client side of an HBONE TLS handshake over `tcp`.
pub fn tls_connect(
    config: Arc<ClientConfig>,
    server: ServerName<'static>,
    tcp: TcpStream,
) -> Connect<ReadAhead<TcpStream>> {
    TlsConnector::from(config).connect_with(server, ReadAhead::new(tcp), |c| {
        c.set_buffer_limit(Some(TLS_SEND_BUFFER));
    })
}

/// The server side of an HBONE TLS handshake over `tcp`.
pub fn tls_accept(config: Arc<ServerConfig>, tcp: TcpStream) -> Accept<ReadAhead<TcpStream>> {
    TlsAcceptor::from(config).accept_with(ReadAhead::new(tcp), |c| {
        c.set_buffer_limit(Some(TLS_SEND_BUFFER));
    })
}

/// An I/O object whose small reads are served from one large read.
#[derive(Debug)]
pub struct ReadAhead<S> {
    io: S,
    /// Bytes read and not yet handed out; no allocation while idle.
    buf: BytesMut,
}

impl<S> ReadAhead<S> {
    pub fn new(io: S) -> Self {
        ReadAhead {
            io,
            buf: BytesMut::new(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.buf.is_empty() {
            // A large read needs no help: straight into the caller's buffer.
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            // Uninitialized capacity: nothing is zeroed per read.
            this.buf.reserve(READ_AHEAD);
            match poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
                Poll::Pending => {
                    // Nothing flowing: hold no buffer while idle.
                    this.buf = BytesMut::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => {}
            }
        }
        let n = this.buf.len().min(out.remaining());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Small reads see every byte in order; the buffer goes once idle.
    #[tokio::test]
    async fn small_reads_in_order_and_no_idle_buffer() {
        let (mut a, b) = duplex(256 * 1024);
        let mut r = ReadAhead::new(b);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while got.len() < data.len() {
            let n = r.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        // Nothing more to read: the read waits, and the buffer is let go.
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut rb = ReadBuf::new(&mut chunk);
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(r.buf.capacity(), 0, "no buffer while idle");
        // Writes pass through; EOF reads as 0.
        r.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        a.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
        drop(a);
        assert_eq!(r.read(&mut chunk).await.unwrap(), 0);
    }
}
