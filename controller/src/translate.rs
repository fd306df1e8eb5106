//! Snapshot → workloads and services, as ztunnel consumes them. Pure: the same
//! snapshot always gives the same output, and problems are returned, not logged.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as K8sService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use weft_api::{
    AppProtocol, Endpoint, Identity, LocalConfig, Service, ServicePort, TunnelProtocol, Workload,
};

use crate::endpoints::SliceEndpoint;
use crate::policy::{self, Policies};
use crate::{Snapshot, labels};

/// Translation settings.
#[derive(Clone, Debug)]
pub struct Mesh {
    pub trust_domain: String,
    pub cluster_id: String,
    /// Policies here without a selector apply to the whole mesh (Istio's root namespace).
    pub root_namespace: String,
    /// With an L7 AuthorizationPolicy enforced for a service by its
    /// waypoint, its endpoints admit mesh traffic only from that waypoint
    /// (see `bypass`). `L7_POLICY_WAYPOINT_ONLY=false` turns it off.
    pub l7_policy_waypoint_only: bool,
}

/// A resource left out of the output, and why.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{kind} {namespace}/{name}: {field}: {message}")]
pub struct TranslateError {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// A path into the resource, as `kubectl explain` writes it.
    pub field: String,
    pub message: String,
}

impl TranslateError {
    /// A maker of errors about one object: `err(field, message)`.
    pub fn about(
        kind: &'static str,
        namespace: &str,
        name: &str,
    ) -> impl Fn(&str, String) -> TranslateError + use<> {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        move |field, message| TranslateError {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
            field: field.into(),
            message,
        }
    }
}

/// An object's namespace (`default` when unset) and name.
pub fn names(meta: &kube::api::ObjectMeta) -> (String, String) {
    (
        meta.namespace.clone().unwrap_or_else(|| "default".into()),
        meta.name.clone().unwrap_or_default(),
    )
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            trust_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            root_namespace: "istio-system".into(),
            l7_policy_waypoint_only: true,
        }
    }
}

/// Whether the pod is captured: its own `istio.io/dataplane-mode` label wins
/// (`ambient` or `none`), else its namespace's; host-network pods never are.
pub fn captured(pod: &Pod, ns: Option<&Namespace>) -> bool {
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return false;
    }
    let mode = |labels: Option<&BTreeMap<String, String>>| {
        labels.and_then(|l| l.get(labels::DATAPLANE_MODE)).cloned()
    };
    match mode(pod.metadata.labels.as_ref()).as_deref() {
        Some(labels::DATAPLANE_MODE_AMBIENT) => true,
        Some(labels::DATAPLANE_MODE_NONE) => false,
        _ => {
            mode(ns.and_then(|n| n.metadata.labels.as_ref())).as_deref()
                == Some(labels::DATAPLANE_MODE_AMBIENT)
        }
    }
}

/// The workload name Istio reports: the owning controller's name when there is
/// one (a ReplicaSet's Deployment), else the pod's.
fn workload_name(pod: &Pod) -> String {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let Some(owner) = pod
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.iter().find(|o| o.controller == Some(true)))
    else {
        return name;
    };
    match owner.kind.as_str() {
        "ReplicaSet" => owner
            .name
            .rsplit_once('-')
            .map(|(d, _)| d.to_string())
            .unwrap_or_else(|| owner.name.clone()),
        _ => owner.name.clone(),
    }
}

fn first_label(pod: &Pod, keys: &[&str]) -> Option<String> {
    let labels = pod.metadata.labels.as_ref()?;
    keys.iter().find_map(|k| labels.get(*k).cloned())
}

/// One translation of a snapshot.
#[derive(Clone, Debug, Default)]
pub struct Translation {
    pub config: LocalConfig,
    /// Resources left out (or kept at their last accepted version), and why.
    pub errors: Vec<TranslateError>,
    /// Policies as translated, kept so the next translation can fall back on them.
    pub policies: Policies,
    /// Waypoint routes and destinations, with their statuses.
    pub l7: crate::routes::L7,
    /// Each bound Service's and ServiceEntry's `istio.io/WaypointBound`
    /// status, and each refused ServiceEntry's `Accepted`.
    pub bindings: Vec<policy::Status>,
    /// What the next translation takes over.
    pub memo: Memo,
}

impl Translation {
    /// Every translated resource's status: policies and routes. A policy
    /// attached to a waypoint has the waypoint's status, not ztunnel's.
    pub fn statuses(&self) -> impl Iterator<Item = &policy::Status> {
        let l7 = &self.l7.statuses;
        let shadowed = move |s: &policy::Status| {
            l7.iter()
                .any(|o| o.kind == s.kind && o.namespace == s.namespace && o.name == s.name)
        };
        self.policies
            .statuses
            .iter()
            .filter(move |s| !shadowed(s))
            .chain(l7)
            .chain(&self.bindings)
    }
}

/// What a translation keeps so that the next one re-translates only what
/// changed: each pod's and each Service's result, with the objects it was
/// made from. Objects are compared by pointer (the snapshot shares an
/// unchanged object with the previous one); a result whose inputs are the
/// same objects is taken over as it is, shared, so that the encoder sees
/// it unchanged by pointer too.
#[derive(Clone, Debug, Default)]
pub struct Memo {
    /// Pod key (`namespace/name`) → its part.
    pods: HashMap<Arc<str>, PodPart>,
    /// Service key → the Service and what it translated to.
    services: HashMap<Arc<str>, ServicePart>,
    /// Namespace → the endpoints its slices list that no pod backs.
    sliced: HashMap<String, Vec<SliceEndpoint>>,
    /// Workload uid → namespace, for the workloads left out because
    /// another pod holds their address.
    dropped: HashMap<String, String>,
    /// The waypoints the pods were bound against.
    waypoints: BTreeMap<String, crate::waypoints::Waypoint>,
    /// Workloads and services made afresh on every translation (from
    /// slices, ServiceEntries, waypoints; or changed after their part, by a
    /// waypoint-only policy), by name: an equal one is replaced by this one.
    made: HashMap<String, Arc<Workload>>,
    made_services: HashMap<String, Arc<Service>>,
}

