//! Outbound (15001): a captured pod's connection, tunnelled to the destination.
//!
//! The source is identified by its address (it must be a captured pod of this
//! node); the destination by the original destination address. Meshed
//! destinations on other nodes get an HBONE stream with the source's
//! certificate; on this node, the connection is delivered in-process; anything
//! else is passed through as plain TCP from the pod's own address.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;
use weft_api::Identity;
use weft_hbone::H2Stream;
use weft_hbone::client::ConnectError;
use weft_hbone::io::tls_connect;
use weft_hbone::server::forwarded_header_for;
use weft_hbone::tls::server_name;

use super::{ConnectionLog, ProxyInputs, forward, identity_of, peer, refused, transparent_connect};
use crate::config::HBONE_PORT;
use crate::metrics::{Direction, RefusalReason, SecurityPolicy};
use crate::state::{ResolveError, Upstream};

const DIR: Direction = Direction::outbound;

pub async fn handle(pi: Arc<ProxyInputs>, mut client: TcpStream, peer_addr: SocketAddr) {
    let Ok(orig_dst) = client.local_addr() else {
        return;
    };
    let m = &pi.metrics;
    let state = pi.state.snapshot();
    let node = &pi.cfg.node_name;
    let Some(src) = state.local_captured(peer_addr.ip(), node).cloned() else {
        let why = format!("{} is not a captured pod on node {node}", peer_addr.ip());
        return refused(
            m,
            DIR,
            RefusalReason::unknown_source,
            peer_addr,
            orig_dst,
            &why,
        );
    };
    // Not held for the connection's life: the state is updated in place
    // while no one holds it (`Store::update`).
    drop(state);
    let Some(src_id) = identity_of(&src) else {
        let why = format!("source workload {} has no valid identity", src.uid);
        return refused(
            m,
            DIR,
            RefusalReason::unknown_source,
            peer_addr,
            orig_dst,
            &why,
        );
    };
    if orig_dst.ip().is_loopback() {
        let why = "connection made to the capture listener itself";
        return refused(
            m,
            DIR,
            RefusalReason::loop_detected,
            peer_addr,
            orig_dst,
            &why,
        );
    }
    let upstream = match pi.state.resolve(orig_dst) {
        Ok(u) => u,
        Err(e) => {
            let reason = match e {
                ResolveError::NoEndpoints { .. } => RefusalReason::no_endpoints,
                ResolveError::NoServicePort { .. } => RefusalReason::unknown_destination,
                ResolveError::AmbiguousAddress { .. } => RefusalReason::ambiguous_address,
                ResolveError::UnknownWaypoint { .. } | ResolveError::NoWaypointEndpoints { .. } => {
                    RefusalReason::waypoint_unavailable
                }
            };
            return refused(m, DIR, reason, peer_addr, orig_dst, &e);
        }
    };
    match upstream {
        Upstream::Hbone {
            workload,
            service,
            target,
        } => {
            let Some(dst_id) = identity_of(&workload) else {
                let why = format!(
                    "destination workload {} has no valid identity",
                    workload.uid
                );
                return refused(
                    m,
                    DIR,
                    RefusalReason::unknown_destination,
                    peer_addr,
                    target,
                    &why,
                );
            };
            if workload.node == *node {
                // Boxed here and below: what only setting up a connection
                // needs (dials, handshakes) lives on the heap while it runs,
                // not in every held connection's task (6 KiB before).
                return Box::pin(super::inbound::deliver_local(
                    &pi,
                    client,
                    peer_addr,
                    &src,
                    &src_id,
                    &workload,
                    &dst_id,
                    service.as_deref(),
                    target,
                ))
                .await;
            }
            let log = ConnectionLog::open(
                m,
                DIR,
                peer_addr,
                target,
                peer(Some(&src), Some(&src_id), None),
                peer(Some(&workload), Some(&dst_id), service.as_deref()),
                SecurityPolicy::mutual_tls,
            );
            let hbone_addr = SocketAddr::new(target.ip(), HBONE_PORT);
            let tunnel = Box::pin(hbone_stream(
                &pi,
                &src_id,
                &dst_id,
                hbone_addr,
                target,
                peer_addr,
                service.as_deref(),
            ))
            .await;
            carry(&pi, client, tunnel, log, peer_addr, target).await;
        }
        Upstream::Waypoint {
            waypoint,
            address,
            workload,
            service,
            target,
        } => {
            let Some(waypoint_id) = identity_of(&waypoint) else {
                let why = format!("waypoint pod {} has no valid identity", waypoint.uid);
                return refused(
                    m,
                    DIR,
                    RefusalReason::waypoint_unavailable,
                    peer_addr,
                    target,
                    &why,
                );
            };
            let dst_id = workload.as_deref().and_then(identity_of);
            let log = ConnectionLog::open(
                m,
                DIR,
                peer_addr,
                target,
                peer(Some(&src), Some(&src_id), None),
                peer(workload.as_deref(), dst_id.as_ref(), service.as_deref()),
                SecurityPolicy::mutual_tls,
            );
            // The waypoint terminates HBONE itself (it is never captured):
            // dial its pod, prove the client, require the waypoint's identity.
            let tunnel = Box::pin(hbone_stream(
                &pi,
                &src_id,
                &waypoint_id,
                address,
                target,
                peer_addr,
                service.as_deref(),
            ))
            .await;
            carry(&pi, client, tunnel, log, peer_addr, target).await;
        }
        Upstream::Passthrough {
            workload,
            service,
            target,
        } => {
            let dst_id = workload.as_deref().and_then(identity_of);
            let log = ConnectionLog::open(
                m,
                DIR,
                peer_addr,
                target,
                peer(Some(&src), Some(&src_id), None),
                peer(workload.as_deref(), dst_id.as_ref(), service.as_deref()),
                SecurityPolicy::unknown,
            );
            let (up, down, err) = Box::pin(forward(m, DIR, &mut client, peer_addr, target)).await;
            log.close(m, up, down, err.as_ref());
        }
    }
}

