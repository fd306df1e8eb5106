//! Kubernetes mode: for each waypoint Gateway, the controller makes what
//! Istio's makes: a ServiceAccount, a Deployment and a Service (15008 mesh,
//! 15021 status), all named after the Gateway and owned by it (deleting the
//! Gateway removes them), with Istio's labels, a non-root user, never
//! captured; and it writes the Gateway's status (Accepted, Programmed, the
//! address). Objects are applied server-side as `weft-controller`, and only
//! when what we would write changed.
//!
//! [`waypoint_objects`] is pure; [`Deployer`] talks to the API server.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SecurityContext, Service, ServiceAccount, ServiceAccountTokenProjection,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tracing::{info, warn};

use crate::waypoints::{GATEWAY_NAME, HBONE_PORT};

/// The field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "weft-controller";
/// Istio's user and group for its proxies.
const PROXY_UID: i64 = 1337;
/// Where the waypoint reads its token and the mesh root.
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ROOT_DIR: &str = "/var/run/secrets/istio";

/// A waypoint Gateway to deploy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointGateway {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// How waypoint pods are made.
#[derive(Clone, Debug)]
pub struct Settings {
    pub image: String,
    /// The controller's address as waypoints dial it (`ip:port`).
    pub xds_address: String,
    pub trust_domain: String,
}

fn labels(gw: &WaypointGateway) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_NAME.to_string(), gw.name.clone()),
        ("istio.io/dataplane-mode".to_string(), "none".to_string()),
        (
            "gateway.istio.io/managed".to_string(),
            "istio.io-mesh-controller".to_string(),
        ),
    ])
}

