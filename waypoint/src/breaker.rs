//! Circuit breaking (DestinationRule `connectionPool`), as Envoy's cluster
//! circuit breakers: per destination (a service, or one of its subsets),
//! limits on requests in flight, HTTP/1.1 connections and the requests
//! waiting for one, and retries in flight. A request past a limit is
//! answered 503 with flag `UO`. A destination without limits has no
//! breaker and costs nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use weft_xds::proto::waypoint as pb;

/// One destination's limits; 0 or `None`: none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub connect_timeout: Option<Duration>,
    pub max_pending: u32,
    pub max_requests: u32,
    pub max_requests_per_connection: u32,
    pub max_retries: u32,
    pub idle_timeout: Option<Duration>,
}

impl Limits {
    /// `p` over `inherit`, field by field (a subset's over its destination's).
    pub fn compile(p: Option<&pb::ConnectionPool>, inherit: Limits) -> Limits {
        let Some(p) = p else {
            return inherit;
        };
        let n = |v: u32, i: u32| if v > 0 { v } else { i };
        let d = |ms: u64, i: Option<Duration>| {
            if ms > 0 {
                Some(Duration::from_millis(ms))
            } else {
                i
            }
        };
        Limits {
            max_connections: n(p.max_connections, inherit.max_connections),
            connect_timeout: d(p.connect_timeout_ms, inherit.connect_timeout),
            max_pending: n(p.http1_max_pending_requests, inherit.max_pending),
            max_requests: n(p.http2_max_requests, inherit.max_requests),
            max_requests_per_connection: n(
                p.max_requests_per_connection,
                inherit.max_requests_per_connection,
            ),
            max_retries: n(p.max_retries, inherit.max_retries),
            idle_timeout: d(p.idle_timeout_ms, inherit.idle_timeout),
        }
    }

    /// Whether any counted limit is set (the others apply per connection).
    fn counted(&self) -> bool {
        self.max_connections > 0 || self.max_requests > 0 || self.max_retries > 0
    }
}

/// A destination's counters.
#[derive(Debug)]
pub struct Breaker {
    limits: Limits,
    requests: AtomicUsize,
    retries: AtomicUsize,
    pending: AtomicUsize,
    connections: Option<Arc<Semaphore>>,
}

/// A counted slot, released on drop.
#[derive(Debug)]
pub struct Slot {
    breaker: Arc<Breaker>,
    retry: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let c = if self.retry {
            &self.breaker.retries
        } else {
            &self.breaker.requests
        };
        c.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request past a limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow;

fn take(counter: &AtomicUsize, limit: u32) -> bool {
    if limit == 0 {
        counter.fetch_add(1, Ordering::AcqRel);
        return true;
    }
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit as usize).then_some(n + 1)
        })
        .is_ok()
}

impl Breaker {
    fn new(limits: Limits) -> Self {
        Breaker {
            limits,
            requests: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            connections: (limits.max_connections > 0)
                .then(|| Arc::new(Semaphore::new(limits.max_connections as usize))),
        }
    }

    /// A request in flight (`http2MaxRequests`).
    pub fn request(self: &Arc<Self>) -> Result<Slot, Overflow> {
        if !take(&self.requests, self.limits.max_requests) {
            return Err(Overflow);
        }
        Ok(Slot {
            breaker: self.clone(),
            retry: false,
        })
    }

    /// A retry in flight (`maxRetries`); `None` when there is no room.
    pub fn retry(self: &Arc<Self>) -> Option<Slot> {
        take(&self.retries, self.limits.max_retries).then(|| Slot {
            breaker: self.clone(),
            retry: true,
        })
    }

    /// An HTTP/1.1 connection for one exchange (`maxConnections`): at once
    /// when one is free, else after waiting among at most
    /// `http1MaxPendingRequests` others.
    pub async fn connection(&self) -> Result<Option<OwnedSemaphorePermit>, Overflow> {
        let Some(sem) = &self.connections else {
            return Ok(None);
        };
        if let Ok(p) = sem.clone().try_acquire_owned() {
            return Ok(Some(p));
        }
        if !take(&self.pending, self.limits.max_pending) {
            return Err(Overflow);
        }
        let permit = sem.clone().acquire_owned().await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        permit.map(Some).map_err(|_| Overflow)
    }
}

/// Every destination's breaker, by destination key.
#[derive(Debug, Default)]
pub struct Breakers {
    map: Mutex<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    /// The breaker of destination `key` under `limits`; `None` without
    /// counted limits. New limits start new counters.
    pub fn get(&self, key: &str, limits: Limits) -> Option<Arc<Breaker>> {
        if !limits.counted() {
            return None;
        }
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get(key) {
            Some(b) if b.limits == limits => Some(b.clone()),
            _ => {
                let b = Arc::new(Breaker::new(limits));
                map.insert(key.to_string(), b.clone());
                Some(b)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(p: pb::ConnectionPool) -> Limits {
        Limits::compile(Some(&p), Limits::default())
    }

    #[test]
    fn subset_overrides_field_by_field() {
        let top = limits(pb::ConnectionPool {
            max_connections: 4,
            http2_max_requests: 10,
            connect_timeout_ms: 500,
            ..Default::default()
        });
        let sub = Limits::compile(
            Some(&pb::ConnectionPool {
                http2_max_requests: 3,
                ..Default::default()
            }),
            top,
        );
        assert_eq!(
            (sub.max_connections, sub.max_requests, sub.connect_timeout),
            (4, 3, Some(Duration::from_millis(500)))
        );
        assert_eq!(Limits::compile(None, top), top);
        let none = Breakers::default();
        assert!(
            none.get("d", Limits::default()).is_none(),
            "no limits, no breaker"
        );
    }

    #[tokio::test]
    async fn limits_hold_and_release() {
        let breakers = Breakers::default();
        let l = limits(pb::ConnectionPool {
            max_connections: 1,
            http1_max_pending_requests: 1,
            http2_max_requests: 2,
            max_retries: 1,
            ..Default::default()
        });
        let b = breakers.get("d", l).unwrap();
        let r1 = b.request().unwrap();
        let _r2 = b.request().unwrap();
        assert_eq!(b.request().unwrap_err(), Overflow, "two requests at most");
        drop(r1);
        assert!(b.request().is_ok(), "room again");
        let retry = b.retry().unwrap();
        assert!(b.retry().is_none());
        drop(retry);
        assert!(b.retry().is_some());

        // One connection; one request may wait for it; the next overflows.
        let held = b.connection().await.unwrap();
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.connection().await.map(|p| p.is_some()) })
        };
        tokio::task::yield_now().await;
        while b.pending.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.connection().await.unwrap_err(), Overflow);
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(true), "the waiter gets it");
        assert!(
            Arc::ptr_eq(&b, &breakers.get("d", l).unwrap()),
            "same limits, same counters"
        );
    }
}
