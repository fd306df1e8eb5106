//! Manifests the unit tests share.

/// Namespace `shop` (ambient, bound to waypoint `waypoint`), its Gateway
/// and the waypoint's pod; a test's own documents follow a `---`.
macro_rules! shop_with_waypoint {
    () => {
        r#"apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {nodeName: n1, serviceAccountName: waypoint, containers: [{name: proxy}]}
status: {podIP: 10.244.1.20}
"#
    };
}
pub(crate) use shop_with_waypoint;
