//! What ztunnel knows about the mesh: workloads and services, indexed for the
//! lookups the proxy makes per connection, and destination resolution.
//!
//! Start at [`Store`]. [`resolve`] is a pure function from state to upstream.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tracing::warn;
use weft_api::authz::{self, Connection, DenyReason, Scope, Verdict};
use weft_api::{Authorization, LocalConfig, Service, TunnelProtocol, WaypointRef, Workload};

/// A service's key: `namespace/hostname`, as bindings and xDS name it.
fn service_key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace, svc.hostname)
}

/// Indexed workloads, services and policies, kept up to date change by
/// change: an update touches the entries it names and the indexes they
/// are in, never the rest.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The one workload each address resolves to (see [`rank`]).
    workloads: HashMap<IpAddr, Arc<Workload>>,
    /// Addresses claimed by equally ranked workloads, with their uids: they
    /// resolve to nothing, and connections to or from them are refused.
    ambiguous: HashMap<IpAddr, Vec<String>>,
    /// Every workload that claims each address, with its rank: what the
    /// two maps above are decided from.
    claims: HashMap<IpAddr, Vec<(u8, Arc<Workload>)>>,
    by_uid: HashMap<String, Arc<Workload>>,
    /// The service each VIP resolves to: of the services that claim it,
    /// the last by `namespace/hostname`.
    services: HashMap<IpAddr, Arc<Service>>,
    vip_claims: HashMap<IpAddr, BTreeSet<String>>,
    /// Services by `namespace/hostname`: how waypoint references resolve.
    services_by_key: HashMap<String, Arc<Service>>,
    /// Workload uid → the services it is an endpoint of, with their keys,
    /// in key order.
    services_by_workload: HashMap<String, Vec<(String, Arc<Service>)>>,
    /// Service key → how many bindings (services' and workloads') name it:
    /// the endpoints of a named service are waypoint pods, whose HBONE
    /// connections carry the traffic they proxy, as themselves.
    bound: HashMap<String, usize>,
    /// Root-namespace policies: every destination.
    global_policies: Vec<Arc<Authorization>>,
    /// Namespace-wide policies, by namespace.
    namespace_policies: HashMap<String, Vec<Arc<Authorization>>>,
    /// Selector-scoped policies, by `namespace/name`, as workloads name them.
    selected_policies: HashMap<String, Arc<Authorization>>,
    /// Every policy, in the order received (config dumps).
    all_policies: Vec<Arc<Authorization>>,
}

/// Above this many updates, [`Store::update`] works on a copy.
const IN_PLACE_UPDATES: usize = 256;

