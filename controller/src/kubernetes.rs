//! The Kubernetes side of the controller: reflectors that feed the same
//! [`Snapshot`] as the manifests directory ([`KubeSource`]), status
//! conditions written back to Istio resources ([`StatusWriter`]), node agents
//! authenticated by TokenReview ([`TokenReviewer`]), and the mesh CA's root
//! kept in a Secret ([`load_or_create_ca`]).
//!
//! Everything below the snapshot (translation, xDS, the CA's checks) is the
//! code the manifests source runs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use weft_api::Identity;

use crate::Snapshot;
use crate::auth::{AuthError, Caller};
use crate::ca::{MeshCa, MeshCaError};
use crate::policy::{AuthorizationPolicy, PeerAuthentication, Status};
use crate::snapshot::key;

/// The Istio kinds we read, at the version we watch (Istio serves the same
/// objects at v1 and v1beta1).
pub fn authorization_policy_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
    ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies")
}

pub fn peer_authentication_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "PeerAuthentication");
    ApiResource::from_gvk_with_plural(&gvk, "peerauthentications")
}

/// Reflector stores over the API server, and whether anything changed since
/// the last [`KubeSource::poll`].
#[derive(Debug)]
pub struct KubeSource {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    nodes: Store<Node>,
    authorization_policies: Store<DynamicObject>,
    peer_authentications: Store<DynamicObject>,
    dirty: Arc<AtomicBool>,
    /// The Istio objects of the last snapshot: one that stops reading keeps
    /// its version from here.
    previous: Snapshot,
}

/// Watches every `K` into a store; every event marks `dirty`. Managed fields
/// are dropped before they are stored: nothing reads them.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    dirty: Arc<AtomicBool>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => dirty.store(true, Ordering::Release),
                Err(e) => {
                    warn!(component = "kubernetes", kind = what, error = %e, "watch failed; retrying with backoff")
                }
            }
        }
    });
}

/// A store of every `K`, kept by a background watch.
fn typed_store<K>(api: Api<K>, what: &'static str, dirty: &Arc<AtomicBool>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    let (reader, writer) = reflector::store();
    reflect(api, writer, what, dirty.clone());
    reader
}

impl KubeSource {
    /// Starts the watches (in the background, on the current runtime).
    pub fn start(client: Client) -> Self {
        let dirty = Arc::new(AtomicBool::new(false));
        let dynamic = |ar: ApiResource, what| {
            let writer = reflector::store::Writer::new(ar.clone());
            let reader = writer.as_reader();
            reflect(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                writer,
                what,
                dirty.clone(),
            );
            reader
        };
        KubeSource {
            namespaces: typed_store(Api::all(client.clone()), "Namespace", &dirty),
            pods: typed_store(Api::all(client.clone()), "Pod", &dirty),
            services: typed_store(Api::all(client.clone()), "Service", &dirty),
            nodes: typed_store(Api::all(client.clone()), "Node", &dirty),
            authorization_policies: dynamic(authorization_policy_resource(), "AuthorizationPolicy"),
            peer_authentications: dynamic(peer_authentication_resource(), "PeerAuthentication"),
            dirty,
            previous: Snapshot::default(),
        }
    }

