//! A request body that can be sent again: the first attempt streams the
//! client's body upstream as it arrives (a gRPC stream is never held back),
//! and a copy is kept up to a bound. A retry replays the copy, then goes on
//! reading the client where the last attempt stopped. Past the bound the
//! copy is dropped and the request can no longer be retried (Envoy's
//! retry buffer limit).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::proxy::{Body as BoxBody, BoxError};

/// How much of a request body is kept for retries (Envoy's default buffer
/// limit).
pub const RETRY_BUFFER_LIMIT: usize = 1024 * 1024;

#[derive(Debug)]
struct Shared {
    source: Option<BoxBody>,
    chunks: Vec<Bytes>,
    size: usize,
    trailers: Option<HeaderMap>,
    /// The client's body has ended.
    done: bool,
    /// More than the limit was read (or reading failed): no replay.
    overflow: bool,
    /// An attempt has its answer: nothing more is kept, and what was kept
    /// goes once the current reader has replayed it.
    committed: bool,
    /// The reader that may still read; older ones are cut off.
    generation: u64,
    /// The reader waiting for the client's body, woken when a newer one
    /// takes over so that it ends (and its upstream stream with it).
    parked: Option<Waker>,
}

/// The client's body, with what was read of it so far.
#[derive(Debug)]
pub struct Recorder {
    shared: Mutex<Shared>,
    hint: SizeHint,
    limit: usize,
}

