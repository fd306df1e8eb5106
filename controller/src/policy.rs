//! Istio's security resources as users write them (`security.istio.io` v1 and
//! v1beta1 `AuthorizationPolicy` and `PeerAuthentication`), and their
//! translation into the L4 policies ztunnel enforces.
//!
//! The semantics are Istio's for ambient mode:
//! - a policy without `selector` applies to its namespace, or to the whole mesh
//!   in the root namespace; with one, to the workloads it selects (in every
//!   namespace when it lives in the root namespace);
//! - ztunnel sees no HTTP: a rule naming HTTP attributes never matches in an
//!   ALLOW policy, and in a DENY policy matches on its L4 attributes alone
//!   (both deny more than written, never less), and the status says so;
//! - PeerAuthentication resolves per workload (workload over namespace over
//!   mesh; `UNSET` inherits), and STRICT becomes a DENY of connections without
//!   a peer identity, with port-level exceptions.
//!
//! A resource that cannot be translated is reported with its field and left
//! out; if an earlier version was accepted, that version stays in force.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use weft_api::authz::{
    Action, Authorization, Clause, Match, Rule, Scope, ServiceAccountMatch, StringMatch,
};

use crate::Snapshot;
use crate::translate::{Mesh, TranslateError, names};

/// The policy every workload whose effective PeerAuthentication is STRICT on
/// all ports references (in the root namespace; Istio's name).
pub const STATIC_STRICT: &str = "istio_converted_static_strict";
/// Name prefix of a workload PeerAuthentication with port-level modes, as converted.
pub const CONVERTED_PEER_AUTHN: &str = "converted_peer_authentication_";
/// `"true"` makes a policy dry-run: evaluated and logged, never enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// `security.istio.io` AuthorizationPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AuthorizationPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
}

/// Unknown fields are refused: a misspelt field silently ignored would make a
/// policy allow more, or deny less, than its author wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    /// Attaches the policy to a waypoint or gateway, not to ztunnel.
    pub target_ref: Option<serde_yaml::Value>,
    pub target_refs: Vec<serde_yaml::Value>,
    pub action: Option<String>,
    /// For CUSTOM (external authorization).
    pub provider: Option<serde_yaml::Value>,
    pub rules: Vec<RuleSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct WorkloadSelector {
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RuleSpec {
    pub from: Vec<From>,
    pub to: Vec<To>,
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct From {
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct To {
    pub operation: Option<Operation>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    pub ip_blocks: Vec<String>,
    pub not_ip_blocks: Vec<String>,
    pub remote_ip_blocks: Vec<String>,
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<String>,
    pub not_ports: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// `security.istio.io` PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerAuthentication {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<WorkloadSelector>,
    pub mtls: Option<MutualTls>,
    /// Port number (as YAML writes it, a number or a string) → mode.
    pub port_level_mtls: BTreeMap<PortKey, MutualTls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MutualTls {
    pub mode: Option<String>,
}

/// A `portLevelMtls` key: `8080:` and `"8080":` both occur in the wild.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortKey {
    Number(i64),
    Text(String),
}

/// How a translated resource fared: what goes in its status condition
/// (`Accepted`) and the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub accepted: bool,
    /// `Accepted`, `UnsupportedValue` (accepted, enforced differently than
    /// written), `Invalid` (refused).
    pub reason: &'static str,
    pub message: String,
    /// Istio's own condition type for it, written beside ours so Istio's
    /// tooling reads it: `ZtunnelAccepted` (an L4 policy), `WaypointAccepted`
    /// (a waypoint policy), `istio.io/WaypointBound` (a Service's binding,
    /// then the only condition written); empty for none.
    pub condition: &'static str,
}

/// Istio's condition types.
pub const ZTUNNEL_ACCEPTED: &str = "ZtunnelAccepted";
pub const WAYPOINT_ACCEPTED: &str = "WaypointAccepted";
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";

/// Mutual TLS mode, as PeerAuthentication writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Unset,
    Disable,
    Permissive,
    Strict,
}

/// A PeerAuthentication, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerAuthn {
    namespace: String,
    name: String,
    selector: Option<BTreeMap<String, String>>,
    mode: Mode,
    ports: BTreeMap<u16, Mode>,
    /// Istio's tie-break between policies of one scope: the oldest wins
    /// (then the name, for manifests without timestamps).
    order: (String, String),
}

/// Where a selector-scoped policy applies.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Selection {
    key: String,
    /// `None`: every namespace (a policy in the root namespace).
    namespace: Option<String>,
    labels: BTreeMap<String, String>,
}

/// The translated policies, and what each workload references.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    /// Every policy ztunnel gets, by key (`namespace/name`).
    pub authorizations: BTreeMap<String, Authorization>,
    pub statuses: Vec<Status>,
    pub errors: Vec<TranslateError>,
    selections: Vec<Selection>,
    peer_authns: BTreeMap<String, PeerAuthn>,
    root_namespace: String,
}

// === impl Policies ===

impl Policies {
    /// The selector-scoped policies a workload in `namespace` with `labels`
    /// references, in key order (what goes in `Workload.authorization_policies`).
    pub fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let mut keys: BTreeSet<String> = self
            .selections
            .iter()
            .filter(|s| s.namespace.as_deref().is_none_or(|ns| ns == namespace))
            .filter(|s| s.labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .map(|s| s.key.clone())
            .collect();
        keys.extend(self.peer_authn_keys(namespace, labels));
        keys.into_iter().collect()
    }

    /// Whether every workload references the same policies under `other`
    /// as under these: the same selectors, PeerAuthentications and root.
    pub fn selects_like(&self, other: &Policies) -> bool {
        self.selections == other.selections
            && self.peer_authns == other.peer_authns
            && self.root_namespace == other.root_namespace
    }

    /// `root/istio_converted_static_strict`.
    pub fn static_strict_key(&self) -> String {
        format!("{}/{STATIC_STRICT}", self.root_namespace)
    }

