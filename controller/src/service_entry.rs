//! `networking.istio.io` ServiceEntry → services (and the workloads of their
//! inline endpoints), as Istio's ambient mode publishes them: one service
//! per host, named after the ServiceEntry, with its `addresses` as VIPs.
//!
//! What is served: `resolution: STATIC` (or `NONE`) with inline `endpoints`
//! at IP addresses, or with a `workloadSelector` that picks pods of the
//! ServiceEntry's namespace. `DNS` resolution is refused with a status: the
//! data plane resolves no names. A VIP already held by a Service, a pod or
//! an older ServiceEntry is refused too: a ServiceEntry must never capture
//! another service's traffic, nor its waypoint binding.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};
use weft_api::{AppProtocol, Endpoint, Identity, Service, ServicePort, TunnelProtocol, Workload};

use crate::Snapshot;
use crate::translate::{Mesh, TranslateError, names};

/// `networking.istio.io` ServiceEntry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceEntry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceEntrySpec,
}

/// Unknown fields are refused (a misspelt field would serve something else).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    pub ports: Vec<Port>,
    /// `MESH_EXTERNAL` (the default) or `MESH_INTERNAL`.
    pub location: Option<String>,
    /// `NONE` (the default), `STATIC`, `DNS` or `DNS_ROUND_ROBIN`.
    pub resolution: Option<String>,
    pub endpoints: Vec<WorkloadEntry>,
    pub workload_selector: Option<WorkloadSelector>,
    pub export_to: Vec<String>,
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Port {
    pub number: u32,
    pub protocol: Option<String>,
    pub name: Option<String>,
    pub target_port: Option<u32>,
}

/// An inline endpoint (Istio's `WorkloadEntry` spec).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkloadEntry {
    pub address: String,
    /// Port name (a ServiceEntry port's) → the endpoint's port.
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub network: Option<String>,
    pub locality: Option<String>,
    pub weight: Option<u32>,
    pub service_account: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadSelector {
    pub labels: BTreeMap<String, String>,
}

/// The ServiceEntry in `snap` that `svc` was made from, if any.
pub fn origin<'a>(snap: &'a Snapshot, svc: &Service) -> Option<&'a ServiceEntry> {
    snap.service_entries
        .get(&format!("{}/{}", svc.namespace, svc.name))
        .filter(|se| se.spec.hosts.contains(&svc.hostname))
        .map(|se| &**se)
}

/// The labels of the workload `uid`: a pod's, or a ServiceEntry endpoint's.
pub fn labels_of<'a>(snap: &'a Snapshot, uid: &str) -> Option<&'a BTreeMap<String, String>> {
    if let Some((_, pod)) = uid.split_once("/Pod/") {
        return snap.pods.get(pod)?.metadata.labels.as_ref();
    }
    let rest = uid.split_once(SE_UID)?.1;
    let (entry, ip) = rest.rsplit_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    let se = snap.service_entries.get(entry)?;
    se.spec
        .endpoints
        .iter()
        .find(|ep| ep.address.parse::<IpAddr>().ok() == Some(ip))
        .map(|ep| &ep.labels)
}

/// What an inline endpoint's workload uid holds after the cluster id, as
/// in Istio: `<cluster>/networking.istio.io/ServiceEntry/<ns>/<name>/<ip>`.
const SE_UID: &str = "/networking.istio.io/ServiceEntry/";

/// What is already taken when the ServiceEntries are translated, with who
/// holds it: each Service VIP and pod address, and each host an older
/// entry serves.
#[derive(Debug, Default)]
pub struct Taken {
    pub addresses: HashMap<IpAddr, String>,
    pub hosts: HashMap<String, String>,
}

/// The cluster's own service domain: its hosts are Services' (and
/// waypoints'), never a ServiceEntry's.
const CLUSTER_DOMAIN: &str = ".svc.cluster.local";

/// Translates every ServiceEntry, oldest first (Istio's tie-break), into
/// services, adding the workloads of inline endpoints to `workloads`.
pub fn translate(
    snap: &Snapshot,
    mesh: &Mesh,
    taken: &mut Taken,
    workloads: &mut Vec<Arc<Workload>>,
) -> (Vec<Service>, Vec<TranslateError>) {
    let mut entries: Vec<&ServiceEntry> = snap.service_entries.values().map(|e| &**e).collect();
    entries.sort_by_key(|se| crate::routes::order(&se.metadata));
    let mut services = Vec::new();
    let mut errors = Vec::new();
    for se in entries {
        match service_entry(se, snap, mesh, taken, workloads) {
            Ok(s) => services.extend(s),
            Err(e) => errors.push(e),
        }
    }
    (services, errors)
}

