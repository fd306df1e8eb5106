//! What ztunnel knows about the mesh: workloads and services, indexed for the
//! lookups the proxy makes per connection, and destination resolution.
//!
//! Start at [`Store`]. [`resolve`] is a pure function from state to upstream.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tracing::warn;
use weft_api::authz::{self, Connection, DenyReason, Scope, Verdict};
use weft_api::{Authorization, LocalConfig, Service, TunnelProtocol, WaypointRef, Workload};

/// Indexed workloads, services and policies.
#[derive(Debug, Default)]
pub struct State {
    /// The one workload each address resolves to (see [`rank`]).
    workloads: HashMap<IpAddr, Arc<Workload>>,
    /// Addresses claimed by equally ranked workloads, with their uids: they
    /// resolve to nothing, and connections to or from them are refused.
    ambiguous: HashMap<IpAddr, Vec<String>>,
    by_uid: HashMap<String, Arc<Workload>>,
    services: HashMap<IpAddr, Arc<Service>>,
    /// Services by `namespace/hostname`: how waypoint references resolve.
    services_by_key: HashMap<String, Arc<Service>>,
    /// Workload uid → the services it is an endpoint of.
    services_by_workload: HashMap<String, Vec<Arc<Service>>>,
    /// Workloads that are a waypoint's pods (endpoints of a Service that
    /// some binding names): their HBONE connections carry the traffic they
    /// proxy, as themselves.
    waypoints: HashSet<String>,
    /// Root-namespace policies: every destination.
    global_policies: Vec<Arc<Authorization>>,
    /// Namespace-wide policies, by namespace.
    namespace_policies: HashMap<String, Vec<Arc<Authorization>>>,
    /// Selector-scoped policies, by `namespace/name`, as workloads name them.
    selected_policies: HashMap<String, Arc<Authorization>>,
    /// Everything, in the order received (config dumps).
    all_workloads: Vec<Arc<Workload>>,
    all_services: Vec<Arc<Service>>,
    all_policies: Vec<Arc<Authorization>>,
}

/// Shared, swappable [`State`] plus the round-robin cursor for service endpoints.
#[derive(Debug, Default)]
pub struct Store {
    state: RwLock<Arc<State>>,
    cursor: AtomicUsize,
}

/// Where a captured connection goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Upstream {
    /// A meshed pod: over HBONE to its node's ztunnel, `CONNECT target`.
    Hbone {
        workload: Arc<Workload>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
    },
    /// Bound to a waypoint: over HBONE to the waypoint's pod on its HBONE
    /// port, `CONNECT target` (the original destination, VIP or pod), and
    /// verified as the waypoint's identity.
    Waypoint {
        waypoint: Arc<Workload>,
        /// Where the waypoint listens: its pod's address and HBONE port.
        address: SocketAddr,
        /// The destination, for logs and metrics.
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
    },
    /// Not meshed (or unknown): plain TCP to `target`.
    Passthrough {
        workload: Option<Arc<Workload>>,
        service: Option<Arc<Service>>,
        target: SocketAddr,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("service {service} has no endpoints for port {port}")]
    NoEndpoints { service: String, port: u16 },
    #[error("{ip} is claimed by several workloads ({}); refusing rather than guessing", .uids.join(", "))]
    AmbiguousAddress { ip: IpAddr, uids: Vec<String> },
    /// A binding to a waypoint that is not known: refused, never sent
    /// around it (see the controller's status for why).
    #[error(
        "{what} is bound to waypoint {waypoint}, which is not known; refusing rather than bypassing it"
    )]
    UnknownWaypoint { what: String, waypoint: String },
    #[error("{what} is bound to waypoint {waypoint}, which has no ready pod")]
    NoWaypointEndpoints { what: String, waypoint: String },
}

