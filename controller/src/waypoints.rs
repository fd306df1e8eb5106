//! Waypoints: Gateway API `Gateway`s of class `istio-waypoint`, and the
//! `istio.io/use-waypoint` bindings of services and workloads to them, with
//! Istio's meaning. Pure, like the rest of the translation.
//!
//! A binding that does not resolve (no such waypoint, a waypoint that does
//! not serve that kind, or one whose `allowedRoutes` does not admit the
//! binding's namespace) is published as a reference to a hostname that can
//! never resolve, never as "no waypoint": the traffic it covers is refused
//! instead of going around the L7 policy. The error names why.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};
use weft_api::{Endpoint, LocalConfig, Service, ServicePort, WaypointRef, Workload};

use crate::Snapshot;
use crate::policy::{Status, WAYPOINT_BOUND};
use crate::translate::{TranslateError, names};

pub const WAYPOINT_CLASS: &str = "istio-waypoint";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
/// The label Gateway API implementations put on a Gateway's pods.
pub const GATEWAY_NAME: &str = "gateway.networking.k8s.io/gateway-name";
/// Istio's HBONE port, on which a waypoint listens.
pub const HBONE_PORT: u16 = 15008;
/// The reserved TLD (RFC 2606) of references that must never resolve.
const UNRESOLVED_TLD: &str = "waypoint.invalid";

/// `gateway.networking.k8s.io/v1` `Gateway`, the fields a waypoint reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Gateway {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Labels and annotations for what is deployed, and a ConfigMap that
    /// overlays it (Gateway API's `infrastructure`, as Istio reads it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<Infrastructure>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<ParametersRef>,
}

/// A local object of `group`/`kind` named `name` (a ConfigMap, for Istio).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParametersRef {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub port: u32,
    #[serde(default)]
    pub protocol: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<AllowedRoutes>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AllowedRoutes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<RouteNamespaces>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteNamespaces {
    /// `Same` (the default), `All` or `Selector`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// What a waypoint serves (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

/// A Gateway that declares a waypoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub serves: WaypointFor,
    /// The HBONE listener's `allowedRoutes.namespaces`.
    from: RouteNamespaces,
}

impl Waypoint {
    /// The waypoint's Service hostname.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn reference(&self) -> WaypointRef {
        WaypointRef {
            namespace: self.namespace.clone(),
            hostname: self.hostname(),
            port: HBONE_PORT,
        }
    }

    /// Whether the listener admits bindings from namespace `ns`.
    fn admits(&self, ns: &str, namespace: Option<&Namespace>) -> bool {
        match self.from.from.as_deref().unwrap_or("Same") {
            "All" => true,
            "Selector" => {
                let want = self
                    .from
                    .selector
                    .as_ref()
                    .map(|s| &s.match_labels)
                    .cloned()
                    .unwrap_or_default();
                let have = namespace.and_then(|n| n.metadata.labels.as_ref());
                want.iter()
                    .all(|(k, v)| have.and_then(|h| h.get(k)) == Some(v))
            }
            _ => ns == self.namespace,
        }
    }
}

/// The waypoints the snapshot declares, by `namespace/name`; Gateways that
/// name our class but cannot be one are errors.
pub fn waypoints(snap: &Snapshot) -> (BTreeMap<String, Waypoint>, Vec<TranslateError>) {
    let mut out = BTreeMap::new();
    let mut errors = Vec::new();
    for gw in snap.gateways.values() {
        if gw.spec.gateway_class_name != WAYPOINT_CLASS {
            continue;
        }
        let (namespace, name) = names(&gw.metadata);
        let err = TranslateError::about("Gateway", &namespace, &name);
        let Some(listener) = gw
            .spec
            .listeners
            .iter()
            .find(|l| l.protocol == "HBONE" && l.port == u32::from(HBONE_PORT))
        else {
            errors.push(err(
                "spec.listeners",
                format!("a waypoint needs a listener with protocol HBONE and port {HBONE_PORT}"),
            ));
            continue;
        };
        let label = gw
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(WAYPOINT_FOR))
            .map(String::as_str);
        let serves = match label {
            None | Some("service") => WaypointFor::Service,
            Some("workload") => WaypointFor::Workload,
            Some("all") => WaypointFor::All,
            Some("none") => WaypointFor::None,
            Some(other) => {
                errors.push(err(
                    &format!("metadata.labels[{WAYPOINT_FOR}]"),
                    format!("{other:?} is not one of service, workload, all, none"),
                ));
                continue;
            }
        };
        let from = listener
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.clone())
            .unwrap_or_default();
        let w = Waypoint {
            namespace,
            name,
            serves,
            from,
        };
        out.insert(w.key(), w);
    }
    (out, errors)
}

