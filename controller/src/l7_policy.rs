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
use crate::policy::{AuthorizationPolicy, DRY_RUN_ANNOTATION, Status};
use crate::routes::L7Resource;
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
    /// One service, through its waypoint.
    Service(String, BTreeSet<Identity>),
}

fn identities_behind(wp: &Service, cfg: &LocalConfig) -> BTreeSet<Identity> {
    wp.endpoints
        .iter()
        .filter_map(|ep| cfg.workloads.iter().find(|w| w.uid == ep.workload_uid))
        .filter_map(|w| w.identity().ok())
        .collect()
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
            Ok(Target::Waypoints(identities_behind(wp, cfg)))
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
                .flat_map(|wp| identities_behind(wp, cfg))
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
            let r = svc.waypoint.as_ref().ok_or_else(|| {
                format!("{at}: Service {ns}/{name} has no waypoint to enforce it")
            })?;
            let wp = cfg
                .services
                .iter()
                .find(|s| s.namespace == r.namespace && s.hostname == r.hostname)
                .ok_or_else(|| format!("{at}: the waypoint of Service {ns}/{name} is not known"))?;
            Ok(Target::Service(host, identities_behind(wp, cfg)))
        }
        ("networking.istio.io", "ServiceEntry") => {
            Err(format!("{at}: ServiceEntry targets are not supported yet"))
        }
        _ => Err(format!(
            "{at}: {group}/{kind} is not a target a waypoint enforces (Gateway, GatewayClass, Service)"
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

/// Translates every AuthorizationPolicy with targetRefs.
pub fn translate(
    snap: &Snapshot,
    mesh: &Mesh,
    cfg: &LocalConfig,
    out: &mut Vec<L7Resource>,
) -> Vec<Status> {
    let mut statuses = Vec::new();
    for ap in snap.authorization_policies.values() {
        let spec = &ap.spec;
        let refs: Vec<&serde_yaml::Value> =
            spec.target_ref.iter().chain(&spec.target_refs).collect();
        if refs.is_empty() {
            continue;
        }
        let ns = ap
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = ap.metadata.name.clone().unwrap_or_default();
        let status = |accepted, reason, message: String| Status {
            kind: "AuthorizationPolicy",
            namespace: ns.clone(),
            name: name.clone(),
            accepted,
            reason,
            message,
        };
        match policy(ap, &refs, &ns, &name, mesh, cfg) {
            Ok((msg, scope, enforced_by)) => {
                statuses.push(status(
                    true,
                    "Accepted",
                    format!("enforced by {enforced_by}"),
                ));
                out.push(L7Resource::Authorization(
                    format!("{ns}/{name}"),
                    msg,
                    scope,
                ));
            }
            Err(message) => statuses.push(status(false, "Invalid", message)),
        }
    }
    statuses
}

type Translated = (pb::Authorization, BTreeSet<Identity>, String);

fn policy(
    ap: &AuthorizationPolicy,
    refs: &[&serde_yaml::Value],
    ns: &str,
    name: &str,
    mesh: &Mesh,
    cfg: &LocalConfig,
) -> Result<Translated, String> {
    let spec = &ap.spec;
    if spec.selector.is_some() {
        return Err("spec.selector: selector and targetRef(s) are exclusive".into());
    }
    let action =
        match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => pb::Action::Allow,
            "DENY" => pb::Action::Deny,
            "AUDIT" => pb::Action::Audit,
            "CUSTOM" => return Err(
                "spec.action: CUSTOM (external authorization) is not supported by Weft's waypoint"
                    .into(),
            ),
            other => return Err(format!("spec.action: unknown action {other:?}")),
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
        match target(t, ns, &at, mesh, cfg)? {
            Target::Waypoints(ids) => {
                all_services = true;
                scope.extend(ids);
                by.push(format!(
                    "{} {}",
                    t.get("kind").and_then(|v| v.as_str()).unwrap_or_default(),
                    t.get("name").and_then(|v| v.as_str()).unwrap_or_default()
                ));
            }
            Target::Service(host, ids) => {
                services.push(host.clone());
                scope.extend(ids);
                by.push(format!("the waypoint of {host}"));
            }
        }
    }
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        let mut from = Vec::new();
        for (j, f) in r.from.iter().enumerate() {
            let Some(s) = &f.source else { continue };
            if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                return Err(format!(
                    "{at}.from[{j}].source.requestPrincipals: JWT is not supported by Weft's waypoint; refusing rather than widening"
                ));
            }
            // serviceAccounts are principals in the trust domain.
            let principals = s
                .principals
                .iter()
                .cloned()
                .chain(
                    s.service_accounts
                        .iter()
                        .map(|sa| sa_principal(sa, ns, &mesh.trust_domain)),
                )
                .collect();
            let not_principals = s
                .not_principals
                .iter()
                .cloned()
                .chain(
                    s.not_service_accounts
                        .iter()
                        .map(|sa| sa_principal(sa, ns, &mesh.trust_domain)),
                )
                .collect();
            for (k, b) in s
                .ip_blocks
                .iter()
                .chain(&s.not_ip_blocks)
                .chain(&s.remote_ip_blocks)
                .chain(&s.not_remote_ip_blocks)
                .enumerate()
            {
                let ok = b.parse::<ipnet::IpNet>().is_ok() || b.parse::<std::net::IpAddr>().is_ok();
                if !ok {
                    return Err(format!(
                        "{at}.from[{j}].source: ip block {k} {b:?} is not an address or CIDR"
                    ));
                }
            }
            from.push(pb::AuthzSource {
                principals,
                not_principals,
                namespaces: s.namespaces.clone(),
                not_namespaces: s.not_namespaces.clone(),
                ip_blocks: s.ip_blocks.clone(),
                not_ip_blocks: s.not_ip_blocks.clone(),
                remote_ip_blocks: s.remote_ip_blocks.clone(),
                not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
            });
        }
        let to =
            r.to.iter()
                .filter_map(|t| t.operation.as_ref())
                .map(|o| pb::AuthzOperation {
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                    ports: o.ports.clone(),
                    not_ports: o.not_ports.clone(),
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                })
                .collect();
        let mut when = Vec::new();
        for (j, c) in r.when.iter().enumerate() {
            if !condition_key_ok(&c.key) {
                return Err(format!(
                    "{at}.when[{j}].key: {:?} is not evaluated by Weft's waypoint (request.auth.* and experimental.* are not supported); refusing rather than widening",
                    c.key
                ));
            }
            when.push(pb::AuthzCondition {
                key: c.key.clone(),
                values: c.values.clone(),
                not_values: c.not_values.clone(),
            });
        }
        rules.push(pb::AuthzRule { from, to, when });
    }
    let msg = pb::Authorization {
        name: name.to_string(),
        namespace: ns.to_string(),
        action: action as i32,
        services,
        all_services,
        rules,
        dry_run: dry_run || action == pb::Action::Audit,
    };
    Ok((msg, scope, by.join(", ")))
}

/// A `serviceAccounts` entry (`name` or `namespace/name`) as a principal.
fn sa_principal(sa: &str, ns: &str, trust_domain: &str) -> String {
    match sa.split_once('/') {
        Some((n, s)) => format!("{trust_domain}/ns/{n}/sa/{s}"),
        None => format!("{trust_domain}/ns/{ns}/sa/{sa}"),
    }
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
            assert!(
                !res.iter()
                    .any(|r| matches!(r, L7Resource::Authorization(..))),
                "{want}: refused, not widened"
            );
        }
    }
}
