//! ztunnel's settings, read from environment variables (names below).
//!
//! Parsing takes a lookup function rather than the live environment so tests
//! never touch process state, and it reports every bad setting at once.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub const ENV_NODE_NAME: &str = "NODE_NAME";
pub const ENV_LOCAL_XDS_PATH: &str = "LOCAL_XDS_PATH";
pub const ENV_LOCAL_CA_CERT: &str = "LOCAL_CA_CERT";
pub const ENV_LOCAL_CA_KEY: &str = "LOCAL_CA_KEY";
pub const ENV_XDS_ADDRESS: &str = "XDS_ADDRESS";
pub const ENV_XDS_SERVER_NAME: &str = "XDS_SERVER_NAME";
pub const ENV_ROOT_CERT: &str = "ROOT_CERT";
pub const ENV_TOKEN_PATH: &str = "TOKEN_PATH";
pub const DEFAULT_XDS_SERVER_NAME: &str = "weft-controller.istio-system.svc";
pub const ENV_CERT_TTL: &str = "CERT_TTL_SECONDS";
pub const ENV_CAPTURE: &str = "CAPTURE";
pub const ENV_ADMIN_ADDR: &str = "ADMIN_ADDR";
pub const ENV_STATS_ADDR: &str = "STATS_ADDR";
pub const ENV_READINESS_ADDR: &str = "READINESS_ADDR";
pub const ENV_MAX_CONNECTIONS: &str = "MAX_CONNECTIONS";
pub const ENV_BPF_PIN_DIR: &str = "BPF_PIN_DIR";
pub const ENV_DRAIN_DURATION: &str = "DRAIN_DURATION";
/// How long a stopping ztunnel lets open connections finish (Istio's and
/// Kubernetes' default grace period).
pub const DEFAULT_DRAIN_DURATION: Duration = Duration::from_secs(30);
/// Istio's name for it: the proxy's worker threads.
pub const ENV_WORKER_THREADS: &str = "ZTUNNEL_WORKER_THREADS";
/// As Istio's ztunnel: two, whatever the node's size.
pub const DEFAULT_WORKER_THREADS: usize = 2;
/// Where capture is pinned: the node's bpffs (the DaemonSet mounts the host's
/// `/sys/fs/bpf`), one directory per node network namespace.
pub const DEFAULT_BPF_PIN_DIR: &str = "/sys/fs/bpf/weft";

/// Istio's ports.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = weft_hbone::HBONE_PORT;
/// Capture listeners only ever receive segments steered to them by the eBPF
/// program, so they bind loopback: nothing can dial them from outside.
pub const DEFAULT_LISTEN_ADDR: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Admin exposes config: local only, as in Istio.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_STATS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// Istio's default workload certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Mark and table of the capture policy route; any values unused on the node do.
pub const REDIRECT_MARK: u32 = 0x5e0;
pub const REDIRECT_TABLE: u32 = 15001;
/// Connections a listening port (15001, 15006, 15008) holds at once, across
/// the proxy workers, before refusing new ones (storm guard).
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Inbound HBONE streams from one peer address (a pod, now that tunnels are
/// dialled from the pod), as a share of all inbound streams (which are
/// bounded like connections, `MAX_CONNECTIONS`: each holds an upstream
/// socket): one noisy or hostile peer cannot take every stream.
pub const INBOUND_STREAMS_PEER_SHARE: usize = 2;
/// How long an upstream connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often interfaces and captured pods are re-synced into the kernel.
pub const CAPTURE_SYNC_INTERVAL: Duration = Duration::from_millis(500);

/// How pods' traffic reaches ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureMode {
    /// tc eBPF programs on the node's interfaces (the default).
    Ebpf,
    /// Nothing is captured: listeners only (development without root).
    None,
}

/// Where config and certificates come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The controller: delta xDS and the mesh CA at `address`, whose serving
    /// certificate must name `server_name` and chain to `root_cert`;
    /// `token_path` holds this node's bearer token (re-read on every call).
    Controller {
        /// `host:port` or `ip:port`, resolved at each dial.
        address: String,
        server_name: String,
        root_cert: PathBuf,
        token_path: PathBuf,
    },
    /// Development mode: static workloads and services from a file, and a
    /// local CA (root certificate and key).
    Local {
        xds_path: PathBuf,
        ca_cert: PathBuf,
        ca_key: PathBuf,
    },
}