/// One pod's share of the translation: its workload, with the policies
/// that select it and its waypoint, and what was wrong.
#[derive(Clone, Debug)]
struct PodPart {
    pod: Arc<Pod>,
    namespace: Option<Arc<Namespace>>,
    workload: Option<Arc<Workload>>,
    errors: Vec<TranslateError>,
    /// Why its waypoint binding cannot be served: reported only if the
    /// workload is published (keeps its address).
    unbound: Option<TranslateError>,
}

#[derive(Clone, Debug)]
struct ServicePart {
    service: Arc<K8sService>,
    out: Result<Option<Arc<Service>>, TranslateError>,
}

fn same<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn namespace_of(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

fn pod_part(
    pod: &Arc<Pod>,
    namespace: Option<&Arc<Namespace>>,
    mesh: &Mesh,
    policies: &Policies,
    waypoints: &BTreeMap<String, crate::waypoints::Waypoint>,
) -> PodPart {
    let mut errors = Vec::new();
    let mut unbound = None;
    let ns = namespace.map(|n| &**n);
    let workload = match workload(pod, ns, mesh) {
        Ok(Some(mut w)) => {
            // Capture is IPv4 only: a pod with an IPv6 address would have
            // that traffic escape the mesh. It stays out of the mesh
            // whole, never half in it, and the log says why.
            if w.protocol == TunnelProtocol::Hbone && w.addresses.iter().any(IpAddr::is_ipv6) {
                w.protocol = TunnelProtocol::None;
                errors.push(TranslateError {
                    kind: "Pod",
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    field: "status.podIPs".into(),
                    message: "has an IPv6 address, and capture is IPv4 only: the pod is not captured (out of the mesh, never half in it)".into(),
                });
            }
            let no_labels = BTreeMap::new();
            let labels = pod.metadata.labels.as_ref();
            w.authorization_policies =
                policies.for_workload(&w.namespace, labels.unwrap_or(&no_labels));
            let (waypoint, problem) = crate::waypoints::workload_binding(&w, labels, ns, waypoints);
            w.waypoint = waypoint;
            unbound = problem;
            Some(Arc::new(w))
        }
        Ok(None) => None,
        Err(e) => {
            errors.push(e);
            None
        }
    };
    PodPart {
        pod: pod.clone(),
        namespace: namespace.cloned(),
        workload,
        errors,
        unbound,
    }
}

/// Translates pods, services and security policies. `previous` is the last
/// translation (with the same `mesh`): a policy that no longer translates
/// keeps its last accepted version (see [`policy::translate`]), and what
/// is made from the same objects as then is taken over, not made again.
pub fn translate(snap: &Snapshot, mesh: &Mesh, previous: Option<&Translation>) -> Translation {
    let policies = policy::translate(snap, mesh, previous.map(|t| &t.policies));
    let (waypoints, waypoint_errors) = crate::waypoints::waypoints(snap);
    let empty = Memo::default();
    let before = previous.map_or(&empty, |t| &t.memo);
    // Each pod's part is as before when its pod and namespace are the same
    // objects, and the policies and waypoints it was bound against too.
    let parts_hold = previous.is_some_and(|t| t.policies.selects_like(&policies))
        && before.waypoints == waypoints;
    let mut memo = Memo {
        waypoints,
        ..Memo::default()
    };
    memo.pods.reserve(snap.pods.len());
    // Namespaces whose Services must be made again: a pod in it came, went
    // or changed, or gained or lost its address.
    let mut dirty: HashSet<String> = HashSet::new();
    let mut errors = Vec::new();
    let mut candidates = Vec::with_capacity(snap.pods.len());
    let mut pods_unbound = Vec::new();
    let mut kept = 0;
    for (key, pod) in &snap.pods {
        let namespace = snap.namespaces.get(namespace_of(pod));
        let old = before.pods.get_key_value(key.as_str());
        if !old.is_some_and(|(_, p)| Arc::ptr_eq(&p.pod, pod)) {
            dirty.insert(namespace_of(pod).to_string());
        }
        kept += usize::from(old.is_some());
        let (key, part) = match old {
            Some((k, p))
                if parts_hold
                    && Arc::ptr_eq(&p.pod, pod)
                    && same(p.namespace.as_ref(), namespace) =>
            {
                (k.clone(), p.clone())
            }
            _ => {
                let mut part = pod_part(pod, namespace, mesh, &policies, &memo.waypoints);
                // Made again, and equal: still the same workload.
                if let (Some(new), Some(old)) =
                    (&part.workload, old.and_then(|(_, p)| p.workload.as_ref()))
                    && new == old
                {
                    part.workload = Some(old.clone());
                }
                (Arc::from(key.as_str()), part)
            }
        };
        errors.extend(part.errors.iter().cloned());
        if let (Some(e), Some(w)) = (&part.unbound, &part.workload) {
            pods_unbound.push((w.uid.clone(), e.clone()));
        }
        if let Some(w) = &part.workload {
            candidates.push((w.clone(), pod.metadata.deletion_timestamp.is_some()));
        }
        memo.pods.insert(key, part);
    }
    if kept < before.pods.len() {
        for (key, part) in &before.pods {
            if !snap.pods.contains_key(&**key) {
                dirty.insert(namespace_of(&part.pod).to_string());
            }
        }
    }
    let (workloads, conflicts, dropped) = claim_addresses(candidates);
    // Bindings are reported for the workloads published, as for services.
    let pods_unbound: Vec<TranslateError> = pods_unbound
        .into_iter()
        .filter(|(uid, _)| !dropped.contains_key(uid))
        .map(|(_, e)| e)
        .collect();
    let mut out = LocalConfig {
        workloads,
        ..LocalConfig::default()
    };
    errors.extend(conflicts);
    for (uid, ns) in before.dropped.iter().chain(&dropped) {
        if before.dropped.contains_key(uid) != dropped.contains_key(uid) {
            dirty.insert(ns.clone());
        }
    }
    memo.dropped = dropped;
    let pods_bound = out.workloads.len();
    let (sliced, slice_errors) = crate::endpoints::translate(snap, mesh);
    errors.extend(slice_errors);
    out.workloads
        .extend(sliced.iter().map(|e| Arc::new(e.workload.clone())));
    for e in sliced {
        memo.sliced.entry(e.namespace.clone()).or_default().push(e);
    }
    for ns in memo.sliced.keys().chain(before.sliced.keys()) {
        if memo.sliced.get(ns) != before.sliced.get(ns) {
            dirty.insert(ns.clone());
        }
    }
    let mut services = Vec::with_capacity(snap.services.len());
    let mut backing: HashMap<&str, Vec<(&Pod, &Workload)>> = HashMap::new();
    for (key, svc) in &snap.services {
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let old = before.services.get_key_value(key.as_str());
        let (key, part) = match old {
            Some((k, p)) if Arc::ptr_eq(&p.service, svc) && !dirty.contains(ns) => {
                (k.clone(), p.clone())
            }
            _ => {
                // The namespace's pods that are workloads, each with its own.
                let pods = backing.entry(ns).or_insert_with(|| {
                    crate::snapshot::in_namespace(&snap.pods, ns)
                        .filter_map(|(key, pod)| {
                            let w = memo.pods.get(key.as_str())?.workload.as_ref()?;
                            (!memo.dropped.contains_key(&w.uid)).then_some((&**pod, &**w))
                        })
                        .collect()
                });
                let name = svc.metadata.name.as_deref().unwrap_or_default();
                let sliced: Vec<&SliceEndpoint> = memo
                    .sliced
                    .get(ns)
                    .into_iter()
                    .flatten()
                    .filter(|e| e.service == name)
                    .collect();
                let was = old.and_then(|(_, p)| p.out.as_ref().ok()?.as_ref());
                let out = service(svc, pods, &sliced).map(|s| {
                    s.map(|s| {
                        was.filter(|w| ***w == s)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(s))
                    })
                });
                let part = ServicePart {
                    service: svc.clone(),
                    out,
                };
                (Arc::from(key.as_str()), part)
            }
        };
        match &part.out {
            Ok(Some(s)) => services.push(s.clone()),
            Ok(None) => {}
            Err(e) => errors.push(e.clone()),
        }
        memo.services.insert(key, part);
    }
    drop(backing);
    // ServiceEntries take no address a Service VIP or a pod holds.
    // (Only made when there are ServiceEntries: it names every address.)
    let mut taken = crate::service_entry::Taken::default();
    if !snap.service_entries.is_empty() {
        for s in &services {
            for ip in &s.vips {
                taken.addresses.insert(
                    *ip,
                    format!("the VIP of Service {}/{}", s.namespace, s.name),
                );
            }
        }
        for w in &out.workloads {
            for ip in &w.addresses {
                taken.addresses.insert(
                    *ip,
                    format!("the address of pod {}/{}", w.namespace, w.name),
                );
            }
        }
    }
    let (entries, refused) =
        crate::service_entry::translate(snap, mesh, &mut taken, &mut out.workloads);
    services.extend(entries.into_iter().map(Arc::new));
    out.services = services;
    let (unbound, mut bindings) = crate::waypoints::bind(
        snap,
        &mut out,
        &mesh.cluster_id,
        &memo.waypoints,
        pods_bound,
    );
    errors.extend(waypoint_errors);
    errors.extend(pods_unbound);
    errors.extend(unbound);
    // A refused ServiceEntry says why on its own status, as a Service's
    // binding does; what it would have served is not published.
    bindings.extend(refused.iter().map(|e| policy::Status {
        kind: e.kind,
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        accepted: false,
        reason: "Invalid",
        message: format!("{}: {}", e.field, e.message),
        condition: "Accepted",
    }));
    errors.extend(refused);
    // Istio's static STRICT policy goes out only once a workload needs it.
    let strict = policies.static_strict_key();
    let referenced = out
        .workloads
        .iter()
        .any(|w| w.authorization_policies.contains(&strict));
    out.policies = policies
        .authorizations
        .values()
        .filter(|a| referenced || a.key() != strict)
        .cloned()
        .collect();
    errors.extend(policies.errors.iter().cloned());
    let mut l7 = crate::routes::translate(snap, &out, &mesh.trust_domain, previous.map(|t| &t.l7));
    crate::l7_policy::translate(snap, mesh, &out, previous.map(|t| &t.l7), &mut l7);
    crate::telemetry::translate(snap, mesh, &out, previous.map(|t| &t.l7), &mut l7);
    // What the pods' and Services' parts gave, before the waypoint-only
    // policies change some of it.
    let from_parts: Vec<*const Workload> = out.workloads[..pods_bound]
        .iter()
        .map(Arc::as_ptr)
        .collect();
    let services_from_parts: HashSet<*const Service> = memo
        .services
        .values()
        .filter_map(|p| p.out.as_ref().ok()?.as_ref().map(Arc::as_ptr))
        .collect();
    if mesh.l7_policy_waypoint_only {
        crate::bypass::waypoint_only(&mut out, &l7.resources, &mesh.trust_domain);
    }
    // What was made afresh is replaced by the previous translation's equal
    // one, so that everything unchanged stays shared.
    for (i, w) in out.workloads.iter_mut().enumerate() {
        if from_parts.get(i) == Some(&Arc::as_ptr(w)) {
            continue;
        }
        match before.made.get(&w.uid) {
            Some(old) if old == w => *w = old.clone(),
            _ => {}
        }
        memo.made.insert(w.uid.clone(), w.clone());
    }
    for svc in &mut out.services {
        if services_from_parts.contains(&Arc::as_ptr(svc)) {
            continue;
        }
        let key = weft_xds::convert::service_key(svc);
        match before.made_services.get(&key) {
            Some(old) if old == svc => *svc = old.clone(),
            _ => {}
        }
        memo.made_services.insert(key, svc.clone());
    }
    Translation {
        config: out,
        errors,
        policies,
        l7,
        bindings,
        memo,
    }
}

