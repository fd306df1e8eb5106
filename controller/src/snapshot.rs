//! The typed resources the controller translates, from either source.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};

/// Every resource the translation reads, keyed for lookup.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub nodes: BTreeMap<String, Node>,
}

pub(crate) fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}
