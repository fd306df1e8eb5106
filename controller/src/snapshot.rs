//! The typed resources the controller translates, from either source.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::httproute::HttpRoute;
use crate::kinds::{Kind, Visitor, each_kind};
use crate::policy::{AuthorizationPolicy, PeerAuthentication};
use crate::routes::{DestinationRule, VirtualService};
use crate::service_entry::ServiceEntry;
use crate::telemetry::Telemetry;
use crate::waypoints::Gateway;

/// Every resource the translation reads, keyed for lookup. Objects are
/// shared, not copied: a snapshot is rebuilt on every change, and most of
/// its objects are the previous one's (the API watch's store holds them as
/// `Arc`s already).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Arc<Pod>>,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Arc<Service>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    /// Keyed by `namespace/name`.
    pub authorization_policies: BTreeMap<String, Arc<AuthorizationPolicy>>,
    /// Keyed by `namespace/name`.
    pub peer_authentications: BTreeMap<String, Arc<PeerAuthentication>>,
    /// Keyed by `namespace/name`.
    pub gateways: BTreeMap<String, Arc<Gateway>>,
    /// Keyed by `namespace/name`.
    pub virtual_services: BTreeMap<String, Arc<VirtualService>>,
    /// Keyed by `namespace/name`.
    pub destination_rules: BTreeMap<String, Arc<DestinationRule>>,
    /// Keyed by `namespace/name`.
    pub http_routes: BTreeMap<String, Arc<HttpRoute>>,
    /// Keyed by `namespace/name`.
    pub service_entries: BTreeMap<String, Arc<ServiceEntry>>,
    /// Only those named `istio` (the mesh config), by `namespace/name`.
    pub config_maps: BTreeMap<String, Arc<ConfigMap>>,
    /// Keyed by `namespace/name`.
    pub telemetries: BTreeMap<String, Arc<Telemetry>>,
    /// Keyed by `namespace/name`.
    pub endpoint_slices: BTreeMap<String, Arc<EndpointSlice>>,
}

impl Snapshot {
    /// Adds `other`'s resources (from `source`); a name already present is
    /// refused, and the first one kept.
    pub fn merge(&mut self, other: &Snapshot, source: &str) -> Vec<String> {
        struct Merge<'a> {
            into: &'a mut Snapshot,
            from: &'a Snapshot,
            source: &'a str,
            problems: Vec<String>,
        }
        impl Visitor for Merge<'_> {
            fn visit<K: Kind>(&mut self) {
                let into = K::of_mut(self.into);
                for (k, v) in K::of(self.from) {
                    if into.contains_key(k) {
                        self.problems.push(format!(
                            "{}: {} {k}: duplicate name; the first definition is kept",
                            self.source,
                            K::INFO.kind
                        ));
                    } else {
                        into.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let mut m = Merge {
            into: self,
            from: other,
            source,
            problems: Vec::new(),
        };
        each_kind(&mut m);
        m.problems
    }

    /// Copies the resource of `kind` named `key` from `previous` when this
    /// snapshot lacks it: a document that stopped parsing keeps its last good
    /// version. Returns whether one was kept.
    pub fn keep_previous(&mut self, previous: &Snapshot, kind: &str, key: &str) -> bool {
        struct Keep<'a> {
            into: &'a mut Snapshot,
            from: &'a Snapshot,
            kind: &'a str,
            key: &'a str,
            kept: bool,
        }
        impl Visitor for Keep<'_> {
            fn visit<K: Kind>(&mut self) {
                if K::INFO.kind != self.kind {
                    return;
                }
                let into = K::of_mut(self.into);
                if let Some(v) = K::of(self.from).get(self.key)
                    && !into.contains_key(self.key)
                {
                    into.insert(self.key.to_string(), v.clone());
                    self.kept = true;
                }
            }
        }
        let mut k = Keep {
            into: self,
            from: previous,
            kind,
            key,
            kept: false,
        };
        each_kind(&mut k);
        k.kept
    }
}

/// The objects of namespace `ns`, with their keys, in a map keyed by
/// `namespace/name`: one range of its keys, not a scan.
pub(crate) fn in_namespace<'a, V>(
    map: &'a BTreeMap<String, Arc<V>>,
    ns: &str,
) -> impl Iterator<Item = (&'a String, &'a Arc<V>)> + use<'a, V> {
    let prefix = format!("{ns}/");
    map.range(prefix.clone()..)
        .take_while(move |(k, _)| k.starts_with(&prefix))
}

pub(crate) fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}
