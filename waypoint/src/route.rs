//! Routing, pure: a service's route table (rules → matches → backends),
//! compiled once from its `weft.waypoint.v1.Route`, and the decision for
//! one request. No I/O; table tests below.

use std::collections::BTreeMap;
use std::time::Duration;

use regex::Regex;
use weft_xds::proto::waypoint as pb;

/// A compiled route table.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub origin: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// Any one; empty: every request.
    pub matches: Vec<RequestMatch>,
    pub action: Action,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub rewrite: Option<Rewrite>,
    pub timeout: Option<Duration>,
    pub retry: crate::retry::Policy,
    pub fault: Option<crate::fault::Fault>,
    pub mirrors: Vec<crate::mirror::Mirror>,
    pub cors: Option<crate::cors::Cors>,
}

#[derive(Debug, Clone)]
pub enum Action {
    Forward(Vec<Backend>),
    Redirect(Redirect),
    Direct { status: u16, body: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub hostname: String,
    pub namespace: String,
    pub subset: String,
    /// 0: the request's port.
    pub port: u16,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    path: Option<StringMatch>,
    method: Option<StringMatch>,
    authority: Option<StringMatch>,
    headers: Vec<(String, Option<StringMatch>)>,
    without_headers: Vec<(String, Option<StringMatch>)>,
    query: Vec<(String, Option<StringMatch>)>,
    port: u16,
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Regex(Regex),
    /// By path segments (Gateway API's PathPrefix).
    PathPrefix(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    Full(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub path: Option<PathRewrite>,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathRewrite>,
    pub status: u16,
}

/// What a request is matched on.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub authority: &'a str,
    /// The destination port (the CONNECT target's).
    pub port: u16,
    pub headers: &'a http::HeaderMap,
}

/// A route that cannot be compiled, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct RouteError {
    pub field: String,
    pub message: String,
}

// === compile ===

impl RouteTable {
    pub fn compile(route: &pb::Route) -> Result<Self, RouteError> {
        let rules = route
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(r, &format!("rules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(RouteTable {
            origin: route.origin.clone(),
            rules,
        })
    }

