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
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SecurityContext, Service, ServiceAccount, ServiceAccountTokenProjection,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use tracing::{info, warn};

use crate::waypoints::{GATEWAY_NAME, HBONE_PORT, Infrastructure};

/// The field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "weft-controller";
/// Istio's user and group for its proxies.
const PROXY_UID: i64 = 1337;
/// Where the waypoint reads its token and the mesh root.
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ROOT_DIR: &str = "/var/run/secrets/istio";

/// A waypoint Gateway to deploy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaypointGateway {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `spec.infrastructure`: labels and annotations for every object, and
    /// the ConfigMap that overlays them.
    pub infrastructure: Infrastructure,
}

/// How often the deployer runs without a change (a parametersRef
/// ConfigMap's edits land within this).
pub const RESYNC: Duration = Duration::from_secs(30);

/// The objects of one waypoint, as applied.
#[derive(Clone, Debug, PartialEq)]
pub struct WaypointObjects {
    pub service_account: ServiceAccount,
    pub deployment: Deployment,
    pub service: Service,
    pub disruption_budget: PodDisruptionBudget,
}

impl WaypointObjects {
    fn json(&self) -> serde_json::Value {
        serde_json::json!([
            self.service_account,
            self.deployment,
            self.service,
            self.disruption_budget
        ])
    }

