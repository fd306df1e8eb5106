//! The Kubernetes side of the controller: reflectors that feed the same
//! [`Snapshot`] as the manifests directory ([`KubeSource`]), status
//! conditions written back to Istio resources ([`StatusWriter`]), node agents
//! authenticated by TokenReview ([`TokenReviewer`]), and the mesh CA's root
//! kept in a Secret ([`load_or_create_ca`]).
//!
//! Everything below the snapshot (translation, xDS, the CA's checks) is the
//! code the manifests source runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio_stream::StreamExt;
use tracing::{debug, info, warn};

use weft_api::Identity;

use crate::Snapshot;
use crate::auth::{AuthError, Caller};
use crate::ca::{MeshCa, MeshCaError};
use crate::changed::Changed;
use crate::kinds::{self, Kind, KindInfo, Visitor, each_kind};
use crate::policy::{Status, WAYPOINT_BOUND};

/// Events' `reportingController`.
pub const EVENT_REPORTER: &str = "weft.dev/controller";

/// Reflector stores over the API server, one per kind, and whether anything
/// changed since the last [`KubeSource::poll`].
#[derive(Debug)]
pub struct KubeSource {
    watches: Vec<Box<dyn Watched>>,
    pods: Store<Pod>,
    dirty: Arc<Changed>,
    /// Every kind's objects, brought up to date object by object from the
    /// watch events; a custom resource that stops reading keeps its last
    /// version here.
    snapshot: Arc<Snapshot>,
    /// `Kind namespace/name` → why that custom resource cannot be read.
    problems: BTreeMap<String, String>,
}

/// The objects of one kind that changed since the source last read its store.
#[derive(Debug)]
struct Touched {
    /// Listed again (or never read): read the whole store.
    all: bool,
    /// `(namespace, name)` of each object applied or deleted.
    objects: HashSet<(Option<String>, String)>,
}

impl Default for Touched {
    fn default() -> Self {
        Touched {
            all: true,
            objects: HashSet::new(),
        }
    }
}

/// What changed in a store, taken.
fn take_touched(touched: &Mutex<Touched>) -> Touched {
    let mut t = touched.lock().unwrap_or_else(|p| p.into_inner());
    std::mem::replace(
        &mut *t,
        Touched {
            all: false,
            objects: HashSet::new(),
        },
    )
}

/// Watches every `K` into a store; every event marks `dirty`, and names the
/// object in `touched` (a new list, the whole kind). Managed fields are
/// dropped before they are stored: nothing reads them.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    info: &'static KindInfo,
    dirty: Arc<Changed>,
    touched: Arc<Mutex<Touched>>,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let what = info.kind;
    let config = match info.only_name {
        Some(name) => watcher::Config::default().fields(&format!("metadata.name={name}")),
        None => watcher::Config::default(),
    };
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    {
                        let mut t = touched.lock().unwrap_or_else(|p| p.into_inner());
                        match &event {
                            watcher::Event::Apply(o) | watcher::Event::Delete(o) => {
                                let meta = o.meta();
                                let name = meta.name.clone().unwrap_or_default();
                                t.objects.insert((meta.namespace.clone(), name));
                            }
                            // The store takes the new list whole at its end.
                            watcher::Event::InitDone => t.all = true,
                            watcher::Event::Init | watcher::Event::InitApply(_) => {}
                        }
                    }
                    dirty.mark();
                }
                Err(e) => {
                    warn!(component = "kubernetes", kind = what, error = %e, "watch failed; retrying with backoff")
                }
            }
        }
    });
}