    /// The converted PeerAuthentication policies a workload references.
    fn peer_authn_keys(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<String> {
        let root = &self.root_namespace;
        let workload = self
            .peer_authns
            .values()
            .filter(|p| {
                p.namespace == namespace
                    && *root != namespace
                    && p.selector
                        .as_ref()
                        .is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
            })
            .min_by(|a, b| a.order.cmp(&b.order));
        let inherited = self.inherited_mode(namespace);
        let base = match workload {
            Some(w) if w.mode != Mode::Unset => w.mode,
            _ => inherited,
        };
        match workload {
            Some(w) if !differing_ports(w, base).is_empty() => {
                vec![format!("{}/{CONVERTED_PEER_AUTHN}{}", w.namespace, w.name)]
            }
            _ if base == Mode::Strict => vec![self.static_strict_key()],
            _ => vec![],
        }
    }

    /// The inherited (namespace, then mesh) mode for workloads in `namespace`.
    fn inherited_mode(&self, namespace: &str) -> Mode {
        let root = &self.root_namespace;
        let pick = |ns: &str| {
            self.peer_authns
                .values()
                .filter(|p| p.namespace == ns && p.selector.is_none())
                .min_by(|a, b| a.order.cmp(&b.order))
                .map(|p| p.mode)
        };
        let ns_mode = if namespace == root {
            None
        } else {
            pick(namespace)
        };
        [ns_mode, pick(root)]
            .into_iter()
            .flatten()
            .find(|m| *m != Mode::Unset)
            .unwrap_or(Mode::Permissive)
    }
}

/// The ports of a workload PeerAuthentication whose effective mode differs
/// from `base` in strictness.
fn differing_ports(p: &PeerAuthn, base: Mode) -> Vec<u16> {
    let strict = |m: Mode| m == Mode::Strict;
    let effective = |m: Mode| if m == Mode::Unset { base } else { m };
    p.ports
        .iter()
        .filter(|(_, m)| strict(effective(**m)) != strict(base))
        .map(|(port, _)| *port)
        .collect()
}

/// A workload PeerAuthentication with port-level modes, as one DENY policy:
/// connections without a peer identity are denied on the ports whose
/// effective mode is STRICT. `None` when no port differs from `base`.
fn converted_peer_authn(p: &PeerAuthn, base: Mode) -> Option<Authorization> {
    let differing = differing_ports(p, base);
    if differing.is_empty() {
        return None;
    }
    let mut ports = Match::default();
    if base == Mode::Strict {
        ports.not_destination_ports = differing;
    } else {
        ports.destination_ports = differing;
    }
    Some(deny_without_principal(
        &format!("{CONVERTED_PEER_AUTHN}{}", p.name),
        &p.namespace,
        ports,
    ))
}

/// A selector-scoped DENY of connections without a peer identity that also
/// match `m`: how STRICT mTLS is enforced.
fn deny_without_principal(name: &str, namespace: &str, m: Match) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: Scope::WorkloadSelector,
        action: Action::Deny,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause {
                matches: vec![Match {
                    not_principals: vec![StringMatch::Presence],
                    ..m
                }],
            }],
        }],
    }
}

/// Translates every AuthorizationPolicy and PeerAuthentication in `snap`.
/// `previous` is the last translation: a policy that no longer translates
/// keeps its last accepted version.
pub fn translate(snap: &Snapshot, mesh: &Mesh, previous: Option<&Policies>) -> Policies {
    let mut out = Policies {
        root_namespace: mesh.root_namespace.clone(),
        ..Policies::default()
    };
    out.authorizations.insert(
        out.static_strict_key(),
        deny_without_principal(STATIC_STRICT, &mesh.root_namespace, Match::default()),
    );

    for (key, ap) in &snap.authorization_policies {
        let (namespace, name) = names(&ap.metadata);
        let mut status = |accepted, reason, message: String| {
            out.statuses.push(Status {
                kind: "AuthorizationPolicy",
                namespace: namespace.clone(),
                name: name.clone(),
                accepted,
                reason,
                message,
                condition: ZTUNNEL_ACCEPTED,
            });
        };
        let selection = |selector: &Option<WorkloadSelector>| {
            selector.as_ref().map(|s| Selection {
                key: key.clone(),
                namespace: (namespace != mesh.root_namespace).then(|| namespace.clone()),
                labels: s.match_labels.clone(),
            })
        };
        match authorization(ap, mesh) {
            Ok(Translated::Policy(auth, warning)) => {
                match warning {
                    Some(w) => status(true, "UnsupportedValue", w),
                    None => status(true, "Accepted", "enforced by ztunnel".into()),
                }
                out.selections.extend(selection(&ap.spec.selector));
                out.authorizations.insert(key.clone(), auth);
            }
            Ok(Translated::NotForZtunnel(why)) => status(true, "Accepted", why),
            Ok(Translated::Unsupported(why)) => status(false, "UnsupportedValue", why),
            Err(refusal) => {
                let kept = previous.and_then(|p| p.authorizations.get(key));
                let (status, error) = refused(
                    "AuthorizationPolicy",
                    &namespace,
                    &name,
                    refusal,
                    kept.is_some(),
                );
                out.statuses.push(status);
                out.errors.push(error);
                // The kept version applies where it applied: its own
                // selector, not the refused version's.
                if let (Some(auth), Some(previous)) = (kept, previous) {
                    let kept_selection = previous.selections.iter().filter(|s| s.key == *key);
                    out.selections.extend(kept_selection.cloned());
                    out.authorizations.insert(key.clone(), auth.clone());
                }
            }
        }
    }

    for (key, pa) in &snap.peer_authentications {
        let (namespace, name) = names(&pa.metadata);
        match peer_authn(pa) {
            Ok(p) => {
                out.statuses.push(Status {
                    kind: "PeerAuthentication",
                    namespace: namespace.clone(),
                    name: name.clone(),
                    accepted: true,
                    reason: "Accepted",
                    message: "enforced by ztunnel".into(),
                    condition: "",
                });
                out.peer_authns.insert(key.clone(), p);
            }
            Err(refusal) => {
                let kept = previous.and_then(|p| p.peer_authns.get(key));
                let (status, error) = refused(
                    "PeerAuthentication",
                    &namespace,
                    &name,
                    refusal,
                    kept.is_some(),
                );
                out.statuses.push(status);
                out.errors.push(error);
                if let Some(p) = kept {
                    out.peer_authns.insert(key.clone(), p.clone());
                }
            }
        }
    }
    let converted: Vec<Authorization> = out
        .peer_authns
        .values()
        .filter(|p| p.selector.is_some())
        .filter_map(|p| {
            let base = match p.mode {
                Mode::Unset => out.inherited_mode(&p.namespace),
                m => m,
            };
            converted_peer_authn(p, base)
        })
        .collect();
    for a in converted {
        out.authorizations.insert(a.key(), a);
    }
    out
}

