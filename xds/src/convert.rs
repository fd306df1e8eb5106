//! Weft's types ↔ Istio's wire messages. The controller encodes; ztunnel
//! decodes and refuses, per resource, what does not make sense.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;
use weft_api::authz::{self, Action, Authorization, Scope, ServiceAccountMatch, StringMatch};
use weft_api::{
    AppProtocol, Endpoint, LocalConfig, Service, ServicePort, TunnelProtocol, WaypointRef, Workload,
};

use crate::proto::security as sec;
use crate::proto::workload as pw;

/// A resource ztunnel cannot use, naming it and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{resource}: {field}: {message}")]
pub struct ConvertError {
    pub resource: String,
    pub field: &'static str,
    pub message: String,
}

/// A policy condition ztunnel cannot evaluate, and what is enforced instead:
/// the policy always ends up denying more than written, never less.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("authorization {resource}: rules[{rule}]: {field} cannot be enforced by ztunnel; {effect}")]
pub struct Unenforceable {
    pub resource: String,
    pub rule: usize,
    pub field: &'static str,
    pub effect: &'static str,
}

/// A workload as delivered: the workload and the services it backs
/// (`namespace/hostname` → service port → target port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsWorkload {
    pub workload: Workload,
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
}

/// The xDS name of a service: `namespace/hostname`.
pub fn service_key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace, svc.hostname)
}

fn ip_bytes(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ip_from_bytes(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => <[u8; 4]>::try_from(b)
            .ok()
            .map(|a| Ipv4Addr::from(a).into()),
        16 => <[u8; 16]>::try_from(b)
            .ok()
            .map(|a| Ipv6Addr::from(a).into()),
        _ => None,
    }
}

// === encode (controller) ===

/// What one `istio.workload.Address` resource is made from, borrowed from a
/// [`LocalConfig`]. Two equal inputs encode to the same bytes, so a publisher
/// that compares inputs encodes only what changed. Inputs borrowed from the
/// same shared object compare equal without looking inside.
#[derive(Debug)]
pub enum AddressInput<'a> {
    /// A workload, and the services it backs with their ports.
    Workload(&'a Workload, Vec<Backed<'a>>),
    Service(&'a Service),
}

impl PartialEq for AddressInput<'_> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (AddressInput::Workload(a, ab), AddressInput::Workload(b, bb)) => {
                (std::ptr::eq(*a, *b) || a == b) && ab == bb
            }
            (AddressInput::Service(a), AddressInput::Service(b)) => std::ptr::eq(*a, *b) || a == b,
            _ => false,
        }
    }
}

impl Eq for AddressInput<'_> {}

/// One service a workload backs, as its Address resource says it: the
/// service's key and the ports the workload serves it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backed<'a> {
    pub namespace: &'a str,
    pub hostname: &'a str,
    /// Service port → port on the workload.
    pub ports: &'a BTreeMap<u16, u16>,
}

impl<'a> Backed<'a> {
    pub fn of(svc: &'a Service, ep: &'a Endpoint) -> Self {
        Backed {
            namespace: &svc.namespace,
            hostname: &svc.hostname,
            ports: &ep.ports,
        }
    }
}

impl AddressInput<'_> {
    /// Its xDS name: the workload uid or `namespace/hostname`.
    pub fn name(&self) -> String {
        match self {
            AddressInput::Workload(w, _) => w.uid.clone(),
            AddressInput::Service(svc) => service_key(svc),
        }
    }

    /// The other names it is known by: `network/ip` of each address or VIP.
    pub fn aliases(&self) -> Vec<String> {
        match self {
            AddressInput::Workload(w, _) => w.addresses.iter().map(address_alias).collect(),
            AddressInput::Service(svc) => svc.vips.iter().map(address_alias).collect(),
        }
    }

    pub fn to_proto(&self) -> pw::Address {
        let r#type = match self {
            AddressInput::Workload(w, backs) => {
                let services = backs
                    .iter()
                    .map(|b| {
                        let ports = b
                            .ports
                            .iter()
                            .map(|(p, t)| pw::Port {
                                service_port: u32::from(*p),
                                target_port: u32::from(*t),
                                app_protocol: 0,
                            })
                            .collect();
                        (
                            format!("{}/{}", b.namespace, b.hostname),
                            pw::PortList { ports },
                        )
                    })
                    .collect();
                pw::address::Type::Workload(workload_to_proto(w, services))
            }
            AddressInput::Service(svc) => pw::address::Type::Service(service_to_proto(svc)),
        };
        pw::Address {
            r#type: Some(r#type),
        }
    }
}

