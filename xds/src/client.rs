//! The delta ADS client every Weft proxy runs: one stream to the controller,
//! reconnecting with backoff, with one [`Handler`] per resource type.
//!
//! The client owns the protocol: it subscribes to each registered type
//! (sending the versions it holds, so a reconnect gets only what changed),
//! decodes each resource into the type's message, hands the batch to the
//! handler, records the version of what the handler accepted, and ACKs the
//! response or NACKs it with the handler's reasons. A rejected resource keeps
//! its previous version; the controller offers it again once it changes, or
//! on the next stream (the versions announced then are the ones held).
//! Handlers own the state: they decide what a resource means and what the
//! proxy serves.
//!
//! A push in parts (see [`crate::END_OF_STATE_FEATURE`]) is ACKed part by
//! part and applied whole at its last part. Parts of a stream that broke
//! are dropped: the next stream announces only what was applied.
//!
//! While the controller is away the handlers' last state keeps serving.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Resource, Status,
};

const BACKOFF_START: Duration = Duration::from_millis(100);
/// Most resources held back in the parts of one push: a server that never
/// ends its push is cut off rather than let to fill memory.
const MAX_PENDING_RESOURCES: usize = 2_000_000;
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// One change to one resource, decoded.
#[derive(Debug)]
pub enum Update<T> {
    /// A new or changed resource.
    Upsert { name: String, resource: T },
    /// The controller removed it.
    Remove { name: String },
}

/// A resource the handler refused: it is NACKed and keeps its previous version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.reason)
    }
}

/// Applies one resource type's updates to the proxy's state.
pub trait Handler<T>: Send + 'static {
    /// Applies a response's worth of updates, in order. Good updates are
    /// applied even when others are refused; the refused ones are returned.
    fn handle(&mut self, updates: Vec<Update<T>>) -> Vec<Rejected>;
}

impl<T, F> Handler<T> for F
where
    F: FnMut(Vec<Update<T>>) -> Vec<Rejected> + Send + 'static,
{
    fn handle(&mut self, updates: Vec<Update<T>>) -> Vec<Rejected> {
        self(updates)
    }
}

/// A handler with its message type erased, plus the versions it holds.
trait TypeHandler: Send {
    /// Applies the updates of `parts`, in order, as one batch.
    fn apply(&mut self, parts: &[DeltaDiscoveryResponse]) -> Vec<Rejected>;
}

struct Typed<T, H> {
    handler: H,
    _message: PhantomData<fn() -> T>,
}

impl<T: prost::Message + Default, H: Handler<T>> TypeHandler for Typed<T, H> {
    fn apply(&mut self, parts: &[DeltaDiscoveryResponse]) -> Vec<Rejected> {
        let mut rejected = Vec::new();
        let mut updates = Vec::new();
        for part in parts {
            decode_into(
                &part.resources,
                &part.removed_resources,
                &mut updates,
                &mut rejected,
            );
        }
        rejected.extend(self.handler.handle(updates));
        rejected
    }
}

/// Decodes one response's resources and removals onto `updates`; what does
/// not decode goes to `rejected`.
fn decode_into<T: prost::Message + Default>(
    resources: &[Resource],
    removed: &[String],
    updates: &mut Vec<Update<T>>,
    rejected: &mut Vec<Rejected>,
) {
    for r in resources {
        let value = r
            .resource
            .as_ref()
            .map(|a| &a.value[..])
            .unwrap_or_default();
        match T::decode(value) {
            Ok(resource) => updates.push(Update::Upsert {
                name: r.name.clone(),
                resource,
            }),
            Err(e) => rejected.push(Rejected {
                name: r.name.clone(),
                reason: format!("cannot decode: {e}"),
            }),
        }
    }
    updates.extend(
        removed
            .iter()
            .map(|name| Update::Remove { name: name.clone() }),
    );
}

struct Registered {
    type_url: &'static str,
    handler: Box<dyn TypeHandler>,
    /// Name → version of every resource the handler holds.
    held: BTreeMap<String, String>,
    /// The parts of a push received so far (marked partial), ACKed but not
    /// yet applied: a push in parts is applied whole, at its last part, so
    /// the proxy never serves half of it, and applies it once.
    pending: Vec<DeltaDiscoveryResponse>,
}

impl Registered {
    /// Applies the pending parts and `resp` as one batch, and records what
    /// was accepted.
    fn apply(&mut self, resp: DeltaDiscoveryResponse) -> Vec<Rejected> {
        let mut parts = std::mem::take(&mut self.pending);
        parts.push(resp);
        let rejected = self.handler.apply(&parts);
        let refused: std::collections::HashSet<&str> =
            rejected.iter().map(|x| x.name.as_str()).collect();
        for part in &parts {
            for r in &part.resources {
                if !refused.contains(r.name.as_str()) {
                    self.held.insert(r.name.clone(), r.version.clone());
                }
            }
            for name in &part.removed_resources {
                self.held.remove(name);
            }
        }
        rejected
    }
}

