//! Outlier detection (DestinationRule `outlierDetection`), as Envoy's
//! consecutive-error ejection: an endpoint that answers with enough 5xx
//! (or gateway errors) in a row, connection failures and resets counting
//! as 503 (Envoy's default), is left out of balancing for the base
//! ejection time times its ejections so far, while at most
//! `maxEjectionPercent` of the destination's endpoints are out. When every
//! endpoint is out, all are used (Envoy's panic mode).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use weft_xds::proto::waypoint as pb;

use crate::retry::Outcome;
use crate::state::Endpoint;

/// A destination's detection settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Detection {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    base: Duration,
    max_percent: u32,
}

impl Detection {
    pub fn compile(p: Option<&pb::OutlierDetection>) -> Option<Detection> {
        let p = p?;
        (p.consecutive_5xx_errors > 0 || p.consecutive_gateway_errors > 0).then(|| Detection {
            consecutive_5xx: p.consecutive_5xx_errors,
            consecutive_gateway: p.consecutive_gateway_errors,
            base: Duration::from_millis(p.base_ejection_time_ms.max(1)),
            max_percent: p.max_ejection_percent,
        })
    }
}

#[derive(Debug, Default)]
struct Host {
    errors_5xx: u32,
    errors_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Every destination's endpoints that have failed, by destination key.
#[derive(Debug, Default)]
pub struct Outliers {
    hosts: Mutex<HashMap<String, HashMap<SocketAddr, Host>>>,
}

impl Outliers {
    /// The endpoints of destination `dest` not ejected now; all of them
    /// when every one is.
    pub fn healthy(&self, dest: &str, endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
        let now = Instant::now();
        let mut map = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(hosts) = map.get_mut(dest) else {
            return endpoints;
        };
        let out = |a: &SocketAddr| {
            hosts
                .get(a)
                .and_then(|h| h.ejected_until)
                .is_some_and(|t| t > now)
        };
        if endpoints.iter().all(|e| out(&e.addr)) {
            return endpoints;
        }
        endpoints.into_iter().filter(|e| !out(&e.addr)).collect()
    }

    /// The endpoints ejected now, as JSON lines for the admin view:
    /// destination, endpoint, seconds left, ejections so far.
    pub fn ejected_json(&self) -> String {
        let now = Instant::now();
        let map = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<String> = map
            .iter()
            .flat_map(|(dest, hosts)| {
                hosts.iter().filter_map(move |(addr, h)| {
                    let until = h.ejected_until.filter(|t| *t > now)?;
                    Some(format!(
                        "{{\"destination\":{dest:?},\"endpoint\":\"{addr}\",\"ejected_for_s\":{:.1},\"ejections\":{}}}",
                        (until - now).as_secs_f64(),
                        h.ejections
                    ))
                })
            })
            .collect();
        out.sort();
        format!("[{}]\n", out.join(",\n "))
    }

    /// Whether `addr` of `dest` is ejected now (for tests and the admin view).
    pub fn ejected(&self, dest: &str, addr: SocketAddr) -> bool {
        let map = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(dest)
            .and_then(|h| h.get(&addr))
            .and_then(|h| h.ejected_until)
            .is_some_and(|t| t > Instant::now())
    }

    /// Counts what an attempt on `addr` came to; returns whether it was
    /// ejected for it. `total` is the destination's endpoint count.
    pub fn report(
        &self,
        dest: &str,
        addr: SocketAddr,
        total: usize,
        d: &Detection,
        outcome: Outcome,
    ) -> bool {
        let (is_5xx, is_gateway) = match outcome {
            Outcome::Response { status, .. } => {
                ((500..600).contains(&status), matches!(status, 502..=504))
            }
            // Local failures count as a 503.
            _ => (true, true),
        };
        let now = Instant::now();
        let mut map = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        if !is_5xx {
            if let Some(hosts) = map.get_mut(dest)
                && hosts
                    .get(&addr)
                    .is_some_and(|h| h.ejected_until.is_none_or(|t| t <= now))
            {
                hosts.remove(&addr);
            }
            return false;
        }
        let hosts = map.entry(dest.to_string()).or_default();
        let ejected_now = hosts
            .values()
            .filter(|h| h.ejected_until.is_some_and(|t| t > now))
            .count();
        let h = hosts.entry(addr).or_default();
        if h.ejected_until.is_some_and(|t| t > now) {
            return false;
        }
        h.errors_5xx += 1;
        if is_gateway {
            h.errors_gateway += 1;
        } else {
            h.errors_gateway = 0;
        }
        let tripped = (d.consecutive_5xx > 0 && h.errors_5xx >= d.consecutive_5xx)
            || (d.consecutive_gateway > 0 && h.errors_gateway >= d.consecutive_gateway);
        let room = (ejected_now * 100) < (d.max_percent as usize * total.max(1));
        if !(tripped && room) {
            return false;
        }
        h.ejections += 1;
        h.ejected_until = Some(now + d.base * h.ejections);
        h.errors_5xx = 0;
        h.errors_gateway = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(i: u8) -> Endpoint {
        Endpoint::for_test(i)
    }

    fn status(s: u16) -> Outcome {
        Outcome::Response {
            status: s,
            grpc: None,
            ratelimited: false,
        }
    }

    #[test]
    fn consecutive_errors_eject_within_the_limit() {
        let d = Detection::compile(Some(&pb::OutlierDetection {
            consecutive_5xx_errors: 3,
            base_ejection_time_ms: 60_000,
            max_ejection_percent: 50,
            ..Default::default()
        }))
        .unwrap();
        let o = Outliers::default();
        let (a, b) = (ep(1), ep(2));
        // Two errors, a success, two errors: never three in a row.
        for s in [503, 500, 200, 502, 500] {
            assert!(!o.report("d", a.addr, 2, &d, status(s)));
        }
        assert!(
            o.report("d", a.addr, 2, &d, Outcome::ConnectFailure),
            "the third in a row"
        );
        assert!(o.ejected("d", a.addr));
        let healthy = o.healthy("d", vec![a.clone(), b.clone()]);
        assert_eq!(healthy.len(), 1);
        assert_eq!(healthy[0].addr, b.addr);
        // 50%: the second endpoint may not go too.
        for _ in 0..5 {
            assert!(!o.report("d", b.addr, 2, &d, status(503)));
        }
        assert!(!o.ejected("d", b.addr));
        // Another destination is its own.
        assert_eq!(o.healthy("other", vec![a.clone()]).len(), 1);
    }

    #[test]
    fn ejection_ends_and_all_out_means_all_in() {
        let d = Detection::compile(Some(&pb::OutlierDetection {
            consecutive_gateway_errors: 1,
            base_ejection_time_ms: 50,
            max_ejection_percent: 100,
            ..Default::default()
        }))
        .unwrap();
        let o = Outliers::default();
        let a = ep(1);
        assert!(
            !o.report("d", a.addr, 1, &d, status(500)),
            "not a gateway error"
        );
        assert!(o.report("d", a.addr, 1, &d, status(504)));
        assert_eq!(
            o.healthy("d", vec![a.clone()]).len(),
            1,
            "every one out: all in"
        );
        std::thread::sleep(Duration::from_millis(80));
        assert!(!o.ejected("d", a.addr), "back after its time");
        assert!(Detection::compile(Some(&pb::OutlierDetection::default())).is_none());
    }
}