/// Workload uid → the services it backs, in key order, one entry per
/// service key (the last endpoint winning, as a map keyed by it would keep);
/// for the workloads `wanted` says yes to.
pub fn backs_index<'a>(
    cfg: &'a LocalConfig,
    wanted: impl Fn(&str) -> bool,
) -> HashMap<&'a str, Vec<Backed<'a>>> {
    let mut backs: HashMap<&str, Vec<Backed<'_>>> = HashMap::new();
    for svc in &cfg.services {
        for ep in svc.endpoints.iter().filter(|ep| wanted(&ep.workload_uid)) {
            backs
                .entry(ep.workload_uid.as_str())
                .or_default()
                .push(Backed::of(svc, ep));
        }
    }
    for services in backs.values_mut() {
        services.sort_by_key(|b| (b.namespace, b.hostname));
        services.dedup_by(|later, earlier| {
            let same = (later.namespace, later.hostname) == (earlier.namespace, earlier.hostname);
            if same {
                *earlier = *later;
            }
            same
        });
    }
    backs
}

/// Every workload and service of `cfg` as the inputs of its
/// `istio.workload.Address` resource: workloads first, then services.
pub fn address_inputs(cfg: &LocalConfig) -> Vec<AddressInput<'_>> {
    let mut backs = backs_index(cfg, |_| true);
    let mut out = Vec::with_capacity(cfg.workloads.len() + cfg.services.len());
    for w in &cfg.workloads {
        let services = backs.remove(w.uid.as_str()).unwrap_or_default();
        out.push(AddressInput::Workload(w, services));
    }
    out.extend(cfg.services.iter().map(|s| AddressInput::Service(s)));
    out
}

/// Every workload and service of `cfg` as `istio.workload.Address`
/// resources, keyed by their xDS names (workload uid, `namespace/hostname`).
pub fn address_resources(cfg: &LocalConfig) -> Vec<(String, pw::Address)> {
    address_inputs(cfg)
        .iter()
        .map(|i| (i.name(), i.to_proto()))
        .collect()
}

fn workload_to_proto(w: &Workload, services: BTreeMap<String, pw::PortList>) -> pw::Workload {
    pw::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.addresses.iter().map(ip_bytes).collect(),
        network: String::new(),
        tunnel_protocol: match w.protocol {
            TunnelProtocol::None => pw::TunnelProtocol::None,
            TunnelProtocol::Hbone => pw::TunnelProtocol::Hbone,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(waypoint_to_proto),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: pw::WorkloadType::Pod as i32,
        workload_name: w.workload_name.clone(),
        authorization_policies: w.authorization_policies.clone(),
        status: if w.healthy {
            pw::WorkloadStatus::Healthy
        } else {
            pw::WorkloadStatus::Unhealthy
        } as i32,
        cluster_id: String::new(),
        services,
        network_mode: if w.host_network {
            pw::NetworkMode::HostNetwork
        } else {
            pw::NetworkMode::Standard
        } as i32,
    }
}

fn service_to_proto(svc: &Service) -> pw::Service {
    pw::Service {
        name: svc.name.clone(),
        namespace: svc.namespace.clone(),
        hostname: svc.hostname.clone(),
        addresses: svc
            .vips
            .iter()
            .map(|ip| pw::NetworkAddress {
                network: String::new(),
                address: ip_bytes(ip),
                length: None,
            })
            .collect(),
        ports: svc
            .ports
            .iter()
            .map(|p| pw::Port {
                service_port: u32::from(p.port),
                target_port: u32::from(p.target_port),
                app_protocol: app_protocol_to_proto(p.protocol) as i32,
            })
            .collect(),
        subject_alt_names: Vec::new(),
        waypoint: svc.waypoint.as_ref().map(waypoint_to_proto),
        // Every service here is a Kubernetes Service, which istiod always
        // marks canonical.
        canonical: true,
    }
}

fn app_protocol_to_proto(p: AppProtocol) -> pw::AppProtocol {
    match p {
        AppProtocol::Unknown => pw::AppProtocol::Unknown,
        AppProtocol::Http11 => pw::AppProtocol::Http11,
        AppProtocol::Http2 => pw::AppProtocol::Http2,
        AppProtocol::Grpc => pw::AppProtocol::Grpc,
        AppProtocol::Tcp => pw::AppProtocol::Tcp,
        AppProtocol::Tls => pw::AppProtocol::Tls,
    }
}

