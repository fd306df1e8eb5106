//! Workloads and services as the data plane sees them (the shape of Istio's
//! `istio.workload.Workload` / `istio.workload.Service`, trimmed to what we use).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Authorization, Identity};

/// How traffic reaches a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TunnelProtocol {
    /// Not in the mesh: plain TCP, straight to the pod.
    #[default]
    None,
    /// Captured by its node's ztunnel: reached over HBONE (mTLS) on port 15008.
    Hbone,
}

/// One pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Unique key: `<cluster>//Pod/<namespace>/<name>` as in Istio.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// The workload (deployment) name used in metrics.
    pub workload_name: String,
    /// `app` / canonical service name, for metrics.
    #[serde(default)]
    pub canonical_name: String,
    /// `version` / canonical revision, for metrics.
    #[serde(default)]
    pub canonical_revision: String,
    pub service_account: String,
    pub trust_domain: String,
    pub node: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: TunnelProtocol,
    /// Named container ports, for Services whose targetPort is a name.
    #[serde(default)]
    pub named_ports: BTreeMap<String, u16>,
    /// Selector-scoped authorization policies that apply, as `namespace/name`.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// A host-network pod: its addresses are its node's, shared with every
    /// other such pod there, so they never identify it (Istio's
    /// `NetworkMode::HOST_NETWORK`); never captured.
    #[serde(default)]
    pub host_network: bool,
    /// Whether it takes a Service's traffic: a pod that is Ready and not
    /// being deleted, an EndpointSlice endpoint that is `ready` (Istio's
    /// `WorkloadStatus`). Services list only healthy endpoints, unless they
    /// publish not-ready addresses.
    #[serde(default = "healthy")]
    pub healthy: bool,
    /// The waypoint every connection addressed to this workload passes
    /// (`istio.io/use-waypoint` on the pod or its namespace, for a waypoint
    /// that serves workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

fn healthy() -> bool {
    true
}

/// A binding to a waypoint, as WDS carries it (Istio's `GatewayAddress` in
/// its hostname form): the waypoint's Service and its HBONE port. A binding
/// whose Service is not known does not resolve, and the traffic it covers
/// is refused: it never goes around the waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointRef {
    pub namespace: String,
    pub hostname: String,
    /// 15008.
    pub port: u16,
}

impl WaypointRef {
    /// The xDS name of the waypoint's Service: `namespace/hostname`.
    pub fn service_key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// A port of a Service: traffic to `port` on a VIP goes to `target_port` on an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    pub target_port: u16,
    /// The declared protocol (Istio's `appProtocol` or port-name rules).
    #[serde(default)]
    pub protocol: AppProtocol,
}

/// A service port's declared protocol, as Istio decides it from
/// `appProtocol` or the port name's prefix; a waypoint sniffs `Unknown`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum AppProtocol {
    #[default]
    Unknown,
    Http11,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl AppProtocol {
    /// Istio's rules: `appProtocol` first, else the port name (`http`,
    /// `http-web`, `grpc-api`, `tcp`, …: the part before the first `-`).
    pub fn declared(app_protocol: Option<&str>, port_name: Option<&str>) -> Self {
        let of = |s: &str| match s.to_ascii_lowercase().as_str() {
            "http" => AppProtocol::Http11,
            "http2" | "kubernetes.io/h2c" => AppProtocol::Http2,
            "grpc" | "grpc-web" => AppProtocol::Grpc,
            "tcp" | "mongo" | "mysql" | "redis" => AppProtocol::Tcp,
            "tls" | "https" | "kubernetes.io/wss" => AppProtocol::Tls,
            _ => AppProtocol::Unknown,
        };
        if let Some(p) = app_protocol.map(of).filter(|p| *p != AppProtocol::Unknown) {
            return p;
        }
        port_name
            .map(|n| of(n.split('-').next().unwrap_or(n)))
            .unwrap_or_default()
    }

    /// HTTP of some kind: the waypoint routes it.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            AppProtocol::Http11 | AppProtocol::Http2 | AppProtocol::Grpc
        )
    }
}

/// A workload that backs a service, with the service-port → pod-port mapping resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    pub workload_uid: String,
    /// Service port → port on this endpoint.
    pub ports: BTreeMap<u16, u16>,
}

/// A Kubernetes Service: VIPs in front of endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `<name>.<namespace>.svc.cluster.local`
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
    /// The waypoint every connection to this service passes
    /// (`istio.io/use-waypoint` on the service or its namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<WaypointRef>,
}

/// The static data-plane config ztunnel reads in local mode (no controller),
/// and the controller's translation. Workloads and services are shared: a
/// translation that leaves one unchanged hands on the same object, so
/// whoever compares two configs (the encoder) tells the unchanged apart by
/// pointer, and copying a config copies no workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalConfig {
    #[serde(default)]
    pub workloads: Vec<Arc<Workload>>,
    #[serde(default)]
    pub services: Vec<Arc<Service>>,
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

// === impl Workload ===

impl Workload {
    /// The workload's SPIFFE identity, if its fields form a valid one.
    pub fn identity(&self) -> Result<Identity, crate::IdentityError> {
        Identity::new(&self.trust_domain, &self.namespace, &self.service_account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local config format parses from YAML with defaults filled in.
    #[test]
    fn local_config_yaml() {
        let yaml = r#"
workloads:
- uid: Kubernetes//Pod/shop/a
  name: a
  namespace: shop
  workloadName: a
  serviceAccount: default
  trustDomain: cluster.local
  node: node-1
  addresses: ["10.244.1.10"]
  protocol: HBONE
services: []
"#;
        assert_eq!(
            AppProtocol::declared(None, Some("http-web")),
            AppProtocol::Http11
        );
        assert_eq!(
            AppProtocol::declared(Some("kubernetes.io/h2c"), Some("tcp")),
            AppProtocol::Http2
        );
        assert_eq!(AppProtocol::declared(None, Some("grpc")), AppProtocol::Grpc);
        assert_eq!(
            AppProtocol::declared(None, Some("tcp-db")),
            AppProtocol::Tcp
        );
        assert_eq!(
            AppProtocol::declared(None, Some("web")),
            AppProtocol::Unknown
        );
        assert_eq!(AppProtocol::declared(None, None), AppProtocol::Unknown);
        let cfg: LocalConfig = serde_yaml::from_str(yaml).unwrap();
        let w = &cfg.workloads[0];
        assert_eq!(w.protocol, TunnelProtocol::Hbone);
        assert_eq!(
            w.identity().unwrap().to_string(),
            "spiffe://cluster.local/ns/shop/sa/default"
        );
        assert!(w.named_ports.is_empty());
    }
}
