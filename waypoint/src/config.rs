//! The waypoint's settings, from the environment a waypoint pod gets (the
//! names Istio's proxies use where one exists). Parsing takes a lookup
//! function, so tests never touch process state; every bad setting is
//! reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use weft_api::Identity;

pub const ENV_XDS_ADDRESS: &str = "XDS_ADDRESS";
pub const ENV_XDS_SERVER_NAME: &str = "XDS_SERVER_NAME";
pub const ENV_ROOT_CERT: &str = "ROOT_CERT";
pub const ENV_TOKEN_PATH: &str = "TOKEN_PATH";
pub const ENV_POD_NAME: &str = "POD_NAME";
pub const ENV_POD_NAMESPACE: &str = "POD_NAMESPACE";
pub const ENV_SERVICE_ACCOUNT: &str = "SERVICE_ACCOUNT";
/// The Gateway this pod serves (its `gateway.networking.k8s.io/gateway-name`
/// label); the service account's name when unset, as Istio names both alike.
pub const ENV_GATEWAY_NAME: &str = "GATEWAY_NAME";
pub const ENV_TRUST_DOMAIN: &str = "TRUST_DOMAIN";
pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_LISTEN_ADDR: &str = "LISTEN_ADDR";
pub const ENV_STATS_ADDR: &str = "STATS_ADDR";
pub const ENV_READINESS_ADDR: &str = "READINESS_ADDR";
pub const ENV_CERT_TTL: &str = "CERT_TTL_SECONDS";
/// Benchmarks only: plain HTTP here, handled as CONNECTs to `PLAIN_HTTP_TARGET`.
pub const ENV_PLAIN_HTTP_ADDR: &str = "PLAIN_HTTP_ADDR";
pub const ENV_PLAIN_HTTP_TARGET: &str = "PLAIN_HTTP_TARGET";
pub const ENV_DRAIN_DURATION: &str = "DRAIN_DURATION";

const DEFAULT_XDS_SERVER_NAME: &str = "weft-controller.istio-system.svc";
const DEFAULT_LISTEN_ADDR: &str = "0.0.0.0:15008";
const DEFAULT_STATS_ADDR: &str = "0.0.0.0:15020";
const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_DRAIN_DURATION: Duration = Duration::from_secs(30);
/// CONNECT streams at once, in total; one peer gets half.
pub const MAX_STREAMS: usize = 20_000;

