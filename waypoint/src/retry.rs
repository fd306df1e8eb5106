//! Retries, as Envoy's router does them for Istio: which outcomes are
//! retried (`retry_on`), how long to wait between attempts (jittered
//! exponential backoff), and a budget that keeps retries from multiplying
//! the load on a failing service. Pure: the proxy asks, this answers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weft_xds::proto::waypoint as pb;

/// What one attempt came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived: the status, `grpc-status` when the
    /// headers carry one (a trailers-only gRPC response), and whether they
    /// carry `x-envoy-ratelimited`.
    Response {
        status: u16,
        grpc: Option<u32>,
        ratelimited: bool,
    },
    /// No connection to the endpoint.
    ConnectFailure,
    /// The stream was refused before it was processed (HTTP/2 REFUSED_STREAM).
    RefusedStream,
    /// The connection or stream ended before response headers.
    Reset,
    /// The attempt's own timeout (perTryTimeout) expired.
    PerTryTimeout,
}

/// Conditions, as bits.
const C_5XX: u32 = 1;
const C_GATEWAY: u32 = 1 << 1;
const C_RESET: u32 = 1 << 2;
const C_CONNECT: u32 = 1 << 3;
const C_4XX: u32 = 1 << 4;
const C_REFUSED: u32 = 1 << 5;
const C_CODES: u32 = 1 << 6;
const G_CANCELLED: u32 = 1 << 7;
const G_DEADLINE: u32 = 1 << 8;
const G_INTERNAL: u32 = 1 << 9;
const G_EXHAUSTED: u32 = 1 << 10;
const G_UNAVAILABLE: u32 = 1 << 11;
const C_RESET_BEFORE: u32 = 1 << 12;
const C_RATELIMITED: u32 = 1 << 13;

/// Envoy's default base interval; the cap is ten times the base.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);

/// No retries.
pub const NO_RETRY: Policy = Policy {
    attempts: 0,
    per_try_timeout: None,
    previous_hosts: false,
    on: 0,
    codes: Vec::new(),
    backoff: DEFAULT_BACKOFF,
};

/// A compiled retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    /// A retry may go to an endpoint already tried.
    pub previous_hosts: bool,
    on: u32,
    codes: Vec<u16>,
    backoff: Duration,
}

impl Policy {
    /// Istio's default: 2 retries on connect-failure, refused-stream,
    /// unavailable, cancelled and 503.
    pub fn istio_default() -> Self {
        Policy {
            attempts: 2,
            per_try_timeout: None,
            previous_hosts: false,
            on: C_CONNECT | C_REFUSED | G_UNAVAILABLE | G_CANCELLED | C_CODES,
            codes: vec![503],
            backoff: DEFAULT_BACKOFF,
        }
    }

    /// The rule's policy: unset is Istio's default. Unknown conditions were
    /// refused by the controller; one that still arrives is ignored, which
    /// retries less, never more.
    pub fn compile(p: Option<&pb::RetryPolicy>) -> Self {
        let Some(p) = p else {
            return Policy::istio_default();
        };
        let on = p.retry_on.iter().fold(0, |acc, c| {
            acc | match c.as_str() {
                "5xx" => C_5XX,
                "gateway-error" => C_GATEWAY,
                "reset" => C_RESET,
                "reset-before-request" => C_RESET_BEFORE,
                "envoy-ratelimited" => C_RATELIMITED,
                "connect-failure" => C_CONNECT,
                "retriable-4xx" => C_4XX,
                "refused-stream" => C_REFUSED,
                "retriable-status-codes" => C_CODES,
                "cancelled" => G_CANCELLED,
                "deadline-exceeded" => G_DEADLINE,
                "internal" => G_INTERNAL,
                "resource-exhausted" => G_EXHAUSTED,
                "unavailable" => G_UNAVAILABLE,
                _ => 0,
            }
        });
        Policy {
            attempts: p.attempts,
            previous_hosts: p.allow_previous_hosts,
            per_try_timeout: (p.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(p.per_try_timeout_ms)),
            on,
            codes: p
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            backoff: match p.backoff_base_ms {
                0 => DEFAULT_BACKOFF,
                ms => Duration::from_millis(ms),
            },
        }
    }