/// The status and the error of a resource refused at a field; `kept` says
/// whether its last accepted version stays in force.
fn refused(
    kind: &'static str,
    namespace: &str,
    name: &str,
    (field, message): Refusal,
    kept: bool,
) -> (Status, TranslateError) {
    let suffix = if kept {
        "; the last accepted version stays in force"
    } else {
        ""
    };
    let status = Status {
        kind,
        namespace: namespace.into(),
        name: name.into(),
        accepted: false,
        reason: "Invalid",
        message: format!("{field}: {message}{suffix}"),
        condition: if kind == "AuthorizationPolicy" {
            ZTUNNEL_ACCEPTED
        } else {
            ""
        },
    };
    let error = TranslateError {
        kind,
        namespace: namespace.into(),
        name: name.into(),
        field,
        message,
    };
    (status, error)
}

/// A refusal: the field (a path into the resource) and why.
pub(crate) type Refusal = (String, String);

enum Translated {
    /// Enforced by ztunnel; with a warning for the status when it enforces
    /// differently than written.
    Policy(Authorization, Option<String>),
    /// Valid, but not ztunnel's to enforce (attached to a waypoint or gateway).
    NotForZtunnel(String),
    /// Valid Istio, but ztunnel cannot enforce it at all.
    Unsupported(String),
}

fn authorization(ap: &AuthorizationPolicy, mesh: &Mesh) -> Result<Translated, Refusal> {
    let (namespace, name) = names(&ap.metadata);
    let spec = &ap.spec;
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        // Evaluated and logged on a match, never enforced.
        "AUDIT" => Action::Deny,
        "CUSTOM" => {
            return Ok(Translated::Unsupported(
                "ztunnel does not enforce the CUSTOM action (external authorization); it needs a waypoint".into(),
            ));
        }
        other => {
            return Err((
                "spec.action".into(),
                format!("unknown action {other:?}: want ALLOW, DENY, AUDIT or CUSTOM"),
            ));
        }
    };
    if spec.provider.is_some() && spec.action.as_deref() != Some("CUSTOM") {
        return Err((
            "spec.provider".into(),
            "only a CUSTOM policy names a provider".into(),
        ));
    }
    if spec.target_ref.is_some() || !spec.target_refs.is_empty() {
        if spec.selector.is_some() {
            return Err((
                "spec.selector".into(),
                "selector and targetRef(s) are exclusive".into(),
            ));
        }
        return Ok(Translated::NotForZtunnel(
            "attached by targetRef(s) to a waypoint or gateway; ztunnel does not enforce it".into(),
        ));
    }
    let dry_run = spec.action.as_deref() == Some("AUDIT")
        || ap
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DRY_RUN_ANNOTATION))
            .is_some_and(|v| v == "true");
    let scope = match &spec.selector {
        Some(_) => Scope::WorkloadSelector,
        None if namespace == mesh.root_namespace => Scope::Global,
        None => Scope::Namespace,
    };
    let mut l7 = BTreeSet::new();
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let (rule, found) = rule(r, &format!("spec.rules[{i}]"), &namespace)?;
        // An ALLOW rule ztunnel cannot check fully never matches; a DENY rule
        // is checked on its L4 attributes alone. Either way, more is denied.
        if found.is_empty() || action == Action::Deny {
            rules.push(rule);
        }
        l7.extend(found);
    }
    let warning = (!l7.is_empty()).then(|| {
        let found = l7.into_iter().collect::<Vec<_>>().join(", ");
        let effect = if action == Action::Allow {
            "In an ALLOW policy the rules that use them never match"
        } else {
            "In a DENY policy they are ignored and the rules deny on their other attributes alone"
        };
        format!(
            "ztunnel cannot check HTTP attributes ({found}); a waypoint is needed to enforce them. {effect}, so this policy denies more than it says."
        )
    });
    Ok(Translated::Policy(
        Authorization {
            name,
            namespace,
            scope,
            action,
            dry_run,
            rules,
        },
        warning,
    ))
}

/// One rule: its `from` entries ORed, its `to` entries ORed, each `when`
/// condition on its own, all ANDed. Returns the HTTP attributes it names.
fn rule(r: &RuleSpec, at: &str, namespace: &str) -> Result<(Rule, Vec<String>), Refusal> {
    let mut l7 = Vec::new();
    let mut clauses = Vec::new();
    if !r.from.is_empty() {
        let mut matches = Vec::new();
        for (j, f) in r.from.iter().enumerate() {
            let at = format!("{at}.from[{j}].source");
            let s = f
                .source
                .as_ref()
                .ok_or((at.clone(), "is required".into()))?;
            matches.push(source(s, &at, namespace, &mut l7)?);
        }
        clauses.push(Clause { matches });
    }
    if !r.to.is_empty() {
        let mut matches = Vec::new();
        for (j, t) in r.to.iter().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            let op = t
                .operation
                .as_ref()
                .ok_or((at.clone(), "is required".into()))?;
            for (field, values) in [
                ("hosts", &op.hosts),
                ("notHosts", &op.not_hosts),
                ("methods", &op.methods),
                ("notMethods", &op.not_methods),
                ("paths", &op.paths),
                ("notPaths", &op.not_paths),
            ] {
                if !values.is_empty() {
                    l7.push(field.to_string());
                }
            }
            matches.push(Match {
                destination_ports: ports(&op.ports, &format!("{at}.ports"))?,
                not_destination_ports: ports(&op.not_ports, &format!("{at}.notPorts"))?,
                ..Match::default()
            });
        }
        clauses.push(Clause { matches });
    }
    for (j, c) in r.when.iter().enumerate() {
        let at = format!("{at}.when[{j}]");
        if let Some(m) = condition(c, &at, &mut l7)? {
            clauses.push(Clause { matches: vec![m] });
        }
    }
    Ok((Rule { clauses }, l7))
}

