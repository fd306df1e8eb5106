//! Inbound HBONE (15008): mutual TLS as the destination pod's identity, then one
//! CONNECT per stream, each checked and delivered to a local captured pod from
//! the original client's address.
//!
//! A stream is accepted only when: its target is a captured pod of this node
//! with the identity this connection presented; it does not target 15008; and
//! the client address in `Forwarded` belongs to a workload with the peer's
//! verified identity (a peer cannot speak for another identity's pods); and
//! the destination's authorization policies allow it (401 otherwise).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tracing::{debug, warn};
use weft_api::{Identity, Service, Workload};
use weft_hbone::io::tls_accept;
use weft_hbone::server::{ConnectRequest, ServeOptions};
use weft_hbone::tls::peer_identity;

use super::open::Admission;
use super::{ConnectionLog, ProxyInputs, identity_of, peer, refused, transparent_connect};
use crate::config::HBONE_PORT;
use crate::metrics::{Direction, RefusalReason, SecurityPolicy};
use crate::state::State;

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
    // Not held for the connection's life: the state is updated in place
    // while no one holds it (`Store::update`).
    drop(state);
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
    // Nothing is allocated for TLS until the peer sends its first bytes, so
    // connections that never start a handshake (slowloris) cost only their
    // socket and this small task until the handshake timeout closes them.
    if tokio::time::timeout(weft_hbone::HANDSHAKE_TIMEOUT, tcp.readable())
        .await
        .is_err()
    {
        let why = "no TLS handshake within the timeout";
        return refused(m, DIR, RefusalReason::tls_handshake, peer_addr, local, &why);
    }
    // The TLS and HTTP/2 state machine is large: boxed, it is allocated only
    // for a connection that gets this far, not inline in every task.
    Box::pin(serve_tls(pi, tcp, peer_addr, local, dst_id)).await;
}

/// TLS as `dst_id`, then HTTP/2 CONNECT streams, on an accepted connection.
async fn serve_tls(
    pi: Arc<ProxyInputs>,
    tcp: TcpStream,
    peer_addr: SocketAddr,
    local: SocketAddr,
    dst_id: Identity,
) {
    let m = &pi.metrics;
    let server = match pi.certs.server_config(&dst_id).await {
        Ok(s) => s,
        Err(e) => return refused(m, DIR, RefusalReason::tls_handshake, peer_addr, local, &e),
    };
    let accept = tls_accept(server, tcp);
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
    let opts = ServeOptions {
        peer: peer_addr.ip(),
        budget: pi.streams.clone(),
        idle_timeout: weft_hbone::SERVER_IDLE_TIMEOUT,
        drain: pi.drain.clone(),
    };
    let overloaded = || m.refuse(DIR, RefusalReason::overloaded);
    let served = weft_hbone::server::serve(tls, opts, overloaded, move |req| {
        connect(
            handler_pi.clone(),
            req,
            peer_addr,
            peer_id.clone(),
            dst_id.clone(),
        )
    })
    .await;
    match served {
        Ok(s) if s.refused > 0 => {
            let (total, mine) = pi.streams.in_use(peer_addr.ip());
            warn!(
                peer = %peer_addr, refused = s.refused, in_use = total, peer_in_use = mine,
                "CONNECT streams refused on this connection: the inbound stream budget was spent"
            );
        }
        Ok(_) => {}
        Err(e) => refused(m, DIR, RefusalReason::bad_request, peer_addr, local, &e),
    }
}

/// Why a CONNECT stream is refused: what is counted, answered and logged.
#[derive(Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: RefusalReason,
    pub code: StatusCode,
    pub why: String,
}

/// A CONNECT stream that may proceed.
#[derive(Debug)]
pub struct Admitted {
    pub dst: Arc<Workload>,
    pub src: Arc<Workload>,
    pub client_ip: IpAddr,
}