/// Istio's order among workloads that claim one address: a captured pod,
/// then a pod, then another captured workload, then the rest. Host-network
/// pods never claim an address (it is their node's).
fn rank(w: &Workload) -> Option<u8> {
    if w.host_network {
        return None;
    }
    let pod = w.uid.contains("//Pod/");
    let hbone = w.protocol == TunnelProtocol::Hbone;
    Some(match (pod, hbone) {
        (true, true) => 3,
        (true, false) => 2,
        (false, true) => 1,
        (false, false) => 0,
    })
}

// === impl State ===

impl State {
    pub fn new(config: LocalConfig) -> Self {
        State::shared(
            config.workloads.into_iter().map(Arc::new).collect(),
            config.services.into_iter().map(Arc::new).collect(),
            config.policies.into_iter().map(Arc::new).collect(),
        )
    }

    /// The state of these workloads, services and policies, shared with
    /// the caller rather than copied: an xDS update rebuilds the indexes,
    /// never the objects.
    pub fn shared(
        workloads: Vec<Arc<Workload>>,
        services: Vec<Arc<Service>>,
        policies: Vec<Arc<Authorization>>,
    ) -> Self {
        let mut s = State::default();
        let mut claims: HashMap<IpAddr, Vec<(u8, Arc<Workload>)>> = HashMap::new();
        for w in &workloads {
            let w = w.clone();
            if let Some(rank) = rank(&w) {
                for ip in &w.addresses {
                    claims.entry(*ip).or_default().push((rank, w.clone()));
                }
            }
            s.by_uid.insert(w.uid.clone(), w);
        }
        // Never by arrival order: the best rank wins; a tie at the top is
        // refused (a control plane should never send one; Weft's does not).
        for (ip, mut claimants) in claims {
            claimants.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.uid.cmp(&b.1.uid)));
            let top = claimants[0].0;
            let tied: Vec<String> = claimants
                .iter()
                .take_while(|(r, _)| *r == top)
                .map(|(_, w)| w.uid.clone())
                .collect();
            if tied.len() > 1 {
                warn!(%ip, workloads = ?tied, "several workloads claim one address; it resolves to none of them");
                s.ambiguous.insert(ip, tied);
            } else {
                s.workloads.insert(ip, claimants.swap_remove(0).1);
            }
        }
        for svc in &services {
            let svc = svc.clone();
            for vip in &svc.vips {
                s.services.insert(*vip, svc.clone());
            }
            for ep in &svc.endpoints {
                s.services_by_workload
                    .entry(ep.workload_uid.clone())
                    .or_default()
                    .push(svc.clone());
            }
            s.services_by_key
                .insert(format!("{}/{}", svc.namespace, svc.hostname), svc);
        }
        let bound = services
            .iter()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(workloads.iter().filter_map(|w| w.waypoint.as_ref()));
        for r in bound {
            if let Some(svc) = s.services_by_key.get(&r.service_key()) {
                s.waypoints
                    .extend(svc.endpoints.iter().map(|e| e.workload_uid.clone()));
            }
        }
        for p in &policies {
            let p = p.clone();
            match p.scope {
                Scope::Global => s.global_policies.push(p),
                Scope::Namespace => s
                    .namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p),
                Scope::WorkloadSelector => {
                    s.selected_policies.insert(p.key(), p);
                }
            }
        }
        s.all_workloads = workloads;
        s.all_services = services;
        s.all_policies = policies;
        s
    }

    /// Decides a connection to `w` by the policies that apply to it: global,
    /// its namespace's, and the selector-scoped ones it references. A
    /// referenced policy this state lacks denies (fail closed): the
    /// controller sends it, and until it arrives its rules are unknown.
    pub fn authorize(&self, w: &Workload, conn: &Connection<'_>) -> (Verdict, Vec<String>) {
        let mut selected = Vec::with_capacity(w.authorization_policies.len());
        for key in &w.authorization_policies {
            match self.selected_policies.get(key) {
                Some(p) => selected.push(p.as_ref()),
                None => {
                    let verdict = Verdict::Deny {
                        policy: Some(key.clone()),
                        reason: DenyReason::Unavailable,
                    };
                    return (verdict, Vec::new());
                }
            }
        }
        let namespace = self
            .namespace_policies
            .get(&w.namespace)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if selected.is_empty() && namespace.is_empty() && self.global_policies.is_empty() {
            // Nothing applies: allowed, without deriving the peer's attributes.
            return (Verdict::Allow { policy: None }, Vec::new());
        }
        let global = self.global_policies.iter().map(Arc::as_ref);
        let namespace = namespace.iter().map(Arc::as_ref);
        authz::evaluate(global.chain(namespace).chain(selected), conn)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.get(&ip)
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid)
    }

    /// The service an inbound connection to `w` on `port` was for, as
    /// Istio's ztunnel guesses it for its metrics: the one the client named
    /// (`host`), if `w` is one of its endpoints; else the first of `w`'s
    /// services with a port that targets `port`.
    pub fn inbound_service(
        &self,
        w: &Workload,
        port: u16,
        host: Option<&str>,
    ) -> Option<&Arc<Service>> {
        let mine = self.services_by_workload.get(&w.uid)?;
        if let Some(h) = host
            && let Some(s) = mine.iter().find(|s| s.hostname == h)
        {
            return Some(s);
        }
        mine.iter().find(|s| {
            s.endpoints
                .iter()
                .any(|e| e.workload_uid == w.uid && e.ports.values().any(|t| *t == port))
        })
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services.get(&ip)
    }

    /// Every Service VIP (IPv4): never a node's own address.
    pub fn vips_v4(&self) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
        self.services
            .keys()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// Whether the workload `uid` is a waypoint's pod.
    pub fn is_waypoint(&self, uid: &str) -> bool {
        self.waypoints.contains(uid)
    }

    /// A pod of the waypoint `r` names, chosen by `pick`, and where it
    /// listens. `what` names the bound destination, for errors.
    fn waypoint(
        &self,
        r: &WaypointRef,
        what: impl Fn() -> String,
        pick: usize,
    ) -> Result<(Arc<Workload>, SocketAddr), ResolveError> {
        let Some(svc) = self.services_by_key.get(&r.service_key()) else {
            return Err(ResolveError::UnknownWaypoint {
                what: what(),
                waypoint: r.hostname.clone(),
            });
        };
        let pods: Vec<(&Arc<Workload>, u16)> = svc
            .endpoints
            .iter()
            .filter_map(|ep| {
                let w = self.workload_by_uid(&ep.workload_uid)?;
                let port = ep.ports.get(&r.port).copied().unwrap_or(r.port);
                Some((w, port))
            })
            .filter(|(w, _)| !w.addresses.is_empty())
            .collect();
        if pods.is_empty() {
            return Err(ResolveError::NoWaypointEndpoints {
                what: what(),
                waypoint: r.hostname.clone(),
            });
        }
        let (w, port) = pods[pick % pods.len()];
        Ok((w.clone(), SocketAddr::new(w.addresses[0], port)))
    }

    /// A workload at `ip` on `node` that ztunnel captures.
    pub fn local_captured(&self, ip: IpAddr, node: &str) -> Option<&Arc<Workload>> {
        self.workload_by_ip(ip)
            .filter(|w| w.node == node && w.protocol == TunnelProtocol::Hbone)
    }

    /// IPv4 addresses of captured pods on `node`, for the eBPF map.
    pub fn captured_on(&self, node: &str) -> BTreeSet<Ipv4Addr> {
        self.by_uid
            .values()
            .filter(|w| w.node == node && w.protocol == TunnelProtocol::Hbone)
            .flat_map(|w| w.addresses.iter())
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// IPv4 addresses of every pod on `node`, captured or not.
    pub fn local_addresses(&self, node: &str) -> BTreeSet<Ipv4Addr> {
        self.by_uid
            .values()
            .filter(|w| w.node == node)
            .flat_map(|w| w.addresses.iter())
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect()
    }

    /// Every workload, in the order received.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.all_workloads.iter()
    }

    /// A copy of everything, as a config (dumps and tests).
    pub fn config(&self) -> LocalConfig {
        LocalConfig {
            workloads: self.all_workloads.iter().map(|w| (**w).clone()).collect(),
            services: self.all_services.iter().map(|s| (**s).clone()).collect(),
            policies: self.all_policies.iter().map(|p| (**p).clone()).collect(),
        }
    }
}

