//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io` v1) with a Service
//! as parent (GAMMA), translated into the same waypoint route rules as a
//! VirtualService: matches (path, headers, query parameters, method),
//! filters (request and response header modifiers, redirect, URL rewrite),
//! weighted backendRefs and request timeouts.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use weft_xds::proto::waypoint as pb;

use crate::routes::duration_ms;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: HttpRouteSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<ParentRef>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteRule {
    pub name: Option<String>,
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<RouteRetry>,
    pub session_persistence: Option<serde_yaml::Value>,
}

/// Gateway API `HTTPRouteRetry` (GEP-1731).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteRetry {
    pub codes: Vec<u32>,
    pub attempts: Option<i64>,
    pub backoff: Option<String>,
}

/// A rule's `retry` as the waypoint's retry policy: `attempts` retries
/// (Istio's 2 when unset), on `codes` and on failures to connect or a
/// refused stream (a request that never reached the backend), or on
/// Istio's default conditions without codes; `backoff` is the base of the
/// jittered backoff.
fn route_retry(r: &RouteRetry, at: &str) -> Result<pb::RetryPolicy, String> {
    if let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c)) {
        return Err(format!("{at}.codes: {c} is not a status from 400 to 599"));
    }
    let retry_on = (!r.codes.is_empty()).then(|| {
        let mut on = vec!["connect-failure".to_string(), "refused-stream".to_string()];
        on.extend(r.codes.iter().map(u32::to_string));
        on.join(",")
    });
    crate::resilience::retries(
        &crate::resilience::HttpRetry {
            attempts: Some(r.attempts.unwrap_or(2)),
            retry_on,
            backoff: r.backoff.clone(),
            ..Default::default()
        },
        at,
    )
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<NamedMatch>,
    pub query_params: Vec<NamedMatch>,
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PathMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub value: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct NamedMatch {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Filter {
    #[serde(rename = "type")]
    pub kind: String,
    pub request_header_modifier: Option<HeaderModifier>,
    pub response_header_modifier: Option<HeaderModifier>,
    pub request_redirect: Option<Redirect>,
    #[serde(rename = "urlRewrite")]
    pub url_rewrite: Option<UrlRewrite>,
    pub request_mirror: Option<RequestMirror>,
    pub extension_ref: Option<serde_yaml::Value>,
    pub cors: Option<serde_yaml::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderModifier {
    pub set: Vec<Header>,
    pub add: Vec<Header>,
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u32>,
    pub status_code: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub kind: String,
    pub replace_full_path: Option<String>,
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RequestMirror {
    pub backend_ref: BackendObjectRef,
    pub percent: Option<u32>,
    pub fraction: Option<Fraction>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BackendObjectRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u32>,
    pub weight: Option<u32>,
    pub filters: Vec<Filter>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Timeouts {
    pub request: Option<String>,
    pub backend_request: Option<String>,
}

fn is_service(group: &Option<String>, kind: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some("core"))
        && matches!(kind.as_deref(), None | Some("Service"))
}

/// A Service backend (at `at`) of a route in namespace `ns`: its hostname,
/// namespace and port.
fn service_backend(
    b: &BackendObjectRef,
    ns: &str,
    at: &str,
) -> Result<(String, String, u32), String> {
    if !is_service(&b.group, &b.kind) {
        return Err(format!("{at}: only Service backends are supported"));
    }
    let bns = b.namespace.clone().unwrap_or_else(|| ns.to_string());
    if bns != ns {
        // Gateway API wants a ReferenceGrant in `bns` for this.
        return Err(format!(
            "{at}.namespace: {bns:?} is another namespace; a cross-namespace backend needs a ReferenceGrant, which Weft does not read yet"
        ));
    }
    let port = b
        .port
        .ok_or_else(|| format!("{at}.port: required for a Service backend"))?;
    Ok((format!("{}.{bns}.svc.cluster.local", b.name), bns, port))
}

/// A RequestMirror filter (at `at`): its share is `percent`, or
/// `fraction` (denominator 100 when unset), or all requests.
fn request_mirror(m: &RequestMirror, ns: &str, at: &str) -> Result<pb::Mirror, String> {
    let (hostname, namespace, port) =
        service_backend(&m.backend_ref, ns, &format!("{at}.backendRef"))?;
    let percent = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(format!("{at}: percent and fraction are exclusive; set one"));
        }
        (Some(p), None) if p <= 100 => f64::from(p),
        (Some(p), None) => return Err(format!("{at}.percent: {p} is over 100")),
        (None, Some(f)) => {
            let d = f.denominator.unwrap_or(100);
            if d == 0 || f.numerator > d {
                return Err(format!(
                    "{at}.fraction: {}/{d} is not a fraction of at most 1",
                    f.numerator
                ));
            }
            f64::from(f.numerator) * 100.0 / f64::from(d)
        }
        (None, None) => 100.0,
    };
    Ok(pb::Mirror {
        hostname,
        namespace,
        subset: String::new(),
        port,
        percent,
    })
}

/// The services (full hostnames) an HTTPRoute attaches to, with the port
/// each parentRef narrows it to.
pub fn parents(route: &HttpRoute, ns: &str) -> Result<Vec<(String, u32)>, String> {
    if route.spec.parent_refs.is_empty() {
        return Err("spec.parentRefs: a route for a waypoint names a Service parent".into());
    }
    route
        .spec
        .parent_refs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let pkind = p.kind.as_deref().unwrap_or("Gateway");
            if !is_service(&p.group, &Some(pkind.to_string())) {
                return Err(format!(
                    "spec.parentRefs[{i}]: {pkind} parents (ingress gateways) are not served by Weft yet; use a Service parent"
                ));
            }
            let pns = p.namespace.as_deref().unwrap_or(ns);
            if pns != ns {
                // GAMMA calls this a consumer route, for the route's own
                // namespace's clients only; served to a waypoint it would
                // reroute every client of another team's service.
                return Err(format!(
                    "spec.parentRefs[{i}].namespace: {pns:?} is not the route's namespace; consumer routes are not supported, write the route in {pns}"
                ));
            }
            Ok((format!("{}.{pns}.svc.cluster.local", p.name), p.port.unwrap_or(0)))
        })
        .collect()
}

