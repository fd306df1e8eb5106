//! The protobuf messages Istio's ztunnel speaks, written as prost structs.
//!
//! Field numbers, types and full message names are what matter on the wire;
//! they follow Envoy's `envoy/service/discovery/v3/discovery.proto`, Istio's
//! `workload.proto` and `authorization.proto` (as ztunnel vendors them) and
//! `security/v1alpha1/ca.proto`. Fields Weft does not use yet are left out
//! where skipping them is harmless; in `istio.security.Match`, where a skipped
//! condition would widen an ALLOW, every field is modelled (see
//! `convert::authorization_from_proto` for what cannot be enforced).

/// `envoy.service.discovery.v3` (delta ADS) and `google.rpc.Status`.
pub mod discovery {
    use std::collections::BTreeMap;

    use prost_types::{Any, Struct};

    /// `envoy.config.core.v3.Node`, trimmed.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Node {
        #[prost(string, tag = "1")]
        pub id: String,
        #[prost(string, tag = "2")]
        pub cluster: String,
        #[prost(message, optional, tag = "3")]
        pub metadata: Option<Struct>,
        /// Well-known features the client supports (reverse-DNS names).
        #[prost(string, repeated, tag = "10")]
        pub client_features: Vec<String>,
    }

    /// `google.rpc.Status`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Status {
        #[prost(int32, tag = "1")]
        pub code: i32,
        #[prost(string, tag = "2")]
        pub message: String,
        #[prost(message, repeated, tag = "3")]
        pub details: Vec<Any>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeltaDiscoveryRequest {
        #[prost(message, optional, tag = "1")]
        pub node: Option<Node>,
        #[prost(string, tag = "2")]
        pub type_url: String,
        #[prost(string, repeated, tag = "3")]
        pub resource_names_subscribe: Vec<String>,
        #[prost(string, repeated, tag = "4")]
        pub resource_names_unsubscribe: Vec<String>,
        #[prost(btree_map = "string, string", tag = "5")]
        pub initial_resource_versions: BTreeMap<String, String>,
        #[prost(string, tag = "6")]
        pub response_nonce: String,
        /// Set on a NACK: why the last response was (partly) rejected.
        #[prost(message, optional, tag = "7")]
        pub error_detail: Option<Status>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct DeltaDiscoveryResponse {
        #[prost(string, tag = "1")]
        pub system_version_info: String,
        #[prost(message, repeated, tag = "2")]
        pub resources: Vec<Resource>,
        #[prost(string, tag = "4")]
        pub type_url: String,
        #[prost(string, tag = "5")]
        pub nonce: String,
        #[prost(string, repeated, tag = "6")]
        pub removed_resources: Vec<String>,
    }

    /// `google.protobuf.Any` on the wire, its value shared rather than
    /// copied: a push to every client of the same resource clones a pointer.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SharedAny {
        #[prost(string, tag = "1")]
        pub type_url: String,
        #[prost(bytes = "bytes", tag = "2")]
        pub value: prost::bytes::Bytes,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Resource {
        #[prost(string, tag = "1")]
        pub version: String,
        #[prost(message, optional, tag = "2")]
        pub resource: Option<SharedAny>,
        #[prost(string, tag = "3")]
        pub name: String,
        #[prost(string, repeated, tag = "4")]
        pub aliases: Vec<String>,
    }
}

/// `istio.workload`: workloads and services.
pub mod workload {
    use std::collections::BTreeMap;