/// The eBPF pod map for `node`: captured pods (`true`), and pods that were in
/// `previous` but are no longer captured while still on this node (`false`:
/// their flows through ztunnel drain). Pods gone from the node leave the map.
pub fn pod_map(
    state: &State,
    node: &str,
    previous: &BTreeMap<Ipv4Addr, bool>,
) -> BTreeMap<Ipv4Addr, bool> {
    let captured = state.captured_on(node);
    let local = state.local_addresses(node);
    let mut out: BTreeMap<Ipv4Addr, bool> = previous
        .keys()
        .filter(|ip| local.contains(ip))
        .map(|ip| (*ip, false))
        .collect();
    out.extend(captured.into_iter().map(|ip| (ip, true)));
    out
}

/// Resolves the original destination of a captured connection. `pick` chooses
/// among a service's endpoints (round robin in production, fixed in tests).
pub fn resolve(state: &State, dst: SocketAddr, pick: usize) -> Result<Upstream, ResolveError> {
    if let Some(svc) = state.service_by_vip(dst.ip()) {
        let port = dst.port();
        if !svc.ports.iter().any(|p| p.port == port) {
            return Err(ResolveError::NoServicePort {
                service: svc.hostname.clone(),
                port,
            });
        }
        if let Some(r) = &svc.waypoint {
            let (waypoint, address) =
                state.waypoint(r, || format!("service {}", svc.hostname), pick)?;
            return Ok(Upstream::Waypoint {
                waypoint,
                address,
                workload: None,
                service: Some(svc.clone()),
                target: dst,
            });
        }
        let endpoints: Vec<(&Arc<Workload>, u16)> = svc
            .endpoints
            .iter()
            .filter_map(|ep| {
                let w = state.workload_by_uid(&ep.workload_uid)?;
                let target_port = *ep.ports.get(&port)?;
                Some((w, target_port))
            })
            .filter(|(w, _)| !w.addresses.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(ResolveError::NoEndpoints {
                service: svc.hostname.clone(),
                port,
            });
        }
        let (w, target_port) = endpoints[pick % endpoints.len()];
        let target = SocketAddr::new(w.addresses[0], target_port);
        return Ok(upstream_for(Some(w.clone()), Some(svc.clone()), target));
    }
    if let Some(uids) = state.ambiguous.get(&dst.ip()) {
        return Err(ResolveError::AmbiguousAddress {
            ip: dst.ip(),
            uids: uids.clone(),
        });
    }
    let workload = state.workload_by_ip(dst.ip()).cloned();
    if let Some(w) = &workload
        && let Some(r) = &w.waypoint
    {
        let (waypoint, address) = state.waypoint(r, || format!("workload {}", w.uid), pick)?;
        return Ok(Upstream::Waypoint {
            waypoint,
            address,
            workload: Some(w.clone()),
            service: None,
            target: dst,
        });
    }
    // The first service (in the order received) the workload backs, by
    // index: never a scan of every service per connection.
    let service = workload.as_ref().and_then(|w| {
        state
            .services_by_workload
            .get(&w.uid)
            .and_then(|services| services.first())
            .and_then(|s| {
                s.vips
                    .first()
                    .and_then(|v| state.service_by_vip(*v))
                    .cloned()
            })
    });
    Ok(upstream_for(workload, service, dst))
}

