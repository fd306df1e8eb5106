//! The resource types the control plane serves, in one registry: each
//! type's URL, its short name (logs, metrics) and which proxies may
//! subscribe to it. The server answers a type only from here; adding a type
//! is one entry.

/// Which proxies a resource type is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Node proxies (ztunnel) only.
    Ztunnel,
    /// Waypoints only.
    Waypoint,
    /// Both.
    All,
}

/// What kind of proxy a client is, as its authentication says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Ztunnel,
    Waypoint,
}

impl Audience {
    pub fn admits(self, role: Role) -> bool {
        matches!(
            (self, role),
            (Audience::All, _)
                | (Audience::Ztunnel, Role::Ztunnel)
                | (Audience::Waypoint, Role::Waypoint)
        )
    }
}

/// One served resource type.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    pub type_url: &'static str,
    /// Short name, for logs and metric labels.
    pub name: &'static str,
    pub audience: Audience,
    /// Each resource names the workloads that may see it (a waypoint's
    /// routes and policies): a client is sent a subset, never the type
    /// whole.
    pub scoped: bool,
}

/// Workloads and services (`istio.workload.Address`): the mesh view, which
/// waypoints need as well to reach their backends.
pub const ADDRESS: ResourceType = ResourceType {
    type_url: "type.googleapis.com/istio.workload.Address",
    name: "address",
    audience: Audience::All,
    scoped: false,
};

/// L4 authorization (`istio.security.Authorization`), enforced by ztunnel.
pub const AUTHORIZATION: ResourceType = ResourceType {
    type_url: "type.googleapis.com/istio.security.Authorization",
    name: "authorization",
    audience: Audience::Ztunnel,
    scoped: false,
};

/// One service's HTTP routes (`weft.waypoint.v1.Route`).
pub const ROUTE: ResourceType = ResourceType {
    type_url: "type.googleapis.com/weft.waypoint.v1.Route",
    name: "route",
    audience: Audience::Waypoint,
    scoped: true,
};

/// One service's traffic policy and subsets (`weft.waypoint.v1.Destination`).
pub const DESTINATION: ResourceType = ResourceType {
    type_url: "type.googleapis.com/weft.waypoint.v1.Destination",
    name: "destination",
    audience: Audience::Waypoint,
    scoped: true,
};

/// L7 authorization (`weft.waypoint.v1.Authorization`), enforced by waypoints.
pub const L7_AUTHORIZATION: ResourceType = ResourceType {
    type_url: "type.googleapis.com/weft.waypoint.v1.Authorization",
    name: "l7_authorization",
    audience: Audience::Waypoint,
    scoped: true,
};

/// One waypoint's tracing and other telemetry (`weft.waypoint.v1.Telemetry`).
pub const TELEMETRY: ResourceType = ResourceType {
    type_url: "type.googleapis.com/weft.waypoint.v1.Telemetry",
    name: "telemetry",
    audience: Audience::Waypoint,
    scoped: true,
};

/// Every type the control plane serves.
pub const REGISTRY: &[&ResourceType] = &[
    &ADDRESS,
    &AUTHORIZATION,
    &ROUTE,
    &DESTINATION,
    &L7_AUTHORIZATION,
    &TELEMETRY,
];

/// The registered type with this URL.
pub fn lookup(type_url: &str) -> Option<&'static ResourceType> {
    REGISTRY.iter().copied().find(|t| t.type_url == type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry() {
        assert_eq!(lookup(ADDRESS.type_url), Some(&ADDRESS));
        assert_eq!(
            lookup("type.googleapis.com/envoy.config.cluster.v3.Cluster"),
            None
        );
        let mut urls: Vec<_> = REGISTRY.iter().map(|t| t.type_url).collect();
        urls.dedup();
        assert_eq!(urls.len(), REGISTRY.len(), "type URLs are unique");
        assert!(ADDRESS.audience.admits(Role::Waypoint));
        assert!(!AUTHORIZATION.audience.admits(Role::Waypoint));
        assert!(AUTHORIZATION.audience.admits(Role::Ztunnel));
        assert!(!ROUTE.audience.admits(Role::Ztunnel));
    }
}
