//! ztunnel's xDS handlers: workloads and services (`istio.workload.Address`)
//! and L4 policies (`istio.security.Authorization`), kept in one [`Cache`]
//! that is re-indexed into the proxy's [`Store`] after each response. The
//! protocol (subscribe, reconnect, ACK/NACK) is `weft_xds::client`'s.

use std::collections::{BTreeMap, HashMap};
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

/// One Address resource as held: shared with every state built from it.
#[derive(Clone, Debug)]
enum AddressEntry {
    /// A workload and the services it backs (`namespace/hostname` →
    /// service port → target port).
    Workload(Arc<Workload>, BTreeMap<String, BTreeMap<u16, u16>>),
    /// A service as received, its endpoints filled in by [`Cache::state`].
    Service(Arc<Service>),
}

/// Accepted resources, by name.
#[derive(Debug, Default)]
pub struct Cache {
    addresses: BTreeMap<String, AddressEntry>,
    policies: BTreeMap<String, Arc<Authorization>>,
}

impl Cache {
    fn apply_addresses(&mut self, updates: Vec<Update<workload::Address>>) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        for u in updates {
            match u {
                Update::Upsert { name, resource } => match address_entry(&name, resource) {
                    Ok(entry) => {
                        self.addresses.insert(name, entry);
                    }
                    Err(reason) => rejected.push(Rejected { name, reason }),
                },
                Update::Remove { name } => {
                    self.addresses.remove(&name);
                }
            }
        }
        rejected
    }

    /// Applies policies; also returns the conditions ztunnel cannot enforce
    /// (applied in the safe direction).
    fn apply_policies(
        &mut self,
        updates: Vec<Update<security::Authorization>>,
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
        (rejected, narrowed)
    }

    /// What the proxy indexes.
    /// The proxies' state: the held objects shared, not copied (a service
    /// is copied only to carry its endpoints), and indexed afresh.
    pub fn state(&self) -> State {
        let mut endpoints: HashMap<&str, Vec<Endpoint>> = HashMap::new();
        let mut workloads = Vec::new();
        for entry in self.addresses.values() {
            if let AddressEntry::Workload(w, backs) = entry {
                for (key, ports) in backs {
                    endpoints.entry(key.as_str()).or_default().push(Endpoint {
                        workload_uid: w.uid.clone(),
                        ports: ports.clone(),
                    });
                }
                workloads.push(w.clone());
            }
        }
        let services = self
            .addresses
            .values()
            .filter_map(|entry| match entry {
                AddressEntry::Service(svc) => Some(svc),
                AddressEntry::Workload(..) => None,
            })
            .map(|svc| {
                let endpoints = endpoints
                    .remove(convert::service_key(svc).as_str())
                    .unwrap_or_default();
                Arc::new(Service {
                    endpoints,
                    ..(**svc).clone()
                })
            })
            .collect();
        State::shared(workloads, services, self.policies.values().cloned().collect())
    }
}

fn address_entry(name: &str, addr: workload::Address) -> Result<AddressEntry, String> {
    match addr.r#type {
        Some(workload::address::Type::Workload(w)) => convert::workload_from_proto(name, w)
            .map(|XdsWorkload { workload, services }| {
                AddressEntry::Workload(Arc::new(workload), services)
            })
            .map_err(|e| e.to_string()),
        Some(workload::address::Type::Service(s)) => convert::service_from_proto(name, s)
            .map(|s| AddressEntry::Service(Arc::new(s)))
            .map_err(|e| e.to_string()),
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
        let rejected = cache.apply_addresses(updates);
        addr_state.install(cache.state());
        addr_metrics
            .xds_apply
            .get_or_create(&XdsLabels { r#type: "address" })
            .observe(started.elapsed().as_secs_f64());
        rejected
    };
    let policies = move |updates: Vec<Update<security::Authorization>>| {
        let started = Instant::now();
        let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
        let (rejected, narrowed) = cache.apply_policies(updates);
        for what in &narrowed {
            warn!(component = "xds", message = %what, "policy condition not enforceable; applied in the safe direction");
            metrics.unenforceable.inc();
        }
        state.install(cache.state());
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
