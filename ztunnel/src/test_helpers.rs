//! Builders shared by the crate's unit tests.

use std::collections::BTreeMap;

use weft_api::{TunnelProtocol, Workload};

/// A pod workload; `meshed` pods are captured (HBONE).
pub fn pod(name: &str, ns: &str, sa: &str, ip: &str, node: &str, meshed: bool) -> Workload {
    Workload {
        uid: format!("Kubernetes//Pod/{ns}/{name}"),
        name: name.into(),
        namespace: ns.into(),
        workload_name: name.into(),
        canonical_name: name.into(),
        canonical_revision: "v1".into(),
        service_account: sa.into(),
        trust_domain: "cluster.local".into(),
        node: node.into(),
        addresses: vec![ip.parse().expect("test IP")],
        protocol: if meshed {
            TunnelProtocol::Hbone
        } else {
            TunnelProtocol::None
        },
        named_ports: BTreeMap::new(),
        authorization_policies: Vec::new(),
        host_network: false,
        healthy: true,
        waypoint: None,
    }
}
