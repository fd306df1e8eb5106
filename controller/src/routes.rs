//! L7 routing for waypoints: Istio's `VirtualService` and `DestinationRule`
//! (`networking.istio.io` v1, v1beta1, v1alpha3) as users write them, and
//! their translation into `weft.waypoint.v1.Route` and `Destination`
//! resources, one per service, served only to the waypoint that serves it.
//!
//! As in Istio's ambient mode a VirtualService applies to a service through
//! its waypoint (`gateways` empty or `mesh`); hosts and destination hosts are
//! short names in the resource's namespace or full names. Istio leaves two
//! VirtualServices for one host undefined; here the older one (then the
//! lower name) wins and the other is refused, naming it. A resource that
//! stops translating keeps its last accepted version in force.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use weft_api::{Identity, LocalConfig, Service};
use weft_xds::proto::waypoint as pb;

use crate::Snapshot;
use crate::policy::Status;

/// `networking.istio.io` VirtualService.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VirtualService {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: VirtualServiceSpec,
}

/// Unknown fields are refused (a misspelt match would route more than meant).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VirtualServiceSpec {
    pub hosts: Vec<String>,
    pub gateways: Vec<String>,
    pub http: Vec<HttpRoute>,
    /// Not for waypoints yet: refused with a status when set.
    pub tcp: Option<serde_yaml::Value>,
    pub tls: Option<serde_yaml::Value>,
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match")]
    pub matches: Vec<HttpMatch>,
    pub route: Vec<RouteDestination>,
    pub redirect: Option<HttpRedirect>,
    pub direct_response: Option<DirectResponse>,
    pub rewrite: Option<HttpRewrite>,
    pub timeout: Option<String>,
    pub headers: Option<Headers>,
    pub retries: Option<crate::resilience::HttpRetry>,
    pub fault: Option<crate::resilience::HttpFault>,
    pub mirror: Option<Destination>,
    pub mirrors: Vec<HttpMirrorPolicy>,
    pub mirror_percentage: Option<crate::resilience::Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<u32>,
    pub cors_policy: Option<CorsPolicy>,
    pub delegate: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CorsPolicy {
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated: exact origins.
    pub allow_origin: Vec<String>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub max_age: Option<String>,
    pub allow_credentials: Option<bool>,
    pub unmatched_preflights: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpMirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<crate::resilience::Percent>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpMatch {
    pub name: Option<String>,
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: BTreeMap<String, StringMatch>,
    pub without_headers: BTreeMap<String, StringMatch>,
    pub query_params: BTreeMap<String, StringMatch>,
    pub port: Option<u32>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatch>,
    pub source_labels: Option<serde_yaml::Value>,
    pub source_namespace: Option<String>,
    pub gateways: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteDestination {
    pub destination: Destination,
    pub weight: Option<i64>,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortSelector {
    pub number: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderOperations {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRedirect {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u32>,
    pub scheme: Option<String>,
    pub redirect_code: Option<u32>,
    pub derive_port: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectResponse {
    pub status: u32,
    pub body: Option<DirectBody>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRewrite {
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub uri_regex_rewrite: Option<serde_yaml::Value>,
}

/// `networking.istio.io` DestinationRule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: DestinationRuleSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    pub subsets: Vec<Subset>,
    pub export_to: Vec<String>,
    pub workload_selector: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<crate::balance::LoadBalancerSettings>,
    pub connection_pool: Option<crate::resilience::ConnectionPool>,
    pub outlier_detection: Option<crate::resilience::OutlierDetection>,
    /// Not applied yet (TLS, port-level settings): the
    /// policy is accepted, and its status names each of them.
    #[serde(flatten)]
    pub rest: BTreeMap<String, serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicy>,
}

/// One L7 resource to serve: its type, name, message and the waypoint
/// identities that may see it.
#[derive(Clone, Debug, PartialEq)]
pub enum L7Resource {
    Route(String, pb::Route, BTreeSet<Identity>),
    Destination(String, pb::Destination, BTreeSet<Identity>),
    Authorization(String, pb::Authorization, BTreeSet<Identity>),
    Telemetry(String, pb::Telemetry, BTreeSet<Identity>),
}

/// The L7 translation.
#[derive(Clone, Debug, Default)]
pub struct L7 {
    pub resources: Vec<L7Resource>,
    pub statuses: Vec<Status>,
    /// Each VirtualService's last accepted routes, by `namespace/name`.
    accepted: BTreeMap<String, Vec<(String, pb::Route)>>,
    /// Each L7 AuthorizationPolicy's last accepted form, by `namespace/name`.
    pub(crate) accepted_policies: BTreeMap<String, (pb::Authorization, BTreeSet<Identity>)>,
    /// The last mesh config that parsed.
    pub(crate) mesh_config: Option<crate::telemetry::MeshConfig>,
}

/// The full hostname `host` names from namespace `ns`. As in Istio, only a
/// short name (no dot) is taken as a Service of that namespace; any other
/// is literal (`httpbin.org` is a ServiceEntry's host).
fn fqdn(host: &str, ns: &str) -> String {
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{ns}.svc.cluster.local")
    }
}

use crate::translate::names as key;

/// Istio's tie-break: the oldest first, then the name.
pub(crate) fn order(meta: &ObjectMeta) -> (String, String, String) {
    let (ns, name) = key(meta);
    let created = meta
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    (created, ns, name)
}

/// The waypoint identities that serve `svc`: the service accounts of the
/// pods behind the waypoint it is bound to.
pub(crate) fn waypoint_scope(
    svc: &Service,
    cfg: &LocalConfig,
    trust_domain: &str,
) -> Option<BTreeSet<Identity>> {
    let r = svc.waypoint.as_ref()?;
    let wp = cfg
        .services
        .iter()
        .find(|s| s.namespace == r.namespace && s.hostname == r.hostname)?;
    Some(waypoint_identity(wp, trust_domain).into_iter().collect())
}

/// The identity of the waypoint whose Service is `wp`: its Gateway's
/// service account, named after the Gateway as Istio and the controller
/// deploy it. It does not depend on which pods run now, so neither a
/// waypoint scaled to zero nor a pod labelled like one changes it.
pub(crate) fn waypoint_identity(wp: &Service, trust_domain: &str) -> Option<Identity> {
    Identity::new(trust_domain, &wp.namespace, &wp.name).ok()
}

fn string_match(m: &StringMatch, at: &str, ignore_case: bool) -> Result<pb::StringMatch, String> {
    let kind = match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), None, None) => pb::string_match::Kind::Exact(e.clone()),
        (None, Some(p), None) => pb::string_match::Kind::Prefix(p.clone()),
        (None, None, Some(r)) => {
            regex_syntax_check(r).map_err(|e| format!("{at}.regex: {e}"))?;
            pb::string_match::Kind::Regex(r.clone())
        }
        _ => return Err(format!("{at}: exactly one of exact, prefix, regex")),
    };
    Ok(pb::StringMatch {
        kind: Some(kind),
        ignore_case,
    })
}

/// Checks a regex compiles, so a bad one is refused here with its field
/// rather than NACKed by the waypoint.
fn regex_syntax_check(r: &str) -> Result<(), String> {
    regex::Regex::new(r).map(|_| ()).map_err(|e| e.to_string())
}

fn header_ops(h: Option<&HeaderOperations>) -> Option<pb::HeaderOps> {
    let h = h?;
    let pairs = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| pb::Header {
                name: k.to_ascii_lowercase(),
                value: v.clone(),
            })
            .collect()
    };
    Some(pb::HeaderOps {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.iter().map(|s| s.to_ascii_lowercase()).collect(),
    })
}

