//! L7 AuthorizationPolicy: policies attached by `targetRefs` to a waypoint
//! (`Gateway`), to one service (`Service`) or to every waypoint
//! (`GatewayClass` `istio-waypoint`, root namespace only), as in Istio's
//! ambient mode; waypoints never bind by selector. Each becomes a
//! `weft.waypoint.v1.Authorization`, served only to the waypoints it binds.
//!
//! A rule the waypoint cannot evaluate (JWT `requestPrincipals`,
//! `request.auth.*` conditions, CUSTOM) refuses the whole policy with a
//! status naming the field: never widened, never half-enforced.

use std::collections::BTreeSet;

use weft_api::{Identity, LocalConfig, Service};
use weft_xds::proto::waypoint as pb;

use crate::Snapshot;
use crate::policy::{
    AuthorizationPolicy, DRY_RUN_ANNOTATION, Refusal, Status, nets, plain, ports, principal,
    service_accounts, strings,
};
use crate::routes::{L7, L7Resource, waypoint_identity};
use crate::translate::Mesh;
use crate::waypoints::WAYPOINT_CLASS;

/// Condition keys a waypoint evaluates (Istio's names).
const KEYS: [&str; 7] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "request.headers",
];

/// What a targetRef names.
enum Target {
    /// Every service of the waypoints with these identities.
    Waypoints(BTreeSet<Identity>),
    /// The services (hostnames) of one Service or ServiceEntry, through
    /// their waypoint.
    Services(Vec<String>, BTreeSet<Identity>),
}

fn identities_behind(wp: &Service, mesh: &Mesh) -> BTreeSet<Identity> {
    waypoint_identity(wp, &mesh.trust_domain)
        .into_iter()
        .collect()
}

/// The identities of the waypoint `svc` (a `kind`'s service) is bound to.
fn waypoint_of(
    svc: &Service,
    kind: &str,
    cfg: &LocalConfig,
    mesh: &Mesh,
    at: &str,
) -> Result<BTreeSet<Identity>, String> {
    let (ns, name) = (&svc.namespace, &svc.name);
    let r = svc
        .waypoint
        .as_ref()
        .ok_or_else(|| format!("{at}: {kind} {ns}/{name} has no waypoint to enforce it"))?;
    let wp = cfg
        .services
        .iter()
        .find(|s| s.namespace == r.namespace && s.hostname == r.hostname)
        .ok_or_else(|| format!("{at}: the waypoint of {kind} {ns}/{name} is not known"))?;
    Ok(identities_behind(wp, mesh))
}

fn waypoint_services(cfg: &LocalConfig) -> impl Iterator<Item = &Service> {
    let refs: BTreeSet<String> = cfg
        .services
        .iter()
        .filter_map(|s| s.waypoint.as_ref())
        .map(|r| r.service_key())
        .collect();
    cfg.services
        .iter()
        .filter(move |s| refs.contains(&format!("{}/{}", s.namespace, s.hostname)))
        .map(|s| &**s)
}

fn target(
    t: &serde_yaml::Value,
    ns: &str,
    at: &str,
    mesh: &Mesh,
    cfg: &LocalConfig,
) -> Result<Target, String> {
    let field = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    let (group, kind, name) = (field("group"), field("kind"), field("name"));
    if name.is_empty() {
        return Err(format!("{at}.name: required"));
    }
    match (group, kind) {
        ("gateway.networking.k8s.io", "Gateway") => {
            let host = format!("{name}.{ns}.svc.cluster.local");
            let wp = cfg
                .services
                .iter()
                .find(|s| s.namespace == ns && s.hostname == host)
                .ok_or_else(|| format!("{at}: no waypoint {ns}/{name}"))?;
            Ok(Target::Waypoints(identities_behind(wp, mesh)))
        }
        ("gateway.networking.k8s.io", "GatewayClass") => {
            if name != WAYPOINT_CLASS {
                return Err(format!(
                    "{at}.name: only GatewayClass {WAYPOINT_CLASS} has waypoints"
                ));
            }
            if ns != mesh.root_namespace {
                return Err(format!(
                    "{at}: a GatewayClass target is only allowed in the root namespace {}",
                    mesh.root_namespace
                ));
            }
            let ids = waypoint_services(cfg)
                .flat_map(|wp| identities_behind(wp, mesh))
                .collect();
            Ok(Target::Waypoints(ids))
        }
        ("" | "core", "Service") => {
            let host = format!("{name}.{ns}.svc.cluster.local");
            let svc = cfg
                .services
                .iter()
                .find(|s| s.hostname == host)
                .ok_or_else(|| format!("{at}: no Service {ns}/{name}"))?;
            let ids = waypoint_of(svc, "Service", cfg, mesh, at)?;
            Ok(Target::Services(vec![host], ids))
        }
        ("networking.istio.io", "ServiceEntry") => {
            // One service per host, all bound alike (the entry's labels);
            // a Service of the same name has its own hostname.
            let own = format!("{name}.{ns}.svc.cluster.local");
            let hosts: Vec<&Service> = cfg
                .services
                .iter()
                .filter(|s| s.namespace == ns && s.name == name && s.hostname != own)
                .map(|s| &**s)
                .collect();
            let first = hosts
                .first()
                .ok_or_else(|| format!("{at}: no ServiceEntry {ns}/{name} is served"))?;
            let ids = waypoint_of(first, "ServiceEntry", cfg, mesh, at)?;
            Ok(Target::Services(
                hosts.iter().map(|s| s.hostname.clone()).collect(),
                ids,
            ))
        }
        _ => Err(format!(
            "{at}: {group}/{kind} is not a target a waypoint enforces (Gateway, GatewayClass, Service, ServiceEntry)"
        )),
    }
}