/// An unknown value (a newer control plane) is read as Unknown: sniffed.
fn port_app_protocol(v: i32) -> pw::AppProtocol {
    pw::AppProtocol::try_from(v).unwrap_or(pw::AppProtocol::Unknown)
}

fn app_protocol_from_proto(p: pw::AppProtocol) -> AppProtocol {
    match p {
        pw::AppProtocol::Unknown => AppProtocol::Unknown,
        pw::AppProtocol::Http11 => AppProtocol::Http11,
        pw::AppProtocol::Http2 => AppProtocol::Http2,
        pw::AppProtocol::Grpc => AppProtocol::Grpc,
        pw::AppProtocol::Tcp => AppProtocol::Tcp,
        pw::AppProtocol::Tls => AppProtocol::Tls,
    }
}

fn waypoint_to_proto(w: &WaypointRef) -> pw::GatewayAddress {
    pw::GatewayAddress {
        destination: Some(pw::gateway_address::Destination::Hostname(
            pw::NamespacedHostname {
                namespace: w.namespace.clone(),
                hostname: w.hostname.clone(),
            },
        )),
        hbone_mtls_port: u32::from(w.port),
    }
}

/// A waypoint binding as Weft uses it: the hostname form. The address form
/// (older istiod) is refused: the resource keeps its previous version rather
/// than lose its waypoint.
fn waypoint_from_proto(g: pw::GatewayAddress) -> Result<WaypointRef, String> {
    let port = u16::try_from(g.hbone_mtls_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("hbone_mtls_port {} is not a port", g.hbone_mtls_port))?;
    match g.destination {
        Some(pw::gateway_address::Destination::Hostname(h)) if !h.hostname.is_empty() => {
            Ok(WaypointRef {
                namespace: h.namespace,
                hostname: h.hostname,
                port,
            })
        }
        Some(pw::gateway_address::Destination::Hostname(_)) => Err("empty hostname".into()),
        Some(pw::gateway_address::Destination::Address(_)) => {
            Err("the address form is not supported; send the hostname form".into())
        }
        None => Err("no destination".into()),
    }
}

/// The `network/ip` names an address is looked up by (Istio's on-demand
/// keys; the network is empty here): `/10.244.1.10`.
pub fn address_alias(ip: &IpAddr) -> String {
    format!("/{ip}")
}

/// A policy as `istio.security.Authorization`, with its xDS name.
pub fn authorization_to_proto(p: &Authorization) -> (String, sec::Authorization) {
    let strings = |v: &[StringMatch]| -> Vec<sec::StringMatch> {
        v.iter()
            .map(|m| sec::StringMatch {
                match_type: Some(match m {
                    StringMatch::Exact(s) => sec::string_match::MatchType::Exact(s.clone()),
                    StringMatch::Prefix(s) => sec::string_match::MatchType::Prefix(s.clone()),
                    StringMatch::Suffix(s) => sec::string_match::MatchType::Suffix(s.clone()),
                    StringMatch::Presence => sec::string_match::MatchType::Presence(()),
                }),
            })
            .collect()
    };
    let nets = |v: &[IpNet]| -> Vec<sec::Address> {
        v.iter()
            .map(|n| sec::Address {
                address: ip_bytes(&n.network()),
                length: u32::from(n.prefix_len()),
            })
            .collect()
    };
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    let accounts = |v: &[ServiceAccountMatch]| {
        v.iter()
            .map(|m| sec::ServiceAccountMatch {
                namespace: m.namespace.clone(),
                service_account: m.service_account.clone(),
            })
            .collect()
    };
    let rules = p
        .rules
        .iter()
        .map(|r| sec::Rule {
            clauses: r
                .clauses
                .iter()
                .map(|c| sec::Clause {
                    matches: c
                        .matches
                        .iter()
                        .map(|m| sec::Match {
                            namespaces: strings(&m.namespaces),
                            not_namespaces: strings(&m.not_namespaces),
                            principals: strings(&m.principals),
                            not_principals: strings(&m.not_principals),
                            source_ips: nets(&m.source_ips),
                            not_source_ips: nets(&m.not_source_ips),
                            destination_ips: nets(&m.destination_ips),
                            not_destination_ips: nets(&m.not_destination_ips),
                            destination_ports: ports(&m.destination_ports),
                            not_destination_ports: ports(&m.not_destination_ports),
                            service_accounts: accounts(&m.service_accounts),
                            not_service_accounts: accounts(&m.not_service_accounts),
                            extensions: Vec::new(),
                        })
                        .collect(),
                })
                .collect(),
        })
        .collect();
    let msg = sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            Scope::Global => sec::Scope::Global,
            Scope::Namespace => sec::Scope::Namespace,
            Scope::WorkloadSelector => sec::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            Action::Allow => sec::Action::Allow,
            Action::Deny => sec::Action::Deny,
        } as i32,
        rules,
        dry_run: p.dry_run,
    };
    (p.key(), msg)
}