    /// Whether an attempt that came to `o` is retried (attempts left aside).
    pub fn retries(&self, o: Outcome) -> bool {
        let on = |c: u32| self.on & c != 0;
        match o {
            // Every reset, connect failures and refusals included, for
            // 5xx, gateway-error and reset (Envoy); the narrower ones for
            // their own.
            // Nothing of the request reached the upstream: also
            // reset-before-request.
            Outcome::ConnectFailure => on(C_5XX | C_GATEWAY | C_RESET | C_CONNECT | C_RESET_BEFORE),
            Outcome::RefusedStream => on(C_5XX | C_GATEWAY | C_RESET | C_REFUSED | C_RESET_BEFORE),
            Outcome::Reset => on(C_5XX | C_GATEWAY | C_RESET),
            Outcome::PerTryTimeout => on(C_5XX | C_GATEWAY | C_RESET),
            Outcome::Response {
                status,
                grpc,
                ratelimited,
            } => {
                (on(C_RATELIMITED) && ratelimited)
                    || (on(C_5XX) && (500..600).contains(&status))
                    || (on(C_GATEWAY) && matches!(status, 502..=504))
                    || (on(C_4XX) && status == 409)
                    || (on(C_CODES) && self.codes.contains(&status))
                    || grpc.is_some_and(|g| match g {
                        1 => on(G_CANCELLED),
                        4 => on(G_DEADLINE),
                        8 => on(G_EXHAUSTED),
                        13 => on(G_INTERNAL),
                        14 => on(G_UNAVAILABLE),
                        _ => false,
                    })
            }
        }
    }

    /// The wait before retry `n` (1 for the first): uniform in
    /// `[0, base × 2^(n-1)]`, capped at ten times the base (Envoy's jittered
    /// exponential backoff). `roll` is a random number.
    pub fn backoff(&self, n: u32, roll: u64) -> Duration {
        let base = self.backoff.as_millis().max(1) as u64;
        let ceiling = base
            .saturating_mul(1u64 << n.saturating_sub(1).min(20))
            .min(base * 10);
        Duration::from_millis(roll % (ceiling + 1))
    }
}

/// Envoy's retry budget: at most this share of a service's active requests
/// may be retries at once...
pub const BUDGET_PERCENT: usize = 20;
/// ...but always at least this many.
pub const MIN_RETRY_CONCURRENCY: usize = 3;

/// Retries in flight, per destination service. Nothing is counted for a
/// request that is not retried: the service's active requests are the
/// endpoints' in-flight counts, which the balancer keeps anyway.
#[derive(Debug, Default)]
pub struct Budget {
    retrying: Mutex<HashMap<String, usize>>,
    /// Retries refused by the budget, for the metrics.
    pub overflows: AtomicUsize,
}

/// A retry in flight, counted until it drops.
#[derive(Debug)]
pub struct Retrying<'a> {
    budget: &'a Budget,
    service: String,
}

impl Budget {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.retrying.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Room for one more retry to `service`, which has `active` requests in
    /// flight (this one included), if the budget has it.
    pub fn try_retry(&self, service: &str, active: usize) -> Option<Retrying<'_>> {
        let allowed = (active * BUDGET_PERCENT / 100).max(MIN_RETRY_CONCURRENCY);
        let mut map = self.lock();
        let retrying = map.get(service).copied().unwrap_or(0);
        if retrying >= allowed {
            drop(map);
            self.overflows.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *map.entry(service.to_string()).or_default() += 1;
        Some(Retrying {
            budget: self,
            service: service.to_string(),
        })
    }
}