    /// `istio.workload.Address`: the xDS resource, a workload or a service.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(oneof = "address::Type", tags = "1, 2")]
        pub r#type: Option<address::Type>,
    }

    #[allow(
        clippy::large_enum_variant,
        reason = "generated-style message; boxing would change the API peers expect"
    )]
    pub mod address {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Type {
            #[prost(message, tag = "1")]
            Workload(super::Workload),
            #[prost(message, tag = "2")]
            Service(super::Service),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Workload {
        #[prost(string, tag = "20")]
        pub uid: String,
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        /// Raw network-order IPs: 4 or 16 bytes each.
        #[prost(bytes = "vec", repeated, tag = "3")]
        pub addresses: Vec<Vec<u8>>,
        #[prost(string, tag = "4")]
        pub network: String,
        #[prost(enumeration = "TunnelProtocol", tag = "5")]
        pub tunnel_protocol: i32,
        #[prost(string, tag = "6")]
        pub trust_domain: String,
        #[prost(string, tag = "7")]
        pub service_account: String,
        #[prost(message, optional, tag = "8")]
        pub waypoint: Option<GatewayAddress>,
        #[prost(string, tag = "9")]
        pub node: String,
        #[prost(string, tag = "10")]
        pub canonical_name: String,
        #[prost(string, tag = "11")]
        pub canonical_revision: String,
        #[prost(enumeration = "WorkloadType", tag = "12")]
        pub workload_type: i32,
        #[prost(string, tag = "13")]
        pub workload_name: String,
        /// Selector-scoped policies that apply to this workload, as `namespace/name`.
        #[prost(string, repeated, tag = "16")]
        pub authorization_policies: Vec<String>,
        #[prost(enumeration = "WorkloadStatus", tag = "17")]
        pub status: i32,
        #[prost(string, tag = "18")]
        pub cluster_id: String,
        /// Services this workload backs, keyed `namespace/hostname`.
        #[prost(btree_map = "string, message", tag = "22")]
        pub services: BTreeMap<String, PortList>,
        #[prost(enumeration = "NetworkMode", tag = "25")]
        pub network_mode: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Service {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(string, tag = "3")]
        pub hostname: String,
        #[prost(message, repeated, tag = "4")]
        pub addresses: Vec<NetworkAddress>,
        #[prost(message, repeated, tag = "5")]
        pub ports: Vec<Port>,
        #[prost(string, repeated, tag = "6")]
        pub subject_alt_names: Vec<String>,
        #[prost(message, optional, tag = "7")]
        pub waypoint: Option<GatewayAddress>,
        /// Takes priority in hostname lookups outside the client's namespace;
        /// istiod sets it on every Kubernetes Service.
        #[prost(bool, tag = "11")]
        pub canonical: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PortList {
        #[prost(message, repeated, tag = "1")]
        pub ports: Vec<Port>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Port {
        #[prost(uint32, tag = "1")]
        pub service_port: u32,
        #[prost(uint32, tag = "2")]
        pub target_port: u32,
        #[prost(enumeration = "AppProtocol", tag = "3")]
        pub app_protocol: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NetworkAddress {
        #[prost(string, tag = "1")]
        pub network: String,
        #[prost(bytes = "vec", tag = "2")]
        pub address: Vec<u8>,
        #[prost(uint32, optional, tag = "3")]
        pub length: Option<u32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NamespacedHostname {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub hostname: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GatewayAddress {
        #[prost(oneof = "gateway_address::Destination", tags = "1, 2")]
        pub destination: Option<gateway_address::Destination>,
        #[prost(uint32, tag = "3")]
        pub hbone_mtls_port: u32,
    }

    pub mod gateway_address {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Destination {
            #[prost(message, tag = "1")]
            Hostname(super::NamespacedHostname),
            #[prost(message, tag = "2")]
            Address(super::NetworkAddress),
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum TunnelProtocol {
        None = 0,
        Hbone = 1,
        LegacyIstioMtls = 2,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum WorkloadStatus {
        Healthy = 0,
        Unhealthy = 1,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum NetworkMode {
        Standard = 0,
        HostNetwork = 1,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum WorkloadType {
        Deployment = 0,
        Cronjob = 1,
        Pod = 2,
        Job = 3,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum AppProtocol {
        Unknown = 0,
        Http11 = 1,
        Http2 = 2,
        Grpc = 3,
        Tcp = 4,
        Tls = 5,
    }
}

/// `istio.security`: L4 authorization as ztunnel enforces it.
pub mod security {
    /// One policy. Rules are ORed; a policy with no rules matches nothing.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Authorization {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub namespace: String,
        #[prost(enumeration = "Scope", tag = "3")]
        pub scope: i32,
        #[prost(enumeration = "Action", tag = "4")]
        pub action: i32,
        #[prost(message, repeated, tag = "5")]
        pub rules: Vec<Rule>,
        #[prost(bool, tag = "6")]
        pub dry_run: bool,
    }

    /// Clauses are ANDed.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Rule {
        #[prost(message, repeated, tag = "1")]
        pub clauses: Vec<Clause>,
    }

    /// Matches are ORed.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Clause {
        #[prost(message, repeated, tag = "2")]
        pub matches: Vec<Match>,
    }

    /// Values within a field are ORed, fields are ANDed, `not_*` must all miss.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Match {
        #[prost(message, repeated, tag = "1")]
        pub namespaces: Vec<StringMatch>,
        #[prost(message, repeated, tag = "2")]
        pub not_namespaces: Vec<StringMatch>,
        #[prost(message, repeated, tag = "3")]
        pub principals: Vec<StringMatch>,
        #[prost(message, repeated, tag = "4")]
        pub not_principals: Vec<StringMatch>,
        #[prost(message, repeated, tag = "5")]
        pub source_ips: Vec<Address>,
        #[prost(message, repeated, tag = "6")]
        pub not_source_ips: Vec<Address>,
        #[prost(message, repeated, tag = "7")]
        pub destination_ips: Vec<Address>,
        #[prost(message, repeated, tag = "8")]
        pub not_destination_ips: Vec<Address>,
        #[prost(uint32, repeated, tag = "9")]
        pub destination_ports: Vec<u32>,
        #[prost(uint32, repeated, tag = "10")]
        pub not_destination_ports: Vec<u32>,
        #[prost(message, repeated, tag = "11")]
        pub service_accounts: Vec<ServiceAccountMatch>,
        #[prost(message, repeated, tag = "12")]
        pub not_service_accounts: Vec<ServiceAccountMatch>,
        /// `istio.workload.Extension` conditions, kept opaque: a data plane
        /// that runs none must only know there are some.
        #[prost(bytes = "vec", repeated, tag = "13")]
        pub extensions: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ServiceAccountMatch {
        #[prost(string, tag = "1")]
        pub namespace: String,
        #[prost(string, tag = "2")]
        pub service_account: String,
    }

    /// A CIDR: raw address bytes and prefix length.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Address {
        #[prost(bytes = "vec", tag = "1")]
        pub address: Vec<u8>,
        #[prost(uint32, tag = "2")]
        pub length: u32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StringMatch {
        #[prost(oneof = "string_match::MatchType", tags = "1, 2, 3, 4")]
        pub match_type: Option<string_match::MatchType>,
    }

    pub mod string_match {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum MatchType {
            #[prost(string, tag = "1")]
            Exact(String),
            #[prost(string, tag = "2")]
            Prefix(String),
            #[prost(string, tag = "3")]
            Suffix(String),
            /// Any value at all (`google.protobuf.Empty`).
            #[prost(message, tag = "4")]
            Presence(()),
        }
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Scope {
        Global = 0,
        Namespace = 1,
        WorkloadSelector = 2,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum Action {
        Allow = 0,
        Deny = 1,
    }
}

/// `istio.v1.auth`: the CA service.
pub mod ca {
    use prost_types::Struct;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateRequest {
        /// PEM-encoded PKCS#10 request.
        #[prost(string, tag = "1")]
        pub csr: String,
        #[prost(int64, tag = "3")]
        pub validity_duration: i64,
        /// `ImpersonatedIdentity`: the identity a node agent asks for on a pod's behalf.
        #[prost(message, optional, tag = "4")]
        pub metadata: Option<Struct>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct IstioCertificateResponse {
        /// PEM certificates, one per element: leaf first, root last.
        #[prost(string, repeated, tag = "1")]
        pub cert_chain: Vec<String>,
    }
}

/// `weft.waypoint.v1`: the waypoint's configuration, Weft's own protos
/// (`xds/proto/weft/waypoint/v1/waypoint.proto`), generated by
/// `cargo xtask proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod waypoint {
    include!("generated/weft.waypoint.v1.rs");
}
