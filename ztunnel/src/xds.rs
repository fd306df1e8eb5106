//! ztunnel's xDS handlers: workloads and services (`istio.workload.Address`)
//! and L4 policies (`istio.security.Authorization`), kept in one [`Cache`]
//! that is re-indexed into the proxy's [`Store`] after each response. The
//! protocol (subscribe, reconnect, ACK/NACK) is `weft_xds::client`'s.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tonic::transport::Channel;
use tracing::warn;
use weft_api::{Authorization, LocalConfig, Service};
use weft_xds::client::{AdsClient, Rejected, Update};
use weft_xds::convert::{self, XdsWorkload};
use weft_xds::proto::{security, workload};
use weft_xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

use crate::metrics::{Metrics, XdsLabels};
use crate::state::Store;

#[derive(Clone, Debug)]
enum AddressEntry {
    Workload(XdsWorkload),
    Service(Service),
}

/// Accepted resources, by name.
#[derive(Debug, Default)]
pub struct Cache {
    addresses: BTreeMap<String, AddressEntry>,
    policies: BTreeMap<String, Authorization>,
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
                            self.policies.insert(name, p);
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
    pub fn config(&self) -> LocalConfig {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for entry in self.addresses.values() {
            match entry {
                AddressEntry::Workload(w) => workloads.push(w),
                AddressEntry::Service(s) => services.push(s),
            }
        }
        convert::assemble(workloads, services, self.policies.values())
    }
}

fn address_entry(name: &str, addr: workload::Address) -> Result<AddressEntry, String> {
    match addr.r#type {
        Some(workload::address::Type::Workload(w)) => convert::workload_from_proto(name, w)
            .map(AddressEntry::Workload)
            .map_err(|e| e.to_string()),
        Some(workload::address::Type::Service(s)) => convert::service_from_proto(name, s)
            .map(AddressEntry::Service)
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
        addr_state.replace(cache.config());
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
        state.replace(cache.config());
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