fn upstream_for(
    workload: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
    target: SocketAddr,
) -> Upstream {
    match workload {
        Some(w) if w.protocol == TunnelProtocol::Hbone => Upstream::Hbone {
            workload: w,
            service,
            target,
        },
        workload => Upstream::Passthrough {
            workload,
            service,
            target,
        },
    }
}

// === impl Store ===

impl Store {
    pub fn new(config: LocalConfig) -> Self {
        Store {
            state: RwLock::new(Arc::new(State::new(config))),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The current state; cheap, and consistent for the caller's use.
    pub fn snapshot(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the state wholesale.
    pub fn replace(&self, config: LocalConfig) {
        self.install(State::new(config));
    }

    /// Makes `next` the state; the previous one is dropped outside the lock.
    pub fn install(&self, next: State) {
        let previous = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(next),
        );
        drop(previous);
    }

    /// Resolves `dst` with round robin over service endpoints.
    pub fn resolve(&self, dst: SocketAddr) -> Result<Upstream, ResolveError> {
        let pick = self.cursor.fetch_add(1, Ordering::Relaxed);
        resolve(&self.snapshot(), dst, pick)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_api::{Endpoint, ServicePort};

    use super::*;
    use crate::test_helpers::pod;

    fn state() -> State {
        let a = pod("a", "shop", "default", "10.244.1.10", "n1", true);
        let b = pod("b", "shop", "default", "10.244.2.10", "n2", true);
        let c = pod("c", "shop", "default", "10.244.2.11", "n2", false);
        let ep = |w: &Workload| Endpoint {
            workload_uid: w.uid.clone(),
            ports: BTreeMap::from([(80, 8080)]),
        };
        let svc = Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                protocol: weft_api::AppProtocol::Unknown,
            }],
            endpoints: vec![ep(&b), ep(&c)],
            waypoint: None,
        };
        let empty = Service {
            name: "empty".into(),
            hostname: "empty.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.11".parse().unwrap()],
            endpoints: vec![],
            ..svc.clone()
        };
        // A waypoint (its pod and its Service, no VIP), a service and a pod
        // bound to it, and a service bound to a waypoint that does not exist.
        let wp = pod("waypoint-0", "shop", "waypoint", "10.244.1.30", "n1", false);
        let waypoint_svc = Service {
            name: "waypoint".into(),
            hostname: "waypoint.shop.svc.cluster.local".into(),
            vips: vec![],
            ports: vec![ServicePort {
                port: 15008,
                target_port: 15008,
                protocol: weft_api::AppProtocol::Unknown,
            }],
            endpoints: vec![Endpoint {
                workload_uid: wp.uid.clone(),
                ports: BTreeMap::from([(15008, 15008)]),
            }],
            ..svc.clone()
        };
        let bind = |hostname: &str| {
            Some(WaypointRef {
                namespace: "shop".into(),
                hostname: hostname.into(),
                port: 15008,
            })
        };
        let reviews = Service {
            name: "reviews".into(),
            hostname: "reviews.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.12".parse().unwrap()],
            waypoint: bind("waypoint.shop.svc.cluster.local"),
            ..svc.clone()
        };
        let typo = Service {
            name: "typo".into(),
            hostname: "typo.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.13".parse().unwrap()],
            waypoint: bind("waypiont.shop.waypoint.invalid"),
            ..svc.clone()
        };
        let mut bound = pod("bound", "shop", "default", "10.244.3.12", "n3", true);
        bound.waypoint = bind("waypoint.shop.svc.cluster.local");
        State::new(LocalConfig {
            workloads: vec![a, b, c, wp, bound],
            services: vec![svc, empty, waypoint_svc, reviews, typo],
            ..LocalConfig::default()
        })
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Pod IPs, VIPs (round robin, port mapping) and unknown addresses resolve
    /// to the right kind of upstream; bad service ports are refused.
    #[test]
    fn resolution_table() {
        let st = state();
        let kind = |u: &Upstream| match u {
            Upstream::Hbone { target, .. } => format!("hbone {target}"),
            Upstream::Passthrough { target, .. } => format!("plain {target}"),
            Upstream::Waypoint {
                address, target, ..
            } => format!("waypoint {address} for {target}"),
        };
        for (dst, pick, want) in [
            ("10.244.2.10:9000", 0, Ok("hbone 10.244.2.10:9000")),
            ("10.244.2.11:9000", 0, Ok("plain 10.244.2.11:9000")),
            ("192.0.2.1:443", 0, Ok("plain 192.0.2.1:443")),
            ("10.96.0.10:80", 0, Ok("hbone 10.244.2.10:8080")),
            ("10.96.0.10:80", 1, Ok("plain 10.244.2.11:8080")),
            ("10.96.0.10:80", 2, Ok("hbone 10.244.2.10:8080")),
            (
                "10.96.0.12:80",
                0,
                Ok("waypoint 10.244.1.30:15008 for 10.96.0.12:80"),
            ),
            (
                "10.244.3.12:9000",
                0,
                Ok("waypoint 10.244.1.30:15008 for 10.244.3.12:9000"),
            ),
            (
                "10.96.0.13:80",
                0,
                Err(ResolveError::UnknownWaypoint {
                    what: "service typo.shop.svc.cluster.local".into(),
                    waypoint: "waypiont.shop.waypoint.invalid".into(),
                }),
            ),
            (
                "10.96.0.10:81",
                0,
                Err(ResolveError::NoServicePort {
                    service: "web.shop.svc.cluster.local".into(),
                    port: 81,
                }),
            ),
            (
                "10.96.0.11:80",
                0,
                Err(ResolveError::NoEndpoints {
                    service: "empty.shop.svc.cluster.local".into(),
                    port: 80,
                }),
            ),
        ] {
            let got = resolve(&st, sa(dst), pick).map(|u| kind(&u));
            assert_eq!(got, want.map(String::from), "{dst} pick {pick}");
        }
    }

    /// An address claimed by several workloads resolves by Istio's rank
    /// (captured pod, pod, captured non-pod, other), whatever the order they
    /// arrived in; a tie at the top resolves to none and is refused, and
    /// host-network pods claim nothing.
    #[test]
    fn address_claims_ranked_never_by_order() {
        let ip = "10.244.1.10";
        let captured = pod("captured", "shop", "a", ip, "n1", true);
        let plain = pod("plain", "shop", "b", ip, "n1", false);
        let twin = pod("twin", "shop", "c", ip, "n1", true);
        let mut host = pod("host", "kube-system", "d", ip, "n1", false);
        host.host_network = true;
        let mut entry = pod("entry", "shop", "e", ip, "n1", true);
        entry.uid = "Kubernetes/networking.istio.io/ServiceEntry/shop/entry".into();
        let cases: Vec<(&str, Vec<&Workload>, Option<&str>)> = vec![
            (
                "captured pod over plain pod",
                vec![&captured, &plain],
                Some("captured"),
            ),
            (
                "same, other order",
                vec![&plain, &captured],
                Some("captured"),
            ),
            (
                "pod over captured non-pod",
                vec![&entry, &plain],
                Some("plain"),
            ),
            (
                "host-network claims nothing",
                vec![&host, &plain],
                Some("plain"),
            ),
            ("host-network alone: no address", vec![&host], None),
            ("two captured pods: none", vec![&captured, &twin], None),
            (
                "same, other order: none",
                vec![&twin, &plain, &captured],
                None,
            ),
        ];
        for (what, workloads, want) in cases {
            let st = State::new(LocalConfig {
                workloads: workloads.into_iter().cloned().collect(),
                ..LocalConfig::default()
            });
            let got = st
                .workload_by_ip(ip.parse().unwrap())
                .map(|w| w.name.as_str());
            assert_eq!(got, want, "{what}");
        }
        let st = State::new(LocalConfig {
            workloads: vec![twin.clone(), captured.clone()],
            ..LocalConfig::default()
        });
        assert_eq!(
            resolve(&st, sa("10.244.1.10:80"), 0),
            Err(ResolveError::AmbiguousAddress {
                ip: ip.parse().unwrap(),
                uids: vec![captured.uid.clone(), twin.uid.clone()],
            })
        );
        assert!(
            st.workload_by_uid(&twin.uid).is_some(),
            "still known by uid"
        );
    }

    /// Released pods drain while they stay on the node, then leave the map.
    #[test]
    fn pod_map_drains_released() {
        let st = state();
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let first = pod_map(&st, "n2", &BTreeMap::new());
        assert_eq!(first, BTreeMap::from([(ip("10.244.2.10"), true)]));
        // b released (now plain), c was captured before and stays plain.
        let mut cfg = st.config().clone();
        for w in &mut cfg.workloads {
            w.protocol = TunnelProtocol::None;
        }
        let released = State::new(cfg.clone());
        let prev = BTreeMap::from([(ip("10.244.2.10"), true), (ip("10.244.2.11"), true)]);
        assert_eq!(
            pod_map(&released, "n2", &prev),
            BTreeMap::from([(ip("10.244.2.10"), false), (ip("10.244.2.11"), false)])
        );
        // b deleted from the node: gone from the map.
        cfg.workloads.retain(|w| w.name != "b");
        let gone = State::new(cfg);
        assert_eq!(
            pod_map(&gone, "n2", &prev),
            BTreeMap::from([(ip("10.244.2.11"), false)])
        );
    }

    /// Only meshed pods of this node are captured.
    #[test]
    fn captured_set() {
        let st = state();
        let got: Vec<String> = st.captured_on("n2").iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["10.244.2.10"]);
        assert!(
            st.local_captured("10.244.1.10".parse().unwrap(), "n1")
                .is_some()
        );
        assert!(
            st.local_captured("10.244.1.10".parse().unwrap(), "n2")
                .is_none()
        );
        assert!(
            st.local_captured("10.244.2.11".parse().unwrap(), "n2")
                .is_none()
        );
    }

    /// Policies in scope are the global ones, the destination namespace's and
    /// those the workload references; a referenced policy not yet received
    /// denies (fail closed).
    #[test]
    fn policies_in_scope() {
        use weft_api::authz::{Action, Clause, Match, Rule, StringMatch};

        let deny_plaintext = |name: &str, ns: &str, scope| Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action: Action::Deny,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        not_principals: vec![StringMatch::Presence],
                        ..Match::default()
                    }],
                }],
            }],
        };
        let mut a = pod("a", "shop", "default", "10.244.1.10", "n1", true);
        let b = pod("b", "shop", "default", "10.244.1.11", "n1", true);
        let c = pod("c", "ops", "default", "10.244.1.12", "n1", true);
        let mut d = pod("d", "ops", "default", "10.244.1.13", "n1", true);
        a.authorization_policies = vec!["shop/strict-a".into()];
        d.authorization_policies = vec!["ops/not-sent".into()];
        let cfg = |policies| LocalConfig {
            workloads: vec![a.clone(), b.clone(), c.clone(), d.clone()],
            policies,
            ..LocalConfig::default()
        };
        let plaintext = |w: &Workload| Connection {
            source: None,
            source_ip: "10.0.0.1".parse().unwrap(),
            destination_ip: w.addresses[0],
            destination_port: 80,
        };
        let denied_by = |s: &State, w: &Workload| match s.authorize(w, &plaintext(w)).0 {
            Verdict::Deny { policy, reason } => Some((policy.unwrap_or_default(), reason)),
            Verdict::Allow { .. } => None,
        };
        let selected = State::new(cfg(vec![deny_plaintext(
            "strict-a",
            "shop",
            Scope::WorkloadSelector,
        )]));
        assert_eq!(
            denied_by(&selected, &a),
            Some(("shop/strict-a".into(), DenyReason::DenyMatched))
        );
        assert_eq!(denied_by(&selected, &b), None, "not referenced");
        let ns = State::new(cfg(vec![deny_plaintext(
            "strict",
            "shop",
            Scope::Namespace,
        )]));
        assert!(denied_by(&ns, &b).is_some());
        assert_eq!(denied_by(&ns, &c), None, "other namespace");
        let global = State::new(cfg(vec![deny_plaintext(
            "strict",
            "istio-system",
            Scope::Global,
        )]));
        assert!(denied_by(&global, &c).is_some());
        assert_eq!(
            denied_by(&global, &d),
            Some(("ops/not-sent".into(), DenyReason::Unavailable))
        );
    }
}