/// Decides one CONNECT on a connection where this ztunnel presented
/// `conn_id` and the peer proved `peer_id`. Pure: state in, decision out.
///
/// The target must be a captured pod of `node` with identity `conn_id` (so one
/// connection serves every pod of that identity here) and not the HBONE port.
/// A waypoint (the TCP peer `peer_ip` is a waypoint's pod, and proved that
/// pod's identity) is itself the source, as in Istio: its identity and its
/// address; its `Forwarded`, if any, is trusted and not needed. Anyone else's
/// `Forwarded` client must be a workload whose identity is `peer_id`, so a
/// peer can only speak for its own workloads.
pub fn admit(
    state: &State,
    node: &str,
    target: SocketAddr,
    forwarded: Option<IpAddr>,
    peer_ip: IpAddr,
    peer_id: &Identity,
    conn_id: &Identity,
) -> Result<Admitted, Denial> {
    let deny = |reason, code, why: String| Denial { reason, code, why };
    let Some(dst) = state.local_captured(target.ip(), node).cloned() else {
        return Err(deny(
            RefusalReason::unknown_destination,
            StatusCode::BAD_REQUEST,
            format!("CONNECT {target}: no captured pod with that address on node {node}"),
        ));
    };
    if identity_of(&dst).as_ref() != Some(conn_id) {
        return Err(deny(
            RefusalReason::identity_mismatch,
            StatusCode::UNAUTHORIZED,
            format!(
                "CONNECT {target}: pod {} is not {conn_id}, the identity this connection verified",
                dst.uid
            ),
        ));
    }
    if target.port() == HBONE_PORT {
        return Err(deny(
            RefusalReason::loop_detected,
            StatusCode::BAD_REQUEST,
            format!("CONNECT {target}: tunnelling to the HBONE port is a loop"),
        ));
    }
    if let Some(waypoint) = state.workload_by_ip(peer_ip)
        && state.is_waypoint(&waypoint.uid)
        && identity_of(waypoint).as_ref() == Some(peer_id)
    {
        return Ok(Admitted {
            dst,
            src: waypoint.clone(),
            client_ip: peer_ip,
        });
    }
    let Some(client_ip) = forwarded else {
        return Err(deny(
            RefusalReason::bad_request,
            StatusCode::BAD_REQUEST,
            format!("CONNECT {target}: no client address in Forwarded: for="),
        ));
    };
    let src = state.workload_by_ip(client_ip).cloned();
    match src {
        Some(src) if identity_of(&src).as_ref() == Some(peer_id) => Ok(Admitted {
            dst,
            src,
            client_ip,
        }),
        _ => Err(deny(
            RefusalReason::identity_mismatch,
            StatusCode::UNAUTHORIZED,
            format!(
                "CONNECT {target}: peer {peer_id} speaks for client {client_ip}, which is not one of its workloads"
            ),
        )),
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
    let target = match req.target() {
        Ok(t) => t,
        Err(e) => {
            refused(m, DIR, RefusalReason::bad_request, peer_addr, peer_addr, &e);
            return req.refuse(StatusCode::BAD_REQUEST);
        }
    };
    let generation = pi.state.generation();
    let state = pi.state.snapshot();
    let forwarded = req.forwarded_for();
    let Admitted {
        dst,
        src,
        client_ip,
    } = match admit(
        &state,
        &pi.cfg.node_name,
        target,
        forwarded,
        peer_addr.ip(),
        &peer_id,
        &conn_id,
    ) {
        Ok(a) => a,
        Err(d) => {
            refused(m, DIR, d.reason, peer_addr, target, &d.why);
            return req.refuse(d.code);
        }
    };
    let client = SocketAddr::new(client_ip, peer_addr.port());
    let admitted = Admission {
        direction: DIR,
        destination_uid: &dst.uid,
        source: Some(&peer_id),
        source_addr: client,
        destination_addr: target,
    };
    let Some(registered) = pi.admit(&state, generation, &dst, admitted) else {
        return req.refuse(StatusCode::UNAUTHORIZED);
    };
    let service = state
        .inbound_service(&dst, target.port(), req.forwarded_host())
        .cloned();
    drop(state);
    let log = ConnectionLog::open(
        m,
        DIR,
        client,
        target,
        peer(Some(&src), Some(&peer_id), None),
        peer(Some(&dst), Some(&conn_id), service.as_deref()),
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
    // Counted from the tunnel's side: up is tunnel → upstream. A policy that
    // now denies it ends the copy; what it moved until then is counted.
    let closed = registered.closed.clone();
    let denied = async move {
        closed.cancelled().await;
        denied_now()
    };
    let (down, up, err) = super::copy::copy_tunnel_until(&mut upstream, &mut tunnel, denied).await;
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
    let admitted = Admission {
        direction: DIR,
        destination_uid: &dst.uid,
        source: Some(src_id),
        source_addr: client_addr,
        destination_addr: target,
    };
    let generation = pi.state.generation();
    let Some(registered) = pi.admit(&pi.state.snapshot(), generation, dst, admitted) else {
        // A reset, as across nodes when the far ztunnel refuses the CONNECT.
        let _ = client.set_zero_linger();
        return;
    };
    let src_peer = peer(Some(src), Some(src_id), None);
    let dst_peer = peer(Some(dst), Some(dst_id), service);
    let out = ConnectionLog::open(
        m,
        Direction::outbound,
        client_addr,
        target,
        src_peer,
        dst_peer,
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
    let closed = registered.closed.clone();
    let denied = async move {
        closed.cancelled().await;
        denied_now()
    };
    let (up, down, err) =
        super::forward_until(m, DIR, &mut client, client_addr, target, denied).await;
    if registered.closed.is_cancelled() {
        // A reset: the client learns at once.
        let _ = client.set_zero_linger();
    }
    out.close(m, up, down, err.as_ref());
    inb.close(m, up, down, err.as_ref());
}

/// Why a connection a new policy denies ends.
pub(super) fn denied_now() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "closed: a policy now denies it",
    )
}

#[cfg(test)]
mod tests {
    use weft_api::LocalConfig;

    use super::*;
    use crate::test_helpers::pod;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    /// Every CONNECT refusal, with the reason and status the peer gets; and the one admission.
    #[test]
    fn admission_table() {
        let state = State::new(LocalConfig {
            workloads: [
                pod("web", "shop", "web", "10.0.2.10", "n2", true),
                pod("db", "shop", "db", "10.0.2.11", "n2", true),
                pod("plain", "legacy", "default", "10.0.2.20", "n2", false),
                pod("remote", "shop", "web", "10.0.1.10", "n1", true),
                pod("client", "shop", "client", "10.0.1.11", "n1", true),
                pod("outsider", "legacy", "default", "10.0.1.20", "n1", false),
            ]
            .map(std::sync::Arc::new)
            .into(),
            ..LocalConfig::default()
        });
        let (web, client) = (id("shop", "web"), id("shop", "client"));
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        use RefusalReason as R;
        type Case<'a> = (
            &'a str,
            SocketAddr,
            Option<IpAddr>,
            &'a Identity,
            Result<(), (R, u16)>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "admitted",
                sa("10.0.2.10:8080"),
                ip("10.0.1.11"),
                &client,
                Ok(()),
            ),
            (
                "pod outside the mesh",
                sa("10.0.2.20:8080"),
                ip("10.0.1.11"),
                &client,
                Err((R::unknown_destination, 400)),
            ),
            (
                "pod on another node",
                sa("10.0.1.10:8080"),
                ip("10.0.1.11"),
                &client,
                Err((R::unknown_destination, 400)),
            ),
            (
                "unknown address",
                sa("192.0.2.1:80"),
                ip("10.0.1.11"),
                &client,
                Err((R::unknown_destination, 400)),
            ),
            (
                "pod of another identity",
                sa("10.0.2.11:5432"),
                ip("10.0.1.11"),
                &client,
                Err((R::identity_mismatch, 401)),
            ),
            (
                "HBONE port",
                sa("10.0.2.10:15008"),
                ip("10.0.1.11"),
                &client,
                Err((R::loop_detected, 400)),
            ),
            (
                "no Forwarded",
                sa("10.0.2.10:8080"),
                None,
                &client,
                Err((R::bad_request, 400)),
            ),
            (
                "Forwarded of another identity",
                sa("10.0.2.10:8080"),
                ip("10.0.1.20"),
                &client,
                Err((R::identity_mismatch, 401)),
            ),
            (
                "Forwarded unknown",
                sa("10.0.2.10:8080"),
                ip("192.0.2.7"),
                &client,
                Err((R::identity_mismatch, 401)),
            ),
            (
                "peer speaks for another",
                sa("10.0.2.10:8080"),
                ip("10.0.1.11"),
                &web,
                Err((R::identity_mismatch, 401)),
            ),
        ];
        let client_pod = "10.0.1.11".parse().unwrap();
        for (name, target, fwd, peer_id, want) in cases {
            let got = admit(&state, "n2", target, fwd, client_pod, peer_id, &web)
                .map(|_| ())
                .map_err(|d| (d.reason, d.code.as_u16()));
            assert_eq!(got, want, "{name}");
        }
    }

    /// A waypoint's CONNECTs: it is the source (identity and address), with
    /// or without Forwarded; its identity from another address, or its
    /// address with another identity, is not a waypoint.
    #[test]
    fn waypoint_admission() {
        let waypoint_ref = weft_api::WaypointRef {
            namespace: "shop".into(),
            hostname: "waypoint.shop.svc.cluster.local".into(),
            port: 15008,
        };
        let svc = |name: &str, uid: &str, waypoint| weft_api::Service {
            name: name.into(),
            namespace: "shop".into(),
            hostname: format!("{name}.shop.svc.cluster.local"),
            vips: vec![],
            ports: vec![],
            endpoints: vec![weft_api::Endpoint {
                workload_uid: uid.into(),
                ports: Default::default(),
            }],
            waypoint,
        };
        let state = State::new(LocalConfig {
            workloads: [
                pod("web", "shop", "web", "10.0.2.10", "n2", true),
                pod("client", "shop", "client", "10.0.1.11", "n1", true),
                pod("waypoint", "shop", "waypoint", "10.0.1.30", "n1", false),
            ]
            .map(std::sync::Arc::new)
            .into(),
            services: [
                svc("waypoint", "Kubernetes//Pod/shop/waypoint", None),
                svc("web", "Kubernetes//Pod/shop/web", Some(waypoint_ref)),
            ]
            .map(std::sync::Arc::new)
            .into(),
            ..LocalConfig::default()
        });
        let (web, client, wp) = (
            id("shop", "web"),
            id("shop", "client"),
            id("shop", "waypoint"),
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let target: SocketAddr = "10.0.2.10:8080".parse().unwrap();
        let admitted = |fwd, peer, peer_id| {
            admit(&state, "n2", target, fwd, ip(peer), peer_id, &web)
                .map(|a| (a.src.name.clone(), a.client_ip))
                .map_err(|d| d.reason)
        };
        assert_eq!(
            admitted(None, "10.0.1.30", &wp),
            Ok(("waypoint".into(), ip("10.0.1.30"))),
            "Istio's waypoint sends no Forwarded"
        );
        assert_eq!(
            admitted(Some(ip("10.0.1.11")), "10.0.1.30", &wp),
            Ok(("waypoint".into(), ip("10.0.1.30"))),
            "the waypoint stays the source"
        );
        assert_eq!(
            admitted(None, "10.0.1.11", &wp),
            Err(RefusalReason::bad_request),
            "the waypoint's identity from another address"
        );
        assert_eq!(
            admitted(None, "10.0.1.30", &client),
            Err(RefusalReason::bad_request),
            "the waypoint's address with another identity"
        );
    }
}