/// Translates a snapshot with no history. Returns the config and what was left out.
pub fn workloads(snap: &Snapshot, mesh: &Mesh) -> (LocalConfig, Vec<TranslateError>) {
    let t = translate(snap, mesh, None);
    (t.config, t.errors)
}

/// Gives each pod address to exactly one workload, so that no connection is
/// ever attributed to another pod's identity. `candidates` pairs each workload
/// with whether its pod is being deleted.
/// - Host-network pods share their node's address by design: never a conflict.
/// - A pod being deleted loses its address to one that is not (addresses are
///   reused during pod churn) and is left out.
/// - When two or more claimants remain, each is reported, and all stay
///   published: ztunnel resolves the address to none of them and refuses
///   its connections, while the pods stay captured. Leaving them out would
///   release capture, and their traffic would flow in plaintext.
///
/// Also returns the uids (with their namespaces) of the workloads left out.
fn claim_addresses(
    candidates: Vec<(Arc<Workload>, bool)>,
) -> (
    Vec<Arc<Workload>>,
    Vec<TranslateError>,
    HashMap<String, String>,
) {
    // Each address's first claimant; the claimants of an address claimed
    // more than once, in address order.
    let mut first: HashMap<IpAddr, usize> = HashMap::with_capacity(candidates.len());
    let mut contested: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
    for (i, (w, _)) in candidates.iter().enumerate() {
        if !w.host_network {
            for ip in &w.addresses {
                match first.entry(*ip) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(i);
                    }
                    std::collections::hash_map::Entry::Occupied(e) => contested
                        .entry(*ip)
                        .or_insert_with(|| vec![*e.get()])
                        .push(i),
                }
            }
        }
    }
    let mut dropped: BTreeSet<usize> = BTreeSet::new();
    let mut errors = Vec::new();
    for (ip, claimants) in &contested {
        let live: Vec<usize> = claimants
            .iter()
            .copied()
            .filter(|i| !candidates[*i].1)
            .collect();
        if live.len() == 1 {
            dropped.extend(claimants.iter().filter(|i| !live.contains(i)));
            continue;
        }
        let name = |i: usize| format!("{}/{}", candidates[i].0.namespace, candidates[i].0.name);
        for &i in claimants {
            let others: Vec<String> = claimants
                .iter()
                .filter(|j| **j != i)
                .map(|j| name(*j))
                .collect();
            let w = &candidates[i].0;
            errors.push(TranslateError {
                kind: "Pod",
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                field: "status.podIP".into(),
                message: format!(
                    "{ip} is also claimed by pod {}; connections to and from it are refused until one lets it go",
                    others.join(", ")
                ),
            });
        }
    }
    let left_out = dropped
        .iter()
        .map(|i| {
            (
                candidates[*i].0.uid.clone(),
                candidates[*i].0.namespace.clone(),
            )
        })
        .collect();
    let workloads = candidates
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i))
        .map(|(_, (w, _))| w)
        .collect();
    (workloads, errors, left_out)
}