/// One kind's watch, as the source uses it.
pub trait Watched: Debug + Send + Sync {
    fn info(&self) -> &'static KindInfo;
    fn ready(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>;
    /// Brings `snap`'s objects of this kind up to date with the store: those
    /// the watch events named since the last call, or all after a new list.
    /// One that cannot be read is named in `problems` (by `Kind key`) and
    /// keeps its version in `snap`. Returns whether anything was read.
    fn update(&self, snap: &mut Snapshot, problems: &mut BTreeMap<String, String>) -> bool;
    fn pods(&self) -> Option<Store<Pod>> {
        None
    }
}

/// A k8s-openapi kind, stored typed.
struct Typed<K: kube::Resource<DynamicType = ()> + 'static>(Store<K>, Arc<Mutex<Touched>>);

/// A CRD, stored as dynamic objects and read through serde as they change.
struct Dynamic<K>(
    Store<DynamicObject>,
    Arc<Mutex<Touched>>,
    std::marker::PhantomData<fn() -> K>,
);

/// Where a store keeps the object `name` in `namespace`.
fn stored_at<K: reflector::Lookup>(
    namespace: Option<&String>,
    name: &str,
    dyntype: K::DynamicType,
) -> reflector::ObjectRef<K> {
    let at = reflector::ObjectRef::new_with(name, dyntype);
    match namespace {
        Some(ns) => at.within(ns),
        None => at,
    }
}

impl<K: kube::Resource<DynamicType = ()> + 'static> Debug for Typed<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Typed")
    }
}

impl<K> Debug for Dynamic<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dynamic")
    }
}

impl<K> Watched for Typed<K>
where
    K: Kind + kube::Resource<DynamicType = ()> + Debug,
{
    fn info(&self) -> &'static KindInfo {
        &K::INFO
    }
    fn ready(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async {
            let _ = self.0.wait_until_ready().await;
        })
    }
    fn update(&self, snap: &mut Snapshot, _: &mut BTreeMap<String, String>) -> bool {
        let touched = take_touched(&self.1);
        let into = K::of_mut(snap);
        if touched.all {
            // The store's objects are shared: an unchanged one is the same
            // `Arc` as before.
            into.clear();
            for o in self.0.state() {
                into.insert(K::INFO.key(Kind::meta(&*o)), o);
            }
            return true;
        }
        for (namespace, name) in &touched.objects {
            let key = K::INFO.key_at(namespace.as_deref(), name);
            match self.0.get(&stored_at(namespace.as_ref(), name, ())) {
                Some(o) => into.insert(key, o),
                None => into.remove(&key),
            };
        }
        !touched.objects.is_empty()
    }
    fn pods(&self) -> Option<Store<Pod>> {
        (&self.0 as &dyn std::any::Any)
            .downcast_ref::<Store<Pod>>()
            .cloned()
    }
}

impl<K: Kind> Watched for Dynamic<K> {
    fn info(&self) -> &'static KindInfo {
        &K::INFO
    }
    fn ready(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async {
            let _ = self.0.wait_until_ready().await;
        })
    }
    fn update(&self, snap: &mut Snapshot, problems: &mut BTreeMap<String, String>) -> bool {
        let touched = take_touched(&self.1);
        let objects: Vec<(String, Option<Arc<DynamicObject>>)> = if touched.all {
            let listed: Vec<(String, Option<Arc<DynamicObject>>)> = self
                .0
                .state()
                .into_iter()
                .map(|o| (K::INFO.key(&o.metadata), Some(o)))
                .collect();
            // What the new list no longer has is gone, and so are the
            // problems of those that never read.
            let keys: HashSet<&String> = listed.iter().map(|(k, _)| k).collect();
            let gone: Vec<String> = K::of(snap)
                .keys()
                .filter(|k| !keys.contains(k))
                .cloned()
                .collect();
            let kind = format!("{} ", K::INFO.kind);
            problems.retain(|p, _| {
                p.strip_prefix(&kind)
                    .is_none_or(|k| keys.contains(&k.to_string()))
            });
            listed
                .into_iter()
                .chain(gone.into_iter().map(|k| (k, None)))
                .collect()
        } else {
            let ar = K::INFO.api_resource();
            touched
                .objects
                .iter()
                .map(|(namespace, name)| {
                    let at = stored_at(namespace.as_ref(), name, ar.clone());
                    (K::INFO.key_at(namespace.as_deref(), name), self.0.get(&at))
                })
                .collect()
        };
        let read = touched.all || !objects.is_empty();
        for (k, o) in objects {
            let problem = format!("{} {k}", K::INFO.kind);
            let Some(o) = o else {
                K::of_mut(snap).remove(&k);
                problems.remove(&problem);
                continue;
            };
            match serde_json::to_value(&*o).and_then(serde_json::from_value::<K>) {
                Ok(typed) => {
                    K::of_mut(snap).insert(k, Arc::new(typed));
                    problems.remove(&problem);
                }
                // The last version read stays.
                Err(e) => {
                    problems.insert(problem, format!("{} {k}: {e}", K::INFO.kind));
                }
            }
        }
        read
    }
}