#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name: workloads whose `node` matches are local.
    pub node_name: String,
    pub source: Source,
    /// Lifetime of issued workload certificates; renewed at half-life.
    pub cert_ttl: Duration,
    /// How traffic is captured.
    pub capture: CaptureMode,
    /// Address the capture listeners bind (with IP_TRANSPARENT).
    pub listen_addr: Ipv4Addr,
    /// Admin server: `/config_dump`.
    pub admin_addr: SocketAddr,
    /// Prometheus metrics: `/metrics`, `/stats/prometheus`.
    pub stats_addr: SocketAddr,
    /// Readiness: `/healthz/ready`.
    pub readiness_addr: SocketAddr,
    /// Per-listener connection limit.
    pub max_connections: usize,
    /// bpffs directory where capture's maps and links are pinned.
    pub bpf_pin_dir: PathBuf,
    /// On SIGTERM: stop accepting, GOAWAY, and give open connections this
    /// long to finish.
    pub drain_duration: Duration,
    /// Proxy worker threads, each with a runtime and listeners of its own
    /// ([`crate::proxy::Proxy`]).
    pub worker_threads: usize,
    /// In a cluster: where to ask, on SIGTERM, whether this is a rollout or
    /// a removal ([`crate::removal`]).
    pub cluster: Option<crate::removal::ClusterAccess>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigError(pub Vec<String>);

// === impl Config ===

impl Config {
    /// Reads the configuration through `get` (e.g. `|k| std::env::var(k).ok()`).
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let mut required = |name: &str| {
            get(name).filter(|v| !v.is_empty()).unwrap_or_else(|| {
                errors.push(format!("{name} is required"));
                String::new()
            })
        };
        let node_name = required(ENV_NODE_NAME);
        let source = match get(ENV_XDS_ADDRESS).filter(|v| !v.is_empty()) {
            Some(addr) => {
                let root_cert = PathBuf::from(required(ENV_ROOT_CERT));
                let token_path = PathBuf::from(required(ENV_TOKEN_PATH));
                let server_name =
                    get(ENV_XDS_SERVER_NAME).unwrap_or_else(|| DEFAULT_XDS_SERVER_NAME.to_string());
                if weft_xds::grpc::is_address(&addr) {
                    Some(Source::Controller {
                        address: addr,
                        server_name,
                        root_cert,
                        token_path,
                    })
                } else {
                    errors.push(format!(
                        "{ENV_XDS_ADDRESS}={addr:?}: want host:port or ip:port"
                    ));
                    None
                }
            }
            None => Some(Source::Local {
                xds_path: PathBuf::from(required(ENV_LOCAL_XDS_PATH)),
                ca_cert: PathBuf::from(required(ENV_LOCAL_CA_CERT)),
                ca_key: PathBuf::from(required(ENV_LOCAL_CA_KEY)),
            }),
        };

        let parse = |name: &str, default: &str| -> Option<String> {
            Some(get(name).unwrap_or_else(|| default.to_string()))
        };
        let addr = |name: &str, v: Option<String>, errors: &mut Vec<String>| {
            v.and_then(|v| {
                v.parse::<SocketAddr>()
                    .map_err(|e| errors.push(format!("{name}={v:?}: {e}; want ip:port")))
                    .ok()
            })
        };
        let admin = parse(ENV_ADMIN_ADDR, DEFAULT_ADMIN_ADDR);
        let stats = parse(ENV_STATS_ADDR, DEFAULT_STATS_ADDR);
        let ready = parse(ENV_READINESS_ADDR, DEFAULT_READINESS_ADDR);
        let ttl = parse(ENV_CERT_TTL, &DEFAULT_CERT_TTL.as_secs().to_string());
        let capture = parse(ENV_CAPTURE, "ebpf");
        let max_conns = parse(ENV_MAX_CONNECTIONS, &DEFAULT_MAX_CONNECTIONS.to_string());
        let drain = parse(
            ENV_DRAIN_DURATION,
            &DEFAULT_DRAIN_DURATION.as_secs().to_string(),
        );

        let admin_addr = addr(ENV_ADMIN_ADDR, admin, &mut errors);
        let stats_addr = addr(ENV_STATS_ADDR, stats, &mut errors);
        let readiness_addr = addr(ENV_READINESS_ADDR, ready, &mut errors);
        let cert_ttl = ttl.and_then(|v| match v.parse::<u64>() {
            Ok(s) if s >= 2 => Some(Duration::from_secs(s)),
            _ => {
                errors.push(format!(
                    "{ENV_CERT_TTL}={v:?}: want whole seconds, at least 2"
                ));
                None
            }
        });
        let capture = capture.and_then(|v| match v.as_str() {
            "ebpf" => Some(CaptureMode::Ebpf),
            "none" => Some(CaptureMode::None),
            _ => {
                errors.push(format!("{ENV_CAPTURE}={v:?}: want ebpf or none"));
                None
            }
        });
        let max_connections = max_conns.and_then(|v| match v.parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                errors.push(format!(
                    "{ENV_MAX_CONNECTIONS}={v:?}: want a positive number"
                ));
                None
            }
        });
        let workers = parse(ENV_WORKER_THREADS, &DEFAULT_WORKER_THREADS.to_string());
        let worker_threads = workers.and_then(|v| match v.parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => Some(n),
            _ => {
                errors.push(format!("{ENV_WORKER_THREADS}={v:?}: want 1 to 64"));
                None
            }
        });
        let drain_duration = drain.and_then(|v| match v.parse::<u64>() {
            Ok(s) if s <= 3600 => Some(Duration::from_secs(s)),
            _ => {
                errors.push(format!(
                    "{ENV_DRAIN_DURATION}={v:?}: want whole seconds, at most 3600"
                ));
                None
            }
        });
        match (
            source,
            admin_addr,
            stats_addr,
            readiness_addr,
            cert_ttl,
            capture,
            max_connections,
            drain_duration,
            worker_threads,
        ) {
            (
                Some(source),
                Some(admin_addr),
                Some(stats_addr),
                Some(readiness_addr),
                Some(cert_ttl),
                Some(capture),
                Some(max_connections),
                Some(drain_duration),
                Some(worker_threads),
            ) if errors.is_empty() => Ok(Config {
                source,
                cert_ttl,
                capture,
                listen_addr: DEFAULT_LISTEN_ADDR,
                bpf_pin_dir: bpf_pin_dir(get),
                drain_duration,
                worker_threads,
                admin_addr,
                stats_addr,
                readiness_addr,
                max_connections,
                cluster: crate::removal::ClusterAccess::from_env(get, &node_name),
                node_name,
            }),
            _ => Err(ConfigError(errors)),
        }
    }
}