fn workload(
    pod: &Pod,
    ns: Option<&Namespace>,
    mesh: &Mesh,
) -> Result<Option<Workload>, TranslateError> {
    let (namespace, name) = names(&pod.metadata);
    let err = TranslateError::about("Pod", &namespace, &name);
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let Some(node) = spec.and_then(|s| s.node_name.clone()) else {
        // Not scheduled yet: nothing to route to.
        return Ok(None);
    };
    // A finished pod keeps its status IP, which the network may already have
    // given to a new pod: it is no workload (as in Istio).
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return Ok(None);
    }
    let mut addresses = Vec::new();
    let ips = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| ips.iter().map(|i| i.ip.clone()).collect::<Vec<_>>())
        .filter(|v| !v.is_empty())
        .or_else(|| status.and_then(|s| s.pod_ip.clone()).map(|ip| vec![ip]))
        .unwrap_or_default();
    for ip in ips {
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| err("status.podIP", format!("{ip:?} is not an IP address")))?;
        addresses.push(parsed);
    }
    if addresses.is_empty() {
        return Ok(None);
    }
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    Identity::new(&mesh.trust_domain, &namespace, &service_account)
        .map_err(|e| err("spec.serviceAccountName", e.to_string()))?;
    let wl_name = workload_name(pod);
    let canonical_name = first_label(
        pod,
        &[labels::CANONICAL_NAME, "app.kubernetes.io/name", "app"],
    )
    .unwrap_or_else(|| wl_name.clone());
    let canonical_revision = first_label(
        pod,
        &[
            labels::CANONICAL_REVISION,
            "app.kubernetes.io/version",
            "version",
        ],
    )
    .unwrap_or_else(|| "latest".into());
    let named_ports = spec
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    let port = u16::try_from(p.container_port).ok()?;
                    Some((p.name.clone()?, port))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Some(Workload {
        uid: format!("{}//Pod/{namespace}/{name}", mesh.cluster_id),
        protocol: if captured(pod, ns) {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        name,
        namespace,
        workload_name: wl_name,
        canonical_name,
        canonical_revision,
        service_account,
        trust_domain: mesh.trust_domain.clone(),
        node,
        addresses,
        named_ports,
        authorization_policies: Vec::new(),
        host_network: spec.and_then(|s| s.host_network) == Some(true),
        healthy: pod_ready(pod) && pod.metadata.deletion_timestamp.is_none(),
        waypoint: None,
    }))
}

/// A pod's Ready condition. A status with no conditions at all (a
/// hand-written manifest; the kubelet always reports some) counts as ready.
fn pod_ready(pod: &Pod) -> bool {
    match pod.status.as_ref().and_then(|s| s.conditions.as_ref()) {
        None => true,
        Some(conditions) => conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True"),
    }
}

