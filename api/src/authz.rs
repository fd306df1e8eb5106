//! L4 authorization in the shape of Istio's `istio.security.Authorization`,
//! and its evaluation for one connection.
//!
//! Semantics follow Istio: a policy's rules are ORed, a rule's clauses ANDed,
//! a clause's matches ORed; within a match the values of one field are ORed,
//! different fields ANDed, and every `not_*` value must miss. Evaluation order
//! is DENY before ALLOW; if any ALLOW policy applies, the default is deny.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::Identity;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Root-namespace policy: every workload in the mesh.
    #[default]
    Global,
    /// Every workload in `namespace`.
    Namespace,
    /// Workloads that list the policy by name.
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// One policy as the data plane enforces it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: Scope,
    pub action: Action,
    /// Evaluated and logged, never enforced (Istio's `istio.io/dry-run`, and AUDIT).
    #[serde(default)]
    pub dry_run: bool,
    /// ORed; a policy with no rules matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Clauses, ANDed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub clauses: Vec<Clause>,
}

/// Matches, ORed; a clause with none matches.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clause {
    pub matches: Vec<Match>,
}

/// Fields ANDed; an empty field is not checked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    /// Matched against the peer identity without `spiffe://`, as Istio does.
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
    /// Istio's `source.serviceAccounts`: the peer identity's namespace and
    /// service account, in any trust domain.
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
}

/// A service account by namespace and name (`istio.security.ServiceAccountMatch`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any value, but there must be one (`*` in Istio's YAML).
    Presence,
}

/// What a policy check knows about a connection.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The peer's verified identity; `None` for plaintext.
    pub source: Option<&'a Identity>,
    pub source_ip: IpAddr,
    pub destination_ip: IpAddr,
    pub destination_port: u16,
}

/// The outcome, naming the policy that decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow {
        /// The ALLOW policy that matched, if any applied.
        policy: Option<String>,
    },
    Deny {
        /// `namespace/name` of the deciding policy; for a default deny, `None`.
        policy: Option<String>,
        reason: DenyReason,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A DENY policy matched.
    DenyMatched,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
    /// The destination references a policy the data plane does not have yet.
    Unavailable,
}

// === impl Authorization ===

/// A connection's attributes as policies compare them, derived once per check.
struct Attrs<'a> {
    conn: &'a Connection<'a>,
    /// The peer identity without `spiffe://`, as Istio matches principals.
    principal: Option<String>,
    namespace: Option<&'a str>,
    identity: Option<&'a Identity>,
}

impl<'a> Attrs<'a> {
    fn new(conn: &'a Connection<'a>) -> Self {
        Attrs {
            conn,
            principal: conn.source.map(|id| {
                let mut s = id.to_string();
                s.replace_range(.."spiffe://".len(), "");
                s
            }),
            namespace: conn.source.map(Identity::namespace),
            identity: conn.source,
        }
    }
}

impl Authorization {
    /// `namespace/name`: the xDS resource name, and how workloads refer to it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the policy applies to a destination workload in `namespace`
    /// that references the selector-scoped policies `selected` (by key).
    pub fn applies_to(&self, namespace: &str, selected: &[String]) -> bool {
        match self.scope {
            Scope::Global => true,
            Scope::Namespace => self.namespace == namespace,
            Scope::WorkloadSelector => selected.contains(&self.key()),
        }
    }

    pub fn matches(&self, conn: &Connection<'_>) -> bool {
        self.matches_attrs(&Attrs::new(conn))
    }

    fn matches_attrs(&self, a: &Attrs<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(a))
    }
}

impl Rule {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        self.clauses.iter().all(|c| c.matches(a))
    }
}

impl Clause {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.matches(a))
    }
}

impl Match {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        let conn = a.conn;
        let principal = a.principal.as_deref();
        let strings =
            |pats: &[StringMatch], value: Option<&str>| pats.iter().any(|p| p.matches(value));
        let nets = |nets: &[IpNet], ip: IpAddr| nets.iter().any(|n| n.contains(&ip));
        let accounts = |accounts: &[ServiceAccountMatch]| {
            a.identity.is_some_and(|id| {
                accounts.iter().any(|m| {
                    m.namespace == id.namespace() && m.service_account == id.service_account()
                })
            })
        };
        let port = conn.destination_port;