/// Starts each kind's watch.
struct StartWatches<'a> {
    client: &'a Client,
    dirty: &'a Arc<Changed>,
    watches: Vec<Box<dyn Watched>>,
}

impl Visitor for StartWatches<'_> {
    fn visit<K: Kind>(&mut self) {
        self.watches.push(K::watch(self.client, self.dirty));
    }
}

/// The watch of a k8s-openapi kind, stored typed.
pub(crate) fn typed<K>(client: &Client, dirty: &Arc<Changed>) -> Box<dyn Watched>
where
    K: Kind + kube::Resource<DynamicType = ()> + Debug,
{
    let (reader, writer) = reflector::store();
    let touched = Arc::default();
    reflect(
        Api::<K>::all(client.clone()),
        writer,
        &K::INFO,
        dirty.clone(),
        Arc::clone(&touched),
    );
    Box::new(Typed(reader, touched))
}

/// The watch of a custom resource, stored as dynamic objects.
pub(crate) fn dynamic<K: Kind>(client: &Client, dirty: &Arc<Changed>) -> Box<dyn Watched> {
    let ar = K::INFO.api_resource();
    let writer = reflector::store::Writer::new(ar.clone());
    let reader = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &ar);
    let touched = Arc::default();
    reflect(api, writer, &K::INFO, dirty.clone(), Arc::clone(&touched));
    Box::new(Dynamic::<K>(reader, touched, std::marker::PhantomData))
}

impl KubeSource {
    /// Starts the watches (in the background, on the current runtime).
    pub fn start(client: Client) -> Self {
        let dirty = Arc::new(Changed::default());
        let mut start = StartWatches {
            client: &client,
            dirty: &dirty,
            watches: Vec::new(),
        };
        each_kind(&mut start);
        let watches = start.watches;
        let pods = watches
            .iter()
            .find_map(|w| w.pods())
            .unwrap_or_else(|| reflector::store().0);
        KubeSource {
            watches,
            pods,
            dirty,
            snapshot: Arc::default(),
            problems: BTreeMap::new(),
        }
    }

    /// Waits until every store has listed once. Optional kinds (CRDs) are
    /// waited for at most `crd_grace`: without Istio's CRDs the mesh still runs.
    pub async fn ready(&self, crd_grace: Duration) {
        for w in self.watches.iter().filter(|w| !w.info().optional) {
            w.ready().await;
        }
        let optional = async {
            for w in self.watches.iter().filter(|w| w.info().optional) {
                w.ready().await;
            }
        };
        if tokio::time::timeout(crd_grace, optional).await.is_err() {
            warn!(
                component = "kubernetes",
                "some custom resources not listed yet (CRDs missing?); going on without them"
            );
        }
        self.dirty.mark();
    }

    /// The snapshot, when anything changed since the last call; with the
    /// custom resources that could not be read, named. Only the objects the
    /// watch events named are read again; the snapshot is updated in place
    /// unless the last one handed out is still held.
    pub fn poll(&mut self) -> Option<(Arc<Snapshot>, Vec<String>)> {
        if !self.dirty.take() {
            return None;
        }
        let snap = Arc::make_mut(&mut self.snapshot);
        let mut read = false;
        for w in &self.watches {
            read |= w.update(snap, &mut self.problems);
        }
        read.then(|| {
            (
                self.snapshot.clone(),
                self.problems.values().cloned().collect(),
            )
        })
    }

    /// What wakes the publisher: every watch event marks it.
    pub fn changes(&self) -> Arc<Changed> {
        self.dirty.clone()
    }

    /// The pods store, for [`TokenReviewer`] to find a caller's node.
    pub fn pods(&self) -> Store<Pod> {
        self.pods.clone()
    }
}

