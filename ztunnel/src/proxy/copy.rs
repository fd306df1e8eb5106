//! Bidirectional copy with buffers that start small and grow for bulk flows.
//!
//! Most proxied connections are idle or chatty; a few move bulk data. Each
//! direction reads [`INITIAL`] bytes at a time on the stack (no heap buffer
//! while idle) and moves to a heap buffer that grows eightfold, up to
//! [`LARGE`], each time reads keep filling it, so ten thousand idle
//! connections cost little and a bulk transfer makes few syscalls. Half-closes are forwarded: when one side
//! reaches EOF, the other side's write half is shut down, and the copy ends
//! when both directions are done.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::io::poll_read_buf;
use weft_hbone::H2Stream;

/// Buffer a direction starts with: enough for a request or a response of a
/// chatty protocol, small for a held idle connection (two per connection).
pub const INITIAL: usize = 2 * 1024;
/// Buffer a bulk direction grows to (2 KiB, 16 KiB, then this).
pub const LARGE: usize = 256 * 1024;
/// How much each growth step multiplies the buffer by.
const GROWTH: usize = 8;
/// Reads that fill the buffer before it grows a step.
const FULL_READS_TO_GROW: u32 = 2;

/// Counts a read of `n` bytes into a buffer of `len`; true when the
/// direction has filled its buffer often enough to grow a step.
fn filled(total: &mut u64, full_reads: &mut u32, n: usize, len: usize) -> bool {
    *total += n as u64;
    if n == len && len < LARGE {
        *full_reads += 1;
        if *full_reads >= FULL_READS_TO_GROW {
            *full_reads = 0;
            return true;
        }
    }
    false
}

/// One direction: read, write it all out, repeat.
///
/// While a direction is idle or chatty its reads land on the stack and are
/// written straight out, so a held connection owns no buffer at all; only
/// bytes a slow writer has not taken yet go to the heap (and the heap
/// buffer is freed once they are out), until the direction proves to be
/// bulk and keeps a growing heap buffer.
#[derive(Debug)]
struct Pipe {
    /// Empty in stack mode; else bytes waiting in `buf[pos..cap]`, or the
    /// grown buffer of a bulk direction.
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    total: u64,
    full_reads: u32,
    read_done: bool,
    need_flush: bool,
}