impl Recorder {
    pub fn new(body: BoxBody, limit: usize) -> Arc<Self> {
        let hint = body.size_hint();
        let done = body.is_end_stream();
        Arc::new(Recorder {
            shared: Mutex::new(Shared {
                source: Some(body),
                chunks: Vec::new(),
                size: 0,
                trailers: None,
                done,
                overflow: false,
                committed: false,
                generation: 0,
                parked: None,
            }),
            hint,
            limit,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the body can still be sent again from its start.
    pub fn replayable(&self) -> bool {
        !self.lock().overflow
    }

    /// The current attempt has its answer: there will be no retry, so
    /// nothing more is kept (a long gRPC stream does not hold its first
    /// megabyte for its whole life).
    pub fn commit(&self) {
        self.lock().committed = true;
    }

    /// A body for the next attempt, from the start; earlier readers stop.
    /// `None` when the body can no longer be replayed.
    pub fn reader(self: &Arc<Self>) -> Option<Replay> {
        let mut s = self.lock();
        if s.overflow {
            return None;
        }
        s.generation += 1;
        if let Some(w) = s.parked.take() {
            w.wake();
        }
        Some(Replay {
            recorder: self.clone(),
            generation: s.generation,
            pos: 0,
            trailers_sent: false,
        })
    }
}

/// One attempt's view of the body.
#[derive(Debug)]
pub struct Replay {
    recorder: Arc<Recorder>,
    generation: u64,
    pos: usize,
    trailers_sent: bool,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let limit = this.recorder.limit;
        let mut s = this.recorder.lock();
        if s.generation != this.generation {
            return Poll::Ready(Some(Err("request body taken by a retry".into())));
        }
        if !s.overflow && this.pos < s.chunks.len() {
            let chunk = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.committed && !s.overflow {
            // Replayed to the end, and no retry to come: let it go.
            s.overflow = true;
            s.chunks = Vec::new();
        }
        if s.done {
            return match (&s.trailers, this.trailers_sent) {
                (Some(t), false) => {
                    this.trailers_sent = true;
                    Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
                }
                _ => Poll::Ready(None),
            };
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(source).poll_frame(cx) {
            Poll::Pending => {
                s.parked = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(f) => f,
        };
        match frame {
            None => {
                s.done = true;
                s.source = None;
                // Trailers an earlier attempt read, before the end it did not.
                match (&s.trailers, this.trailers_sent) {
                    (Some(t), false) => {
                        this.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t.clone()))))
                    }
                    _ => Poll::Ready(None),
                }
            }
            Some(Err(e)) => {
                s.done = true;
                s.overflow = true;
                s.source = None;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !s.overflow {
                        s.size += data.len();
                        if s.size > limit {
                            s.overflow = true;
                            s.chunks = Vec::new();
                        } else {
                            s.chunks.push(data.clone());
                            this.pos += 1;
                        }
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recorder.hint.exact() == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.recorder.hint
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    /// A body of these frames, in order (shared with other modules' tests).
    pub(crate) struct Frames(pub(crate) std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    fn body(chunks: &[&'static str], trailers: bool) -> BoxBody {
        let mut frames: std::collections::VecDeque<Frame<Bytes>> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c.as_bytes())))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push_back(Frame::trailers(t));
        }
        Frames(frames).boxed()
    }

    async fn collect(r: Replay) -> Result<(Vec<u8>, Option<HeaderMap>), BoxError> {
        let c = r.collect().await?;
        let trailers = c.trailers().cloned();
        Ok((c.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn replays_whole_body_and_trailers() {
        let rec = Recorder::new(body(&["ab", "cd", "ef"], true), 1024);
        let (first, t1) = collect(rec.reader().unwrap()).await.unwrap();
        assert_eq!(first, b"abcdef");
        let (again, t2) = collect(rec.reader().unwrap()).await.unwrap();
        assert_eq!(again, b"abcdef");
        assert_eq!(t1, t2);
        assert!(t2.is_some());
    }

    /// A retry after part of the body: the copy, then the rest from the client.
    #[tokio::test]
    async fn resumes_where_the_last_attempt_stopped() {
        let rec = Recorder::new(body(&["ab", "cd", "ef"], false), 1024);
        let mut first = rec.reader().unwrap();
        let f = first.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "ab");
        let second = rec.reader().unwrap();
        assert!(
            first.frame().await.unwrap().is_err(),
            "the old reader is cut off"
        );
        assert_eq!(collect(second).await.unwrap().0, b"abcdef");
    }

    /// A reader waiting on the client is woken when a retry takes over,
    /// and then ends with an error (its upstream stream with it).
    #[tokio::test]
    async fn a_superseded_waiting_reader_is_woken() {
        /// A body fed by a channel: pending until something is sent.
        struct Chan(tokio::sync::mpsc::Receiver<Bytes>);
        impl Body for Chan {
            type Data = Bytes;
            type Error = BoxError;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
                self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let rec = Recorder::new(Chan(rx).boxed(), 1024);
        let mut first = rec.reader().unwrap();
        let waiting = tokio::spawn(async move { first.frame().await });
        tokio::task::yield_now().await;
        let second = rec.reader().unwrap();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the old reader was woken")
            .unwrap();
        assert!(matches!(ended, Some(Err(_))), "{ended:?}");
        tx.send(Bytes::from_static(b"late")).await.unwrap();
        drop(tx);
        assert_eq!(collect(second).await.unwrap().0, b"late");
    }

    /// Once committed, what was kept goes after it is replayed, and no
    /// more is kept.
    #[tokio::test]
    async fn commit_keeps_nothing_more() {
        let rec = Recorder::new(body(&["ab", "cd"], false), 1024);
        let mut r = rec.reader().unwrap();
        assert_eq!(r.frame().await.unwrap().unwrap().into_data().unwrap(), "ab");
        rec.commit();
        assert_eq!(collect(r).await.unwrap().0, b"cd");
        assert!(!rec.replayable());
        assert!(rec.lock().chunks.is_empty());
    }

    /// Trailers an attempt read before the end reach the retry too.
    #[tokio::test]
    async fn trailers_survive_a_retry_before_the_end() {
        let rec = Recorder::new(body(&["ab"], true), 1024);
        let mut first = rec.reader().unwrap();
        assert!(first.frame().await.unwrap().unwrap().is_data());
        assert!(first.frame().await.unwrap().unwrap().is_trailers());
        let (data, trailers) = collect(rec.reader().unwrap()).await.unwrap();
        assert_eq!(data, b"ab");
        assert!(trailers.is_some(), "trailers replayed");
    }

    #[tokio::test]
    async fn past_the_limit_no_replay() {
        let rec = Recorder::new(body(&["abcd", "efgh", "ij"], false), 6);
        assert_eq!(
            collect(rec.reader().unwrap()).await.unwrap().0,
            b"abcdefghij"
        );
        assert!(!rec.replayable());
        assert!(rec.reader().is_none());
    }

    #[tokio::test]
    async fn empty_and_sized_bodies_keep_their_framing() {
        let empty = Recorder::new(
            Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
            1024,
        );
        assert!(empty.reader().unwrap().is_end_stream());
        let sized = Recorder::new(
            Full::new(Bytes::from_static(b"12345"))
                .map_err(|e| match e {})
                .boxed(),
            1024,
        );
        let r = sized.reader().unwrap();
        assert_eq!(r.size_hint().exact(), Some(5));
        assert_eq!(collect(r).await.unwrap().0, b"12345");
        assert_eq!(collect(sized.reader().unwrap()).await.unwrap().0, b"12345");
    }
}
