//! Serving the data plane: the delta ADS stream and the CA call.
//!
//! The translated config is published as a [`Published`] set of versioned
//! resources. Each ADS stream remembers which version of each resource its
//! client holds and, on every publish, sends only what differs: changed and
//! new resources, and the names of removed ones.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use weft_api::{Identity, LocalConfig, Service, Workload};
use weft_xds::convert::{
    AddressInput, address_alias, authorization_to_proto, backs_index, service_key,
};
use weft_xds::grpc::{ControlPlane, bearer_token};
use weft_xds::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use weft_xds::proto::discovery::SharedAny as Any;
use weft_xds::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use weft_xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE, to_any, types, version_of};

use crate::auth::{AuthError, Authenticator, Caller};
use crate::ca::MeshCa;
use crate::metrics::{CertOutcome, Metrics};
use crate::routes::L7Resource;
use weft_hbone::ca::VerifiedCsr;

/// One resource as served.
#[derive(Debug)]
pub struct Versioned {
    pub version: String,
    pub any: Any,
    /// Other names it is known by (an Address's `network/ip`s), sent as
    /// `Resource.aliases` as istiod does.
    pub aliases: Vec<String>,
    /// Who may see it beyond its type's audience: `None` everyone the type
    /// is for; else only these workload identities (the waypoints that
    /// serve what it is about).
    pub scope: Option<BTreeSet<Identity>>,
    /// The generation that first published this version.
    pub generation: u64,
}

impl Versioned {
    fn visible_to(&self, caller: &Caller) -> bool {
        match (&self.scope, caller) {
            (None, _) => true,
            (Some(ids), Caller::Workload { identity }) => ids.contains(identity),
            (Some(_), Caller::Node { .. }) => false,
        }
    }
}

/// What on-demand Address subscriptions resolve through, as istiod serves
/// Istio's ztunnel with `XDS_ON_DEMAND=true`: a node's own workloads unasked,
/// names by uid, `network/ip` or `namespace/hostname`, and a service's
/// workloads with it.
#[derive(Debug, Default)]
pub struct OnDemand {
    /// `network/ip` → the Address resources at that address.
    by_address: BTreeMap<String, BTreeSet<String>>,
    /// Node → its workloads' resource names.
    by_node: BTreeMap<String, BTreeSet<String>>,
    /// Service resource name → the workloads behind it.
    behind: BTreeMap<String, BTreeSet<String>>,
}

impl OnDemand {
    fn build(cfg: &LocalConfig) -> Self {
        let mut index = OnDemand::default();
        for w in &cfg.workloads {
            index
                .by_node
                .entry(w.node.clone())
                .or_default()
                .insert(w.uid.clone());
            for ip in &w.addresses {
                index
                    .by_address
                    .entry(address_alias(ip))
                    .or_default()
                    .insert(w.uid.clone());
            }
        }
        for svc in &cfg.services {
            let key = service_key(svc);
            for vip in &svc.vips {
                index
                    .by_address
                    .entry(address_alias(vip))
                    .or_default()
                    .insert(key.clone());
            }
            let behind = svc.endpoints.iter().map(|ep| ep.workload_uid.clone());
            index.behind.entry(key).or_default().extend(behind);
        }
        index
    }

    /// The Address resources `node`'s subscription to `names` covers.
    fn resolve(&self, node: &str, names: &BTreeSet<String>) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.by_node.get(node).cloned().unwrap_or_default();
        for name in names {
            let direct = std::iter::once(name);
            let aliased = self.by_address.get(name).into_iter().flatten();
            for resource in direct.chain(aliased) {
                out.insert(resource.clone());
                out.extend(self.behind.get(resource).into_iter().flatten().cloned());
            }
        }
        out
    }
}

/// Everything the control plane serves at one moment.
#[derive(Debug, Default)]
pub struct Published {
    /// Type URL → resource name → resource.
    pub resources: BTreeMap<&'static str, BTreeMap<String, Arc<Versioned>>>,
    /// What it was built from (its workloads and services are shared).
    config: LocalConfig,
    /// Node → identities of the pods on it: made when first asked for.
    identities: OnceLock<BTreeMap<String, BTreeSet<Identity>>>,
    /// Counts publishes; `changes` is relative to generation - 1.
    pub generation: u64,
    /// Type URL → names added, changed or removed since the previous generation.
    pub changes: BTreeMap<&'static str, BTreeSet<String>>,
    /// How on-demand Address subscriptions resolve: made when first asked for.
    on_demand: OnceLock<OnDemand>,
    /// Type URL → name → the generation that removed it, for removals after
    /// `horizon`: what a client known to hold an earlier generation lacks.
    pub tombstones: BTreeMap<&'static str, HashMap<String, u64>>,
    /// Removals at or before this generation are forgotten.
    pub horizon: u64,
}

/// How many generations a removal is remembered. A client that fell further
/// behind (a stream stuck that long) is asked to reconnect, and resyncs
/// from the versions it then announces.
const TOMBSTONE_GENERATIONS: u64 = 1024;

impl Published {
    /// Encodes `cfg`, reusing the previous resource where the bytes are unchanged.
    /// How many resources this publish changed (added, updated or removed).
    pub fn changed(&self) -> usize {
        self.changes.values().map(BTreeSet::len).sum()
    }

