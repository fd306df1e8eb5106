//! ztunnel's xDS handlers: workloads and services (`istio.workload.Address`)
//! and L4 policies (`istio.security.Authorization`), kept in one [`Cache`]
//! that applies each response to the proxy's [`Store`] entry by entry. The
//! protocol (subscribe, reconnect, ACK/NACK, pushes in parts) is
//! `weft_xds::client`'s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tonic::transport::Channel;
use tracing::warn;
use weft_api::{Authorization, Endpoint, Service, Workload};
use weft_xds::client::{AdsClient, Rejected, Update};
use weft_xds::convert::{self, XdsWorkload};
use weft_xds::proto::{security, workload};
use weft_xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

use crate::metrics::{Metrics, XdsLabels};
use crate::state::{State, Store};

/// One Address resource as held: shared with the state.
#[derive(Clone, Debug)]
enum AddressEntry {
    /// A workload and the services it backs (`namespace/hostname` →
    /// service port → target port).
    Workload(Arc<Workload>, BTreeMap<String, BTreeMap<u16, u16>>),
    /// A service as received; the state gets it with its endpoints.
    Service(Arc<Service>),
}

/// Accepted resources, by name, and what the state is updated from.
#[derive(Debug, Default)]
pub struct Cache {
    addresses: BTreeMap<String, AddressEntry>,
    policies: BTreeMap<String, Arc<Authorization>>,
    /// Service key → the workloads that back it (uid → service port →
    /// target port): a service's endpoints, kept as workloads come and go.
    endpoints: HashMap<String, BTreeMap<String, BTreeMap<u16, u16>>>,
    /// Service key → the name of its Address resource.
    service_names: HashMap<String, String>,
}

impl Cache {
    /// Applies a response's Address updates to the cache and, entry by
    /// entry, to `st`: a workload's change touches it and the services it
    /// backs (before and after), nothing else.
    fn apply_addresses(
        &mut self,
        updates: Vec<Update<workload::Address>>,
        st: &mut State,
    ) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for u in updates {
            match u {
                Update::Upsert { name, resource } => match address_entry(&name, resource) {
                    Ok(entry) => {
                        let old = self.addresses.insert(name.clone(), entry.clone());
                        self.forget(old, st, &mut touched);
                        self.learn(&name, entry, st, &mut touched);
                    }
                    Err(reason) => rejected.push(Rejected { name, reason }),
                },
                Update::Remove { name } => {
                    let old = self.addresses.remove(&name);
                    self.forget(old, st, &mut touched);
                }
            }
        }
        for key in touched {
            self.assemble(&key, st);
        }
        rejected
    }

    fn forget(
        &mut self,
        old: Option<AddressEntry>,
        st: &mut State,
        touched: &mut BTreeSet<String>,
    ) {
        match old {
            Some(AddressEntry::Workload(w, backs)) => {
                for key in backs.keys() {
                    if let Some(eps) = self.endpoints.get_mut(key) {
                        eps.remove(&w.uid);
                        if eps.is_empty() {
                            self.endpoints.remove(key);
                        }
                    }
                    touched.insert(key.clone());
                }
                st.remove_workload(&w.uid);
            }
            Some(AddressEntry::Service(svc)) => {
                let key = convert::service_key(&svc);
                self.service_names.remove(&key);
                touched.insert(key);
            }
            None => {}
        }
    }

    fn learn(
        &mut self,
        name: &str,
        entry: AddressEntry,
        st: &mut State,
        touched: &mut BTreeSet<String>,
    ) {
        match entry {
            AddressEntry::Workload(w, backs) => {
                for (key, ports) in backs {
                    self.endpoints
                        .entry(key.clone())
                        .or_default()
                        .insert(w.uid.clone(), ports);
                    touched.insert(key);
                }
                st.upsert_workload(w);
            }
            AddressEntry::Service(svc) => {
                let key = convert::service_key(&svc);
                self.service_names.insert(key.clone(), name.to_string());
                touched.insert(key);
            }
        }
    }

    /// Gives `st` the service at `key` with its current endpoints, or
    /// takes it out if there is none.
    fn assemble(&self, key: &str, st: &mut State) {
        let base = self
            .service_names
            .get(key)
            .and_then(|name| self.addresses.get(name))
            .and_then(|e| match e {
                AddressEntry::Service(svc) => Some(svc),
                AddressEntry::Workload(..) => None,
            });
        let Some(svc) = base else {
            st.remove_service(key);
            return;
        };
        let endpoints = self
            .endpoints
            .get(key)
            .into_iter()
            .flatten()
            .map(|(uid, ports)| Endpoint {
                workload_uid: uid.clone(),
                ports: ports.clone(),
            })
            .collect();
        st.upsert_service(Arc::new(Service {
            endpoints,
            ..(**svc).clone()
        }));
    }

    /// Applies policies; also returns the conditions ztunnel cannot enforce
    /// (applied in the safe direction).
    fn apply_policies(
        &mut self,
        updates: Vec<Update<security::Authorization>>,
        st: &mut State,
    ) -> (Vec<Rejected>, Vec<String>) {
        let (mut rejected, mut narrowed) = (Vec::new(), Vec::new());
        for u in updates {
            match u {
                Update::Upsert { name, resource } => {
                    match convert::authorization_from_proto(&name, resource) {
                        Ok((p, unenforceable)) => {
                            narrowed.extend(unenforceable.iter().map(ToString::to_string));
                            self.policies.insert(name, Arc::new(p));
                        }
                        Err(e) => rejected.push(Rejected {
                            name,
                            reason: e.to_string(),
                        }),
                    }
                }
                Update::Remove { name } => {
                    self.policies.remove(&name);
                }
            }
        }
        st.set_policies(self.policies.values().cloned().collect());
        (rejected, narrowed)
    }

    /// Everything held, assembled as a config: what a state built from
    /// scratch is built from (the tests compare the two).
    #[cfg(test)]
    fn config(&self) -> weft_api::LocalConfig {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for entry in self.addresses.values() {
            match entry {
                AddressEntry::Workload(w, backs) => workloads.push(XdsWorkload {
                    workload: (**w).clone(),
                    services: backs.clone(),
                }),
                AddressEntry::Service(s) => services.push((**s).clone()),
            }
        }
        let policies: Vec<Authorization> = self.policies.values().map(|p| (**p).clone()).collect();
        convert::assemble(&workloads, &services, &policies)
    }
}

