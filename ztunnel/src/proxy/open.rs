//! Connections ztunnel admitted, so that a policy change applies to them
//! too, as in Istio's ztunnel: when a new state denies an open connection,
//! it is closed, and the log says which policy closed it. Connections the
//! new state still allows stay open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use weft_api::Identity;
use weft_api::authz::Connection;

use crate::metrics::{Direction, Metrics};
use crate::state::{State, Store};

/// What a connection was admitted as.
#[derive(Debug)]
struct Open {
    direction: Direction,
    destination_uid: String,
    source: Option<Identity>,
    source_addr: SocketAddr,
    destination_addr: SocketAddr,
    close: CancellationToken,
}

/// A connection as it is admitted: what its authorization, its
/// registration and each check against a newer state need.
#[derive(Clone, Copy, Debug)]
pub struct Admission<'a> {
    pub direction: Direction,
    pub destination_uid: &'a str,
    /// The peer's verified identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub source_addr: SocketAddr,
    pub destination_addr: SocketAddr,
}

impl<'a> Admission<'a> {
    /// What a policy check knows of it.
    pub fn connection(&self) -> Connection<'a> {
        Connection {
            source: self.source,
            source_ip: self.source_addr.ip(),
            destination_ip: self.destination_addr.ip(),
            destination_port: self.destination_addr.port(),
        }
    }
}

/// Every admitted inbound connection of this ztunnel.
#[derive(Debug, Default)]
pub struct OpenConnections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Open>>,
}

/// Held while the connection is open; cancelled when a policy closes it.
#[derive(Debug)]
pub struct Registered {
    id: u64,
    registry: Arc<OpenConnections>,
    pub closed: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl OpenConnections {
    /// Records a connection that the state of `generation` authorized, and
    /// checks it again against each state installed since; None (the
    /// connection is refused, as at admission) if one denies it.
    ///
    /// Without the second check, a state installed between the caller's
    /// authorization and this registration would be revalidated without
    /// the connection and never with it: a connection the new policy
    /// denies would stay open. Registering first makes the two meet: a
    /// revalidation that runs before the registration (both take the same
    /// lock) read a generation this check then reads too.
    pub fn register_checked(
        self: &Arc<Self>,
        store: &Store,
        generation: u64,
        metrics: &Metrics,
        admitted: Admission<'_>,
    ) -> Option<Registered> {
        let registered = self.register(admitted);
        let mut checked = generation;
        loop {
            let now = store.generation();
            if now == checked {
                return Some(registered);
            }
            if !allows(&store.snapshot(), metrics, admitted) {
                return None;
            }
            checked = now;
        }
    }

    /// Records an admitted connection; only through
    /// [`Self::register_checked`].
    fn register(self: &Arc<Self>, a: Admission<'_>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Open {
                direction: a.direction,
                destination_uid: a.destination_uid.to_string(),
                source: a.source.cloned(),
                source_addr: a.source_addr,
                destination_addr: a.destination_addr,
                close: close.clone(),
            },
        );
        Registered {
            id,
            registry: self.clone(),
            closed: close,
        }
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every open connection against `state`'s policies and closes
    /// those it denies (each denial logged and counted as at admission).
    /// Returns how many were closed.
    pub fn revalidate(&self, state: &State, metrics: &Metrics) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for o in open.values().filter(|o| !o.close.is_cancelled()) {
            let admitted = Admission {
                direction: o.direction,
                destination_uid: &o.destination_uid,
                source: o.source.as_ref(),
                source_addr: o.source_addr,
                destination_addr: o.destination_addr,
            };
            if !allows(state, metrics, admitted) {
                tracing::warn!(
                    target: "access",
                    direction = ?o.direction,
                    src.addr = %o.source_addr,
                    dst.addr = %o.destination_addr,
                    "open connection closed: the policy now denies it"
                );
                o.close.cancel();
                closed += 1;
            }
        }
        closed
    }
}

/// Whether `state` lets an admitted connection stay open. A destination
/// gone from the state keeps its connections: only a policy closes them.
fn allows(state: &State, metrics: &Metrics, a: Admission<'_>) -> bool {
    let Some(dst) = state.workload_by_uid(a.destination_uid) else {
        return true;
    };
    super::authorize(metrics, state, dst, &a)
}

#[cfg(test)]
mod tests {
    use weft_api::LocalConfig;
    use weft_api::authz::{Action, Authorization, Clause, Rule, Scope};

    use super::*;
    use crate::test_helpers::pod;

    /// A state installed after a connection was authorized, and revalidated
    /// before it was registered (the revalidation saw no connection), still
    /// gets its say: the registration checks it, and refuses.
    #[test]
    fn a_policy_that_lands_between_check_and_register_still_applies() {
        let web = pod("web", "shop", "web", "10.244.1.10", "n1", true);
        let uid = web.uid.clone();
        let config = |policies| LocalConfig {
            workloads: vec![Arc::new(web.clone())],
            policies,
            ..LocalConfig::default()
        };
        let deny_all = Authorization {
            name: "deny-all".into(),
            namespace: "shop".into(),
            scope: Scope::Namespace,
            action: Action::Deny,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause::default()],
            }],
        };
        let store = Store::new(config(Vec::new()));
        let metrics = Metrics::default();
        let open = Arc::new(OpenConnections::default());
        let client = Identity::new("cluster.local", "shop", "client").unwrap();
        let (src, dst): (SocketAddr, SocketAddr) = (
            "10.244.2.20:40000".parse().unwrap(),
            "10.244.1.10:8080".parse().unwrap(),
        );
        let admitted = Admission {
            direction: Direction::inbound,
            destination_uid: &uid,
            source: Some(&client),
            source_addr: src,
            destination_addr: dst,
        };
        let register = |generation| open.register_checked(&store, generation, &metrics, admitted);

        // No change since the check: registered, and held while open.
        let kept = register(store.generation()).expect("nothing changed: registered");
        assert_eq!(open.len(), 1);

        // The worker checks against the allowing state...
        let generation = store.generation();
        // ...the deny lands, and the app's revalidation runs: it closes the
        // connection already registered, and cannot see the one in flight.
        store.replace(config(vec![deny_all]));
        assert_eq!(open.revalidate(&store.snapshot(), &metrics), 1);
        assert!(kept.closed.is_cancelled());
        // ...then the worker registers: refused, and nothing is left behind.
        assert!(register(generation).is_none(), "the deny must apply");
        assert_eq!(open.len(), 1, "only the first, closed, is still held");
        drop(kept);
        assert!(open.is_empty());
    }
}