/// `pods` are the pods of the service's namespace; `sliced` the endpoints
/// its EndpointSlices list that no pod backs.
fn service(
    svc: &K8sService,
    pods: &[(&Pod, &Workload)],
    sliced: &[&SliceEndpoint],
) -> Result<Option<Service>, TranslateError> {
    let (namespace, name) = names(&svc.metadata);
    let err = TranslateError::about("Service", &namespace, &name);
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    let mut vips = Vec::new();
    let ips = spec
        .cluster_ips
        .clone()
        .filter(|v| !v.is_empty())
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    for ip in ips
        .iter()
        .filter(|ip| ip.as_str() != "None" && !ip.is_empty())
    {
        vips.push(
            ip.parse::<IpAddr>()
                .map_err(|_| err("spec.clusterIP", format!("{ip:?} is not an IP address")))?,
        );
    }
    if vips.is_empty() {
        // Headless: clients reach pods directly; nothing to resolve.
        return Ok(None);
    }
    // Service port → target (number, or a container port name).
    let mut ports = Vec::new();
    let mut targets: Vec<(u16, Option<String>)> = Vec::new();
    let mut port_names: Vec<String> = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let port = u16::try_from(p.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| {
                err(
                    "spec.ports.port",
                    format!("port {} at index {i} is out of range", p.port),
                )
            })?;
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let (number, named) = match &p.target_port {
            None => (port, None),
            Some(IntOrString::Int(n)) => (
                u16::try_from(*n).ok().filter(|n| *n != 0).ok_or_else(|| {
                    err(
                        "spec.ports.targetPort",
                        format!("{n} at index {i} is out of range"),
                    )
                })?,
                None,
            ),
            Some(IntOrString::String(s)) => (0, Some(s.clone())),
        };
        ports.push(ServicePort {
            port,
            target_port: number,
            protocol: AppProtocol::declared(p.app_protocol.as_deref(), p.name.as_deref()),
        });
        targets.push((port, named));
        port_names.push(p.name.clone().unwrap_or_default());
    }
    // Not-ready endpoints only where the Service asks for them.
    let not_ready_too = spec.publish_not_ready_addresses == Some(true);
    let selector = spec.selector.clone().unwrap_or_default();
    let mut endpoints = Vec::new();
    if !selector.is_empty() {
        for (pod, w) in pods {
            let labels = pod.metadata.labels.as_ref();
            if !selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            {
                continue;
            }
            let uid = w.uid.clone();
            if !w.healthy && !not_ready_too {
                continue;
            }
            let mut map = BTreeMap::new();
            for ((port, named), sp) in targets.iter().zip(&ports) {
                let target = match named {
                    None => Some(sp.target_port),
                    Some(n) => w.named_ports.get(n).copied(),
                };
                if let Some(t) = target {
                    map.insert(*port, t);
                }
            }
            endpoints.push(Endpoint {
                workload_uid: uid,
                ports: map,
            });
        }
    }
    // Endpoints no pod backs (a selector-less Service's, say): their
    // slices' ports by name, as kube-proxy matches them.
    for ep in sliced {
        if !ep.workload.healthy && !not_ready_too {
            continue;
        }
        let map: BTreeMap<u16, u16> = ports
            .iter()
            .zip(&port_names)
            .filter_map(|(sp, name)| Some((sp.port, *ep.ports.get(name)?)))
            .collect();
        if !map.is_empty() {
            endpoints.push(Endpoint {
                workload_uid: ep.workload.uid.clone(),
                ports: map,
            });
        }
    }
    Ok(Some(Service {
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        name,
        namespace,
        vips,
        ports,
        endpoints,
        waypoint: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;
    use crate::xds::Published;

    fn translate(yaml: &str) -> (LocalConfig, Vec<String>) {
        let mut snap = Snapshot::default();
        let errs = parse(yaml, "t.yaml", &mut snap);
        assert!(errs.is_empty(), "{errs:?}");
        let (cfg, errors) = workloads(&snap, &Mesh::default());
        (cfg, errors.iter().map(ToString::to_string).collect())
    }

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, version: v2}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, labels: {istio.io/dataplane-mode: none, app: web}}
spec: {nodeName: n1, containers: [{name: app, ports: [{name: http, containerPort: 9090}]}]}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy}
spec: {nodeName: n2, containers: [{name: app}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-in, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n2, containers: [{name: app}]}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: shop}
spec: {containers: [{name: app}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: http}, {port: 81, targetPort: 8081}]
"#;

    /// Capture follows the namespace label, and a pod's own label overrides it.
    #[test]
    fn capture_labels() {
        let (cfg, errors) = translate(BASE);
        assert!(errors.is_empty(), "{errors:?}");
        let proto: BTreeMap<&str, TunnelProtocol> = cfg
            .workloads
            .iter()
            .map(|w| (w.name.as_str(), w.protocol))
            .collect();
        assert_eq!(proto["web-1"], TunnelProtocol::Hbone);
        assert_eq!(proto["opted-out"], TunnelProtocol::None);
        assert_eq!(proto["old"], TunnelProtocol::None);
        assert_eq!(proto["opted-in"], TunnelProtocol::Hbone);
        assert!(
            !proto.contains_key("pending"),
            "unscheduled pods are left out"
        );
    }

    /// Identity, metric names and named target ports come from the pod.
    #[test]
    fn workload_fields_and_endpoints() {
        let (cfg, _) = translate(BASE);
        let web = cfg.workloads.iter().find(|w| w.name == "web-1").unwrap();
        assert_eq!(
            web.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(web.canonical_name, "web");
        assert_eq!(web.canonical_revision, "v2");
        let svc = &cfg.services[0];
        assert_eq!(svc.hostname, "web.shop.svc.cluster.local");
        let ports: Vec<(String, BTreeMap<u16, u16>)> = svc
            .endpoints
            .iter()
            .map(|e| (e.workload_uid.clone(), e.ports.clone()))
            .collect();
        assert_eq!(
            ports,
            vec![
                (
                    "Kubernetes//Pod/shop/opted-out".to_string(),
                    BTreeMap::from([(80, 9090), (81, 8081)])
                ),
                (
                    "Kubernetes//Pod/shop/web-1".to_string(),
                    BTreeMap::from([(80, 8080), (81, 8081)])
                ),
            ]
        );
    }

    /// Bad fields are reported with resource and field, and only that resource is dropped.
    #[test]
    fn refusals() {
        let bad = format!(
            "{BASE}\n---\n{}",
            r#"apiVersion: v1
kind: Pod
metadata: {name: badip, namespace: shop}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: "10.0.0.999"}
---
apiVersion: v1
kind: Pod
metadata: {name: badsa, namespace: shop}
spec: {nodeName: n1, serviceAccountName: "a/b", containers: [{name: app}]}
status: {podIP: 10.244.1.99}
---
apiVersion: v1
kind: Service
metadata: {name: badport, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 70000}]}
---
apiVersion: v1
kind: Service
metadata: {name: badvip, namespace: shop}
spec: {clusterIP: "10.96.0", ports: [{port: 80}]}
"#
        );
        let (cfg, errors) = translate(&bad);
        assert_eq!(
            errors,
            vec![
                "Pod shop/badip: status.podIP: \"10.0.0.999\" is not an IP address",
                "Pod shop/badsa: spec.serviceAccountName: identity \"spiffe://cluster.local/ns/shop/sa/a/b\" has an empty or invalid segment",
                "Service shop/badport: spec.ports.port: port 70000 at index 0 is out of range",
                "Service shop/badvip: spec.clusterIP: \"10.96.0\" is not an IP address",
            ]
        );
        assert_eq!(cfg.workloads.len(), 4);
        assert_eq!(cfg.services.len(), 1);
    }

    /// A pod in namespace shop on n1 at `ip`; `meta`, `spec` and `status`
    /// add fields to those maps (each starts with ", ").
    fn pod(name: &str, ip: &str, meta: &str, spec: &str, status: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop{meta}}}\nspec: {{nodeName: n1, containers: [{{name: app}}]{spec}}}\nstatus: {{podIP: {ip}{status}}}\n"
        )
    }

    /// Each address identifies at most one workload: finished pods are none,
    /// host-network pods never conflict, a pod being deleted loses its
    /// address to a live one, and live pods that claim one address are each
    /// reported, naming the others, and kept (so they stay captured).
    #[test]
    fn one_workload_per_address() {
        const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
        let deleting = ", deletionTimestamp: \"2026-12-01T00:00:00Z\"";
        let cases: Vec<(&str, String, Vec<&str>, Vec<&str>)> = vec![
            (
                "finished pods are not workloads; their address goes to the running one",
                [
                    pod("done", "10.244.1.5", "", "", ", phase: Succeeded"),
                    pod("crashed", "10.244.1.5", "", "", ", phase: Failed"),
                    pod("new", "10.244.1.5", "", "", ", phase: Running"),
                ]
                .concat(),
                vec!["new"],
                vec![],
            ),
            (
                "host-network pods share the node's address without conflict",
                [
                    pod("agent-a", "10.240.0.10", "", ", hostNetwork: true", ""),
                    pod("agent-b", "10.240.0.10", "", ", hostNetwork: true", ""),
                ]
                .concat(),
                vec!["agent-a", "agent-b"],
                vec![],
            ),
            (
                "a pod being deleted loses its address to a live one",
                [
                    pod("old", "10.244.1.6", deleting, "", ""),
                    pod("new", "10.244.1.6", "", "", ""),
                ]
                .concat(),
                vec!["new"],
                vec![],
            ),
            (
                "two live claimants: both reported, both kept (ztunnel refuses the address, capture stays)",
                [
                    pod("a", "10.244.1.7", "", "", ""),
                    pod("b", "10.244.1.7", "", "", ""),
                    pod("c", "10.244.1.8", "", "", ""),
                ]
                .concat(),
                vec!["a", "b", "c"],
                vec![
                    "Pod shop/a: status.podIP: 10.244.1.7 is also claimed by pod shop/b",
                    "Pod shop/b: status.podIP: 10.244.1.7 is also claimed by pod shop/a",
                ],
            ),
            (
                "two claimants both being deleted: both reported, both kept",
                [
                    pod("a", "10.244.1.9", deleting, "", ""),
                    pod("b", "10.244.1.9", deleting, "", ""),
                ]
                .concat(),
                vec!["a", "b"],
                vec![
                    "Pod shop/a: status.podIP: 10.244.1.9 is also claimed by pod shop/b",
                    "Pod shop/b: status.podIP: 10.244.1.9 is also claimed by pod shop/a",
                ],
            ),
        ];
        for (what, pods, served, reported) in cases {
            let (cfg, errors) = translate(&format!("{NS}{pods}"));
            let names: Vec<&str> = cfg.workloads.iter().map(|w| w.name.as_str()).collect();
            assert_eq!(names, served, "{what}");
            assert_eq!(errors.len(), reported.len(), "{what}: {errors:?}");
            for (got, want) in errors.iter().zip(&reported) {
                assert!(got.starts_with(want), "{what}: {got:?} is not {want:?}…");
            }
            for w in &cfg.workloads {
                let host = w.name.starts_with("agent");
                assert_eq!(w.host_network, host, "{what}: {}", w.name);
                if host {
                    assert_eq!(
                        w.protocol,
                        TunnelProtocol::None,
                        "{what}: host pods are never captured"
                    );
                }
            }
        }
    }

    /// Endpoints as Istio's ambient mode takes them: pods that are Ready and
    /// not being deleted (unless the Service publishes not-ready addresses),
    /// and the EndpointSlice endpoints no pod backs, by port name.
    #[test]
    fn endpoints_from_ready_pods_and_from_slices() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: ready, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.10, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: starting, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.11, conditions: [{type: PodScheduled, status: "True"}, {type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: leaving, namespace: shop, labels: {app: web}, deletionTimestamp: "2026-01-01T00:00:00Z"}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.12, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web-all, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: web}, publishNotReadyAddresses: true, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.12, ports: [{name: sql, port: 5432}, {name: admin, port: 9000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-1, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: sql, port: 15432}, {name: admin, port: 19000, protocol: UDP}]