    /// `previous_cfg` is what `previous` was built from, if known: a
    /// resource whose input is unchanged keeps its encoded bytes, unencoded.
    pub fn build(
        cfg: &LocalConfig,
        l7: &[L7Resource],
        previous: &Published,
        previous_cfg: Option<&LocalConfig>,
    ) -> Self {
        // Each type's resources, collected, then made a map at once (the
        // Address ones come nearly in name order: cheap to sort).
        let mut collected: BTreeMap<&'static str, Vec<(String, Arc<Versioned>)>> = BTreeMap::new();
        let mut changes: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
        let generation = previous.generation + 1;
        let mut put = |ty: &'static str,
                       name: &String,
                       any: Any,
                       aliases: Vec<String>,
                       scope: Option<BTreeSet<Identity>>|
         -> Arc<Versioned> {
            // Who may see it is part of its version: a change of scope is
            // pushed like a change of content.
            let version = match &scope {
                None => version_of(&any.value),
                Some(ids) => {
                    let mut bytes = any.value.to_vec();
                    for id in ids {
                        bytes.extend_from_slice(id.to_string().as_bytes());
                        bytes.push(0);
                    }
                    version_of(&bytes)
                }
            };
            let reused = previous
                .resources
                .get(ty)
                .and_then(|m| m.get(name))
                .filter(|v| v.version == version)
                .cloned();
            reused.unwrap_or_else(|| {
                changes.entry(ty).or_default().insert(name.clone());
                Arc::new(Versioned {
                    version,
                    any,
                    aliases,
                    scope,
                    generation,
                })
            })
        };
        // Address resources made from the same workload or service as
        // before, backing the same services, are taken over as they are:
        // no conversion, no encoding, no hashing, not even a comparison.
        let same = previous_cfg.and_then(|before| Unchanged::between(before, cfg));
        let previous_addresses = previous.resources.get(ADDRESS_TYPE);
        // Kept or made again, in the config's order: of two resources with
        // one name, the later wins, as in a build from nothing.
        let kept: Vec<Option<&Arc<Versioned>>> = cfg
            .workloads
            .iter()
            .map(|w| {
                previous_addresses
                    .and_then(|m| m.get(&w.uid))
                    .filter(|_| same.as_ref().is_some_and(|u| u.workload(w)))
            })
            .collect();
        // The services each workload to encode backs: one pass over the
        // endpoints, for those workloads only.
        let wanted: HashSet<&str> = cfg
            .workloads
            .iter()
            .zip(&kept)
            .filter(|(_, k)| k.is_none())
            .map(|(w, _)| w.uid.as_str())
            .collect();
        let backs = if wanted.is_empty() {
            HashMap::new()
        } else {
            backs_index(cfg, |uid| wanted.contains(uid))
        };
        let mut addresses = Vec::with_capacity(cfg.workloads.len() + cfg.services.len());
        for (w, kept) in cfg.workloads.iter().zip(kept) {
            let v = match kept {
                Some(v) => v.clone(),
                None => {
                    let backs = backs.get(w.uid.as_str()).cloned().unwrap_or_default();
                    let input = AddressInput::Workload(w, backs);
                    let any = to_any(ADDRESS_TYPE, &input.to_proto());
                    put(ADDRESS_TYPE, &w.uid, any, input.aliases(), None)
                }
            };
            addresses.push((w.uid.clone(), v));
        }
        for svc in &cfg.services {
            let name = service_key(svc);
            let kept = previous_addresses
                .and_then(|m| m.get(&name))
                .filter(|_| same.as_ref().is_some_and(|u| u.service(&name, svc)));
            let v = match kept {
                Some(v) => v.clone(),
                None => {
                    let input = AddressInput::Service(svc);
                    let any = to_any(ADDRESS_TYPE, &input.to_proto());
                    put(ADDRESS_TYPE, &name, any, input.aliases(), None)
                }
            };
            addresses.push((name, v));
        }
        collected.insert(ADDRESS_TYPE, addresses);
        for p in &cfg.policies {
            let (name, msg) = authorization_to_proto(p);
            let any = to_any(AUTHORIZATION_TYPE, &msg);
            let v = put(AUTHORIZATION_TYPE, &name, any, Vec::new(), None);
            collected
                .entry(AUTHORIZATION_TYPE)
                .or_default()
                .push((name, v));
        }
        for r in l7 {
            let (ty, name, any, scope) = match r {
                L7Resource::Route(name, m, scope) => {
                    let ty = types::ROUTE.type_url;
                    (ty, name, to_any(ty, m), scope)
                }
                L7Resource::Destination(name, m, scope) => {
                    let ty = types::DESTINATION.type_url;
                    (ty, name, to_any(ty, m), scope)
                }
                L7Resource::Authorization(name, m, scope) => {
                    let ty = types::L7_AUTHORIZATION.type_url;
                    (ty, name, to_any(ty, m), scope)
                }
                L7Resource::Telemetry(name, m, scope) => {
                    let ty = types::TELEMETRY.type_url;
                    (ty, name, to_any(ty, m), scope)
                }
            };
            let v = put(ty, name, any, Vec::new(), Some(scope.clone()));
            collected.entry(ty).or_default().push((name.clone(), v));
        }
        let resources: BTreeMap<&'static str, BTreeMap<String, Arc<Versioned>>> = collected
            .into_iter()
            .map(|(ty, mut all)| {
                // Sorted stably: of two resources with one name, the last
                // made wins, as a map fed one by one would keep. Sorted and
                // unique, the map is built in one pass.
                all.sort_by(|a, b| a.0.cmp(&b.0));
                all.dedup_by(|later, kept| {
                    let same = later.0 == kept.0;
                    if same {
                        std::mem::swap(later, kept);
                    }
                    same
                });
                (ty, all.into_iter().collect())
            })
            .collect();
        let horizon = generation.saturating_sub(TOMBSTONE_GENERATIONS);
        let mut tombstones = previous.tombstones.clone();
        for (ty, gone) in &mut tombstones {
            let new = resources.get(ty);
            gone.retain(|name, at| *at > horizon && !new.is_some_and(|n| n.contains_key(name)));
        }
        for (ty, old) in &previous.resources {
            // Both maps in name order: walked side by side, not looked up.
            let mut new = resources
                .get(ty)
                .into_iter()
                .flat_map(|m| m.keys())
                .peekable();
            for name in old.keys() {
                while new.next_if(|n| *n < name).is_some() {}
                if new.peek() != Some(&name) {
                    changes.entry(ty).or_default().insert(name.clone());
                    tombstones
                        .entry(ty)
                        .or_default()
                        .insert(name.clone(), generation);
                }
            }
        }
        Published {
            resources,
            config: cfg.clone(),
            identities: OnceLock::new(),
            generation,
            changes,
            on_demand: OnceLock::new(),
            tombstones,
            horizon,
        }
    }