fn condition_key_ok(key: &str) -> bool {
    KEYS.iter().any(|k| {
        key == *k
            || (*k == "request.headers"
                && key.starts_with("request.headers[")
                && key.ends_with(']')
                && key.len() > "request.headers[]".len())
    })
}

/// Translates every AuthorizationPolicy with targetRefs into `l7`. A policy
/// that stops translating keeps its last accepted version from `previous`
/// in force (its status says so), as a route does: never dropped, which
/// would lift a DENY, and never widened.
pub fn translate(
    snap: &Snapshot,
    mesh: &Mesh,
    cfg: &LocalConfig,
    previous: Option<&L7>,
    l7: &mut L7,
) {
    for ap in snap.authorization_policies.values() {
        let spec = &ap.spec;
        let refs: Vec<&serde_yaml::Value> =
            spec.target_ref.iter().chain(&spec.target_refs).collect();
        if refs.is_empty() {
            continue;
        }
        let (ns, name) = crate::translate::names(&ap.metadata);
        let status = |accepted, reason, message: String| Status {
            kind: "AuthorizationPolicy",
            namespace: ns.clone(),
            name: name.clone(),
            accepted,
            reason,
            message,
            condition: crate::policy::WAYPOINT_ACCEPTED,
        };
        let key = format!("{ns}/{name}");
        match policy(ap, &refs, &ns, &name, mesh, cfg) {
            Ok((msg, scope, enforced_by)) => {
                l7.statuses.push(status(
                    true,
                    "Accepted",
                    format!("enforced by {enforced_by}"),
                ));
                l7.accepted_policies
                    .insert(key.clone(), (msg.clone(), scope.clone()));
                l7.resources
                    .push(L7Resource::Authorization(key, msg, scope));
            }
            Err(Refused { message, closed }) => {
                let kept = previous
                    .and_then(|p| p.accepted_policies.get(&key))
                    .cloned();
                match (kept, closed) {
                    (Some((msg, scope)), _) => {
                        l7.statuses.push(status(
                            false,
                            "Invalid",
                            format!("{message}; the last accepted version stays in force"),
                        ));
                        l7.accepted_policies
                            .insert(key.clone(), (msg.clone(), scope.clone()));
                        l7.resources
                            .push(L7Resource::Authorization(key, msg, scope));
                    }
                    (None, Some(closed)) => {
                        let (msg, scope) = *closed;
                        let how = if msg.rules.is_empty() {
                            "an ALLOW that matches nothing"
                        } else {
                            "a DENY of every request"
                        };
                        l7.statuses.push(status(
                            false,
                            "Invalid",
                            format!("{message}; with no accepted version to keep, enforced closed as {how}"),
                        ));
                        l7.resources
                            .push(L7Resource::Authorization(key, msg, scope));
                    }
                    (None, None) => l7.statuses.push(status(false, "Invalid", message)),
                }
            }
        }
    }
}

type Translated = (pb::Authorization, BTreeSet<Identity>, String);

/// Why a policy was refused, and what to enforce instead when it has no
/// accepted version to keep: the same targets, closed.
struct Refused {
    message: String,
    closed: Option<Box<(pb::Authorization, BTreeSet<Identity>)>>,
}