/// One Address resource, checked. Its name must be what the state keys it
/// by (a workload's uid, a service's `namespace/hostname`), as istiod and
/// Weft's controller name them: two names for one key would let removing
/// one take the other out of the state.
fn address_entry(name: &str, addr: workload::Address) -> Result<AddressEntry, String> {
    match addr.r#type {
        Some(workload::address::Type::Workload(w)) => {
            let XdsWorkload { workload, services } =
                convert::workload_from_proto(name, w).map_err(|e| e.to_string())?;
            if workload.uid != name {
                return Err(format!(
                    "workload uid {:?} differs from the resource name",
                    workload.uid
                ));
            }
            Ok(AddressEntry::Workload(Arc::new(workload), services))
        }
        Some(workload::address::Type::Service(s)) => {
            let svc = convert::service_from_proto(name, s).map_err(|e| e.to_string())?;
            let key = convert::service_key(&svc);
            if key != name {
                return Err(format!(
                    "service {key:?} (namespace/hostname) differs from the resource name"
                ));
            }
            Ok(AddressEntry::Service(Arc::new(svc)))
        }
        None => Err("neither workload nor service".to_string()),
    }
}

/// The client for node `node_name`, applying to `state`.
pub fn client(
    channel: Channel,
    token_path: PathBuf,
    node_name: &str,
    state: Arc<Store>,
    metrics: Arc<Metrics>,
) -> AdsClient {
    let id =
        format!("ztunnel~0.0.0.0~ztunnel-{node_name}.istio-system~istio-system.svc.cluster.local");
    let cache = Arc::new(Mutex::new(Cache::default()));
    let (addr_cache, addr_state, addr_metrics) = (cache.clone(), state.clone(), metrics.clone());
    let addresses = move |updates: Vec<Update<workload::Address>>| {
        let started = Instant::now();
        let mut cache = addr_cache.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rejected = Vec::new();
        addr_state.update(updates.len(), |st| {
            rejected = cache.apply_addresses(updates, st);
        });
        addr_metrics
            .xds_apply
            .get_or_create(&XdsLabels { r#type: "address" })
            .observe(started.elapsed().as_secs_f64());
        rejected
    };
    let policies = move |updates: Vec<Update<security::Authorization>>| {
        let started = Instant::now();
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut rejected, mut narrowed) = (Vec::new(), Vec::new());
        state.update(updates.len(), |st| {
            (rejected, narrowed) = cache.apply_policies(updates, st);
        });
        for what in &narrowed {
            warn!(component = "xds", message = %what, "policy condition not enforceable; applied in the safe direction");
            metrics.unenforceable.inc();
        }
        metrics
            .xds_apply
            .get_or_create(&XdsLabels {
                r#type: "authorization",
            })
            .observe(started.elapsed().as_secs_f64());
        rejected
    };
    AdsClient::new(channel, token_path, weft_xds::client::node(id, node_name))
        .handle::<workload::Address, _>(ADDRESS_TYPE, addresses)
        .handle::<security::Authorization, _>(AUTHORIZATION_TYPE, policies)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};

    use weft_api::{ServicePort, WaypointRef};
    use weft_xds::convert::AddressInput;

    use super::*;
    use crate::test_helpers::pod;

    /// What the proxies ask a state, as text: who every address resolves
    /// to, every VIP's service, every workload's services and waypoint
    /// role, and where a connection to each address on port 80 goes.
    fn answers(st: &State, ips: &[IpAddr], uids: &[String]) -> Vec<String> {
        let mut out = vec![format!("{:?}", st.config())];
        for ip in ips {
            out.push(format!(
                "{ip}: {:?} {:?} {:?}",
                st.workload_by_ip(*ip).map(|w| &w.uid),
                st.service_by_vip(*ip).map(|s| &s.hostname),
                crate::state::resolve(st, SocketAddr::new(*ip, 80), 0),
            ));
        }
        for uid in uids {
            let services = st.workload_by_uid(uid).map(|w| {
                (
                    st.inbound_service(w, 8080, None)
                        .map(|s| s.hostname.clone()),
                    st.inbound_service(w, 9090, Some("s1.shop.svc.cluster.local"))
                        .map(|s| s.hostname.clone()),
                )
            });
            out.push(format!("{uid}: {services:?} {}", st.is_waypoint(uid)));
        }
        out
    }

    /// The same questions answered from a config by brute force, rules
    /// spelled out: an address is the one best-ranked workload's (captured
    /// pod, pod, captured other, other; host network never) or nobody's on
    /// a tie; a VIP is the last service's by `namespace/hostname`; a
    /// waypoint pod backs a service some binding names.
    fn expected(cfg: &weft_api::LocalConfig, ips: &[IpAddr], uids: &[String]) -> Vec<String> {
        let rank = |w: &Workload| {
            let pod = w.uid.contains("//Pod/");
            let hbone = w.protocol == weft_api::TunnelProtocol::Hbone;
            u8::from(pod) * 2 + u8::from(hbone)
        };
        let key = |s: &Service| format!("{}/{}", s.namespace, s.hostname);
        let mut out = Vec::new();
        for ip in ips {
            let claimants: Vec<&Workload> = cfg
                .workloads
                .iter()
                .filter(|w| !w.host_network && w.addresses.contains(ip))
                .map(|w| &**w)
                .collect();
            let top = claimants.iter().map(|w| rank(w)).max();
            let mut best: Vec<&String> = claimants
                .iter()
                .filter(|w| Some(rank(w)) == top)
                .map(|w| &w.uid)
                .collect();
            best.sort();
            best.dedup();
            let workload = (best.len() == 1).then(|| best[0].clone());
            let service = cfg
                .services
                .iter()
                .filter(|s| s.vips.contains(ip))
                .max_by_key(|s| key(s))
                .map(|s| s.hostname.clone());
            out.push(format!("{ip}: {workload:?} {service:?}"));
        }
        let bound: Vec<String> = cfg
            .services
            .iter()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(cfg.workloads.iter().filter_map(|w| w.waypoint.as_ref()))
            .map(WaypointRef::service_key)
            .collect();
        for uid in uids {
            let waypoint = cfg.services.iter().any(|s| {
                bound.contains(&key(s)) && s.endpoints.iter().any(|e| &e.workload_uid == uid)
            });
            out.push(format!("{uid}: {waypoint}"));
        }
        out
    }

    /// The state's answers to [`expected`]'s questions.
    fn answered(st: &State, ips: &[IpAddr], uids: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for ip in ips {
            let workload = st.workload_by_ip(*ip).map(|w| w.uid.clone());
            let service = st.service_by_vip(*ip).map(|s| s.hostname.clone());
            out.push(format!("{ip}: {workload:?} {service:?}"));
        }
        for uid in uids {
            out.push(format!("{uid}: {}", st.is_waypoint(uid)));
        }
        out
    }

    /// Random updates (workloads that claim the same addresses, back
    /// services, bind to waypoints; services that share VIPs; removals),
    /// applied change by change, leave the state answering as the rules say
    /// (checked by brute force) and exactly as a state built from scratch
    /// from the same resources.
    #[test]
    fn incremental_state_answers_as_a_rebuild() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let pool: Vec<IpAddr> = (1..=6)
            .map(|i| format!("10.244.1.{i}").parse().unwrap())
            .chain((1..=3).map(|i| format!("10.96.0.{i}").parse().unwrap()))
            .collect();
        let uid = |i: u64| {
            if i < 9 {
                format!("Kubernetes//Pod/shop/w{i}")
            } else {
                format!("Kubernetes//WorkloadEntry/shop/w{i}")
            }
        };
        let uids: Vec<String> = (0..12).map(uid).collect();
        let service = |k: u64| Service {
            name: format!("s{k}"),
            namespace: "shop".into(),
            hostname: format!("s{k}.shop.svc.cluster.local"),
            vips: Vec::new(),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                protocol: Default::default(),
            }],
            endpoints: Vec::new(),
            waypoint: None,
        };
        let waypoint = |k: u64| WaypointRef {
            namespace: "shop".into(),
            hostname: format!("s{k}.shop.svc.cluster.local"),
            port: 15008,
        };
        let (mut cache, mut st) = (Cache::default(), State::default());
        for step in 0..1500 {
            let mut updates = Vec::new();
            for _ in 0..=next(3) {
                match next(6) {
                    0..=2 => {
                        let i = next(12);
                        let ip = &pool[next(7) as usize].to_string();
                        let mut w = pod(&format!("w{i}"), "shop", "sa", ip, "n1", next(3) > 0);
                        w.uid = uid(i);
                        if next(4) == 0 {
                            w.addresses.push(pool[next(6) as usize]);
                        }
                        w.host_network = next(10) == 0;
                        w.waypoint = (next(5) == 0).then(|| waypoint(next(4)));
                        let bases: Vec<Service> =
                            (0..4).filter(|_| next(3) == 0).map(service).collect();
                        let eps: Vec<Endpoint> = bases
                            .iter()
                            .map(|_| Endpoint {
                                workload_uid: w.uid.clone(),
                                ports: BTreeMap::from([(80, [8080, 9090][next(2) as usize])]),
                            })
                            .collect();
                        let backs = bases
                            .iter()
                            .zip(&eps)
                            .map(|(s, e)| convert::Backed::of(s, e))
                            .collect();
                        let resource = AddressInput::Workload(&w, backs).to_proto();
                        updates.push(Update::Upsert {
                            name: w.uid.clone(),
                            resource,
                        });
                    }
                    3 => {
                        let mut svc = service(next(4));
                        svc.vips = vec![pool[6 + next(3) as usize]];
                        svc.waypoint = (next(4) == 0).then(|| waypoint(next(4)));
                        let resource = AddressInput::Service(&svc).to_proto();
                        updates.push(Update::Upsert {
                            name: convert::service_key(&svc),
                            resource,
                        });
                    }
                    4 => updates.push(Update::Remove {
                        name: uid(next(12)),
                    }),
                    _ => updates.push(Update::Remove {
                        name: convert::service_key(&service(next(4))),
                    }),
                }
            }
            let rejected = cache.apply_addresses(updates, &mut st);
            assert!(rejected.is_empty(), "{rejected:?}");
            let cfg = cache.config();
            assert_eq!(
                answered(&st, &pool, &uids),
                expected(&cfg, &pool, &uids),
                "step {step}: the rules"
            );
            let fresh = State::new(cfg);
            assert_eq!(
                answers(&st, &pool, &uids),
                answers(&fresh, &pool, &uids),
                "step {step}: a rebuild"
            );
        }
        assert!(!st.config().workloads.is_empty() && !st.config().services.is_empty());
    }

    /// An Address resource whose name is not its key is refused by name:
    /// removing it later must not take another resource's entry with it.
    #[test]
    fn a_resource_named_other_than_its_key_is_refused() {
        let w = pod("a", "shop", "sa", "10.244.1.1", "n1", true);
        let svc = Service {
            name: "web".into(),
            namespace: "shop".into(),
            hostname: "web.shop.svc.cluster.local".into(),
            vips: vec!["10.96.0.1".parse().unwrap()],
            ports: Vec::new(),
            endpoints: Vec::new(),
            waypoint: None,
        };
        let (mut cache, mut st) = (Cache::default(), State::default());
        let rejected = cache.apply_addresses(
            vec![
                Update::Upsert {
                    name: "Kubernetes//Pod/shop/other".into(),
                    resource: AddressInput::Workload(&w, Vec::new()).to_proto(),
                },
                Update::Upsert {
                    name: "shop/other.shop.svc.cluster.local".into(),
                    resource: AddressInput::Service(&svc).to_proto(),
                },
                Update::Upsert {
                    name: w.uid.clone(),
                    resource: AddressInput::Workload(&w, Vec::new()).to_proto(),
                },
            ],
            &mut st,
        );
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "Kubernetes//Pod/shop/other",
                "shop/other.shop.svc.cluster.local"
            ]
        );
        assert!(
            st.workload_by_uid(&w.uid).is_some(),
            "the well-named one is kept"
        );
        assert!(st.service_by_vip(svc.vips[0]).is_none());
    }
}