/// Whether `labels` mark a waypoint's own pod (never bound to a waypoint).
pub fn is_waypoint_pod(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels.is_some_and(|l| l.contains_key(GATEWAY_NAME))
}

/// The kind of thing being bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bound {
    Service,
    Workload,
}

/// The binding `labels` (the object's, else its namespace's) ask for, resolved.
/// `Ok(None)`: no waypoint. `Err` carries the unresolvable reference, the
/// field, a reason for the status and why.
fn resolve(
    what: Bound,
    ns: &str,
    own: Option<&BTreeMap<String, String>>,
    namespace: Option<&Namespace>,
    waypoints: &BTreeMap<String, Waypoint>,
) -> Result<Option<WaypointRef>, Unresolved> {
    let ns_labels = namespace.and_then(|n| n.metadata.labels.as_ref());
    // The object's own label wins, with the namespace label beside it.
    let (labels, field) = match own.and_then(|l| l.get(USE_WAYPOINT)) {
        Some(_) => (own, "metadata.labels"),
        None => (ns_labels, "Namespace metadata.labels"),
    };
    let Some(name) = labels.and_then(|l| l.get(USE_WAYPOINT)) else {
        return Ok(None);
    };
    if name == "none" {
        return Ok(None);
    }
    let wns = labels
        .and_then(|l| l.get(USE_WAYPOINT_NAMESPACE))
        .cloned()
        .unwrap_or_else(|| ns.to_string());
    let key = format!("{wns}/{name}");
    let field = format!("{field}[{USE_WAYPOINT}]");
    let unresolved = |reason: &'static str, why: String| {
        let reference = WaypointRef {
            namespace: wns.clone(),
            hostname: format!("{name}.{wns}.{UNRESOLVED_TLD}"),
            port: HBONE_PORT,
        };
        Err(Unresolved {
            reference,
            field: field.clone(),
            reason,
            why,
        })
    };
    let Some(w) = waypoints.get(&key) else {
        return unresolved(
            "WaypointNotFound",
            format!(
                "no waypoint {key} (a Gateway of class {WAYPOINT_CLASS} with an HBONE listener on {HBONE_PORT}); its traffic is refused until there is one"
            ),
        );
    };
    let serves = matches!(
        (w.serves, what),
        (WaypointFor::All, _)
            | (WaypointFor::Service, Bound::Service)
            | (WaypointFor::Workload, Bound::Workload)
    );
    if !serves {
        // A namespace label binds whichever kinds the waypoint serves; the
        // others simply have none. An object's own label is a request.
        if labels != own {
            return Ok(None);
        }
        let kind = match what {
            Bound::Service => "services",
            Bound::Workload => "workloads",
        };
        return unresolved(
            "WaypointNotServing",
            format!(
                "waypoint {key} does not serve {kind} ({WAYPOINT_FOR} is {:?})",
                w.serves
            ),
        );
    }
    if !w.admits(ns, namespace) {
        return unresolved(
            "WaypointNotAllowed",
            format!(
                "waypoint {key} does not admit namespace {ns}: see its listener's allowedRoutes.namespaces"
            ),
        );
    }
    Ok(Some(w.reference()))
}

/// A binding that cannot be served.
struct Unresolved {
    /// What is published instead: a name no ztunnel resolves (fail closed).
    reference: WaypointRef,
    field: String,
    reason: &'static str,
    why: String,
}

