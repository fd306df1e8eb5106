//! A lab: an underlay namespace with a bridge, a namespace per node (ztunnel
//! runs there), a namespace per pod wired to its node by a veth pair.
//!
//! ```text
//!  pod ns: eth0 10.244.N.x/32 ─veth─ p<k> (169.254.1.1) node ns: eth0 10.240.0.(10+N) ─veth─ n<N> [br0] underlay ns
//! ```
//! Pods route everything to 169.254.1.1 (their node); nodes route remote pods
//! via the other node's underlay address. Service VIPs have no route: only
//! ztunnel resolves them, as in ambient mode.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use weft_controller::translate::{self, Mesh};
use weft_controller::{Snapshot, manifests};
use weft_hbone::ca::Ca;

use crate::chart::{Chart, Volume};
use crate::netns::{self, NetNs};

/// Where labs register themselves, so a crashed one can be found and removed.
const REGISTRY: &str = "/run/weft-lab";
/// A bpf filesystem for the labs' pinned capture (`<id>/<node>` per ztunnel),
/// mounted while a lab needs it: `ip netns exec` remounts `/sys`, so the
/// host's `/sys/fs/bpf` is not visible to the nodes, while `/run` is.
const BPFFS: &str = "/run/weft-lab/bpffs";
/// A node's bpffs, as the chart mounts it.
const NODE_BPFFS: &str = "/sys/fs/bpf";
/// Per-namespace files `ip netns exec` mounts over `/etc`.
const ETC_NETNS: &str = "/etc/netns";
/// The pods' gateway: an address on every pod-facing veth of a node.
pub const POD_GATEWAY: &str = "169.254.1.1";
/// ztunnel's ports, as seen from inside a node.
pub const READINESS_PORT: u16 = 15021;
pub const STATS_PORT: u16 = 15020;
pub const ADMIN_PORT: u16 = 15000;

/// What to build.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Short name for logs and the lab id (e.g. the test's name).
    pub name: String,
    /// The scenario: Kubernetes YAML (Namespaces, Pods, Services, Nodes).
    pub manifests: String,
    /// Where the `ztunnel` and `weft-controller` binaries are.
    pub bin_dir: PathBuf,
    /// Extra environment for every ztunnel.
    pub ztunnel_env: Vec<(String, String)>,
    /// Extra environment for the controller.
    pub controller_env: Vec<(String, String)>,
    /// Extra environment for every waypoint.
    pub waypoint_env: Vec<(String, String)>,
    /// Run the controller and ztunnels as the Helm chart, rendered with
    /// this values file, declares them ([`crate::chart`]).
    pub chart_values: Option<PathBuf>,
    /// Wire pods as a bridge CNI does (flannel, the bridge plugin): each
    /// node's pods on one Linux bridge `cni0`, on-link in their /24 with the
    /// bridge as gateway. Otherwise as a routed CNI (Calico, Cilium): a /32
    /// route per pod veth.
    pub bridge_cni: bool,
}

/// A node of the lab.
#[derive(Clone, Debug)]
pub struct LabNode {
    pub name: String,
    pub netns: NetNs,
    pub underlay_ip: Ipv4Addr,
    /// The node's underlay interface (inside its namespace).
    pub underlay_iface: String,
}

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct LabPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    pub netns: NetNs,
}

/// A running lab. Dropping it tears everything down.
#[derive(Debug)]
pub struct Lab {
    id: String,
    dir: PathBuf,
    opts: LabOptions,
    snapshot: Snapshot,
    nodes: BTreeMap<String, LabNode>,
    pods: BTreeMap<String, LabPod>,
    ztunnels: BTreeMap<String, Child>,
    /// The ztunnel binary the next start runs, when not `bin_dir`'s.
    ztunnel_bin: Option<PathBuf>,
    /// Waypoint processes by pod key (`namespace/name`).
    waypoints: BTreeMap<String, Child>,
    controller: Option<Child>,
    underlay: Option<NetNs>,
    /// The rendered chart, when the lab runs what it declares.
    chart: Option<Chart>,
    torn_down: bool,
}

/// Waits up to `limit` for `child` (`what`, for the error) to exit, as after
/// a SIGTERM; past it, kills and reaps it and fails.
pub fn wait_exit(child: &mut Child, what: &str, limit: Duration) -> Result<ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} still running {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Labs alive in this process, for the Ctrl-C handler.
static ACTIVE: Mutex<Vec<(String, Vec<u32>)>> = Mutex::new(Vec::new());
static INTERRUPT: Once = Once::new();

// === impl LabOptions ===

impl LabOptions {
    pub fn new(name: &str, manifests: &str) -> Self {
        LabOptions {
            name: name.to_string(),
            manifests: manifests.to_string(),
            bin_dir: bin_dir(),
            ztunnel_env: Vec::new(),
            controller_env: Vec::new(),
            waypoint_env: Vec::new(),
            chart_values: None,
            bridge_cni: false,
        }
    }

    /// Pods on a Linux bridge per node, as a bridge CNI wires them.
    pub fn bridge_cni(mut self) -> Self {
        self.bridge_cni = true;
        self
    }

    /// The controller and ztunnels as `charts/weft` renders them with `values`.
    pub fn chart(mut self, values: &Path) -> Self {
        self.chart_values = Some(values.to_path_buf());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.ztunnel_env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn controller_env(mut self, key: &str, value: &str) -> Self {
        self.controller_env
            .push((key.to_string(), value.to_string()));
        self
    }
}

/// Where this workspace's binaries are: `$WEFT_BIN_DIR`, else `target/debug`.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("WEFT_BIN_DIR") {
        return PathBuf::from(dir);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug")
}

/// The controller's address on the underlay (it runs in the underlay namespace).
pub const CONTROLLER_IP: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);
pub const CONTROLLER_PORT: u16 = 15012;
pub const CONTROLLER_NAME: &str = "weft-controller.istio-system.svc";