    /// Istio's parametersRef ConfigMap: each key (`deployment`, `service`,
    /// `serviceAccount`, `podDisruptionBudget`) a YAML patch of that object,
    /// merged in: objects key by key, a list of named objects (containers,
    /// env, ports) item by name, anything else replaced; `null` removes.
    /// An unknown key, bad YAML, or a result that is not a valid object is
    /// refused, naming the key.
    pub fn overlay(&mut self, data: &BTreeMap<String, String>) -> Result<(), String> {
        for (key, yaml) in data {
            let patch: serde_json::Value =
                serde_yaml::from_str(yaml).map_err(|e| format!("{key}: {e}"))?;
            if !patch.is_object() {
                return Err(format!("{key}: want a YAML object"));
            }
            fn patched<T: serde::Serialize + serde::de::DeserializeOwned>(
                key: &str,
                obj: &T,
                patch: &serde_json::Value,
            ) -> Result<T, String> {
                let mut v = serde_json::to_value(obj).map_err(|e| e.to_string())?;
                merge(&mut v, patch);
                serde_json::from_value(v).map_err(|e| format!("{key}: {e}"))
            }
            match key.as_str() {
                "deployment" => self.deployment = patched(key, &self.deployment, &patch)?,
                "service" => self.service = patched(key, &self.service, &patch)?,
                "serviceAccount" => {
                    self.service_account = patched(key, &self.service_account, &patch)?
                }
                "podDisruptionBudget" => {
                    self.disruption_budget = patched(key, &self.disruption_budget, &patch)?
                }
                other => {
                    return Err(format!(
                        "key {other:?}: want deployment, service, serviceAccount or podDisruptionBudget"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Merges `patch` into `v`: objects key by key (`null` removes), lists of
/// objects that all carry a `name` item by name, anything else replaced.
fn merge(v: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let named = |l: &Vec<Value>| {
        l.iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
    };
    match (v, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, pv) in b {
                if pv.is_null() {
                    a.remove(k);
                } else if let Some(av) = a.get_mut(k) {
                    merge(av, pv);
                } else {
                    a.insert(k.clone(), pv.clone());
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if named(a) && named(b) => {
            for item in b {
                match a.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(x) => merge(x, item),
                    None => a.push(item.clone()),
                }
            }
        }
        (v, p) => *v = p.clone(),
    }
}

/// How waypoint pods are made.
#[derive(Clone, Debug)]
pub struct Settings {
    pub image: String,
    /// The controller's address as waypoints dial it (`ip:port`).
    pub xds_address: String,
    pub trust_domain: String,
}

/// The Gateway's `infrastructure.labels`, then Istio's own, which win.
fn labels(gw: &WaypointGateway) -> BTreeMap<String, String> {
    let mut l = gw.infrastructure.labels.clone();
    l.extend([
        (GATEWAY_NAME.to_string(), gw.name.clone()),
        ("istio.io/dataplane-mode".to_string(), "none".to_string()),
        (
            "gateway.istio.io/managed".to_string(),
            "istio.io-mesh-controller".to_string(),
        ),
    ]);
    l
}

fn meta(gw: &WaypointGateway) -> ObjectMeta {
    ObjectMeta {
        name: Some(gw.name.clone()),
        namespace: Some(gw.namespace.clone()),
        labels: Some(labels(gw)),
        annotations: annotations(gw),
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

fn annotations(gw: &WaypointGateway) -> Option<BTreeMap<String, String>> {
    let a = &gw.infrastructure.annotations;
    (!a.is_empty()).then(|| a.clone())
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

/// The ServiceAccount, Deployment, Service and PodDisruptionBudget of one
/// waypoint, before any parametersRef overlay.
pub fn waypoint_objects(gw: &WaypointGateway, s: &Settings) -> WaypointObjects {
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
                    annotations: annotations(gw),
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
    // At most one waypoint pod down for a voluntary disruption (a drain);
    // with one replica this never blocks it.
    let disruption_budget = PodDisruptionBudget {
        metadata: meta(gw),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    GATEWAY_NAME.to_string(),
                    gw.name.clone(),
                )])),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    };
    WaypointObjects {
        service_account: sa,
        deployment,
        service,
        disruption_budget,
    }
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

    /// Forgets what it applied: a replica that (again) leads applies
    /// everything anew.
    pub fn forget(&mut self) {
        self.applied.clear();
    }

    /// Makes every gateway's objects and status current. A failure is
    /// logged and retried on the next change; the others go on.
    pub async fn apply(&mut self, gateways: &[WaypointGateway]) {
        for gw in gateways {
            let key = format!("{}/{}", gw.namespace, gw.name);
            let mut objects = waypoint_objects(gw, &self.settings);
            // A refused overlay leaves what runs as it is and says why on
            // the Gateway's status.
            if let Err(why) = self.overlay(gw, &mut objects).await {
                let wanted = serde_json::json!({"refused": why});
                if self.applied.get(&key) == Some(&wanted) {
                    continue;
                }
                warn!(component = "kubernetes", gateway = %key, problem = %why, "waypoint parameters refused; what runs is left as it is");
                match self.write_status(gw, Err(&why)).await {
                    Ok(()) => {
                        self.applied.insert(key, wanted);
                    }
                    Err(e) => {
                        warn!(component = "kubernetes", gateway = %key, error = %e, "cannot write the Gateway's status")
                    }
                }
                continue;
            }
            let wanted = objects.json();
            if self.applied.get(&key) == Some(&wanted) {
                continue;
            }
            match self.apply_one(gw, &objects).await {
                Ok(()) => {
                    info!(component = "kubernetes", gateway = %key, "waypoint deployed");
                    self.applied.insert(key, wanted);
                }
                Err(e) => {
                    warn!(component = "kubernetes", gateway = %key, error = %e, "cannot deploy the waypoint; will retry")
                }
            }
        }
        self.applied.retain(|k, _| {
            gateways
                .iter()
                .any(|g| format!("{}/{}", g.namespace, g.name) == *k)
        });
    }

    /// Reads the Gateway's parametersRef ConfigMap, if it names one, and
    /// overlays `objects` with it.
    async fn overlay(
        &self,
        gw: &WaypointGateway,
        objects: &mut WaypointObjects,
    ) -> Result<(), String> {
        let Some(r) = &gw.infrastructure.parameters_ref else {
            return Ok(());
        };
        let field = "spec.infrastructure.parametersRef";
        if !r.group.is_empty() || r.kind != "ConfigMap" {
            return Err(format!(
                "{field}: {}/{} is not supported: want a ConfigMap (group \"\")",
                r.group, r.kind
            ));
        }
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), &gw.namespace)
            .get_opt(&r.name)
            .await
            .map_err(|e| format!("{field}: ConfigMap {}/{}: {e}", gw.namespace, r.name))?
            .ok_or_else(|| {
                format!(
                    "{field}: ConfigMap {}/{} does not exist",
                    gw.namespace, r.name
                )
            })?;
        objects
            .overlay(&cm.data.unwrap_or_default())
            .map_err(|e| format!("{field}: ConfigMap {}/{}: {e}", gw.namespace, r.name))
    }

    async fn apply_one(
        &self,
        gw: &WaypointGateway,
        o: &WaypointObjects,
    ) -> Result<(), kube::Error> {
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let ns = &gw.namespace;
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(&o.service_account))
            .await?;
        Api::<Service>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(&o.service))
            .await?;
        Api::<Deployment>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(&o.deployment))
            .await?;
        Api::<PodDisruptionBudget>::namespaced(self.client.clone(), ns)
            .patch(&gw.name, &params, &Patch::Apply(&o.disruption_budget))
            .await?;
        self.write_status(gw, Ok(())).await
    }

    /// Accepted and Programmed, or why the Gateway's parameters are refused
    /// (Gateway API's `InvalidParameters`).
    async fn write_status(
        &self,
        gw: &WaypointGateway,
        outcome: Result<(), &str>,
    ) -> Result<(), kube::Error> {
        let ns = &gw.namespace;
        let gvk = GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway");
        let ar = ApiResource::from_gvk_with_plural(&gvk, "gateways");
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let condition = |ty: &str, ok: bool, reason: &str, message: &str| {
            serde_json::json!({"type": ty, "status": if ok { "True" } else { "False" }, "reason": reason,
                               "message": message, "lastTransitionTime": now})
        };
        let conditions = match outcome {
            Ok(()) => vec![
                condition(
                    "Accepted",
                    true,
                    "Accepted",
                    "a waypoint of class istio-waypoint",
                ),
                condition(
                    "Programmed",
                    true,
                    "Programmed",
                    "Deployment, Service, ServiceAccount and PodDisruptionBudget applied",
                ),
            ],
            Err(why) => vec![
                condition("Accepted", false, "InvalidParameters", why),
                condition(
                    "Programmed",
                    false,
                    "Invalid",
                    "the parameters were refused; what runs is unchanged",
                ),
            ],
        };
        let status = serde_json::json!({"status": {
            "conditions": conditions,
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
            ..WaypointGateway::default()
        };
        let s = Settings {
            image: "weft/waypoint:dev".into(),
            xds_address: "10.96.0.2:15012".into(),
            trust_domain: "cluster.local".into(),
        };
        let WaypointObjects {
            service_account: sa,
            deployment: dep,
            service: svc,
            disruption_budget: pdb,
        } = waypoint_objects(&gw, &s);
        for m in [&sa.metadata, &dep.metadata, &svc.metadata, &pdb.metadata] {
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

    fn settings() -> Settings {
        Settings {
            image: "weft/waypoint:dev".into(),
            xds_address: "weft-controller.weft-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
        }
    }

    /// `spec.infrastructure` labels and annotations go on every object and
    /// the pod template; Istio's own labels win.
    #[test]
    fn infrastructure_labels_and_annotations() {
        let gw = WaypointGateway {
            namespace: "shop".into(),
            name: "waypoint".into(),
            infrastructure: Infrastructure {
                labels: BTreeMap::from([
                    ("team".to_string(), "payments".to_string()),
                    ("istio.io/dataplane-mode".to_string(), "ambient".to_string()),
                ]),
                annotations: BTreeMap::from([("cost-center".to_string(), "42".to_string())]),
                parameters_ref: None,
            },
            ..WaypointGateway::default()
        };
        let o = waypoint_objects(&gw, &settings());
        let template = o
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .clone()
            .unwrap();
        for m in [
            &o.service_account.metadata,
            &o.deployment.metadata,
            &o.service.metadata,
            &o.disruption_budget.metadata,
            &template,
        ] {
            let labels = m.labels.as_ref().unwrap();
            assert_eq!(labels["team"], "payments");
            assert_eq!(labels["istio.io/dataplane-mode"], "none", "never captured");
            assert_eq!(m.annotations.as_ref().unwrap()["cost-center"], "42");
        }
        let pdb = o.disruption_budget.spec.unwrap();
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
    }

    /// A parametersRef ConfigMap overlays the objects as Istio's does: the
    /// container by name, new keys added, `null` removing; bad input is
    /// refused with its key named.
    #[test]
    fn parameters_overlay() {
        let gw = WaypointGateway {
            namespace: "shop".into(),
            name: "waypoint".into(),
            ..WaypointGateway::default()
        };
        let mut o = waypoint_objects(&gw, &settings());
        let data = BTreeMap::from([
            (
                "deployment".to_string(),
                "spec:\n  replicas: 3\n  template:\n    spec:\n      containers:\n      - name: istio-proxy\n        resources: {limits: {memory: 512Mi}}\n      nodeSelector: {pool: mesh}\n".to_string(),
            ),
            (
                "podDisruptionBudget".to_string(),
                "spec: {minAvailable: 2, maxUnavailable: null}".to_string(),
            ),
            ("service".to_string(), "metadata: {annotations: {lb: internal}}".to_string()),
        ]);
        o.overlay(&data).unwrap();
        let spec = o.deployment.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.containers.len(), 1, "merged by name, not appended");
        let c = &pod.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("weft/waypoint:dev"),
            "the rest kept"
        );
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
            "512Mi"
        );
        assert_eq!(pod.node_selector.as_ref().unwrap()["pool"], "mesh");
        let pdb = o.disruption_budget.spec.as_ref().unwrap();
        assert_eq!(
            (pdb.min_available.clone(), pdb.max_unavailable.clone()),
            (Some(IntOrString::Int(2)), None)
        );
        assert_eq!(
            o.service.metadata.annotations.as_ref().unwrap()["lb"],
            "internal"
        );

        let refused = |k: &str, v: &str| {
            let mut o = waypoint_objects(&gw, &settings());
            o.overlay(&BTreeMap::from([(k.to_string(), v.to_string())]))
                .unwrap_err()
        };
        assert!(refused("horizontalPodAutoscaler", "spec: {}").contains("want deployment"));
        assert!(refused("deployment", "spec: [").starts_with("deployment: "));
        assert_eq!(refused("service", "- a"), "service: want a YAML object");
        assert!(refused("deployment", "spec: {replicas: many}").starts_with("deployment: "));
    }
}