impl Drop for Retrying<'_> {
    fn drop(&mut self) {
        let mut map = self.budget.lock();
        if let Some(n) = map.get_mut(&self.service) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.service);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &[&str], codes: &[u32]) -> Policy {
        Policy::compile(Some(&pb::RetryPolicy {
            attempts: 2,
            retry_on: on.iter().map(|s| s.to_string()).collect(),
            retriable_status_codes: codes.to_vec(),
            ..pb::RetryPolicy::default()
        }))
    }

    fn resp(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc: None,
            ratelimited: false,
        }
    }

    fn grpc(code: u32) -> Outcome {
        Outcome::Response {
            status: 200,
            grpc: Some(code),
            ratelimited: false,
        }
    }

    const LIMITED: Outcome = Outcome::Response {
        status: 429,
        grpc: None,
        ratelimited: true,
    };

    /// Each condition against each outcome, as Envoy decides.
    #[test]
    fn conditions() {
        use Outcome::*;
        let all = [
            resp(200),
            resp(409),
            resp(500),
            resp(502),
            resp(503),
            resp(504),
            ConnectFailure,
            RefusedStream,
            Reset,
            PerTryTimeout,
            grpc(1),
            grpc(4),
            grpc(8),
            grpc(13),
            grpc(14),
            grpc(2),
            LIMITED,
        ];
        let table: &[(&[&str], &[u32], &[Outcome])] = &[
            (
                &["5xx"],
                &[],
                &[
                    resp(500),
                    resp(502),
                    resp(503),
                    resp(504),
                    ConnectFailure,
                    RefusedStream,
                    Reset,
                    PerTryTimeout,
                ],
            ),
            (
                &["gateway-error"],
                &[],
                &[
                    resp(502),
                    resp(503),
                    resp(504),
                    ConnectFailure,
                    RefusedStream,
                    Reset,
                    PerTryTimeout,
                ],
            ),
            (
                &["reset"],
                &[],
                &[ConnectFailure, RefusedStream, Reset, PerTryTimeout],
            ),
            (&["connect-failure"], &[], &[ConnectFailure]),
            (
                &["reset-before-request"],
                &[],
                &[ConnectFailure, RefusedStream],
            ),
            (&["envoy-ratelimited"], &[], &[LIMITED]),
            (
                &["retriable-headers", "http3-post-connect-failure"],
                &[],
                &[],
            ),
            (&["refused-stream"], &[], &[RefusedStream]),
            (&["retriable-4xx"], &[], &[resp(409)]),
            (
                &["retriable-status-codes"],
                &[503, 409],
                &[resp(409), resp(503)],
            ),
            (&["retriable-status-codes"], &[], &[]),
            (&["cancelled"], &[], &[grpc(1)]),
            (&["deadline-exceeded"], &[], &[grpc(4)]),
            (&["resource-exhausted"], &[], &[grpc(8)]),
            (&["internal"], &[], &[grpc(13)]),
            (&["unavailable"], &[], &[grpc(14)]),
            (&["what-ever"], &[], &[]),
        ];
        for (on, codes, want) in table {
            let p = policy(on, codes);
            for o in all {
                assert_eq!(p.retries(o), want.contains(&o), "{on:?} {codes:?}: {o:?}");
            }
        }
        // Istio's default.
        let d = Policy::istio_default();
        let retried: Vec<Outcome> = all.into_iter().filter(|o| d.retries(*o)).collect();
        assert_eq!(
            retried,
            [resp(503), ConnectFailure, RefusedStream, grpc(1), grpc(14)]
        );
        assert_eq!(d.attempts, 2);
        assert_eq!(Policy::compile(None), d, "unset: the default");
        assert_eq!(policy(&[], &[]).attempts, 2);
        assert!(
            !policy(&[], &[]).retries(ConnectFailure),
            "set, with no conditions: none"
        );
    }

    #[test]
    fn backoff_is_jittered_exponential_and_capped() {
        let p = Policy::istio_default();
        for (n, ceiling) in [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (30, 250)] {
            assert_eq!(p.backoff(n, ceiling), Duration::from_millis(ceiling));
            assert_eq!(p.backoff(n, ceiling + 1), Duration::ZERO, "wraps to 0: {n}");
            for roll in [0, 7, 1234567, u64::MAX] {
                assert!(p.backoff(n, roll) <= Duration::from_millis(ceiling));
            }
        }
    }

    #[test]
    fn budget() {
        let b = Budget::default();
        // 10 active: 20% is 2, but at least 3 retries at once.
        let first: Vec<_> = (0..10).filter_map(|_| b.try_retry("svc", 10)).collect();
        assert_eq!(first.len(), 3);
        assert_eq!(b.overflows.load(Ordering::Relaxed), 7);
        // 30 active: 6 at once, 3 more.
        let more: Vec<_> = (0..10).filter_map(|_| b.try_retry("svc", 30)).collect();
        assert_eq!(more.len(), 3);
        // Another service has its own.
        assert!(b.try_retry("other", 1).is_some());
        drop(first);
        let again: Vec<_> = (0..10).filter_map(|_| b.try_retry("svc", 30)).collect();
        assert_eq!(again.len(), 3, "finished retries give their room back");
        drop(again);
        drop(more);
        assert!(b.lock().is_empty(), "nothing left behind");
    }
}