fn meta(gw: &WaypointGateway) -> ObjectMeta {
    ObjectMeta {
        name: Some(gw.name.clone()),
        namespace: Some(gw.namespace.clone()),
        labels: Some(labels(gw)),
        owner_references: Some(vec![OwnerReference {
            api_version: "gateway.networking.k8s.io/v1".into(),
            kind: "Gateway".into(),
            name: gw.name.clone(),
            uid: gw.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]),
        ..ObjectMeta::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// The ServiceAccount, Deployment and Service of one waypoint.
pub fn waypoint_objects(
    gw: &WaypointGateway,
    s: &Settings,
) -> (ServiceAccount, Deployment, Service) {
    let sa = ServiceAccount {
        metadata: meta(gw),
        ..ServiceAccount::default()
    };
    let port = |name: &str, p: i32| ContainerPort {
        name: Some(name.into()),
        container_port: p,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let container = Container {
        name: "istio-proxy".into(),
        image: Some(s.image.clone()),
        ports: Some(vec![
            port("mesh", i32::from(HBONE_PORT)),
            port("metrics", 15020),
            port("status-port", 15021),
        ]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field_env("NODE_NAME", "spec.nodeName"),
            env("GATEWAY_NAME", &gw.name),
            env("TRUST_DOMAIN", &s.trust_domain),
            env("XDS_ADDRESS", &s.xds_address),
            env("ROOT_CERT", &format!("{ROOT_DIR}/root-cert.pem")),
            env("TOKEN_PATH", &format!("{TOKEN_DIR}/istio-token")),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(15021),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(2),
            ..Probe::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "istio-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "istiod-ca-cert".into(),
                mount_path: ROOT_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    };
    let volumes = vec![
        Volume {
            name: "istio-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some("istio-ca".into()),
                        expiration_seconds: Some(43200),
                        path: "istio-token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "istiod-ca-cert".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "istio-ca-root-cert".into(),
                        ..ConfigMapProjection::default()
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    let selector = BTreeMap::from([(GATEWAY_NAME.to_string(), gw.name.clone())]);
    let deployment = Deployment {
        metadata: meta(gw),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(gw)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gw.name.clone()),
                    containers: vec![container],
                    volumes: Some(volumes),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        ..PodSecurityContext::default()
                    }),
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    };
    let svc_port = |name: &str, p: i32, app: Option<&str>| ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        app_protocol: app.map(str::to_string),
        ..ServicePort::default()
    };
    let service = Service {
        metadata: meta(gw),
        spec: Some(ServiceSpec {
            selector: Some(selector),
            ports: Some(vec![
                svc_port("mesh", i32::from(HBONE_PORT), Some("all")),
                svc_port("status-port", 15021, None),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    (sa, deployment, service)
}

/// Applies waypoint objects and Gateway statuses, remembering what it wrote.
pub struct Deployer {
    client: Client,
    settings: Settings,
    /// Gateway key → the JSON last applied (objects and status).
    applied: BTreeMap<String, serde_json::Value>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer")
            .field("applied", &self.applied.len())
            .finish()
    }
}

impl Deployer {
    pub fn new(client: Client, settings: Settings) -> Self {
        Deployer {
            client,
            settings,
            applied: BTreeMap::new(),
        }
    }

    /// Makes every gateway's objects and status current. A failure is
    /// logged and retried on the next change; the others go on.
    pub async fn apply(&mut self, gateways: &[WaypointGateway]) {
        for gw in gateways {
            let key = format!("{}/{}", gw.namespace, gw.name);
            let (sa, dep, svc) = waypoint_objects(gw, &self.settings);
            let wanted = serde_json::json!([sa, dep, svc]);
            if self.applied.get(&key) == Some(&wanted) {
                continue;
            }
            match self.apply_one(gw, &sa, &dep, &svc).await {
                Ok(()) => {
                    info!(component = "kubernetes", gateway = %key, "waypoint deployed");
                    self.applied.insert(key, wanted);
                }
                Err(e) => {
                    warn!(component = "kubernetes", gateway = %key, error = %e, "cannot deploy the waypoint; will retry on the next change")
                }
            }
        }
        self.applied.retain(|k, _| {
            gateways
                .iter()
                .any(|g| format!("{}/{}", g.namespace, g.name) == *k)
        });
    }

    async fn apply_one(
        &self,
        gw: &WaypointGateway,
        sa: &ServiceAccount,
        dep: &Deployment,
        svc: &Service,
    ) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let ns = &gw.namespace;
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(sa))
            .await?;
        Api::<Service>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(svc))
            .await?;
        Api::<Deployment>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(dep))
            .await?;
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "gateways");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let condition = |ty: &str, reason: &str, message: &str| {
            serde_json::json!({"type": ty, "status": "True", "reason": reason,
                               "message": message, "lastTransitionTime": now})
        };
        let status = serde_json::json!({"status": {
            "conditions": [
                condition("Accepted", "Accepted", "a waypoint of class istio-waypoint"),
                condition("Programmed", "Programmed", "Deployment, Service and ServiceAccount applied"),
            ],
            "addresses": [{"type": "Hostname", "value": format!("{}.{ns}.svc.cluster.local", gw.name)}],
        }});
        Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &ar)
            .patch_status(&gw.name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_as_istio_makes_them() {
        let gw = WaypointGateway {
            namespace: "shop".into(),
            name: "waypoint".into(),
            uid: "u-1".into(),
        };
        let s = Settings {
            image: "weft/waypoint:dev".into(),
            xds_address: "10.96.0.2:15012".into(),
            trust_domain: "cluster.local".into(),
        };
        let (sa, dep, svc) = waypoint_objects(&gw, &s);
        for m in [&sa.metadata, &dep.metadata, &svc.metadata] {
            assert_eq!(m.name.as_deref(), Some("waypoint"));
            let owner = &m.owner_references.as_ref().unwrap()[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
                ("Gateway", "u-1", Some(true))
            );
            assert_eq!(
                m.labels.as_ref().unwrap()["istio.io/dataplane-mode"],
                "none",
                "never captured"
            );
        }
        let pod = dep.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
        let c = &pod.containers[0];
        assert_eq!(c.security_context.as_ref().unwrap().run_as_user, Some(1337));
        assert_eq!(
            c.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let ports: Vec<i32> = svc
            .spec
            .unwrap()
            .ports
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [15008, 15021]);
    }
}