fn header_mod(m: &HeaderModifier) -> pb::HeaderOps {
    let pairs = |v: &[Header]| {
        v.iter()
            .map(|h| pb::Header {
                name: h.name.to_ascii_lowercase(),
                value: h.value.clone(),
            })
            .collect()
    };
    pb::HeaderOps {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.iter().map(|s| s.to_ascii_lowercase()).collect(),
    }
}

fn string_match(kind: Option<&str>, value: &str, at: &str) -> Result<pb::StringMatch, String> {
    let kind = match kind.unwrap_or("Exact") {
        "Exact" => pb::string_match::Kind::Exact(value.to_string()),
        "RegularExpression" => {
            regex::Regex::new(value).map_err(|e| format!("{at}: bad regex: {e}"))?;
            pb::string_match::Kind::Regex(value.to_string())
        }
        other => {
            return Err(format!(
                "{at}.type: {other:?} is not Exact or RegularExpression"
            ));
        }
    };
    Ok(pb::StringMatch {
        kind: Some(kind),
        ignore_case: false,
    })
}

fn path_rewrite(p: &PathModifier, at: &str) -> Result<PathSpec, String> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(f), _) => Ok(PathSpec::Full(f.clone())),
        ("ReplacePrefixMatch", _, Some(r)) => Ok(PathSpec::Prefix(r.clone())),
        (kind, _, _) => Err(format!("{at}.type: {kind:?} needs its replace field")),
    }
}

enum PathSpec {
    Full(String),
    Prefix(String),
}

