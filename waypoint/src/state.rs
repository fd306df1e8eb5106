//! What the waypoint knows: the mesh (services and workloads, from WDS), each
//! service's compiled route table and destination policy, indexed for the
//! lookups a request makes; and the xDS handlers that keep it. A route that
//! does not compile is NACKed and its last good version keeps serving.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use tracing::info;
use weft_api::{Service, Workload};
use weft_xds::client::{AdsClient, Rejected, Update};
use weft_xds::convert::{self, XdsWorkload};
use weft_xds::proto::waypoint as pb;
use weft_xds::proto::workload;
use weft_xds::types;

use crate::authz::Policy;
use crate::breaker::Limits;
use crate::hash::HashPolicy;
use crate::outlier::Detection;

/// A subset's balance, the workloads it selects, its limits and its outlier
/// detection.
type SubsetPolicy = (Balance, HashSet<String>, Limits, Option<Detection>);

/// A destination's circuit breakers and outlier detection, by the key their
/// counters go by.
#[derive(Clone, Debug, Default)]
pub struct DestPolicy {
    pub key: String,
    pub limits: Limits,
    pub detection: Option<Detection>,
}
use crate::route::RouteTable;

/// Load balancing among a destination's endpoints.
#[derive(Clone, Debug)]
pub enum Balance {
    RoundRobin,
    /// Power of two choices over requests in flight (Istio's default).
    LeastRequest,
    Random,
    /// By a hash of the request (consistentHash).
    Hash(Arc<HashPolicy>),
}

impl Balance {
    /// A destination's (or a subset's, inheriting `inherit`) balance: a
    /// consistent hash, or one of the simple ones.
    fn compile(lb: i32, hash: Option<&pb::ConsistentHash>, inherit: &Balance) -> Balance {
        if let Some(h) = hash.and_then(HashPolicy::compile) {
            return Balance::Hash(Arc::new(h));
        }
        match pb::LoadBalancer::try_from(lb) {
            Ok(pb::LoadBalancer::RoundRobin) => Balance::RoundRobin,
            Ok(pb::LoadBalancer::LeastRequest) => Balance::LeastRequest,
            Ok(pb::LoadBalancer::Random) => Balance::Random,
            _ => inherit.clone(),
        }
    }
}

/// A DestinationRule, compiled.
#[derive(Clone, Debug)]
pub struct Destination {
    pub balance: Balance,
    pub limits: Limits,
    pub detection: Option<Detection>,
    /// Subset name → its balance, the workloads it selects, its limits and
    /// its outlier detection.
    pub subsets: HashMap<String, SubsetPolicy>,
}

impl Destination {
    fn compile(d: &pb::Destination) -> Destination {
        let balance = Balance::compile(
            d.load_balancer,
            d.consistent_hash.as_ref(),
            &Balance::LeastRequest,
        );
        let limits = Limits::compile(d.connection_pool.as_ref(), Limits::default());
        let detection = Detection::compile(d.outlier_detection.as_ref());
        let subsets = d
            .subsets
            .iter()
            .map(|s| {
                let b = Balance::compile(s.load_balancer, s.consistent_hash.as_ref(), &balance);
                let l = Limits::compile(s.connection_pool.as_ref(), limits);
                let o = match &s.outlier_detection {
                    Some(o) => Detection::compile(Some(o)),
                    None => detection,
                };
                (
                    s.name.clone(),
                    (b, s.workloads.iter().cloned().collect(), l, o),
                )
            })
            .collect();
        Destination {
            balance,
            limits,
            detection,
            subsets,
        }
    }
}

/// One consistent view.
#[derive(Debug, Default)]
pub struct State {
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    services_by_key: HashMap<String, Arc<Service>>,
    workloads_by_uid: HashMap<String, Arc<Workload>>,
    workloads_by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Workload uid → the services it is an endpoint of.
    services_by_workload: HashMap<String, Vec<Arc<Service>>>,
    routes: HashMap<String, Arc<RouteTable>>,
    destinations: HashMap<String, Arc<Destination>>,
    policies: Vec<Arc<Policy>>,
    /// This waypoint's tracing, when its Telemetry turns it on.
    tracing: Option<Arc<pb::Tracing>>,
}

/// An endpoint chosen for a request.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    /// Pod address and target port.
    pub addr: SocketAddr,
}