    /// The first rule that matches, as Envoy and Istio try them: in order.
    pub fn find(&self, req: &RequestInfo<'_>) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(req)))
    }
}

fn err(field: &str, message: impl Into<String>) -> RouteError {
    RouteError {
        field: field.to_string(),
        message: message.into(),
    }
}

impl Rule {
    fn compile(r: &pb::Rule, at: &str) -> Result<Self, RouteError> {
        let matches = r
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| RequestMatch::compile(m, &format!("{at}.matches[{i}]")))
            .collect::<Result<_, _>>()?;
        let action = match &r.action {
            Some(pb::rule::Action::Forward(f)) => {
                if f.backends.is_empty() {
                    return Err(err(&format!("{at}.forward"), "no backends"));
                }
                let mut backends = Vec::with_capacity(f.backends.len());
                for (i, b) in f.backends.iter().enumerate() {
                    let port = u16::try_from(b.port)
                        .map_err(|_| err(&format!("{at}.backends[{i}].port"), "out of range"))?;
                    backends.push(Backend {
                        hostname: b.hostname.clone(),
                        namespace: b.namespace.clone(),
                        subset: b.subset.clone(),
                        port,
                        weight: b.weight,
                        request_headers: HeaderOps::compile(b.request_headers.as_ref()),
                        response_headers: HeaderOps::compile(b.response_headers.as_ref()),
                    });
                }
                if backends.iter().all(|b| b.weight == 0) {
                    return Err(err(&format!("{at}.backends"), "every weight is 0"));
                }
                Action::Forward(backends)
            }
            Some(pb::rule::Action::Redirect(rd)) => Action::Redirect(Redirect {
                scheme: non_empty(&rd.scheme),
                authority: non_empty(&rd.authority),
                port: u16::try_from(rd.port).ok().filter(|p| *p != 0),
                path: rd.path.as_ref().map(|p| match p {
                    pb::redirect::Path::FullPath(s) => PathRewrite::Full(s.clone()),
                    pb::redirect::Path::Prefix(s) => PathRewrite::Prefix(s.clone()),
                }),
                status: match rd.status {
                    0 => 301,
                    s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                    s => {
                        return Err(err(
                            &format!("{at}.redirect.status"),
                            format!("{s} is not a redirect"),
                        ));
                    }
                },
            }),
            Some(pb::rule::Action::DirectResponse(d)) => Action::Direct {
                status: u16::try_from(d.status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| {
                        err(&format!("{at}.directResponse.status"), "not an HTTP status")
                    })?,
                body: d.body.clone(),
            },
            None => return Err(err(at, "no action (forward, redirect or direct response)")),
        };
        Ok(Rule {
            name: r.name.clone(),
            matches,
            action,
            request_headers: HeaderOps::compile(r.request_headers.as_ref()),
            response_headers: HeaderOps::compile(r.response_headers.as_ref()),
            rewrite: r.rewrite.as_ref().map(|w| Rewrite {
                path: w.path.as_ref().map(|p| match p {
                    pb::rewrite::Path::FullPath(s) => PathRewrite::Full(s.clone()),
                    pb::rewrite::Path::Prefix(s) => PathRewrite::Prefix(s.clone()),
                }),
                authority: non_empty(&w.authority),
            }),
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            retry: crate::retry::Policy::compile(r.retries.as_ref()),
            fault: crate::fault::Fault::compile(r.fault.as_ref()),
            mirrors: r
                .mirrors
                .iter()
                .enumerate()
                .map(|(i, m)| crate::mirror::Mirror::compile(m, &format!("{at}.mirrors[{i}]")))
                .collect::<Result<_, _>>()?,
            cors: r
                .cors
                .as_ref()
                .map(|c| crate::cors::Cors::compile(c, &format!("{at}.cors")))
                .transpose()?,
        })
    }