endpoints:
- addresses: [192.0.2.10]
- addresses: [192.0.2.11]
  conditions: {ready: false}
- addresses: [10.244.1.10]
  targetRef: {kind: Pod, name: ready, namespace: shop}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: db-fqdn, namespace: shop, labels: {kubernetes.io/service-name: db}}
addressType: FQDN
endpoints: [{addresses: [db.example.com]}]
"#;
        let (cfg, errors) = translate(yaml);
        assert_eq!(
            errors,
            [
                "EndpointSlice shop/db-fqdn: addressType: \"FQDN\" is not supported: want IPv4 or IPv6"
            ]
        );
        let eps = |svc: &str| -> Vec<String> {
            let s = cfg.services.iter().find(|s| s.name == svc).unwrap();
            s.endpoints
                .iter()
                .map(|e| e.workload_uid.rsplit('/').next().unwrap().to_string())
                .collect()
        };
        assert_eq!(eps("web"), ["ready"]);
        assert_eq!(eps("web-all"), ["leaving", "ready", "starting"]);
        assert_eq!(eps("db"), ["192.0.2.10"]);
        let db = cfg.services.iter().find(|s| s.name == "db").unwrap();
        // sql by name; admin's slice port is UDP, so it has none.
        assert_eq!(db.endpoints[0].ports, BTreeMap::from([(5432, 15432)]));
        let w = cfg
            .workloads
            .iter()
            .find(|w| w.uid == db.endpoints[0].workload_uid)
            .unwrap();
        assert_eq!(w.protocol, TunnelProtocol::None);
        assert!(w.healthy);
        // Unhealthy pods stay workloads (their own traffic is captured),
        // marked so.
        let starting = cfg.workloads.iter().find(|w| w.name == "starting").unwrap();
        assert!(!starting.healthy);
    }

    /// A dual-stack or IPv6 pod in an ambient namespace is kept out of the
    /// mesh whole, with the reason logged; an IPv4 one is captured.
    #[test]
    fn ipv6_pods_are_refused_capture() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: dual, namespace: shop}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.10, podIPs: [{ip: 10.244.1.10}, {ip: "fd00::10"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v4, namespace: shop}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.11}