fn lab_id() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mix = std::process::id()
        .wrapping_mul(2654435761)
        .wrapping_add(nanos)
        .wrapping_add(N.fetch_add(1, Ordering::Relaxed).wrapping_mul(40503));
    format!("w{:06x}", mix & 0xff_ffff)
}

fn short(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(24)
        .collect()
}

// === impl Lab ===

impl Lab {
    /// Builds the topology, writes config and certificates, starts one ztunnel
    /// per node and waits until each is ready.
    pub fn up(opts: LabOptions) -> Result<Lab> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the lab needs root (network namespaces, eBPF): run as root");
        }
        for bin in ["ztunnel", "weft-controller"] {
            if !opts.bin_dir.join(bin).exists() {
                bail!(
                    "{bin} not found in {}: build it first (`cargo build -p weft-ztunnel -p weft-controller`) or set WEFT_BIN_DIR",
                    opts.bin_dir.display()
                );
            }
        }
        install_interrupt_cleanup();
        down_stale()?;
        let id = lab_id();
        let dir = std::env::temp_dir().join(format!("weft-lab-{id}"));
        fs::create_dir_all(&dir)?;
        fs::create_dir_all(REGISTRY)?;
        mount_bpffs(&id)?;
        let mut lab = Lab {
            id,
            dir,
            opts,
            snapshot: Snapshot::default(),
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            ztunnels: BTreeMap::new(),
            ztunnel_bin: None,
            waypoints: BTreeMap::new(),
            controller: None,
            underlay: None,
            chart: None,
            torn_down: false,
        };
        lab.register()?;
        // From here on, Drop cleans up whatever was made.
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let errors = manifests::parse(&self.opts.manifests, "scenario", &mut self.snapshot);
        if let Some(e) = errors.first() {
            bail!("scenario: {e}");
        }
        let waypoint_pods = self.add_waypoint_pods();
        if !waypoint_pods.is_empty() && !self.opts.bin_dir.join("waypoint").exists() {
            bail!(
                "the scenario declares waypoints but waypoint is not in {}: build it (`cargo build -p weft-waypoint`)",
                self.opts.bin_dir.display()
            );
        }
        self.place_pods()?;

        let ul = NetNs::create(&format!("{}-ul", self.id))?;
        ul.ip(&["link", "add", "br0", "type", "bridge"])?;
        ul.ip(&["link", "set", "br0", "up"])?;
        ul.ip(&["addr", "add", &format!("{CONTROLLER_IP}/24"), "dev", "br0"])?;
        ul.ip(&["link", "set", "lo", "up"])?;
        self.underlay = Some(ul.clone());

        let node_names: Vec<String> = self.node_names();
        for (i, name) in node_names.iter().enumerate() {
            let ns = NetNs::create(&format!("{}-{}", self.id, short(name)))?;
            let ul_end = format!("n{i}");
            veth(&ns, "eth0", &ul, &ul_end)?;
            ul.ip(&["link", "set", &ul_end, "master", "br0", "up"])?;
            let ip = Ipv4Addr::new(10, 240, 0, 10 + i as u8);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            self.nodes.insert(
                name.clone(),
                LabNode {
                    name: name.clone(),
                    netns: ns,
                    underlay_ip: ip,
                    underlay_iface: "eth0".into(),
                },
            );
        }

        if let Some(values) = self.opts.chart_values.clone() {
            self.use_chart(&values)?;
        }

        let pods: Vec<(String, String, String, Ipv4Addr)> = self
            .snapshot
            .pods
            .values()
            .map(|p| {
                let spec = p.spec.clone().unwrap_or_default();
                let ip = p
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_ref())
                    .and_then(|ip| ip.parse().ok())
                    .unwrap_or(Ipv4Addr::UNSPECIFIED);
                (
                    p.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    p.metadata.name.clone().unwrap_or_default(),
                    spec.node_name.unwrap_or_default(),
                    ip,
                )
            })
            .collect();
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        let mut bridges: std::collections::BTreeSet<(String, Ipv4Addr)> = Default::default();
        for (namespace, name, node, ip) in pods {
            let k = per_node.entry(node.clone()).or_default();
            let host_end = format!("p{k}");
            *k += 1;
            let node_ns = self.nodes[&node].netns.clone();
            let ns = NetNs::create(&format!(
                "{}-{}-{}",
                self.id,
                short(&namespace),
                short(&name)
            ))?;
            veth(&ns, "eth0", &node_ns, &host_end)?;
            if self.opts.bridge_cni {
                // The pod's /24 on the node's bridge, the bridge its gateway.
                let o = ip.octets();
                let gw = Ipv4Addr::new(o[0], o[1], o[2], 1);
                if bridges.insert((node.clone(), gw)) {
                    if node_ns.ip(&["link", "show", "cni0"]).is_err() {
                        node_ns.ip(&["link", "add", "cni0", "type", "bridge"])?;
                        node_ns.ip(&["link", "set", "cni0", "up"])?;
                    }
                    node_ns.ip(&["addr", "add", &format!("{gw}/24"), "dev", "cni0"])?;
                }
                ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
                ns.ip(&["link", "set", "eth0", "up"])?;
                ns.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &gw.to_string(),
                    "dev",
                    "eth0",
                ])?;
                node_ns.ip(&["link", "set", &host_end, "master", "cni0", "up"])?;
            } else {
                ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
                ns.ip(&["link", "set", "eth0", "up"])?;
                ns.ip(&["route", "add", POD_GATEWAY, "dev", "eth0", "scope", "link"])?;
                ns.ip(&["route", "add", "default", "via", POD_GATEWAY, "dev", "eth0"])?;
                node_ns.ip(&[
                    "addr",
                    "add",
                    &format!("{POD_GATEWAY}/32"),
                    "dev",
                    &host_end,
                ])?;
                node_ns.ip(&["link", "set", &host_end, "up"])?;
                node_ns.ip(&[
                    "route",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    &host_end,
                    "scope",
                    "link",
                ])?;
            }
            for (other, n) in &self.nodes {
                if *other != node {
                    let via = self.nodes[&node].underlay_ip.to_string();
                    n.netns
                        .ip(&["route", "add", &format!("{ip}/32"), "via", &via])?;
                }
            }
            self.pods.insert(
                format!("{namespace}/{name}"),
                LabPod {
                    namespace,
                    name,
                    node,
                    ip,
                    netns: ns,
                },
            );
        }

        // The mesh root, as a user would supply it; the controller loads it.
        let ca = Ca::generate("cluster.local")?;
        fs::create_dir_all(self.ca_dir())?;
        fs::write(self.ca_dir().join("root-cert.pem"), ca.cert_pem())?;
        fs::write(self.ca_dir().join("root-key.pem"), ca.key_pem())?;
        let mut tokens = String::new();
        for node in &node_names {
            let token = random_token()?;
            fs::write(self.token_path(node), &token)?;
            tokens.push_str(&format!("{node} {token}\n"));
        }
        // A waypoint authenticates as its pod's service account.
        for key in &waypoint_pods {
            let token = random_token()?;
            fs::write(self.waypoint_token_path(key), &token)?;
            let pod = &self.pods[key];
            tokens.push_str(&format!(
                "spiffe://cluster.local/ns/{}/sa/{} {token}\n",
                pod.namespace,
                self.service_account(key)
            ));
            // The controller answers the waypoint pod directly.
            let via = self.nodes[&pod.node].underlay_ip.to_string();
            if let Some(ul) = &self.underlay {
                ul.ip(&["route", "add", &format!("{}/32", pod.ip), "via", &via])?;
            }
        }
        fs::write(self.dir.join("node-tokens"), tokens)?;
        fs::create_dir_all(self.manifests_dir())?;
        self.write_config()?;
        self.start_controller()?;
        for node in node_names {
            self.start_ztunnel(&node)?;
        }
        for node in self.node_names() {
            self.wait_ready(&node)?;
        }
        for key in waypoint_pods {
            self.start_waypoint(&key)?;
        }
        Ok(())
    }

    /// A pod for each waypoint Gateway (`istio-waypoint` class), as the
    /// controller's Deployment would make in Kubernetes: Istio's labels,
    /// never captured, the Gateway's name as its service account. Returns
    /// their keys.
    fn add_waypoint_pods(&mut self) -> Vec<String> {
        let mut keys = Vec::new();
        let gateways: Vec<(String, String)> = self
            .snapshot
            .gateways
            .values()
            .filter(|g| g.spec.gateway_class_name == weft_controller::waypoints::WAYPOINT_CLASS)
            .map(|g| {
                (
                    g.metadata
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "default".into()),
                    g.metadata.name.clone().unwrap_or_default(),
                )
            })
            .collect();
        for (ns, name) in gateways {
            let pod_name = format!("{name}-0");
            let key = format!("{ns}/{pod_name}");
            if self.snapshot.pods.contains_key(&key) {
                keys.push(key);
                continue;
            }
            let mut pod = k8s_openapi::api::core::v1::Pod::default();
            pod.metadata.name = Some(pod_name);
            pod.metadata.namespace = Some(ns.clone());
            pod.metadata.labels = Some(BTreeMap::from([
                (
                    weft_controller::waypoints::GATEWAY_NAME.to_string(),
                    name.clone(),
                ),
                ("istio.io/dataplane-mode".to_string(), "none".to_string()),
                (
                    "gateway.istio.io/managed".to_string(),
                    "istio.io-mesh-controller".to_string(),
                ),
            ]));
            pod.spec = Some(PodSpec {
                service_account_name: Some(name.clone()),
                ..PodSpec::default()
            });
            self.snapshot.pods.insert(key.clone(), Arc::new(pod));
            keys.push(key);
        }
        keys
    }

    /// The Gateway a waypoint pod serves (its gateway-name label).
    fn gateway_name(&self, pod_key: &str) -> String {
        self.snapshot
            .pods
            .get(pod_key)
            .and_then(|p| {
                p.metadata
                    .labels
                    .as_ref()?
                    .get(weft_controller::waypoints::GATEWAY_NAME)
                    .cloned()
            })
            .unwrap_or_default()
    }

    fn service_account(&self, pod_key: &str) -> String {
        self.snapshot
            .pods
            .get(pod_key)
            .and_then(|p| p.spec.as_ref()?.service_account_name.clone())
            .unwrap_or_else(|| "default".into())
    }

    fn waypoint_token_path(&self, pod_key: &str) -> PathBuf {
        self.dir
            .join(format!("token-waypoint-{}", pod_key.replace('/', "-")))
    }

    fn waypoint_log_path(&self, pod_key: &str) -> PathBuf {
        self.dir
            .join(format!("waypoint-{}.log", pod_key.replace('/', "-")))
    }

    /// Everything the waypoint in pod `key` has logged so far.
    pub fn waypoint_log(&self, key: &str) -> String {
        fs::read_to_string(self.waypoint_log_path(key)).unwrap_or_default()
    }

    /// Starts the waypoint process in its pod and waits until it is ready.
    fn start_waypoint(&mut self, key: &str) -> Result<()> {
        let pod = self.pods[key].clone();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.waypoint_log_path(key))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", pod.netns.name()])
            .arg(self.opts.bin_dir.join("waypoint"))
            .env("XDS_ADDRESS", format!("{CONTROLLER_IP}:{CONTROLLER_PORT}"))
            .env("XDS_SERVER_NAME", CONTROLLER_NAME)
            .env("ROOT_CERT", self.ca_dir().join("root-cert.pem"))
            .env("TOKEN_PATH", self.waypoint_token_path(key))
            .env("POD_NAME", &pod.name)
            .env("POD_NAMESPACE", &pod.namespace)
            .env("SERVICE_ACCOUNT", self.service_account(key))
            .env("GATEWAY_NAME", self.gateway_name(key))
            .env("NODE_NAME", &pod.node)
            .env(
                "RUST_LOG",
                std::env::var("WEFT_WAYPOINT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.opts.waypoint_env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting the waypoint")?;
        self.waypoints.insert(key.to_string(), child);
        self.register()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.waypoints.get_mut(key)
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "waypoint {key} exited ({status}) before ready:\n{}",
                    self.waypoint_log(key)
                );
            }
            let ready = pod
                .netns
                .run(|| Ok(http_get(("127.0.0.1", READINESS_PORT), "/healthz/ready")))?;
            if let Ok((200, _)) = ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "waypoint {key} not ready in 20s:\n{}",
                    self.waypoint_log(key)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the waypoint in pod `key` (through `ip netns exec`, which
    /// execs it: the same process).
    pub fn waypoint_pid(&self, key: &str) -> Option<u32> {
        self.waypoints.get(key).map(Child::id)
    }

    /// The waypoint's Prometheus text (`istio_requests_total`, …).
    pub fn waypoint_metrics(&self, key: &str) -> Result<String> {
        self.waypoint_stats(key, "/metrics")
    }

    /// `path` on the stats port (15020) of the waypoint pod `key`.
    pub fn waypoint_stats(&self, key: &str, path: &str) -> Result<String> {
        let pod = &self.pods[key];
        let owned = path.to_string();
        let (status, body) = pod
            .netns
            .run(move || http_get(("127.0.0.1", STATS_PORT), &owned))?;
        anyhow::ensure!(status == 200, "waypoint {path}: HTTP {status}");
        Ok(body)
    }

    /// Gives every pod a node and an address when the scenario left them out.
    fn place_pods(&mut self) -> Result<()> {
        let mut nodes: Vec<String> = self.snapshot.nodes.keys().cloned().collect();
        for p in self.snapshot.pods.values() {
            if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone())
                && !nodes.contains(&n)
            {
                nodes.push(n);
            }
        }
        nodes.sort();
        if nodes.is_empty() {
            nodes = vec!["node-1".into(), "node-2".into()];
        }
        if nodes.len() > 200 {
            bail!(
                "scenario has {} nodes; the lab takes at most 200",
                nodes.len()
            );
        }
        let mut next: BTreeMap<String, u8> = BTreeMap::new();
        // Addresses the scenario gave are never handed out again.
        let taken: std::collections::BTreeSet<String> = self
            .snapshot
            .pods
            .values()
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .collect();
        for (i, pod) in self.snapshot.pods.values_mut().enumerate() {
            let pod = Arc::make_mut(pod);
            let spec = pod.spec.get_or_insert_with(PodSpec::default);
            let node = spec
                .node_name
                .get_or_insert_with(|| nodes[i % nodes.len()].clone())
                .clone();
            let idx = nodes.iter().position(|n| *n == node).unwrap_or(0);
            let status = pod.status.get_or_insert_with(PodStatus::default);
            if status.pod_ip.is_none() {
                let host = next.entry(node).or_insert(10);
                loop {
                    let ip = Ipv4Addr::new(10, 244, idx as u8 + 1, *host).to_string();
                    *host = host
                        .checked_add(1)
                        .ok_or_else(|| anyhow!("too many pods on a node"))?;
                    if !taken.contains(&ip) {
                        status.pod_ip = Some(ip);
                        break;
                    }
                }
            }
        }
        // Keep an explicit Node list so node_names() is stable.
        for n in nodes {
            self.snapshot.nodes.entry(n.clone()).or_insert_with(|| {
                let mut node = k8s_openapi::api::core::v1::Node::default();
                node.metadata.name = Some(n);
                Arc::new(node)
            });
        }
        Ok(())
    }

    fn node_names(&self) -> Vec<String> {
        self.snapshot.nodes.keys().cloned().collect()
    }

    /// The controller's CA directory (Istio's `cacerts` layout, or a generated root).
    /// The underlay's network namespace: where the controller listens.
    pub fn underlay_netns(&self) -> Result<NetNs> {
        self.underlay.clone().context("no underlay")
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    fn token_path(&self, node: &str) -> PathBuf {
        self.dir.join(format!("token-{node}"))
    }

    /// The directory the controller watches.
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Checks the snapshot translates cleanly and writes it, as manifests, to
    /// the controller's directory (atomically: the controller never sees half a file).
    fn write_config(&self) -> Result<()> {
        let (_, errors) = translate::workloads(&self.snapshot, &Mesh::default());
        if let Some(e) = errors.first() {
            bail!("scenario: {e}");
        }
        let mut docs = Vec::new();
        for ns in self.snapshot.namespaces.values() {
            docs.push(serde_yaml::to_string(&**ns)?);
        }
        for n in self.snapshot.nodes.values() {
            docs.push(serde_yaml::to_string(&**n)?);
        }
        for p in self.snapshot.pods.values() {
            docs.push(serde_yaml::to_string(&**p)?);
        }
        for svc in self.snapshot.services.values() {
            docs.push(serde_yaml::to_string(&**svc)?);
        }
        for gw in self.snapshot.gateways.values() {
            docs.push(format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n{}",
                serde_yaml::to_string(&**gw)?
            ));
        }
        self.write_manifest("scenario.yaml", &docs.join("---\n"))
    }

    /// Writes (or replaces) one manifests file as is: what `kubectl apply` of
    /// that file, or a bad edit of it, does.
    pub fn write_manifest(&self, name: &str, text: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.manifests_dir().join(name))?;
        Ok(())
    }

    /// Starts the controller in the underlay namespace and waits until it listens.
    pub fn start_controller(&mut self) -> Result<()> {
        let ul = self.underlay.clone().context("no underlay")?;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("controller.log"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ul.name()])
            .arg(self.opts.bin_dir.join("weft-controller"));
        if let Some(chart) = &self.chart {
            // As the chart declares it; the lab's source stands in for the API server.
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(chart.controller()?.env_with_mounts(&|v| {
                    bail!("the controller mounts {v:?}: the lab has none to give")
                })?);
            if let Ok(level) = std::env::var("WEFT_CONTROLLER_LOG") {
                cmd.env("RUST_LOG", level);
            }
        } else {
            cmd.env("XDS_ADDR", format!("{CONTROLLER_IP}:{CONTROLLER_PORT}"))
                .env("SERVER_NAMES", CONTROLLER_NAME)
                .env(
                    "RUST_LOG",
                    std::env::var("WEFT_CONTROLLER_LOG").unwrap_or_else(|_| "info".into()),
                );
        }
        cmd.env("MANIFESTS_DIR", self.manifests_dir())
            .env("CA_DIR", self.ca_dir())
            .env("NODE_TOKENS", self.dir.join("node-tokens"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.opts.controller_env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        self.controller = Some(cmd.spawn().context("starting the controller")?);
        self.register()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .controller
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "controller exited ({status}) before listening:\n{}",
                    self.controller_log()
                );
            }
            let up = ul.run(|| Ok(TcpStream::connect((CONTROLLER_IP, CONTROLLER_PORT)).is_ok()))?;
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "controller not listening in 20s:\n{}",
                    self.controller_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the controller with SIGTERM, as Kubernetes does; returns how
    /// long it took to exit and how it exited (killed after `limit`).
    pub fn stop_controller(
        &mut self,
        limit: Duration,
    ) -> Result<(Duration, std::process::ExitStatus)> {
        let mut c = self.controller.take().context("no controller")?;
        let started = Instant::now();
        kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM)?;
        let status = loop {
            if let Some(status) = c.try_wait()? {
                break status;
            }
            if started.elapsed() > limit {
                c.kill()?;
                break c.wait()?;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = started.elapsed();
        self.register()?;
        Ok((took, status))
    }

    /// Kills the controller (SIGKILL: a crash, not a shutdown).
    pub fn kill_controller(&mut self) -> Result<()> {
        if let Some(mut c) = self.controller.take() {
            c.kill()?;
            c.wait()?;
        }
        self.register()
    }

    /// Everything the controller has logged so far.
    pub fn controller_log(&self) -> String {
        fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    fn start_ztunnel(&mut self, node: &str) -> Result<()> {
        let ns = self.nodes[node].netns.clone();
        // Appended: a restarted ztunnel's log follows its predecessor's.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("ztunnel-{node}.log")))?;
        let bin = self
            .ztunnel_bin
            .clone()
            .unwrap_or_else(|| self.opts.bin_dir.join("ztunnel"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()]).arg(bin);
        if self.chart.is_some() {
            cmd.env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(self.chart_ztunnel_env(node)?);
            if let Ok(level) = std::env::var("WEFT_ZTUNNEL_LOG") {
                cmd.env("RUST_LOG", level);
            }
        } else {
            cmd.env("NODE_NAME", node)
                .env("XDS_ADDRESS", format!("{CONTROLLER_IP}:{CONTROLLER_PORT}"))
                .env("XDS_SERVER_NAME", CONTROLLER_NAME)
                .env("ROOT_CERT", self.ca_dir().join("root-cert.pem"))
                .env("TOKEN_PATH", self.token_path(node))
                .env("BPF_PIN_DIR", self.pin_dir(node))
                .env(
                    "RUST_LOG",
                    std::env::var("WEFT_ZTUNNEL_LOG").unwrap_or_else(|_| "info".into()),
                );
        }
        // The lab reads ztunnel's log as JSON.
        cmd.env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for (k, v) in &self.opts.ztunnel_env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting ztunnel")?;
        self.ztunnels.insert(node.to_string(), child);
        self.register()
    }

    fn wait_ready(&mut self, node: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.ztunnels.get_mut(node)
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "ztunnel on {node} exited ({status}) before ready:\n{}",
                    self.ztunnel_log(node)
                );
            }
            if let Ok((200, _)) = self.http_get(node, READINESS_PORT, "/healthz/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ztunnel on {node} not ready in 20s:\n{}",
                    self.ztunnel_log(node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Where ztunnel on `node` pins its capture.
    pub fn pin_dir(&self, node: &str) -> PathBuf {
        if let Some(dir) = self
            .chart
            .as_ref()
            .and_then(|c| c.ztunnel(node).ok())
            .and_then(|z| Some(self.node_bpffs(node, z.get("BPF_PIN_DIR")?)))
        {
            return dir;
        }
        Path::new(BPFFS).join(&self.id).join(node)
    }

    /// Where the lab keeps `path` of `node`'s bpffs (`/sys/fs/bpf/...`).
    fn node_bpffs(&self, node: &str, path: &str) -> PathBuf {
        let rest = path.strip_prefix(NODE_BPFFS).unwrap_or(path);
        let root = Path::new(BPFFS).join(&self.id).join(node);
        match rest.trim_start_matches('/') {
            "" => root,
            rest => root.join(rest),
        }
    }

    /// Renders the chart, checks the controller's Service reaches its
    /// container unchanged, and makes its DNS name resolve on every node
    /// (`ip netns exec` mounts `/etc/netns/<ns>/hosts` over `/etc/hosts`).
    fn use_chart(&mut self, values: &Path) -> Result<()> {
        let namespace = CONTROLLER_NAME
            .split('.')
            .nth(1)
            .context("CONTROLLER_NAME has no namespace")?;
        let chart = Chart::render(namespace, values)?;
        let (name, port) = chart.xds_service()?;
        ensure!(
            port == CONTROLLER_PORT,
            "the chart's controller port {port} is not the lab's {CONTROLLER_PORT}"
        );
        for node in self.nodes.values() {
            let dir = Path::new(ETC_NETNS).join(node.netns.name());
            fs::create_dir_all(&dir)?;
            fs::write(
                dir.join("hosts"),
                format!("127.0.0.1 localhost\n::1 localhost\n{CONTROLLER_IP} {name}\n"),
            )?;
        }
        self.chart = Some(chart);
        Ok(())
    }

    /// ztunnel's env on `node` as the chart's DaemonSet declares it, with
    /// its volumes filled as the kubelet would: the node's token, the mesh
    /// root's ConfigMap, the node's bpffs.
    fn chart_ztunnel_env(&self, node: &str) -> Result<Vec<(String, String)>> {
        let chart = self.chart.as_ref().context("no chart")?;
        let z = chart.ztunnel(node)?;
        let volumes = self.dir.join("volumes").join(node);
        let place = |v: &Volume| -> Result<PathBuf> {
            Ok(match v {
                Volume::Token { path, audience } => {
                    ensure!(
                        audience == "istio-ca",
                        "ztunnel's token is for {audience:?}"
                    );
                    let dir = volumes.join("token");
                    fs::create_dir_all(&dir)?;
                    fs::copy(self.token_path(node), dir.join(path))?;
                    dir
                }
                Volume::ConfigMap(name) if name == "istio-ca-root-cert" => {
                    let dir = volumes.join(name);
                    fs::create_dir_all(&dir)?;
                    fs::copy(
                        self.ca_dir().join("root-cert.pem"),
                        dir.join("root-cert.pem"),
                    )?;
                    dir
                }
                Volume::HostPath(p) if p == NODE_BPFFS => {
                    let dir = self.node_bpffs(node, p);
                    fs::create_dir_all(&dir)?;
                    dir
                }
                other => bail!("ztunnel mounts {other:?}: the lab has none to give"),
            })
        };
        z.env_with_mounts(&place)
    }

    /// Kills ztunnel on `node` with SIGKILL, as a crash or an OOM kill would,
    /// and reaps it. Its pinned capture stays.
    pub fn kill_ztunnel(&mut self, node: &str) -> Result<()> {
        let mut child = self
            .ztunnels
            .remove(node)
            .with_context(|| format!("no ztunnel on {node}"))?;
        child.kill()?;
        child.wait()?;
        self.register()
    }

    /// Runs `bin` (or `bin_dir`'s ztunnel, with `None`) for every ztunnel
    /// started from now on: a benchmark's baseline build beside its
    /// candidate.
    pub fn use_ztunnel_binary(&mut self, bin: Option<PathBuf>) {
        self.ztunnel_bin = bin;
    }

    /// Adds env for every ztunnel started from now on.
    pub fn add_ztunnel_env(&mut self, env: Vec<(String, String)>) {
        self.opts.ztunnel_env.extend(env);
    }

    /// Stops ztunnel on `node` with SIGTERM, as the kubelet does, and waits
    /// until it has exited (drained).
    pub fn stop_ztunnel(&mut self, node: &str, limit: Duration) -> Result<ExitStatus> {
        let mut child = self
            .ztunnels
            .remove(node)
            .with_context(|| format!("no ztunnel on {node}"))?;
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM)?;
        let status = wait_exit(&mut child, &format!("ztunnel on {node}"), limit)?;
        self.register()?;
        Ok(status)
    }

    /// Starts ztunnel on `node` again (after [`Lab::kill_ztunnel`]) without
    /// waiting for it.
    pub fn start_ztunnel_again(&mut self, node: &str) -> Result<()> {
        if self.ztunnels.contains_key(node) {
            bail!("ztunnel on {node} is still running");
        }
        self.start_ztunnel(node)
    }

    /// Restarts ztunnel on `node` as a rollout does: a new one starts beside
    /// the running one (they share the listeners, SO_REUSEPORT), and once the
    /// new one is ready the old one gets SIGTERM and drains. Returns the old
    /// process, which exits by itself once drained.
    pub fn restart_ztunnel(&mut self, node: &str) -> Result<Child> {
        let old = self.start_successor(node)?;
        kill(Pid::from_raw(old.id() as i32), Signal::SIGTERM)?;
        Ok(old)
    }

    /// Starts a new ztunnel on `node` beside the running one and waits until
    /// it is ready; returns the old one, still running (the surge half of a
    /// rollout: the caller stops it).
    /// If the new one fails, it is killed and the old one stays the node's.
    pub fn start_successor(&mut self, node: &str) -> Result<Child> {
        let old = self
            .ztunnels
            .remove(node)
            .with_context(|| format!("no ztunnel on {node}"))?;
        match self.start_ready(node) {
            Ok(()) => Ok(old),
            Err(e) => {
                if let Some(mut failed) = self.ztunnels.remove(node) {
                    let _ = failed.kill();
                    let _ = failed.wait();
                }
                self.ztunnels.insert(node.to_string(), old);
                self.register()?;
                Err(e)
            }
        }
    }

    /// Starts a ztunnel on `node` and waits for its first "ztunnel ready".
    fn start_ready(&mut self, node: &str) -> Result<()> {
        let readies = |lab: &Lab| lab.ztunnel_log(node).matches("\"ztunnel ready\"").count();
        let before = readies(self);
        self.start_ztunnel(node)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while readies(self) <= before {
            if let Some(child) = self.ztunnels.get_mut(node)
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "the new ztunnel on {node} exited ({status}):\n{}",
                    self.ztunnel_log(node)
                );
            }
            if Instant::now() > deadline {
                bail!("the new ztunnel on {node} not ready in 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits until ztunnel on `node` reports ready.
    pub fn wait_ztunnel_ready(&mut self, node: &str) -> Result<()> {
        self.wait_ready(node)
    }

    /// Whether ztunnel on `node` is still running (it must never crash on bad input).
    pub fn ztunnel_alive(&mut self, node: &str) -> bool {
        self.ztunnels
            .get_mut(node)
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The pid of ztunnel on `node`.
    pub fn ztunnel_pid(&self, node: &str) -> Option<u32> {
        self.ztunnels.get(node).map(Child::id)
    }

    /// The lab's mesh CA (the root the controller signs with).
    pub fn ca(&self) -> Result<Ca> {
        Ok(Ca::from_files(
            &self.ca_dir().join("root-cert.pem"),
            &self.ca_dir().join("root-key.pem"),
        )?)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn nodes(&self) -> impl Iterator<Item = &LabNode> {
        self.nodes.values()
    }

    pub fn pods(&self) -> impl Iterator<Item = &LabPod> {
        self.pods.values()
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> &LabNode {
        self.nodes
            .get(name)
            .unwrap_or_else(|| panic!("no node {name} in the lab"))
    }

    /// A pod by `namespace/name`.
    pub fn pod(&self, key: &str) -> &LabPod {
        self.pods
            .get(key)
            .unwrap_or_else(|| panic!("no pod {key} in the lab"))
    }

    /// GET `path` on a node-local ztunnel port; (status, body).
    pub fn http_get(&self, node: &str, port: u16, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        self.node(node)
            .netns
            .run(move || http_get(("127.0.0.1", port), &path))
    }

    /// ztunnel's Prometheus text on a node.
    pub fn metrics(&self, node: &str) -> Result<String> {
        let (status, body) = self.http_get(node, STATS_PORT, "/metrics")?;
        if status != 200 {
            bail!("metrics on {node}: HTTP {status}");
        }
        Ok(body)
    }

    /// ztunnel's config dump on a node.
    pub fn config_dump(&self, node: &str) -> Result<serde_json::Value> {
        let (status, body) = self.http_get(node, ADMIN_PORT, "/config_dump")?;
        if status != 200 {
            bail!("config_dump on {node}: HTTP {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Everything ztunnel on `node` has logged so far.
    pub fn ztunnel_log(&self, node: &str) -> String {
        fs::read_to_string(self.dir.join(format!("ztunnel-{node}.log"))).unwrap_or_default()
    }

    /// Sets (or with `None`, removes) a label on a Namespace (`key` = name) or a
    /// Pod (`key` = namespace/name), and rewrites ztunnel's config: what a
    /// `kubectl label` does to the mesh.
    pub fn label(&mut self, kind: &str, key: &str, label: &str, value: Option<&str>) -> Result<()> {
        let meta = match kind {
            "Namespace" => self
                .snapshot
                .namespaces
                .entry(key.to_string())
                .or_insert_with(|| {
                    let mut ns = k8s_openapi::api::core::v1::Namespace::default();
                    ns.metadata.name = Some(key.to_string());
                    Arc::new(ns)
                })
                .metadata
                .clone(),
            "Pod" => self
                .snapshot
                .pods
                .get(key)
                .ok_or_else(|| anyhow!("no pod {key}"))?
                .metadata
                .clone(),
            _ => bail!("cannot label a {kind}"),
        };
        let mut labels = meta.labels.unwrap_or_default();
        match value {
            Some(v) => labels.insert(label.to_string(), v.to_string()),
            None => labels.remove(label),
        };
        match kind {
            "Namespace" => {
                if let Some(ns) = self.snapshot.namespaces.get_mut(key) {
                    Arc::make_mut(ns).metadata.labels = Some(labels);
                }
            }
            _ => {
                if let Some(p) = self.snapshot.pods.get_mut(key) {
                    Arc::make_mut(p).metadata.labels = Some(labels);
                }
            }
        }
        self.write_config()
    }

    /// Waits until ztunnel on the pod's node has (or has not) captured it.
    pub fn wait_captured(&self, pod: &str, captured: bool) -> Result<()> {
        let p = self.pod(pod);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let dump = self.config_dump(&p.node)?;
            let now = dump["capture"]["captured"]
                .as_array()
                .is_some_and(|a| a.iter().any(|ip| ip.as_str() == Some(&p.ip.to_string())));
            if now == captured {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("pod {pod}: captured is not {captured} after 10s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops everything and removes every namespace. Idempotent.
    pub fn teardown(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.torn_down, true) {
            return Ok(());
        }
        for child in self
            .waypoints
            .values_mut()
            .chain(self.ztunnels.values_mut())
            .chain(self.controller.as_mut())
        {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in self
            .waypoints
            .values_mut()
            .chain(self.ztunnels.values_mut())
            .chain(self.controller.as_mut())
        {
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_namespaces(&self.id)?;
        release_bpffs(&self.id)?;
        let _ = fs::remove_file(registry_file(&self.id));
        ACTIVE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _)| *id != self.id);
        if std::thread::panicking() {
            eprintln!("lab {}: logs kept in {}", self.id, self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
        Ok(())
    }

    fn register(&self) -> Result<()> {
        let pids: Vec<u32> = self
            .ztunnels
            .values()
            .chain(self.waypoints.values())
            .chain(self.controller.as_ref())
            .map(Child::id)
            .collect();
        let entry = serde_json::json!({ "owner": std::process::id(), "children": pids });
        fs::write(registry_file(&self.id), entry.to_string())?;
        let mut active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner());
        active.retain(|(id, _)| *id != self.id);
        active.push((self.id.clone(), pids));
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("lab {}: teardown failed: {e:#}", self.id);
        }
    }
}

/// 128 random bits, hex: a node's bootstrap token.
fn random_token() -> Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow!("no randomness"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A veth pair: `a_name` in `a`, `b_name` in `b`.
fn veth(a: &NetNs, a_name: &str, b: &NetNs, b_name: &str) -> Result<()> {
    netns::run(
        "ip",
        &[
            "link",
            "add",
            a_name,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_name,
            "netns",
            b.name(),
        ],
    )
    .map(drop)
}

/// Makes the child die with us (SIGKILL), even if we are killed.
pub fn die_with_parent(cmd: &mut Command) {
    #[expect(
        unsafe_code,
        reason = "pre_exec runs between fork and exec; prctl is async-signal-safe"
    )]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

fn registry_file(id: &str) -> PathBuf {
    Path::new(REGISTRY).join(format!("{id}.json"))
}

fn remove_namespaces(id: &str) -> Result<()> {
    let prefix = format!("{id}-");
    // The chart mode's name resolution for the nodes.
    for entry in fs::read_dir(ETC_NETNS).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let mut failed = Vec::new();
    for ns in NetNs::list()? {
        if ns.starts_with(&prefix)
            && let Err(e) = NetNs::delete(&ns)
        {
            failed.push(format!("{ns}: {e}"));
        }
    }
    if !failed.is_empty() {
        bail!("could not delete namespaces: {}", failed.join("; "));
    }
    Ok(())
}

/// Labs registered on this host: (id, owner pid, owner alive).
pub fn registered() -> Result<Vec<(String, u32, bool)>> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(REGISTRY) else {
        return Ok(out);
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(id) = path.file_stem().and_then(|s| s.to_str()).map(String::from) else {
            continue;
        };
        let v: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap_or_default())
                .unwrap_or_default();
        let owner = v["owner"].as_u64().unwrap_or(0) as u32;
        let alive = owner != 0 && kill(Pid::from_raw(owner as i32), None).is_ok();
        out.push((id, owner, alive));
    }
    out.sort();
    Ok(out)
}

fn remove_registered(id: &str) -> Result<()> {
    let path = registry_file(id);
    let v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap_or_default()).unwrap_or_default();
    for pid in v["children"].as_array().into_iter().flatten() {
        if let Some(pid) = pid.as_u64() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    remove_namespaces(id)?;
    release_bpffs(id)?;
    let _ = fs::remove_file(&path);
    let _ = fs::remove_dir_all(std::env::temp_dir().join(format!("weft-lab-{id}")));
    Ok(())
}

/// Serialises mounting and unmounting the labs' bpffs within this process.
static BPFFS_LOCK: Mutex<()> = Mutex::new(());

fn on_bpffs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

/// Mounts the labs' bpffs if it is not there, and makes lab `id`'s directory.
fn mount_bpffs(id: &str) -> Result<()> {
    let _guard = BPFFS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    fs::create_dir_all(BPFFS)?;
    if !on_bpffs(Path::new(BPFFS)) {
        nix::mount::mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a bpf filesystem on {BPFFS}"))?;
    }
    fs::create_dir_all(Path::new(BPFFS).join(id))?;
    Ok(())
}

/// Removes lab `id`'s pinned capture (freeing its links and maps), and the
/// bpffs itself when no other lab uses it.
fn release_bpffs(id: &str) -> Result<()> {
    let _guard = BPFFS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(BPFFS);
    if !on_bpffs(root) {
        let _ = fs::remove_dir(root);
        return Ok(());
    }
    let lab = root.join(id);
    if lab.exists() {
        fs::remove_dir_all(&lab).with_context(|| format!("removing {}", lab.display()))?;
    }
    let others = fs::read_dir(root)?
        .flatten()
        .any(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    if !others {
        nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {BPFFS}"))?;
        let _ = fs::remove_dir(root);
    }
    Ok(())
}

/// Removes labs whose owning process is gone (a crash, a kill -9).
pub fn down_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (id, _, alive) in registered()? {
        if !alive {
            remove_registered(&id)?;
            removed.push(id);
        }
    }
    Ok(removed)
}

/// Removes every registered lab, stopping its owner first.
pub fn down_all() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for (id, owner, alive) in registered()? {
        if alive && owner != std::process::id() {
            let _ = kill(Pid::from_raw(owner as i32), Signal::SIGTERM);
            std::thread::sleep(Duration::from_millis(500));
        }
        remove_registered(&id)?;
        removed.push(id);
    }
    Ok(removed)
}

/// On SIGINT/SIGTERM: tear down this process's labs, then exit 130.
pub fn install_interrupt_cleanup() {
    INTERRUPT.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("lab-interrupt".into())
            .spawn(|| {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    use tokio::signal::unix::{SignalKind, signal};
                    let Ok(mut term) = signal(SignalKind::terminate()) else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                });
                let active = ACTIVE.lock().unwrap_or_else(|p| p.into_inner()).clone();
                for (id, _) in active {
                    eprintln!("interrupted: removing lab {id}");
                    let _ = remove_registered(&id);
                }
                std::process::exit(130);
            });
        if let Err(e) = spawned {
            eprintln!("cannot install the lab's interrupt handler: {e}");
        }
    });
}

/// A minimal HTTP/1.0 GET (the lab's own probe; tests use curl for the real thing).
pub fn http_get(addr: (&str, u16), path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", addr.0)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response: {resp:.80}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