    /// Waits until every store has listed once. The Istio kinds are waited
    /// for at most `istio_grace`: without Istio's CRDs the mesh still runs.
    pub async fn ready(&self, istio_grace: Duration) {
        let _ = tokio::join!(
            self.namespaces.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.services.wait_until_ready(),
            self.nodes.wait_until_ready(),
        );
        let istio = async {
            let _ = tokio::join!(
                self.authorization_policies.wait_until_ready(),
                self.peer_authentications.wait_until_ready()
            );
        };
        if tokio::time::timeout(istio_grace, istio).await.is_err() {
            warn!(
                component = "kubernetes",
                "security.istio.io resources not listed yet (CRDs missing?); going on without them"
            );
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// The snapshot, when anything changed since the last call; with the
    /// Istio objects that could not be read, named.
    pub fn poll(&mut self) -> Option<(Snapshot, Vec<String>)> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let mut snap = Snapshot::default();
        let ns_key = |m: &kube::api::ObjectMeta| key(m.namespace.as_deref(), m.name.as_deref());
        for o in self.namespaces.state() {
            snap.namespaces.insert(o.name_any(), (*o).clone());
        }
        for o in self.nodes.state() {
            snap.nodes.insert(o.name_any(), (*o).clone());
        }
        for o in self.pods.state() {
            snap.pods.insert(ns_key(&o.metadata), (*o).clone());
        }
        for o in self.services.state() {
            snap.services.insert(ns_key(&o.metadata), (*o).clone());
        }
        let mut problems = Vec::new();
        for o in self.authorization_policies.state() {
            let k = ns_key(&o.metadata);
            match typed::<AuthorizationPolicy>(&o) {
                Ok(p) => {
                    snap.authorization_policies.insert(k, p);
                }
                Err(e) => {
                    problems.push(format!("AuthorizationPolicy {k}: {e}"));
                    snap.keep_previous(&self.previous, "AuthorizationPolicy", &k);
                }
            }
        }
        for o in self.peer_authentications.state() {
            let k = ns_key(&o.metadata);
            match typed::<PeerAuthentication>(&o) {
                Ok(p) => {
                    snap.peer_authentications.insert(k, p);
                }
                Err(e) => {
                    problems.push(format!("PeerAuthentication {k}: {e}"));
                    snap.keep_previous(&self.previous, "PeerAuthentication", &k);
                }
            }
        }
        // Only the Istio objects can fall back on their last version: keep
        // those, not a second copy of every pod.
        self.previous = Snapshot {
            authorization_policies: snap.authorization_policies.clone(),
            peer_authentications: snap.peer_authentications.clone(),
            ..Snapshot::default()
        };
        Some((snap, problems))
    }

    /// The pods store, for [`TokenReviewer`] to find a caller's node.
    pub fn pods(&self) -> Store<Pod> {
        self.pods.clone()
    }
}

/// A dynamic object read as one of our typed Istio resources.
fn typed<T: DeserializeOwned>(o: &DynamicObject) -> Result<T, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(o)?)
}

/// Writes each Istio resource's conditions to its status subresource,
/// only when they changed.
pub struct StatusWriter {
    client: Client,
    /// (kind, namespace, name) → the conditions last written (without timestamps).
    written: HashMap<(&'static str, String, String), serde_json::Value>,
}

impl Debug for StatusWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusWriter")
            .field("written", &self.written.len())
            .finish()
    }
}

impl StatusWriter {
    pub fn new(client: Client) -> Self {
        StatusWriter {
            client,
            written: HashMap::new(),
        }
    }

    /// Patches the status of every resource in `statuses` (with its
    /// `metadata.generation`) whose conditions differ from what was last written.
    pub async fn write(&mut self, statuses: &[(Status, Option<i64>)]) {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        for (s, generation) in statuses {
            let ar = match s.kind {
                "AuthorizationPolicy" => authorization_policy_resource(),
                "PeerAuthentication" => peer_authentication_resource(),
                _ => continue,
            };
            let condition = |ty: &str, status: bool, reason: &str, message: &str| {
                serde_json::json!({
                    "type": ty,
                    "status": if status { "True" } else { "False" },
                    "reason": reason,
                    "message": message,
                    "observedGeneration": generation,
                })
            };
            let mut conditions = vec![condition("Accepted", s.accepted, s.reason, &s.message)];
            if s.accepted {
                conditions.push(condition(
                    "Reconciled",
                    true,
                    "Published",
                    "served to the data plane",
                ));
            }
            let key = (s.kind, s.namespace.clone(), s.name.clone());
            let value = serde_json::Value::Array(conditions);
            if self.written.get(&key) == Some(&value) {
                continue;
            }
            let mut stamped = value.clone();
            for c in stamped.as_array_mut().into_iter().flatten() {
                c["lastTransitionTime"] = serde_json::Value::String(now.clone());
            }
            let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &s.namespace, &ar);
            let patch = serde_json::json!({ "status": { "conditions": stamped } });
            match api
                .patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    debug!(component = "kubernetes", kind = s.kind, namespace = %s.namespace, name = %s.name, "status written");
                    self.written.insert(key, value);
                }
                Err(e) => {
                    warn!(component = "kubernetes", kind = s.kind, namespace = %s.namespace, name = %s.name, error = %e, "cannot write status; will retry on the next change")
                }
            }
        }
    }
}

/// Authenticates node agents by their service account token: the API server
/// reviews it, it must belong to the ztunnel service account, and the node
/// is the one its pod runs on. Verdicts are cached for a minute.
#[derive(Clone)]
pub struct TokenReviewer {
    client: Client,
    /// `system:serviceaccount:<namespace>:<name>` of the node agents.
    username: String,
    /// Other service accounts' tokens make workload callers in this trust domain.
    trust_domain: String,
    pods: Option<Store<Pod>>,
    cache: Arc<Mutex<HashMap<String, (Caller, Instant)>>>,
}

