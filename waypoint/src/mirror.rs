//! Request mirroring (VirtualService `mirror` / `mirrors`, HTTPRoute
//! `RequestMirror`), as Envoy's request shadowing: for its share of a
//! rule's requests, a copy goes to another service, its host suffixed
//! `-shadow`. Fire and forget: the copy's answer is read and dropped, and
//! its failure, slowness or absence never reaches the client.
//!
//! The copy's body is the client's, collected by a [`Tee`] as the request
//! streams upstream, up to [`MIRROR_BODY_LIMIT`]; the copy leaves once the
//! client's body has ended. A larger body, or one the upstream never reads
//! to its end, is not mirrored (counted `dropped`).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use weft_xds::proto::waypoint as pb;

use crate::proxy::{Body as BoxBody, BoxError};
use crate::route::RouteError;

/// The largest body copied for mirrors (Envoy's default buffer limit).
pub const MIRROR_BODY_LIMIT: usize = 1024 * 1024;
/// Mirrored requests in flight at once, all services together; more are
/// dropped, so that a mirror that hangs cannot pile up memory.
pub const MIRRORS_IN_FLIGHT: usize = 1024;
/// A mirrored request's limit when its rule sets no timeout.
pub const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// One mirror of a rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    /// The service, by `namespace/hostname`.
    pub service: String,
    pub subset: String,
    /// 0: the port the request came to.
    pub port: u16,
    /// The share of requests copied, 0 to 100.
    pub percent: f64,
}

impl Mirror {
    pub fn compile(m: &pb::Mirror, at: &str) -> Result<Mirror, RouteError> {
        let port = u16::try_from(m.port).map_err(|_| RouteError {
            field: format!("{at}.port"),
            message: "out of range".into(),
        })?;
        if !(0.0..=100.0).contains(&m.percent) {
            return Err(RouteError {
                field: format!("{at}.percent"),
                message: format!("{} is not within 0 to 100", m.percent),
            });
        }
        Ok(Mirror {
            service: format!("{}/{}", m.namespace, m.hostname),
            subset: m.subset.clone(),
            port,
            percent: m.percent,
        })
    }
}

/// `host[:port]` as Envoy sends it to a mirror: `host-shadow[:port]`.
pub fn shadow_authority(authority: &str) -> String {
    // An IPv6 literal keeps its brackets; only a port after them splits.
    let split = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') && authority[i + 1..].parse::<u16>().is_ok() => {
            Some(i)
        }
        _ => None,
    };
    match split {
        Some(i) => format!("{}-shadow{}", &authority[..i], &authority[i..]),
        None => format!("{authority}-shadow"),
    }
}

/// A request body, collected whole for the mirrors.
#[derive(Debug, Clone)]
pub struct Copied {
    pub data: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Copied {
    /// As a request body.
    pub fn body(self) -> BoxBody {
        use http_body_util::BodyExt;
        let data = http_body_util::Full::new(self.data).map_err(BoxError::from);
        match self.trailers {
            Some(t) => data.with_trailers(async move { Some(Ok(t)) }).boxed(),
            None => data.boxed(),
        }
    }
}

/// The client's body on its way upstream, copied for the mirrors. Each
/// mirror gets the copy when the body ends; past the limit, or on an
/// error, they get nothing.
#[derive(Debug)]
pub struct Tee {
    inner: BoxBody,
    copy: BytesMut,
    trailers: Option<HeaderMap>,
    waiting: Vec<oneshot::Sender<Copied>>,
}

impl Tee {
    /// The body, and one receiver per mirror.
    pub fn new(inner: BoxBody, mirrors: usize) -> (Tee, Vec<oneshot::Receiver<Copied>>) {
        let (waiting, receivers) = (0..mirrors).map(|_| oneshot::channel()).unzip();
        (
            Tee {
                inner,
                copy: BytesMut::new(),
                trailers: None,
                waiting,
            },
            receivers,
        )
    }

    fn finish(&mut self) {
        let copied = Copied {
            data: std::mem::take(&mut self.copy).freeze(),
            trailers: self.trailers.take(),
        };
        for w in self.waiting.drain(..) {
            let _ = w.send(copied.clone());
        }
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        // A mirror that gave up (no endpoint, too many in flight) needs no copy.
        this.waiting.retain(|w| !w.is_closed());
        if this.waiting.is_empty() {
            this.copy = BytesMut::new();
            return Poll::Ready(frame);
        }
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    if this.copy.len() + d.len() > MIRROR_BODY_LIMIT {
                        // Too large to mirror: the receivers see nothing.
                        this.waiting.clear();
                        this.copy = BytesMut::new();
                    } else {
                        this.copy.extend_from_slice(d);
                    }
                } else if let Some(t) = f.trailers_ref() {
                    this.trailers = Some(t.clone());
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
            }
            Some(Err(_)) => this.waiting.clear(),
            None => this.finish(),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn shadow_hosts() {
        for (a, b) in [
            ("reviews:9080", "reviews-shadow:9080"),
            ("reviews", "reviews-shadow"),
            (
                "reviews.bookinfo.svc.cluster.local",
                "reviews.bookinfo.svc.cluster.local-shadow",
            ),
            ("10.0.0.1:80", "10.0.0.1-shadow:80"),
            ("[fd00::1]:80", "[fd00::1]-shadow:80"),
            ("[fd00::1]", "[fd00::1]-shadow"),
        ] {
            assert_eq!(shadow_authority(a), b);
        }
    }

    /// A body in these chunks, each its own frame.
    fn chunks(parts: &[&'static str]) -> BoxBody {
        crate::replay::tests::Frames(
            parts
                .iter()
                .map(|p| Frame::data(Bytes::from_static(p.as_bytes())))
                .collect(),
        )
        .boxed()
    }

    /// The upstream reads the body as it is; each mirror gets all of it
    /// once it has ended, and none of it past the limit.
    #[tokio::test]
    async fn the_copy_is_whole_or_nothing() {
        let (tee, rx) = Tee::new(chunks(&["hello ", "mirror"]), 2);
        let upstream = tee.collect().await.unwrap().to_bytes();
        assert_eq!(upstream, "hello mirror");
        for r in rx {
            let c = r.await.unwrap();
            assert_eq!(c.data, "hello mirror");
            assert_eq!(c.body().collect().await.unwrap().to_bytes(), "hello mirror");
        }

        let big: &'static str = Box::leak("x".repeat(MIRROR_BODY_LIMIT).into_boxed_str());
        let (tee, mut rx) = Tee::new(chunks(&["a", big]), 1);
        let upstream = tee.collect().await.unwrap().to_bytes();
        assert_eq!(upstream.len(), MIRROR_BODY_LIMIT + 1);
        assert!(rx.remove(0).await.is_err());

        // The upstream stops reading: the mirror never gets a body.
        let (mut tee, mut rx) = Tee::new(chunks(&["a", "b"]), 1);
        let _ = tee.frame().await;
        drop(tee);
        assert!(rx.remove(0).await.is_err());
    }
}
