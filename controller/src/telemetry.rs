//! Tracing for waypoints, as Istio selects it: MeshConfig (the `istio`
//! ConfigMap's `mesh` key in the root namespace) names the providers in
//! `extensionProviders` and may set `defaultProviders.tracing`; Telemetry
//! resources (`telemetry.istio.io`) choose among them and set the sampling,
//! the root namespace's for the mesh, a namespace's for its waypoints, one
//! whose `targetRefs` names a waypoint's Gateway for that waypoint. Each
//! level overrides the fields it sets. Only `opentelemetry` providers are
//! served (OTLP over gRPC); Istio's default sampling is 1%.
//!
//! The result is one `weft.waypoint.v1.Telemetry` per waypoint, named
//! `<namespace>/<gateway>`.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};
use weft_api::{Identity, LocalConfig};
use weft_xds::proto::waypoint as pb;

use crate::Snapshot;
use crate::policy::Status;
use crate::routes::{L7, L7Resource, order};
use crate::translate::{Mesh, names};

/// The ConfigMap Istio keeps MeshConfig in, in the root namespace.
pub const MESH_CONFIG_MAP: &str = "istio";
/// Istio's sampling when neither MeshConfig nor a Telemetry sets one.
const DEFAULT_SAMPLING: f64 = 1.0;

