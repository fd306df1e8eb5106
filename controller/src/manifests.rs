//! The manifests source: Kubernetes YAML (multi-document) into a [`Snapshot`].
//!
//! Unknown kinds are skipped (debug log); a document that cannot be read is
//! reported with its file, position, kind and name, and the rest still load.

use kube::api::ObjectMeta;
use std::sync::Arc;

use serde::Deserialize;
use tracing::debug;

use crate::Snapshot;
use crate::kinds::{Kind, Visitor, each_kind};
use crate::snapshot::key;

/// A document that could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{source_name} document {index} ({kind} {name}): {message}")]
pub struct ManifestError {
    pub source_name: String,
    pub index: usize,
    pub kind: String,
    pub name: String,
    /// `namespace/name` for namespaced kinds, the name otherwise: the
    /// snapshot key of the resource the document meant to define.
    pub key: String,
    pub message: String,
}

impl ManifestError {
    /// The text is not YAML at all: nothing after this point was read.
    pub fn is_syntax(&self) -> bool {
        self.kind == "?"
    }
}

/// Adds every resource in `text` (named `source_name` in errors) to `snapshot`.
pub fn parse(text: &str, source_name: &str, snapshot: &mut Snapshot) -> Vec<ManifestError> {
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |kind: &str, name: &str, key: String, message: String| ManifestError {
            source_name: source_name.to_string(),
            index,
            kind: kind.to_string(),
            name: name.to_string(),
            key,
            message,
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                errors.push(err("?", "?", String::new(), format!("not YAML: {e}")));
                // The YAML stream cannot be resumed after a syntax error.
                break;
            }
        };
        let field = |k: &str| value.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let kind = field("kind").to_string();
        let api_version = field("apiVersion").to_string();
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|v| v.as_str());
        if name.is_empty() && !kind.is_empty() {
            errors.push(err(
                &kind,
                "?",
                String::new(),
                "metadata.name is required".into(),
            ));
            continue;
        }
        if api_version.is_empty() || kind.is_empty() {
            let doc_key = key(namespace, Some(&name));
            errors.push(err(
                &kind,
                &name,
                doc_key,
                "apiVersion and kind are required".into(),
            ));
            continue;
        }
        let mut load = Load {
            api_version: &api_version,
            kind: &kind,
            value: Some(value),
            snapshot,
            outcome: None,
        };
        each_kind(&mut load);
        match load.outcome {
            None => debug!(%api_version, %kind, %name, "ignoring unsupported kind"),
            Some((_, Ok(()))) => {}
            Some((doc_key, Err(e))) => errors.push(err(&kind, &name, doc_key, e)),
        }
    }
    errors
}

/// Reads one document as the kind whose apiVersion and kind it names.
struct Load<'a> {
    api_version: &'a str,
    kind: &'a str,
    value: Option<serde_yaml::Value>,
    snapshot: &'a mut Snapshot,
    /// The key it was stored (or meant to be stored) under, and the error.
    outcome: Option<(String, Result<(), String>)>,
}

impl Visitor for Load<'_> {
    fn visit<K: Kind>(&mut self) {
        if K::INFO.kind != self.kind || !K::INFO.reads(self.api_version) {
            return;
        }
        let Some(value) = self.value.take() else {
            return;
        };
        let meta = || {
            let m = value.get("metadata");
            let field = |f: &str| m.and_then(|m| m.get(f)).and_then(|v| v.as_str());
            ObjectMeta {
                name: field("name").map(str::to_string),
                namespace: field("namespace").map(str::to_string),
                ..ObjectMeta::default()
            }
        };
        // A kind read under one name only (the mesh config's ConfigMap):
        // others are skipped, as the API server's watch never sends them.
        if K::INFO
            .only_name
            .is_some_and(|n| meta().name.as_deref() != Some(n))
        {
            return;
        }
        let doc_key = K::INFO.key(&meta());
        let result = serde_yaml::from_value::<K>(value)
            .map(|o| {
                K::of_mut(self.snapshot).insert(K::INFO.key(o.meta()), Arc::new(o));
            })
            .map_err(|e| e.to_string());
        self.outcome = Some((doc_key, result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Multi-document YAML loads every supported kind and skips the others.
    #[test]
    fn loads_kinds() {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: shop}
spec: {nodeName: n1, containers: [{name: app}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: later, namespace: shop}
---
"#;
        let mut snap = Snapshot::default();
        let errors = parse(yaml, "shop.yaml", &mut snap);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(snap.namespaces.contains_key("shop"));
        assert!(snap.pods.contains_key("shop/a"));
        assert!(snap.services.contains_key("shop/web"));
    }

    /// Bad documents are named by file, position, kind and name; good ones still load.
    #[test]
    fn refusals_name_the_resource() {
        let yaml = r#"
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: shop}
spec: {containers: "not a list"}
---
kind: Pod
metadata: {name: noversion}
---
apiVersion: v1
kind: Pod
metadata: {namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: fine, namespace: shop}
spec: {containers: [{name: app}]}
"#;
        let mut snap = Snapshot::default();
        let errors = parse(yaml, "bad.yaml", &mut snap);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 3, "{text:?}");
        assert!(
            text[0].starts_with("bad.yaml document 0 (Pod broken):"),
            "{}",
            text[0]
        );
        assert!(text[1].contains("(Pod noversion): apiVersion and kind are required"));
        assert!(text[2].contains("(Pod ?): metadata.name is required"));
        assert!(snap.pods.contains_key("shop/fine"));
    }
}
