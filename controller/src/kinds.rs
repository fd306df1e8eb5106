//! Every Kubernetes kind the controller reads, described once.
//!
//! A [`Kind`] says its group, versions, plural, scope and whether we write
//! its status, and where it lives in a [`Snapshot`]. The manifests parser,
//! the API server watches, snapshot merging and status writes all go through
//! [`each_kind`], so a new kind is one `impl Kind` and one line there.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, GroupVersionKind, ObjectMeta};
use serde::de::DeserializeOwned;

use crate::Snapshot;
use crate::changed::Changed;
use crate::httproute::HttpRoute;
use crate::kubernetes::Watched;
use crate::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::routes::{DestinationRule, VirtualService};
use crate::service_entry::ServiceEntry;
use crate::telemetry::Telemetry;
use crate::waypoints::Gateway;

/// What the controller needs to know about one kind.
#[derive(Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// Empty for the core group.
    pub group: &'static str,
    /// Versions read from manifests; the first is the one watched.
    pub versions: &'static [&'static str],
    pub kind: &'static str,
    pub plural: &'static str,
    pub namespaced: bool,
    /// The controller writes `Accepted` conditions to its status.
    pub status: bool,
    /// A CRD that may not be installed, or a kind that may not be
    /// readable (the mesh config): the controller starts without it.
    pub optional: bool,
    /// Only objects of this name are read (a field selector on the watch):
    /// the mesh config's ConfigMap, not every ConfigMap of the cluster.
    pub only_name: Option<&'static str>,
}

impl KindInfo {
    /// A custom resource (one of the Istio or Gateway API CRDs Weft serves,
    /// not a built-in kind): it may fail to read, and then keeps its last
    /// good version; the chart installs its CRD.
    pub fn custom(&self) -> bool {
        self.group.ends_with(".istio.io") || self.group == "gateway.networking.k8s.io"
    }

    /// Whether `api_version` (`v1`, `group/version`) is one we read.
    pub fn reads(&self, api_version: &str) -> bool {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        group == self.group && self.versions.contains(&version)
    }

    /// The resource as watched (at the first version).
    pub fn api_resource(&self) -> ApiResource {
        let gvk = GroupVersionKind::gvk(self.group, self.versions[0], self.kind);
        ApiResource::from_gvk_with_plural(&gvk, self.plural)
    }

    /// The snapshot key of an object: `namespace/name`, or the name of a
    /// cluster-scoped one.
    pub fn key(&self, meta: &ObjectMeta) -> String {
        self.key_at(
            meta.namespace.as_deref(),
            meta.name.as_deref().unwrap_or_default(),
        )
    }

    /// The snapshot key of the object `name` in `namespace`.
    pub fn key_at(&self, namespace: Option<&str>, name: &str) -> String {
        if self.namespaced {
            crate::snapshot::key(namespace, Some(name))
        } else {
            name.to_string()
        }
    }
}

/// One kind: its description and its place in the snapshot.
pub trait Kind: Clone + DeserializeOwned + Send + Sync + 'static {
    const INFO: KindInfo;
    fn meta(&self) -> &ObjectMeta;
    fn of(snapshot: &Snapshot) -> &BTreeMap<String, Arc<Self>>;
    fn of_mut(snapshot: &mut Snapshot) -> &mut BTreeMap<String, Arc<Self>>;
    /// Starts watching it on the API server: typed (k8s-openapi kinds), or
    /// as dynamic objects read through serde (custom resources).
    fn watch(client: &kube::Client, dirty: &Arc<Changed>) -> Box<dyn Watched>;
}

/// Something done for each kind, with its type.
pub trait Visitor {
    fn visit<K: Kind>(&mut self);
}

/// Visits every kind, in a fixed order.
pub fn each_kind(v: &mut impl Visitor) {
    v.visit::<Namespace>();
    v.visit::<Node>();
    v.visit::<Pod>();
    v.visit::<Service>();
    v.visit::<EndpointSlice>();
    v.visit::<AuthorizationPolicy>();
    v.visit::<PeerAuthentication>();
    v.visit::<Gateway>();
    v.visit::<VirtualService>();
    v.visit::<DestinationRule>();
    v.visit::<HttpRoute>();
    v.visit::<ServiceEntry>();
    v.visit::<ConfigMap>();
    v.visit::<Telemetry>();
}

/// The description of the kind named `kind`.
pub fn info(kind: &str) -> Option<&'static KindInfo> {
    struct Find<'a>(&'a str, Option<&'static KindInfo>);
    impl Visitor for Find<'_> {
        fn visit<K: Kind>(&mut self) {
            if K::INFO.kind == self.0 {
                self.1 = Some(&K::INFO);
            }
        }
    }
    let mut f = Find(kind, None);
    each_kind(&mut f);
    f.1
}

/// `metadata.generation` of the object of `kind` at `key` in `snapshot`.
pub fn generation(snapshot: &Snapshot, kind: &str, key: &str) -> Option<i64> {
    struct Find<'a>(&'a Snapshot, &'a str, &'a str, Option<i64>);
    impl Visitor for Find<'_> {
        fn visit<K: Kind>(&mut self) {
            if K::INFO.kind == self.1 {
                self.3 = K::of(self.0).get(self.2).and_then(|o| o.meta().generation);
            }
        }
    }
    let mut f = Find(snapshot, kind, key, None);
    each_kind(&mut f);
    f.3
}