/// The rules of one HTTPRoute for a parent narrowed to `port` (0: all).
pub fn rules(route: &HttpRoute, ns: &str, port: u32) -> Result<Vec<pb::Rule>, String> {
    let mut out = Vec::new();
    for (i, r) in route.spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if r.session_persistence.is_some() {
            return Err(format!("{at}.sessionPersistence: not supported yet"));
        }
        let retries = r
            .retry
            .as_ref()
            .map(|x| route_retry(x, &format!("{at}.retry")))
            .transpose()?;
        let mut matches = Vec::new();
        let defaults = [RouteMatch::default()];
        let given = if r.matches.is_empty() {
            &defaults[..]
        } else {
            &r.matches[..]
        };
        for (j, m) in given.iter().enumerate() {
            let at = format!("{at}.matches[{j}]");
            let path = match &m.path {
                None => Some(pb::string_match::Kind::PathPrefix("/".into())),
                Some(p) => {
                    let value = p.value.clone().unwrap_or_else(|| "/".into());
                    Some(match p.kind.as_deref().unwrap_or("PathPrefix") {
                        "PathPrefix" => pb::string_match::Kind::PathPrefix(value),
                        "Exact" => pb::string_match::Kind::Exact(value),
                        "RegularExpression" => {
                            regex::Regex::new(&value)
                                .map_err(|e| format!("{at}.path: bad regex: {e}"))?;
                            pb::string_match::Kind::Regex(value)
                        }
                        other => {
                            return Err(format!(
                                "{at}.path.type: {other:?} is not PathPrefix, Exact or RegularExpression"
                            ));
                        }
                    })
                }
            };
            let named = |v: &[NamedMatch], f: &str| {
                v.iter()
                    .enumerate()
                    .map(|(k, h)| {
                        Ok((
                            h.name.clone(),
                            string_match(h.kind.as_deref(), &h.value, &format!("{at}.{f}[{k}]"))?,
                        ))
                    })
                    .collect::<Result<Vec<_>, String>>()
            };
            matches.push(pb::RequestMatch {
                path: path.map(|k| pb::StringMatch {
                    kind: Some(k),
                    ignore_case: false,
                }),
                method: m.method.as_ref().map(|v| pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Exact(v.clone())),
                    ignore_case: false,
                }),
                headers: named(&m.headers, "headers")?
                    .into_iter()
                    .map(|(name, value)| pb::HeaderMatch {
                        name: name.to_ascii_lowercase(),
                        value: Some(value),
                    })
                    .collect(),
                without_headers: Vec::new(),
                query_params: named(&m.query_params, "queryParams")?
                    .into_iter()
                    .map(|(name, value)| pb::QueryMatch {
                        name,
                        value: Some(value),
                    })
                    .collect(),
                port,
                authority: None,
            });
        }
        let mut request_headers = None;
        let mut response_headers = None;
        let mut redirect = None;
        let mut rewrite = None;
        let mut mirrors = Vec::new();
        for (k, f) in r.filters.iter().enumerate() {
            let fat = format!("{at}.filters[{k}]");
            match (f.kind.as_str(), f) {
                (
                    "RequestHeaderModifier",
                    Filter {
                        request_header_modifier: Some(m),
                        ..
                    },
                ) => request_headers = Some(header_mod(m)),
                (
                    "ResponseHeaderModifier",
                    Filter {
                        response_header_modifier: Some(m),
                        ..
                    },
                ) => response_headers = Some(header_mod(m)),
                (
                    "RequestRedirect",
                    Filter {
                        request_redirect: Some(rd),
                        ..
                    },
                ) => {
                    let path = rd
                        .path
                        .as_ref()
                        .map(|p| path_rewrite(p, &format!("{fat}.requestRedirect.path")))
                        .transpose()?;
                    redirect = Some(pb::Redirect {
                        scheme: rd.scheme.clone().unwrap_or_default(),
                        authority: rd.hostname.clone().unwrap_or_default(),
                        // Gateway API: with a scheme and no port, the
                        // scheme's well-known one (which the Location omits).
                        port: rd.port.unwrap_or(match rd.scheme.as_deref() {
                            Some("https") => 443,
                            Some(_) => 80,
                            None => 0,
                        }),
                        path: path.map(|p| match p {
                            PathSpec::Full(s) => pb::redirect::Path::FullPath(s),
                            PathSpec::Prefix(s) => pb::redirect::Path::Prefix(s),
                        }),
                        status: rd.status_code.unwrap_or(302),
                    });
                }
                (
                    "URLRewrite",
                    Filter {
                        url_rewrite: Some(u),
                        ..
                    },
                ) => {
                    let path = u
                        .path
                        .as_ref()
                        .map(|p| path_rewrite(p, &format!("{fat}.urlRewrite.path")))
                        .transpose()?;
                    rewrite = Some(pb::Rewrite {
                        path: path.map(|p| match p {
                            PathSpec::Full(s) => pb::rewrite::Path::FullPath(s),
                            PathSpec::Prefix(s) => pb::rewrite::Path::Prefix(s),
                        }),
                        authority: u.hostname.clone().unwrap_or_default(),
                    });
                }
                (
                    "RequestMirror",
                    Filter {
                        request_mirror: Some(m),
                        ..
                    },
                ) => mirrors.push(request_mirror(m, ns, &format!("{fat}.requestMirror"))?),
                (kind, _) => {
                    return Err(format!(
                        "{fat}: {kind:?} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror), or its field is missing"
                    ));
                }
            }
        }
        let action = if let Some(rd) = redirect {
            if !r.backend_refs.is_empty() {
                return Err(format!("{at}: a RequestRedirect rule has no backendRefs"));
            }
            pb::rule::Action::Redirect(rd)
        } else if r.backend_refs.is_empty() {
            // Gateway API: a rule with nowhere to go answers 500.
            pb::rule::Action::DirectResponse(pb::DirectResponse {
                status: 500,
                body: Vec::new(),
            })
        } else {
            let mut backends = Vec::new();
            for (k, b) in r.backend_refs.iter().enumerate() {
                let bat = format!("{at}.backendRefs[{k}]");
                if !b.filters.is_empty() {
                    return Err(format!(
                        "{bat}.filters: per-backend filters are not supported yet"
                    ));
                }
                let object = BackendObjectRef {
                    group: b.group.clone(),
                    kind: b.kind.clone(),
                    name: b.name.clone(),
                    namespace: b.namespace.clone(),
                    port: b.port,
                };
                let (hostname, namespace, port) = service_backend(&object, ns, &bat)?;
                backends.push(pb::Backend {
                    hostname,
                    namespace,
                    subset: String::new(),
                    port,
                    weight: b.weight.unwrap_or(1),
                    request_headers: None,
                    response_headers: None,
                });
            }
            if backends.iter().all(|b| b.weight == 0) {
                // Gateway API: every weight 0 answers 500.
                pb::rule::Action::DirectResponse(pb::DirectResponse {
                    status: 500,
                    body: Vec::new(),
                })
            } else {
                pb::rule::Action::Forward(pb::Forward { backends })
            }
        };
        let timeout_ms = match r
            .timeouts
            .as_ref()
            .and_then(|t| t.request.as_ref().or(t.backend_request.as_ref()))
        {
            None => 0,
            Some(t) => duration_ms(t)
                .ok_or_else(|| format!("{at}.timeouts: {t:?} is not a duration like 5s"))?,
        };
        out.push(pb::Rule {
            name: r.name.clone().unwrap_or_else(|| {
                format!(
                    "{ns}/{}.{i}",
                    route.metadata.name.as_deref().unwrap_or_default()
                )
            }),
            matches,
            action: Some(action),
            request_headers,
            response_headers,
            rewrite,
            timeout_ms,
            // Unset: Istio's default retry policy.
            retries,
            fault: None,
            mirrors,
            cors: None,
        });
    }
    // Gateway API precedence is per match, not per rule: an exact path
    // before a prefix, longer prefixes first, then a method, then more
    // header matches, then more query matches; ties keep the route's order.
    // Rules are tried in order, so each match becomes its own rule, sorted
    // (stably) by precedence.
    let mut each: Vec<pb::Rule> = Vec::with_capacity(out.len());
    for r in out {
        if r.matches.len() <= 1 {
            each.push(r);
            continue;
        }
        for m in &r.matches {
            each.push(pb::Rule {
                matches: vec![m.clone()],
                ..r.clone()
            });
        }
    }
    each.sort_by_key(|r| std::cmp::Reverse(specificity(r)));
    Ok(each)
}

fn specificity(r: &pb::Rule) -> (u8, usize, bool, usize, usize) {
    r.matches
        .iter()
        .map(|m| {
            let (kind, len) = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
                Some(pb::string_match::Kind::Exact(p)) => (3, p.len()),
                Some(pb::string_match::Kind::Regex(p)) => (2, p.len()),
                Some(pb::string_match::Kind::PathPrefix(p) | pb::string_match::Kind::Prefix(p)) => {
                    (1, p.len())
                }
                None => (0, 0),
            };
            (
                kind,
                len,
                m.method.is_some(),
                m.headers.len(),
                m.query_params.len(),
            )
        })
        .max()
        .unwrap_or_default()
}