/// `BPF_PIN_DIR`, or its default: all `ztunnel uninstall` needs.
pub fn bpf_pin_dir(get: &dyn Fn(&str) -> Option<String>) -> PathBuf {
    PathBuf::from(
        get(ENV_BPF_PIN_DIR)
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| DEFAULT_BPF_PIN_DIR.to_string()),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const REQUIRED: [(&str, &str); 4] = [
        (ENV_NODE_NAME, "node-1"),
        (ENV_LOCAL_XDS_PATH, "/tmp/x.yaml"),
        (ENV_LOCAL_CA_CERT, "/tmp/ca.pem"),
        (ENV_LOCAL_CA_KEY, "/tmp/ca.key"),
    ];

    /// Defaults are Istio's ports and a 24 h certificate lifetime.
    #[test]
    fn defaults() {
        let cfg = Config::from_lookup(&lookup(&REQUIRED)).unwrap();
        assert_eq!(cfg.admin_addr.port(), 15000);
        assert_eq!(cfg.stats_addr.port(), 15020);
        assert_eq!(cfg.readiness_addr.port(), 15021);
        assert_eq!(cfg.cert_ttl, DEFAULT_CERT_TTL);
        assert_eq!(cfg.capture, CaptureMode::Ebpf);
        assert_eq!(cfg.bpf_pin_dir, PathBuf::from(DEFAULT_BPF_PIN_DIR));
    }

    /// Every bad setting is reported in one error, by name.
    #[test]
    fn all_errors_at_once() {
        let mut pairs = vec![
            (ENV_ADMIN_ADDR, "nope"),
            (ENV_CERT_TTL, "1"),
            (ENV_CAPTURE, "iptables"),
            (ENV_WORKER_THREADS, "0"),
        ];
        pairs.push((ENV_NODE_NAME, "n"));
        let err = Config::from_lookup(&lookup(&pairs))
            .unwrap_err()
            .to_string();
        for want in [
            ENV_LOCAL_XDS_PATH,
            ENV_LOCAL_CA_CERT,
            ENV_LOCAL_CA_KEY,
            ENV_ADMIN_ADDR,
            ENV_CERT_TTL,
            ENV_CAPTURE,
            ENV_WORKER_THREADS,
        ] {
            assert!(err.contains(want), "{want} missing from: {err}");
        }
    }

    /// With a controller address, the controller's settings are required instead.
    #[test]
    fn controller_source() {
        let cfg = Config::from_lookup(&lookup(&[
            (ENV_NODE_NAME, "n"),
            (ENV_XDS_ADDRESS, "10.0.0.1:15012"),
            (ENV_ROOT_CERT, "/r.pem"),
            (ENV_TOKEN_PATH, "/t"),
        ]))
        .unwrap();
        assert!(
            matches!(cfg.source, Source::Controller { ref server_name, .. } if server_name == DEFAULT_XDS_SERVER_NAME)
        );
        // A Service's name, as the chart sets it: looked up at each dial.
        let cfg = Config::from_lookup(&lookup(&[
            (ENV_NODE_NAME, "n"),
            (ENV_XDS_ADDRESS, "weft-controller.weft-system.svc:15012"),
            (ENV_ROOT_CERT, "/r.pem"),
            (ENV_TOKEN_PATH, "/t"),
        ]))
        .unwrap();
        assert!(
            matches!(cfg.source, Source::Controller { ref address, .. } if address == "weft-controller.weft-system.svc:15012")
        );
        let err = Config::from_lookup(&lookup(&[(ENV_NODE_NAME, "n"), (ENV_XDS_ADDRESS, "nope")]))
            .unwrap_err()
            .to_string();
        for want in [ENV_XDS_ADDRESS, ENV_ROOT_CERT, ENV_TOKEN_PATH] {
            assert!(err.contains(want), "{want} missing from: {err}");
        }
        assert!(!err.contains(ENV_LOCAL_XDS_PATH));
    }
}