#[derive(Debug)]
enum State<P> {
    Running(P),
    ShuttingDown(u64),
    Done(u64),
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            buf: Vec::new(),
            pos: 0,
            cap: 0,
            total: 0,
            full_reads: 0,
            read_done: false,
            need_flush: false,
        }
    }

    /// Counts a read of `n` bytes into a buffer of `len`; true when the
    /// direction has filled it often enough to grow a step.
    fn filled(&mut self, n: usize, len: usize) -> bool {
        filled(&mut self.total, &mut self.full_reads, n, len)
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.pos < self.cap {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.cap])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.need_flush = true;
            }
            self.pos = 0;
            self.cap = 0;
            if self.buf.len() == INITIAL {
                // A spill buffer, now written out: back to the stack.
                self.buf = Vec::new();
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.total));
            }
            if !self.buf.is_empty() {
                // Bulk: read into the heap buffer, grow when it keeps filling.
                let mut rb = ReadBuf::new(&mut self.buf);
                let n = match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => return self.pending(cx, writer.as_mut()),
                    Poll::Ready(r) => r.map(|()| rb.filled().len())?,
                };
                if n == 0 {
                    self.read_done = true;
                    continue;
                }
                self.cap = n;
                if self.filled(n, self.buf.len()) {
                    // Safe to resize: the data is written out from
                    // buf[..cap], which resize keeps.
                    let next = (self.buf.len() * GROWTH).min(LARGE);
                    self.buf.resize(next, 0);
                }
                continue;
            }
            // Stack mode.
            let mut stack = [0u8; INITIAL];
            let mut rb = ReadBuf::new(&mut stack);
            let n = match reader.as_mut().poll_read(cx, &mut rb) {
                Poll::Pending => return self.pending(cx, writer.as_mut()),
                Poll::Ready(r) => r.map(|()| rb.filled().len())?,
            };
            if n == 0 {
                self.read_done = true;
                continue;
            }
            let grow = self.filled(n, INITIAL);
            let mut off = 0;
            while off < n {
                match writer.as_mut().poll_write(cx, &stack[off..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(k)) => {
                        off += k;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => break,
                }
            }
            if grow || off < n {
                // Bulk, or a writer that is behind: the heap from here.
                let len = if grow { INITIAL * GROWTH } else { INITIAL };
                self.buf = vec![0; len];
                self.buf[..n - off].copy_from_slice(&stack[off..n]);
                self.cap = n - off;
                if off < n {
                    // The writer said Pending: it will wake us.
                    return Poll::Pending;
                }
            }
        }
    }

    /// Nothing to read now: push out what was written, then wait.
    fn pending<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>> {
        if self.need_flush {
            ready!(writer.poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }
}

/// Drives one direction: `step(Some(pipe), cx)` copies until EOF and
/// returns the count; `step(None, cx)` then shuts the writer down.
fn poll_direction<P>(
    cx: &mut Context<'_>,
    state: &mut State<P>,
    mut step: impl FnMut(Option<&mut P>, &mut Context<'_>) -> Poll<io::Result<u64>>,
) -> Poll<io::Result<u64>> {
    loop {
        match state {
            State::Running(pipe) => {
                let n = ready!(step(Some(pipe), cx))?;
                *state = State::ShuttingDown(n);
            }
            State::ShuttingDown(n) => {
                ready!(step(None, cx))?;
                *state = State::Done(*n);
            }
            State::Done(n) => return Poll::Ready(Ok(*n)),
        }
    }
}

/// Bytes a pipe has moved.
trait Moved {
    fn moved(&self) -> u64;
}

impl Moved for Pipe {
    fn moved(&self) -> u64 {
        self.total
    }
}

impl<P: Moved> State<P> {
    /// Bytes moved so far.
    fn total(&self) -> u64 {
        match self {
            State::Running(p) => p.moved(),
            State::ShuttingDown(n) | State::Done(n) => *n,
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both reach EOF, or until `stop`
/// yields the error to report (a policy that now denies the connection);
/// returns the bytes moved each way, and the error that ended the copy
/// early, if one did (the counts then say how far it got).
pub async fn copy_bidirectional_until<A, B>(
    a: &mut A,
    b: &mut B,
    stop: impl Future<Output = io::Error>,
) -> (u64, u64, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = State::Running(Pipe::new());
    let mut b_to_a = State::Running(Pipe::new());
    let mut stop = std::pin::pin!(stop);
    let result = poll_fn(|cx| {
        if let Poll::Ready(e) = stop.as_mut().poll(cx) {
            return Poll::Ready(Err(e));
        }
        let ab = poll_direction(cx, &mut a_to_b, |p, cx| match p {
            Some(p) => p.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b)),
            None => Pin::new(&mut *b).poll_shutdown(cx).map_ok(|()| 0),
        })?;
        let ba = poll_direction(cx, &mut b_to_a, |p, cx| match p {
            Some(p) => p.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a)),
            None => Pin::new(&mut *a).poll_shutdown(cx).map_ok(|()| 0),
        })?;
        match (ab, ba) {
            (Poll::Ready(_), Poll::Ready(_)) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    (a_to_b.total(), b_to_a.total(), result.err())
}

/// A stream → tunnel direction. Reads land in a buffer that is then handed
/// to the tunnel whole: the bytes are not copied again on their way to TLS.
/// A chatty direction reads on the stack and copies only what it read.
#[derive(Debug)]
struct ToTunnel {
    /// Read, not yet taken by the tunnel's flow control.
    pending: Bytes,
    /// Where the next bulk read lands; empty while chatty.
    spare: BytesMut,
    /// Read size: [`INITIAL`] (on the stack) until the direction proves bulk.
    chunk: usize,
    total: u64,
    full_reads: u32,
    read_done: bool,
}

impl ToTunnel {
    fn new() -> Self {
        ToTunnel {
            pending: Bytes::new(),
            spare: BytesMut::new(),
            chunk: INITIAL,
            total: 0,
            full_reads: 0,
            read_done: false,
        }
    }

    fn poll_copy<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        tunnel: &mut H2Stream,
    ) -> Poll<io::Result<u64>> {
        loop {
            while !self.pending.is_empty() {
                ready!(tunnel.poll_send_bytes(cx, &mut self.pending))?;
            }
            if self.read_done {
                return Poll::Ready(Ok(self.total));
            }
            let n = if self.chunk == INITIAL {
                let mut stack = [0u8; INITIAL];
                let mut rb = ReadBuf::new(&mut stack);
                ready!(reader.as_mut().poll_read(cx, &mut rb))?;
                self.pending = Bytes::copy_from_slice(rb.filled());
                rb.filled().len()
            } else {
                // Reads fill one allocation in turn; each read's bytes go to
                // h2 as a slice of it, so a short read does not pin a whole
                // buffer of its own.
                if self.spare.capacity() < self.chunk / 2 {
                    self.spare = BytesMut::with_capacity(self.chunk);
                }
                let n = match poll_read_buf(reader.as_mut(), cx, &mut self.spare) {
                    Poll::Pending => {
                        // Idle: hold no buffer while nothing comes.
                        self.spare = BytesMut::new();
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => r?,
                };
                self.pending = self.spare.split().freeze();
                n
            };
            if n == 0 {
                self.read_done = true;
                continue;
            }
            if filled(&mut self.total, &mut self.full_reads, n, self.chunk) {
                self.chunk = (self.chunk * GROWTH).min(LARGE);
            }
        }
    }
}

/// A tunnel → stream direction: each frame's bytes are written out as
/// received, with no buffer of our own.
#[derive(Debug)]
struct FromTunnel {
    pending: Bytes,
    total: u64,
    read_done: bool,
    need_flush: bool,
}

impl FromTunnel {
    fn new() -> Self {
        FromTunnel {
            pending: Bytes::new(),
            total: 0,
            read_done: false,
            need_flush: false,
        }
    }

    fn poll_copy<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        tunnel: &mut H2Stream,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>> {
        loop {
            while !self.pending.is_empty() {
                let n = ready!(writer.as_mut().poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.total));
            }
            match tunnel.poll_recv_bytes(cx)? {
                Poll::Ready(Some(data)) => {
                    self.total += data.len() as u64;
                    self.pending = data;
                }
                Poll::Ready(None) => self.read_done = true,
                Poll::Pending => {
                    if self.need_flush {
                        ready!(writer.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Moved for ToTunnel {
    fn moved(&self) -> u64 {
        self.total
    }
}

impl Moved for FromTunnel {
    fn moved(&self) -> u64 {
        self.total
    }
}

/// [`copy_bidirectional_until`] between a stream and an HBONE tunnel, handing
/// buffers to and from HTTP/2 without copying them. Returns the bytes
/// stream → tunnel, tunnel → stream, and the error that ended it early.
pub async fn copy_tunnel<S>(stream: &mut S, tunnel: &mut H2Stream) -> (u64, u64, Option<io::Error>)
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_tunnel_until(stream, tunnel, std::future::pending()).await
}

/// [`copy_tunnel`], ended early when `stop` yields the error to report;
/// the counts then still say how far it got.
pub async fn copy_tunnel_until<S>(
    stream: &mut S,
    tunnel: &mut H2Stream,
    stop: impl Future<Output = io::Error>,
) -> (u64, u64, Option<io::Error>)
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = State::Running(ToTunnel::new());
    let mut down = State::Running(FromTunnel::new());
    let mut stop = std::pin::pin!(stop);
    let result = poll_fn(|cx| {
        if let Poll::Ready(e) = stop.as_mut().poll(cx) {
            return Poll::Ready(Err(e));
        }
        let u = poll_direction(cx, &mut up, |p, cx| match p {
            Some(p) => p.poll_copy(cx, Pin::new(&mut *stream), tunnel),
            None => Pin::new(&mut *tunnel).poll_shutdown(cx).map_ok(|()| 0),
        })?;
        let d = poll_direction(cx, &mut down, |p, cx| match p {
            Some(p) => p.poll_copy(cx, tunnel, Pin::new(&mut *stream)),
            None => Pin::new(&mut *stream).poll_shutdown(cx).map_ok(|()| 0),
        })?;
        match (u, d) {
            (Poll::Ready(_), Poll::Ready(_)) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    (up.total(), down.total(), result.err())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// `client` sends `n` pattern bytes and half-closes; `server` must get
    /// them all, intact, and its reply `done` must reach `client`.
    async fn bulk_then_reply(
        mut client: tokio::io::DuplexStream,
        mut server: tokio::io::DuplexStream,
        n: u32,
    ) {
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert!(
            got == data,
            "{} of {n} bytes, intact: {}",
            got.len(),
            got == data
        );
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
    }

    /// Bulk one way, a reply the other way after the half-close, exact counts,
    /// and the buffer grows for the bulk direction only.
    #[tokio::test]
    async fn half_close_and_counts() {
        let (client, mut proxy_a) = duplex(64 * 1024);
        let (mut proxy_b, server) = duplex(64 * 1024);
        let proxy = tokio::spawn(async move {
            copy_bidirectional_until(&mut proxy_a, &mut proxy_b, std::future::pending()).await
        });
        bulk_then_reply(client, server, 3_000_000).await;
        let (up, down, err) = proxy.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((up, down), (3_000_000, 4));
    }

    /// Through a real HTTP/2 CONNECT stream, both ends spliced with
    /// `copy_tunnel` (the outbound and the inbound ztunnel): bulk bytes
    /// arrive intact and in order, the half-close crosses the tunnel, the
    /// reply comes back, and both sides count the same bytes.
    #[tokio::test]
    async fn tunnel_both_ends() {
        use std::sync::Arc;
        use weft_hbone::server::{ServeOptions, StreamBudget, serve};

        let (near, far) = duplex(256 * 1024);
        let (server, server_side) = duplex(64 * 1024);
        let (counted_tx, counted_rx) = tokio::sync::oneshot::channel();
        let counted_tx = Arc::new(std::sync::Mutex::new(Some(counted_tx)));
        let opts = ServeOptions {
            peer: [10, 0, 0, 1].into(),
            budget: StreamBudget::new(4, 4),
            idle_timeout: std::time::Duration::from_secs(60),
            drain: tokio::sync::watch::channel(false).1,
        };
        let server_side = Arc::new(std::sync::Mutex::new(Some(server_side)));
        tokio::spawn(serve(
            far,
            opts,
            || {},
            move |req| {
                let app = server_side.lock().unwrap().take();
                let tx = counted_tx.lock().unwrap().take();
                async move {
                    let (Some(mut app), Some(tx), Ok(mut tunnel)) = (app, tx, req.accept()) else {
                        return;
                    };
                    let _ = tx.send(copy_tunnel(&mut app, &mut tunnel).await);
                }
            },
        ));
        let (send, _) = weft_hbone::client::handshake(near).await.unwrap();
        let mut tunnel = weft_hbone::client::connect(
            send,
            "10.0.0.2:80".parse().unwrap(),
            http::HeaderMap::new(),
        )
        .await
        .unwrap();
        let (client, mut client_side) = duplex(64 * 1024);
        let outbound =
            tokio::spawn(async move { copy_tunnel(&mut client_side, &mut tunnel).await });
        bulk_then_reply(client, server, 5_000_000).await;
        let (up, down, err) = outbound.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((up, down), (5_000_000, 4));
        let (app_up, app_down, err) = counted_rx.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((app_up, app_down), (4, 5_000_000));
    }

    /// A direction that keeps filling its buffer grows; one that does not, stays small.
    #[test]
    fn growth() {
        let mut p = Pipe::new();
        assert!(p.buf.is_empty(), "no buffer until there is data to hold");
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let bulk = LARGE * 4;
        let mut src: &[u8] = &vec![1u8; bulk];
        let mut sink = Vec::new();
        let _ = p.poll_copy(&mut cx, Pin::new(&mut src), Pin::new(&mut sink));
        assert_eq!(p.buf.len(), LARGE);
        assert_eq!(sink.len(), bulk);

        let mut small = Pipe::new();
        let mut src: &[u8] = b"ping";
        let mut sink = Vec::new();
        let _ = small.poll_copy(&mut cx, Pin::new(&mut src), Pin::new(&mut sink));
        assert_eq!(sink, b"ping");
        assert!(small.buf.is_empty(), "chatty: still no heap buffer");
    }
}