#[derive(Clone, Debug)]
pub struct Config {
    /// The controller: delta xDS and the CA, `ip:port` or `host:port`
    /// (resolved at start: a Service name).
    pub xds_address: String,
    pub xds_server_name: String,
    /// The mesh root that vouches for the controller.
    pub root_cert: PathBuf,
    /// This pod's service account token (re-read at each use).
    pub token_path: PathBuf,
    pub pod_name: String,
    pub node_name: String,
    /// The waypoint's own identity: its pod's service account.
    pub identity: Identity,
    /// The Gateway this waypoint is: only traffic bound to it is served.
    pub gateway: String,
    /// HBONE (15008).
    pub listen_addr: SocketAddr,
    /// Prometheus: `/metrics`, `/stats/prometheus`.
    pub stats_addr: SocketAddr,
    /// Readiness: `/healthz/ready`.
    pub readiness_addr: SocketAddr,
    /// Benchmarks only: (listen address, the VIP:port every connection reaches).
    pub plain_http: Option<(SocketAddr, SocketAddr)>,
    pub cert_ttl: Duration,
    pub drain_duration: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

impl Config {
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let mut required = |name: &str| {
            get(name).filter(|v| !v.is_empty()).unwrap_or_else(|| {
                errors.push(format!("{name} is required"));
                String::new()
            })
        };
        let xds = required(ENV_XDS_ADDRESS);
        let root_cert = PathBuf::from(required(ENV_ROOT_CERT));
        let token_path = PathBuf::from(required(ENV_TOKEN_PATH));
        let pod_name = required(ENV_POD_NAME);
        let namespace = required(ENV_POD_NAMESPACE);
        let service_account = required(ENV_SERVICE_ACCOUNT);
        let or = |name: &str, default: &str| get(name).unwrap_or_else(|| default.to_string());
        let trust_domain = or(ENV_TRUST_DOMAIN, "cluster.local");
        let xds_address = match xds {
            _ if weft_xds::grpc::is_address(&xds) => Some(xds),
            _ if xds.is_empty() => None,
            _ => {
                errors.push(format!(
                    "{ENV_XDS_ADDRESS}={xds:?}: want host:port or ip:port"
                ));
                None
            }
        };
        let mut addr = |name: &str, v: String| {
            v.parse::<SocketAddr>()
                .map_err(|e| errors.push(format!("{name}={v:?}: {e}; want ip:port")))
                .ok()
        };
        let listen_addr = addr(ENV_LISTEN_ADDR, or(ENV_LISTEN_ADDR, DEFAULT_LISTEN_ADDR));
        let stats_addr = addr(ENV_STATS_ADDR, or(ENV_STATS_ADDR, DEFAULT_STATS_ADDR));
        let readiness_addr = addr(
            ENV_READINESS_ADDR,
            or(ENV_READINESS_ADDR, DEFAULT_READINESS_ADDR),
        );
        let plain_http = match (get(ENV_PLAIN_HTTP_ADDR), get(ENV_PLAIN_HTTP_TARGET)) {
            (Some(a), Some(t)) => {
                match (addr(ENV_PLAIN_HTTP_ADDR, a), addr(ENV_PLAIN_HTTP_TARGET, t)) {
                    (Some(a), Some(t)) => Some((a, t)),
                    _ => None,
                }
            }
            (None, None) => None,
            _ => {
                errors.push(format!(
                    "{ENV_PLAIN_HTTP_ADDR} and {ENV_PLAIN_HTTP_TARGET} go together"
                ));
                None
            }
        };
        let mut seconds = |name: &str, default: Duration| {
            let v = or(name, &default.as_secs().to_string());
            v.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|e| errors.push(format!("{name}={v:?}: {e}; want seconds")))
                .ok()
        };
        let cert_ttl = seconds(ENV_CERT_TTL, DEFAULT_CERT_TTL);
        let drain_duration = seconds(ENV_DRAIN_DURATION, DEFAULT_DRAIN_DURATION);
        let identity = if namespace.is_empty() || service_account.is_empty() {
            None
        } else {
            Identity::new(&trust_domain, &namespace, &service_account)
                .map_err(|e| errors.push(format!("{ENV_SERVICE_ACCOUNT}: {e}")))
                .ok()
        };
        match (
            xds_address,
            listen_addr,
            stats_addr,
            readiness_addr,
            cert_ttl,
            drain_duration,
            identity,
        ) {
            (
                Some(xds_address),
                Some(listen_addr),
                Some(stats_addr),
                Some(readiness_addr),
                Some(cert_ttl),
                Some(drain_duration),
                Some(identity),
            ) if errors.is_empty() => Ok(Config {
                xds_address,
                xds_server_name: or(ENV_XDS_SERVER_NAME, DEFAULT_XDS_SERVER_NAME),
                root_cert,
                token_path,
                pod_name,
                node_name: or(ENV_NODE_NAME, ""),
                gateway: get(ENV_GATEWAY_NAME)
                    .filter(|g| !g.is_empty())
                    .unwrap_or_else(|| identity.service_account().to_string()),
                identity,
                listen_addr,
                stats_addr,
                readiness_addr,
                plain_http,
                cert_ttl,
                drain_duration,
            }),
            _ => Err(ConfigError(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_and_defaults() {
        let env = |k: &str| {
            let v = match k {
                ENV_XDS_ADDRESS => "10.240.0.1:15012",
                ENV_ROOT_CERT => "/r",
                ENV_TOKEN_PATH => "/t",
                ENV_POD_NAME => "waypoint-0",
                ENV_POD_NAMESPACE => "shop",
                ENV_SERVICE_ACCOUNT => "waypoint",
                _ => return None,
            };
            Some(v.to_string())
        };
        let c = Config::from_lookup(&env).unwrap();
        assert_eq!(
            c.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/waypoint"
        );
        assert_eq!(c.listen_addr.port(), 15008);
        let e = Config::from_lookup(&|k| {
            if k == ENV_LISTEN_ADDR {
                Some("nope".into())
            } else {
                None
            }
        })
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains("XDS_ADDRESS is required"), "{text}");
        assert!(text.contains("LISTEN_ADDR=\"nope\""), "{text}");
    }
}