impl From<String> for Refused {
    fn from(message: String) -> Self {
        Refused {
            message,
            closed: None,
        }
    }
}

fn policy(
    ap: &AuthorizationPolicy,
    refs: &[&serde_yaml::Value],
    ns: &str,
    name: &str,
    mesh: &Mesh,
    cfg: &LocalConfig,
) -> Result<Translated, Refused> {
    let spec = &ap.spec;
    if spec.selector.is_some() {
        return Err(String::from("spec.selector: selector and targetRef(s) are exclusive").into());
    }
    let action =
        match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => pb::Action::Allow,
            "DENY" => pb::Action::Deny,
            "AUDIT" => pb::Action::Audit,
            "CUSTOM" => return Err(String::from(
                "spec.action: CUSTOM (external authorization) is not supported by Weft's waypoint",
            )
            .into()),
            other => return Err(format!("spec.action: unknown action {other:?}").into()),
        };
    let dry_run = ap
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DRY_RUN_ANNOTATION))
        .is_some_and(|v| v == "true");
    let mut scope = BTreeSet::new();
    let mut services = Vec::new();
    let mut all_services = false;
    let mut by = Vec::new();
    for (i, t) in refs.iter().enumerate() {
        let at = if spec.target_ref.is_some() && i == 0 {
            "spec.targetRef".to_string()
        } else {
            format!(
                "spec.targetRefs[{}]",
                i - usize::from(spec.target_ref.is_some())
            )
        };
        match target(t, ns, &at, mesh, cfg).map_err(Refused::from)? {
            Target::Waypoints(ids) => {
                all_services = true;
                scope.extend(ids);
                by.push(format!(
                    "{} {}",
                    t.get("kind").and_then(|v| v.as_str()).unwrap_or_default(),
                    t.get("name").and_then(|v| v.as_str()).unwrap_or_default()
                ));
            }
            Target::Services(hosts, ids) => {
                by.push(format!("the waypoint of {}", hosts.join(", ")));
                services.extend(hosts);
                scope.extend(ids);
            }
        }
    }
    let mut msg = pb::Authorization {
        name: name.to_string(),
        namespace: ns.to_string(),
        action: action as i32,
        services,
        all_services,
        rules: Vec::new(),
        dry_run: dry_run || action == pb::Action::Audit,
    };
    for (i, r) in spec.rules.iter().enumerate() {
        match rule(r, &format!("spec.rules[{i}]"), ns) {
            Ok(r) => msg.rules.push(r),
            Err((at, why)) => {
                // The targets are known: with no accepted version to keep,
                // it is enforced closed rather than dropped. An ALLOW that
                // matches nothing (what it allows, nothing does) or a DENY
                // of everything; never wider than what was written.
                let closed = match action {
                    _ if msg.dry_run => None,
                    pb::Action::Allow => Some(pb::Authorization {
                        rules: Vec::new(),
                        ..msg
                    }),
                    pb::Action::Deny => Some(pb::Authorization {
                        rules: vec![pb::AuthzRule::default()],
                        ..msg
                    }),
                    _ => None,
                };
                return Err(Refused {
                    message: format!("{at}: {why}"),
                    closed: closed.map(|m| Box::new((m, scope))),
                });
            }
        }
    }
    Ok((msg, scope, by.join(", ")))
}

/// Header values: any text but empty, with Istio's `*` only at an end.
fn header_values(values: &[String], at: &str) -> Result<Vec<String>, Refusal> {
    for (i, v) in values.iter().enumerate() {
        let inner = v.strip_prefix('*').unwrap_or(v);
        let inner = inner.strip_suffix('*').unwrap_or(inner);
        if v.is_empty() || (v != "*" && inner.contains('*')) {
            return Err((
                format!("{at}[{i}]"),
                format!("{v:?}: empty, or a wildcard that is not at the start or the end"),
            ));
        }
    }
    Ok(values.to_vec())
}

