//! The delta xDS client: subscribes to workloads, services and policies,
//! applies each response resource by resource, ACKs or NACKs it, and keeps
//! serving the last good state while the controller is away.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};
use weft_api::{Authorization, LocalConfig, Service};
use weft_xds::convert::{self, XdsWorkload};
use weft_xds::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use weft_xds::proto::{security, workload};
use weft_xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, TYPES};

use crate::metrics::Metrics;
use crate::state::Store;

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
enum AddressEntry {
    Workload(XdsWorkload),
    Service(Service),
}

/// Accepted resources with their versions.
#[derive(Debug, Default)]
pub struct Cache {
    addresses: BTreeMap<String, (String, AddressEntry)>,
    policies: BTreeMap<String, (String, Authorization)>,
}

impl Cache {
    /// Applies one response. Good resources are applied even when others in
    /// the same response are refused; the refusals are returned for the NACK
    /// and the previous version of each refused resource stays.
    pub fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Applied {
        let mut errors = Vec::new();
        let mut narrowed = Vec::new();
        for r in &resp.resources {
            let value = r
                .resource
                .as_ref()
                .map(|a| &a.value[..])
                .unwrap_or_default();
            match resp.type_url.as_str() {
                ADDRESS_TYPE => match decode_address(&r.name, value) {
                    Ok(entry) => {
                        self.addresses
                            .insert(r.name.clone(), (r.version.clone(), entry));
                    }
                    Err(e) => errors.push(e),
                },
                AUTHORIZATION_TYPE => {
                    let decoded = security::Authorization::decode(value)
                        .map_err(|e| format!("authorization {}: {e}", r.name))
                        .and_then(|m| {
                            convert::authorization_from_proto(&r.name, m).map_err(|e| e.to_string())
                        });
                    match decoded {
                        Ok((p, unenforceable)) => {
                            narrowed.extend(unenforceable.iter().map(ToString::to_string));
                            self.policies.insert(r.name.clone(), (r.version.clone(), p));
                        }
                        Err(e) => errors.push(e),
                    }
                }
                other => errors.push(format!("unexpected type {other}")),
            }
        }
        for name in &resp.removed_resources {
            match resp.type_url.as_str() {
                ADDRESS_TYPE => {
                    self.addresses.remove(name);
                }
                AUTHORIZATION_TYPE => {
                    self.policies.remove(name);
                }
                _ => {}
            }
        }
        Applied { errors, narrowed }
    }

    /// What the proxy indexes.
    pub fn config(&self) -> LocalConfig {
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for (_, entry) in self.addresses.values() {
            match entry {
                AddressEntry::Workload(w) => workloads.push(w),
                AddressEntry::Service(s) => services.push(s),
            }
        }
        convert::assemble(workloads, services, self.policies.values().map(|(_, p)| p))
    }

    /// Name → version of what we hold of `type_url`, for a reconnect.
    fn versions(&self, type_url: &str) -> BTreeMap<String, String> {
        match type_url {
            ADDRESS_TYPE => self
                .addresses
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
            _ => self
                .policies
                .iter()
                .map(|(n, (v, _))| (n.clone(), v.clone()))
                .collect(),
        }
    }
}

fn decode_address(name: &str, value: &[u8]) -> Result<AddressEntry, String> {
    let addr = workload::Address::decode(value).map_err(|e| format!("address {name}: {e}"))?;
    match addr.r#type {
        Some(workload::address::Type::Workload(w)) => convert::workload_from_proto(name, w)
            .map(AddressEntry::Workload)
            .map_err(|e| e.to_string()),
        Some(workload::address::Type::Service(s)) => convert::service_from_proto(name, s)
            .map(AddressEntry::Service)
            .map_err(|e| e.to_string()),
        None => Err(format!("address {name}: neither workload nor service")),
    }
}

/// What applying one response did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Resources refused (NACKed); their previous version stays.
    pub errors: Vec<String>,
    /// Policy conditions ztunnel cannot enforce, applied in the safe direction.
    pub narrowed: Vec<String>,
}

/// The client: one stream at a time, reconnecting with backoff.
#[derive(Debug)]
pub struct XdsClient {
    pub channel: Channel,
    pub token_path: PathBuf,
    pub node_name: String,
    pub state: Arc<Store>,
    /// Set once a first response of every type has been applied.
    pub synced: Arc<AtomicBool>,
    pub cache: Cache,
    pub metrics: Arc<Metrics>,
}

impl XdsClient {
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_START;
        loop {
            let progressed = match self.session().await {
                Ok(p) => {
                    info!(
                        component = "xds",
                        "stream closed by the controller; reconnecting"
                    );
                    p
                }
                Err((p, e)) => {
                    warn!(component = "xds", error = %e, retry_in = ?backoff, "controller unavailable; serving the last good state");
                    p
                }
            };
            if progressed {
                backoff = BACKOFF_START;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn node(&self) -> Node {
        Node {
            id: format!(
                "ztunnel~0.0.0.0~ztunnel-{0}.istio-system~istio-system.svc.cluster.local",
                self.node_name
            ),
            cluster: String::new(),
            metadata: Some(prost_types::Struct {
                fields: [(
                    "NODE_NAME".to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(
                            self.node_name.clone(),
                        )),
                    },
                )]
                .into(),
            }),
        }
    }

    /// One stream. Returns whether any response was applied, and the error.
    async fn session(&mut self) -> Result<bool, (bool, String)> {
        let token = std::fs::read_to_string(&self.token_path).map_err(|e| {
            (
                false,
                format!("cannot read token {}: {e}", self.token_path.display()),
            )
        })?;
        let (tx, rx) = mpsc::channel(16);
        for ty in TYPES {
            let req = DeltaDiscoveryRequest {
                node: Some(self.node()),
                type_url: ty.to_string(),
                initial_resource_versions: self.cache.versions(ty),
                ..DeltaDiscoveryRequest::default()
            };
            let _ = tx.send(req).await;
        }
        let mut stream =
            weft_xds::grpc::delta_ads(self.channel.clone(), token.trim(), ReceiverStream::new(rx))
                .await
                .map_err(|s| (false, format!("{:?}: {}", s.code(), s.message())))?;
        info!(component = "xds", "connected to the controller");
        let mut progressed = false;
        let mut synced: Vec<String> = Vec::new();
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(progressed),
                Err(s) => return Err((progressed, format!("{:?}: {}", s.code(), s.message()))),
            };
            progressed = true;
            let Applied { errors, narrowed } = self.cache.apply(&resp);
            for what in &narrowed {
                warn!(component = "xds", message = %what, "policy condition not enforceable; applied in the safe direction");
                self.metrics.unenforceable.inc();
            }
            self.state.replace(self.cache.config());
            debug!(
                component = "xds",
                type_url = %resp.type_url,
                updated = resp.resources.len(),
                removed = resp.removed_resources.len(),
                "applied"
            );
            let error_detail = if errors.is_empty() {
                None
            } else {
                let message = errors.join("; ");
                warn!(component = "xds", type_url = %resp.type_url, %message, "NACK: keeping the previous version of these resources");
                Some(Status {
                    code: 0,
                    message,
                    details: Vec::new(),
                })
            };
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail,
                ..DeltaDiscoveryRequest::default()
            };
            if tx.send(ack).await.is_err() {
                return Ok(progressed);
            }
            if !synced.contains(&resp.type_url) {
                synced.push(resp.type_url.clone());
                if TYPES.iter().all(|t| synced.iter().any(|s| s == t))
                    && !self.synced.swap(true, Ordering::AcqRel)
                {
                    info!(component = "xds", "initial config received");
                }
            }
        }
    }
}