/// `5s`, `0.5s`, `100ms`, `1m`: Istio writes durations as protobuf JSON (seconds).
pub fn duration_ms(text: &str) -> Option<u64> {
    let (num, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = text.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        return None;
    };
    let v: f64 = num.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * scale).round() as u64)
}

/// A destination host as a full hostname and the namespace of its service.
fn service_ref(host: &str, ns: &str, by_host: &BTreeMap<&str, &Service>) -> (String, String) {
    let host = fqdn(host, ns);
    let namespace = match by_host.get(host.as_str()) {
        Some(s) => s.namespace.clone(),
        None => host.split('.').nth(1).unwrap_or(ns).to_string(),
    };
    (host, namespace)
}

/// A rule's `corsPolicy`, as Istio hands it to Envoy's CORS filter: lists
/// joined with commas, `maxAge` in seconds, `unmatchedPreflights` FORWARD
/// (the default) or IGNORE.
fn cors(c: &CorsPolicy, at: &str) -> Result<pb::Cors, String> {
    let mut allow_origins = c
        .allow_origins
        .iter()
        .enumerate()
        .map(|(i, m)| string_match(m, &format!("{at}.allowOrigins[{i}]"), false))
        .collect::<Result<Vec<_>, String>>()?;
    allow_origins.extend(c.allow_origin.iter().map(|o| pb::StringMatch {
        kind: Some(pb::string_match::Kind::Exact(o.clone())),
        ignore_case: false,
    }));
    for (field, list) in [
        ("allowMethods", &c.allow_methods),
        ("allowHeaders", &c.allow_headers),
        ("exposeHeaders", &c.expose_headers),
    ] {
        if let Some(bad) = list
            .iter()
            .find(|v| v.is_empty() || !v.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err(format!("{at}.{field}: {bad:?} is not a token"));
        }
    }
    let max_age_seconds = match &c.max_age {
        None => 0,
        Some(t) => {
            duration_ms(t)
                .ok_or_else(|| format!("{at}.maxAge: {t:?} is not a duration like 24h"))?
                / 1000
        }
    };
    let ignore_unmatched_preflights = match c.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED") | Some("FORWARD") => false,
        Some("IGNORE") => true,
        Some(other) => {
            return Err(format!(
                "{at}.unmatchedPreflights: {other:?} is not one of FORWARD, IGNORE"
            ));
        }
    };
    Ok(pb::Cors {
        allow_origins,
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        max_age_seconds,
        allow_credentials: c.allow_credentials == Some(true),
        ignore_unmatched_preflights,
    })
}

/// A rule's `mirror` (with `mirrorPercentage`, default 100%) or `mirrors`
/// (each with its `percentage`, default 100%).
fn mirrors(
    r: &HttpRoute,
    at: &str,
    ns: &str,
    by_host: &BTreeMap<&str, &Service>,
) -> Result<Vec<pb::Mirror>, String> {
    let mut list: Vec<(String, &Destination, f64)> = Vec::new();
    if let Some(d) = &r.mirror {
        if !r.mirrors.is_empty() {
            return Err(format!("{at}: mirror and mirrors are exclusive; set one"));
        }
        let percent = match (&r.mirror_percentage, r.mirror_percent) {
            (Some(p), _) => p.value,
            (None, Some(p)) => f64::from(p),
            (None, None) => 100.0,
        };
        list.push((format!("{at}.mirror"), d, percent));
    } else if r.mirror_percentage.is_some() || r.mirror_percent.is_some() {
        return Err(format!(
            "{at}.mirrorPercentage: only with mirror; each of mirrors has its own percentage"
        ));
    }
    for (i, m) in r.mirrors.iter().enumerate() {
        let percent = m.percentage.as_ref().map_or(100.0, |p| p.value);
        list.push((
            format!("{at}.mirrors[{i}].destination"),
            &m.destination,
            percent,
        ));
    }
    if !list.is_empty() && r.route.is_empty() {
        return Err(format!(
            "{at}.mirror: only a rule with a route mirrors its requests"
        ));
    }
    list.into_iter()
        .map(|(at, d, percent)| {
            if d.host.is_empty() {
                return Err(format!("{at}.host: required"));
            }
            if !(0.0..=100.0).contains(&percent) {
                return Err(format!("{at}: percentage {percent} is not within 0 to 100"));
            }
            let (hostname, namespace) = service_ref(&d.host, ns, by_host);
            Ok(pb::Mirror {
                hostname,
                namespace,
                subset: d.subset.clone().unwrap_or_default(),
                port: d.port.as_ref().map_or(0, |p| p.number),
                percent,
            })
        })
        .collect()
}