    /// Node → identities of the pods on it: what that node's agent may get
    /// certificates for.
    pub fn identities(&self) -> &BTreeMap<String, BTreeSet<Identity>> {
        self.identities.get_or_init(|| {
            let mut identities: BTreeMap<String, BTreeSet<Identity>> = BTreeMap::new();
            for w in &self.config.workloads {
                if let Ok(id) = w.identity() {
                    identities.entry(w.node.clone()).or_default().insert(id);
                }
            }
            identities
        })
    }

    /// How on-demand Address subscriptions resolve.
    pub fn on_demand(&self) -> &OnDemand {
        self.on_demand.get_or_init(|| OnDemand::build(&self.config))
    }
}

/// Which of a config's workloads and services are, by pointer, the ones of
/// the config before, backing the same services as then.
struct Unchanged<'a> {
    workloads: HashMap<&'a str, &'a Arc<Workload>>,
    services: HashMap<String, &'a Arc<Service>>,
    /// Workloads some service no longer or newly lists, or lists otherwise.
    rebacked: HashSet<&'a str>,
}

impl<'a> Unchanged<'a> {
    /// None when a name is used twice in the config before, or a service
    /// key in the new one: then nothing is known unchanged by pointer. (A
    /// workload uid used twice in the new config is fine: its later
    /// resource wins, kept or made again, as in a build from nothing.)
    fn between(before: &'a LocalConfig, now: &'a LocalConfig) -> Option<Self> {
        let workloads: HashMap<&str, &Arc<Workload>> = before
            .workloads
            .iter()
            .map(|w| (w.uid.as_str(), w))
            .collect();
        let services: HashMap<String, &Arc<Service>> = before
            .services
            .iter()
            .map(|s| (service_key(s), s))
            .collect();
        if workloads.len() != before.workloads.len() || services.len() != before.services.len() {
            return None;
        }
        let mut rebacked = HashSet::new();
        let mut listed = |svc: &'a Service| {
            rebacked.extend(svc.endpoints.iter().map(|ep| ep.workload_uid.as_str()));
        };
        let mut seen = HashSet::with_capacity(now.services.len());
        for svc in &now.services {
            let key = service_key(svc);
            match services.get(&key) {
                Some(old) if Arc::ptr_eq(old, svc) => {}
                Some(old) => {
                    listed(old);
                    listed(svc);
                }
                None => listed(svc),
            }
            if !seen.insert(key) {
                return None;
            }
        }
        for (key, old) in &services {
            if !seen.contains(key) {
                listed(old);
            }
        }
        Some(Unchanged {
            workloads,
            services,
            rebacked,
        })
    }

    fn workload(&self, w: &Arc<Workload>) -> bool {
        self.workloads
            .get(w.uid.as_str())
            .is_some_and(|old| Arc::ptr_eq(old, w))
            && !self.rebacked.contains(w.uid.as_str())
    }

    fn service(&self, key: &str, svc: &Arc<Service>) -> bool {
        self.services
            .get(key)
            .is_some_and(|old| Arc::ptr_eq(old, svc))
    }
}

/// The gRPC side of the controller.
#[derive(Debug)]
pub struct Controller {
    published: watch::Receiver<Arc<Published>>,
    auth: Authenticator,
    ca: MeshCa,
    pub metrics: Arc<Metrics>,
    /// Most resources in one response to a client that understands the
    /// end-of-state marker.
    push_chunk: usize,
}