#[cfg(test)]
impl Endpoint {
    /// Endpoint `i`: workload `w<i>` at 10.0.0.<i>:80.
    pub(crate) fn for_test(i: u8) -> Endpoint {
        Endpoint {
            workload: Arc::new(Workload {
                uid: format!("w{i}"),
                name: format!("w{i}"),
                namespace: "ns".into(),
                workload_name: String::new(),
                canonical_name: String::new(),
                canonical_revision: String::new(),
                service_account: "default".into(),
                trust_domain: "cluster.local".into(),
                node: String::new(),
                addresses: Vec::new(),
                protocol: Default::default(),
                named_ports: Default::default(),
                authorization_policies: Vec::new(),
                host_network: false,
                healthy: true,
                waypoint: None,
            }),
            addr: SocketAddr::from(([10, 0, 0, i], 80)),
        }
    }
}

impl State {
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.services_by_vip.get(&ip)
    }

    /// By `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<&Arc<Service>> {
        self.services_by_key.get(key)
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads_by_ip.get(&ip)
    }

    /// The services `uid` is an endpoint of.
    pub fn services_of(&self, uid: &str) -> &[Arc<Service>] {
        self.services_by_workload
            .get(uid)
            .map_or(&[], Vec::as_slice)
    }

    pub fn route(&self, service_key: &str) -> Option<&Arc<RouteTable>> {
        self.routes.get(service_key)
    }

    /// Where and how this waypoint traces, when it does.
    pub fn tracing(&self) -> Option<&pb::Tracing> {
        self.tracing.as_deref()
    }

    /// Every L7 authorization policy this waypoint enforces.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter().map(Arc::as_ref)
    }

    /// The endpoints of `svc` for service port `port`, within `subset` when
    /// one is named, the balance that applies, and the destination's
    /// circuit breakers and outlier detection. An unknown subset has no
    /// endpoints (503), as in Envoy.
    pub fn endpoints(
        &self,
        svc: &Service,
        port: u16,
        subset: &str,
    ) -> (Vec<Endpoint>, Balance, DestPolicy) {
        let key = format!("{}/{}", svc.namespace, svc.hostname);
        let dest = self.destinations.get(&key);
        let (balance, members, limits, detection) = match (dest, subset) {
            (Some(d), "") => (d.balance.clone(), None, d.limits, d.detection),
            (Some(d), name) => match d.subsets.get(name) {
                Some((b, m, l, o)) => (b.clone(), Some(m), *l, *o),
                None => return (Vec::new(), d.balance.clone(), DestPolicy::default()),
            },
            (None, "") => (Balance::LeastRequest, None, Limits::default(), None),
            (None, _) => return (Vec::new(), Balance::LeastRequest, DestPolicy::default()),
        };
        // The counters' key is only made for a destination that has some.
        let policy = if limits == Limits::default() && detection.is_none() {
            DestPolicy::default()
        } else {
            DestPolicy {
                key: format!("{key}/{subset}"),
                limits,
                detection,
            }
        };
        let endpoints = svc
            .endpoints
            .iter()
            .filter(|ep| members.is_none_or(|m| m.contains(&ep.workload_uid)))
            .filter_map(|ep| {
                let w = self.workloads_by_uid.get(&ep.workload_uid)?;
                let target = *ep.ports.get(&port)?;
                let ip = *w.addresses.first()?;
                Some(Endpoint {
                    workload: w.clone(),
                    addr: SocketAddr::new(ip, target),
                })
            })
            .collect();
        (endpoints, balance, policy)
    }
}

/// The shared, swappable state, and the balancers' counters.
#[derive(Debug, Default)]
pub struct Store {
    state: RwLock<Arc<State>>,
    cursor: AtomicUsize,
    in_flight: Mutex<HashMap<SocketAddr, usize>>,
}

