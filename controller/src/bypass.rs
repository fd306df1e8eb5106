//! No silent bypass of L7 policy (beyond Istio): when an L7
//! AuthorizationPolicy is enforced for a service by its waypoint, mesh
//! traffic to that service's endpoints, on the ports the service sends
//! them, is admitted by their ztunnels only from the waypoint. Istio leaves
//! this hole to the operator: a client that dials a pod IP goes around the
//! waypoint and its policy.
//!
//! It is an L4 DENY per service that ztunnel already enforces (and Istio's
//! ztunnel would too): `notPrincipals` the waypoint's identities, on the
//! endpoints' target ports, referenced by each endpoint workload. Headless
//! services have no VIP a waypoint could see and are not published as
//! services, so they are exempt (bind such workloads with `waypoint-for:
//! workload`). `L7_POLICY_WAYPOINT_ONLY=false` on the controller turns it off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use weft_api::authz::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch};
use weft_api::{Identity, LocalConfig};

use crate::routes::{L7Resource, waypoint_scope};

/// Name prefix of the generated policies (one per service).
pub const POLICY_PREFIX: &str = "weft-waypoint-only-";

/// Adds the waypoint-only policies for every service an accepted L7
/// authorization policy covers, and references them from its endpoints.
pub fn waypoint_only(cfg: &mut LocalConfig, l7: &[L7Resource], trust_domain: &str) {
    // Service key → the waypoint identities that must be its only mesh callers.
    let mut guarded: BTreeMap<String, BTreeSet<Identity>> = BTreeMap::new();
    for r in l7 {
        let L7Resource::Authorization(_, policy, scope) = r else {
            continue;
        };
        for svc in &cfg.services {
            let Some(waypoints) = waypoint_scope(svc, cfg, trust_domain) else {
                continue;
            };
            let covered = if policy.all_services {
                !waypoints.is_disjoint(scope)
            } else {
                policy.services.contains(&svc.hostname)
            };
            if covered && !waypoints.is_empty() {
                guarded
                    .entry(format!("{}/{}", svc.namespace, svc.name))
                    .or_default()
                    .extend(waypoints);
            }
        }
    }
    let mut policies = Vec::new();
    let mut references: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for svc in &cfg.services {
        let Some(waypoints) = guarded.get(&format!("{}/{}", svc.namespace, svc.name)) else {
            continue;
        };
        if svc.vips.is_empty() {
            continue;
        }
        let ports: BTreeSet<u16> = svc
            .endpoints
            .iter()
            .flat_map(|ep| ep.ports.values().copied())
            .collect();
        let policy = Authorization {
            name: format!("{POLICY_PREFIX}{}", svc.name),
            namespace: svc.namespace.clone(),
            scope: Scope::WorkloadSelector,
            action: Action::Deny,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause {
                    matches: vec![Match {
                        not_principals: waypoints
                            .iter()
                            .map(|id| {
                                StringMatch::Exact(format!(
                                    "{}/ns/{}/sa/{}",
                                    id.trust_domain(),
                                    id.namespace(),
                                    id.service_account()
                                ))
                            })
                            .collect(),
                        destination_ports: ports.into_iter().collect(),
                        ..Match::default()
                    }],
                }],
            }],
        };
        for ep in &svc.endpoints {
            references
                .entry(ep.workload_uid.clone())
                .or_default()
                .push(policy.key());
        }
        policies.push(policy);
    }
    for w in &mut cfg.workloads {
        if let Some(keys) = references.remove(&w.uid) {
            let w = Arc::make_mut(w);
            w.authorization_policies.extend(keys);
            w.authorization_policies.sort();
            w.authorization_policies.dedup();
        }
    }
    cfg.policies.extend(policies);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Snapshot;
    use crate::manifests::parse;
    use crate::translate::{Mesh, translate};

    const MESH: &str = concat!(
        crate::testdata::shop_with_waypoint!(),
        r#"---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: app}]}
status: {podIP: 10.244.2.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"#
    );

    const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
"#;

    fn run(yaml: &str, mesh: &Mesh) -> LocalConfig {
        let mut snap = Snapshot::default();
        assert!(parse(yaml, "t", &mut snap).is_empty());
        translate(&snap, mesh, None).config
    }

    #[test]
    fn endpoints_admit_only_the_waypoint() {
        let cfg = run(&format!("{MESH}---{POLICY}"), &Mesh::default());
        let p = cfg
            .policies
            .iter()
            .find(|p| p.name == "weft-waypoint-only-web")
            .expect("generated");
        assert_eq!(p.action, Action::Deny);
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.not_principals,
            [StringMatch::Exact(
                "cluster.local/ns/shop/sa/waypoint".into()
            )]
        );
        assert_eq!(m.destination_ports, [8080], "the endpoints' target port");
        let web = cfg.workloads.iter().find(|w| w.name == "web-0").unwrap();
        assert!(
            web.authorization_policies
                .contains(&"shop/weft-waypoint-only-web".to_string())
        );
        let wp = cfg
            .workloads
            .iter()
            .find(|w| w.name == "waypoint-0")
            .unwrap();
        assert!(wp.authorization_policies.is_empty());

        // Without an L7 policy: nothing; with the switch off: nothing.
        assert!(
            !run(MESH, &Mesh::default())
                .policies
                .iter()
                .any(|p| p.name.starts_with(POLICY_PREFIX))
        );
        let off = Mesh {
            l7_policy_waypoint_only: false,
            ..Mesh::default()
        };
        assert!(
            !run(&format!("{MESH}---{POLICY}"), &off)
                .policies
                .iter()
                .any(|p| p.name.starts_with(POLICY_PREFIX))
        );
    }
}
