//! Inbound HBONE (15008): mutual TLS as the destination pod's identity, then one
//! CONNECT per stream, each checked and delivered to a local captured pod from
//! the original client's address.
//!
//! A stream is accepted only when: its target is a captured pod of this node
//! with the identity this connection presented; it does not target 15008; and
//! the client address in `Forwarded` belongs to a workload with the peer's
//! verified identity (a peer cannot speak for another identity's pods).

use std::net::SocketAddr;
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::debug;
use weft_api::{Identity, Service, Workload};
use weft_hbone::server::ConnectRequest;
use weft_hbone::tls::peer_identity;

use super::{ConnectionLog, ProxyInputs, identity_of, peer, refused, splice, transparent_connect};
use crate::config::HBONE_PORT;
use crate::metrics::{Direction, RefusalReason, SecurityPolicy};

const DIR: Direction = Direction::inbound;

pub async fn handle(pi: Arc<ProxyInputs>, tcp: TcpStream, peer_addr: SocketAddr) {
    let Ok(local) = tcp.local_addr() else {
        return;
    };
    let m = &pi.metrics;
    let state = pi.state.snapshot();
    let node = &pi.cfg.node_name;
    let Some(dst) = state.local_captured(local.ip(), node).cloned() else {
        let why = format!("HBONE to {local}: no captured pod with that address on node {node}");
        return refused(
            m,
            DIR,
            RefusalReason::unknown_destination,
            peer_addr,
            local,
            &why,
        );
    };
    let Some(dst_id) = identity_of(&dst) else {
        let why = format!("workload {} has no valid identity", dst.uid);
        return refused(
            m,
            DIR,
            RefusalReason::unknown_destination,
            peer_addr,
            local,
            &why,
        );
    };
    let server = match pi.certs.server_config(&dst_id) {
        Ok(s) => s,
        Err(e) => return refused(m, DIR, RefusalReason::tls_handshake, peer_addr, local, &e),
    };
    let accept = TlsAcceptor::from(server).accept(tcp);
    let tls = match tokio::time::timeout(weft_hbone::HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refused(m, DIR, RefusalReason::tls_handshake, peer_addr, local, &e),
        Err(_) => {
            let why = "TLS handshake timed out";
            return refused(m, DIR, RefusalReason::tls_handshake, peer_addr, local, &why);
        }
    };
    let peer_id = match peer_identity(tls.get_ref().1.peer_certificates()) {
        Ok(id) => id,
        Err(e) => return refused(m, DIR, RefusalReason::tls_handshake, peer_addr, local, &e),
    };
    debug!(peer = %peer_addr, identity = %peer_id, "HBONE connection established");
    let handler_pi = pi.clone();
    let served = weft_hbone::server::serve(tls, move |req| {
        connect(
            handler_pi.clone(),
            req,
            peer_addr,
            peer_id.clone(),
            dst_id.clone(),
        )
    })
    .await;
    if let Err(e) = served {
        refused(m, DIR, RefusalReason::bad_request, peer_addr, local, &e);
    }
}