/// Shared, swappable [`State`] plus the round-robin cursor for service endpoints.
#[derive(Debug, Default)]
pub struct Store {
    state: RwLock<Arc<State>>,
    cursor: AtomicUsize,
    /// Counts changes: how a watcher tells a new state without holding the
    /// old one (which would make every update copy it).
    generation: AtomicU64,
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
        let mut s = State::default();
        for w in config.workloads {
            s.upsert_workload(w);
        }
        for svc in config.services {
            s.upsert_service(svc);
        }
        s.set_policies(config.policies.into_iter().map(Arc::new).collect());
        s
    }

    /// Adds `w`, or replaces the workload with its uid.
    pub fn upsert_workload(&mut self, w: Arc<Workload>) {
        let mut dirty = Vec::new();
        if let Some(old) = self.by_uid.insert(w.uid.clone(), w.clone()) {
            self.unclaim(&old, &mut dirty);
            self.unbind(old.waypoint.as_ref());
        }
        if let Some(rank) = rank(&w) {
            for ip in &w.addresses {
                self.claims.entry(*ip).or_default().push((rank, w.clone()));
                dirty.push(*ip);
            }
        }
        self.bind(w.waypoint.as_ref());
        for ip in dirty {
            self.decide(ip);
        }
    }

    pub fn remove_workload(&mut self, uid: &str) {
        let Some(old) = self.by_uid.remove(uid) else {
            return;
        };
        let mut dirty = Vec::new();
        self.unclaim(&old, &mut dirty);
        self.unbind(old.waypoint.as_ref());
        for ip in dirty {
            self.decide(ip);
        }
    }

    fn unclaim(&mut self, old: &Workload, dirty: &mut Vec<IpAddr>) {
        for ip in &old.addresses {
            if let Some(claimants) = self.claims.get_mut(ip) {
                claimants.retain(|(_, c)| c.uid != old.uid);
                if claimants.is_empty() {
                    self.claims.remove(ip);
                }
                dirty.push(*ip);
            }
        }
    }

    /// Decides who `ip` resolves to. Never by arrival order: the best rank
    /// wins; a tie at the top is refused (a control plane should never
    /// send one; Weft's does not).
    fn decide(&mut self, ip: IpAddr) {
        self.workloads.remove(&ip);
        self.ambiguous.remove(&ip);
        let Some(claimants) = self.claims.get(&ip) else {
            return;
        };
        let Some(top) = claimants.iter().map(|(r, _)| *r).max() else {
            return;
        };
        let mut tied: Vec<&Arc<Workload>> = claimants
            .iter()
            .filter(|(r, _)| *r == top)
            .map(|(_, w)| w)
            .collect();
        if tied.len() > 1 {
            let mut uids: Vec<String> = tied.iter().map(|w| w.uid.clone()).collect();
            uids.sort();
            uids.dedup();
            if uids.len() > 1 {
                warn!(%ip, workloads = ?uids, "several workloads claim one address; it resolves to none of them");
                self.ambiguous.insert(ip, uids);
                return;
            }
        }
        if let Some(w) = tied.pop() {
            self.workloads.insert(ip, w.clone());
        }
    }

    /// Adds `svc` (with its endpoints), or replaces the one with its key.
    pub fn upsert_service(&mut self, svc: Arc<Service>) {
        let key = service_key(&svc);
        if let Some(old) = self.services_by_key.insert(key.clone(), svc.clone()) {
            self.detach(&key, &old);
        }
        for vip in &svc.vips {
            self.vip_claims.entry(*vip).or_default().insert(key.clone());
            self.decide_vip(*vip);
        }
        for ep in &svc.endpoints {
            let mine = self
                .services_by_workload
                .entry(ep.workload_uid.clone())
                .or_default();
            // In key order; after any with the same key, as it came.
            let at = mine.partition_point(|(k, _)| k.as_str() <= key.as_str());
            mine.insert(at, (key.clone(), svc.clone()));
        }
        self.bind(svc.waypoint.as_ref());
    }

    /// Removes the service `namespace/hostname`.
    pub fn remove_service(&mut self, key: &str) {
        if let Some(old) = self.services_by_key.remove(key) {
            self.detach(key, &old);
        }
    }

    /// Takes `old`, the service that was at `key`, out of the indexes.
    fn detach(&mut self, key: &str, old: &Arc<Service>) {
        for vip in &old.vips {
            if let Some(keys) = self.vip_claims.get_mut(vip) {
                keys.remove(key);
                if keys.is_empty() {
                    self.vip_claims.remove(vip);
                }
            }
            self.decide_vip(*vip);
        }
        for ep in &old.endpoints {
            if let Some(mine) = self.services_by_workload.get_mut(&ep.workload_uid) {
                mine.retain(|(_, s)| !Arc::ptr_eq(s, old));
                if mine.is_empty() {
                    self.services_by_workload.remove(&ep.workload_uid);
                }
            }
        }
        self.unbind(old.waypoint.as_ref());
    }

    fn decide_vip(&mut self, vip: IpAddr) {
        let winner = self
            .vip_claims
            .get(&vip)
            .and_then(|keys| keys.last())
            .and_then(|k| self.services_by_key.get(k))
            .cloned();
        match winner {
            Some(svc) => self.services.insert(vip, svc),
            None => self.services.remove(&vip),
        };
    }

    fn bind(&mut self, r: Option<&WaypointRef>) {
        if let Some(r) = r {
            *self.bound.entry(r.service_key()).or_default() += 1;
        }
    }

    fn unbind(&mut self, r: Option<&WaypointRef>) {
        if let Some(r) = r {
            let key = r.service_key();
            if let Some(n) = self.bound.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.bound.remove(&key);
                }
            }
        }
    }

    /// Replaces every policy: they are few, and indexed afresh.
    pub fn set_policies(&mut self, policies: Vec<Arc<Authorization>>) {
        self.global_policies.clear();
        self.namespace_policies.clear();
        self.selected_policies.clear();
        for p in &policies {
            match p.scope {
                Scope::Global => self.global_policies.push(p.clone()),
                Scope::Namespace => self
                    .namespace_policies
                    .entry(p.namespace.clone())
                    .or_default()
                    .push(p.clone()),
                Scope::WorkloadSelector => {
                    self.selected_policies.insert(p.key(), p.clone());
                }
            }
        }
        self.all_policies = policies;
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
        let mut mine = self
            .services_by_workload
            .get(&w.uid)?
            .iter()
            .map(|(_, s)| s);
        if let Some(h) = host
            && let Some(s) = mine.clone().find(|s| s.hostname == h)
        {
            return Some(s);
        }
        mine.find(|s| {
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

    /// Whether the workload `uid` is a waypoint's pod: an endpoint of a
    /// service some binding names.
    pub fn is_waypoint(&self, uid: &str) -> bool {
        self.services_by_workload
            .get(uid)
            .is_some_and(|mine| mine.iter().any(|(key, _)| self.bound.contains_key(key)))
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

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_uid.values()
    }

    /// A copy of everything, as a config (dumps and tests): workloads by
    /// uid, services by key, policies in the order received.
    pub fn config(&self) -> LocalConfig {
        let mut workloads: Vec<&Arc<Workload>> = self.by_uid.values().collect();
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut services: Vec<(&String, &Arc<Service>)> = self.services_by_key.iter().collect();
        services.sort_by(|a, b| a.0.cmp(b.0));
        LocalConfig {
            workloads: workloads.into_iter().cloned().collect(),
            services: services.into_iter().map(|(_, s)| s.clone()).collect(),
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
            .and_then(|(_, s)| {
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
            generation: AtomicU64::new(0),
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

    /// Applies a change of `size` updates. A small one changes the state
    /// in place, under the lock (readers that hold a snapshot keep it as it
    /// was: then, only then, the state is copied first, shallowly). A large
    /// one (a first state, a resync) is applied to a copy outside the lock,
    /// so connections are not held up meanwhile, and swapped in.
    pub fn update(&self, size: usize, f: impl FnOnce(&mut State)) {
        if size > IN_PLACE_UPDATES {
            let mut next = (*self.snapshot()).clone();
            f(&mut next);
            self.install(next);
            return;
        }
        let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
        f(Arc::make_mut(&mut guard));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes so far: a new value means a new state.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Makes `next` the state; the previous one is dropped outside the lock.
    pub fn install(&self, next: State) {
        let previous = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(next),
        );
        self.generation.fetch_add(1, Ordering::AcqRel);
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
            workloads: [a, b, c, wp, bound].map(std::sync::Arc::new).into(),
            services: [svc, empty, waypoint_svc, reviews, typo]
                .map(std::sync::Arc::new)
                .into(),
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
                workloads: workloads.into_iter().cloned().map(Arc::new).collect(),
                ..LocalConfig::default()
            });
            let got = st
                .workload_by_ip(ip.parse().unwrap())
                .map(|w| w.name.as_str());
            assert_eq!(got, want, "{what}");
        }
        let st = State::new(LocalConfig {
            workloads: [twin.clone(), captured.clone()]
                .map(std::sync::Arc::new)
                .into(),
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
            Arc::make_mut(w).protocol = TunnelProtocol::None;
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
            workloads: [a.clone(), b.clone(), c.clone(), d.clone()]
                .map(std::sync::Arc::new)
                .into(),
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