macro_rules! kind {
    ($ty:ty, $field:ident, $watch:ident, $info:expr) => {
        impl Kind for $ty {
            const INFO: KindInfo = $info;
            fn watch(client: &kube::Client, dirty: &Arc<Changed>) -> Box<dyn Watched> {
                crate::kubernetes::$watch::<Self>(client, dirty)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn of(snapshot: &Snapshot) -> &BTreeMap<String, Arc<Self>> {
                &snapshot.$field
            }
            fn of_mut(snapshot: &mut Snapshot) -> &mut BTreeMap<String, Arc<Self>> {
                &mut snapshot.$field
            }
        }
    };
}

const CORE_V1: &[&str] = &["v1"];
/// Istio serves the same objects at v1 and v1beta1.
const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1"];

kind!(
    Namespace,
    namespaces,
    typed,
    KindInfo {
        group: "",
        versions: CORE_V1,
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
        status: false,
        optional: false,
        only_name: None,
    }
);
kind!(
    Node,
    nodes,
    typed,
    KindInfo {
        group: "",
        versions: CORE_V1,
        kind: "Node",
        plural: "nodes",
        namespaced: false,
        status: false,
        optional: false,
        only_name: None,
    }
);
kind!(
    Pod,
    pods,
    typed,
    KindInfo {
        group: "",
        versions: CORE_V1,
        kind: "Pod",
        plural: "pods",
        namespaced: true,
        status: false,
        optional: false,
        only_name: None,
    }
);
kind!(
    Service,
    services,
    typed,
    KindInfo {
        group: "",
        versions: CORE_V1,
        kind: "Service",
        plural: "services",
        namespaced: true,
        status: false,
        optional: false,
        only_name: None,
    }
);
// Endpoints no pod backs (selector-less Services); the pods give the rest.
kind!(
    EndpointSlice,
    endpoint_slices,
    typed,
    KindInfo {
        group: "discovery.k8s.io",
        versions: CORE_V1,
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
        status: false,
        optional: true,
        only_name: None,
    }
);
kind!(
    AuthorizationPolicy,
    authorization_policies,
    dynamic,
    KindInfo {
        group: "security.istio.io",
        versions: ISTIO_VERSIONS,
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
        status: true,
        optional: true,
        only_name: None,
    }
);
kind!(
    PeerAuthentication,
    peer_authentications,
    dynamic,
    KindInfo {
        group: "security.istio.io",
        versions: ISTIO_VERSIONS,
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
        status: true,
        optional: true,
        only_name: None,
    }
);
kind!(
    Gateway,
    gateways,
    dynamic,
    KindInfo {
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1beta1"],
        kind: "Gateway",
        plural: "gateways",
        namespaced: true,
        status: false,
        optional: true,
        only_name: None,
    }
);
/// Istio serves networking objects at v1, v1beta1 and v1alpha3.
const NETWORKING_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

kind!(
    VirtualService,
    virtual_services,
    dynamic,
    KindInfo {
        group: "networking.istio.io",
        versions: NETWORKING_VERSIONS,
        kind: "VirtualService",
        plural: "virtualservices",
        namespaced: true,
        status: true,
        optional: true,
        only_name: None,
    }
);
kind!(
    DestinationRule,
    destination_rules,
    dynamic,
    KindInfo {
        group: "networking.istio.io",
        versions: NETWORKING_VERSIONS,
        kind: "DestinationRule",
        plural: "destinationrules",
        namespaced: true,
        status: true,
        optional: true,
        only_name: None,
    }
);
// Its status carries `istio.io/WaypointBound`, as a Service's does, and
// `Accepted` when it is refused (`kubernetes::StatusWriter`).
kind!(
    ServiceEntry,
    service_entries,
    dynamic,
    KindInfo {
        group: "networking.istio.io",
        versions: NETWORKING_VERSIONS,
        kind: "ServiceEntry",
        plural: "serviceentries",
        namespaced: true,
        status: false,
        optional: true,
        only_name: None,
    }
);
// Gateway API status lives under `status.parents`, one entry per parent
// and controller (`kubernetes::StatusWriter`).
kind!(
    HttpRoute,
    http_routes,
    dynamic,
    KindInfo {
        group: "gateway.networking.k8s.io",
        versions: &["v1", "v1beta1"],
        kind: "HTTPRoute",
        plural: "httproutes",
        namespaced: true,
        status: true,
        optional: true,
        only_name: None,
    }
);

// Only the mesh config's: the watch asks for that name alone.
kind!(
    ConfigMap,
    config_maps,
    typed,
    KindInfo {
        group: "",
        versions: CORE_V1,
        kind: "ConfigMap",
        plural: "configmaps",
        namespaced: true,
        status: false,
        optional: true,
        only_name: Some(crate::telemetry::MESH_CONFIG_MAP),
    }
);
kind!(
    Telemetry,
    telemetries,
    dynamic,
    KindInfo {
        group: "telemetry.istio.io",
        versions: &["v1", "v1alpha1"],
        kind: "Telemetry",
        plural: "telemetries",
        namespaced: true,
        status: true,
        optional: true,
        only_name: None,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions() {
        let ap = info("AuthorizationPolicy").unwrap();
        assert!(ap.reads("security.istio.io/v1beta1"));
        assert!(!ap.reads("security.istio.io/v2"));
        assert!(!ap.reads("v1"));
        assert_eq!(ap.api_resource().api_version, "security.istio.io/v1");
        assert!(info("Pod").unwrap().reads("v1"));
        assert!(info("VirtualServic").is_none());
        let meta = ObjectMeta {
            name: Some("a".into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(info("Pod").unwrap().key(&meta), "shop/a");
        assert_eq!(info("Node").unwrap().key(&meta), "a");
    }
}