/// One VirtualService's HTTP routes as a rule list, or the first problem.
/// `by_host` gives each known hostname's service: a ServiceEntry's host
/// does not name its namespace.
fn vs_rules(
    vs: &VirtualService,
    ns: &str,
    by_host: &BTreeMap<&str, &Service>,
) -> Result<Vec<pb::Rule>, String> {
    let spec = &vs.spec;
    if spec.tcp.is_some() || spec.tls.is_some() {
        return Err(
            "spec.tcp / spec.tls: not supported by Weft's waypoint yet; use http routes".into(),
        );
    }
    if spec.gateways.iter().any(|g| g != "mesh") {
        return Err("spec.gateways: only `mesh` (or none) applies to waypoints".into());
    }
    let mut rules = Vec::new();
    for (i, r) in spec.http.iter().enumerate() {
        let at = format!("spec.http[{i}]");
        if r.delegate.is_some() {
            return Err(format!(
                "{at}.delegate: not supported by Weft's waypoint yet"
            ));
        }
        let mut matches = Vec::new();
        for (j, m) in r.matches.iter().enumerate() {
            let at = format!("{at}.match[{j}]");
            if m.source_labels.is_some()
                || m.source_namespace.is_some()
                || !m.gateways.is_empty()
                || m.scheme.is_some()
            {
                return Err(format!(
                    "{at}: sourceLabels, sourceNamespace, gateways and scheme are not supported yet"
                ));
            }
            let opt = |s: &Option<StringMatch>, f: &str, ic: bool| {
                s.as_ref()
                    .map(|s| string_match(s, &format!("{at}.{f}"), ic))
                    .transpose()
            };
            let headers = |h: &BTreeMap<String, StringMatch>, f: &str| {
                h.iter()
                    .map(|(k, v)| {
                        // An empty StringMatch ({}) means "present" in Istio.
                        let value = if *v == StringMatch::default() {
                            None
                        } else {
                            Some(string_match(v, &format!("{at}.{f}[{k}]"), false)?)
                        };
                        Ok(pb::HeaderMatch {
                            name: k.to_ascii_lowercase(),
                            value,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()
            };
            let query_params = m
                .query_params
                .iter()
                .map(|(k, v)| {
                    let value = if *v == StringMatch::default() {
                        None
                    } else {
                        Some(string_match(v, &format!("{at}.queryParams[{k}]"), false)?)
                    };
                    Ok(pb::QueryMatch {
                        name: k.clone(),
                        value,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            matches.push(pb::RequestMatch {
                path: opt(&m.uri, "uri", m.ignore_uri_case)?,
                method: opt(&m.method, "method", false)?,
                authority: opt(&m.authority, "authority", false)?,
                headers: headers(&m.headers, "headers")?,
                without_headers: headers(&m.without_headers, "withoutHeaders")?,
                query_params,
                port: m.port.unwrap_or(0),
            });
        }
        let kinds = [
            !r.route.is_empty(),
            r.redirect.is_some(),
            r.direct_response.is_some(),
        ];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(format!(
                "{at}: exactly one of route, redirect, directResponse"
            ));
        }
        let action = if let Some(rd) = &r.redirect {
            if rd.derive_port.is_some() {
                return Err(format!("{at}.redirect.derivePort: not supported yet"));
            }
            pb::rule::Action::Redirect(pb::Redirect {
                scheme: rd.scheme.clone().unwrap_or_default(),
                authority: rd.authority.clone().unwrap_or_default(),
                port: rd.port.unwrap_or(0),
                path: rd.uri.clone().map(pb::redirect::Path::FullPath),
                status: rd.redirect_code.unwrap_or(301),
            })
        } else if let Some(d) = &r.direct_response {
            if !(200..600).contains(&d.status) {
                return Err(format!(
                    "{at}.directResponse.status: {} is not an HTTP status",
                    d.status
                ));
            }
            let body = match d.body.as_ref() {
                None => Vec::new(),
                Some(DirectBody {
                    string: Some(s),
                    bytes: None,
                }) => s.clone().into_bytes(),
                Some(_) => {
                    return Err(format!(
                        "{at}.directResponse.body: only `string` is supported"
                    ));
                }
            };
            pb::rule::Action::DirectResponse(pb::DirectResponse {
                status: d.status,
                body,
            })
        } else {
            let weights: Vec<i64> = r.route.iter().map(|d| d.weight.unwrap_or(0)).collect();
            let explicit = weights.iter().any(|w| *w != 0);
            if weights.iter().any(|w| *w < 0) {
                return Err(format!("{at}.route: weights must not be negative"));
            }
            if r.route.len() > 1 && !explicit {
                return Err(format!("{at}.route: several destinations need weights"));
            }
            let mut backends = Vec::new();
            for (k, d) in r.route.iter().enumerate() {
                if d.destination.host.is_empty() {
                    return Err(format!("{at}.route[{k}].destination.host: required"));
                }
                let (host, namespace) = service_ref(&d.destination.host, ns, by_host);
                let weight = if r.route.len() == 1 && !explicit {
                    100
                } else {
                    d.weight.unwrap_or(0)
                };
                backends.push(pb::Backend {
                    hostname: host,
                    namespace,
                    subset: d.destination.subset.clone().unwrap_or_default(),
                    port: d.destination.port.as_ref().map_or(0, |p| p.number),
                    weight: u32::try_from(weight)
                        .map_err(|_| format!("{at}.route[{k}].weight: out of range"))?,
                    request_headers: header_ops(
                        d.headers.as_ref().and_then(|h| h.request.as_ref()),
                    ),
                    response_headers: header_ops(
                        d.headers.as_ref().and_then(|h| h.response.as_ref()),
                    ),
                });
            }
            pb::rule::Action::Forward(pb::Forward { backends })
        };
        let rewrite = match &r.rewrite {
            None => None,
            Some(rw) if rw.uri_regex_rewrite.is_some() => {
                return Err(format!("{at}.rewrite.uriRegexRewrite: not supported yet"));
            }
            Some(rw) => {
                // Istio: after a prefix match, `uri` replaces the matched prefix.
                let prefix_matched = r
                    .matches
                    .iter()
                    .any(|m| m.uri.as_ref().is_some_and(|u| u.prefix.is_some()));
                Some(pb::Rewrite {
                    path: rw.uri.clone().map(|u| {
                        if prefix_matched {
                            pb::rewrite::Path::Prefix(u)
                        } else {
                            pb::rewrite::Path::FullPath(u)
                        }
                    }),
                    authority: rw.authority.clone().unwrap_or_default(),
                })
            }
        };
        let mut timeout_ms = match &r.timeout {
            None => 0,
            Some(t) => duration_ms(t)
                .ok_or_else(|| format!("{at}.timeout: {t:?} is not a duration like 5s"))?,
        };
        let mut retries = r
            .retries
            .as_ref()
            .map(|rt| crate::resilience::retries(rt, &format!("{at}.retries")))
            .transpose()?;
        let fault = r
            .fault
            .as_ref()
            .map(|f| crate::resilience::fault(f, &format!("{at}.fault")))
            .transpose()?;
        if fault.is_some() {
            // As Istio: a route that injects faults has no retries and no
            // timeout, so an injected abort is never retried.
            timeout_ms = 0;
            retries = Some(pb::RetryPolicy::default());
        }
        rules.push(pb::Rule {
            name: r.name.clone().unwrap_or_else(|| {
                format!(
                    "{ns}/{}.{i}",
                    vs.metadata.name.as_deref().unwrap_or_default()
                )
            }),
            matches,
            action: Some(action),
            request_headers: header_ops(r.headers.as_ref().and_then(|h| h.request.as_ref())),
            response_headers: header_ops(r.headers.as_ref().and_then(|h| h.response.as_ref())),
            rewrite,
            timeout_ms,
            retries,
            fault,
            mirrors: mirrors(r, &at, ns, by_host)?,
            cors: r
                .cors_policy
                .as_ref()
                .map(|c| cors(c, &format!("{at}.corsPolicy")))
                .transpose()?,
        });
    }
    Ok(rules)
}

/// The connection pool of a traffic policy at `at`; what it (or the policy)
/// sets that is not applied yet goes to `not_applied`.
fn pool(
    tp: Option<&TrafficPolicy>,
    at: &str,
    not_applied: &mut Vec<String>,
) -> Result<Option<pb::ConnectionPool>, String> {
    let Some(tp) = tp else {
        return Ok(None);
    };
    not_applied.extend(tp.rest.keys().map(|k| format!("{at}.{k}")));
    let Some(cp) = &tp.connection_pool else {
        return Ok(None);
    };
    let (pool, rest) = crate::resilience::connection_pool(cp, &format!("{at}.connectionPool"))?;
    not_applied.extend(rest);
    Ok(Some(pool))
}

/// The outlier detection of a traffic policy at `at`.
fn outliers(
    tp: Option<&TrafficPolicy>,
    at: &str,
    not_applied: &mut Vec<String>,
) -> Result<Option<pb::OutlierDetection>, String> {
    let Some(od) = tp.and_then(|t| t.outlier_detection.as_ref()) else {
        return Ok(None);
    };
    let (od, rest) = crate::resilience::outlier_detection(od, &format!("{at}.outlierDetection"))?;
    not_applied.extend(rest);
    Ok(Some(od))
}

/// The load balancer of a traffic policy at `at`.
fn balance(
    tp: Option<&TrafficPolicy>,
    at: &str,
    not_applied: &mut Vec<String>,
) -> Result<(i32, Option<pb::ConsistentHash>), String> {
    crate::balance::load_balancer(tp.and_then(|t| t.load_balancer.as_ref()), at, not_applied)
}

/// Translates every VirtualService and DestinationRule in `snap` for the
/// services of `cfg` that have a waypoint. `previous` supplies the last
/// accepted routes of resources that stop translating.
pub fn translate(
    snap: &Snapshot,
    cfg: &LocalConfig,
    trust_domain: &str,
    previous: Option<&L7>,
) -> L7 {
    let mut out = L7::default();
    let by_host: BTreeMap<&str, &Service> = cfg
        .services
        .iter()
        .map(|s| (s.hostname.as_str(), &**s))
        .collect();
    let status = |kind, meta: &ObjectMeta, accepted, reason, message: String| {
        let (namespace, name) = key(meta);
        Status {
            kind,
            namespace,
            name,
            accepted,
            reason,
            message,
            condition: "",
        }
    };

    // VirtualServices and HTTPRoutes, oldest first: a host already claimed
    // refuses the later one, naming the first.
    struct Source<'a> {
        kind: &'static str,
        meta: &'a ObjectMeta,
        hosts: Vec<String>,
        /// Host → its rules.
        rules: Result<Vec<(String, Vec<pb::Rule>)>, String>,
    }
    let mut sources: Vec<Source<'_>> = Vec::new();
    for vs in snap.virtual_services.values() {
        let (ns, _) = key(&vs.metadata);
        let hosts: Vec<String> = vs.spec.hosts.iter().map(|h| fqdn(h, &ns)).collect();
        let rules = if hosts.is_empty() {
            Err("spec.hosts: at least one host is required".to_string())
        } else {
            vs_rules(vs, &ns, &by_host)
                .map(|r| hosts.iter().map(|h| (h.clone(), r.clone())).collect())
        };
        sources.push(Source {
            kind: "VirtualService",
            meta: &vs.metadata,
            hosts,
            rules,
        });
    }
    for hr in snap.http_routes.values() {
        let (ns, _) = key(&hr.metadata);
        let parents = crate::httproute::parents(hr, &ns);
        let hosts = parents
            .as_ref()
            .map(|p| p.iter().map(|(h, _)| h.clone()).collect())
            .unwrap_or_default();
        let rules = parents.and_then(|ps| {
            let mut by_host: BTreeMap<String, Vec<pb::Rule>> = BTreeMap::new();
            for (h, port) in ps {
                by_host
                    .entry(h)
                    .or_default()
                    .extend(crate::httproute::rules(hr, &ns, port)?);
            }
            Ok(by_host.into_iter().collect())
        });
        sources.push(Source {
            kind: "HTTPRoute",
            meta: &hr.metadata,
            hosts,
            rules,
        });
    }
    sources.sort_by_key(|s| order(s.meta));
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    let mut routes: BTreeMap<String, (pb::Route, BTreeSet<Identity>)> = BTreeMap::new();
    for src in sources {
        let (ns, name) = key(src.meta);
        let src_key = format!("{} {ns}/{name}", src.kind);
        let taken = src
            .hosts
            .iter()
            .find_map(|h| claimed.get(h).map(|o| (h.clone(), o.clone())));
        let result = match (taken, src.rules) {
            (Some((h, other)), _) => Err(format!(
                "{h} is already routed by {other} (the older one wins): one route resource per service"
            )),
            (None, r) => r,
        };
        let translated: Vec<(String, pb::Route)> = match result {
            Ok(per_host) => {
                let served: Vec<(String, pb::Route)> = per_host
                    .into_iter()
                    .filter_map(|(h, rules)| by_host.get(h.as_str()).map(|svc| (svc, rules)))
                    .map(|(svc, rules)| {
                        let key = format!("{}/{}", svc.namespace, svc.hostname);
                        let route = pb::Route {
                            hostname: svc.hostname.clone(),
                            namespace: svc.namespace.clone(),
                            origin: src_key.clone(),
                            rules,
                        };
                        (key, route)
                    })
                    .collect();
                let unbound: Vec<&str> = src
                    .hosts
                    .iter()
                    .filter(|h| by_host.get(h.as_str()).is_none_or(|s| s.waypoint.is_none()))
                    .map(String::as_str)
                    .collect();
                let message = if unbound.is_empty() {
                    "routes served to the waypoint".to_string()
                } else {
                    format!(
                        "no waypoint serves {}: routes apply only through a waypoint",
                        unbound.join(", ")
                    )
                };
                out.statuses
                    .push(status(src.kind, src.meta, true, "Accepted", message));
                served
            }
            Err(message) => {
                let kept = previous.and_then(|p| p.accepted.get(&src_key)).cloned();
                let message = if kept.is_some() {
                    format!("{message}; the last accepted version stays in force")
                } else {
                    message
                };
                out.statuses
                    .push(status(src.kind, src.meta, false, "Invalid", message));
                kept.unwrap_or_default()
            }
        };
        if !translated.is_empty() {
            out.accepted.insert(src_key.clone(), translated.clone());
        }
        for h in src.hosts {
            claimed.entry(h).or_insert_with(|| src_key.clone());
        }
        for (key, route) in translated {
            let Some(scope) = by_host
                .get(route.hostname.as_str())
                .and_then(|s| waypoint_scope(s, cfg, trust_domain))
            else {
                continue;
            };
            routes.entry(key).or_insert((route, scope));
        }
    }
    for (key, (route, scope)) in routes {
        out.resources.push(L7Resource::Route(key, route, scope));
    }

    // DestinationRules: subsets resolved to the workloads they select.
    let mut drs: Vec<&DestinationRule> = snap.destination_rules.values().map(|d| &**d).collect();
    drs.sort_by_key(|d| order(&d.metadata));
    let mut done: BTreeSet<String> = BTreeSet::new();
    for dr in drs {
        let (ns, _) = key(&dr.metadata);
        let host = fqdn(&dr.spec.host, &ns);
        let svc = by_host.get(host.as_str());
        let result = (|| {
            if dr.spec.host.is_empty() {
                return Err("spec.host: required".to_string());
            }
            if dr.spec.workload_selector.is_some() {
                return Err("spec.workloadSelector: not supported for waypoints".to_string());
            }
            let mut not_applied = Vec::new();
            let (lb, consistent_hash) = balance(
                dr.spec.traffic_policy.as_ref(),
                "spec.trafficPolicy",
                &mut not_applied,
            )?;
            let connection_pool = pool(
                dr.spec.traffic_policy.as_ref(),
                "spec.trafficPolicy",
                &mut not_applied,
            )?;
            let outlier_detection = outliers(
                dr.spec.traffic_policy.as_ref(),
                "spec.trafficPolicy",
                &mut not_applied,
            )?;
            let mut subsets = Vec::new();
            let mut names = BTreeSet::new();
            for (i, s) in dr.spec.subsets.iter().enumerate() {
                if s.name.is_empty() || !names.insert(s.name.clone()) {
                    return Err(format!("spec.subsets[{i}].name: empty or repeated"));
                }
                let workloads = svc
                    .map(|svc| {
                        svc.endpoints
                            .iter()
                            .filter(|ep| {
                                let labels =
                                    crate::service_entry::labels_of(snap, &ep.workload_uid);
                                s.labels
                                    .iter()
                                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                            })
                            .map(|ep| ep.workload_uid.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                let (load_balancer, consistent_hash) = balance(
                    s.traffic_policy.as_ref(),
                    &format!("spec.subsets[{i}].trafficPolicy"),
                    &mut not_applied,
                )?;
                subsets.push(pb::Subset {
                    name: s.name.clone(),
                    labels: s.labels.clone(),
                    load_balancer,
                    consistent_hash,
                    workloads,
                    connection_pool: pool(
                        s.traffic_policy.as_ref(),
                        &format!("spec.subsets[{i}].trafficPolicy"),
                        &mut not_applied,
                    )?,
                    outlier_detection: outliers(
                        s.traffic_policy.as_ref(),
                        &format!("spec.subsets[{i}].trafficPolicy"),
                        &mut not_applied,
                    )?,
                });
            }
            Ok((
                pb::Destination {
                    hostname: host.clone(),
                    namespace: svc.map(|s| s.namespace.clone()).unwrap_or_default(),
                    origin: format!(
                        "DestinationRule {ns}/{}",
                        dr.metadata.name.as_deref().unwrap_or_default()
                    ),
                    load_balancer: lb,
                    subsets,
                    connection_pool,
                    outlier_detection,
                    consistent_hash,
                },
                not_applied,
            ))
        })();
        match result {
            Ok((d, not_applied)) => {
                let scope = svc.and_then(|s| waypoint_scope(s, cfg, trust_domain));
                if done.contains(&host) {
                    out.statuses.push(status(
                        "DestinationRule",
                        &dr.metadata,
                        false,
                        "Invalid",
                        format!(
                            "spec.host: {host} already has an older DestinationRule; merge them"
                        ),
                    ));
                    continue;
                }
                done.insert(host.clone());
                let mut message = if scope.is_some() {
                    "served to the waypoint".to_string()
                } else {
                    format!("no waypoint serves {host}: subsets apply only through a waypoint")
                };
                if !not_applied.is_empty() {
                    message.push_str(&format!("; not applied yet: {}", not_applied.join(", ")));
                }
                out.statuses.push(status(
                    "DestinationRule",
                    &dr.metadata,
                    true,
                    "Accepted",
                    message,
                ));
                if let (Some(scope), Some(svc)) = (scope, svc) {
                    let key = format!("{}/{}", svc.namespace, svc.hostname);
                    out.resources.push(L7Resource::Destination(key, d, scope));
                }
            }
            Err(message) => out.statuses.push(status(
                "DestinationRule",
                &dr.metadata,
                false,
                "Invalid",
                message,
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;
    use crate::translate::{Mesh, translate as translate_all};

    const MESH: &str = concat!(
        crate::testdata::shop_with_waypoint!(),
        r#"---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: shop, labels: {app: reviews, version: v1}}
spec: {nodeName: n2, containers: [{name: app}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2, namespace: shop, labels: {app: reviews, version: v2}}
spec: {nodeName: n2, containers: [{name: app}]}
status: {podIP: 10.244.2.11}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{port: 9080}]}
"#
    );

    const VS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
"#;

    /// `mirror` with its percentage (100% when unset, the deprecated
    /// integer form read too) and `mirrors`, each with its own.
    #[test]
    fn mirrors_translate() {
        let rule = |edit: &str| {
            let l7 = run(
                &format!("{MESH}---{}", VS.replace("timeout: 5s", edit)),
                None,
            );
            l7.resources
                .iter()
                .find_map(|r| match r {
                    L7Resource::Route(_, route, _) => Some(route.rules[1].mirrors.clone()),
                    _ => None,
                })
                .expect("served")
        };
        let m = rule("mirror: {host: reviews, subset: v2, port: {number: 9080}}");
        assert_eq!(
            m,
            [pb::Mirror {
                hostname: "reviews.shop.svc.cluster.local".into(),
                namespace: "shop".into(),
                subset: "v2".into(),
                port: 9080,
                percent: 100.0,
            }]
        );
        let m = rule("mirror: {host: reviews}\n    mirrorPercentage: {value: 12.5}");
        assert_eq!(m[0].percent, 12.5);
        let m = rule("mirror: {host: reviews}\n    mirrorPercent: 7");
        assert_eq!(m[0].percent, 7.0);
        let m = rule(
            "mirrors:\n    - {destination: {host: reviews}, percentage: {value: 30}}\n    - destination: {host: ratings.other.svc.cluster.local}",
        );
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].percent, m[1].percent), (30.0, 100.0));
        assert_eq!(m[1].namespace, "other");
    }

    /// corsPolicy: origins from both fields, lists as written, maxAge in
    /// seconds, IGNORE read; a bad value is refused naming its field.
    #[test]
    fn cors_translates() {
        let vs = VS.replace(
            "timeout: 5s",
            "corsPolicy:\n      allowOrigins: [{exact: 'https://a.example'}, {prefix: 'https://b.'}]\n      allowOrigin: ['https://c.example']\n      allowMethods: [GET, POST]\n      allowHeaders: [x-user]\n      exposeHeaders: [x-trace]\n      maxAge: 24h\n      allowCredentials: true\n      unmatchedPreflights: IGNORE",
        );
        let l7 = run(&format!("{MESH}---{vs}"), None);
        let cors = l7
            .resources
            .iter()
            .find_map(|r| match r {
                L7Resource::Route(_, route, _) => route.rules[1].cors.clone(),
                _ => None,
            })
            .expect("served");
        assert_eq!(cors.allow_origins.len(), 3);
        assert_eq!(
            cors.allow_origins[2].kind,
            Some(pb::string_match::Kind::Exact("https://c.example".into()))
        );
        assert_eq!(cors.allow_methods, ["GET", "POST"]);
        assert_eq!(cors.max_age_seconds, 86400);
        assert!(cors.allow_credentials && cors.ignore_unmatched_preflights);
        for (edit, want) in [
            (
                "corsPolicy: {maxAge: forever}",
                "spec.http[1].corsPolicy.maxAge",
            ),
            (
                "corsPolicy: {unmatchedPreflights: DROP}",
                "spec.http[1].corsPolicy.unmatchedPreflights",
            ),
            (
                "corsPolicy: {allowHeaders: ['x user']}",
                "spec.http[1].corsPolicy.allowHeaders",
            ),
        ] {
            let l7 = run(
                &format!("{MESH}---{}", VS.replace("timeout: 5s", edit)),
                None,
            );
            let text = statuses(&l7);
            assert!(text.iter().any(|s| s.contains(want)), "{want}: {text:?}");
        }
    }

    fn run(yaml: &str, previous: Option<&L7>) -> L7 {
        let mut snap = Snapshot::default();
        let errors = parse(yaml, "test", &mut snap);
        assert!(errors.is_empty(), "{errors:?}");
        let t = translate_all(&snap, &Mesh::default(), None);
        translate(&snap, &t.config, "cluster.local", previous)
    }

    fn statuses(l7: &L7) -> Vec<String> {
        l7.statuses
            .iter()
            .map(|s| format!("{} {}: {} {}", s.kind, s.name, s.reason, s.message))
            .collect()
    }

    #[test]
    fn istios_reviews_example() {
        let l7 = run(&format!("{MESH}---{VS}"), None);
        assert!(
            l7.statuses.iter().all(|s| s.accepted),
            "{:?}",
            statuses(&l7)
        );
        let waypoint: Identity = "spiffe://cluster.local/ns/shop/sa/waypoint"
            .parse()
            .unwrap();
        let route = l7
            .resources
            .iter()
            .find_map(|r| match r {
                L7Resource::Route(k, r, scope) => Some((k, r, scope)),
                _ => None,
            })
            .unwrap();
        assert_eq!(route.0, "shop/reviews.shop.svc.cluster.local");
        assert_eq!(
            route.2,
            &BTreeSet::from([waypoint.clone()]),
            "only the waypoint sees it"
        );
        assert_eq!(route.1.rules.len(), 2);
        assert_eq!(route.1.rules[1].timeout_ms, 5000);
        let Some(pb::rule::Action::Forward(f)) = &route.1.rules[1].action else {
            panic!()
        };
        assert_eq!(
            f.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        let Some(pb::rule::Action::Forward(f)) = &route.1.rules[0].action else {
            panic!()
        };
        assert_eq!(
            f.backends[0].weight, 100,
            "a single destination takes everything"
        );
        let dest = l7
            .resources
            .iter()
            .find_map(|r| match r {
                L7Resource::Destination(_, d, _) => Some(d),
                _ => None,
            })
            .unwrap();
        assert_eq!(dest.load_balancer, pb::LoadBalancer::RoundRobin as i32);
        assert_eq!(
            dest.subsets[0].workloads,
            ["Kubernetes//Pod/shop/reviews-v1"]
        );
        assert_eq!(
            dest.subsets[1].workloads,
            ["Kubernetes//Pod/shop/reviews-v2"]
        );
        assert_eq!(
            dest.subsets[1].load_balancer,
            pb::LoadBalancer::Random as i32
        );
    }

    /// Retries and faults reach the rule; a rule that injects faults loses
    /// its retries and its timeout, as in Istio.
    #[test]
    fn retries_and_faults() {
        let vs = VS.replace(
            "    timeout: 5s",
            "    timeout: 5s\n    retries: {attempts: 3, perTryTimeout: 1s, retryOn: 5xx}",
        );
        let vs = vs.replace(
            "  - match: [{headers: {end-user: {exact: jason}}}]",
            "  - match: [{headers: {end-user: {exact: jason}}}]\n    timeout: 2s\n    retries: {attempts: 4}\n    fault: {delay: {fixedDelay: 7s, percentage: {value: 100}}}",
        );
        let l7 = run(&format!("{MESH}---{vs}"), None);
        let Some(L7Resource::Route(_, route, _)) = l7
            .resources
            .iter()
            .find(|r| matches!(r, L7Resource::Route(..)))
        else {
            panic!("{:?}", statuses(&l7))
        };
        let (faulty, plain) = (&route.rules[0], &route.rules[1]);
        assert_eq!(faulty.fault.as_ref().map(|f| f.delay_ms), Some(7000));
        assert_eq!(faulty.timeout_ms, 0);
        assert_eq!(faulty.retries.as_ref().map(|r| r.attempts), Some(0));
        let r = plain.retries.as_ref().unwrap();
        assert_eq!(
            (r.attempts, r.per_try_timeout_ms, plain.timeout_ms),
            (3, 1000, 5000)
        );
        assert_eq!(r.retry_on, ["5xx"]);
    }

    /// Istio's circuit-breaking example: the pool reaches the waypoint, at
    /// the top and per subset; what is not applied yet is named in the
    /// status, never dropped silently.
    #[test]
    fn connection_pools() {
        let dr = VS.replace(
            "  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}",
            "  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    connectionPool:\n      tcp: {maxConnections: 1, connectTimeout: 2s}\n      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1, h2UpgradePolicy: UPGRADE}\n    outlierDetection: {consecutive5xxErrors: 1}",
        );
        let dr = dr.replace(
            "  - {name: v1, labels: {version: v1}}",
            "  - {name: v1, labels: {version: v1}, trafficPolicy: {connectionPool: {http: {http2MaxRequests: 7}}}}",
        );
        let l7 = run(&format!("{MESH}---{dr}"), None);
        let Some(L7Resource::Destination(_, d, _)) = l7
            .resources
            .iter()
            .find(|r| matches!(r, L7Resource::Destination(..)))
        else {
            panic!("{:?}", statuses(&l7))
        };
        let od = d.outlier_detection.as_ref().unwrap();
        assert_eq!(
            (
                od.consecutive_5xx_errors,
                od.base_ejection_time_ms,
                od.max_ejection_percent
            ),
            (1, 30_000, 10),
            "Istio's defaults where unset"
        );
        let cp = d.connection_pool.as_ref().unwrap();
        assert_eq!(
            (
                cp.max_connections,
                cp.connect_timeout_ms,
                cp.http1_max_pending_requests,
                cp.max_requests_per_connection
            ),
            (1, 2000, 1, 1)
        );
        assert_eq!(
            d.subsets[0]
                .connection_pool
                .as_ref()
                .map(|p| p.http2_max_requests),
            Some(7)
        );
        let st = statuses(&l7);
        assert!(
            st.iter().any(|s| s.contains(
                "not applied yet: spec.trafficPolicy.connectionPool.http.h2UpgradePolicy"
            )),
            "{st:?}"
        );
        let bad = dr.replace("maxConnections: 1", "maxConnections: 0");
        let st = statuses(&run(&format!("{MESH}---{bad}"), None));
        assert!(
            st.iter().any(|s| s.contains(
                "spec.trafficPolicy.connectionPool.tcp.maxConnections: 0 must be 1 or more"
            )),
            "{st:?}"
        );
    }

    #[test]
    fn refusals_name_the_field_and_keep_the_last_good() {
        let good = run(&format!("{MESH}---{VS}"), None);
        let bad_regex = VS.replace("{exact: jason}", "{regex: \"(jason\"}");
        let l7 = run(&format!("{MESH}---{bad_regex}"), Some(&good));
        let text = statuses(&l7);
        assert!(
            text.iter().any(|s| s.starts_with(
                "VirtualService reviews: Invalid spec.http[0].match[0].headers[end-user].regex:"
            ) && s.ends_with("the last accepted version stays in force")),
            "{text:?}"
        );
        assert!(
            l7.resources
                .iter()
                .any(|r| matches!(r, L7Resource::Route(..))),
            "the last good route keeps serving"
        );

        for (edit, want) in [
            (
                VS.replace("weight: 90", "weight: -1"),
                "weights must not be negative",
            ),
            (
                VS.replace("timeout: 5s", "timeout: soon"),
                "spec.http[1].timeout",
            ),
            (
                VS.replace("timeout: 5s", "fault: {abort: {httpStatus: 700}}"),
                "spec.http[1].fault.abort.httpStatus: 700",
            ),
            (
                VS.replace(
                    "timeout: 5s",
                    "retries: {attempts: 2, retryOn: 'sometimes'}",
                ),
                "spec.http[1].retries.retryOn: unknown condition",
            ),
            (
                VS.replace(
                    "timeout: 5s",
                    "mirror: {host: a}\n    mirrors: [{destination: {host: b}}]",
                ),
                "spec.http[1]: mirror and mirrors are exclusive",
            ),
            (
                VS.replace("timeout: 5s", "mirrorPercentage: {value: 5}"),
                "spec.http[1].mirrorPercentage: only with mirror",
            ),
            (
                VS.replace(
                    "timeout: 5s",
                    "mirrors: [{destination: {host: b}, percentage: {value: 150}}]",
                ),
                "spec.http[1].mirrors[0].destination: percentage 150",
            ),
        ] {
            let l7 = run(&format!("{MESH}---{edit}"), None);
            let text = statuses(&l7);
            assert!(text.iter().any(|s| s.contains(want)), "{want}: {text:?}");
            assert!(
                !l7.resources
                    .iter()
                    .any(|r| matches!(r, L7Resource::Route(..))),
                "{want}: nothing served"
            );
        }

        // A second VirtualService for the same host is refused, naming the first.
        let second = VS.split("---").next().unwrap().replace(
            "name: reviews, namespace: shop",
            "name: reviews-b, namespace: shop",
        );
        let l7 = run(&format!("{MESH}---{VS}---{second}"), None);
        let text = statuses(&l7);
        assert!(
            text.iter()
                .any(|s| s.starts_with("VirtualService reviews-b: Invalid")
                    && s.contains("already routed by VirtualService shop/reviews")),
            "{text:?}"
        );
    }

    const HTTPROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-hr, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews, port: 9080, weight: 3}, {name: reviews, port: 9080, weight: 1}]
    timeouts: {request: 2s}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}]
    backendRefs: [{name: reviews, port: 9080}]
"#;

    #[test]
    fn http_route_for_a_service() {
        let l7 = run(&format!("{MESH}---{HTTPROUTE}"), None);
        assert!(
            l7.statuses.iter().all(|s| s.accepted),
            "{:?}",
            statuses(&l7)
        );
        let Some(L7Resource::Route(key, route, _)) = l7.resources.first() else {
            panic!("{:?}", l7.resources)
        };
        assert_eq!(key, "shop/reviews.shop.svc.cluster.local");
        assert_eq!(route.origin, "HTTPRoute shop/reviews-hr");
        let first = &route.rules[0];
        assert_eq!(
            first.matches[0].path.as_ref().and_then(|p| p.kind.clone()),
            Some(pb::string_match::Kind::PathPrefix("/api".into())),
            "the longer prefix goes first"
        );
        assert_eq!(
            first.matches[0].port, 9080,
            "the parentRef's port narrows it"
        );
        assert_eq!(
            first.rewrite.as_ref().and_then(|r| r.path.clone()),
            Some(pb::rewrite::Path::Prefix("/v2".into()))
        );
        assert_eq!(route.rules[1].timeout_ms, 2000);
        let Some(pb::rule::Action::Forward(f)) = &route.rules[1].action else {
            panic!()
        };
        assert_eq!(
            f.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [3, 1]
        );

        // A VirtualService for the same service, created earlier, wins; the
        // HTTPRoute is refused, naming it.
        let vs = VS.split("---").next().unwrap().replace(
            "name: reviews, namespace: shop}",
            "name: reviews, namespace: shop, creationTimestamp: \"2026-01-01T00:00:00Z\"}",
        );
        let l7 = run(&format!("{MESH}---{vs}---{HTTPROUTE}"), None);
        let text = statuses(&l7);
        assert!(
            text.iter()
                .any(|s| s.starts_with("HTTPRoute reviews-hr: Invalid")
                    && s.contains("already routed by VirtualService shop/reviews")),
            "{text:?}"
        );
    }

    /// RequestMirror: all requests, a percent or a fraction; its refusals
    /// name the field.
    #[test]
    fn http_route_request_mirror() {
        let with = |filter: &str| {
            let route = HTTPROUTE.replace(
                "  - backendRefs: [{name: reviews, port: 9080, weight: 3}",
                &format!("  - filters: [{{type: RequestMirror, requestMirror: {filter}}}]\n    backendRefs: [{{name: reviews, port: 9080, weight: 3}}"),
            );
            run(&format!("{MESH}---{route}"), None)
        };
        for (filter, percent) in [
            ("{backendRef: {name: reviews, port: 9080}}", 100.0),
            (
                "{backendRef: {name: reviews, port: 9080}, percent: 20}",
                20.0,
            ),
            (
                "{backendRef: {name: reviews, port: 9080}, fraction: {numerator: 1, denominator: 8}}",
                12.5,
            ),
        ] {
            let l7 = with(filter);
            let mirrors: Vec<pb::Mirror> = l7
                .resources
                .iter()
                .find_map(|r| match r {
                    L7Resource::Route(_, route, _) => {
                        Some(route.rules.iter().flat_map(|r| r.mirrors.clone()).collect())
                    }
                    _ => None,
                })
                .unwrap_or_default();
            assert_eq!(
                mirrors,
                [pb::Mirror {
                    hostname: "reviews.shop.svc.cluster.local".into(),
                    namespace: "shop".into(),
                    subset: String::new(),
                    port: 9080,
                    percent,
                }],
                "{filter}"
            );
        }
        for (filter, want) in [
            (
                "{backendRef: {name: reviews}}",
                "requestMirror.backendRef.port: required",
            ),
            (
                "{backendRef: {name: reviews, port: 9080, namespace: other}}",
                "requestMirror.backendRef.namespace",
            ),
            (
                "{backendRef: {name: reviews, port: 9080}, percent: 101}",
                "requestMirror.percent: 101",
            ),
            (
                "{backendRef: {name: reviews, port: 9080}, percent: 1, fraction: {numerator: 1}}",
                "percent and fraction are exclusive",
            ),
            (
                "{backendRef: {name: reviews, port: 9080}, fraction: {numerator: 3, denominator: 2}}",
                "requestMirror.fraction: 3/2",
            ),
        ] {
            let text = statuses(&with(filter));
            assert!(text.iter().any(|s| s.contains(want)), "{want}: {text:?}");
        }
    }

    /// HTTPRoute `retry`: its codes (with connect failures), its attempts
    /// (2 when unset), its backoff; a code out of range is refused.
    #[test]
    fn http_route_retry() {
        let with = |retry: &str| {
            let route = HTTPROUTE.replace(
                "    timeouts: {request: 2s}",
                &format!("    timeouts: {{request: 2s}}\n    retry: {retry}"),
            );
            run(&format!("{MESH}---{route}"), None)
        };
        let l7 = with("{codes: [500, 503], attempts: 4, backoff: 100ms}");
        let policy = l7
            .resources
            .iter()
            .find_map(|r| match r {
                L7Resource::Route(_, route, _) => route
                    .rules
                    .iter()
                    .find(|r| r.timeout_ms == 2000)
                    .and_then(|r| r.retries.clone()),
                _ => None,
            })
            .expect("a retry policy");
        assert_eq!(policy.attempts, 4);
        assert_eq!(policy.backoff_base_ms, 100);
        assert_eq!(policy.retriable_status_codes, [500, 503]);
        assert_eq!(
            policy.retry_on,
            [
                "connect-failure",
                "refused-stream",
                "retriable-status-codes"
            ]
        );
        let text = statuses(&with("{codes: [302]}"));
        assert!(
            text.iter().any(|s| s.contains("retry.codes: 302")),
            "{text:?}"
        );
    }

    #[test]
    fn http_route_precedence_is_per_match() {
        let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews-hr, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews}]
  rules:
  - name: a
    matches: [{path: {type: PathPrefix, value: /}}, {path: {type: Exact, value: /x}}]
    backendRefs: [{name: reviews, port: 9080}]
  - name: b
    matches: [{path: {type: PathPrefix, value: /api}}, {path: {type: PathPrefix, value: /api}, method: GET}]
    backendRefs: [{name: reviews, port: 9080}]
"#;
        let l7 = run(&format!("{MESH}---{route}"), None);
        let Some(L7Resource::Route(_, route, _)) = l7.resources.first() else {
            panic!("{:?}", statuses(&l7))
        };
        let order: Vec<String> = route
            .rules
            .iter()
            .map(|r| {
                let m = &r.matches[0];
                let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
                    Some(pb::string_match::Kind::Exact(p)) => format!("={p}"),
                    Some(pb::string_match::Kind::PathPrefix(p)) => format!("{p}*"),
                    other => format!("{other:?}"),
                };
                let method = if m.method.is_some() { " GET" } else { "" };
                format!("{} {path}{method}", r.name)
            })
            .collect();
        assert_eq!(order, ["a =/x", "b /api* GET", "b /api*", "a /*"]);
    }

    #[test]
    fn http_route_stays_in_its_namespace() {
        for (from, to, want) in [
            (
                "parentRefs: [{group: \"\", kind: Service, name: reviews, port: 9080}]",
                "parentRefs: [{group: \"\", kind: Service, name: reviews, namespace: other, port: 9080}]",
                "consumer routes are not supported",
            ),
            (
                "backendRefs: [{name: reviews, port: 9080}]",
                "backendRefs: [{name: reviews, namespace: other, port: 9080}]",
                "needs a ReferenceGrant",
            ),
        ] {
            let route = HTTPROUTE.replace(from, to);
            assert_ne!(route, HTTPROUTE);
            let l7 = run(&format!("{MESH}---{route}"), None);
            let text = statuses(&l7);
            assert!(
                text.iter()
                    .any(|s| s.starts_with("HTTPRoute reviews-hr: Invalid") && s.contains(want)),
                "{want}: {text:?}"
            );
            assert!(
                l7.resources
                    .iter()
                    .all(|r| !matches!(r, L7Resource::Route(..)))
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(duration_ms("5s"), Some(5000));
        assert_eq!(duration_ms("0.5s"), Some(500));
        assert_eq!(duration_ms("100ms"), Some(100));
        assert_eq!(duration_ms("1m"), Some(60000));
        assert_eq!(duration_ms("5"), None);
        assert_eq!(duration_ms("-1s"), None);
    }
}