/// Default of [`Controller`]'s `push_chunk`: at a few hundred bytes per
/// Address resource, responses of about 25 KiB, so no client's buffers
/// grow with the size of the mesh. Measured at 10k pods and 100 clients
/// (`cargo xtask bench controller`): controller RSS 210 MiB with parts of
/// 100, 370 MiB with parts of 500; the first full push is no slower.
pub const PUSH_CHUNK: usize = 100;

impl Controller {
    pub fn new(
        published: watch::Receiver<Arc<Published>>,
        auth: Authenticator,
        ca: MeshCa,
        metrics: Arc<Metrics>,
        push_chunk: usize,
    ) -> Self {
        Controller {
            published,
            auth,
            ca,
            metrics,
            push_chunk: push_chunk.max(1),
        }
    }

    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.auth
            .authenticate(bearer_token(req))
            .await
            .map_err(|e| match e {
                AuthError::Unavailable(m) => Status::unavailable(m),
                e => Status::unauthenticated(e.to_string()),
            })
    }

    /// Checks and signs one certificate request.
    fn sign(&self, caller: &Caller, req: &IstioCertificateRequest) -> Result<Vec<String>, Status> {
        let csr =
            VerifiedCsr::from_pem(&req.csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let requested = csr.identity();
        // A node agent names the identity it asks for on a pod's behalf; it
        // must be the one in the request.
        if let Some(imp) = impersonated(req)
            && imp != requested.to_string()
        {
            return Err(Status::invalid_argument(format!(
                "ImpersonatedIdentity {imp} differs from the request's {requested}"
            )));
        }
        let entitled = match caller {
            Caller::Node { node } => self
                .published
                .borrow()
                .identities()
                .get(node)
                .is_some_and(|ids| ids.contains(requested)),
            // A workload proxy gets its own identity, nothing else.
            Caller::Workload { identity } => identity == requested,
        };
        if !entitled {
            let why = match caller {
                Caller::Node { node } => {
                    format!("node {node} runs no pod with identity {requested}")
                }
                Caller::Workload { identity } => {
                    format!("{identity} may not get a certificate for {requested}")
                }
            };
            return Err(Status::permission_denied(why));
        }
        let ttl = match u64::try_from(req.validity_duration) {
            Ok(s) if s > 0 => Duration::from_secs(s),
            _ => self.ca.max_ttl(),
        };
        let (signed, chain) = self
            .ca
            .sign(&csr, ttl)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        info!(
            component = "ca",
            %caller,
            identity = %requested,
            not_after = ?signed.not_after,
            "certificate signed"
        );
        Ok(chain)
    }
}