/// One CONNECT stream on an authenticated HBONE connection.
async fn connect(
    pi: Arc<ProxyInputs>,
    req: ConnectRequest,
    peer_addr: SocketAddr,
    peer_id: Identity,
    conn_id: Identity,
) {
    let m = &pi.metrics;
    let node = &pi.cfg.node_name;
    let target = match req.target() {
        Ok(t) => t,
        Err(e) => {
            refused(m, DIR, RefusalReason::bad_request, peer_addr, peer_addr, &e);
            return req.refuse(StatusCode::BAD_REQUEST);
        }
    };
    let state = pi.state.snapshot();
    let Some(dst) = state.local_captured(target.ip(), node).cloned() else {
        let why = format!("CONNECT {target}: no captured pod with that address on node {node}");
        refused(
            m,
            DIR,
            RefusalReason::unknown_destination,
            peer_addr,
            target,
            &why,
        );
        return req.refuse(StatusCode::BAD_REQUEST);
    };
    if identity_of(&dst).as_ref() != Some(&conn_id) {
        let why = format!(
            "CONNECT {target}: pod {} is not {conn_id}, the identity this connection verified",
            dst.uid
        );
        refused(
            m,
            DIR,
            RefusalReason::identity_mismatch,
            peer_addr,
            target,
            &why,
        );
        return req.refuse(StatusCode::UNAUTHORIZED);
    }
    if target.port() == HBONE_PORT {
        let why = format!("CONNECT {target}: tunnelling to the HBONE port is a loop");
        refused(
            m,
            DIR,
            RefusalReason::loop_detected,
            peer_addr,
            target,
            &why,
        );
        return req.refuse(StatusCode::BAD_REQUEST);
    }
    let Some(client_ip) = req.forwarded_for() else {
        let why = format!("CONNECT {target}: no client address in Forwarded: for=");
        refused(m, DIR, RefusalReason::bad_request, peer_addr, target, &why);
        return req.refuse(StatusCode::BAD_REQUEST);
    };
    let src = state.workload_by_ip(client_ip).cloned();
    if src.as_deref().and_then(identity_of).as_ref() != Some(&peer_id) {
        let why = format!(
            "CONNECT {target}: peer {peer_id} speaks for client {client_ip}, which is not one of its workloads"
        );
        refused(
            m,
            DIR,
            RefusalReason::identity_mismatch,
            peer_addr,
            target,
            &why,
        );
        return req.refuse(StatusCode::UNAUTHORIZED);
    }
    let client = SocketAddr::new(client_ip, peer_addr.port());
    let log = ConnectionLog::open(
        m,
        DIR,
        client,
        target,
        peer(src.as_deref(), Some(&peer_id), None),
        peer(Some(&dst), Some(&conn_id), None),
        SecurityPolicy::mutual_tls,
    );
    let mut upstream = match transparent_connect(client_ip, target).await {
        Ok(s) => s,
        Err(e) => {
            refused(m, DIR, RefusalReason::upstream_connect, client, target, &e);
            req.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return log.close(m, 0, 0, Some(&e));
        }
    };
    let mut tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => return log.close(m, 0, 0, Some(&std::io::Error::other(e))),
    };
    let (up, down, err) = splice(&mut tunnel, &mut upstream).await;
    log.close(m, up, down, err.as_ref());
}

/// Both pods are on this node and captured: no tunnel is needed to cross a
/// wire, so the connection is handed over in-process. Both identities come
/// from this ztunnel's own state; both reporters record it, as across nodes.
#[allow(clippy::too_many_arguments)]
pub async fn deliver_local(
    pi: &ProxyInputs,
    mut client: TcpStream,
    client_addr: SocketAddr,
    src: &Workload,
    src_id: &Identity,
    dst: &Workload,
    dst_id: &Identity,
    service: Option<&Service>,
    target: SocketAddr,
) {
    let m = &pi.metrics;
    let src_peer = peer(Some(src), Some(src_id), None);
    let dst_peer = peer(Some(dst), Some(dst_id), service);
    let out = ConnectionLog::open(
        m,
        Direction::outbound,
        client_addr,
        target,
        src_peer.clone(),
        dst_peer.clone(),
        SecurityPolicy::mutual_tls,
    );
    let inb = ConnectionLog::open(
        m,
        DIR,
        client_addr,
        target,
        src_peer,
        dst_peer,
        SecurityPolicy::mutual_tls,
    );
    match transparent_connect(client_addr.ip(), target).await {
        Ok(mut upstream) => {
            let (up, down, err) = splice(&mut client, &mut upstream).await;
            out.close(m, up, down, err.as_ref());
            inb.close(m, up, down, err.as_ref());
        }
        Err(e) => {
            refused(
                m,
                DIR,
                RefusalReason::upstream_connect,
                client_addr,
                target,
                &e,
            );
            out.close(m, 0, 0, Some(&e));
            inb.close(m, 0, 0, Some(&e));
        }
    }
}
