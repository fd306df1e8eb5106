//! Inbound plaintext (15006): a connection to a captured pod that did not come
//! through HBONE (a client outside the mesh). PERMISSIVE: forwarded to the pod
//! from the client's own address, unless a policy denies it (PeerAuthentication
//! STRICT is a policy denying connections without a peer identity).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::open::Admission;
use super::{ConnectionLog, ProxyInputs, identity_of, peer, refused};
use crate::metrics::{Direction, RefusalReason, SecurityPolicy};

const DIR: Direction = Direction::inbound_plaintext;

pub async fn handle(pi: Arc<ProxyInputs>, mut client: TcpStream, peer_addr: SocketAddr) {
    let Ok(orig_dst) = client.local_addr() else {
        return;
    };
    let m = &pi.metrics;
    let generation = pi.state.generation();
    let state = pi.state.snapshot();
    let node = &pi.cfg.node_name;
    let Some(dst) = state.local_captured(orig_dst.ip(), node).cloned() else {
        let why = format!("{orig_dst}: no captured pod with that address on node {node}");
        return refused(
            m,
            DIR,
            RefusalReason::unknown_destination,
            peer_addr,
            orig_dst,
            &why,
        );
    };
    let admitted = Admission {
        direction: DIR,
        destination_uid: &dst.uid,
        source: None,
        source_addr: peer_addr,
        destination_addr: orig_dst,
    };
    let Some(registered) = pi.admit(&state, generation, &dst, admitted) else {
        // A reset: the client learns at once, as from a closed port.
        let _ = client.set_zero_linger();
        return;
    };
    let dst_id = identity_of(&dst);
    let src = state.workload_by_ip(peer_addr.ip()).cloned();
    drop(state);
    let log = ConnectionLog::open(
        m,
        DIR,
        peer_addr,
        orig_dst,
        peer(src.as_deref(), None, None),
        peer(Some(&dst), dst_id.as_ref(), None),
        SecurityPolicy::none,
    );
    let closed = registered.closed.clone();
    let denied = async move {
        closed.cancelled().await;
        super::inbound::denied_now()
    };
    let (up, down, err) =
        super::forward_until(m, DIR, &mut client, peer_addr, orig_dst, denied).await;
    if registered.closed.is_cancelled() {
        let _ = client.set_zero_linger();
    }
    log.close(m, up, down, err.as_ref());
}
