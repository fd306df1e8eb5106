//! The typed resources the controller translates, from either source.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};

use crate::policy::{AuthorizationPolicy, PeerAuthentication};

/// Every resource the translation reads, keyed for lookup.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Keyed by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Keyed by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    pub nodes: BTreeMap<String, Node>,
    /// Keyed by `namespace/name`.
    pub authorization_policies: BTreeMap<String, AuthorizationPolicy>,
    /// Keyed by `namespace/name`.
    pub peer_authentications: BTreeMap<String, PeerAuthentication>,
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
        add(
            &mut self.authorization_policies,
            &other.authorization_policies,
            "AuthorizationPolicy",
            source,
            &mut problems,
        );
        add(
            &mut self.peer_authentications,
            &other.peer_authentications,
            "PeerAuthentication",
            source,
            &mut problems,
        );
        problems
    }

    /// Copies the resource of `kind` named `key` from `previous` when this
    /// snapshot lacks it: a document that stopped parsing keeps its last good
    /// version. Returns whether one was kept.
    pub fn keep_previous(&mut self, previous: &Snapshot, kind: &str, key: &str) -> bool {
        fn keep<T: Clone>(
            into: &mut BTreeMap<String, T>,
            from: &BTreeMap<String, T>,
            key: &str,
        ) -> bool {
            match from.get(key) {
                Some(v) if !into.contains_key(key) => {
                    into.insert(key.to_string(), v.clone());
                    true
                }
                _ => false,
            }
        }
        match kind {
            "Namespace" => keep(&mut self.namespaces, &previous.namespaces, key),
            "Pod" => keep(&mut self.pods, &previous.pods, key),
            "Service" => keep(&mut self.services, &previous.services, key),
            "Node" => keep(&mut self.nodes, &previous.nodes, key),
            "AuthorizationPolicy" => keep(
                &mut self.authorization_policies,
                &previous.authorization_policies,
                key,
            ),
            "PeerAuthentication" => keep(
                &mut self.peer_authentications,
                &previous.peer_authentications,
                key,
            ),
            _ => false,
        }
    }
}

pub(crate) fn key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or("default"),
        name.unwrap_or_default()
    )
}