/// The waypoint a workload's labels (`own`, a pod's) or its namespace's ask
/// for. A waypoint's own pod is never bound. A binding that cannot be
/// served names a waypoint no ztunnel resolves, so its traffic is refused
/// (fail closed), and comes with why.
pub fn workload_binding(
    w: &Workload,
    own: Option<&BTreeMap<String, String>>,
    namespace: Option<&Namespace>,
    waypoints: &BTreeMap<String, Waypoint>,
) -> (Option<WaypointRef>, Option<TranslateError>) {
    if is_waypoint_pod(own) {
        return (None, None);
    }
    match resolve(Bound::Workload, &w.namespace, own, namespace, waypoints) {
        Ok(r) => (r, None),
        Err(u) => {
            let problem = TranslateError {
                kind: "Pod",
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                field: u.field,
                message: u.why,
            };
            (Some(u.reference), Some(problem))
        }
    }
}

/// Binds services, and the workloads of `cfg` from index `pods_bound` on
/// (those no pod stands for: theirs were bound with [`workload_binding`]), to
/// their waypoints, and adds each waypoint's Service when the snapshot has
/// none (the manifests source: in Kubernetes the controller creates it),
/// its endpoints the Gateway's pods. Returns what was left unresolved, and
/// each bound Service's `istio.io/WaypointBound` status. An object whose
/// binding is as it was is not touched (it stays shared).
pub fn bind(
    snap: &Snapshot,
    cfg: &mut LocalConfig,
    cluster_id: &str,
    waypoints: &BTreeMap<String, Waypoint>,
    pods_bound: usize,
) -> (Vec<TranslateError>, Vec<Status>) {
    let mut errors = Vec::new();
    let mut statuses = Vec::new();
    let mut report = |kind: &'static str, ns: &str, name: &str, field: String, message: String| {
        errors.push(TranslateError {
            kind,
            namespace: ns.to_string(),
            name: name.to_string(),
            field,
            message,
        })
    };
    for svc in &mut cfg.services {
        // A service is a Service's, or one host of a ServiceEntry's.
        let (kind, own) = match crate::service_entry::origin(snap, svc) {
            Some(se) => ("ServiceEntry", se.metadata.labels.as_ref()),
            None => {
                let k8s = snap
                    .services
                    .get(&format!("{}/{}", svc.namespace, svc.name));
                ("Service", k8s.and_then(|s| s.metadata.labels.as_ref()))
            }
        };
        let namespace = snap.namespaces.get(&svc.namespace).map(|n| &**n);
        let status = |accepted, reason, message: String| Status {
            kind,
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            accepted,
            reason,
            message,
            condition: WAYPOINT_BOUND,
        };
        let waypoint = match resolve(Bound::Service, &svc.namespace, own, namespace, waypoints) {
            Ok(w) => {
                if let Some(r) = &w {
                    let gw = r.hostname.split('.').next().unwrap_or_default();
                    statuses.push(status(
                        true,
                        "WaypointAccepted",
                        format!("bound to waypoint {}/{gw}", r.namespace),
                    ));
                }
                w
            }
            Err(u) => {
                statuses.push(status(false, u.reason, format!("{}: {}", u.field, u.why)));
                report(kind, &svc.namespace, &svc.name, u.field, u.why);
                Some(u.reference)
            }
        };
        if svc.waypoint != waypoint {
            Arc::make_mut(svc).waypoint = waypoint;
        }
    }
    // The hosts of one ServiceEntry share its binding and its status.
    statuses.dedup_by(|a, b| a.kind == b.kind && a.namespace == b.namespace && a.name == b.name);
    for w in cfg.workloads.iter_mut().skip(pods_bound) {
        let namespace = snap.namespaces.get(&w.namespace).map(|n| &**n);
        let (waypoint, problem) = workload_binding(w, None, namespace, waypoints);
        errors.extend(problem);
        if waypoint != w.waypoint {
            Arc::make_mut(w).waypoint = waypoint;
        }
    }
    for wp in waypoints.values() {
        let hostname = wp.hostname();
        if cfg.services.iter().any(|s| s.hostname == hostname) {
            continue;
        }
        let svc = waypoint_service(wp, &cfg.workloads, snap, cluster_id);
        cfg.services.push(Arc::new(svc));
    }
    // A waypoint's Service, the cluster's (the Deployment's, selected by the
    // gateway-name label) or the one synthesized above, keeps only pods of
    // the Gateway's service account: a pod that copies the label must not
    // receive, or vouch for, bound traffic.
    let accounts: HashMap<String, (&str, &str)> = waypoints
        .values()
        .map(|w| (w.hostname(), (w.namespace.as_str(), w.name.as_str())))
        .collect();
    let workloads = &cfg.workloads;
    for svc in &mut cfg.services {
        let Some((_, account)) = accounts
            .get(&svc.hostname)
            .filter(|(ns, _)| *ns == svc.namespace)
        else {
            continue;
        };
        let keep = |ep: &Endpoint| {
            workloads
                .iter()
                .find(|w| w.uid == ep.workload_uid)
                .is_some_and(|w| w.service_account == *account)
        };
        if !svc.endpoints.iter().all(keep) {
            Arc::make_mut(svc).endpoints.retain(keep);
        }
    }
    (errors, statuses)
}