impl Store {
    pub fn snapshot(&self) -> Arc<State> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, state: State) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(state);
    }

    /// Chooses one of `endpoints`, not one of `tried` while others are
    /// left (Istio's previous-hosts predicate for retries). `roll` is a
    /// random number; `hash` the request's, for a consistent hash (a
    /// request without one is placed by `roll`).
    pub fn choose<'a>(
        &self,
        endpoints: &'a [Endpoint],
        balance: &Balance,
        roll: u64,
        hash: Option<u64>,
        tried: &[SocketAddr],
    ) -> Option<&'a Endpoint> {
        if let Balance::Hash(h) = balance {
            return endpoints.get(h.pick(endpoints, hash.unwrap_or(roll), tried)?);
        }
        // Retries only: the indexes of the endpoints not tried yet.
        let others: Vec<usize> = if tried.is_empty() {
            Vec::new()
        } else {
            (0..endpoints.len())
                .filter(|&i| !tried.contains(&endpoints[i].addr))
                .collect()
        };
        if others.is_empty() {
            let i = self.pick(endpoints.len(), |i| endpoints[i].addr, balance, roll)?;
            return endpoints.get(i);
        }
        let j = self.pick(others.len(), |j| endpoints[others[j]].addr, balance, roll)?;
        endpoints.get(others[j])
    }

    /// One of `n` candidates by a simple balance; `addr` gives each one's
    /// address, for its requests in flight.
    fn pick(
        &self,
        n: usize,
        addr: impl Fn(usize) -> SocketAddr,
        balance: &Balance,
        roll: u64,
    ) -> Option<usize> {
        if n == 0 {
            return None;
        }
        Some(match balance {
            Balance::RoundRobin => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
            Balance::Random | Balance::Hash(_) => (roll % n as u64) as usize,
            Balance::LeastRequest => {
                let a = (roll % n as u64) as usize;
                let b = ((roll >> 32) % n as u64) as usize;
                let flights = self
                    .in_flight
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let load = |i: usize| flights.get(&addr(i)).copied().unwrap_or(0);
                if load(b) < load(a) { b } else { a }
            }
        })
    }

    /// Requests in flight to any of `endpoints` (a service's active requests).
    pub fn load(&self, endpoints: &[Endpoint]) -> usize {
        let flights = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        endpoints
            .iter()
            .map(|e| flights.get(&e.addr).copied().unwrap_or(0))
            .sum()
    }

    /// Counts a request in flight to `addr` until the guard drops.
    pub fn in_flight(self: &Arc<Self>, addr: SocketAddr) -> InFlight {
        *self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr)
            .or_default() += 1;
        InFlight {
            store: self.clone(),
            addr,
        }
    }
}

/// A request in flight to one endpoint.
#[derive(Debug)]
pub struct InFlight {
    store: Arc<Store>,
    addr: SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut m = self
            .store
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.addr);
            }
        }
    }
}

/// What the xDS handlers accepted, by resource name.
#[derive(Debug, Default)]
struct Cache {
    workloads: BTreeMap<String, XdsWorkload>,
    services: BTreeMap<String, Service>,
    routes: BTreeMap<String, Arc<RouteTable>>,
    destinations: BTreeMap<String, Arc<Destination>>,
    policies: BTreeMap<String, Arc<Policy>>,
    telemetry: BTreeMap<String, pb::Telemetry>,
}