fn source(s: &Source, at: &str, namespace: &str, l7: &mut Vec<String>) -> Result<Match, Refusal> {
    for (field, values) in [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        if !values.is_empty() {
            l7.push(field.to_string());
        }
    }
    let mut principals = strings(&s.principals, &format!("{at}.principals"), principal)?;
    let mut not_principals = strings(&s.not_principals, &format!("{at}.notPrincipals"), principal)?;
    let accounts = service_accounts(
        &s.service_accounts,
        &format!("{at}.serviceAccounts"),
        namespace,
    )?;
    let not_accounts = service_accounts(
        &s.not_service_accounts,
        &format!("{at}.notServiceAccounts"),
        namespace,
    )?;
    // A ztunnel that predates fields 11 and 12 (Weft's before them, older
    // Istio) skips them, which would widen an ALLOW. So the accounts also go
    // as principal suffixes, which every ztunnel understands, wherever that
    // means the same: the negatives always (ORed either way), the positives
    // when no principals are given (else they would be ORed with them).
    let as_principal = |m: &ServiceAccountMatch| {
        StringMatch::Suffix(format!("/ns/{}/sa/{}", m.namespace, m.service_account))
    };
    not_principals.extend(not_accounts.iter().map(as_principal));
    if principals.is_empty() {
        principals.extend(accounts.iter().map(as_principal));
    }
    Ok(Match {
        principals,
        not_principals,
        service_accounts: accounts,
        not_service_accounts: not_accounts,
        namespaces: strings(&s.namespaces, &format!("{at}.namespaces"), plain)?,
        not_namespaces: strings(&s.not_namespaces, &format!("{at}.notNamespaces"), plain)?,
        source_ips: nets(&s.ip_blocks, &format!("{at}.ipBlocks"))?,
        not_source_ips: nets(&s.not_ip_blocks, &format!("{at}.notIpBlocks"))?,
        ..Match::default()
    })
}

/// The L4 `when` keys; anything else that Istio knows is HTTP.
fn condition(c: &Condition, at: &str, l7: &mut Vec<String>) -> Result<Option<Match>, Refusal> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err((at.into(), "values or notValues is required".into()));
    }
    let (v, nv) = (format!("{at}.values"), format!("{at}.notValues"));
    let m = match c.key.as_str() {
        "source.ip" => Match {
            source_ips: nets(&c.values, &v)?,
            not_source_ips: nets(&c.not_values, &nv)?,
            ..Match::default()
        },
        "destination.ip" => Match {
            destination_ips: nets(&c.values, &v)?,
            not_destination_ips: nets(&c.not_values, &nv)?,
            ..Match::default()
        },
        "destination.port" => Match {
            destination_ports: ports(&c.values, &v)?,
            not_destination_ports: ports(&c.not_values, &nv)?,
            ..Match::default()
        },
        "source.namespace" => Match {
            namespaces: strings(&c.values, &v, plain)?,
            not_namespaces: strings(&c.not_values, &nv, plain)?,
            ..Match::default()
        },
        "source.principal" => Match {
            principals: strings(&c.values, &v, principal)?,
            not_principals: strings(&c.not_values, &nv, principal)?,
            ..Match::default()
        },
        k if k == "remote.ip"
            || k == "connection.sni"
            || k.starts_with("request.")
            || k.starts_with("experimental.envoy.filters.") =>
        {
            l7.push(k.to_string());
            return Ok(None);
        }
        "" => return Err((format!("{at}.key"), "is required".into())),
        k => {
            return Err((
                format!("{at}.key"),
                format!(
                    "unknown attribute {k:?}: ztunnel checks source.ip, source.namespace, source.principal, destination.ip and destination.port"
                ),
            ));
        }
    };
    Ok(Some(m))
}

/// Istio's string syntax: `*` (any value present), `prefix*`, `*suffix`, or exact.
pub(crate) fn strings(
    values: &[String],
    at: &str,
    normalize: fn(&str) -> &str,
) -> Result<Vec<StringMatch>, Refusal> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let at = format!("{at}[{i}]");
            let v = normalize(v);
            if v.is_empty() || v.chars().any(char::is_whitespace) {
                return Err((at, format!("{v:?}: empty or contains whitespace")));
            }
            if v == "*" {
                return Ok(StringMatch::Presence);
            }
            let (body, m): (&str, fn(String) -> StringMatch) = if let Some(s) = v.strip_prefix('*')
            {
                (s, StringMatch::Suffix)
            } else if let Some(s) = v.strip_suffix('*') {
                (s, StringMatch::Prefix)
            } else {
                (v, StringMatch::Exact)
            };
            if body.contains('*') {
                return Err((
                    at,
                    format!("{v:?}: a wildcard goes only at the start or the end"),
                ));
            }
            Ok(m(body.to_string()))
        })
        .collect()
}

pub(crate) fn plain(v: &str) -> &str {
    v
}

/// Principals are written without `spiffe://`; a full SPIFFE ID means the same.
pub(crate) fn principal(v: &str) -> &str {
    v.strip_prefix("spiffe://").unwrap_or(v)
}

/// `namespace/name`, or `name` in the policy's namespace; matched in any trust
/// domain, and sent as istiod sends them (`ServiceAccountMatch`).
pub(crate) fn service_accounts(
    values: &[String],
    at: &str,
    namespace: &str,
) -> Result<Vec<ServiceAccountMatch>, Refusal> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (ns, sa) = v.split_once('/').unwrap_or((namespace, v));
            let ok = |s: &str| {
                !s.is_empty() && !s.contains(['/', '*']) && !s.contains(char::is_whitespace)
            };
            if !ok(ns) || !ok(sa) {
                return Err((
                    format!("{at}[{i}]"),
                    format!("{v:?}: want `name` or `namespace/name`"),
                ));
            }
            Ok(ServiceAccountMatch {
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            })
        })
        .collect()
}