        let positive = (self.namespaces.is_empty() || strings(&self.namespaces, a.namespace))
            && (self.principals.is_empty() || strings(&self.principals, principal))
            && (self.source_ips.is_empty() || nets(&self.source_ips, conn.source_ip))
            && (self.destination_ips.is_empty()
                || nets(&self.destination_ips, conn.destination_ip))
            && (self.destination_ports.is_empty() || self.destination_ports.contains(&port))
            && (self.service_accounts.is_empty() || accounts(&self.service_accounts));
        let negative = strings(&self.not_namespaces, a.namespace)
            || strings(&self.not_principals, principal)
            || nets(&self.not_source_ips, conn.source_ip)
            || nets(&self.not_destination_ips, conn.destination_ip)
            || self.not_destination_ports.contains(&port)
            || accounts(&self.not_service_accounts);
        positive && !negative
    }
}

impl StringMatch {
    /// `value` is `None` when the connection has no such attribute (plaintext
    /// has no principal): nothing matches it, not even a suffix `""`.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let Some(v) = value else { return false };
        match self {
            StringMatch::Exact(s) => v == s,
            StringMatch::Prefix(s) => v.starts_with(s.as_str()),
            StringMatch::Suffix(s) => v.ends_with(s.as_str()),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

/// Evaluates the policies that apply to a destination, in Istio's order.
/// The caller passes the policies in scope (global, the destination's
/// namespace, and those its workload selects); dry-run ones are returned in
/// `dry_run_matches` for logging and never change the verdict.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &Connection<'_>,
) -> (Verdict, Vec<String>) {
    let attrs = Attrs::new(conn);
    let mut dry_run_matches = Vec::new();
    let mut allow_seen = false;
    let mut allowed_by = None;
    for p in policies {
        let hit = p.matches_attrs(&attrs);
        if p.dry_run {
            if hit {
                dry_run_matches.push(p.key());
            }
            continue;
        }
        match p.action {
            Action::Deny if hit => {
                return (
                    Verdict::Deny {
                        policy: Some(p.key()),
                        reason: DenyReason::DenyMatched,
                    },
                    dry_run_matches,
                );
            }
            Action::Deny => {}
            Action::Allow => {
                allow_seen = true;
                if hit && allowed_by.is_none() {
                    allowed_by = Some(p.key());
                }
            }
        }
    }
    let verdict = match (allow_seen, allowed_by) {
        (false, _) => Verdict::Allow { policy: None },
        (true, Some(p)) => Verdict::Allow { policy: Some(p) },
        (true, None) => Verdict::Deny {
            policy: None,
            reason: DenyReason::NoAllowMatched,
        },
    };
    (verdict, dry_run_matches)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    fn policy(name: &str, action: Action, m: Match) -> Authorization {
        Authorization {
            name: name.into(),
            namespace: "shop".into(),
            scope: Scope::Namespace,
            action,
            dry_run: false,
            rules: vec![Rule {
                clauses: vec![Clause { matches: vec![m] }],
            }],
        }
    }

    fn conn<'a>(source: Option<&'a Identity>, src: &str, port: u16) -> Connection<'a> {
        Connection {
            source,
            source_ip: src.parse().unwrap(),
            destination_ip: "10.0.2.10".parse().unwrap(),
            destination_port: port,
        }
    }

    fn exact(s: &str) -> StringMatch {
        StringMatch::Exact(s.into())
    }

    /// Every field, positive and negated, with Istio's order of evaluation.
    #[test]
    fn table() {
        let client = id("shop", "client");
        let other = id("web", "other");
        let by_principal = Match {
            principals: vec![exact("cluster.local/ns/shop/sa/client")],
            ..Match::default()
        };
        let by_namespace = Match {
            namespaces: vec![exact("shop")],
            ..Match::default()
        };
        let cidr = Match {
            source_ips: vec!["10.0.1.0/24".parse().unwrap()],
            not_destination_ports: vec![9090],
            ..Match::default()
        };
        let plaintext = Match {
            not_principals: vec![StringMatch::Presence],
            ..Match::default()
        };
        let allow = |m| policy("allow", Action::Allow, m);
        let deny = |m| policy("deny", Action::Deny, m);
        let allowed = |p: Option<&str>| Verdict::Allow {
            policy: p.map(String::from),
        };
        let denied = |p: Option<&str>, reason| Verdict::Deny {
            policy: p.map(String::from),
            reason,
        };
        use DenyReason::*;
        let cases: Vec<(&str, Vec<Authorization>, Connection<'_>, Verdict)> = vec![
            (
                "no policy",
                vec![],
                conn(None, "10.0.1.5", 80),
                allowed(None),
            ),
            (
                "allow by principal",
                vec![allow(by_principal.clone())],
                conn(Some(&client), "10.0.1.5", 80),
                allowed(Some("shop/allow")),
            ),
            (
                "other principal: default deny",
                vec![allow(by_principal.clone())],
                conn(Some(&other), "10.0.1.5", 80),
                denied(None, NoAllowMatched),
            ),
            (
                "plaintext has no principal",
                vec![allow(by_principal.clone())],
                conn(None, "10.0.1.5", 80),
                denied(None, NoAllowMatched),
            ),
            (
                "deny by namespace",
                vec![deny(by_namespace.clone())],
                conn(Some(&client), "10.0.1.5", 80),
                denied(Some("shop/deny"), DenyMatched),
            ),
            (
                "deny wins over allow",
                vec![allow(by_principal.clone()), deny(by_namespace.clone())],
                conn(Some(&client), "10.0.1.5", 80),
                denied(Some("shop/deny"), DenyMatched),
            ),
            (
                "deny for another namespace leaves the default allow",
                vec![deny(by_namespace.clone())],
                conn(Some(&other), "10.0.1.5", 80),
                allowed(None),
            ),
            (
                "cidr and notPorts: in range, other port",
                vec![allow(cidr.clone())],
                conn(None, "10.0.1.9", 80),
                allowed(Some("shop/allow")),
            ),
            (
                "cidr and notPorts: excluded port",
                vec![allow(cidr.clone())],
                conn(None, "10.0.1.9", 9090),
                denied(None, NoAllowMatched),
            ),
            (
                "cidr: out of range",
                vec![allow(cidr)],
                conn(None, "10.0.3.9", 80),
                denied(None, NoAllowMatched),
            ),
            (
                "STRICT: plaintext denied",
                vec![deny(plaintext.clone())],
                conn(None, "10.0.1.9", 80),
                denied(Some("shop/deny"), DenyMatched),
            ),
            (
                "STRICT: mTLS passes",
                vec![deny(plaintext)],
                conn(Some(&client), "10.0.1.9", 80),
                allowed(None),
            ),
            (
                "a policy without rules matches nothing",
                vec![Authorization {
                    rules: vec![],
                    ..allow(Match::default())
                }],
                conn(Some(&client), "10.0.1.9", 80),
                denied(None, NoAllowMatched),
            ),
            (
                "an empty rule matches everything",
                vec![Authorization {
                    rules: vec![Rule::default()],
                    ..allow(Match::default())
                }],
                conn(None, "10.0.1.9", 80),
                allowed(Some("shop/allow")),
            ),
        ];
        for (name, policies, c, want) in cases {
            let (got, _) = evaluate(&policies, &c);
            assert_eq!(got, want, "{name}");
        }
    }

    /// Dry-run policies are reported, never enforced.
    #[test]
    fn dry_run() {
        let p = Authorization {
            dry_run: true,
            ..policy("audit", Action::Deny, Match::default())
        };
        let (v, hits) = evaluate([&p], &conn(None, "10.0.1.1", 80));
        assert_eq!(v, Verdict::Allow { policy: None });
        assert_eq!(hits, vec!["shop/audit".to_string()]);
    }

    #[test]
    fn string_matches() {
        let v = Some("cluster.local/ns/shop/sa/client");
        assert!(StringMatch::Prefix("cluster.local/ns/shop/".into()).matches(v));
        assert!(StringMatch::Suffix("/sa/client".into()).matches(v));
        assert!(!StringMatch::Exact("cluster.local/ns/shop".into()).matches(v));
        assert!(StringMatch::Presence.matches(v));
        assert!(!StringMatch::Presence.matches(None));
        assert!(!StringMatch::Suffix(String::new()).matches(None));
    }

    /// `ServiceAccountMatch` compares namespace and service account in any
    /// trust domain; a peer without an identity matches no account and so
    /// passes the negated list, as in Istio's ztunnel.
    #[test]
    fn service_accounts() {
        let sa = |ns: &str, name: &str| ServiceAccountMatch {
            namespace: ns.into(),
            service_account: name.into(),
        };
        let probe = id("ops", "probe");
        let elsewhere = Identity::new("other.domain", "ops", "probe").unwrap();
        let client = id("shop", "client");
        let only = Match {
            service_accounts: vec![sa("ops", "probe")],
            ..Match::default()
        };
        let not = Match {
            not_service_accounts: vec![sa("ops", "probe")],
            ..Match::default()
        };
        let allow = policy("p", Action::Allow, only);
        let deny_not = policy("n", Action::Allow, not);
        for (who, want_only, want_not) in [
            (Some(&probe), true, false),
            (Some(&elsewhere), true, false),
            (Some(&client), false, true),
            (None, false, true),
        ] {
            let c = conn(who, "10.0.1.5", 80);
            assert_eq!(allow.matches(&c), want_only, "{who:?} in serviceAccounts");
            assert_eq!(
                deny_not.matches(&c),
                want_not,
                "{who:?} in notServiceAccounts"
            );
        }
    }
}