/// Writes each Istio resource's conditions to its status subresource,
/// only when they changed.
pub struct StatusWriter {
    client: Client,
    /// (kind, namespace, name) → the conditions last written (without timestamps).
    written: HashMap<(&'static str, String, String), serde_json::Value>,
    /// (kind, namespace, name) → the refusal last reported as an Event.
    evented: HashMap<(&'static str, String, String), String>,
    /// This replica, as Events name their reporter.
    instance: String,
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
            evented: HashMap::new(),
            instance: "weft-controller".into(),
        }
    }

    /// Names this replica in the Events it reports.
    pub fn instance(mut self, name: &str) -> Self {
        self.instance = name.to_string();
        self
    }

    /// Forgets what it wrote: a replica that (again) leads writes every
    /// status anew, since another may have written meanwhile.
    pub fn forget(&mut self) {
        self.written.clear();
        self.evented.clear();
    }

    /// Patches the status of every resource in `statuses` (with its
    /// `metadata.generation`) whose conditions differ from what was last written.
    pub async fn write(&mut self, statuses: &[(Status, Option<i64>)]) {
        self.report_refusals(statuses).await;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        // A Service or ServiceEntry no longer bound (or refused) loses the
        // condition we wrote on it.
        let own_kind = |k: &str| matches!(k, "Service" | "ServiceEntry");
        let current: HashSet<(&str, &str, &str)> = statuses
            .iter()
            .filter(|(s, _)| own_kind(s.kind))
            .map(|(s, _)| (s.kind, s.namespace.as_str(), s.name.as_str()))
            .collect();
        let stale: Vec<(&'static str, String, String, String)> = self
            .written
            .iter()
            .filter(|((kind, ns, name), _)| {
                own_kind(kind) && !current.contains(&(*kind, ns.as_str(), name.as_str()))
            })
            .map(|((kind, ns, name), c)| {
                let ty = c["type"].as_str().unwrap_or(WAYPOINT_BOUND).to_string();
                (*kind, ns.clone(), name.clone(), ty)
            })
            .collect();
        for (kind, ns, name, ty) in stale {
            self.write_one_condition(kind, &ns, &name, &ty, None, &now)
                .await;
        }
        for (s, generation) in statuses {
            let key = (s.kind, s.namespace.clone(), s.name.clone());
            match s.kind {
                "HTTPRoute" => self.write_route_parents(s, *generation, &now).await,
                "Service" | "ServiceEntry" => {
                    let c = condition(s.condition, s.accepted, s.reason, &s.message, *generation);
                    // Another condition type replaces the one written before.
                    if let Some(old) = self.written.get(&key)
                        && old["type"] != c["type"]
                    {
                        let ty = old["type"].as_str().unwrap_or_default().to_string();
                        self.write_one_condition(s.kind, &s.namespace, &s.name, &ty, None, &now)
                            .await;
                    }
                    if self.written.get(&key) != Some(&c) {
                        self.write_one_condition(
                            s.kind,
                            &s.namespace,
                            &s.name,
                            s.condition,
                            Some(c),
                            &now,
                        )
                        .await;
                    }
                }
                _ => {
                    let Some(ar) = kinds::info(s.kind)
                        .filter(|k| k.status)
                        .map(KindInfo::api_resource)
                    else {
                        continue;
                    };
                    let mut conditions = vec![condition(
                        "Accepted",
                        s.accepted,
                        s.reason,
                        &s.message,
                        *generation,
                    )];
                    if !s.condition.is_empty() {
                        conditions.push(condition(
                            s.condition,
                            s.accepted,
                            s.reason,
                            &s.message,
                            *generation,
                        ));
                    }
                    if s.accepted {
                        conditions.push(condition(
                            "Reconciled",
                            true,
                            "Published",
                            "served to the data plane",
                            *generation,
                        ));
                    }
                    let value = serde_json::Value::Array(conditions);
                    if self.written.get(&key) == Some(&value) {
                        continue;
                    }
                    let mut stamped = value.clone();
                    stamp(stamped.as_array_mut().into_iter().flatten(), &now);
                    let api = Api::<DynamicObject>::namespaced_with(
                        self.client.clone(),
                        &s.namespace,
                        &ar,
                    );
                    if patch_status(&api, s.kind, &s.name, json!({ "conditions": stamped })).await {
                        self.written.insert(key, value);
                    }
                }
            }
        }
    }

    /// A Warning Event for each refusal not reported yet (or whose reason
    /// changed), so `kubectl describe` and `kubectl get events` show it
    /// beside the status. A resource accepted again may be reported anew.
    async fn report_refusals(&mut self, statuses: &[(Status, Option<i64>)]) {
        let refused: HashMap<(&'static str, String, String), &Status> = statuses
            .iter()
            .filter(|(s, _)| !s.accepted)
            .map(|(s, _)| ((s.kind, s.namespace.clone(), s.name.clone()), s))
            .collect();
        self.evented.retain(|k, _| refused.contains_key(k));
        for (key, s) in refused {
            if self.evented.get(&key) == Some(&s.message) {
                continue;
            }
            let api_version = kinds::info(s.kind)
                .map(|k| k.api_resource().api_version)
                .unwrap_or_else(|| "v1".into());
            // The API server keeps notes up to 1 kB.
            let mut note = s.message.clone();
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            let event = Event {
                metadata: kube::api::ObjectMeta {
                    generate_name: Some(format!("{}.", s.name)),
                    namespace: Some(s.namespace.clone()),
                    ..Default::default()
                },
                event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
                reporting_controller: Some(EVENT_REPORTER.into()),
                reporting_instance: Some(self.instance.clone()),
                action: Some("Translate".into()),
                reason: Some(s.reason.to_string()),
                type_: Some("Warning".into()),
                note: Some(note),
                regarding: Some(ObjectReference {
                    api_version: Some(api_version),
                    kind: Some(s.kind.to_string()),
                    namespace: Some(s.namespace.clone()),
                    name: Some(s.name.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match Api::<Event>::namespaced(self.client.clone(), &s.namespace)
                .create(&PostParams::default(), &event)
                .await
            {
                Ok(_) => {
                    self.evented.insert(key, s.message.clone());
                }
                Err(e) => {
                    debug!(component = "kubernetes", kind = s.kind, namespace = %s.namespace, name = %s.name, error = %e, "cannot report the refusal as an Event")
                }
            }
        }
    }

    /// Sets (or, with `None`, removes) one condition of type `ty` on a
    /// Service or ServiceEntry, keeping every other condition on it.
    async fn write_one_condition(
        &mut self,
        kind: &'static str,
        ns: &str,
        name: &str,
        ty: &str,
        condition: Option<serde_json::Value>,
        now: &str,
    ) {
        let key = (kind, ns.to_string(), name.to_string());
        let Some(ar) = kinds::info(kind).map(KindInfo::api_resource) else {
            return;
        };
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &ar);
        let obj = match api.get_status(name).await {
            Ok(s) => s,
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.written.remove(&key);
                return;
            }
            Err(e) => {
                return warn!(component = "kubernetes", kind, namespace = %ns, name = %name, error = %e, "cannot read status; will retry on the next change");
            }
        };
        let mut conditions = others(&obj.data["status"]["conditions"], "type", ty);
        if let Some(c) = &condition {
            let mut c = c.clone();
            stamp([&mut c], now);
            conditions.push(c);
        }
        if patch_status(&api, kind, name, json!({ "conditions": conditions })).await {
            match condition {
                Some(c) => self.written.insert(key, c),
                None => self.written.remove(&key),
            };
        }
    }

    /// Gateway API status: one `status.parents` entry per Service parent,
    /// as the `istio-waypoint` class's controller; other controllers'
    /// entries are kept (read, then replaced as a whole, as the list is
    /// atomic). The route is read only when what we would write changed:
    /// its parentRefs change only with its generation.
    async fn write_route_parents(&mut self, s: &Status, generation: Option<i64>, now: &str) {
        let key = (s.kind, s.namespace.clone(), s.name.clone());
        let fingerprint = json!([s.accepted, s.reason, s.message, generation]);
        if self.written.get(&key) == Some(&fingerprint) {
            return;
        }
        let Some(ar) = kinds::info(s.kind).map(KindInfo::api_resource) else {
            return;
        };
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &s.namespace, &ar);
        let route = match api.get_status(&s.name).await {
            Ok(r) => r,
            Err(e) => {
                return warn!(component = "kubernetes", kind = s.kind, namespace = %s.namespace, name = %s.name, error = %e, "cannot read status; will retry on the next change");
            }
        };
        let refs = route.data["spec"]["parentRefs"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut parents = others(
            &route.data["status"]["parents"],
            "controllerName",
            MESH_CONTROLLER,
        );
        for mut p in route_parents(&refs, s, generation) {
            stamp(p["conditions"].as_array_mut().into_iter().flatten(), now);
            parents.push(p);
        }
        if patch_status(&api, s.kind, &s.name, json!({ "parents": parents })).await {
            self.written.insert(key, fingerprint);
        }
    }
}

/// A status condition as the API takes it, without its transition time.
fn condition(
    ty: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> serde_json::Value {
    json!({
        "type": ty,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    })
}

/// Sets `lastTransitionTime` on each condition.
fn stamp<'a>(conditions: impl IntoIterator<Item = &'a mut serde_json::Value>, now: &str) {
    for c in conditions {
        c["lastTransitionTime"] = serde_json::Value::String(now.to_string());
    }
}

/// The entries of a status list that are not ours (`field` != `ours`).
fn others(list: &serde_json::Value, field: &str, ours: &str) -> Vec<serde_json::Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|e| e[field] != ours)
        .cloned()
        .collect()
}

/// Merge-patches `status` of `name`; true when written, a warning when not
/// (the next change retries).
async fn patch_status(
    api: &Api<DynamicObject>,
    kind: &str,
    name: &str,
    status: serde_json::Value,
) -> bool {
    let patch = json!({ "status": status });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            debug!(component = "kubernetes", kind, name, "status written");
            true
        }
        Err(e) => {
            warn!(component = "kubernetes", kind, name, error = %e, "cannot write status; will retry on the next change");
            false
        }
    }
}

