//! One HTTP/2 CONNECT stream as a byte pipe ([`AsyncRead`] + [`AsyncWrite`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The two halves of a CONNECT stream. Reading releases flow-control credit as
/// data is handed out; writing waits for send capacity, so a slow reader
/// back-pressures the writer instead of buffering without bound.
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    recv_done: bool,
    send_done: bool,
    /// Held for the stream's life: pools count open streams with it.
    _guard: Option<Box<dyn Send + Sync + std::fmt::Debug>>,
}

// === impl H2Stream ===

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            recv_done: false,
            send_done: false,
            _guard: None,
        }
    }

    pub(crate) fn with_guard(mut self, guard: Box<dyn Send + Sync + std::fmt::Debug>) -> Self {
        self._guard = Some(guard);
        self
    }
}

impl H2Stream {
    /// Sends a prefix of `data` as soon as flow control allows, without
    /// copying it, and advances `data` past it. Call until `data` is empty.
    pub fn poll_send_bytes(
        &mut self,
        cx: &mut Context<'_>,
        data: &mut Bytes,
    ) -> Poll<io::Result<()>> {
        if data.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let n = ready!(self.poll_send_capacity(cx, data.len()))?;
        let chunk = data.split_to(n);
        self.send.send_data(chunk, false).map_err(h2_io)?;
        Poll::Ready(Ok(()))
    }

    /// Waits for send capacity for up to `want` (> 0) bytes: how many may go now.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.send.reserve_capacity(want);
        loop {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                Some(Ok(0)) => continue,
                Some(Ok(n)) => return Poll::Ready(Ok(n.min(want))),
            }
        }
    }

    /// The next bytes received, as the frame carried them (no copy); `None`
    /// at the end of the stream.
    pub fn poll_recv_bytes(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            if self.recv_done {
                return Poll::Ready(Ok(None));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Credit goes back as soon as the frame is ours: at most
                    // one frame is buffered here, and the window stays open.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Ok(Some(data)));
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => self.recv_done = true,
            }
        }
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::NO_ERROR) | Some(h2::Reason::CANCEL) => io::ErrorKind::ConnectionReset,
        _ => io::ErrorKind::BrokenPipe,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // A frame at a time; what does not fit waits for the next read.
        if let Some(mut data) = ready!(this.poll_recv_bytes(cx))? {
            let n = data.len().min(out.remaining());
            out.put_slice(&data[..n]);
            data.advance(n);
            this.pending = data;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.send_done {
            this.send_done = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}