impl Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("username", &self.username)
            .finish()
    }
}

const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const REVIEW_CACHE: Duration = Duration::from_secs(60);
const REVIEW_CACHE_MAX: usize = 10_000;

impl TokenReviewer {
    /// `service_account` is the node agents', `namespace/name`.
    pub fn new(
        client: Client,
        service_account: &str,
        trust_domain: &str,
        pods: Option<Store<Pod>>,
    ) -> Self {
        let (ns, name) = service_account
            .split_once('/')
            .unwrap_or(("istio-system", service_account));
        TokenReviewer {
            client,
            username: format!("system:serviceaccount:{ns}:{name}"),
            trust_domain: trust_domain.to_string(),
            pods,
            cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthError> {
        if let Some((caller, at)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            && at.elapsed() < REVIEW_CACHE
        {
            return Ok(caller.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let done = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(AuthError::Rejected(format!("TokenReview: {why}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            // Any other service account acts as itself (a waypoint), as
            // istiod lets any proxy with a token get its own identity.
            let caller = username
                .strip_prefix("system:serviceaccount:")
                .and_then(|rest| rest.split_once(':'))
                .and_then(|(ns, sa)| Identity::new(&self.trust_domain, ns, sa).ok())
                .map(|identity| Caller::Workload { identity })
                .ok_or_else(|| {
                    AuthError::Rejected(format!(
                        "{username} is neither the node agent's service account {} nor another service account",
                        self.username
                    ))
                })?;
            self.remember(token, &caller);
            return Ok(caller);
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        let node = match (first(NODE_NAME_EXTRA), first(POD_NAME_EXTRA)) {
            (Some(node), _) => node,
            (None, Some(pod)) => {
                let ns = self.username.split(':').nth(2).unwrap_or_default();
                let found = self.pods.as_ref().and_then(|s| {
                    s.get(&reflector::ObjectRef::new(&pod).within(ns))
                        .and_then(|p| p.spec.as_ref()?.node_name.clone())
                });
                found.ok_or_else(|| {
                    AuthError::Rejected(format!(
                        "the token's pod {ns}/{pod} is not known or not scheduled"
                    ))
                })?
            }
            (None, None) => {
                return Err(AuthError::Rejected(
                    "the token is not bound to a pod: use a projected service account token".into(),
                ));
            }
        };
        let caller = Caller::Node { node };
        self.remember(token, &caller);
        Ok(caller)
    }

    fn remember(&self, token: &str, caller: &Caller) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= REVIEW_CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < REVIEW_CACHE);
        }
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
    }
}

/// The mesh CA from Secrets in `namespace`, as Istio keeps it: a user's
/// `cacerts` (plug-in) first, else the self-signed `istio-ca-secret`, else a
/// new root, stored as `istio-ca-secret` (when another replica stored one
/// first, that one is used).
pub async fn load_or_create_ca(
    client: Client,
    namespace: &str,
    trust_domain: &str,
    max_ttl: Duration,
) -> Result<MeshCa, MeshCaError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let unavailable =
        |e: kube::Error| MeshCaError::Layout(format!("Secret in {namespace}"), e.to_string());
    for name in ["cacerts", "istio-ca-secret"] {
        let place = format!("Secret {namespace}/{name}");
        if let Some(secret) = secrets.get_opt(name).await.map_err(unavailable)?
            && let Some(ca) = MeshCa::from_files(&secret_files(&secret), &place, max_ttl)?
        {
            return Ok(ca);
        }
    }
    let (ca, files) = MeshCa::generate(trust_domain, max_ttl)?;
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("istio-ca-secret".into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(
            files
                .into_iter()
                .map(|(k, v)| (k, ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(component = "ca", secret = %format!("{namespace}/istio-ca-secret"), "mesh CA: generated a new root");
            Ok(ca)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let place = format!("Secret {namespace}/istio-ca-secret");
            let stored = secrets.get("istio-ca-secret").await.map_err(unavailable)?;
            MeshCa::from_files(&secret_files(&stored), &place, max_ttl)?
                .ok_or_else(|| MeshCaError::Layout(place, "holds no CA".into()))
        }
        Err(e) => Err(unavailable(e)),
    }
}

fn secret_files(secret: &Secret) -> BTreeMap<String, String> {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect()
}