/// Splices the client into the tunnel, or refuses it when the tunnel could
/// not be opened; closes the connection's log either way.
async fn carry(
    pi: &ProxyInputs,
    mut client: TcpStream,
    tunnel: Result<H2Stream, ConnectError>,
    log: ConnectionLog,
    peer_addr: SocketAddr,
    target: SocketAddr,
) {
    let m = &pi.metrics;
    match tunnel {
        Ok(mut tunnel) => {
            let (up, down, err) = super::copy::copy_tunnel(&mut client, &mut tunnel).await;
            log.close(m, up, down, err.as_ref());
        }
        Err(e) => {
            refused(m, DIR, RefusalReason::hbone_connect, peer_addr, target, &e);
            log.close(m, 0, 0, Some(&std::io::Error::other(e)));
        }
    }
}

/// A CONNECT stream to `target` on a pooled HBONE connection to
/// `hbone_addr` (the destination pod's 15008, or a waypoint's), dialled from
/// the client pod's own address (as Istio's in-pod ztunnel does: the far side
/// takes the TCP peer as the source), authenticated as `src_id` and
/// accepting only `dst_id`.
async fn hbone_stream(
    pi: &ProxyInputs,
    src_id: &Identity,
    dst_id: &Identity,
    hbone_addr: SocketAddr,
    target: SocketAddr,
    client: SocketAddr,
    service: Option<&weft_api::Service>,
) -> Result<H2Stream, ConnectError> {
    let tls = pi
        .certs
        .client_config(src_id, dst_id)
        .await
        .map_err(|e| ConnectError::Dial(Box::new(e)))?;
    let mut headers = HeaderMap::new();
    let host = service.map(|s| s.hostname.as_str());
    if let Ok(v) = HeaderValue::from_str(&forwarded_header_for(client.ip(), host)) {
        headers.insert("forwarded", v);
    }
    if let Ok(v) = HeaderValue::from_str(&weft_hbone::client::traceparent()) {
        headers.insert("traceparent", v);
    }
    let key = (client.ip(), src_id.clone(), dst_id.clone(), hbone_addr);
    pi.pool()
        .stream(&key, target, headers, || {
            let tls = tls.clone();
            async move {
                // Transparent, from the pod's address: the capture program hands
                // the replies (to a local pod) back to this socket.
                let tcp = transparent_connect(client.ip(), hbone_addr)
                    .await
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("connect to {hbone_addr}: {e}; is HBONE port 15008 reachable?"),
                        )
                    })?;
                let handshake = tls_connect(tls, server_name(hbone_addr.ip()), tcp);
                tokio::time::timeout(weft_hbone::HANDSHAKE_TIMEOUT, handshake)
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })?
            }
        })
        .await
}
