//! Fault injection (VirtualService `fault`), as Envoy's fault filter: a
//! fixed delay and an abort, each for a share of the requests that match
//! the rule, the delay first. Pure: the proxy rolls the dice and acts.

use std::time::Duration;

use weft_xds::proto::waypoint as pb;

/// How an injected abort answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Http(u16),
    /// A trailers-only gRPC response with this `grpc-status`.
    Grpc(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Fault {
    delay: Option<(Duration, f64)>,
    abort: Option<(Abort, f64)>,
}

/// The body of an injected abort, as Envoy's.
pub const ABORT_BODY: &str = "fault filter abort";

/// Whether a roll (uniform over u64) falls within `percent` (0 to 100):
/// a fault's, a mirror's.
pub fn hit(percent: f64, roll: u64) -> bool {
    ((roll % 1_000_000) as f64) < percent * 10_000.0
}

impl Fault {
    pub fn compile(p: Option<&pb::Fault>) -> Option<Fault> {
        let p = p?;
        let delay = (p.delay_ms > 0).then(|| (Duration::from_millis(p.delay_ms), p.delay_percent));
        let abort = if p.grpc_abort {
            Some((Abort::Grpc(p.abort_grpc_status), p.abort_percent))
        } else {
            u16::try_from(p.abort_http_status)
                .ok()
                .filter(|s| (200..600).contains(s))
                .map(|s| (Abort::Http(s), p.abort_percent))
        };
        (delay.is_some() || abort.is_some()).then_some(Fault { delay, abort })
    }

    /// The delay to inject, if this request draws one.
    pub fn delay(&self, roll: u64) -> Option<Duration> {
        self.delay
            .filter(|(_, pct)| hit(*pct, roll))
            .map(|(d, _)| d)
    }

    /// The abort to inject, if this request draws one.
    pub fn abort(&self, roll: u64) -> Option<Abort> {
        self.abort
            .filter(|(_, pct)| hit(*pct, roll))
            .map(|(a, _)| a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compiles_and_draws_its_share() {
        assert_eq!(Fault::compile(None), None);
        assert_eq!(
            Fault::compile(Some(&pb::Fault::default())),
            None,
            "nothing to inject"
        );
        let f = Fault::compile(Some(&pb::Fault {
            delay_ms: 7000,
            delay_percent: 25.0,
            abort_http_status: 503,
            abort_percent: 0.1,
            ..pb::Fault::default()
        }))
        .unwrap();
        // Rolls spread evenly over a million: the shares are exact.
        let delayed = (0..1_000_000u64).filter(|r| f.delay(*r).is_some()).count();
        let aborted = (0..1_000_000u64).filter(|r| f.abort(*r).is_some()).count();
        assert_eq!((delayed, aborted), (250_000, 1_000));
        assert_eq!(f.delay(0), Some(Duration::from_secs(7)));
        assert_eq!(f.abort(0), Some(Abort::Http(503)));
        let g = Fault::compile(Some(&pb::Fault {
            grpc_abort: true,
            abort_grpc_status: 14,
            abort_percent: 100.0,
            ..pb::Fault::default()
        }))
        .unwrap();
        assert!((0..1000u64).all(|r| g.abort(r * 7919) == Some(Abort::Grpc(14))));
        assert!((0..1000u64).all(|r| g.delay(r).is_none()));
        let never = Fault::compile(Some(&pb::Fault {
            abort_http_status: 500,
            ..pb::Fault::default()
        }))
        .unwrap();
        assert!((0..1000u64).all(|r| never.abort(r).is_none()), "0%: none");
    }
}
