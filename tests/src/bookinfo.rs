//! Bookinfo's reviews behind a namespace waypoint, for the waypoint's
//! end-to-end tests: the manifests, the reviews VIP and small helpers.

use std::net::SocketAddr;

use anyhow::Result;

use crate::Lab;
use crate::apps::{self, HttpResponse};

/// Bookinfo's reviews, two versions on node-2, a client on node-1, and a
/// waypoint for the namespace (its pod is made by the lab, as the
/// controller's Deployment would be in Kubernetes).
pub const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: bookinfo
  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: waypoint
  namespace: bookinfo
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
---
apiVersion: v1
kind: Pod
metadata: {name: productpage, namespace: bookinfo, labels: {app: productpage}}
spec: {nodeName: node-1, serviceAccountName: bookinfo-productpage, containers: [{name: app}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews, version: v1}}
spec: {nodeName: node-2, serviceAccountName: bookinfo-reviews, containers: [{name: app}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: bookinfo, labels: {app: reviews, version: v2}}
spec: {nodeName: node-2, serviceAccountName: bookinfo-reviews, containers: [{name: app}]}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-0, namespace: bookinfo, labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}}
spec: {nodeName: node-1, serviceAccountName: waypoint, containers: [{name: istio-proxy}]}
status: {podIP: 10.244.1.20}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-tcp, namespace: bookinfo}
spec: {clusterIP: 10.96.0.25, selector: {app: reviews}, ports: [{name: tcp-who, port: 9090}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v1, namespace: bookinfo}
spec: {clusterIP: 10.96.0.22, selector: {app: reviews, version: v1}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-grpc, namespace: bookinfo}
spec: {clusterIP: 10.96.0.26, selector: {app: reviews, version: v1}, ports: [{name: grpc, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec: {clusterIP: 10.96.0.23, selector: {app: reviews, version: v2}, ports: [{name: http, port: 9080}]}
"#;

/// The reviews Service, as clients dial it.
pub const REVIEWS: &str = "10.96.0.20:9080";
/// The waypoint's pod, by `namespace/name`.
pub const WAYPOINT_POD: &str = "bookinfo/waypoint-0";

/// GET `path` on reviews from productpage.
pub fn get(lab: &Lab, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
    let client = lab.pod("bookinfo/productpage");
    let dst: SocketAddr = REVIEWS.parse()?;
    apps::http(client, dst, "GET", path, headers)
}

/// Which pod answered.
pub fn served_by(r: &HttpResponse) -> &str {
    r.body
        .strip_prefix("hello from ")
        .and_then(|b| b.split(',').next())
        .unwrap_or("?")
}