// === decode (ztunnel) ===

/// Decodes a workload; `name` is the xDS resource name, for errors.
pub fn workload_from_proto(name: &str, p: pw::Workload) -> Result<XdsWorkload, ConvertError> {
    let err = |field, message: String| ConvertError {
        resource: format!("workload {name}"),
        field,
        message,
    };
    if p.uid.is_empty() {
        return Err(err("uid", "empty".into()));
    }
    let addresses = p
        .addresses
        .iter()
        .map(|b| {
            ip_from_bytes(b)
                .ok_or_else(|| err("addresses", format!("{} bytes is not an IP", b.len())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = match pw::TunnelProtocol::try_from(p.tunnel_protocol) {
        Ok(pw::TunnelProtocol::None) => TunnelProtocol::None,
        Ok(pw::TunnelProtocol::Hbone) => TunnelProtocol::Hbone,
        Ok(other) => {
            return Err(err(
                "tunnel_protocol",
                format!("{other:?} is not supported"),
            ));
        }
        Err(_) => {
            return Err(err(
                "tunnel_protocol",
                format!("unknown value {}", p.tunnel_protocol),
            ));
        }
    };
    let mut services = BTreeMap::new();
    for (key, list) in p.services {
        if !key.contains('/') {
            return Err(err(
                "services",
                format!("key {key:?} is not namespace/hostname"),
            ));
        }
        let mut ports = BTreeMap::new();
        for port in list.ports {
            let (Ok(sp), Ok(tp)) = (
                u16::try_from(port.service_port),
                u16::try_from(port.target_port),
            ) else {
                return Err(err("services", format!("{key}: port out of range")));
            };
            ports.insert(sp, tp);
        }
        services.insert(key, ports);
    }
    let or = |s: String, default: &str| if s.is_empty() { default.to_string() } else { s };
    let workload = Workload {
        uid: p.uid,
        name: p.name,
        namespace: p.namespace,
        workload_name: p.workload_name,
        canonical_name: p.canonical_name,
        canonical_revision: p.canonical_revision,
        service_account: or(p.service_account, "default"),
        trust_domain: or(p.trust_domain, "cluster.local"),
        node: p.node,
        addresses,
        protocol,
        named_ports: BTreeMap::new(),
        authorization_policies: p.authorization_policies,
        host_network: p.network_mode == pw::NetworkMode::HostNetwork as i32,
        healthy: p.status != pw::WorkloadStatus::Unhealthy as i32,
        waypoint: p
            .waypoint
            .map(waypoint_from_proto)
            .transpose()
            .map_err(|m| err("waypoint", m))?,
    };
    if protocol == TunnelProtocol::Hbone {
        workload
            .identity()
            .map_err(|e| err("service_account", e.to_string()))?;
    }
    Ok(XdsWorkload { workload, services })
}

/// Decodes a service (its endpoints come from the workloads that back it).
pub fn service_from_proto(name: &str, p: pw::Service) -> Result<Service, ConvertError> {
    let err = |field, message: String| ConvertError {
        resource: format!("service {name}"),
        field,
        message,
    };
    if p.hostname.is_empty() {
        return Err(err("hostname", "empty".into()));
    }
    let vips = p
        .addresses
        .iter()
        .map(|a| {
            ip_from_bytes(&a.address).ok_or_else(|| {
                err(
                    "addresses",
                    format!("{} bytes is not an IP", a.address.len()),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = p
        .ports
        .iter()
        .map(|port| {
            let protocol = app_protocol_from_proto(port_app_protocol(port.app_protocol));
            match (
                u16::try_from(port.service_port),
                u16::try_from(port.target_port),
            ) {
                (Ok(port), Ok(target_port)) if port != 0 => Ok(ServicePort {
                    port,
                    target_port,
                    protocol,
                }),
                _ => Err(err(
                    "ports",
                    format!(
                        "{} → {} is out of range",
                        port.service_port, port.target_port
                    ),
                )),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Service {
        name: p.name,
        namespace: p.namespace,
        hostname: p.hostname,
        vips,
        ports,
        endpoints: Vec::new(),
        waypoint: p
            .waypoint
            .map(waypoint_from_proto)
            .transpose()
            .map_err(|m| err("waypoint", m))?,
    })
}

/// Decodes a policy; `name` is the xDS resource name.
///
/// Conditions ztunnel cannot evaluate (extensions) are applied in the safe
/// direction, as istiod does when it translates: in an ALLOW policy the rule
/// that has one matches nothing (it is left out); in a DENY policy only that
/// condition is dropped, so the rule denies more. Each is returned, to be
/// logged and counted.
pub fn authorization_from_proto(
    name: &str,
    p: sec::Authorization,
) -> Result<(Authorization, Vec<Unenforceable>), ConvertError> {
    let err = |field, message: String| ConvertError {
        resource: format!("authorization {name}"),
        field,
        message,
    };
    let scope = match sec::Scope::try_from(p.scope) {
        Ok(sec::Scope::Global) => Scope::Global,
        Ok(sec::Scope::Namespace) => Scope::Namespace,
        Ok(sec::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(err("scope", format!("unknown value {}", p.scope))),
    };
    let action = match sec::Action::try_from(p.action) {
        Ok(sec::Action::Allow) => Action::Allow,
        Ok(sec::Action::Deny) => Action::Deny,
        Err(_) => return Err(err("action", format!("unknown value {}", p.action))),
    };
    let strings = |v: Vec<sec::StringMatch>| -> Vec<StringMatch> {
        // A match with no variant set matches nothing; Istio drops it too.
        v.into_iter()
            .filter_map(|m| {
                Some(match m.match_type? {
                    sec::string_match::MatchType::Exact(s) => StringMatch::Exact(s),
                    sec::string_match::MatchType::Prefix(s) => StringMatch::Prefix(s),
                    sec::string_match::MatchType::Suffix(s) => StringMatch::Suffix(s),
                    sec::string_match::MatchType::Presence(()) => StringMatch::Presence,
                })
            })
            .collect()
    };
    let nets = |v: Vec<sec::Address>, field| -> Result<Vec<IpNet>, ConvertError> {
        v.iter()
            .map(|a| {
                let ip = ip_from_bytes(&a.address)
                    .ok_or_else(|| err(field, format!("{} bytes is not an IP", a.address.len())))?;
                let len = u8::try_from(a.length).unwrap_or(u8::MAX);
                // Host bits past the prefix say nothing to a match; drop them
                // so that a policy reads the same after it is sent again.
                IpNet::new(ip, len)
                    .map(|n| n.trunc())
                    .map_err(|_| err(field, format!("{ip}/{} is not a CIDR", a.length)))
            })
            .collect()
    };
    let ports = |v: Vec<u32>, field| -> Result<Vec<u16>, ConvertError> {
        v.into_iter()
            .map(|p| u16::try_from(p).map_err(|_| err(field, format!("port {p} is out of range"))))
            .collect()
    };
    let accounts = |v: Vec<sec::ServiceAccountMatch>| -> Vec<ServiceAccountMatch> {
        v.into_iter()
            .map(|m| ServiceAccountMatch {
                namespace: m.namespace,
                service_account: m.service_account,
            })
            .collect()
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    let mut unenforceable = Vec::new();
    for (index, r) in p.rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        let mut narrowed = false;
        for c in r.clauses {
            let mut matches = Vec::with_capacity(c.matches.len());
            for m in c.matches {
                narrowed |= !m.extensions.is_empty();
                matches.push(authz::Match {
                    namespaces: strings(m.namespaces),
                    not_namespaces: strings(m.not_namespaces),
                    principals: strings(m.principals),
                    not_principals: strings(m.not_principals),
                    source_ips: nets(m.source_ips, "source_ips")?,
                    not_source_ips: nets(m.not_source_ips, "not_source_ips")?,
                    destination_ips: nets(m.destination_ips, "destination_ips")?,
                    not_destination_ips: nets(m.not_destination_ips, "not_destination_ips")?,
                    destination_ports: ports(m.destination_ports, "destination_ports")?,
                    not_destination_ports: ports(m.not_destination_ports, "not_destination_ports")?,
                    service_accounts: accounts(m.service_accounts),
                    not_service_accounts: accounts(m.not_service_accounts),
                });
            }
            clauses.push(authz::Clause { matches });
        }
        if narrowed {
            let allow = action == Action::Allow;
            unenforceable.push(Unenforceable {
                resource: name.to_string(),
                rule: index,
                field: "extensions",
                effect: if allow {
                    "the rule matches nothing"
                } else {
                    "the condition is dropped, so the rule denies more"
                },
            });
            if allow {
                continue;
            }
        }
        rules.push(authz::Rule { clauses });
    }
    let policy = Authorization {
        name: p.name,
        namespace: p.namespace,
        scope,
        action,
        dry_run: p.dry_run,
        rules,
    };
    Ok((policy, unenforceable))
}

/// Joins decoded workloads, services and policies into the config ztunnel
/// indexes: each service's endpoints are the workloads that back it.
pub fn assemble<'a>(
    workloads: impl IntoIterator<Item = &'a XdsWorkload>,
    services: impl IntoIterator<Item = &'a Service>,
    policies: impl IntoIterator<Item = &'a Authorization>,
) -> LocalConfig {
    let mut endpoints: BTreeMap<&str, Vec<Endpoint>> = BTreeMap::new();
    let mut out = LocalConfig::default();
    for xw in workloads {
        for (key, ports) in &xw.services {
            endpoints.entry(key.as_str()).or_default().push(Endpoint {
                workload_uid: xw.workload.uid.clone(),
                ports: ports.clone(),
            });
        }
        out.workloads.push(Arc::new(xw.workload.clone()));
    }
    for svc in services {
        let mut svc = svc.clone();
        svc.endpoints = endpoints
            .remove(service_key(&svc).as_str())
            .unwrap_or_default();
        out.services.push(Arc::new(svc));
    }
    out.policies = policies.into_iter().cloned().collect();
    out
}

/// Whether `n` is prime: a Maglev table's size must be, so that each
/// endpoint's permutation visits every slot. The controller refuses any
/// other `tableSize`; the waypoint rounds one up.
pub fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn workload(name: &str, ip: &str, protocol: TunnelProtocol) -> Workload {
        Workload {
            uid: format!("Kubernetes//Pod/shop/{name}"),
            name: name.into(),
            namespace: "shop".into(),
            workload_name: name.into(),
            canonical_name: "web".into(),
            canonical_revision: "v1".into(),
            service_account: "web".into(),
            trust_domain: "cluster.local".into(),
            node: "node-2".into(),
            addresses: vec![ip.parse().unwrap()],
            protocol,
            named_ports: BTreeMap::new(),
            authorization_policies: vec!["shop/web-only".into()],
            host_network: false,
            healthy: true,
            waypoint: None,
        }
    }

    fn waypoint() -> Option<WaypointRef> {
        Some(WaypointRef {
            namespace: "shop".into(),
            hostname: "waypoint.shop.svc.cluster.local".into(),
            port: 15008,
        })
    }

    /// Only the hostname form of a waypoint binding is taken; the rest is
    /// refused rather than read as "no waypoint".
    #[test]
    fn waypoint_forms() {
        let by_ip = pw::GatewayAddress {
            destination: Some(pw::gateway_address::Destination::Address(
                pw::NetworkAddress {
                    network: String::new(),
                    address: vec![10, 0, 0, 1],
                    length: None,
                },
            )),
            hbone_mtls_port: 15008,
        };
        assert!(
            waypoint_from_proto(by_ip)
                .unwrap_err()
                .contains("address form")
        );
        let no_port = pw::GatewayAddress {
            hbone_mtls_port: 0,
            ..waypoint_to_proto(&waypoint().unwrap())
        };
        assert!(waypoint_from_proto(no_port).is_err());
        let wl = pw::Workload {
            uid: "u".into(),
            waypoint: Some(pw::GatewayAddress {
                destination: None,
                hbone_mtls_port: 15008,
            }),
            ..pw::Workload::default()
        };
        let e = workload_from_proto("u", wl).unwrap_err();
        assert_eq!(e.field, "waypoint");
    }

    /// What the controller encodes, ztunnel decodes to the same config.
    #[test]
    fn round_trip() {
        let cfg = LocalConfig {
            workloads: [
                workload("web-1", "10.0.2.10", TunnelProtocol::Hbone),
                Workload {
                    host_network: true,
                    // Not ready: WorkloadStatus UNHEALTHY both ways.
                    healthy: false,
                    waypoint: waypoint(),
                    ..workload("web-2", "fd00::2", TunnelProtocol::None)
                },
            ]
            .map(std::sync::Arc::new)
            .into(),
            services: [Service {
                name: "web".into(),
                namespace: "shop".into(),
                hostname: "web.shop.svc.cluster.local".into(),
                vips: vec!["10.96.0.10".parse().unwrap()],
                ports: vec![ServicePort {
                    port: 80,
                    target_port: 8080,
                    protocol: AppProtocol::Http2,
                }],
                endpoints: vec![Endpoint {
                    workload_uid: "Kubernetes//Pod/shop/web-1".into(),
                    ports: BTreeMap::from([(80, 8080)]),
                }],
                waypoint: waypoint(),
            }]
            .map(std::sync::Arc::new)
            .into(),
            policies: vec![Authorization {
                name: "web-only".into(),
                namespace: "shop".into(),
                scope: Scope::WorkloadSelector,
                action: Action::Deny,
                dry_run: false,
                rules: vec![authz::Rule {
                    clauses: vec![authz::Clause {
                        matches: vec![authz::Match {
                            not_principals: vec![StringMatch::Presence],
                            source_ips: vec!["10.0.0.0/8".parse().unwrap()],
                            not_destination_ports: vec![15021],
                            service_accounts: vec![ServiceAccountMatch {
                                namespace: "ops".into(),
                                service_account: "probe".into(),
                            }],
                            not_service_accounts: vec![ServiceAccountMatch {
                                namespace: "ops".into(),
                                service_account: "admin".into(),
                            }],
                            ..authz::Match::default()
                        }],
                    }],
                }],
            }],
        };
        let mut workloads = Vec::new();
        let mut services = Vec::new();
        for (name, addr) in address_resources(&cfg) {
            let addr = pw::Address::decode(addr.encode_to_vec().as_slice()).unwrap();
            match addr.r#type.unwrap() {
                pw::address::Type::Workload(w) => {
                    assert_eq!(name, w.uid);
                    workloads.push(workload_from_proto(&name, w).unwrap());
                }
                pw::address::Type::Service(s) => {
                    assert_eq!(name, "shop/web.shop.svc.cluster.local");
                    services.push(service_from_proto(&name, s).unwrap());
                }
            }
        }
        let policies: Vec<_> = cfg
            .policies
            .iter()
            .map(|p| {
                let (name, msg) = authorization_to_proto(p);
                assert_eq!(name, "shop/web-only");
                let msg = sec::Authorization::decode(msg.encode_to_vec().as_slice()).unwrap();
                let (policy, unenforceable) = authorization_from_proto(&name, msg).unwrap();
                assert!(unenforceable.is_empty());
                policy
            })
            .collect();
        assert_eq!(assemble(&workloads, &services, &policies), cfg);
    }

    /// A policy of one rule with one match.
    fn one_match(m: sec::Match) -> sec::Authorization {
        sec::Authorization {
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause { matches: vec![m] }],
            }],
            ..sec::Authorization::default()
        }
    }

    /// A CIDR sent with host bits past its prefix (`42.0.42.0/0`) reads as
    /// its network, so that what ztunnel accepted reads the same when sent
    /// again. Found by the `xds_decode` fuzz target.
    #[test]
    fn host_bits_of_a_cidr_are_dropped() {
        let msg = one_match(sec::Match {
            not_source_ips: vec![sec::Address {
                address: vec![42, 0, 42, 0],
                length: 0,
            }],
            source_ips: vec![sec::Address {
                address: vec![10, 1, 2, 3],
                length: 16,
            }],
            ..sec::Match::default()
        });
        let (policy, _) = authorization_from_proto("p", msg).unwrap();
        let m = &policy.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.not_source_ips,
            vec!["0.0.0.0/0".parse::<IpNet>().unwrap()]
        );
        assert_eq!(m.source_ips, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        let (_, again) = authorization_to_proto(&policy);
        assert_eq!(authorization_from_proto("p", again).unwrap().0, policy);
    }

    /// Each malformed field is refused with the resource and field named.
    #[test]
    fn refusals() {
        let good = || match address_resources(&LocalConfig {
            workloads: [workload("w", "10.0.0.1", TunnelProtocol::Hbone)]
                .map(std::sync::Arc::new)
                .into(),
            ..LocalConfig::default()
        })
        .remove(0)
        .1
        .r#type
        {
            Some(pw::address::Type::Workload(w)) => w,
            _ => unreachable!(),
        };
        let cases: Vec<(&str, pw::Workload, &str)> = vec![
            (
                "short ip",
                pw::Workload {
                    addresses: vec![vec![10, 0, 0]],
                    ..good()
                },
                "addresses",
            ),
            (
                "legacy mTLS",
                pw::Workload {
                    tunnel_protocol: 2,
                    ..good()
                },
                "tunnel_protocol",
            ),
            (
                "unknown protocol",
                pw::Workload {
                    tunnel_protocol: 9,
                    ..good()
                },
                "tunnel_protocol",
            ),
            (
                "no uid",
                pw::Workload {
                    uid: String::new(),
                    ..good()
                },
                "uid",
            ),
            (
                "bad identity",
                pw::Workload {
                    service_account: "a/b".into(),
                    ..good()
                },
                "service_account",
            ),
            (
                "service key",
                pw::Workload {
                    services: BTreeMap::from([("web".to_string(), pw::PortList::default())]),
                    ..good()
                },
                "services",
            ),
        ];
        for (name, w, field) in cases {
            let err = workload_from_proto("w", w).unwrap_err();
            assert_eq!(err.field, field, "{name}: {err}");
            assert_eq!(err.resource, "workload w");
        }
        let bad_cidr = one_match(sec::Match {
            source_ips: vec![sec::Address {
                address: vec![10, 0, 0, 0],
                length: 40,
            }],
            ..sec::Match::default()
        });
        let err = authorization_from_proto("ns/p", bad_cidr).unwrap_err();
        assert_eq!(
            (err.field, err.resource.as_str()),
            ("source_ips", "authorization ns/p")
        );
        let bad_action = sec::Authorization {
            action: 7,
            ..sec::Authorization::default()
        };
        assert_eq!(
            authorization_from_proto("ns/p", bad_action)
                .unwrap_err()
                .field,
            "action"
        );
    }

    /// A condition ztunnel cannot enforce never widens a policy: an ALLOW
    /// rule that has one is left out (it matches nothing), a DENY rule keeps
    /// its other conditions (it denies more); both are reported. Service
    /// accounts (fields 11 and 12) are understood, so they are not reported.
    #[test]
    fn unenforceable_conditions_narrow_the_policy() {
        let rule = |m: sec::Match| sec::Rule {
            clauses: vec![sec::Clause { matches: vec![m] }],
        };
        let sa = sec::Match {
            service_accounts: vec![sec::ServiceAccountMatch {
                namespace: "ops".into(),
                service_account: "probe".into(),
            }],
            ..sec::Match::default()
        };
        let ext = sec::Match {
            destination_ports: vec![8080],
            extensions: vec![vec![0x0a, 0x03, b'e', b'x', b't']],
            ..sec::Match::default()
        };
        let policy = |action: sec::Action| sec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            action: action as i32,
            rules: vec![rule(sa.clone()), rule(ext.clone())],
            ..sec::Authorization::default()
        };
        let wire = |p: sec::Authorization| {
            sec::Authorization::decode(p.encode_to_vec().as_slice()).unwrap()
        };

        let (allow, report) =
            authorization_from_proto("ns/p", wire(policy(sec::Action::Allow))).unwrap();
        assert_eq!(
            allow.rules.len(),
            1,
            "the ALLOW rule with an extension is left out"
        );
        assert_eq!(
            allow.rules[0].clauses[0].matches[0].service_accounts.len(),
            1
        );
        assert_eq!(report.len(), 1);
        assert_eq!(
            report[0].to_string(),
            "authorization ns/p: rules[1]: extensions cannot be enforced by ztunnel; the rule matches nothing"
        );

        let (deny, report) =
            authorization_from_proto("ns/p", wire(policy(sec::Action::Deny))).unwrap();
        assert_eq!(deny.rules.len(), 2, "the DENY rule stays");
        assert_eq!(
            deny.rules[1].clauses[0].matches[0].destination_ports,
            vec![8080]
        );
        assert_eq!(report[0].rule, 1);
        assert_eq!(
            report[0].effect,
            "the condition is dropped, so the rule denies more"
        );
    }
}