    /// Chooses a backend by weight; `roll` is uniform over `0..u32::MAX`.
    pub fn pick(backends: &[Backend], roll: u32) -> Option<&Backend> {
        let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut at = u64::from(roll) % total;
        for b in backends {
            let w = u64::from(b.weight);
            if at < w {
                return Some(b);
            }
            at -= w;
        }
        None
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl HeaderOps {
    fn compile(ops: Option<&pb::HeaderOps>) -> Self {
        let Some(ops) = ops else {
            return HeaderOps::default();
        };
        let pairs = |v: &[pb::Header]| {
            v.iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.clone()))
                .collect()
        };
        HeaderOps {
            set: pairs(&ops.set),
            add: pairs(&ops.add),
            remove: ops.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the operations: remove, then set (replacing), then add.
    pub fn apply(&self, headers: &mut http::HeaderMap) {
        for name in &self.remove {
            headers.remove(name.as_str());
        }
        let pairs = self
            .set
            .iter()
            .map(|p| (p, true))
            .chain(self.add.iter().map(|p| (p, false)));
        for ((name, value), replace) in pairs {
            let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                http::HeaderValue::from_str(value),
            ) else {
                continue;
            };
            if replace {
                headers.insert(n, v);
            } else {
                headers.append(n, v);
            }
        }
    }
}

impl StringMatch {
    pub(crate) fn compile(m: &pb::StringMatch, at: &str) -> Result<Self, RouteError> {
        Ok(match &m.kind {
            Some(pb::string_match::Kind::Exact(s)) => StringMatch::Exact(s.clone(), m.ignore_case),
            Some(pb::string_match::Kind::Prefix(s)) => {
                StringMatch::Prefix(s.clone(), m.ignore_case)
            }
            Some(pb::string_match::Kind::Regex(r)) => {
                // Whole-value match, as Envoy's safe_regex.
                let anchored = if m.ignore_case {
                    format!("(?i)^(?:{r})$")
                } else {
                    format!("^(?:{r})$")
                };
                let re = regex::RegexBuilder::new(&anchored)
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| err(at, format!("bad regex {r:?}: {e}")))?;
                StringMatch::Regex(re)
            }
            Some(pb::string_match::Kind::PathPrefix(p)) => {
                if !p.starts_with('/') {
                    return Err(err(at, format!("path prefix {p:?} does not start with /")));
                }
                StringMatch::PathPrefix(p.trim_end_matches('/').to_string())
            }
            None => return Err(err(at, "empty match: exact, prefix or regex is required")),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s, false) => value == s,
            StringMatch::Exact(s, true) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(s, false) => value.starts_with(s.as_str()),
            StringMatch::Prefix(s, true) => value
                .get(..s.len())
                .is_some_and(|v| v.eq_ignore_ascii_case(s)),
            StringMatch::Regex(re) => re.is_match(value),
            // Stored without its trailing slash: "" is "/", every path.
            StringMatch::PathPrefix(p) => {
                p.is_empty()
                    || value
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

impl RequestMatch {
    fn compile(m: &pb::RequestMatch, at: &str) -> Result<Self, RouteError> {
        let opt = |s: Option<&pb::StringMatch>, f: &str| {
            s.map(|s| StringMatch::compile(s, &format!("{at}.{f}")))
                .transpose()
        };
        let named = |v: &[pb::HeaderMatch], f: &str| -> Result<Vec<_>, RouteError> {
            v.iter()
                .enumerate()
                .map(|(i, h)| {
                    if h.name.is_empty() {
                        return Err(err(&format!("{at}.{f}[{i}].name"), "empty"));
                    }
                    let value = h
                        .value
                        .as_ref()
                        .map(|s| StringMatch::compile(s, &format!("{at}.{f}[{i}]")))
                        .transpose()?;
                    Ok((h.name.to_ascii_lowercase(), value))
                })
                .collect()
        };
        let query = m
            .query_params
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let value = q
                    .value
                    .as_ref()
                    .map(|s| StringMatch::compile(s, &format!("{at}.queryParams[{i}]")))
                    .transpose()?;
                Ok((q.name.clone(), value))
            })
            .collect::<Result<_, RouteError>>()?;
        Ok(RequestMatch {
            path: opt(m.path.as_ref(), "path")?,
            method: opt(m.method.as_ref(), "method")?,
            authority: opt(m.authority.as_ref(), "authority")?,
            headers: named(&m.headers, "headers")?,
            without_headers: named(&m.without_headers, "withoutHeaders")?,
            query,
            port: u16::try_from(m.port).map_err(|_| err(&format!("{at}.port"), "out of range"))?,
        })
    }

    pub fn matches(&self, req: &RequestInfo<'_>) -> bool {
        let header = |name: &str, value: &Option<StringMatch>| {
            let mut values = req
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok());
            match value {
                None => req.headers.contains_key(name),
                Some(m) => values.any(|v| m.matches(v)),
            }
        };
        if self.port != 0 && self.port != req.port {
            return false;
        }
        if let Some(m) = &self.method
            && !m.matches(req.method)
        {
            return false;
        }
        if let Some(m) = &self.path
            && !m.matches(req.path)
        {
            return false;
        }
        if let Some(m) = &self.authority
            && !m.matches(req.authority)
        {
            return false;
        }
        if !self.headers.iter().all(|(n, v)| header(n, v)) {
            return false;
        }
        if self.without_headers.iter().any(|(n, v)| header(n, v)) {
            return false;
        }
        if !self.query.is_empty() {
            // As Envoy: a repeated parameter is its first value, and values
            // are percent-decoded.
            let mut params: BTreeMap<&str, String> = BTreeMap::new();
            for p in req
                .query
                .unwrap_or_default()
                .split('&')
                .filter(|p| !p.is_empty())
            {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                params.entry(k).or_insert_with(|| percent_decode(v));
            }
            let ok = self
                .query
                .iter()
                .all(|(n, v)| match (params.get(n.as_str()), v) {
                    (Some(_), None) => true,
                    (Some(have), Some(m)) => m.matches(have),
                    (None, _) => false,
                });
            if !ok {
                return false;
            }
        }
        true
    }