"#;
        let (cfg, errors) = translate(yaml);
        assert_eq!(
            errors,
            [
                "Pod shop/dual: status.podIPs: has an IPv6 address, and capture is IPv4 only: the pod is not captured (out of the mesh, never half in it)"
            ]
        );
        let proto = |n: &str| cfg.workloads.iter().find(|w| w.name == n).unwrap().protocol;
        assert_eq!(proto("dual"), TunnelProtocol::None);
        assert_eq!(proto("v4"), TunnelProtocol::Hbone);
    }

    /// A headless Service has no VIP to resolve: it is not published and is
    /// no error; its pods stay workloads that clients dial directly.
    #[test]
    fn headless_services_leave_pods_direct() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
"#;
        let (cfg, errors) = translate(yaml);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(cfg.services.is_empty());
        let w = cfg.workloads.iter().find(|w| w.name == "db-0").unwrap();
        assert_eq!(w.protocol, TunnelProtocol::Hbone);
    }

    /// One random object of the incremental test's little cluster.
    fn random_doc(id: &str, next: &mut dyn FnMut(u64) -> u64) -> String {
        let ns = |n: u64| format!("ns-{n}");
        let (kind, index) = id.split_once('-').unwrap();
        match kind {
            "namespace" => {
                let mode = ["ambient", "none", ""][next(3) as usize];
                let waypoint = if next(3) == 0 {
                    ", istio.io/use-waypoint: wp"
                } else {
                    ""
                };
                format!(
                    "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{index}, labels: {{istio.io/dataplane-mode: '{mode}'{waypoint}}}}}\n"
                )
            }
            "pod" => {
                let deleting = if next(4) == 0 {
                    ", deletionTimestamp: \"2026-01-01T00:00:00Z\""
                } else {
                    ""
                };
                let waypoint = match next(6) {
                    0 => ", istio.io/use-waypoint: wp",
                    1 => ", istio.io/use-waypoint: none",
                    _ => "",
                };
                let node = if next(8) == 0 {
                    String::new()
                } else {
                    format!("nodeName: n{}, ", next(2))
                };
                let phase = ["Running", "Running", "Running", "Succeeded"][next(4) as usize];
                let ready = ["True", "False"][usize::from(next(4) == 0)];
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{index}, namespace: {}, labels: {{app: a{}, version: v{}{waypoint}}}{deleting}}}\n\
                     spec: {{{node}serviceAccountName: sa{}, containers: [{{name: c, ports: [{{name: http, containerPort: {}}}]}}]}}\n\
                     status: {{phase: {phase}, podIP: 10.0.0.{}, conditions: [{{type: Ready, status: '{ready}'}}]}}\n",
                    ns(next(3)),
                    next(3),
                    next(2),
                    next(2),
                    8080 + next(2),
                    1 + next(8),
                )
            }
            "service" => {
                let target = ["http", "9090"][next(2) as usize];
                let not_ready = next(2) == 0;
                let waypoint = if next(4) == 0 {
                    ", labels: {istio.io/use-waypoint: wp}"
                } else {
                    ""
                };
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{index}, namespace: {}{waypoint}}}\n\
                     spec: {{publishNotReadyAddresses: {not_ready}, clusterIP: 10.96.0.{}, selector: {{app: a{}}}, ports: [{{name: http, port: 80, targetPort: {target}}}]}}\n",
                    ns(next(3)),
                    1 + next(6),
                    next(3),
                )
            }
            "policy" => format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: ap-{index}, namespace: {}}}\n\
                 spec: {{selector: {{matchLabels: {{app: a{}}}}}, rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/x/sa/y\"]}}}}]}}]}}\n",
                ["ns-0", "ns-1", "istio-system"][next(3) as usize],
                next(3),
            ),
            "peer" => format!(
                "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: pa-{index}, namespace: {}}}\n\
                 spec: {{mtls: {{mode: {}}}}}\n",
                ns(next(3)),
                ["STRICT", "PERMISSIVE"][next(2) as usize],
            ),
            "gateway" => format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: wp, namespace: ns-{index}, labels: {{istio.io/waypoint-for: {}}}}}\n\
                 spec: {{gatewayClassName: istio-waypoint, listeners: [{{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {{namespaces: {{from: All}}}}}}]}}\n",
                ["service", "workload", "all"][next(3) as usize],
            ),
            "slice" => format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: es-{index}, namespace: {}, labels: {{kubernetes.io/service-name: svc-{}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 7000}}]\nendpoints: [{{addresses: [192.0.2.{}], conditions: {{ready: {}}}}}, {{addresses: [192.0.2.{}], conditions: {{ready: {}}}}}]\n",
                ns(next(3)),
                next(4),
                1 + next(3),
                next(3) != 0,
                1 + next(3),
                next(3) != 0,
            ),
            "entry" => format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: se-{index}, namespace: {}}}\n\
                 spec: {{hosts: [h{}.example.com], addresses: [10.0.0.{}], ports: [{{number: 80, name: http}}], resolution: STATIC, endpoints: [{{address: 192.0.2.{}}}]}}\n",
                ns(next(3)),
                next(2),
                1 + next(14),
                10 + next(3),
            ),
            other => panic!("{other}"),
        }
    }

    /// A translation that takes over what it can from the previous one
    /// gives exactly what a translation from scratch gives, round after
    /// round of random changes: pods that come, go, change labels, take
    /// each other's addresses or finish; Services, namespaces, policies,
    /// waypoints, slices and ServiceEntries that change under them. And
    /// what did not change is shared with the previous translation.
    #[test]
    fn incremental_translation_answers_as_a_fresh_one() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let ids: Vec<String> = (0..3)
            .map(|i| format!("namespace-{i}"))
            .chain((0..24).map(|i| format!("pod-{i}")))
            .chain((0..6).map(|i| format!("service-{i}")))
            .chain((0..3).map(|i| format!("policy-{i}")))
            .chain((0..2).map(|i| format!("peer-{i}")))
            .chain((0..2).map(|i| format!("gateway-{i}")))
            .chain((0..2).map(|i| format!("slice-{i}")))
            .chain((0..2).map(|i| format!("entry-{i}")))
            .collect();
        // Each object parsed alone, so an unchanged one stays the same `Arc`.
        let mut docs: BTreeMap<String, Snapshot> = BTreeMap::new();
        let parse_doc = |id: &str, next: &mut dyn FnMut(u64) -> u64| {
            let mut one = Snapshot::default();
            let errs = parse(&random_doc(id, next), "t.yaml", &mut one);
            assert!(errs.is_empty(), "{id}: {errs:?}");
            one
        };
        for id in &ids {
            if id.starts_with("pod") || id.starts_with("namespace") || next(2) == 0 {
                docs.insert(id.clone(), parse_doc(id, &mut next));
            }
        }
        let mesh = Mesh::default();
        let mut previous: Option<Translation> = None;
        let mut published = Published::default();
        let mut shared = 0;
        for round in 0..600 {
            let mut touched = BTreeSet::new();
            for _ in 0..1 + next(3) {
                let id = &ids[next(ids.len() as u64) as usize];
                touched.insert(id.clone());
                if next(5) == 0 && !id.starts_with("namespace") {
                    docs.remove(id);
                } else {
                    docs.insert(id.clone(), parse_doc(id, &mut next));
                }
            }
            let mut snap = Snapshot::default();
            for one in docs.values() {
                // Two random objects may share a name: the first is kept.
                let _ = snap.merge(one, "t.yaml");
            }
            let fresh = super::translate(&snap, &mesh, None);
            let incremental = super::translate(&snap, &mesh, previous.as_ref());
            assert_eq!(
                incremental.config, fresh.config,
                "round {round}: the config"
            );
            assert_eq!(
                incremental.errors, fresh.errors,
                "round {round}: the errors"
            );
            assert_eq!(
                incremental.statuses().collect::<Vec<_>>(),
                fresh.statuses().collect::<Vec<_>>(),
                "round {round}: the statuses"
            );
            if let Some(before) = &previous {
                let old: HashMap<&str, &Arc<Workload>> = before
                    .config
                    .workloads
                    .iter()
                    .map(|w| (w.uid.as_str(), w))
                    .collect();
                for w in &incremental.config.workloads {
                    if let Some(o) = old.get(w.uid.as_str()).filter(|o| ****o == **w) {
                        assert!(
                            Arc::ptr_eq(o, w),
                            "round {round}: {} is equal but not shared",
                            w.uid
                        );
                        shared += 1;
                    }
                }
            }
            // The encoder, which tells the unchanged by pointer, serves what
            // an encoder that knows nothing of the previous config serves.
            let next = Published::build(
                &incremental.config,
                &incremental.l7.resources,
                &published,
                previous.as_ref().map(|p| &p.config),
            );
            let scratch = Published::build(
                &incremental.config,
                &incremental.l7.resources,
                &Published::default(),
                None,
            );
            let versions = |p: &Published| -> Vec<(&str, String, String)> {
                p.resources
                    .iter()
                    .flat_map(|(ty, m)| m.iter().map(|(n, v)| (*ty, n.clone(), v.version.clone())))
                    .collect()
            };
            assert_eq!(
                versions(&next),
                versions(&scratch),
                "round {round}: the resources"
            );
            published = next;
            previous = Some(incremental);
        }
        assert!(shared > 1000, "only {shared} workloads were shared");
    }
}