/// The controller name of GatewayClass `istio-waypoint`, which Weft serves.
pub const MESH_CONTROLLER: &str = "istio.io/mesh-controller";

/// Our `status.parents` entries for a route's Service `parentRefs`, with
/// Gateway API's Accepted and ResolvedRefs conditions.
fn route_parents(
    refs: &[serde_json::Value],
    s: &Status,
    generation: Option<i64>,
) -> Vec<serde_json::Value> {
    let condition = |ty, ok, reason, message: &str| condition(ty, ok, reason, message, generation);
    // A refusal for a reference also says so in ResolvedRefs.
    let bad_ref = if s.message.contains("ReferenceGrant") {
        Some("RefNotPermitted")
    } else if s.message.contains("only Service backends") {
        Some("InvalidKind")
    } else {
        None
    };
    // A refused route is not served (or only its last accepted version is),
    // whatever the cause: Accepted is False either way.
    let accepted = if s.accepted {
        condition("Accepted", true, "Accepted", &s.message)
    } else {
        condition("Accepted", false, "UnsupportedValue", &s.message)
    };
    let resolved = match bad_ref {
        Some(reason) if !s.accepted => condition("ResolvedRefs", false, reason, &s.message),
        _ => condition("ResolvedRefs", true, "ResolvedRefs", ""),
    };
    refs.iter()
        .filter(|r| {
            matches!(r["group"].as_str(), Some("" | "core"))
                && r["kind"].as_str() == Some("Service")
        })
        .map(|r| {
            json!({
                "parentRef": r,
                "controllerName": MESH_CONTROLLER,
                "conditions": [accepted.clone(), resolved.clone()],
            })
        })
        .collect()
}

/// The audience of the tokens the CA and xDS accept (Istio's).
pub const CA_AUDIENCE: &str = "istio-ca";

/// Authenticates node agents by their service account token: the API server
/// reviews it for audience [`CA_AUDIENCE`], it must belong to the ztunnel
/// service account, and the node is the one its pod runs on. Verdicts are
/// cached for a minute.
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
                // Only tokens minted for the mesh CA, as istiod asks: a
                // token projected for another service is not replayable here.
                audiences: Some(vec![CA_AUDIENCE.to_string()]),
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
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == CA_AUDIENCE))
        {
            return Err(AuthError::Rejected(format!(
                "TokenReview: the token is not for audience {CA_AUDIENCE}"
            )));
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