impl Cache {
    fn build(&self) -> State {
        let cfg = convert::assemble(self.workloads.values(), self.services.values(), []);
        let mut s = State::default();
        for w in cfg.workloads {
            for ip in &w.addresses {
                s.workloads_by_ip.insert(*ip, w.clone());
            }
            s.workloads_by_uid.insert(w.uid.clone(), w);
        }
        for svc in cfg.services {
            for vip in &svc.vips {
                s.services_by_vip.insert(*vip, svc.clone());
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
        s.routes = self
            .routes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        s.destinations = self
            .destinations
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        s.policies = self.policies.values().cloned().collect();
        // The controller sends each waypoint its own Telemetry only.
        s.tracing = self
            .telemetry
            .values()
            .find_map(|t| t.tracing.clone())
            .map(Arc::new);
        s
    }
}

/// Applies `updates`, calling `apply` for each upsert (an error refuses it,
/// keeping the previous version), then republishes.
fn apply<T>(
    cache: &Mutex<Cache>,
    store: &Store,
    updates: Vec<Update<T>>,
    mut upsert: impl FnMut(&mut Cache, String, T) -> Result<(), String>,
    remove: impl Fn(&mut Cache, &str),
) -> Vec<Rejected> {
    let mut c = cache.lock().unwrap_or_else(PoisonError::into_inner);
    let mut rejected = Vec::new();
    for u in updates {
        match u {
            Update::Upsert { name, resource } => {
                if let Err(reason) = upsert(&mut c, name.clone(), resource) {
                    rejected.push(Rejected { name, reason });
                }
            }
            Update::Remove { name } => remove(&mut c, &name),
        }
    }
    store.replace(c.build());
    rejected
}

/// The waypoint's xDS client: the mesh view, routes and destinations.
pub fn client(client: AdsClient, store: Arc<Store>) -> AdsClient {
    let cache = Arc::new(Mutex::new(Cache::default()));
    let (c1, s1) = (cache.clone(), store.clone());
    let addresses = move |updates: Vec<Update<workload::Address>>| {
        apply(
            &c1,
            &s1,
            updates,
            |c, name, addr| match addr.r#type {
                Some(workload::address::Type::Workload(w)) => {
                    let w = convert::workload_from_proto(&name, w).map_err(|e| e.to_string())?;
                    c.services.remove(&name);
                    c.workloads.insert(name, w);
                    Ok(())
                }
                Some(workload::address::Type::Service(svc)) => {
                    let svc = convert::service_from_proto(&name, svc).map_err(|e| e.to_string())?;
                    c.workloads.remove(&name);
                    c.services.insert(name, svc);
                    Ok(())
                }
                None => Err("neither workload nor service".into()),
            },
            |c, name| {
                c.workloads.remove(name);
                c.services.remove(name);
            },
        )
    };
    let (c2, s2) = (cache.clone(), store.clone());
    let routes = move |updates: Vec<Update<pb::Route>>| {
        apply(
            &c2,
            &s2,
            updates,
            |c, name, route| {
                let table =
                    RouteTable::compile(&route).map_err(|e| format!("{}: {e}", route.origin))?;
                info!(component = "xds", route = %name, origin = %route.origin, rules = table.rules.len(), "route table applied");
                c.routes.insert(name, Arc::new(table));
                Ok(())
            },
            |c, name| {
                c.routes.remove(name);
            },
        )
    };
    let (c3, s3) = (cache.clone(), store.clone());
    let policies = move |updates: Vec<Update<pb::Authorization>>| {
        apply(
            &c3,
            &s3,
            updates,
            |c, name, p| {
                // A policy that cannot be evaluated is refused (NACK): the
                // last good version keeps being enforced, never a wider one.
                let compiled = Policy::compile(&p)?;
                info!(component = "xds", policy = %name, "L7 authorization policy applied");
                c.policies.insert(name, Arc::new(compiled));
                Ok(())
            },
            |c, name| {
                c.policies.remove(name);
            },
        )
    };
    let (c4, s4) = (cache.clone(), store.clone());
    let telemetry = move |updates: Vec<Update<pb::Telemetry>>| {
        apply(
            &c4,
            &s4,
            updates,
            |c, name, t| {
                if let Some(tr) = &t.tracing
                    && (u16::try_from(tr.port).is_err()
                        || !(0.0..=100.0).contains(&tr.sampling_percent))
                {
                    return Err(format!(
                        "{}: tracing port or sampling out of range",
                        t.origin
                    ));
                }
                info!(component = "xds", telemetry = %name, origin = %t.origin, tracing = t.tracing.as_ref().map_or("off", |t| t.provider.as_str()), "telemetry applied");
                c.telemetry.insert(name, t);
                Ok(())
            },
            |c, name| {
                c.telemetry.remove(name);
            },
        )
    };
    let destinations = move |updates: Vec<Update<pb::Destination>>| {
        apply(
            &cache,
            &store,
            updates,
            |c, name, d| {
                info!(component = "xds", destination = %name, origin = %d.origin, subsets = d.subsets.len(), "destination policy applied");
                c.destinations
                    .insert(name, Arc::new(Destination::compile(&d)));
                Ok(())
            },
            |c, name| {
                c.destinations.remove(name);
            },
        )
    };
    client
        .handle::<workload::Address, _>(types::ADDRESS.type_url, addresses)
        .handle::<pb::Route, _>(types::ROUTE.type_url, routes)
        .handle::<pb::Destination, _>(types::DESTINATION.type_url, destinations)
        .handle::<pb::Authorization, _>(types::L7_AUTHORIZATION.type_url, policies)
        .handle::<pb::Telemetry, _>(types::TELEMETRY.type_url, telemetry)
}
