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

impl Snapshot {
    /// Adds `other`'s resources (from `source`); a name already present is
    /// refused, and the first one kept.
    pub fn merge(&mut self, other: &Snapshot, source: &str) -> Vec<String> {
        fn add<T: Clone>(
            into: &mut BTreeMap<String, T>,
            from: &BTreeMap<String, T>,
            kind: &str,
            source: &str,
            problems: &mut Vec<String>,
        ) {
            for (k, v) in from {
                if into.contains_key(k) {
                    problems.push(format!(
                        "{source}: {kind} {k}: duplicate name; the first definition is kept"
                    ));
                } else {
                    into.insert(k.clone(), v.clone());
                }
            }
        }
        let mut problems = Vec::new();
        add(
            &mut self.namespaces,
            &other.namespaces,
            "Namespace",
            source,
            &mut problems,
        );
        add(&mut self.pods, &other.pods, "Pod", source, &mut problems);
        add(
            &mut self.services,
            &other.services,
            "Service",
            source,
            &mut problems,
        );
        add(&mut self.nodes, &other.nodes, "Node", source, &mut problems);
        problems
    }
}

pub(crate) fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}
