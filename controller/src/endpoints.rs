//! Endpoints that no pod backs, from EndpointSlices, as Istio's ambient mode
//! takes them: a pod-backed endpoint comes from the pod itself (healthy when
//! Ready and not being deleted), so a slice's endpoints that reference a
//! pod are skipped here; the others (a selector-less Service's, like
//! `kubernetes.default` or an external database's, whose slices the user or
//! the API server writes) each become a workload outside the mesh, reached
//! in plain TCP, healthy when `ready` (absent means ready).

use std::collections::BTreeMap;
use std::net::IpAddr;

use weft_api::{TunnelProtocol, Workload};

use crate::Snapshot;
use crate::translate::{Mesh, TranslateError};

/// The label that ties a slice to its Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// One slice endpoint address, for one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub namespace: String,
    pub service: String,
    pub workload: Workload,
    /// The slice's ports by name (`""` for an unnamed one).
    pub ports: BTreeMap<String, u16>,
}

/// Every slice endpoint that no pod backs; a slice that cannot be read is
/// named, and the others go on.
pub fn translate(snap: &Snapshot, mesh: &Mesh) -> (Vec<SliceEndpoint>, Vec<TranslateError>) {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for slice in snap.endpoint_slices.values() {
        let namespace = slice.metadata.namespace.clone().unwrap_or_default();
        let name = slice.metadata.name.clone().unwrap_or_default();
        let err = TranslateError::about("EndpointSlice", &namespace, &name);
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME))
            .cloned()
        else {
            continue;
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            // FQDN slices are deprecated and name no address.
            errors.push(err(
                "addressType",
                format!(
                    "{:?} is not supported: want IPv4 or IPv6",
                    slice.address_type
                ),
            ));
            continue;
        }
        let mut ports = BTreeMap::new();
        for p in slice.ports.iter().flatten() {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                continue;
            }
            match p
                .port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
            {
                Some(n) => {
                    ports.insert(p.name.clone().unwrap_or_default(), n);
                }
                None => errors.push(err(
                    "ports.port",
                    format!("{:?} is not a port number", p.port),
                )),
            }
        }
        for ep in &slice.endpoints {
            if ep
                .target_ref
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some("Pod"))
            {
                continue;
            }
            // `ready` absent means ready; a terminating endpoint is not.
            let conditions = ep.conditions.as_ref();
            let healthy = conditions.and_then(|c| c.ready) != Some(false)
                && conditions.and_then(|c| c.terminating) != Some(true);
            for address in &ep.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    errors.push(err(
                        "endpoints.addresses",
                        format!("{address:?} is not an IP address"),
                    ));
                    continue;
                };
                out.push(SliceEndpoint {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    workload: Workload {
                        uid: format!(
                            "{}/discovery.k8s.io/EndpointSlice/{namespace}/{name}/{ip}",
                            mesh.cluster_id
                        ),
                        name: name.clone(),
                        namespace: namespace.clone(),
                        workload_name: service.clone(),
                        canonical_name: service.clone(),
                        canonical_revision: "latest".into(),
                        service_account: String::new(),
                        trust_domain: mesh.trust_domain.clone(),
                        node: ep.node_name.clone().unwrap_or_default(),
                        addresses: vec![ip],
                        protocol: TunnelProtocol::None,
                        named_ports: BTreeMap::new(),
                        authorization_policies: Vec::new(),
                        host_network: false,
                        healthy,
                        waypoint: None,
                    },
                    ports: ports.clone(),
                });
            }
        }
    }
    (out, errors)
}