/// One rule, checked with the same validators as ztunnel's L4 policies:
/// a value that would be read differently is refused, never widened.
fn rule(r: &crate::policy::RuleSpec, at: &str, ns: &str) -> Result<pb::AuthzRule, Refusal> {
    // Values as the waypoint matches them: validated, principals without
    // `spiffe://`.
    let text = |v: &[String], at: &str, norm: fn(&str) -> &str| -> Result<Vec<String>, Refusal> {
        strings(v, at, norm)?;
        Ok(v.iter().map(|s| norm(s).to_string()).collect())
    };
    let blocks = |v: &[String], at: &str| -> Result<Vec<String>, Refusal> {
        nets(v, at)?;
        Ok(v.to_vec())
    };
    let mut from = Vec::new();
    for (j, f) in r.from.iter().enumerate() {
        let at = format!("{at}.from[{j}].source");
        let s = f
            .source
            .as_ref()
            .ok_or((at.clone(), "is required".into()))?;
        if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
            return Err((
                format!("{at}.requestPrincipals"),
                "JWT is not supported by Weft's waypoint; refusing rather than widening".into(),
            ));
        }
        // serviceAccounts are principals of that account in any trust
        // domain, as in Istio.
        let accounts = |v: &[String], field: &str| -> Result<Vec<String>, Refusal> {
            Ok(service_accounts(v, &format!("{at}.{field}"), ns)?
                .into_iter()
                .map(|m| format!("*/ns/{}/sa/{}", m.namespace, m.service_account))
                .collect())
        };
        let mut principals = text(&s.principals, &format!("{at}.principals"), principal)?;
        principals.extend(accounts(&s.service_accounts, "serviceAccounts")?);
        let mut not_principals =
            text(&s.not_principals, &format!("{at}.notPrincipals"), principal)?;
        not_principals.extend(accounts(&s.not_service_accounts, "notServiceAccounts")?);
        from.push(pb::AuthzSource {
            principals,
            not_principals,
            namespaces: text(&s.namespaces, &format!("{at}.namespaces"), plain)?,
            not_namespaces: text(&s.not_namespaces, &format!("{at}.notNamespaces"), plain)?,
            ip_blocks: blocks(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
            not_ip_blocks: blocks(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
            remote_ip_blocks: blocks(&s.remote_ip_blocks, &format!("{at}.remoteIpBlocks"))?,
            not_remote_ip_blocks: blocks(
                &s.not_remote_ip_blocks,
                &format!("{at}.notRemoteIpBlocks"),
            )?,
        });
    }
    let mut to = Vec::new();
    for (j, t) in r.to.iter().enumerate() {
        let at = format!("{at}.to[{j}].operation");
        let o = t
            .operation
            .as_ref()
            .ok_or((at.clone(), "is required".into()))?;
        ports(&o.ports, &format!("{at}.ports"))?;
        ports(&o.not_ports, &format!("{at}.notPorts"))?;
        to.push(pb::AuthzOperation {
            hosts: text(&o.hosts, &format!("{at}.hosts"), plain)?,
            not_hosts: text(&o.not_hosts, &format!("{at}.notHosts"), plain)?,
            ports: o.ports.clone(),
            not_ports: o.not_ports.clone(),
            methods: text(&o.methods, &format!("{at}.methods"), plain)?,
            not_methods: text(&o.not_methods, &format!("{at}.notMethods"), plain)?,
            paths: text(&o.paths, &format!("{at}.paths"), plain)?,
            not_paths: text(&o.not_paths, &format!("{at}.notPaths"), plain)?,
        });
    }
    let mut when = Vec::new();
    for (j, c) in r.when.iter().enumerate() {
        let at = format!("{at}.when[{j}]");
        if !condition_key_ok(&c.key) {
            return Err((
                format!("{at}.key"),
                format!(
                    "{:?} is not evaluated by Weft's waypoint (request.auth.* and experimental.* are not supported); refusing rather than widening",
                    c.key
                ),
            ));
        }
        if c.values.is_empty() && c.not_values.is_empty() {
            return Err((at, "values or notValues is required".into()));
        }
        let (v, nv) = (format!("{at}.values"), format!("{at}.notValues"));
        let (values, not_values) = match c.key.as_str() {
            "source.ip" | "remote.ip" | "destination.ip" => {
                (blocks(&c.values, &v)?, blocks(&c.not_values, &nv)?)
            }
            "destination.port" => {
                ports(&c.values, &v)?;
                ports(&c.not_values, &nv)?;
                (c.values.clone(), c.not_values.clone())
            }
            "source.principal" => (
                text(&c.values, &v, principal)?,
                text(&c.not_values, &nv, principal)?,
            ),
            "source.namespace" => (
                text(&c.values, &v, plain)?,
                text(&c.not_values, &nv, plain)?,
            ),
            // request.headers[...]: a header value may hold spaces
            // (`Bearer abc`); only the wildcard's place is checked.
            _ => (
                header_values(&c.values, &v)?,
                header_values(&c.not_values, &nv)?,
            ),
        };
        when.push(pb::AuthzCondition {
            key: c.key.clone(),
            values,
            not_values,
        });
    }
    Ok(pb::AuthzRule { from, to, when })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::parse;
    use crate::translate::translate as translate_all;

    const MESH: &str = concat!(
        crate::testdata::shop_with_waypoint!(),
        r#"---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{port: 80}]}
"#
    );

    fn run(policy: &str) -> (Vec<L7Resource>, Vec<String>) {
        let mut snap = Snapshot::default();
        let errors = parse(&format!("{MESH}---\n{policy}"), "test", &mut snap);
        assert!(errors.is_empty(), "{errors:?}");
        let t = translate_all(&snap, &Mesh::default(), None);
        let st = t
            .statuses()
            .filter(|s| s.kind == "AuthorizationPolicy")
            .map(|s| format!("{} {}: {}", s.name, s.reason, s.message))
            .collect();
        (t.l7.resources, st)
    }

    #[test]
    fn targets_and_refusals() {
        let (res, st) = run(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-delete, namespace: shop}\n\
             spec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {methods: [DELETE]}}]}]\n",
        );
        assert_eq!(
            st,
            ["no-delete Accepted: enforced by Gateway waypoint"],
            "one status, the waypoint's"
        );
        let Some(L7Resource::Authorization(name, msg, scope)) = res
            .iter()
            .find(|r| matches!(r, L7Resource::Authorization(..)))
        else {
            panic!("{res:?}")
        };
        assert_eq!(name, "shop/no-delete");
        assert!(msg.all_services);
        assert_eq!(msg.action, pb::Action::Deny as i32);
        assert_eq!(
            scope.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["spiffe://cluster.local/ns/shop/sa/waypoint"]
        );

        let (_, st) = run(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: svc, namespace: shop}\n\
             spec:\n  targetRefs: [{kind: Service, group: \"\", name: web}]\n  rules: [{from: [{source: {serviceAccounts: [client]}}]}]\n",
        );
        assert_eq!(
            st,
            ["svc Accepted: enforced by the waypoint of web.shop.svc.cluster.local"]
        );

        // A ServiceEntry: each of its hosts, through the waypoint it is bound to.
        let entry = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: web, namespace: shop}\n\
             spec: {hosts: [a.example.com, b.example.com], resolution: STATIC, ports: [{number: 80, name: http}], endpoints: [{address: 192.0.2.1}]}\n---\n";
        let (res, st) = run(&format!(
            "{entry}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: se, namespace: shop}}\n\
             spec:\n  targetRefs: [{{kind: ServiceEntry, group: networking.istio.io, name: web}}]\n  action: DENY\n  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]\n",
        ));
        assert_eq!(
            st,
            ["se Accepted: enforced by the waypoint of a.example.com, b.example.com"],
            "the Service of the same name is not one of its hosts"
        );
        let msg = authorization(&res).unwrap();
        assert_eq!(msg.services, ["a.example.com", "b.example.com"]);
        assert!(!msg.all_services);
        let (_, st) = run(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: se, namespace: shop}\n\
             spec:\n  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: nope}]\n",
        );
        assert_eq!(
            st,
            ["se Invalid: spec.targetRefs[0]: no ServiceEntry shop/nope is served"]
        );

        for (rule, want) in [
            (
                "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]",
                "requestPrincipals: JWT is not supported",
            ),
            (
                "rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]",
                "when[0].key",
            ),
            ("action: CUSTOM\n  provider: {name: x}", "CUSTOM"),
            (
                "rules: [{from: [{}]}]",
                "rules[0].from[0].source: is required",
            ),
            (
                "rules: [{to: [{}]}]",
                "rules[0].to[0].operation: is required",
            ),
            (
                "rules: [{when: [{key: source.ip}]}]",
                "when[0]: values or notValues is required",
            ),
            (
                "rules: [{when: [{key: remote.ip, values: [not-an-ip]}]}]",
                "when[0].values[0]",
            ),
            (
                "rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]",
                "from[0].source.ipBlocks[0]",
            ),
            (
                "rules: [{from: [{source: {principals: ['a*b']}}]}]",
                "a wildcard goes only at the start or the end",
            ),
            (
                "rules: [{to: [{operation: {ports: [http]}}]}]",
                "to[0].operation.ports[0]",
            ),
        ] {
            let (res, st) = run(&format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bad, namespace: shop}}\n\
                 spec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  {rule}\n"
            ));
            assert!(
                st.iter()
                    .any(|s| s.starts_with("bad Invalid") && s.contains(want)),
                "{want}: {st:?}"
            );
            // Never widened: with no accepted version to keep, an ALLOW
            // whose rules cannot be read is enforced as one that matches
            // nothing; an action that cannot be enforced at all is left out.
            let enforced = authorization(&res);
            if want == "CUSTOM" {
                assert!(enforced.is_none(), "{want}: {enforced:?}");
            } else {
                let m = enforced.unwrap_or_else(|| panic!("{want}: enforced closed"));
                assert_eq!(m.action, pb::Action::Allow as i32, "{want}");
                assert!(m.rules.is_empty(), "{want}: an ALLOW of nothing");
                assert!(
                    st.iter()
                        .any(|s| s.contains("enforced closed as an ALLOW that matches nothing")),
                    "{want}: {st:?}"
                );
            }
        }
        // A DENY that cannot be read denies everything it targets.
        let (res, st) = run(&format!(
            "{DENY}  rules: [{{when: [{{key: source.ip, values: [not-an-ip]}}]}}]\n"
        ));
        let m = authorization(&res).expect("enforced closed");
        assert_eq!(
            m.rules,
            [pb::AuthzRule::default()],
            "one rule that matches everything"
        );
        assert!(
            st.iter()
                .any(|s| s.contains("enforced closed as a DENY of every request")),
            "{st:?}"
        );
        // Header values may hold spaces.
        let (res, st) = run(&format!(
            "{DENY}  rules: [{{when: [{{key: 'request.headers[authorization]', values: ['Bearer abc*']}}]}}]\n"
        ));
        assert_eq!(st, ["p Accepted: enforced by Gateway waypoint"], "{st:?}");
        assert_eq!(
            authorization(&res).map(|m| m.rules[0].when[0].values.clone()),
            Some(vec!["Bearer abc*".to_string()])
        );
    }

    const DENY: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\n\
        spec:\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]\n  action: DENY\n";

    fn authorization(res: &[L7Resource]) -> Option<&pb::Authorization> {
        res.iter().find_map(|r| match r {
            L7Resource::Authorization(_, m, _) => Some(m),
            _ => None,
        })
    }

    #[test]
    fn values_as_the_waypoint_matches_them() {
        let (res, st) = run(&format!(
            "{DENY}  rules: [{{from: [{{source: {{principals: [spiffe://cluster.local/ns/ops/sa/probe], serviceAccounts: [client]}}}}]}}]\n"
        ));
        assert_eq!(st, ["p Accepted: enforced by Gateway waypoint"]);
        let m = authorization(&res).expect("translated");
        assert_eq!(
            m.rules[0].from[0].principals,
            ["cluster.local/ns/ops/sa/probe", "*/ns/shop/sa/client"],
            "spiffe:// stripped; a service account in any trust domain"
        );
    }

    #[test]
    fn a_refused_policy_keeps_its_last_accepted_version() {
        let translate = |policy: &str, previous| {
            let mut snap = Snapshot::default();
            let errors = parse(&format!("{MESH}---\n{policy}"), "test", &mut snap);
            assert!(errors.is_empty(), "{errors:?}");
            translate_all(&snap, &Mesh::default(), previous)
        };
        let good = translate(
            &format!("{DENY}  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]\n"),
            None,
        );
        let bad = translate(
            &format!("{DENY}  rules: [{{from: [{{source: {{requestPrincipals: ['*']}}}}]}}]\n"),
            Some(&good),
        );
        let kept = authorization(&bad.l7.resources).expect("the DENY stays in force");
        assert_eq!(kept.rules[0].to[0].methods, ["DELETE"]);
        let st: Vec<_> = bad
            .statuses()
            .filter(|s| s.kind == "AuthorizationPolicy")
            .collect();
        assert!(
            st.len() == 1
                && !st[0].accepted
                && st[0]
                    .message
                    .contains("the last accepted version stays in force"),
            "{st:?}"
        );
        let again = translate(
            &format!("{DENY}  rules: [{{from: [{{source: {{requestPrincipals: ['*']}}}}]}}]\n"),
            Some(&bad),
        );
        assert!(
            authorization(&again.l7.resources).is_some(),
            "and after that"
        );
    }
}
