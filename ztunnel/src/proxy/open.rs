//! Connections ztunnel admitted, so that a policy change applies to them
//! too, as in Istio's ztunnel: when a new state denies an open connection,
//! it is closed, and the log says which policy closed it. Connections the
//! new state still allows stay open.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use weft_api::Identity;
use weft_api::authz::Connection;

use crate::metrics::{Direction, Metrics};
use crate::state::State;

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
    /// Records a connection to `destination_uid` admitted as `conn`.
    pub fn register(
        self: &Arc<Self>,
        direction: Direction,
        destination_uid: &str,
        conn: &Connection<'_>,
        source_addr: SocketAddr,
        destination_addr: SocketAddr,
    ) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Open {
                direction,
                destination_uid: destination_uid.to_string(),
                source: conn.source.cloned(),
                source_addr,
                destination_addr,
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
            // A destination gone from the state keeps its connections: only
            // a policy closes them.
            let Some(dst) = state.workload_by_uid(&o.destination_uid) else {
                continue;
            };
            let conn = Connection {
                source: o.source.as_ref(),
                source_ip: ip(o.source_addr),
                destination_ip: ip(o.destination_addr),
                destination_port: o.destination_addr.port(),
            };
            if !super::authorize(
                metrics,
                state,
                o.direction,
                dst,
                &conn,
                o.source_addr,
                o.destination_addr,
            ) {
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

fn ip(a: SocketAddr) -> IpAddr {
    a.ip()
}