/// `telemetry.istio.io` Telemetry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: TelemetrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TelemetrySpec {
    pub selector: Option<serde_yaml::Value>,
    pub target_ref: Option<TargetRef>,
    pub target_refs: Vec<TargetRef>,
    pub tracing: Vec<TracingConfig>,
    /// Not read here (the waypoint's metrics are Istio's standard set).
    pub metrics: Option<serde_yaml::Value>,
    pub access_logging: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TargetRef {
    pub group: Option<String>,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TracingConfig {
    #[serde(rename = "match")]
    pub matches: Option<serde_yaml::Value>,
    pub providers: Vec<ProviderRef>,
    pub random_sampling_percentage: Option<f64>,
    pub disable_span_reporting: Option<bool>,
    pub custom_tags: Option<BTreeMap<String, CustomTag>>,
    pub enable_istio_tags: Option<bool>,
}

/// `Tracing.CustomTag`: exactly one of its three kinds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustomTag {
    pub literal: Option<TagLiteral>,
    pub environment: Option<TagSource>,
    pub header: Option<TagSource>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagLiteral {
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct TagSource {
    pub name: String,
    pub default_value: String,
}

/// The custom tags as the waypoint takes them, or the first problem.
fn custom_tags(tags: &BTreeMap<String, CustomTag>, at: &str) -> Result<Vec<pb::CustomTag>, String> {
    use pb::custom_tag::Value;
    tags.iter()
        .map(|(name, t)| {
            let at = format!("{at}.customTags[{name}]");
            let (value, default_value) = match (&t.literal, &t.environment, &t.header) {
                (Some(l), None, None) => (Value::Literal(l.value.clone()), String::new()),
                (None, Some(e), None) if !e.name.is_empty() => {
                    (Value::Environment(e.name.clone()), e.default_value.clone())
                }
                (None, None, Some(h))
                    if !h.name.is_empty()
                        && h.name.bytes().all(|b| b.is_ascii_graphic() && b != b':') =>
                {
                    (
                        Value::Header(h.name.to_ascii_lowercase()),
                        h.default_value.clone(),
                    )
                }
                _ => {
                    return Err(format!(
                        "{at}: exactly one of literal, environment, header, with a name"
                    ));
                }
            };
            Ok(pb::CustomTag {
                name: name.clone(),
                value: Some(value),
                default_value,
            })
        })
        .collect()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderRef {
    pub name: String,
}

/// The parts of MeshConfig read here; the rest is Istio's and ignored.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct MeshConfig {
    extension_providers: Vec<ExtensionProvider>,
    default_providers: DefaultProviders,
    default_config: ProxyConfig,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct DefaultProviders {
    tracing: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProxyConfig {
    tracing: Option<ProxyTracing>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ProxyTracing {
    sampling: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct ExtensionProvider {
    name: String,
    opentelemetry: Option<OpenTelemetry>,
    /// Any other kind of provider (zipkin, datadog, envoyExtAuthz...).
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct OpenTelemetry {
    service: String,
    port: u32,
    /// OTLP over HTTP (4318): not served; such a provider is refused.
    http: Option<serde_yaml::Value>,
}

impl OpenTelemetry {
    /// Why the waypoint cannot export to it, if it cannot.
    fn problem(&self) -> Option<&'static str> {
        if self.http.is_some() {
            Some("exports OTLP over HTTP; Weft's waypoint exports OTLP over gRPC only")
        } else if self.service.is_empty() || !(1..=65535).contains(&self.port) {
            Some("needs opentelemetry.service and a port from 1 to 65535")
        } else {
            None
        }
    }
}

/// The tracing a waypoint ends with, and what set each part.
#[derive(Clone, Debug, PartialEq)]
struct Effective {
    provider: Option<String>,
    sampling: f64,
    disable_reporting: bool,
    custom_tags: Vec<pb::CustomTag>,
    origin: String,
}

/// Adds each waypoint's Telemetry resource to `l7`, and a status for each
/// Telemetry resource. A mesh config that stops parsing keeps its last good
/// version (from `previous`), and the error is logged.
pub fn translate(
    snap: &Snapshot,
    mesh: &Mesh,
    cfg: &LocalConfig,
    previous: Option<&L7>,
    l7: &mut L7,
) {
    let root = &mesh.root_namespace;
    let mesh_config = match snap
        .config_maps
        .get(&format!("{root}/{MESH_CONFIG_MAP}"))
        .map(|c| read_mesh_config(c))
    {
        None => MeshConfig::default(),
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            let kept = previous.and_then(|p| p.mesh_config.clone());
            tracing::warn!(config_map = %format!("{root}/{MESH_CONFIG_MAP}"), error = %e, kept_last_good = kept.is_some(), "mesh config does not parse");
            kept.unwrap_or_default()
        }
    };
    l7.mesh_config = Some(mesh_config.clone());
    let mut telemetries: Vec<&Telemetry> = snap.telemetries.values().map(|t| &**t).collect();
    telemetries.sort_by_key(|t| order(&t.metadata));
    let mut statuses: BTreeMap<(String, String), Result<Vec<String>, String>> = BTreeMap::new();
    for t in &telemetries {
        let (ns, name) = names(&t.metadata);
        statuses.insert((ns, name), check(t, &mesh_config));
    }
    let (waypoints, _) = crate::waypoints::waypoints(snap);
    let default = Effective {
        provider: mesh_config.default_providers.tracing.first().cloned(),
        sampling: mesh_config
            .default_config
            .tracing
            .as_ref()
            .and_then(|t| t.sampling)
            .unwrap_or(DEFAULT_SAMPLING),
        disable_reporting: false,
        custom_tags: Vec::new(),
        origin: format!("MeshConfig {root}/{MESH_CONFIG_MAP}"),
    };
    for wp in waypoints.values() {
        let ok = |t: &&&Telemetry| {
            let (ns, name) = names(&t.metadata);
            matches!(statuses.get(&(ns, name)), Some(Ok(_)))
        };
        let mesh_wide = telemetries
            .iter()
            .filter(ok)
            .find(|t| t.metadata.namespace.as_deref() == Some(root.as_str()) && unscoped(&t.spec));
        let namespace_wide = telemetries.iter().filter(ok).find(|t| {
            t.metadata.namespace.as_deref() == Some(wp.namespace.as_str())
                && wp.namespace != *root
                && unscoped(&t.spec)
        });
        let targeted = telemetries.iter().filter(ok).find(|t| {
            t.metadata.namespace.as_deref() == Some(wp.namespace.as_str())
                && targets(&t.spec).any(|r| {
                    r.kind == "Gateway"
                        && r.group.as_deref().unwrap_or("gateway.networking.k8s.io")
                            == "gateway.networking.k8s.io"
                        && r.name == wp.name
                })
        });
        let mut eff = default.clone();
        for t in [mesh_wide, namespace_wide, targeted].into_iter().flatten() {
            let (ns, name) = names(&t.metadata);
            if let Some(c) = t.spec.tracing.first() {
                if let Some(p) = c.providers.first() {
                    eff.provider = Some(p.name.clone());
                }
                if let Some(s) = c.random_sampling_percentage {
                    eff.sampling = s;
                }
                if let Some(d) = c.disable_span_reporting {
                    eff.disable_reporting = d;
                }
                if let Some(tags) = &c.custom_tags {
                    // Checked with the resource: a bad one is refused there.
                    eff.custom_tags = custom_tags(tags, "spec.tracing[0]").unwrap_or_default();
                }
                eff.origin = format!("Telemetry {ns}/{name}");
            }
        }
        // A default provider that cannot be served (none is refused on a
        // Telemetry) traces nothing, and says why.
        let tracing = eff.provider.as_ref().and_then(|p| {
            let otel = mesh_config
                .extension_providers
                .iter()
                .find(|e| &e.name == p)
                .and_then(|e| e.opentelemetry.as_ref())
                .filter(|o| o.problem().is_none());
            if otel.is_none() {
                tracing::warn!(waypoint = %wp.key(), provider = %p, origin = %eff.origin, "tracing provider is not an OpenTelemetry (OTLP/gRPC) one in the mesh config; no tracing");
            }
            let otel = otel?;
            let (hostname, namespace) = collector(&otel.service, cfg);
            Some(pb::Tracing {
                provider: p.clone(),
                hostname,
                namespace,
                port: otel.port,
                // MeshConfig's sampling is not checked elsewhere.
                sampling_percent: if eff.sampling.is_finite() {
                    eff.sampling.clamp(0.0, 100.0)
                } else {
                    DEFAULT_SAMPLING
                },
                disable_reporting: eff.disable_reporting,
                custom_tags: eff.custom_tags.clone(),
            })
        });
        let scope: BTreeSet<Identity> = Identity::new(&mesh.trust_domain, &wp.namespace, &wp.name)
            .ok()
            .into_iter()
            .collect();
        l7.resources.push(L7Resource::Telemetry(
            wp.key(),
            pb::Telemetry {
                origin: eff.origin.clone(),
                tracing,
            },
            scope,
        ));
    }
    for ((namespace, name), result) in statuses {
        let (accepted, reason, message) = match result {
            Ok(not_applied) if not_applied.is_empty() => (
                true,
                "Accepted",
                "served to the waypoints it selects".to_string(),
            ),
            Ok(not_applied) => (
                true,
                "Accepted",
                format!(
                    "served to the waypoints it selects; not applied yet: {}",
                    not_applied.join(", ")
                ),
            ),
            Err(e) => (false, "Invalid", e),
        };
        l7.statuses.push(Status {
            kind: "Telemetry",
            namespace,
            name,
            accepted,
            reason,
            message,
            condition: "",
        });
    }
}

fn read_mesh_config(cm: &ConfigMap) -> Result<MeshConfig, String> {
    let Some(text) = cm.data.as_ref().and_then(|d| d.get("mesh")) else {
        return Ok(MeshConfig::default());
    };
    serde_yaml::from_str(text).map_err(|e| format!("data.mesh: {e}"))
}

fn targets(spec: &TelemetrySpec) -> impl Iterator<Item = &TargetRef> {
    spec.target_ref.iter().chain(&spec.target_refs)
}

/// Applies to its whole namespace (no selector, no target).
fn unscoped(spec: &TelemetrySpec) -> bool {
    spec.selector.is_none() && targets(spec).next().is_none()
}

/// Whether a Telemetry can be served, and what of it is not applied yet.
fn check(t: &Telemetry, mesh: &MeshConfig) -> Result<Vec<String>, String> {
    let mut not_applied = Vec::new();
    if t.spec.selector.is_some() {
        not_applied.push("spec.selector (waypoints are selected by targetRefs)".to_string());
    }
    for (field, set) in [
        ("spec.metrics", t.spec.metrics.is_some()),
        ("spec.accessLogging", t.spec.access_logging.is_some()),
    ] {
        if set {
            not_applied.push(field.to_string());
        }
    }
    if t.spec.tracing.len() > 1 {
        return Err("spec.tracing: one entry only, as Istio supports".into());
    }
    let Some(c) = t.spec.tracing.first() else {
        return Ok(not_applied);
    };
    let at = "spec.tracing[0]";
    if c.providers.len() > 1 {
        return Err(format!(
            "{at}.providers: one provider only, as Istio supports"
        ));
    }
    if let Some(p) = c.providers.first() {
        let Some(e) = mesh.extension_providers.iter().find(|e| e.name == p.name) else {
            return Err(format!(
                "{at}.providers[0]: {:?} is not in the mesh config's extensionProviders",
                p.name
            ));
        };
        match &e.opentelemetry {
            Some(o) => {
                if let Some(why) = o.problem() {
                    return Err(format!("{at}.providers[0]: {:?} {why}", p.name));
                }
            }
            None => {
                let kind = e.other.keys().next().map_or("unknown", String::as_str);
                return Err(format!(
                    "{at}.providers[0]: {:?} is a {kind} provider; Weft's waypoint exports OpenTelemetry (OTLP/gRPC) only",
                    p.name
                ));
            }
        }
    }
    if let Some(s) = c.random_sampling_percentage
        && !(0.0..=100.0).contains(&s)
    {
        return Err(format!(
            "{at}.randomSamplingPercentage: {s} is not within 0 to 100"
        ));
    }
    if let Some(tags) = &c.custom_tags {
        custom_tags(tags, at)?;
    }
    for (field, set) in [
        ("match", c.matches.is_some()),
        ("enableIstioTags", c.enable_istio_tags.is_some()),
    ] {
        if set {
            not_applied.push(format!("{at}.{field}"));
        }
    }
    Ok(not_applied)
}

/// The collector's service: `host` or Istio's `namespace/host`, by the
/// hostname the mesh knows, with its namespace.
fn collector(service: &str, cfg: &LocalConfig) -> (String, String) {
    let host = service.split_once('/').map_or(service, |(_, h)| h);
    match cfg.services.iter().find(|s| s.hostname == host) {
        Some(s) => (s.hostname.clone(), s.namespace.clone()),
        None => (
            host.to_string(),
            host.split('.').nth(1).unwrap_or_default().to_string(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;
    use crate::translate::translate as translate_all;

    const MESH_CONFIG: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    defaultConfig: {discoveryAddress: "istiod:15012"}
    extensionProviders:
    - name: otel
      opentelemetry: {service: observability/otel-collector.observability.svc.cluster.local, port: 4317}
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
---
apiVersion: v1
kind: Service
metadata: {name: otel-collector, namespace: observability}
spec: {clusterIP: 10.96.9.9, ports: [{name: grpc-otlp, port: 4317}]}
"#;

    fn run(yaml: &str) -> L7 {
        let mut snap = Snapshot::default();
        let errors = parse(
            &format!(
                "{}---{MESH_CONFIG}---\n{yaml}",
                crate::testdata::shop_with_waypoint!()
            ),
            "test",
            &mut snap,
        );
        assert!(errors.is_empty(), "{errors:?}");
        translate_all(&snap, &Mesh::default(), None).l7
    }

    fn telemetry(l7: &L7) -> pb::Telemetry {
        l7.resources
            .iter()
            .find_map(|r| match r {
                L7Resource::Telemetry(name, t, scope) => {
                    assert_eq!(name, "shop/waypoint");
                    assert_eq!(
                        scope.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        ["spiffe://cluster.local/ns/shop/sa/waypoint"]
                    );
                    Some(t.clone())
                }
                _ => None,
            })
            .expect("one per waypoint")
    }

    fn statuses(l7: &L7) -> Vec<String> {
        l7.statuses
            .iter()
            .filter(|s| s.kind == "Telemetry")
            .map(|s| format!("{}/{}: {} {}", s.namespace, s.name, s.reason, s.message))
            .collect()
    }

    /// No Telemetry and no default provider: no tracing. The mesh-wide one
    /// picks the provider; the namespace's sets the sampling; one that
    /// targets the waypoint's Gateway overrides both.
    #[test]
    fn levels_override_what_they_set() {
        assert_eq!(telemetry(&run("")).tracing, None);
        let mesh_wide = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  tracing: [{providers: [{name: otel}], randomSamplingPercentage: 100}]
"#;
        let t = telemetry(&run(mesh_wide));
        assert_eq!(t.origin, "Telemetry istio-system/mesh-default");
        assert_eq!(
            t.tracing,
            Some(pb::Tracing {
                provider: "otel".into(),
                hostname: "otel-collector.observability.svc.cluster.local".into(),
                namespace: "observability".into(),
                port: 4317,
                sampling_percent: 100.0,
                disable_reporting: false,
                custom_tags: Vec::new(),
            })
        );
        let namespace = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: shop, namespace: shop}
spec:
  tracing: [{randomSamplingPercentage: 10}]
"#;
        let l7 = run(&format!("{mesh_wide}---{namespace}"));
        let t = telemetry(&l7).tracing.unwrap();
        assert_eq!((t.provider.as_str(), t.sampling_percent), ("otel", 10.0));
        let targeted = r#"
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  tracing:
  - randomSamplingPercentage: 50
    disableSpanReporting: true
    customTags:
      team: {literal: {value: shop}}
      user: {header: {name: X-User, defaultValue: anonymous}}
      zone: {environment: {name: ZONE}}
"#;
        let l7 = run(&format!("{mesh_wide}---{namespace}---{targeted}"));
        let t = telemetry(&l7);
        assert_eq!(t.origin, "Telemetry shop/waypoint");
        let t = t.tracing.unwrap();
        assert_eq!(t.sampling_percent, 50.0);
        assert!(t.disable_reporting);
        use pb::custom_tag::Value;
        let tags: Vec<(String, Option<Value>, String)> = t
            .custom_tags
            .into_iter()
            .map(|c| (c.name, c.value, c.default_value))
            .collect();
        assert_eq!(
            tags,
            [
                (
                    "team".into(),
                    Some(Value::Literal("shop".into())),
                    String::new()
                ),
                (
                    "user".into(),
                    Some(Value::Header("x-user".into())),
                    "anonymous".into()
                ),
                (
                    "zone".into(),
                    Some(Value::Environment("ZONE".into())),
                    String::new()
                ),
            ]
        );
        assert!(
            statuses(&l7).iter().all(|s| s.contains("Accepted")),
            "{:?}",
            statuses(&l7)
        );
    }

    /// A mesh config that stops parsing keeps its last good version.
    #[test]
    fn mesh_config_keeps_its_last_good_version() {
        let selecting = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: istio-system}\nspec: {tracing: [{providers: [{name: otel}]}]}\n";
        let load = |mesh_config: &str| {
            let mut snap = Snapshot::default();
            parse(
                &format!(
                    "{}---{mesh_config}---\n{selecting}",
                    crate::testdata::shop_with_waypoint!()
                ),
                "test",
                &mut snap,
            );
            snap
        };
        let good = translate_all(&load(MESH_CONFIG), &Mesh::default(), None);
        assert!(telemetry(&good.l7).tracing.is_some());
        let broken = MESH_CONFIG.replace("    extensionProviders:", "    extensionProviders: {{");
        let next = translate_all(&load(&broken), &Mesh::default(), Some(&good));
        assert_eq!(
            telemetry(&next.l7).tracing,
            telemetry(&good.l7).tracing,
            "the last good mesh config still serves"
        );
    }

    /// MeshConfig's defaultProviders trace with no Telemetry, at the
    /// defaultConfig's sampling (Istio's 1% without one).
    #[test]
    fn default_providers() {
        let yaml = MESH_CONFIG.replace(
            "    defaultConfig: {discoveryAddress: \"istiod:15012\"}",
            "    defaultProviders: {tracing: [otel]}",
        );
        let mut snap = Snapshot::default();
        parse(
            &format!("{}---{yaml}", crate::testdata::shop_with_waypoint!()),
            "test",
            &mut snap,
        );
        let t = telemetry(&translate_all(&snap, &Mesh::default(), None).l7)
            .tracing
            .unwrap();
        assert_eq!((t.provider.as_str(), t.sampling_percent), ("otel", 1.0));
    }

    /// Each refusal names its field, and a refused Telemetry does not apply.
    #[test]
    fn refusals() {
        for (tracing, want) in [
            (
                "[{providers: [{name: jaeger}]}]",
                "spec.tracing[0].providers[0]: \"jaeger\" is not in the mesh config",
            ),
            (
                "[{providers: [{name: zipkin}]}]",
                "\"zipkin\" is a zipkin provider",
            ),
            (
                "[{providers: [{name: otel}], randomSamplingPercentage: 101}]",
                "randomSamplingPercentage: 101",
            ),
            (
                "[{providers: [{name: otel}, {name: zipkin}]}]",
                "spec.tracing[0].providers: one provider only",
            ),
            (
                "[{providers: [{name: otel}], customTags: {a: {literal: {value: b}, header: {name: x}}}}]",
                "spec.tracing[0].customTags[a]: exactly one",
            ),
        ] {
            let yaml = format!(
                "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t, namespace: istio-system}}\nspec: {{tracing: {tracing}}}\n"
            );
            let l7 = run(&yaml);
            let text = statuses(&l7);
            assert!(
                text.iter()
                    .any(|s| s.contains("Invalid") && s.contains(want)),
                "{want}: {text:?}"
            );
            assert_eq!(telemetry(&l7).tracing, None, "{want}");
        }
        let http = MESH_CONFIG.replace("port: 4317}", "port: 4318, http: {path: /v1/traces}}");
        let mut snap = Snapshot::default();
        parse(
            &format!(
                "{}---{http}---\napiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: t, namespace: istio-system}}\nspec: {{tracing: [{{providers: [{{name: otel}}]}}]}}\n",
                crate::testdata::shop_with_waypoint!()
            ),
            "test",
            &mut snap,
        );
        let l7 = translate_all(&snap, &Mesh::default(), None).l7;
        assert!(
            statuses(&l7)
                .iter()
                .any(|s| s.contains("Invalid") && s.contains("OTLP over HTTP")),
            "{:?}",
            statuses(&l7)
        );
        let l7 = run(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: t, namespace: shop}\nspec: {tracing: [{providers: [{name: otel}], match: {mode: SERVER}}]}\n",
        );
        assert!(
            statuses(&l7)
                .iter()
                .any(|s| s.contains("not applied yet: spec.tracing[0].match")),
            "{:?}",
            statuses(&l7)
        );
    }
}