pub(crate) fn nets(values: &[String], at: &str) -> Result<Vec<IpNet>, Refusal> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    (
                        format!("{at}[{i}]"),
                        format!("{v:?} is not an IP address or CIDR block"),
                    )
                })
        })
        .collect()
}

pub(crate) fn ports(values: &[String], at: &str) -> Result<Vec<u16>, Refusal> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            port(v).ok_or_else(|| {
                (
                    format!("{at}[{i}]"),
                    format!("{v:?} is not a port in 1-65535"),
                )
            })
        })
        .collect()
}

fn port(v: &str) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| *p != 0)
}

fn mode(m: Option<&MutualTls>, at: &str) -> Result<Mode, Refusal> {
    match m.and_then(|m| m.mode.as_deref()).unwrap_or("UNSET") {
        "UNSET" => Ok(Mode::Unset),
        "DISABLE" => Ok(Mode::Disable),
        "PERMISSIVE" => Ok(Mode::Permissive),
        "STRICT" => Ok(Mode::Strict),
        other => Err((
            at.into(),
            format!("unknown mode {other:?}: want UNSET, DISABLE, PERMISSIVE or STRICT"),
        )),
    }
}

fn peer_authn(pa: &PeerAuthentication) -> Result<PeerAuthn, Refusal> {
    let (namespace, name) = names(&pa.metadata);
    let spec = &pa.spec;
    let selector = spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty());
    if !spec.port_level_mtls.is_empty() && selector.is_none() {
        return Err((
            "spec.portLevelMtls".into(),
            "needs a selector: port-level modes apply to selected workloads only".into(),
        ));
    }
    let mut ports = BTreeMap::new();
    for (k, m) in &spec.port_level_mtls {
        let text = match k {
            PortKey::Number(n) => n.to_string(),
            PortKey::Text(s) => s.clone(),
        };
        let at = format!("spec.portLevelMtls[{text}]");
        let p = port(&text)
            .ok_or_else(|| (at.clone(), format!("{text:?} is not a port in 1-65535")))?;
        ports.insert(p, mode(Some(m), &format!("{at}.mode"))?);
    }
    let created = pa
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    Ok(PeerAuthn {
        mode: mode(spec.mtls.as_ref(), "spec.mtls.mode")?,
        namespace,
        order: (created, name.clone()),
        name,
        selector,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use weft_api::authz::{Connection, DenyReason, Verdict, evaluate};
    use weft_api::{Identity, LocalConfig};

    use super::*;
    use crate::manifests::parse;
    use crate::translate::{self, Translation};

    const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: app}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, serviceAccountName: db, containers: [{name: app}]}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: ops, labels: {app: probe}}
spec: {nodeName: n2, serviceAccountName: probe, containers: [{name: app}]}
status: {podIP: 10.244.2.10}
"#;

    fn run(yaml: &str, previous: Option<&Translation>) -> Translation {
        let mut snap = Snapshot::default();
        let errs = parse(&format!("{PODS}\n---\n{yaml}"), "t.yaml", &mut snap);
        assert!(errs.is_empty(), "{errs:?}");
        translate::translate(&snap, &Mesh::default(), previous)
    }

    fn id(ns: &str, sa: &str) -> Identity {
        Identity::new("cluster.local", ns, sa).unwrap()
    }

    /// The verdict for a connection to `pod` (`namespace/name`), with the
    /// policies in scope chosen as ztunnel chooses them.
    fn verdict(
        cfg: &LocalConfig,
        pod: &str,
        src: Option<&Identity>,
        src_ip: &str,
        port: u16,
    ) -> Verdict {
        let (ns, name) = pod.split_once('/').unwrap();
        let w = cfg
            .workloads
            .iter()
            .find(|w| w.namespace == ns && w.name == name)
            .unwrap();
        let scope = cfg
            .policies
            .iter()
            .filter(|p| p.applies_to(&w.namespace, &w.authorization_policies));
        let conn = Connection {
            source: src,
            source_ip: src_ip.parse().unwrap(),
            destination_ip: w.addresses[0],
            destination_port: port,
        };
        evaluate(scope, &conn).0
    }

    fn allowed(v: &Verdict) -> bool {
        matches!(v, Verdict::Allow { .. })
    }

    /// Every L4 field of a policy, written as users write it, decides as Istio
    /// decides: by principal, namespace, service account, CIDR, port, `when`,
    /// negations, scopes (selector, namespace, root namespace).
    #[test]
    fn authorization_table() {
        let client = id("shop", "client");
        let db = id("shop", "db");
        let probe = id("ops", "probe");
        type Case<'a> = (&'a str, &'a str, Option<&'a Identity>, &'a str, u16, bool);
        let cases: Vec<(&str, &str, Vec<Case<'_>>)> = vec![
            (
                "ALLOW by principal, selector-scoped",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]}]
"#,
                vec![
                    (
                        "shop/web-1",
                        "client allowed",
                        Some(&client),
                        "10.0.0.1",
                        80,
                        true,
                    ),
                    (
                        "shop/web-1",
                        "probe denied",
                        Some(&probe),
                        "10.0.0.1",
                        80,
                        false,
                    ),
                    (
                        "shop/web-1",
                        "plaintext denied",
                        None,
                        "10.0.0.1",
                        80,
                        false,
                    ),
                    (
                        "shop/db-1",
                        "not selected",
                        Some(&probe),
                        "10.0.0.1",
                        80,
                        true,
                    ),
                ],
            ),
            (
                "DENY by namespace, namespace-wide (v1beta1)",
                r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["ops"]}}]}]