/// The client: build it with [`AdsClient::new`] and [`AdsClient::handle`],
/// then spawn [`AdsClient::run`].
pub struct AdsClient {
    channel: Channel,
    token_path: PathBuf,
    node: Node,
    types: Vec<Registered>,
    synced: Arc<AtomicBool>,
}

impl fmt::Debug for AdsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types: Vec<&str> = self.types.iter().map(|t| t.type_url).collect();
        f.debug_struct("AdsClient")
            .field("node", &self.node.id)
            .field("types", &types)
            .finish()
    }
}

impl AdsClient {
    /// A client that identifies as `node` and reads its bearer token from
    /// `token_path` at each connect (so a rotated token is picked up).
    pub fn new(channel: Channel, token_path: PathBuf, node: Node) -> Self {
        AdsClient {
            channel,
            token_path,
            node,
            types: Vec::new(),
            synced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Subscribes to `type_url`, decoding its resources as `T` for `handler`.
    /// Types are subscribed in the order they are added.
    #[must_use]
    pub fn handle<T, H>(mut self, type_url: &'static str, handler: H) -> Self
    where
        T: prost::Message + Default + 'static,
        H: Handler<T>,
    {
        self.types.push(Registered {
            type_url,
            handler: Box::new(Typed {
                handler,
                _message: PhantomData,
            }),
            held: BTreeMap::new(),
            pending: Vec::new(),
        });
        self
    }

    /// Set once the whole first state of every type has been applied (the
    /// end of a push that came in parts, see [`crate::END_OF_STATE_FEATURE`]);
    /// stays set across reconnects (the last state keeps serving).
    pub fn synced(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    /// Runs forever: one stream at a time, reconnecting with backoff
    /// (100 ms doubling to 15 s; back to 100 ms after a stream that made progress).
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

    /// One stream. Returns whether any response was applied, and the error.
    async fn session(&mut self) -> Result<bool, (bool, String)> {
        // Parts of a push the previous stream did not finish: never
        // applied, and not announced as held, so the next push has them
        // (or their removal) as they are now.
        for t in &mut self.types {
            t.pending.clear();
        }
        let token = std::fs::read_to_string(&self.token_path).map_err(|e| {
            (
                false,
                format!("cannot read token {}: {e}", self.token_path.display()),
            )
        })?;
        let (tx, rx) = mpsc::channel(self.types.len() + 16);
        let subscribe: Vec<DeltaDiscoveryRequest> = self
            .types
            .iter()
            .map(|t| DeltaDiscoveryRequest {
                node: Some(self.node.clone()),
                type_url: t.type_url.to_string(),
                initial_resource_versions: t.held.clone(),
                ..DeltaDiscoveryRequest::default()
            })
            .collect();
        for req in subscribe {
            let _ = tx.send(req).await;
        }
        let mut stream =
            crate::grpc::delta_ads(self.channel.clone(), token.trim(), ReceiverStream::new(rx))
                .await
                .map_err(|s| (false, format!("{:?}: {}", s.code(), s.message())))?;
        info!(component = "xds", "connected to the controller");
        let mut progressed = false;
        let mut answered: Vec<&'static str> = Vec::new();
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return Ok(progressed),
                Err(s) => return Err((progressed, format!("{:?}: {}", s.code(), s.message()))),
            };
            progressed = true;
            let Some(t) = self.types.iter_mut().find(|t| t.type_url == resp.type_url) else {
                // Not asked for: refuse it whole, hold nothing.
                let ack = nack(&resp, format!("type {} was not subscribed", resp.type_url));
                if tx.send(ack).await.is_err() {
                    return Ok(progressed);
                }
                continue;
            };
            // Part of a larger push: held (and ACKed) until its last part,
            // then applied whole. Until then the state of this type is not
            // whole, and a proxy that served from half of it could pass
            // traffic a policy in the other half forbids.
            if resp.system_version_info == crate::PARTIAL {
                let held_back: usize = t.pending.iter().map(|p| p.resources.len()).sum();
                if held_back + resp.resources.len() > MAX_PENDING_RESOURCES {
                    t.pending.clear();
                    return Err((
                        progressed,
                        format!(
                            "{}: a push in parts passed {MAX_PENDING_RESOURCES} resources without an end",
                            resp.type_url
                        ),
                    ));
                }
                let reply = ack(&resp);
                t.pending.push(resp);
                if tx.send(reply).await.is_err() {
                    return Ok(progressed);
                }
                continue;
            }
            let mut reply = ack(&resp);
            let (updated, removed) = (resp.resources.len(), resp.removed_resources.len());
            let rejected = t.apply(resp);
            debug!(
                component = "xds",
                type_url = %reply.type_url,
                updated,
                removed,
                rejected = rejected.len(),
                "applied"
            );
            if !rejected.is_empty() {
                let message = rejected
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                warn!(component = "xds", type_url = %reply.type_url, %message, "NACK: keeping the previous version of these resources");
                reply.error_detail = Some(Status {
                    code: 0,
                    message,
                    details: Vec::new(),
                });
            }
            let type_url = t.type_url;
            if tx.send(reply).await.is_err() {
                return Ok(progressed);
            }
            if !answered.contains(&type_url) {
                answered.push(type_url);
                if self.types.iter().all(|t| answered.contains(&t.type_url))
                    && !self.synced.swap(true, Ordering::AcqRel)
                {
                    info!(component = "xds", "initial config received");
                }
            }
        }
    }
}

fn ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: resp.type_url.clone(),
        response_nonce: resp.nonce.clone(),
        ..DeltaDiscoveryRequest::default()
    }
}