/// A waypoint's Service, as the controller would create it: port 15008 on
/// the Gateway's pods. It has no VIP: clients find it by hostname.
fn waypoint_service(
    wp: &Waypoint,
    workloads: &[Arc<Workload>],
    snap: &Snapshot,
    cluster_id: &str,
) -> Service {
    let endpoints = crate::snapshot::in_namespace(&snap.pods, &wp.namespace)
        .map(|(_, p)| p)
        .filter(|p| p.metadata.labels.as_ref().and_then(|l| l.get(GATEWAY_NAME)) == Some(&wp.name))
        .filter_map(|p| {
            let uid = format!(
                "{cluster_id}//Pod/{}/{}",
                wp.namespace,
                p.metadata.name.as_deref()?
            );
            workloads.iter().find(|w| w.uid == uid)?;
            Some(Endpoint {
                workload_uid: uid,
                ports: BTreeMap::from([(HBONE_PORT, HBONE_PORT)]),
            })
        })
        .collect();
    Service {
        name: wp.name.clone(),
        namespace: wp.namespace.clone(),
        hostname: wp.hostname(),
        vips: Vec::new(),
        ports: vec![ServicePort {
            port: HBONE_PORT,
            target_port: HBONE_PORT,
            protocol: weft_api::AppProtocol::Unknown,
        }],
        endpoints,
        waypoint: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;
    use crate::translate::{Mesh, translate};

    const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {nodeName: n1, serviceAccountName: waypoint, containers: [{name: proxy}]}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: impostor, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: proxy}]}
