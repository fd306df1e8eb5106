//! The manifests the README's install steps apply (`examples/install/`)
//! read and translate with no refusal, against a namespace like the one
//! they are applied to.

use weft_controller::manifests;
use weft_controller::translate::{self, Mesh};

const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: app}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80}]}
"#;

#[test]
fn the_install_examples_are_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/install");
    let mut snap = weft_controller::Snapshot::default();
    assert!(manifests::parse(SHOP, "shop.yaml", &mut snap).is_empty());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    for f in &files {
        // As `kubectl apply -n shop` places them.
        let text = std::fs::read_to_string(f)
            .unwrap()
            .replace("metadata:\n", "metadata:\n  namespace: shop\n");
        let errors = manifests::parse(&text, &f.display().to_string(), &mut snap);
        assert!(errors.is_empty(), "{}: {errors:?}", f.display());
    }
    assert_eq!(snap.gateways.len(), 1);
    assert_eq!(snap.authorization_policies.len(), 1);
    let t = translate::translate(&snap, &Mesh::default(), None);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let statuses: Vec<_> = t.statuses().collect();
    assert!(!statuses.is_empty());
    for s in statuses {
        assert!(
            s.accepted,
            "{} {}/{}: {}",
            s.kind, s.namespace, s.name, s.message
        );
    }
    // The Service is bound to the waypoint the example declares.
    let web = t.config.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(
        web.waypoint.as_ref().map(|w| w.hostname.as_str()),
        Some("waypoint.shop.svc.cluster.local")
    );
}