    /// The prefix this match matched on the path, for a prefix rewrite.
    pub fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            Some(StringMatch::Prefix(p, _) | StringMatch::PathPrefix(p)) => Some(p),
            _ => None,
        }
    }
}

/// The path after a rewrite: a full replacement, or the matched prefix
/// replaced (Istio's `rewrite.uri` after a prefix match; HTTPRoute's
/// `ReplacePrefixMatch`). The query is kept.
/// `path` without `prefix`, compared without case when it differs only so
/// (a prefix matched with `ignoreUriCase`).
fn strip_prefix_any_case<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix).or_else(|| {
        path.get(..prefix.len())
            .filter(|head| head.eq_ignore_ascii_case(prefix))
            .map(|_| &path[prefix.len()..])
    })
}

/// `%HH` decoded (invalid escapes kept as written).
fn percent_decode(v: &str) -> String {
    if !v.contains('%') {
        return v.to_string();
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(x)) => {
                out.push(x);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn rewrite_path(
    path: &str,
    query: Option<&str>,
    rw: &PathRewrite,
    matched: Option<&str>,
) -> String {
    let new = match rw {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::Prefix(replacement) => {
            match matched.and_then(|m| strip_prefix_any_case(path, m)) {
                Some(rest) => {
                    // One slash where the replacement meets the rest.
                    let joined = match (replacement.ends_with('/'), rest.strip_prefix('/')) {
                        (true, Some(tail)) => format!("{replacement}{tail}"),
                        _ => format!("{replacement}{rest}"),
                    };
                    if joined.starts_with('/') {
                        joined
                    } else {
                        format!("/{joined}")
                    }
                }
                // No prefix matched (an exact or regex match): Istio replaces the whole path.
                None => replacement.clone(),
            }
        }
    };
    match query {
        Some(q) => format!("{new}?{q}"),
        None => new,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> Option<pb::StringMatch> {
        Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Exact(s.into())),
            ignore_case: false,
        })
    }
    fn prefix(s: &str) -> Option<pb::StringMatch> {
        Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Prefix(s.into())),
            ignore_case: false,
        })
    }
    fn regex(s: &str) -> Option<pb::StringMatch> {
        Some(pb::StringMatch {
            kind: Some(pb::string_match::Kind::Regex(s.into())),
            ignore_case: false,
        })
    }
    fn forward(subsets: &[(&str, u32)]) -> Option<pb::rule::Action> {
        Some(pb::rule::Action::Forward(pb::Forward {
            backends: subsets
                .iter()
                .map(|(s, w)| pb::Backend {
                    hostname: "reviews.shop.svc.cluster.local".into(),
                    namespace: "shop".into(),
                    subset: (*s).into(),
                    weight: *w,
                    ..Default::default()
                })
                .collect(),
        }))
    }

    /// Istio's reviews example: jason → v2; the rest 90/10 v1/v3.
    fn table() -> RouteTable {
        let route = pb::Route {
            hostname: "reviews.shop.svc.cluster.local".into(),
            namespace: "shop".into(),
            origin: "VirtualService shop/reviews".into(),
            rules: vec![
                pb::Rule {
                    name: "jason".into(),
                    matches: vec![pb::RequestMatch {
                        headers: vec![pb::HeaderMatch {
                            name: "end-user".into(),
                            value: exact("jason"),
                        }],
                        ..Default::default()
                    }],
                    action: forward(&[("v2", 100)]),
                    ..Default::default()
                },
                pb::Rule {
                    name: "api".into(),
                    matches: vec![
                        pb::RequestMatch {
                            path: prefix("/api/"),
                            method: exact("GET"),
                            ..Default::default()
                        },
                        pb::RequestMatch {
                            path: regex("/v[0-9]+/items"),
                            ..Default::default()
                        },
                    ],
                    action: forward(&[("v3", 1)]),
                    ..Default::default()
                },
                pb::Rule {
                    name: "debug".into(),
                    matches: vec![pb::RequestMatch {
                        query_params: vec![pb::QueryMatch {
                            name: "debug".into(),
                            value: None,
                        }],
                        without_headers: vec![pb::HeaderMatch {
                            name: "x-prod".into(),
                            value: None,
                        }],
                        port: 9080,
                        ..Default::default()
                    }],
                    action: Some(pb::rule::Action::DirectResponse(pb::DirectResponse {
                        status: 418,
                        body: b"tea".to_vec(),
                    })),
                    ..Default::default()
                },
                pb::Rule {
                    name: "rest".into(),
                    action: forward(&[("v1", 90), ("v3", 10)]),
                    ..Default::default()
                },
            ],
        };
        RouteTable::compile(&route).unwrap()
    }

    #[test]
    fn first_matching_rule_wins() {
        let t = table();
        let h = |pairs: &[(&str, &str)]| {
            let mut m = http::HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a str,
            Option<&'a str>,
            u16,
            http::HeaderMap,
            &'a str,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "jason",
                "GET",
                "/",
                None,
                9080,
                h(&[("end-user", "jason")]),
                "jason",
            ),
            (
                "other user",
                "GET",
                "/",
                None,
                9080,
                h(&[("end-user", "bob")]),
                "rest",
            ),
            (
                "header values are case-sensitive",
                "GET",
                "/",
                None,
                9080,
                h(&[("end-user", "Jason")]),
                "rest",
            ),
            (
                "prefix and method",
                "GET",
                "/api/x",
                None,
                9080,
                h(&[]),
                "api",
            ),
            (
                "prefix, wrong method",
                "POST",
                "/api/x",
                None,
                9080,
                h(&[]),
                "rest",
            ),
            (
                "regex is whole-path",
                "POST",
                "/v12/items",
                None,
                9080,
                h(&[]),
                "api",
            ),
            (
                "regex not a substring",
                "POST",
                "/x/v12/items",
                None,
                9080,
                h(&[]),
                "rest",
            ),
            (
                "query present",
                "GET",
                "/",
                Some("a=1&debug"),
                9080,
                h(&[]),
                "debug",
            ),
            (
                "without header present",
                "GET",
                "/",
                Some("debug=1"),
                9080,
                h(&[("x-prod", "1")]),
                "rest",
            ),
            (
                "other port",
                "GET",
                "/",
                Some("debug=1"),
                80,
                h(&[]),
                "rest",
            ),
        ];
        for (name, method, path, query, port, headers, want) in cases {
            let req = RequestInfo {
                method,
                path,
                query,
                authority: "reviews",
                port,
                headers: &headers,
            };
            assert_eq!(t.find(&req).map(|r| r.name.as_str()), Some(want), "{name}");
        }
    }

    #[test]
    fn weights_split_by_roll() {
        let t = table();
        let Action::Forward(backends) = &t.rules[3].action else {
            panic!("forward")
        };
        let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
        for roll in 0..1000u32 {
            *counts
                .entry(&Rule::pick(backends, roll).unwrap().subset)
                .or_default() += 1;
        }
        assert_eq!(counts["v1"], 900);
        assert_eq!(counts["v3"], 100);
    }

    #[test]
    fn bad_routes_are_refused_naming_the_field() {
        let bad = |rule: pb::Rule| {
            RouteTable::compile(&pb::Route {
                rules: vec![rule],
                ..Default::default()
            })
            .unwrap_err()
        };
        let e = bad(pb::Rule {
            matches: vec![pb::RequestMatch {
                path: regex("(unclosed"),
                ..Default::default()
            }],
            action: forward(&[("v1", 1)]),
            ..Default::default()
        });
        assert_eq!(e.field, "rules[0].matches[0].path");
        assert!(e.message.contains("bad regex"), "{e}");
        assert_eq!(
            bad(pb::Rule {
                action: forward(&[("v1", 0)]),
                ..Default::default()
            })
            .field,
            "rules[0].backends"
        );
        assert_eq!(bad(pb::Rule::default()).field, "rules[0]");
        let empty = pb::StringMatch {
            kind: None,
            ignore_case: false,
        };
        let e = bad(pb::Rule {
            matches: vec![pb::RequestMatch {
                method: Some(empty),
                ..Default::default()
            }],
            action: forward(&[("v1", 1)]),
            ..Default::default()
        });
        assert_eq!(
            e.field, "rules[0].matches[0].method",
            "an empty match is refused, never read as any"
        );
    }

    #[test]
    fn path_prefix_is_by_segment() {
        let m = StringMatch::compile(
            &pb::StringMatch {
                kind: Some(pb::string_match::Kind::PathPrefix("/foo".into())),
                ignore_case: false,
            },
            "p",
        )
        .unwrap();
        assert!(m.matches("/foo") && m.matches("/foo/") && m.matches("/foo/bar"));
        assert!(!m.matches("/foobar"));
        let root = StringMatch::compile(
            &pb::StringMatch {
                kind: Some(pb::string_match::Kind::PathPrefix("/".into())),
                ignore_case: false,
            },
            "p",
        )
        .unwrap();
        assert!(root.matches("/") && root.matches("/anything"));
        // Gateway API's ReplacePrefixMatch examples.
        let rw =
            |r: &str, p: &str| rewrite_path(p, None, &PathRewrite::Prefix(r.into()), Some("/foo"));
        assert_eq!(rw("/xyz", "/foo/bar"), "/xyz/bar");
        assert_eq!(rw("/xyz/", "/foo/bar"), "/xyz/bar");
        assert_eq!(rw("/", "/foo/bar"), "/bar");
        assert_eq!(rw("/xyz", "/foo"), "/xyz");
    }

    #[test]
    fn query_params_as_envoy_reads_them() {
        let t = RouteTable::compile(&pb::Route {
            rules: vec![pb::Rule {
                name: "v".into(),
                matches: vec![pb::RequestMatch {
                    query_params: vec![pb::QueryMatch {
                        name: "v".into(),
                        value: exact("x y"),
                    }],
                    ..Default::default()
                }],
                action: forward(&[("v1", 1)]),
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        let headers = http::HeaderMap::new();
        let found = |q: &'static str| {
            t.find(&RequestInfo {
                method: "GET",
                path: "/",
                query: Some(q),
                authority: "reviews",
                port: 80,
                headers: &headers,
            })
            .is_some()
        };
        assert!(found("v=x%20y"), "decoded");
        assert!(found("v=x%20y&v=z"), "the first value");
        assert!(!found("v=z&v=x%20y"), "not a later one");
    }

    #[test]
    fn rewrites() {
        assert_eq!(
            rewrite_path(
                "/API/items",
                None,
                &PathRewrite::Prefix("/v2/".into()),
                Some("/api/")
            ),
            "/v2/items",
            "a prefix matched without case is cut at its length"
        );
        let prefix = PathRewrite::Prefix("/v2/".into());
        assert_eq!(
            rewrite_path("/api/items", Some("a=1"), &prefix, Some("/api/")),
            "/v2/items?a=1"
        );
        assert_eq!(
            rewrite_path("/api", None, &PathRewrite::Prefix("/".into()), Some("/api")),
            "/"
        );
        assert_eq!(
            rewrite_path("/x", None, &PathRewrite::Full("/y".into()), None),
            "/y"
        );
        let mut h = http::HeaderMap::new();
        h.insert("a", "1".parse().unwrap());
        h.insert("gone", "1".parse().unwrap());
        let ops = HeaderOps {
            set: vec![("a".into(), "2".into())],
            add: vec![("b".into(), "3".into()), ("a".into(), "4".into())],
            remove: vec!["gone".into()],
        };
        ops.apply(&mut h);
        let all = |n: &str| {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("a"), ["2", "4"]);
        assert_eq!(all("b"), ["3"]);
        assert!(!h.contains_key("gone"));
    }
}