"#,
                vec![
                    (
                        "shop/web-1",
                        "ops denied",
                        Some(&probe),
                        "10.0.0.1",
                        80,
                        false,
                    ),
                    (
                        "shop/db-1",
                        "ops denied",
                        Some(&probe),
                        "10.0.0.1",
                        80,
                        false,
                    ),
                    (
                        "shop/web-1",
                        "shop allowed",
                        Some(&client),
                        "10.0.0.1",
                        80,
                        true,
                    ),
                    (
                        "ops/probe",
                        "other namespace",
                        Some(&probe),
                        "10.0.0.1",
                        80,
                        true,
                    ),
                ],
            ),
            (
                "root namespace with selector: every namespace",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: probes-only-from-shop, namespace: istio-system}
spec:
  selector: {matchLabels: {app: probe}}
  rules: [{from: [{source: {namespaces: ["shop*"]}}]}]
"#,
                vec![
                    (
                        "ops/probe",
                        "from shop",
                        Some(&client),
                        "10.0.0.1",
                        80,
                        true,
                    ),
                    ("ops/probe", "from ops", Some(&probe), "10.0.0.1", 80, false),
                    (
                        "shop/web-1",
                        "not selected",
                        Some(&probe),
                        "10.0.0.1",
                        80,
                        true,
                    ),
                ],
            ),
            (
                "root namespace without selector: global",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-port, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["9090"]}}]}]
"#,
                vec![
                    (
                        "shop/web-1",
                        "port 9090",
                        Some(&client),
                        "10.0.0.1",
                        9090,
                        false,
                    ),
                    (
                        "ops/probe",
                        "port 9090",
                        Some(&client),
                        "10.0.0.1",
                        9090,
                        false,
                    ),
                    ("ops/probe", "port 80", Some(&client), "10.0.0.1", 80, true),
                ],
            ),
            (
                "ipBlocks, notPorts, serviceAccounts, notPrincipals",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mixed, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {ipBlocks: ["10.244.1.0/24", "10.9.9.9"]}}]
    to: [{operation: {notPorts: ["22"]}}]
  - from: [{source: {serviceAccounts: ["ops/probe"], notPrincipals: ["*/sa/db"]}}]
"#,
                vec![
                    ("shop/db-1", "in CIDR", None, "10.244.1.77", 5432, true),
                    (
                        "shop/db-1",
                        "in CIDR, excluded port",
                        None,
                        "10.244.1.77",
                        22,
                        false,
                    ),
                    ("shop/db-1", "single IP", None, "10.9.9.9", 5432, true),
                    (
                        "shop/db-1",
                        "outside",
                        Some(&client),
                        "10.0.0.1",
                        5432,
                        false,
                    ),
                    (
                        "shop/db-1",
                        "service account",
                        Some(&probe),
                        "10.0.0.1",
                        5432,
                        true,
                    ),
                    (
                        "shop/db-1",
                        "excluded principal",
                        Some(&db),
                        "10.0.0.1",
                        5432,
                        false,
                    ),
                ],
            ),
            (
                "when: L4 keys, values and notValues",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: when, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - when:
    - {key: source.namespace, values: ["shop", "ops"]}
    - {key: destination.port, notValues: ["9090"]}
    - {key: source.principal, notValues: ["cluster.local/ns/shop/sa/db"]}
    - {key: source.ip, values: ["10.0.0.0/8"]}
    - {key: destination.ip, values: ["10.244.1.10"]}
"#,
                vec![
                    ("shop/web-1", "all hold", Some(&probe), "10.0.0.1", 80, true),
                    (
                        "shop/web-1",
                        "port excluded",
                        Some(&probe),
                        "10.0.0.1",
                        9090,
                        false,
                    ),
                    (
                        "shop/web-1",
                        "principal excluded",
                        Some(&db),
                        "10.0.0.1",
                        80,
                        false,
                    ),
                    (
                        "shop/web-1",
                        "source ip outside",
                        Some(&probe),
                        "192.168.0.1",
                        80,
                        false,
                    ),
                ],
            ),
            (
                "spec: {} allows nothing; rules: [{}] allows everything",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {selector: {matchLabels: {app: web}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, rules: [{}]}
"#,
                vec![
                    (
                        "shop/web-1",
                        "nothing",
                        Some(&client),
                        "10.0.0.1",
                        80,
                        false,
                    ),
                    ("shop/db-1", "everything", None, "10.0.0.1", 80, true),
                ],
            ),
            (
                "AUDIT and dry-run never decide",
                r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: shop}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: trial, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{}]}
"#,
                vec![("shop/web-1", "allowed", None, "10.0.0.1", 80, true)],
            ),
        ];
        for (name, yaml, checks) in cases {
            let t = run(yaml, None);
            assert!(t.errors.is_empty(), "{name}: {:?}", t.errors);
            for (pod, what, src, ip, port, want) in checks {
                let v = verdict(&t.config, pod, src, ip, port);
                assert_eq!(allowed(&v), want, "{name}: {pod}: {what}: {v:?}");
            }
        }
    }

    /// The deciding policy is named, for the access log and metrics.
    #[test]
    fn verdict_names_the_policy() {
        let t = run(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: ["ops"]}}]}]}
