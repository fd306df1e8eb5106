//! Kubernetes mode: the mesh root where Istio publishes it, the ConfigMap
//! `istio-ca-root-cert` (key `root-cert.pem`) in every namespace but
//! Kubernetes' own, so ztunnel, waypoints and workloads can mount it.
//!
//! The controller applies it (server-side, as `weft-controller`) to each
//! namespace it has not yet written, watches those ConfigMaps by name, and
//! writes again one that is deleted or whose root is not the mesh's. A
//! failed write is retried every [`RETRY`] until it lands. The controller's
//! own namespace always gets it, even one on the ignore list.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_objects};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tracing::{info, warn};

use crate::deploy::FIELD_MANAGER;

/// Istio's name and key for it.
pub const CONFIG_MAP: &str = "istio-ca-root-cert";
pub const KEY: &str = "root-cert.pem";
/// Namespaces that never hold mesh workloads, as Istio skips them.
pub const IGNORED: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "local-path-storage",
];
/// How soon a failed write is tried again.
pub const RETRY: Duration = Duration::from_secs(10);

/// The namespaces that get the root: all but [`IGNORED`], and `own` always.
pub fn targets<'a>(namespaces: impl IntoIterator<Item = &'a str>, own: &str) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = namespaces
        .into_iter()
        .filter(|ns| !IGNORED.contains(ns))
        .map(str::to_string)
        .collect();
    out.insert(own.to_string());
    out
}

/// The ConfigMap for `namespace`, holding `root` (PEM).
pub fn config_map(namespace: &str, root: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(CONFIG_MAP.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                ("istio.io/config".to_string(), "true".to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    FIELD_MANAGER.to_string(),
                ),
            ])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(KEY.to_string(), root.to_string())])),
        ..ConfigMap::default()
    }
}

/// Writes the root to namespaces, remembering which hold it.
pub struct RootPublisher {
    client: Client,
    root: String,
    /// Namespaces whose ConfigMap holds `root`, as far as we know.
    current: BTreeSet<String>,
    /// A write failed: try again after [`RETRY`].
    failed: bool,
}

impl std::fmt::Debug for RootPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootPublisher")
            .field("current", &self.current.len())
            .field("failed", &self.failed)
            .finish()
    }
}

impl RootPublisher {
    pub fn new(client: Client, root: &str) -> Self {
        RootPublisher {
            client,
            root: root.to_string(),
            current: BTreeSet::new(),
            failed: false,
        }
    }

    /// Writes the root to each of `targets` that does not hold it yet. A
    /// failure is logged, and that namespace is tried again later.
    pub async fn apply(&mut self, targets: &BTreeSet<String>) {
        self.current.retain(|ns| targets.contains(ns));
        self.failed = false;
        let params = PatchParams::apply(FIELD_MANAGER).force();
        for ns in targets.difference(&self.current.clone()) {
            let cm = config_map(ns, &self.root);
            let api = Api::<ConfigMap>::namespaced(self.client.clone(), ns);
            match api.patch(CONFIG_MAP, &params, &Patch::Apply(&cm)).await {
                Ok(_) => {
                    info!(component = "kubernetes", namespace = %ns, "mesh root published ({CONFIG_MAP})");
                    self.current.insert(ns.clone());
                }
                Err(e) => {
                    warn!(component = "kubernetes", namespace = %ns, error = %e, "cannot publish the mesh root ({CONFIG_MAP}); retrying");
                    self.failed = true;
                }
            }
        }
    }

    /// What a watch saw: a ConfigMap deleted, or holding another root, is
    /// written again on the next [`apply`](Self::apply). Returns whether
    /// one is due.
    pub fn observed(&mut self, cm: &ConfigMap, deleted: bool) -> bool {
        let Some(ns) = cm.namespace() else {
            return false;
        };
        let ours = cm
            .data
            .as_ref()
            .and_then(|d| d.get(KEY))
            .is_some_and(|r| *r == self.root);
        if (deleted || !ours) && self.current.remove(&ns) {
            warn!(component = "kubernetes", namespace = %ns, deleted, "{CONFIG_MAP} changed by someone else; writing it again");
            return true;
        }
        false
    }
}

/// Keeps the root published to the [`targets`] among `namespaces` (every
/// namespace of the cluster, as they change) and `own` (the controller's),
/// repairs what the watch shows removed or changed, and retries failures;
/// only while this replica leads (`leader`).
pub async fn run(
    mut publisher: RootPublisher,
    own: String,
    mut namespaces: watch::Receiver<BTreeSet<String>>,
    mut leader: watch::Receiver<bool>,
) {
    let api = Api::<ConfigMap>::all(publisher.client.clone());
    let events = watch_objects(
        api,
        watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}")),
    )
    .default_backoff();
    let mut events = std::pin::pin!(events);
    if *leader.borrow_and_update() {
        let first = targets(
            namespaces.borrow_and_update().iter().map(String::as_str),
            &own,
        );
        publisher.apply(&first).await;
    }
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = tokio::select! {
            changed = namespaces.changed() => {
                if changed.is_err() {
                    return;
                }
                true
            }
            Some(event) = events.next() => match event {
                Ok(Event::Delete(cm)) => publisher.observed(&cm, true),
                Ok(Event::Apply(cm) | Event::InitApply(cm)) => publisher.observed(&cm, false),
                Ok(_) => false,
                Err(e) => {
                    warn!(component = "kubernetes", error = %e, "{CONFIG_MAP} watch failed; retrying with backoff");
                    false
                }
            },
            _ = retry.tick() => publisher.failed,
            changed = leader.changed() => {
                if changed.is_err() {
                    return;
                }
                // Leading anew: what another replica wrote meanwhile is unknown.
                publisher.current.clear();
                true
            }
        };
        if due && *leader.borrow() {
            let now = targets(
                namespaces.borrow_and_update().iter().map(String::as_str),
                &own,
            );
            publisher.apply(&now).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_namespace_but_kubernetes_own_and_always_ours() {
        let t = targets(
            ["default", "kube-system", "shop", "kube-public"],
            "weft-system",
        );
        assert_eq!(
            t.into_iter().collect::<Vec<_>>(),
            ["default", "shop", "weft-system"]
        );
        // Installed in kube-system, the controller's namespace still gets it.
        let t = targets(["kube-system", "default"], "kube-system");
        assert!(t.contains("kube-system"));
    }

    #[test]
    fn the_config_map_is_istios() {
        let cm = config_map("shop", "PEM");
        assert_eq!(cm.metadata.name.as_deref(), Some("istio-ca-root-cert"));
        assert_eq!(cm.data.unwrap()["root-cert.pem"], "PEM");
        assert_eq!(cm.metadata.labels.unwrap()["istio.io/config"], "true");
    }
}