fn service_entry(
    se: &ServiceEntry,
    snap: &Snapshot,
    mesh: &Mesh,
    taken: &mut Taken,
    workloads: &mut Vec<Arc<Workload>>,
) -> Result<Vec<Service>, TranslateError> {
    let (namespace, name) = names(&se.metadata);
    let err = TranslateError::about("ServiceEntry", &namespace, &name);
    let spec = &se.spec;
    if spec.hosts.is_empty() {
        return Err(err("spec.hosts", "at least one host is required".into()));
    }
    for (i, h) in spec.hosts.iter().enumerate() {
        let at = format!("spec.hosts[{i}]");
        if h.is_empty() || h.contains('*') || h.contains('/') || h.parse::<IpAddr>().is_ok() {
            return Err(err(
                &at,
                format!("{h:?}: a host must be a DNS name; wildcards and IPs are not served"),
            ));
        }
        // A host is one service's: an entry never takes over a Service's
        // (or a waypoint's) name, its routes or the policies on it.
        if h.ends_with(CLUSTER_DOMAIN) {
            return Err(err(
                &at,
                format!("{h}: hosts in {} are Services'", &CLUSTER_DOMAIN[1..]),
            ));
        }
        if let Some(holder) = taken.hosts.get(h) {
            return Err(err(&at, format!("{h} is already the host of {holder}")));
        }
    }
    let resolution = spec.resolution.as_deref().unwrap_or("NONE");
    match resolution {
        "STATIC" | "NONE" => {}
        "DNS" | "DNS_ROUND_ROBIN" => {
            return Err(err(
                "spec.resolution",
                format!(
                    "{resolution} is not supported: the data plane resolves no names; use STATIC with endpoint addresses"
                ),
            ));
        }
        other => {
            return Err(err(
                "spec.resolution",
                format!("unknown resolution {other:?}"),
            ));
        }
    }
    if let Some(l) = spec.location.as_deref()
        && !matches!(l, "MESH_EXTERNAL" | "MESH_INTERNAL")
    {
        return Err(err("spec.location", format!("unknown location {l:?}")));
    }
    if spec.endpoints.is_empty() && spec.workload_selector.is_none() {
        return Err(err(
            "spec.endpoints",
            "endpoints or a workloadSelector is required: passing traffic to its original address is not supported".into(),
        ));
    }
    if !spec.endpoints.is_empty() && spec.workload_selector.is_some() {
        return Err(err(
            "spec.workloadSelector",
            "endpoints and workloadSelector are exclusive".into(),
        ));
    }
    // VIPs: each a single address, held by no one else.
    let mut vips = Vec::new();
    for (i, a) in spec.addresses.iter().enumerate() {
        let at = format!("spec.addresses[{i}]");
        let ip = match a.split_once('/') {
            None => a.parse::<IpAddr>().ok(),
            Some((ip, len)) => ip
                .parse::<IpAddr>()
                .ok()
                .filter(|ip| len == if ip.is_ipv4() { "32" } else { "128" }),
        }
        .ok_or_else(|| err(&at, format!("{a:?}: only single IP addresses are served")))?;
        if let Some(holder) = taken.addresses.get(&ip) {
            return Err(err(&at, format!("{ip} is already {holder}")));
        }
        vips.push(ip);
    }
    if !vips.is_empty() && spec.hosts.len() > 1 {
        return Err(err(
            "spec.addresses",
            "with addresses, a ServiceEntry must have one host: an address leads to one service"
                .into(),
        ));
    }
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = u16::try_from(p.number)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| {
                err(
                    &format!("{at}.number"),
                    format!("{} is out of range", p.number),
                )
            })?;
        let target_port = match p.target_port {
            None => port,
            Some(t) => u16::try_from(t)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| err(&format!("{at}.targetPort"), format!("{t} is out of range")))?,
        };
        if p.name.as_deref().is_none_or(str::is_empty) {
            return Err(err(&format!("{at}.name"), "required".into()));
        }
        ports.push((
            p.name.clone().unwrap_or_default(),
            ServicePort {
                port,
                target_port,
                protocol: AppProtocol::declared(p.protocol.as_deref(), p.name.as_deref()),
            },
        ));
    }
    if ports.is_empty() {
        return Err(err("spec.ports", "at least one port is required".into()));
    }

    let mut endpoints = Vec::new();
    if let Some(sel) = &spec.workload_selector {
        for pod in snap.pods.values() {
            if !selects(&sel.labels, pod, &namespace) {
                continue;
            }
            let uid = format!(
                "{}//Pod/{namespace}/{}",
                mesh.cluster_id,
                pod.metadata.name.as_deref().unwrap_or_default()
            );
            if workloads.iter().any(|w| w.uid == uid) {
                let map = ports.iter().map(|(_, p)| (p.port, p.target_port)).collect();
                endpoints.push(Endpoint {
                    workload_uid: uid,
                    ports: map,
                });
            }
        }
    }
    let mut added = Vec::new();
    for (i, ep) in spec.endpoints.iter().enumerate() {
        let at = format!("spec.endpoints[{i}]");
        let ip: IpAddr = ep.address.parse().map_err(|_| {
            err(
                &format!("{at}.address"),
                format!("{:?}: an endpoint must be an IP address", ep.address),
            )
        })?;
        let mut map = BTreeMap::new();
        for (name, p) in &ports {
            let target = match ep.ports.get(name) {
                None => p.target_port,
                Some(t) => u16::try_from(*t).ok().filter(|n| *n != 0).ok_or_else(|| {
                    err(
                        &format!("{at}.ports[{name}]"),
                        format!("{t} is out of range"),
                    )
                })?,
            };
            map.insert(p.port, target);
        }
        for name in ep.ports.keys() {
            if !ports.iter().any(|(n, _)| n == name) {
                return Err(err(
                    &format!("{at}.ports[{name}]"),
                    "names no port of spec.ports".into(),
                ));
            }
        }
        // An address that is a pod (or an earlier entry's endpoint) is that
        // workload. A captured pod of another namespace, or a node's
        // address, is refused: an entry must not send traffic around that
        // pod's own waypoint and policies. Any other address is a workload
        // outside the mesh, as in Istio.
        if let Some(w) = workloads.iter().find(|w| {
            w.addresses.contains(&ip)
                && (w.host_network
                    || (w.namespace != namespace && w.protocol == TunnelProtocol::Hbone))
        }) {
            return Err(err(
                &format!("{at}.address"),
                format!(
                    "{ip} is meshed pod {}/{} of another namespace, or a node's address",
                    w.namespace, w.name
                ),
            ));
        }
        let uid = match workloads
            .iter()
            .chain(&added)
            .find(|w| !w.host_network && w.addresses.contains(&ip))
        {
            Some(w) => w.uid.clone(),
            None => {
                let sa = ep
                    .service_account
                    .clone()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "default".into());
                Identity::new(&mesh.trust_domain, &namespace, &sa)
                    .map_err(|e| err(&format!("{at}.serviceAccount"), e.to_string()))?;
                let w = Workload {
                    uid: format!("{}{SE_UID}{namespace}/{name}/{ip}", mesh.cluster_id),
                    name: name.clone(),
                    namespace: namespace.clone(),
                    workload_name: name.clone(),
                    canonical_name: ep
                        .labels
                        .get("app")
                        .cloned()
                        .unwrap_or_else(|| name.clone()),
                    canonical_revision: ep
                        .labels
                        .get("version")
                        .cloned()
                        .unwrap_or_else(|| "latest".into()),
                    service_account: sa,
                    trust_domain: mesh.trust_domain.clone(),
                    node: String::new(),
                    addresses: vec![ip],
                    named_ports: BTreeMap::new(),
                    authorization_policies: Vec::new(),
                    host_network: false,
                    healthy: true,
                    protocol: TunnelProtocol::None,
                    waypoint: None,
                };
                let uid = w.uid.clone();
                added.push(Arc::new(w));
                uid
            }
        };
        endpoints.push(Endpoint {
            workload_uid: uid,
            ports: map,
        });
    }
    for ip in &vips {
        taken.addresses.insert(
            *ip,
            format!("the address of ServiceEntry {namespace}/{name}"),
        );
    }
    for h in &spec.hosts {
        taken
            .hosts
            .insert(h.clone(), format!("ServiceEntry {namespace}/{name}"));
    }
    workloads.extend(added);
    let ports: Vec<ServicePort> = ports.into_iter().map(|(_, p)| p).collect();
    Ok(spec
        .hosts
        .iter()
        .map(|h| Service {
            name: name.clone(),
            namespace: namespace.clone(),
            hostname: h.clone(),
            vips: vips.clone(),
            ports: ports.clone(),
            endpoints: endpoints.clone(),
            waypoint: None,
        })
        .collect())
}