fn impersonated(req: &IstioCertificateRequest) -> Option<String> {
    let fields = &req.metadata.as_ref()?.fields;
    match fields.get("ImpersonatedIdentity")?.kind.as_ref()? {
        prost_types::value::Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

type DeltaStream = weft_xds::grpc::BoxedDeltaStream;

impl ControlPlane for Controller {
    type DeltaStream = DeltaStream;

    async fn delta_aggregated_resources(
        self: Arc<Self>,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let caller = self.caller(&request).await?;
        let requests = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let published = self.published.clone();
        let this = self.clone();
        tokio::spawn(async move {
            this.metrics.xds_clients.inc();
            let mut stream = AdsStream::new(caller, tx, published, this.push_chunk);
            stream.run(requests, &this.metrics).await;
            this.metrics.xds_clients.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_certificate(
        self: Arc<Self>,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = match self.caller(&request).await {
            Ok(c) => c,
            Err(e) => {
                self.metrics.certificate(CertOutcome::refused);
                warn!(component = "ca", error = %e.message(), "certificate request unauthenticated");
                return Err(e);
            }
        };
        match self.sign(&caller, request.get_ref()) {
            Ok(cert_chain) => {
                self.metrics.certificate(CertOutcome::signed);
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                self.metrics.certificate(CertOutcome::refused);
                warn!(component = "ca", %caller, error = %e.message(), "certificate refused");
                Err(e)
            }
        }
    }
}

/// What one client has subscribed to for one type, and holds.
#[derive(Debug, Default)]
struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Non-wildcard Address subscriptions: the resources `names` resolve to
    /// (see [`OnDemand`]), as of the last push.
    resolved: BTreeSet<String>,
    held: Held,
}

/// What a client holds of one type.
#[derive(Debug)]
enum Held {
    /// These names, at these versions (an empty version: some version).
    Names(HashMap<String, String>),
    /// Everything of the type as published at this generation: a wildcard
    /// subscription to a type every client sees whole. It costs the same
    /// for ten resources as for a million, so a client's memory does not
    /// grow with the mesh.
    AsOf(u64),
}

impl Default for Held {
    fn default() -> Self {
        Held::Names(HashMap::new())
    }
}

impl Subscription {
    /// Whether what the client holds can be kept as a generation: only a
    /// wildcard subscription to a type every caller sees whole.
    fn by_generation(&self, ty: &str) -> bool {
        self.wildcard && types::lookup(ty).is_some_and(|t| !t.scoped)
    }

    /// Turns a generation into the names it stands for, in `published`:
    /// current resources not changed since at their versions, others (and
    /// names removed since) at some version, so they are sent or removed.
    fn hold_as_names(&mut self, ty: &str, published: &Published) -> Result<(), Status> {
        let Held::AsOf(g) = self.held else {
            return Ok(());
        };
        if g < published.horizon {
            // The removals it missed are forgotten: it must resync.
            return Err(Status::aborted(format!(
                "{ty}: this stream fell more than {TOMBSTONE_GENERATIONS} generations behind; reconnect and resync"
            )));
        }
        let mut names: HashMap<String, String> = published
            .resources
            .get(ty)
            .into_iter()
            .flatten()
            .map(|(name, r)| {
                let version = if r.generation <= g {
                    r.version.clone()
                } else {
                    String::new()
                };
                (name.clone(), version)
            })
            .collect();
        names.extend(
            published
                .tombstones
                .get(ty)
                .into_iter()
                .flatten()
                .filter(|(_, at)| **at > g)
                .map(|(name, _)| (name.clone(), String::new())),
        );
        self.held = Held::Names(names);
        Ok(())
    }
}

/// How much of a type a push compares against what the client holds.
#[derive(Clone, Copy, Debug)]
enum Diff {
    /// Only the names changed in the newest generation.
    Changes,
    /// Every name; send nothing if nothing differs.
    Full,
    /// Every name, and send a response even if nothing differs.
    FullAlways,
}

/// One client's delta ADS stream.
struct AdsStream {
    caller: Caller,
    node_id: String,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    published: watch::Receiver<Arc<Published>>,
    subs: BTreeMap<&'static str, Subscription>,
    /// The generation the last publish-driven push brought every type up to.
    seen: u64,
    nonce: u64,
    /// Whether the client announced [`weft_xds::END_OF_STATE_FEATURE`]:
    /// then a push goes out in responses of at most `chunk` resources.
    end_of_state: bool,
    chunk: usize,
}

impl AdsStream {
    fn new(
        caller: Caller,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
        published: watch::Receiver<Arc<Published>>,
        chunk: usize,
    ) -> Self {
        AdsStream {
            caller,
            node_id: String::new(),
            tx,
            published,
            subs: BTreeMap::new(),
            seen: 0,
            nonce: 0,
            end_of_state: false,
            chunk,
        }
    }

    async fn run(&mut self, mut requests: Streaming<DeltaDiscoveryRequest>, metrics: &Metrics) {
        info!(component = "xds", caller = %self.caller, "stream opened");
        loop {
            tokio::select! {
                msg = requests.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(e) = self.on_request(req, metrics).await {
                            let _ = self.tx.send(Err(e)).await;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        debug!(component = "xds", caller = %self.caller, error = %e, "stream error");
                        break;
                    }
                },
                changed = self.published.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let published = self.published.borrow_and_update().clone();
                    // Right after the generation we last pushed, only the
                    // changed names need a look; after a gap, everything.
                    let diff = if published.generation == self.seen + 1 { Diff::Changes } else { Diff::Full };
                    let types: Vec<&'static str> = self.subs.keys().copied().collect();
                    for ty in types {
                        if self.push(ty, &published, diff, Vec::new(), metrics).await.is_err() {
                            return;
                        }
                    }
                    self.seen = published.generation;
                }
            }
        }
        info!(component = "xds", caller = %self.caller, id = %self.node_id, "stream closed");
    }

    async fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        metrics: &Metrics,
    ) -> Result<(), Status> {
        let served = types::lookup(&req.type_url);
        let Some(ty) = served
            .filter(|t| t.audience.admits(self.caller.role()))
            .map(|t| t.type_url)
        else {
            // Not ours to serve, or not to this caller: an empty answer, so
            // the client is not left waiting and the stream carries on (its
            // ACK needs none).
            if req.response_nonce.is_empty() {
                let why = if served.is_some() {
                    "type not served to this caller"
                } else {
                    "type not served"
                };
                info!(component = "xds", caller = %self.caller, type_url = %req.type_url, "{why}; answering empty");
                self.nonce += 1;
                let empty = DeltaDiscoveryResponse {
                    type_url: req.type_url,
                    nonce: self.nonce.to_string(),
                    ..DeltaDiscoveryResponse::default()
                };
                self.tx
                    .send(Ok(empty))
                    .await
                    .map_err(|_| Status::cancelled("client gone"))?;
            }
            return Ok(());
        };
        if let Some(node) = &req.node {
            self.node_id = node.id.clone();
            self.end_of_state = node
                .client_features
                .iter()
                .any(|f| f == weft_xds::END_OF_STATE_FEATURE);
        }
        if !req.response_nonce.is_empty() {
            match &req.error_detail {
                Some(err) => {
                    metrics.nack(ty);
                    warn!(
                        component = "xds",
                        caller = %self.caller,
                        type_url = ty,
                        nonce = %req.response_nonce,
                        reason = %err.message,
                        "NACK: the client keeps its previous version of the rejected resources"
                    );
                }
                None => {
                    debug!(component = "xds", caller = %self.caller, type_url = ty, nonce = %req.response_nonce, "ACK")
                }
            }
        }
        let first = !self.subs.contains_key(ty);
        let sub = self.subs.entry(ty).or_default();
        if first {
            // Delta xDS: an initial request with no names is a wildcard subscription.
            sub.wildcard = req.resource_names_subscribe.is_empty();
            sub.held = Held::Names(req.initial_resource_versions.into_iter().collect());
        }
        let mut changed = first;
        let mut asked = Vec::new();
        for name in req.resource_names_subscribe {
            changed = true;
            if name == "*" {
                sub.wildcard = true;
            } else {
                asked.push(name.clone());
                sub.names.insert(name);
            }
        }
        for name in req.resource_names_unsubscribe {
            changed = true;
            if name == "*" {
                sub.wildcard = false;
                sub.hold_as_names(ty, &self.published.borrow())?;
            } else {
                sub.names.remove(&name);
            }
        }
        if changed {
            // Not `borrow_and_update`: a new state published meanwhile must
            // still wake the loop, so the other types get it too.
            let published = self.published.borrow().clone();
            // The first response goes out even when empty: clients wait for it to be ready.
            let diff = if first { Diff::FullAlways } else { Diff::Full };
            // Istio's ztunnel waits for each name it asks for to come back as
            // a resource name or a removal: names that are only aliases
            // (`network/ip`) or unknown are answered as removed, beside the
            // resources they resolve to.
            let current = published.resources.get(ty);
            let not_names: Vec<String> = asked
                .into_iter()
                .filter(|n| !current.is_some_and(|c| c.contains_key(n)))
                .collect();
            let diff = if not_names.is_empty() {
                diff
            } else {
                Diff::FullAlways
            };
            self.push(ty, &published, diff, not_names, metrics).await?;
        }
        Ok(())
    }

    /// Sends what the client lacks of `ty` in `published`; `not_found` are
    /// names asked for that are no resource's, answered as removed.
    async fn push<'p>(
        &mut self,
        ty: &'static str,
        published: &'p Published,
        diff: Diff,
        not_found: Vec<String>,
        metrics: &Metrics,
    ) -> Result<(), Status> {
        let Some(sub) = self.subs.get_mut(ty) else {
            return Ok(());
        };
        let mut diff = diff;
        if ty == ADDRESS_TYPE && !sub.wildcard {
            let node = self.caller.node().unwrap_or_default();
            let resolved = published.on_demand().resolve(node, &sub.names);
            if resolved != sub.resolved {
                sub.resolved = resolved;
                if matches!(diff, Diff::Changes) {
                    diff = Diff::Full;
                }
            }
        }
        static NO_RESOURCES: BTreeMap<String, Arc<Versioned>> = BTreeMap::new();
        static NO_CHANGES: BTreeSet<String> = BTreeSet::new();
        let current = published.resources.get(ty).unwrap_or(&NO_RESOURCES);
        let changes = published.changes.get(ty).unwrap_or(&NO_CHANGES);
        // What to send, by reference: a response's resources are made
        // part by part, so a push of the whole mesh holds one part at a time.
        let mut resources: Vec<(&'p String, &'p Versioned)> = Vec::new();
        let mut removed = Vec::new();
        // After comparing every name, the client holds the whole published
        // state: from now on a generation says what it holds.
        let to_generation = sub.by_generation(ty) && !matches!(diff, Diff::Changes);
        match &mut sub.held {
            Held::AsOf(g) if *g < published.horizon => {
                return Err(Status::aborted(format!(
                    "{ty}: this stream fell more than {TOMBSTONE_GENERATIONS} generations behind; reconnect and resync"
                )));
            }
            Held::AsOf(g) => {
                let at = *g;
                if at + 1 == published.generation {
                    // One generation behind: what changed in it is the difference.
                    for name in changes {
                        match current.get_key_value(name) {
                            Some((name, res)) => resources.push((name, res)),
                            None => removed.push(name.clone()),
                        }
                    }
                } else if at < published.generation {
                    for (name, res) in current.iter().filter(|(_, r)| r.generation > at) {
                        resources.push((name, res));
                    }
                    let gone = published.tombstones.get(ty).into_iter().flatten();
                    removed.extend(gone.filter(|(_, g)| **g > at).map(|(n, _)| n.clone()));
                }
                *g = (*g).max(published.generation);
            }
            Held::Names(sent) => {
                // The names to compare: those changed since the previous
                // generation, or every name the client has or could have.
                let names: Box<dyn Iterator<Item = &String>> = match diff {
                    Diff::Changes => Box::new(changes.iter()),
                    Diff::Full | Diff::FullAlways => Box::new(
                        current
                            .keys()
                            .chain(sent.keys().filter(|n| !current.contains_key(*n))),
                    ),
                };
                let caller = &self.caller;
                let (wildcard, asked, resolved) = (sub.wildcard, &sub.names, &sub.resolved);
                let wants =
                    |name: &str| wildcard || asked.contains(name) || resolved.contains(name);
                for name in names {
                    match current
                        .get_key_value(name)
                        .filter(|(_, r)| wants(name) && r.visible_to(caller))
                    {
                        Some((name, res)) if sent.get(name) != Some(&res.version) => {
                            resources.push((name, res));
                        }
                        Some(_) => {}
                        None if sent.contains_key(name) => removed.push(name.clone()),
                        None => {}
                    }
                }
                // Names about to be replaced by a generation are not
                // recorded: a new client's first push would otherwise copy
                // every name and version of the mesh, per client, to drop
                // them at once.
                if !to_generation {
                    for (name, res) in &resources {
                        sent.insert((*name).clone(), res.version.clone());
                    }
                    for name in &removed {
                        sent.remove(name);
                    }
                }
            }
        }
        if to_generation {
            sub.held = Held::AsOf(published.generation);
        }
        removed.extend(not_found);
        let always = matches!(diff, Diff::FullAlways);
        if resources.is_empty() && removed.is_empty() && !always {
            return Ok(());
        }
        debug!(
            component = "xds",
            caller = %self.caller,
            type_url = ty,
            updated = resources.len(),
            removed = removed.len(),
            "push"
        );
        metrics.push(ty);
        // A client that understands the end-of-state marker gets the push
        // in parts, so no response (and no buffer on either side) grows
        // with the mesh; the last part carries the removals and no marker.
        let chunk = if self.end_of_state {
            self.chunk
        } else {
            usize::MAX
        };
        let mut parts = resources.into_iter().peekable();
        loop {
            let part: Vec<Resource> = parts
                .by_ref()
                .take(chunk)
                .map(|(name, res)| Resource {
                    version: res.version.clone(),
                    resource: Some(res.any.clone()),
                    name: name.clone(),
                    aliases: res.aliases.clone(),
                })
                .collect();
            let last = parts.peek().is_none();
            self.nonce += 1;
            let resp = DeltaDiscoveryResponse {
                system_version_info: if last {
                    published.generation.to_string()
                } else {
                    weft_xds::PARTIAL.to_string()
                },
                resources: part,
                type_url: ty.to_string(),
                nonce: self.nonce.to_string(),
                removed_resources: if last {
                    std::mem::take(&mut removed)
                } else {
                    Vec::new()
                },
            };
            self.tx
                .send(Ok(resp))
                .await
                .map_err(|_| Status::cancelled("client gone"))?;
            if last {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use weft_api::{TunnelProtocol, Workload};

    use super::*;

    fn workload(name: &str, revision: &str) -> Workload {
        Workload {
            uid: format!("Kubernetes//Pod/shop/{name}"),
            name: name.into(),
            namespace: "shop".into(),
            workload_name: name.into(),
            canonical_name: name.into(),
            canonical_revision: revision.into(),
            service_account: name.into(),
            trust_domain: "cluster.local".into(),
            node: "node-1".into(),
            addresses: vec![],
            protocol: TunnelProtocol::Hbone,
            named_ports: BTreeMap::new(),
            authorization_policies: vec![],
            host_network: false,
            healthy: true,
            waypoint: None,
        }
    }

    /// A uid used twice in a config: its later workload wins, whether the
    /// earlier one is the previous config's own object (kept unencoded) or
    /// not, as in a build from nothing.
    #[test]
    fn a_name_used_twice_publishes_its_later_resource() {
        let a = Arc::new(workload("a", "v1"));
        let later = Arc::new(workload("a", "v2"));
        let before = LocalConfig {
            workloads: vec![a.clone()],
            ..LocalConfig::default()
        };
        let first = Published::build(&before, &[], &Published::default(), None);
        for now in [
            vec![a.clone(), later.clone()],
            vec![later.clone(), a.clone()],
        ] {
            let now = LocalConfig {
                workloads: now,
                ..LocalConfig::default()
            };
            let kept = Published::build(&now, &[], &first, Some(&before));
            let scratch = Published::build(&now, &[], &Published::default(), None);
            let name = "Kubernetes//Pod/shop/a";
            assert_eq!(
                kept.resources[ADDRESS_TYPE][name].version,
                scratch.resources[ADDRESS_TYPE][name].version
            );
        }
    }

    /// A publish records exactly what was added, changed or removed, and
    /// reuses the unchanged resources as they were.
    #[test]
    fn changes_between_generations() {
        let cfg = |ws: Vec<Workload>| LocalConfig {
            workloads: ws.into_iter().map(Arc::new).collect(),
            ..LocalConfig::default()
        };
        let (c1, c2, c3) = (
            cfg(vec![workload("a", "v1"), workload("b", "v1")]),
            cfg(vec![workload("a", "v1"), workload("c", "v1")]),
            cfg(vec![workload("a", "v2"), workload("c", "v1")]),
        );
        let first = Published::build(&c1, &[], &Published::default(), None);
        assert_eq!(first.generation, 1);
        assert_eq!(first.changes[ADDRESS_TYPE].len(), 2);
        // With the previous config: unchanged inputs are taken over unencoded.
        let second = Published::build(&c2, &[], &first, Some(&c1));
        // Without it: everything is encoded and compared by version.
        let third = Published::build(&c3, &[], &second, None);
        let names = |p: &Published| p.changes.get(ADDRESS_TYPE).cloned().unwrap_or_default();
        assert_eq!(
            names(&second),
            BTreeSet::from([
                "Kubernetes//Pod/shop/b".to_string(),
                "Kubernetes//Pod/shop/c".to_string()
            ])
        );
        assert_eq!(
            names(&third),
            BTreeSet::from(["Kubernetes//Pod/shop/a".to_string()])
        );
        let at = |p: &Published, n: &str| {
            p.resources[ADDRESS_TYPE][&format!("Kubernetes//Pod/shop/{n}")].clone()
        };
        assert!(
            Arc::ptr_eq(&at(&first, "a"), &at(&second, "a")),
            "unchanged: reused"
        );
        assert!(
            Arc::ptr_eq(&at(&second, "c"), &at(&third, "c")),
            "same bytes: reused"
        );
        assert!(!Arc::ptr_eq(&at(&second, "a"), &at(&third, "a")));
        assert_eq!(at(&third, "a").generation, 3);
        assert_eq!(at(&third, "c").generation, 2);
        // A workload is also changed by the services it backs: a port
        // change is a new version even though the workload is as it was.
        let backed = |target: u16| {
            let mut c = c3.clone();
            c.services.push(Arc::new(weft_api::Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                endpoints: vec![weft_api::Endpoint {
                    workload_uid: "Kubernetes//Pod/shop/c".into(),
                    ports: BTreeMap::from([(80, target)]),
                }],
                vips: vec![],
                ports: vec![],
                waypoint: None,
            }));
            c
        };
        let (c4, c5) = (backed(8080), backed(9090));
        let fourth = Published::build(&c4, &[], &third, Some(&c3));
        let fifth = Published::build(&c5, &[], &fourth, Some(&c4));
        let c_of = |p: &Published| at(p, "c").version.clone();
        assert_ne!(c_of(&third), c_of(&fourth));
        assert_ne!(c_of(&fourth), c_of(&fifth));
        assert_eq!(
            names(&fifth),
            BTreeSet::from(["Kubernetes//Pod/shop/c".to_string()])
        );
        assert_eq!(third.identities()["node-1"].len(), 2);
    }

    /// A wildcard client of a type every node sees whole is held as a
    /// generation, not as names. Behind by one generation it gets that
    /// generation's changes; behind by more, everything newer than its own
    /// plus the removals since; too far behind, it is asked to reconnect.
    #[tokio::test]
    async fn clients_held_as_a_generation() {
        let cfg = |ws: Vec<Workload>| LocalConfig {
            workloads: ws.into_iter().map(Arc::new).collect(),
            ..LocalConfig::default()
        };
        let (c1, c2, c3) = (
            cfg(vec![workload("a", "v1"), workload("b", "v1")]),
            cfg(vec![workload("a", "v1")]),
            cfg(vec![workload("a", "v1"), workload("c", "v1")]),
        );
        let p1 = Arc::new(Published::build(&c1, &[], &Published::default(), None));
        let p2 = Arc::new(Published::build(&c2, &[], &p1, Some(&c1)));
        let p3 = Arc::new(Published::build(&c3, &[], &p2, Some(&c2)));
        let (_keep, published) = watch::channel(p1.clone());
        let (tx, mut rx) = mpsc::channel(8);
        let caller = Caller::Node {
            node: "node-1".into(),
        };
        let mut stream = AdsStream::new(caller, tx, published, 100);
        let metrics = Metrics::default();
        stream.subs.insert(
            ADDRESS_TYPE,
            Subscription {
                wildcard: true,
                ..Subscription::default()
            },
        );
        let names = |r: &DeltaDiscoveryResponse| {
            let mut n: Vec<String> = r.resources.iter().map(|r| r.name.clone()).collect();
            n.sort();
            (n, r.removed_resources.clone())
        };
        let uid = |n: &str| format!("Kubernetes//Pod/shop/{n}");
        stream
            .push(ADDRESS_TYPE, &p1, Diff::FullAlways, vec![], &metrics)
            .await
            .unwrap();
        assert_eq!(
            names(&rx.recv().await.unwrap().unwrap()).0,
            [uid("a"), uid("b")]
        );
        assert!(matches!(stream.subs[ADDRESS_TYPE].held, Held::AsOf(1)));
        // Two generations at once: b went, c came, a is as it was.
        stream
            .push(ADDRESS_TYPE, &p3, Diff::Full, vec![], &metrics)
            .await
            .unwrap();
        assert_eq!(
            names(&rx.recv().await.unwrap().unwrap()),
            (vec![uid("c")], vec![uid("b")])
        );
        assert!(matches!(stream.subs[ADDRESS_TYPE].held, Held::AsOf(3)));
        // Unsubscribing the wildcard turns the generation into names.
        let sub = stream.subs.get_mut(ADDRESS_TYPE).unwrap();
        sub.wildcard = false;
        sub.hold_as_names(ADDRESS_TYPE, &p3).unwrap();
        let Held::Names(held) = &sub.held else {
            panic!("names");
        };
        assert_eq!(held.len(), 2);
        assert_eq!(
            held[&uid("c")],
            p3.resources[ADDRESS_TYPE][&uid("c")].version
        );
        // A stream stuck past the removals it could be told is reset.
        let sub = stream.subs.get_mut(ADDRESS_TYPE).unwrap();
        sub.wildcard = true;
        sub.held = Held::AsOf(1);
        let mut far = Published::build(&c3, &[], &p3, Some(&c3));
        far.horizon = 2;
        let err = stream
            .push(ADDRESS_TYPE, &far, Diff::Full, vec![], &metrics)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Aborted);
    }
}