status: {podIP: 10.244.1.21}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: other}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: typo, namespace: shop, labels: {istio.io/use-waypoint: waypiont}}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: optout, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}
"#;

    const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"#;

    fn run(yaml: &str) -> (LocalConfig, Vec<String>) {
        let mut snap = Snapshot::default();
        let errors = parse(yaml, "test", &mut snap);
        assert!(errors.is_empty(), "{errors:?}");
        let t = translate(&snap, &Mesh::default(), None);
        (t.config, t.errors.iter().map(ToString::to_string).collect())
    }

    fn waypoint_of(cfg: &LocalConfig, name: &str) -> Option<String> {
        let s = cfg.services.iter().find(|s| s.name == name).unwrap();
        s.waypoint.as_ref().map(WaypointRef::service_key)
    }

    #[test]
    fn services_bind_with_istios_labels() {
        let (cfg, errors) = run(&format!("{BASE}---{GATEWAY}"));
        assert_eq!(
            waypoint_of(&cfg, "web").as_deref(),
            Some("shop/waypoint.shop.svc.cluster.local")
        );
        assert_eq!(waypoint_of(&cfg, "optout"), None, "the value none opts out");
        // A misspelt name fails closed, with the reason.
        let typo = waypoint_of(&cfg, "typo").unwrap();
        assert!(typo.ends_with(".waypoint.invalid"), "{typo}");
        assert!(
            errors.iter().any(|e| e.starts_with("Service shop/typo: metadata.labels[istio.io/use-waypoint]: no waypoint shop/waypiont")),
            "{errors:?}"
        );
        // Another namespace's binding is refused by allowedRoutes (Same by default).
        assert!(
            waypoint_of(&cfg, "api")
                .unwrap()
                .ends_with(".waypoint.invalid")
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("does not admit namespace other")),
            "{errors:?}"
        );
        // The waypoint's own Service, found by hostname, with its pod behind
        // it; a pod that copies the label under another account is not.
        let svc = cfg.services.iter().find(|s| s.name == "waypoint").unwrap();
        assert!(svc.vips.is_empty());
        assert_eq!(svc.endpoints.len(), 1);
        assert_eq!(
            svc.endpoints[0].workload_uid,
            "Kubernetes//Pod/shop/waypoint-0"
        );
        // Default waypoint-for is service: workloads have none.
        assert!(cfg.workloads.iter().all(|w| w.waypoint.is_none()));

        // Each binding's status, as Istio writes it on the Service.
        let mut snap = Snapshot::default();
        parse(&format!("{BASE}---{GATEWAY}"), "test", &mut snap);
        let t = translate(&snap, &Mesh::default(), None);
        let bound: Vec<String> = t
            .statuses()
            .filter(|s| s.kind == "Service")
            .map(|s| {
                assert_eq!(s.condition, "istio.io/WaypointBound");
                format!("{} {} {}", s.name, s.accepted, s.reason)
            })
            .collect();
        assert_eq!(
            bound,
            [
                "api false WaypointNotAllowed",
                "typo false WaypointNotFound",
                "web true WaypointAccepted"
            ],
            "optout and the waypoint's own Service have no binding"
        );
    }

    /// In Kubernetes the waypoint's Service is the Deployment's, selecting
    /// by the gateway-name label: a pod that copies the label under another
    /// service account is still not its endpoint.
    #[test]
    fn a_cluster_waypoint_service_keeps_only_the_gateways_account() {
        let svc = r#"
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop}
spec: {clusterIP: 10.96.0.99, selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{name: mesh, port: 15008}]}
"#;
        let (cfg, _) = run(&format!("{BASE}---{GATEWAY}---{svc}"));
        let wp = cfg.services.iter().find(|s| s.name == "waypoint").unwrap();
        assert_eq!(
            wp.vips.len(),
            1,
            "the cluster's Service, not a synthesized one"
        );
        let uids: Vec<&str> = wp
            .endpoints
            .iter()
            .map(|e| e.workload_uid.as_str())
            .collect();
        assert_eq!(
            uids,
            ["Kubernetes//Pod/shop/waypoint-0"],
            "not the impostor"
        );
    }

    #[test]
    fn allowed_routes_and_waypoint_for() {
        let gw = GATEWAY
            .replace(
                "metadata: {name: waypoint, namespace: shop}",
                "metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}",
            )
            .replace(
                "protocol: HBONE}",
                "protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}",
            );
        let yaml = format!("{BASE}---{gw}").replace(
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}",
            "metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
        );
        let (cfg, _) = run(&yaml);
        assert_eq!(
            waypoint_of(&cfg, "api").as_deref(),
            Some("shop/waypoint.shop.svc.cluster.local"),
            "allowedRoutes from All admits other"
        );
        let web = cfg.workloads.iter().find(|w| w.name == "web").unwrap();
        assert!(
            web.waypoint.is_some(),
            "waypoint-for all binds workloads too"
        );
        let wp = cfg
            .workloads
            .iter()
            .find(|w| w.name == "waypoint-0")
            .unwrap();
        assert!(wp.waypoint.is_none(), "a waypoint is never bound to itself");
    }

    #[test]
    fn a_gateway_without_an_hbone_listener_is_refused() {
        let gw = GATEWAY.replace("protocol: HBONE", "protocol: HTTP");
        let (cfg, errors) = run(&format!("{BASE}---{gw}"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("Gateway shop/waypoint: spec.listeners")),
            "{errors:?}"
        );
        assert!(
            waypoint_of(&cfg, "web")
                .unwrap()
                .ends_with(".waypoint.invalid")
        );
    }
}