"#,
            None,
        );
        let v = verdict(
            &t.config,
            "shop/web-1",
            Some(&id("ops", "probe")),
            "10.0.0.1",
            80,
        );
        assert_eq!(
            v,
            Verdict::Deny {
                policy: Some("shop/no-ops".into()),
                reason: DenyReason::DenyMatched
            }
        );
    }

    /// HTTP attributes: in ALLOW the rule never matches, in DENY the rule
    /// matches on its L4 part; both say so in the status, both deny more.
    #[test]
    fn http_attributes_deny_more() {
        let t = run(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {namespaces: ["ops"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-post, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{to: [{operation: {methods: ["POST"], ports: ["5432"]}}], when: [{key: "request.headers[x-user]", values: ["a"]}]}]
"#,
            None,
        );
        let client = id("shop", "client");
        // The GET rule is gone; the namespace rule stays.
        assert!(!allowed(&verdict(
            &t.config,
            "shop/web-1",
            Some(&client),
            "10.0.0.1",
            80
        )));
        assert!(allowed(&verdict(
            &t.config,
            "shop/web-1",
            Some(&id("ops", "probe")),
            "10.0.0.1",
            80
        )));
        // Every connection to 5432 is denied, not just POSTs.
        assert!(!allowed(&verdict(
            &t.config,
            "shop/db-1",
            Some(&client),
            "10.0.0.1",
            5432
        )));
        assert!(allowed(&verdict(
            &t.config,
            "shop/db-1",
            Some(&client),
            "10.0.0.1",
            80
        )));
        let warn: Vec<(&str, &str, &str)> = t
            .policies
            .statuses
            .iter()
            .filter(|s| s.reason == "UnsupportedValue")
            .map(|s| (s.name.as_str(), s.reason, s.message.as_str()))
            .collect();
        assert_eq!(warn.len(), 2, "{warn:?}");
        assert!(
            warn[0].2.contains("(methods)") && warn[0].2.contains("ALLOW"),
            "{warn:?}"
        );
        assert!(
            warn[1].2.contains("(methods, request.headers[x-user])") && warn[1].2.contains("DENY"),
            "{warn:?}"
        );
    }

    /// Every malformed field is refused, named by resource and path; the
    /// policy is left out and the rest still translate.
    #[test]
    fn refusals() {
        let policy = |name: &str, spec: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n---\n"
            )
        };
        let yaml = [
            policy("bad-action", "{action: PERMIT}"),
            policy(
                "bad-principal",
                r#"{rules: [{from: [{source: {principals: ["cluster.local/*/sa/x"]}}]}]}"#,
            ),
            policy(
                "empty-principal",
                r#"{rules: [{from: [{source: {notPrincipals: [""]}}]}]}"#,
            ),
            policy(
                "bad-cidr",
                r#"{rules: [{from: [{source: {ipBlocks: ["10.0.0.0/33"]}}]}]}"#,
            ),
            policy(
                "bad-port",
                r#"{rules: [{to: [{operation: {ports: ["70000"]}}]}]}"#,
            ),
            policy(
                "zero-port",
                r#"{rules: [{}, {to: [{operation: {notPorts: ["0"]}}]}]}"#,
            ),
            policy(
                "bad-key",
                r#"{rules: [{when: [{key: source.color, values: [red]}]}]}"#,
            ),
            policy("no-values", r#"{rules: [{when: [{key: source.ip}]}]}"#),
            policy(
                "bad-sa",
                r#"{rules: [{from: [{source: {serviceAccounts: ["a/b/c"]}}]}]}"#,
            ),
            policy("no-source", r#"{rules: [{from: [{}]}]}"#),
            policy(
                "fine",
                r#"{action: DENY, rules: [{from: [{source: {namespaces: ["ops"]}}]}]}"#,
            ),
        ]
        .concat();
        let t = run(&yaml, None);
        let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                r#"AuthorizationPolicy shop/bad-action: spec.action: unknown action "PERMIT": want ALLOW, DENY, AUDIT or CUSTOM"#,
                r#"AuthorizationPolicy shop/bad-cidr: spec.rules[0].from[0].source.ipBlocks[0]: "10.0.0.0/33" is not an IP address or CIDR block"#,
                r#"AuthorizationPolicy shop/bad-key: spec.rules[0].when[0].key: unknown attribute "source.color": ztunnel checks source.ip, source.namespace, source.principal, destination.ip and destination.port"#,
                r#"AuthorizationPolicy shop/bad-port: spec.rules[0].to[0].operation.ports[0]: "70000" is not a port in 1-65535"#,
                r#"AuthorizationPolicy shop/bad-principal: spec.rules[0].from[0].source.principals[0]: "cluster.local/*/sa/x": a wildcard goes only at the start or the end"#,
                r#"AuthorizationPolicy shop/bad-sa: spec.rules[0].from[0].source.serviceAccounts[0]: "a/b/c": want `name` or `namespace/name`"#,
                r#"AuthorizationPolicy shop/empty-principal: spec.rules[0].from[0].source.notPrincipals[0]: "": empty or contains whitespace"#,
                r#"AuthorizationPolicy shop/no-source: spec.rules[0].from[0].source: is required"#,
                r#"AuthorizationPolicy shop/no-values: spec.rules[0].when[0]: values or notValues is required"#,
                r#"AuthorizationPolicy shop/zero-port: spec.rules[1].to[0].operation.notPorts[0]: "0" is not a port in 1-65535"#,
            ]
        );
        let keys: Vec<&String> = t.policies.authorizations.keys().collect();
        assert_eq!(
            keys,
            ["istio-system/istio_converted_static_strict", "shop/fine"]
        );
        let refused = t.policies.statuses.iter().filter(|s| !s.accepted).count();
        assert_eq!(refused, 10);
        // The valid policy still works.
        assert!(!allowed(&verdict(
            &t.config,
            "shop/web-1",
            Some(&id("ops", "probe")),
            "10.0.0.1",
            80
        )));
    }

    /// A policy that stops translating keeps its last accepted version.
    #[test]
    fn last_good_version_stays() {
        let good = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-ops, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: ["ops"]}}]}]}
"#;
        let first = run(good, None);
        let broken = good.replace("[\"ops\"]}}]}]}", "[\"ops\"], ipBlocks: [\"nope\"]}}]}]}");
        let second = run(&broken, Some(&first));
        assert_eq!(second.errors.len(), 1);
        assert!(
            second.policies.statuses[0]
                .message
                .ends_with("the last accepted version stays in force")
        );
        assert_eq!(second.config.policies, first.config.policies);
        // Without history it is left out.
        assert!(run(&broken, None).config.policies.is_empty());
    }

    /// A kept version keeps its own selector and scope: a refused edit that
    /// also moved the selector (or dropped it) binds nothing new.
    #[test]
    fn kept_version_keeps_its_selector() {
        let refs = |t: &Translation, pod: &str| {
            let w = t.config.workloads.iter().find(|w| w.name == pod).unwrap();
            w.authorization_policies.clone()
        };
        let good = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: guard, namespace: shop}
