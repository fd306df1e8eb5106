//! Bidirectional copy with buffers that start small and grow for bulk flows.
//!
//! Most proxied connections are idle or chatty; a few move bulk data. Each
//! direction reads [`INITIAL`] bytes at a time on the stack (no heap buffer
//! while idle) and moves to a heap buffer that grows eightfold, up to
//! [`LARGE`], each time reads keep filling it, so ten thousand idle
//! connections cost little and a bulk transfer makes few syscalls. Half-closes are forwarded: when one side
//! reaches EOF, the other side's write half is shut down, and the copy ends
//! when both directions are done.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffer a direction starts with: enough for a request or a response of a
/// chatty protocol, small for a held idle connection (two per connection).
pub const INITIAL: usize = 2 * 1024;
/// Buffer a bulk direction grows to (2 KiB, 16 KiB, then this).
pub const LARGE: usize = 128 * 1024;
/// How much each growth step multiplies the buffer by.
const GROWTH: usize = 8;
/// Reads that fill the buffer before it grows a step.
const FULL_READS_TO_GROW: u32 = 2;

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
enum State {
    Running(Pipe),
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
        self.total += n as u64;
        if n == len && len < LARGE {
            self.full_reads += 1;
            if self.full_reads >= FULL_READS_TO_GROW {
                self.full_reads = 0;
                return true;
            }
        }
        false
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

fn poll_direction<R, W>(
    cx: &mut Context<'_>,
    state: &mut State,
    mut r: Pin<&mut R>,
    mut w: Pin<&mut W>,
) -> Poll<io::Result<u64>>
where
    R: AsyncRead + ?Sized,
    W: AsyncWrite + ?Sized,
{
    loop {
        match state {
            State::Running(pipe) => {
                let n = ready!(pipe.poll_copy(cx, r.as_mut(), w.as_mut()))?;
                *state = State::ShuttingDown(n);
            }
            State::ShuttingDown(n) => {
                ready!(w.as_mut().poll_shutdown(cx))?;
                *state = State::Done(*n);
            }
            State::Done(n) => return Poll::Ready(Ok(*n)),
        }
    }
}

impl State {
    /// Bytes moved so far.
    fn total(&self) -> u64 {
        match self {
            State::Running(p) => p.total,
            State::ShuttingDown(n) | State::Done(n) => *n,
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both reach EOF; returns the bytes
/// moved each way, and the error that ended the copy early, if one did (the
/// counts then say how far it got).
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B) -> (u64, u64, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = State::Running(Pipe::new());
    let mut b_to_a = State::Running(Pipe::new());
    let result = poll_fn(|cx| {
        let ab = poll_direction(cx, &mut a_to_b, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let ba = poll_direction(cx, &mut b_to_a, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (ab, ba) {
            (Poll::Ready(_), Poll::Ready(_)) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await;
    (a_to_b.total(), b_to_a.total(), result.err())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    use super::*;

    /// Bulk one way, a reply the other way after the half-close, exact counts,
    /// and the buffer grows for the bulk direction only.
    #[tokio::test]
    async fn half_close_and_counts() {
        let (mut client, mut proxy_a) = duplex(64 * 1024);
        let (mut proxy_b, mut server) = duplex(64 * 1024);
        let proxy =
            tokio::spawn(async move { copy_bidirectional(&mut proxy_a, &mut proxy_b).await });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
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
        assert_eq!(got, data);
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let (up, down, err) = proxy.await.unwrap();
        assert!(err.is_none(), "{err:?}");
        assert_eq!((up, down), (3_000_000, 4));
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