/// Whether `labels` select `pod`, of namespace `ns`.
fn selects(labels: &BTreeMap<String, String>, pod: &Pod, ns: &str) -> bool {
    pod.metadata.namespace.as_deref().unwrap_or("default") == ns
        && !labels.is_empty()
        && labels
            .iter()
            .all(|(k, v)| pod.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;
    use crate::testdata::shop_with_waypoint;
    use crate::translate::{Translation, translate};

    const ENTRIES: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api-0, namespace: shop, labels: {app: api, version: v1}}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.1.30}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  hosts: [legacy.example.com]
  addresses: [10.96.5.1/32]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  endpoints:
  - {address: 192.0.2.10, labels: {version: v1}}
  - {address: 192.0.2.11, labels: {version: v2}, ports: {http: 9090}, serviceAccount: legacy}
  - {address: 10.244.1.30}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: internal, namespace: shop, labels: {istio.io/use-waypoint: none}}
spec:
  hosts: [a.internal, b.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls}]
  workloadSelector: {labels: {app: api}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: thief, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  hosts: [thief.example.com]
  addresses: [10.96.0.10]
  resolution: STATIC
  ports: [{number: 80, name: http}]
  endpoints: [{address: 192.0.2.99}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: shop}
spec:
  hosts: [httpbin.org]
  resolution: DNS
  ports: [{number: 80, name: http}]
"#;

    fn run(yaml: &str) -> Translation {
        let mut snap = Snapshot::default();
        let errors = parse(yaml, "test", &mut snap);
        assert!(errors.is_empty(), "{errors:?}");
        translate(&snap, &Mesh::default(), None)
    }

    #[test]
    fn entries_become_services_and_workloads() {
        let t = run(&format!("{}---{ENTRIES}", shop_with_waypoint!()));
        let cfg = &t.config;
        let legacy = cfg
            .services
            .iter()
            .find(|s| s.hostname == "legacy.example.com")
            .unwrap();
        assert_eq!(
            (legacy.name.as_str(), legacy.namespace.as_str()),
            ("legacy", "shop")
        );
        assert_eq!(legacy.vips, ["10.96.5.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(legacy.ports[0].protocol, AppProtocol::Http11);
        let eps: Vec<(&str, u16)> = legacy
            .endpoints
            .iter()
            .map(|e| (e.workload_uid.as_str(), e.ports[&80]))
            .collect();
        assert_eq!(
            eps,
            [
                (
                    "Kubernetes/networking.istio.io/ServiceEntry/shop/legacy/192.0.2.10",
                    8080
                ),
                (
                    "Kubernetes/networking.istio.io/ServiceEntry/shop/legacy/192.0.2.11",
                    9090
                ),
                // An address that is a pod is that pod.
                ("Kubernetes//Pod/shop/api-0", 8080),
            ]
        );
        let outside = cfg
            .workloads
            .iter()
            .find(|w| w.uid.ends_with("/192.0.2.11"))
            .unwrap();
        assert_eq!(
            outside.protocol,
            TunnelProtocol::None,
            "outside the mesh: plaintext"
        );
        assert_eq!(outside.service_account, "legacy");
        assert_eq!(outside.node, "");
        // The namespace's waypoint serves it, and its status says so.
        assert_eq!(
            legacy.waypoint.as_ref().map(|w| w.hostname.as_str()),
            Some("waypoint.shop.svc.cluster.local")
        );
        let status = |name: &str| {
            t.statuses()
                .find(|s| s.kind == "ServiceEntry" && s.name == name)
                .map(|s| format!("{} {} {}: {}", s.condition, s.accepted, s.reason, s.message))
        };
        assert_eq!(
            status("legacy").unwrap(),
            "istio.io/WaypointBound true WaypointAccepted: bound to waypoint shop/waypoint"
        );

        // One service per host, the selected pods behind both; opted out.
        let internal: Vec<&Service> = cfg
            .services
            .iter()
            .filter(|s| s.name == "internal")
            .map(|s| &**s)
            .collect();
        assert_eq!(internal.len(), 2);
        for s in &internal {
            assert!(s.vips.is_empty());
            assert!(s.waypoint.is_none());
            assert_eq!(s.endpoints[0].workload_uid, "Kubernetes//Pod/shop/api-0");
            assert_eq!(s.endpoints[0].ports[&443], 443);
        }
        assert_eq!(status("internal"), None);

        // Refused, each naming the field; nothing of theirs is published.
        assert!(
            cfg.services
                .iter()
                .all(|s| s.name != "thief" && s.name != "dns")
        );
        assert!(cfg.workloads.iter().all(|w| !w.uid.contains("192.0.2.99")));
        assert_eq!(
            status("thief").unwrap(),
            "Accepted false Invalid: spec.addresses[0]: 10.96.0.10 is already the VIP of Service shop/web"
        );
        assert!(
            status("dns")
                .unwrap()
                .starts_with("Accepted false Invalid: spec.resolution: DNS is not supported")
        );
        // The Service keeps its own VIP and binding.
        let web = cfg.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.hostname, "web.shop.svc.cluster.local");
    }

    /// An older entry in another namespace, and a pod there.
    const OTHERS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: first, namespace: other, creationTimestamp: "2020-01-01T00:00:00Z"}
spec: {hosts: [taken.example], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 192.0.2.200}]}
---
apiVersion: v1
kind: Pod
metadata: {name: victim, namespace: other}
spec: {nodeName: n1, containers: [{name: app}]}
status: {podIP: 10.244.9.9}
"#;

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            ("hosts: []", "spec.hosts: at least one host is required"),
            (
                "hosts: ['*.example.com']",
                "spec.hosts[0]: \"*.example.com\": a host must be a DNS name",
            ),
            (
                "addresses: [10.0.0.0/8]",
                "spec.addresses[0]: \"10.0.0.0/8\": only single IP addresses",
            ),
            (
                "addresses: [10.96.9.9], hosts: [a.example, b.example]",
                "spec.addresses: with addresses, a ServiceEntry must have one host",
            ),
            (
                "ports: [{number: 70000, name: x}]",
                "spec.ports[0].number: 70000 is out of range",
            ),
            ("ports: [{number: 80}]", "spec.ports[0].name: required"),
            (
                "endpoints: [{address: db.example}]",
                "spec.endpoints[0].address: \"db.example\": an endpoint must be an IP address",
            ),
            (
                "endpoints: [{address: 192.0.2.1, ports: {htp: 80}}]",
                "spec.endpoints[0].ports[htp]: names no port of spec.ports",
            ),
            (
                "endpoints: []",
                "spec.endpoints: endpoints or a workloadSelector is required",
            ),
            (
                "resolution: MAGIC",
                "spec.resolution: unknown resolution \"MAGIC\"",
            ),
            (
                "hosts: [reviews.shop.svc.cluster.local]",
                "spec.hosts[0]: reviews.shop.svc.cluster.local: hosts in svc.cluster.local are Services'",
            ),
            (
                "hosts: [taken.example]",
                "spec.hosts[0]: taken.example is already the host of ServiceEntry other/first",
            ),
            (
                "endpoints: [{address: 10.244.9.9}]",
                "spec.endpoints[0].address: 10.244.9.9 is meshed pod other/victim of another namespace",
            ),
        ];
        for (patch, want) in cases {
            let base = "{hosts: [e.example], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 192.0.2.1}]}";
            let mut spec: serde_yaml::Mapping = serde_yaml::from_str(base).unwrap();
            let over: serde_yaml::Mapping = serde_yaml::from_str(&format!("{{{patch}}}")).unwrap();
            spec.extend(over);
            let yaml = format!(
                "{OTHERS}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: e, namespace: shop, creationTimestamp: \"2026-01-01T00:00:00Z\"}}\nspec:\n  {}",
                serde_yaml::to_string(&spec).unwrap().replace('\n', "\n  ")
            );
            let mut snap = Snapshot::default();
            let errs = parse(&yaml, "t", &mut snap);
            assert!(errs.is_empty(), "{patch}: {errs:?}");
            let t = translate(&snap, &Mesh::default(), None);
            let got: Vec<String> = t
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect();
            assert!(
                got.len() == 1 && got[0].starts_with(want),
                "{patch}: {got:?}"
            );
        }
    }
}