spec: {selector: {matchLabels: {app: db}}, action: DENY, rules: [{from: [{source: {namespaces: ["ops"]}}]}]}
"#;
        let first = run(good, None);
        assert_eq!(refs(&first, "db-1"), ["shop/guard"]);
        assert!(refs(&first, "web-1").is_empty());
        for edit in [
            // Moved to app=web, with an error.
            good.replace("app: db", "app: web")
                .replace("[\"ops\"]", "[\"ops\"], ipBlocks: [\"nope\"]"),
            // Selector dropped (namespace-wide), with an error.
            good.replace("selector: {matchLabels: {app: db}}, ", "")
                .replace("[\"ops\"]", "[\"ops\"], ipBlocks: [\"nope\"]"),
        ] {
            let second = run(&edit, Some(&first));
            assert_eq!(second.errors.len(), 1, "{:?}", second.errors);
            assert_eq!(refs(&second, "db-1"), ["shop/guard"], "{edit}");
            assert!(refs(&second, "web-1").is_empty(), "{edit}");
            assert_eq!(second.config.policies, first.config.policies, "same scope");
        }
    }

    /// targetRef policies belong to waypoints; CUSTOM is not ztunnel's.
    #[test]
    fn not_for_ztunnel() {
        let t = run(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-waypoint, namespace: shop}
spec: {targetRefs: [{kind: Service, group: "", name: web}], rules: [{to: [{operation: {methods: [GET]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
"#,
            None,
        );
        assert!(t.errors.is_empty(), "{:?}", t.errors);
        assert!(t.config.policies.is_empty(), "{:?}", t.config.policies);
        let reasons: Vec<(&str, bool)> = t
            .policies
            .statuses
            .iter()
            .map(|s| (s.name.as_str(), s.accepted))
            .collect();
        assert_eq!(reasons, [("at-waypoint", true), ("ext", false)]);
    }

    fn peer_authn(name: &str, ns: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n"
        )
    }

    /// PeerAuthentication resolves per workload (workload over namespace over
    /// mesh, UNSET inherits) and per port; STRICT refuses plaintext only.
    #[test]
    fn peer_authentication_table() {
        let client = id("shop", "client");
        let mesh_strict = peer_authn("default", "istio-system", "{mtls: {mode: STRICT}}");
        let ns_permissive = peer_authn("default", "shop", "{mtls: {mode: PERMISSIVE}}");
        let ns_unset = peer_authn("default", "shop", "{}");
        let web_strict = peer_authn(
            "web",
            "shop",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}",
        );
        let db_ports = peer_authn(
            "db",
            "shop",
            r#"{selector: {matchLabels: {app: db}}, portLevelMtls: {"5432": {mode: STRICT}}}"#,
        );
        // (manifests, pod, port, plaintext allowed)
        let cases: Vec<(String, &str, u16, bool)> = vec![
            (String::new(), "shop/web-1", 80, true),
            (mesh_strict.clone(), "shop/web-1", 80, false),
            (mesh_strict.clone(), "ops/probe", 80, false),
            (
                format!("{mesh_strict}{ns_permissive}"),
                "shop/web-1",
                80,
                true,
            ),
            (
                format!("{mesh_strict}{ns_permissive}"),
                "ops/probe",
                80,
                false,
            ),
            (format!("{mesh_strict}{ns_unset}"), "shop/web-1", 80, false),
            (
                format!("{ns_permissive}{web_strict}"),
                "shop/web-1",
                80,
                false,
            ),
            (
                format!("{ns_permissive}{web_strict}"),
                "shop/web-1",
                8080,
                true,
            ),
            (
                format!("{ns_permissive}{web_strict}"),
                "shop/db-1",
                80,
                true,
            ),
            (db_ports.clone(), "shop/db-1", 5432, false),
            (db_ports.clone(), "shop/db-1", 80, true),
            (format!("{mesh_strict}{db_ports}"), "shop/db-1", 80, false),
        ];
        for (yaml, pod, port, plaintext_ok) in cases {
            let t = run(&yaml, None);
            assert!(t.errors.is_empty(), "{:?}", t.errors);
            let plain = verdict(&t.config, pod, None, "10.0.0.1", port);
            assert_eq!(
                allowed(&plain),
                plaintext_ok,
                "{yaml}\n{pod}:{port} plaintext: {plain:?}"
            );
            let mtls = verdict(&t.config, pod, Some(&client), "10.0.0.1", port);
            assert!(allowed(&mtls), "{yaml}\n{pod}:{port} mTLS: {mtls:?}");
        }
        // The denial names Istio's static STRICT policy.
        let t = run(&mesh_strict, None);
        assert_eq!(
            verdict(&t.config, "shop/web-1", None, "10.0.0.1", 80),
            Verdict::Deny {
                policy: Some(format!("istio-system/{STATIC_STRICT}")),
                reason: DenyReason::DenyMatched
            }
        );
    }

    #[test]
    fn peer_authentication_refusals() {
        let yaml = [
            peer_authn("bad-mode", "shop", "{mtls: {mode: STRCT}}"),
            peer_authn(
                "no-selector",
                "shop",
                "{portLevelMtls: {80: {mode: STRICT}}}",
            ),
            peer_authn(
                "bad-port",
                "shop",
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {0: {mode: STRICT}}}",
            ),
        ]
        .concat();
        let t = run(&yaml, None);
        let errors: Vec<String> = t.errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            vec![
                r#"PeerAuthentication shop/bad-mode: spec.mtls.mode: unknown mode "STRCT": want UNSET, DISABLE, PERMISSIVE or STRICT"#,
                r#"PeerAuthentication shop/bad-port: spec.portLevelMtls[0]: "0" is not a port in 1-65535"#,
                r#"PeerAuthentication shop/no-selector: spec.portLevelMtls: needs a selector: port-level modes apply to selected workloads only"#,
            ]
        );
        // A STRICT policy that breaks stays STRICT.
        let strict = peer_authn("default", "shop", "{mtls: {mode: STRICT}}");
        let first = run(&strict, None);
        let second = run(&strict.replace("STRICT", "STRIKT"), Some(&first));
        assert!(!allowed(&verdict(
            &second.config,
            "shop/web-1",
            None,
            "10.0.0.1",
            80
        )));
    }
}
