//! L7 authorization, pure: Istio's AuthorizationPolicy semantics over one
//! HTTP request. DENY first (any match denies), then ALLOW (if any ALLOW
//! applies, one must match); AUDIT and dry-run policies are evaluated and
//! reported, never enforced. Values keep Istio's matching: exact,
//! `prefix*`, `*suffix`, `*`.
//!
//! Connections forwarded at L4 (TCP) are decided as Istio decides them: a
//! rule with HTTP-only fields (hosts, methods, paths, request headers) never
//! matches in an ALLOW policy, which still counts as an ALLOW (so it denies
//! what nothing else allows), and in a DENY policy those fields are dropped,
//! so the rule matches more. Neither is ever widened to allow.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use weft_xds::proto::waypoint as pb;

/// A compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// `namespace/name`.
    pub key: String,
    pub action: Action,
    services: HashSet<String>,
    all_services: bool,
    rules: Vec<Rule>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<pb::AuthzOperation>,
    when: Vec<Condition>,
    /// Has a field only an HTTP request can have.
    http_only: bool,
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Vec<String>,
    not_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
    remote_ip_blocks: Vec<IpNet>,
    not_remote_ip_blocks: Vec<IpNet>,
}

#[derive(Debug, Clone)]
struct Condition {
    key: String,
    values: Vec<String>,
    not_values: Vec<String>,
    /// For ip keys.
    nets: Vec<IpNet>,
    not_nets: Vec<IpNet>,
}

/// What a request is decided on.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The hostnames of the services reached (for `Service` targets): the
    /// one addressed, or every service a pod target backs.
    pub services: &'a [&'a str],
    /// A connection forwarded at L4: no HTTP fields to decide on.
    pub tcp: bool,
    /// The peer: the client pod.
    pub source_ip: IpAddr,
    /// The original client. Envoy's default in a waypoint trusts no
    /// `X-Forwarded-For` hop, so this is the peer unless a trusted hop
    /// vouched for another address.
    pub remote_ip: IpAddr,
    /// `cluster.local/ns/<ns>/sa/<sa>`, as Istio writes principals.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub host: &'a str,
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub port: u16,
    pub destination_ip: IpAddr,
    pub headers: &'a http::HeaderMap,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// `policy`: the DENY that matched, or empty when no ALLOW matched.
    Deny {
        policy: String,
    },
}

fn nets(v: &[String], at: &str) -> Result<Vec<IpNet>, String> {
    v.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{at}: {s:?} is not an address or CIDR"))
        })
        .collect()
}

impl Policy {
    pub fn compile(p: &pb::Authorization) -> Result<Policy, String> {
        let action = match pb::Action::try_from(p.action) {
            Ok(pb::Action::Allow) => Action::Allow,
            Ok(pb::Action::Deny) => Action::Deny,
            Ok(pb::Action::Audit) => Action::Audit,
            Err(_) => return Err(format!("action: unknown value {}", p.action)),
        };
        let mut rules = Vec::new();
        for (i, r) in p.rules.iter().enumerate() {
            let mut from = Vec::new();
            for (j, s) in r.from.iter().enumerate() {
                let at = format!("rules[{i}].from[{j}]");
                from.push(Source {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: nets(&s.ip_blocks, &at)?,
                    not_ip_blocks: nets(&s.not_ip_blocks, &at)?,
                    remote_ip_blocks: nets(&s.remote_ip_blocks, &at)?,
                    not_remote_ip_blocks: nets(&s.not_remote_ip_blocks, &at)?,
                });
            }
            let mut when = Vec::new();
            for (j, c) in r.when.iter().enumerate() {
                let at = format!("rules[{i}].when[{j}]");
                let ip = matches!(c.key.as_str(), "source.ip" | "remote.ip" | "destination.ip");
                let known =
                    ip || matches!(
                        c.key.as_str(),
                        "source.namespace" | "source.principal" | "destination.port"
                    ) || header_name(&c.key).is_some();
                if !known {
                    return Err(format!("{at}.key: {:?} cannot be evaluated", c.key));
                }
                when.push(Condition {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                    nets: if ip {
                        nets(&c.values, &at)?
                    } else {
                        Vec::new()
                    },
                    not_nets: if ip {
                        nets(&c.not_values, &at)?
                    } else {
                        Vec::new()
                    },
                });
            }
            let http_only = r.to.iter().any(|o| {
                !(o.hosts.is_empty()
                    && o.not_hosts.is_empty()
                    && o.methods.is_empty()
                    && o.not_methods.is_empty()
                    && o.paths.is_empty()
                    && o.not_paths.is_empty())
            }) || when.iter().any(|c| header_name(&c.key).is_some());
            rules.push(Rule {
                from,
                to: r.to.clone(),
                when,
                http_only,
            });
        }
        Ok(Policy {
            key: format!("{}/{}", p.namespace, p.name),
            action,
            services: p.services.iter().cloned().collect(),
            all_services: p.all_services,
            rules,
            dry_run: p.dry_run || action == Action::Audit,
        })
    }