fn nack(resp: &DeltaDiscoveryResponse, message: String) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(Status {
            code: 0,
            message,
            details: Vec::new(),
        }),
        ..ack(resp)
    }
}

/// The `Node` a proxy sends: its id and `NODE_NAME` metadata, as Istio's
/// proxies fill them (istiod reads the node name from the metadata), and
/// that it understands the end-of-state marker.
pub fn node(id: String, node_name: &str) -> Node {
    Node {
        id,
        cluster: String::new(),
        metadata: Some(prost_types::Struct {
            fields: [(
                "NODE_NAME".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(node_name.to_string())),
                },
            )]
            .into(),
        }),
        client_features: vec![crate::END_OF_STATE_FEATURE.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::discovery::SharedAny;
    use crate::proto::security::Authorization;
    use prost::Message;

    fn resource(name: &str, version: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.to_string(),
            version: version.to_string(),
            resource: Some(SharedAny {
                type_url: String::new(),
                value: value.into(),
            }),
            aliases: Vec::new(),
        }
    }

    /// A handler that refuses names starting with "bad" and records the rest.
    fn registered(seen: Arc<std::sync::Mutex<Vec<String>>>) -> Registered {
        let handler = move |updates: Vec<Update<Authorization>>| {
            let mut rejected = Vec::new();
            for u in updates {
                match u {
                    Update::Upsert { name, .. } if name.starts_with("bad") => {
                        rejected.push(Rejected {
                            name,
                            reason: "refused".into(),
                        })
                    }
                    Update::Upsert { name, .. } => seen.lock().unwrap().push(format!("+{name}")),
                    Update::Remove { name } => seen.lock().unwrap().push(format!("-{name}")),
                }
            }
            rejected
        };
        Registered {
            type_url: "t",
            handler: Box::new(Typed {
                handler,
                _message: PhantomData,
            }),
            held: BTreeMap::new(),
            pending: Vec::new(),
        }
    }

    #[test]
    fn accepted_versions_are_held_and_refused_ones_keep_the_previous() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut t = registered(seen.clone());
        let good = Authorization::default().encode_to_vec();
        let first = DeltaDiscoveryResponse {
            resources: vec![
                resource("a", "1", good.clone()),
                resource("bad", "1", good.clone()),
            ],
            ..Default::default()
        };
        assert_eq!(t.apply(first).len(), 1);
        assert_eq!(t.held, BTreeMap::from([("a".into(), "1".into())]));

        // Undecodable bytes are refused before the handler sees them.
        let second = DeltaDiscoveryResponse {
            resources: vec![resource("a", "2", vec![0xff, 0xff, 0xff])],
            removed_resources: vec!["gone".into()],
            ..Default::default()
        };
        let rejected = t.apply(second);
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].reason.contains("cannot decode"), "{rejected:?}");
        assert_eq!(
            t.held["a"], "1",
            "the refused update keeps the held version"
        );
        assert_eq!(*seen.lock().unwrap(), vec!["+a", "-gone"]);

        let third = DeltaDiscoveryResponse {
            removed_resources: vec!["a".into()],
            ..Default::default()
        };
        assert!(t.apply(third).is_empty());
        assert!(t.held.is_empty());

        // Parts held back are applied with the last one, in order, as one
        // batch; what was refused in any part is in its NACK.
        seen.lock().unwrap().clear();
        t.pending = vec![
            DeltaDiscoveryResponse {
                resources: vec![resource("b", "1", good.clone())],
                ..Default::default()
            },
            DeltaDiscoveryResponse {
                resources: vec![resource("bad2", "1", good.clone())],
                ..Default::default()
            },
        ];
        let last = DeltaDiscoveryResponse {
            resources: vec![resource("c", "1", good.clone())],
            removed_resources: vec!["b".into()],
            ..Default::default()
        };
        let rejected = t.apply(last);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(*seen.lock().unwrap(), vec!["+b", "+c", "-b"]);
        assert_eq!(t.held, BTreeMap::from([("c".into(), "1".into())]));
        assert!(t.pending.is_empty());
    }
}