    fn applies(&self, services: &[&str]) -> bool {
        self.all_services || services.iter().any(|s| self.services.contains(*s))
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        self.rules
            .iter()
            .any(|r| r.matches(req, self.action == Action::Deny))
    }
}

fn header_name(key: &str) -> Option<&str> {
    key.strip_prefix("request.headers[")?
        .strip_suffix(']')
        .filter(|n| !n.is_empty())
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`.
fn value_matches(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return value.starts_with(p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return value.ends_with(s);
    }
    pattern == value
}

/// A field: any of `yes` (or none given) and none of `no`.
fn field(yes: &[String], no: &[String], value: Option<&str>) -> bool {
    let any = |v: &[String]| value.is_some_and(|x| v.iter().any(|p| value_matches(p, x)));
    (yes.is_empty() || any(yes)) && !any(no)
}

fn net_field(yes: &[IpNet], no: &[IpNet], ip: IpAddr) -> bool {
    (yes.is_empty() || yes.iter().any(|n| n.contains(&ip))) && !no.iter().any(|n| n.contains(&ip))
}

impl Rule {
    /// `deny`: the rule belongs to a DENY policy (on TCP its HTTP-only
    /// fields are dropped rather than the rule).
    fn matches(&self, req: &Request<'_>, deny: bool) -> bool {
        if req.tcp && self.http_only && !deny {
            return false;
        }
        let from = self.from.is_empty() || self.from.iter().any(|s| s.matches(req));
        let to = self.to.is_empty() || self.to.iter().any(|o| operation(o, req));
        let when = self
            .when
            .iter()
            .filter(|c| !(req.tcp && header_name(&c.key).is_some()))
            .all(|c| c.matches(req));
        from && to && when
    }
}

impl Source {
    fn matches(&self, req: &Request<'_>) -> bool {
        field(&self.principals, &self.not_principals, req.principal)
            && field(&self.namespaces, &self.not_namespaces, req.namespace)
            && net_field(&self.ip_blocks, &self.not_ip_blocks, req.source_ip)
            && net_field(
                &self.remote_ip_blocks,
                &self.not_remote_ip_blocks,
                req.remote_ip,
            )
    }
}

fn operation(o: &pb::AuthzOperation, req: &Request<'_>) -> bool {
    let port = req.port.to_string();
    let port_ok = field(&o.ports, &o.not_ports, Some(&port));
    if req.tcp {
        return port_ok;
    }
    let host = req.host.to_ascii_lowercase();
    let bare = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
    let lower = |v: &[String]| v.iter().map(|s| s.to_ascii_lowercase()).collect::<Vec<_>>();
    let (hosts, not_hosts) = (lower(&o.hosts), lower(&o.not_hosts));
    let host_ok = (hosts.is_empty()
        || hosts
            .iter()
            .any(|p| value_matches(p, &host) || value_matches(p, bare)))
        && !not_hosts
            .iter()
            .any(|p| value_matches(p, &host) || value_matches(p, bare));
    host_ok
        && port_ok
        && field(&o.methods, &o.not_methods, Some(req.method))
        && field(&o.paths, &o.not_paths, Some(req.path))
}

impl Condition {
    fn matches(&self, req: &Request<'_>) -> bool {
        let text = |v: Option<&str>| field(&self.values, &self.not_values, v);
        match self.key.as_str() {
            "source.ip" => net_field(&self.nets, &self.not_nets, req.source_ip),
            "remote.ip" => net_field(&self.nets, &self.not_nets, req.remote_ip),
            "destination.ip" => net_field(&self.nets, &self.not_nets, req.destination_ip),
            "source.namespace" => text(req.namespace),
            "source.principal" => text(req.principal),
            "destination.port" => text(Some(&req.port.to_string())),
            key => match header_name(key) {
                Some(name) => {
                    let values: Vec<&str> = req
                        .headers
                        .get_all(name.to_ascii_lowercase().as_str())
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    let any =
                        |v: &[String]| values.iter().any(|x| v.iter().any(|p| value_matches(p, x)));
                    (self.values.is_empty() || any(&self.values)) && !any(&self.not_values)
                }
                // Refused at compile time; never reached.
                None => false,
            },
        }
    }
}

/// Decides `req` by the `policies` that apply to its service. Returns the
/// decision and the dry-run/AUDIT policies that matched (to log and count).
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    req: &Request<'_>,
) -> (Decision, Vec<&'a str>) {
    let mut dry = Vec::new();
    let mut deny = None;
    let mut allows = 0;
    let mut allowed = false;
    for p in policies.into_iter().filter(|p| p.applies(req.services)) {
        let m = p.matches(req);
        if p.dry_run {
            if m {
                dry.push(p.key.as_str());
            }
            continue;
        }
        match p.action {
            Action::Deny if m && deny.is_none() => deny = Some(p.key.clone()),
            Action::Allow => {
                allows += 1;
                allowed |= m;
            }
            _ => {}
        }
    }
    let decision = match deny {
        Some(policy) => Decision::Deny { policy },
        None if allows > 0 && !allowed => Decision::Deny {
            policy: String::new(),
        },
        None => Decision::Allow,
    };
    (decision, dry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(action: pb::Action, rules: Vec<pb::AuthzRule>) -> Policy {
        Policy::compile(&pb::Authorization {
            name: format!("{action:?}").to_lowercase(),
            namespace: "shop".into(),
            action: action as i32,
            all_services: true,
            rules,
            ..Default::default()
        })
        .unwrap()
    }

    fn op(methods: &[&str], paths: &[&str]) -> pb::AuthzRule {
        pb::AuthzRule {
            to: vec![pb::AuthzOperation {
                methods: methods.iter().map(|s| s.to_string()).collect(),
                paths: paths.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn istio_semantics() {
        let headers = http::HeaderMap::new();
        let req = |method: &'static str, path: &'static str, principal: &'static str| Request {
            services: &["web.shop.svc.cluster.local"],
            tcp: false,
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "10.0.0.1".parse().unwrap(),
            principal: Some(principal),
            namespace: Some("shop"),
            host: "web.shop:80",
            method,
            path,
            port: 80,
            destination_ip: "10.96.0.1".parse().unwrap(),
            headers: &headers,
        };
        let deny_delete = policy(pb::Action::Deny, vec![op(&["DELETE"], &[])]);
        let allow_api = policy(
            pb::Action::Allow,
            vec![pb::AuthzRule {
                from: vec![pb::AuthzSource {
                    principals: vec!["cluster.local/ns/shop/sa/*".into()],
                    ..Default::default()
                }],
                to: op(&[], &["/api/*", "/health"]).to,
                ..Default::default()
            }],
        );
        let client = "cluster.local/ns/shop/sa/client";
        let other = "cluster.local/ns/ops/sa/probe";
        let only = |p: &[&Policy], r| evaluate(p.iter().copied(), &r).0;
        let denied = |policy: &str| Decision::Deny {
            policy: policy.into(),
        };
        assert_eq!(
            only(&[], req("DELETE", "/", client)),
            Decision::Allow,
            "no policy: allowed"
        );
        assert_eq!(
            only(&[&deny_delete], req("DELETE", "/x", client)),
            denied("shop/deny")
        );
        assert_eq!(
            only(&[&deny_delete], req("GET", "/x", client)),
            Decision::Allow
        );
        let both = [&deny_delete, &allow_api];
        assert_eq!(only(&both, req("GET", "/api/v1", client)), Decision::Allow);
        assert_eq!(only(&both, req("GET", "/health", client)), Decision::Allow);
        assert_eq!(
            only(&both, req("GET", "/healthz", client)),
            denied(""),
            "exact path"
        );
        assert_eq!(
            only(&both, req("GET", "/api/v1", other)),
            denied(""),
            "other namespace"
        );
        assert_eq!(
            only(&both, req("DELETE", "/api/v1", client)),
            denied("shop/deny"),
            "DENY first"
        );
        let empty_allow = policy(pb::Action::Allow, vec![]);
        assert_eq!(
            only(&[&empty_allow], req("GET", "/", client)),
            denied(""),
            "ALLOW nothing denies all"
        );
        let mut audit = policy(pb::Action::Audit, vec![op(&["GET"], &[])]);
        audit.key = "shop/audit".into();
        let (d, dry) = evaluate([&audit], &req("GET", "/", client));
        assert_eq!(
            (d, dry),
            (Decision::Allow, vec!["shop/audit"]),
            "AUDIT never enforces"
        );
    }

    #[test]
    fn conditions_and_blocks() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-token", "abc-123".parse().unwrap());
        let req = Request {
            services: &["web.shop.svc.cluster.local"],
            tcp: false,
            source_ip: "10.244.1.10".parse().unwrap(),
            remote_ip: "192.0.2.7".parse().unwrap(),
            principal: None,
            namespace: None,
            host: "web",
            method: "GET",
            path: "/",
            port: 8080,
            destination_ip: "10.96.0.1".parse().unwrap(),
            headers: &headers,
        };
        let allow = |rule: pb::AuthzRule| policy(pb::Action::Allow, vec![rule]);
        let when = |key: &str, values: &[&str]| pb::AuthzRule {
            when: vec![pb::AuthzCondition {
                key: key.into(),
                values: values.iter().map(|s| s.to_string()).collect(),
                not_values: vec![],
            }],
            ..Default::default()
        };
        let ok = |p: Policy| evaluate([&p], &req).0 == Decision::Allow;
        assert!(ok(allow(when("request.headers[x-token]", &["abc-*"]))));
        assert!(!ok(allow(when("request.headers[x-token]", &["xyz"]))));
        assert!(!ok(allow(when("request.headers[x-missing]", &["*"]))));
        assert!(ok(allow(when("destination.port", &["8080"]))));
        assert!(ok(allow(when("remote.ip", &["192.0.2.0/24"]))));
        assert!(!ok(allow(when("source.ip", &["192.0.2.0/24"]))));
        assert!(
            !ok(allow(when("source.principal", &["*"]))),
            "no principal: * does not match"
        );
        let blocks = pb::AuthzRule {
            from: vec![pb::AuthzSource {
                ip_blocks: vec!["10.244.0.0/16".into()],
                not_remote_ip_blocks: vec!["192.0.2.7".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            !ok(allow(blocks)),
            "notRemoteIpBlocks excludes the original client"
        );
        let bad = pb::Authorization {
            rules: vec![when("request.auth.claims[iss]", &["x"])],
            ..Default::default()
        };
        assert!(
            Policy::compile(&bad).is_err(),
            "unknown keys are refused, not ignored"
        );
    }

    #[test]
    fn tcp_connections_keep_istio_semantics() {
        let headers = http::HeaderMap::new();
        let conn = |services: &'static [&'static str]| Request {
            services,
            tcp: true,
            source_ip: "10.0.0.1".parse().unwrap(),
            remote_ip: "10.0.0.1".parse().unwrap(),
            principal: Some("cluster.local/ns/shop/sa/client"),
            namespace: Some("shop"),
            host: "",
            method: "",
            path: "",
            port: 80,
            destination_ip: "10.96.0.1".parse().unwrap(),
            headers: &headers,
        };
        let web: &[&str] = &["web.shop.svc.cluster.local"];
        let ok = |p: &Policy, r: Request<'_>| evaluate([p], &r).0 == Decision::Allow;
        let allow_get = policy(pb::Action::Allow, vec![op(&["GET"], &[])]);
        assert!(
            !ok(&allow_get, conn(web)),
            "an ALLOW of HTTP methods never allows a TCP connection"
        );
        let deny_delete = policy(pb::Action::Deny, vec![op(&["DELETE"], &[])]);
        assert!(
            !ok(&deny_delete, conn(web)),
            "a DENY of HTTP methods denies every TCP connection"
        );
        let mut deny_port = op(&[], &[]);
        deny_port.to[0].ports = vec!["443".into()];
        let deny_port = policy(pb::Action::Deny, vec![deny_port]);
        assert!(ok(&deny_port, conn(web)), "L4 fields still decide");
        let mut header = pb::AuthzRule::default();
        header.when.push(pb::AuthzCondition {
            key: "request.headers[x-user]".into(),
            values: vec!["admin".into()],
            not_values: vec![],
        });
        let allow_header = policy(pb::Action::Allow, vec![header]);
        assert!(!ok(&allow_header, conn(web)));
        let mut only_db = policy(pb::Action::Deny, vec![]);
        only_db.all_services = false;
        only_db.services.insert("db.shop.svc.cluster.local".into());
        only_db.rules.push(Rule::default());
        assert!(ok(&only_db, conn(web)), "bound to another service");
        assert!(
            !ok(
                &only_db,
                conn(&["web.shop.svc.cluster.local", "db.shop.svc.cluster.local"])
            ),
            "a pod that backs two services gets the policies of both"
        );
    }
}
