//! Loads the capture program, attaches it to the node's interfaces and keeps the
//! captured-pod map in step with ztunnel's view of local workloads.
//!
//! Everything the kernel runs is pinned under [`CaptureConfig::pin_dir`] (a bpffs
//! directory): the maps as `maps/<name>`, one TCX link per interface as
//! `links/<ifindex>`. A ztunnel that exits, even by SIGKILL, leaves capture in
//! place, so captured pods' traffic is dropped until a ztunnel listens again,
//! never passed in plaintext. A starting ztunnel re-adopts the pinned maps as
//! they are and swaps its program into the pinned links atomically; only
//! [`uninstall`] removes capture.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use tracing::{debug, info, warn};

use crate::names::{self, POD_CAPTURE};

static OBJECT: &[u8] = include_bytes_aligned!("../bpf/capture.bpf.o");

/// Pinnable tc links (TCX) arrived in Linux 6.6; without them capture could not
/// outlive ztunnel, so ztunnel refuses older kernels rather than fail open.
pub const MIN_KERNEL: (u8, u8) = (6, 6);

/// Where the capture program sends segments, and where it is pinned.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub port_outbound: u16,
    pub port_inbound: u16,
    pub port_hbone: u16,
    /// The address ztunnel's capture listeners are bound to.
    pub listen_addr: Ipv4Addr,
    /// Mark put on assigned segments; see [`crate::routing`].
    pub redirect_mark: u32,
    /// A directory on a bpf filesystem, one per node network namespace.
    pub pin_dir: PathBuf,
}

/// The loaded program, its links and maps. Dropping it closes ztunnel's
/// handles only: the pinned links keep capturing.
pub struct Capture {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    captured: HashMap<MapData, u32, u32>,
    node_addrs: HashMap<MapData, u32, u32>,
    counters: PerCpuArray<MapData, u64>,
    /// `weft_flows`: `struct weft_flow` (saddr, daddr, sport, dport; network
    /// order) as bytes.
    flows: HashMap<MapData, [u8; 12], u8>,
    /// `weft_bridge_ports`: a bridge port's ifindex → `struct
    /// weft_bridge_port` (the bridge's ifindex, native order, its MAC, 2
    /// bytes of padding) as bytes.
    bridge_ports: HashMap<MapData, u32, [u8; 12]>,
    /// Attached interfaces by ifindex: the name seen at attach, and the link.
    attached: BTreeMap<u32, Attachment>,
}

struct Attachment {
    name: String,
    /// Held so the link is ours to drop when the interface goes away.
    _link: FdLink,
}

/// Totals of the program's counters, summed over CPUs, by name.
pub type Counters = BTreeMap<&'static str, u64>;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot load the capture eBPF object (are we root, with CAP_BPF and CAP_NET_ADMIN?): {0}"
    )]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name} failed to load or attach: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot attach to interface {iface}: {source}")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("the capture link of interface {iface}: {source}")]
    Link {
        iface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("cannot pin the link of interface {iface} at {path}: {source}")]
    PinLink {
        iface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot list network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
    #[error(
        "Linux {have} is too old: capture that survives ztunnel needs pinnable tc links (TCX), Linux {}.{} or later",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { have: String },
    #[error("cannot read the kernel version: {0}")]
    KernelVersion(String),
    #[error(
        "{} is not on a bpf filesystem, so capture could not outlive ztunnel; mount one (mount -t bpf bpf /sys/fs/bpf) or set BPF_PIN_DIR",
        dir.display()
    )]
    NotBpffs { dir: PathBuf },
    #[error("pin directory {}: {source}", dir.display())]
    PinDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// Refuses to run on a kernel without pinnable tc links.
pub fn check_kernel() -> Result<(), CaptureError> {
    let have = KernelVersion::current().map_err(|e| CaptureError::KernelVersion(e.to_string()))?;
    if have < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
        return Err(CaptureError::KernelTooOld {
            have: have.to_string(),
        });
    }
    Ok(())
}

/// Checks that `dir` (created if missing) is on a bpf filesystem, where pins live.
fn prepare_pin_dir(dir: &Path) -> Result<(), CaptureError> {
    let pin_err = |source| CaptureError::PinDir {
        dir: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir.join("maps")).map_err(pin_err)?;
    std::fs::create_dir_all(dir.join("links")).map_err(pin_err)?;
    let fs = nix::sys::statfs::statfs(dir).map_err(|e| pin_err(e.into()))?;
    if fs.filesystem_type() != nix::sys::statfs::BPF_FS_MAGIC {
        return Err(CaptureError::NotBpffs {
            dir: dir.to_path_buf(),
        });
    }
    Ok(())
}

fn link_pin(dir: &Path, ifindex: u32) -> PathBuf {
    dir.join("links").join(ifindex.to_string())
}

/// Removes capture for good: unpins (so detaches) every link and unpins the
/// maps under `pin_dir`, then removes the directory. For an explicit uninstall;
/// a ztunnel that merely exits leaves all of it in place.
pub fn uninstall(pin_dir: &Path) -> Result<Vec<String>, CaptureError> {
    let pin_err = |source| CaptureError::PinDir {
        dir: pin_dir.to_path_buf(),
        source,
    };
    let mut removed = Vec::new();
    if !pin_dir.exists() {
        return Ok(removed);
    }
    for sub in ["links", "maps"] {
        let Ok(entries) = std::fs::read_dir(pin_dir.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            // Unlinking the pin drops the kernel's last reference once no
            // process holds the object: a link detaches, a map is freed.
            std::fs::remove_file(entry.path()).map_err(pin_err)?;
            removed.push(format!("{sub}/{}", entry.file_name().to_string_lossy()));
        }
    }
    std::fs::remove_dir_all(pin_dir).map_err(pin_err)?;
    info!(component = "capture", dir = %pin_dir.display(), ?removed, "capture uninstalled");
    Ok(removed)
}

// === impl Capture ===

impl Capture {
    /// Loads and verifies the program, re-adopting the maps pinned under
    /// `cfg.pin_dir` (or creating and pinning them). Nothing is attached yet.
    pub fn load(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        check_kernel()?;
        prepare_pin_dir(&cfg.pin_dir)?;
        let listen_addr = u32::from(cfg.listen_addr);
        let map_paths: Vec<(&str, PathBuf)> = names::PINNED_MAPS
            .iter()
            .map(|name| (*name, cfg.pin_dir.join("maps").join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        loader
            .override_global(names::GLOBAL_PORT_OUTBOUND, &cfg.port_outbound, true)
            .override_global(names::GLOBAL_PORT_INBOUND, &cfg.port_inbound, true)
            .override_global(names::GLOBAL_PORT_HBONE, &cfg.port_hbone, true)
            .override_global(names::GLOBAL_LISTEN_ADDR, &listen_addr, true)
            .override_global(names::GLOBAL_REDIRECT_MARK, &cfg.redirect_mark, true);
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(CaptureError::Load)?;
        program(&mut ebpf)?
            .load()
            .map_err(|source| CaptureError::Program {
                name: names::PROGRAM,
                source,
            })?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))
        };
        let captured = HashMap::try_from(take(&mut ebpf, names::MAP_CAPTURED)?)
            .map_err(map_error(names::MAP_CAPTURED))?;
        let node_addrs = HashMap::try_from(take(&mut ebpf, names::MAP_NODE_ADDRS)?)
            .map_err(map_error(names::MAP_NODE_ADDRS))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, names::MAP_COUNTERS)?)
            .map_err(map_error(names::MAP_COUNTERS))?;
        let flows = HashMap::try_from(take(&mut ebpf, names::MAP_FLOWS)?)
            .map_err(map_error(names::MAP_FLOWS))?;
        let bridge_ports = HashMap::try_from(take(&mut ebpf, names::MAP_BRIDGE_PORTS)?)
            .map_err(map_error(names::MAP_BRIDGE_PORTS))?;
        let capture = Capture {
            ebpf,
            pin_dir: cfg.pin_dir.clone(),
            captured,
            node_addrs,
            counters,
            flows,
            bridge_ports,
            attached: BTreeMap::new(),
        };
        info!(
            component = "capture",
            pin_dir = %cfg.pin_dir.display(),
            pods = capture.pods().len(),
            "eBPF capture program loaded; pinned maps adopted"
        );
        Ok(capture)
    }

    /// Attaches at tc ingress of every interface of this network namespace not
    /// attached yet (pods come and go, so this is called again on changes),
    /// detaches from interfaces gone, and refreshes the node's own addresses.
    /// An interface with a pinned link (a previous ztunnel's) gets this
    /// program swapped in atomically; others get a new link, pinned.
    /// Returns the newly attached interfaces.
    ///
    /// `vips` are the mesh's Service addresses: never the node's own, even
    /// where a proxy binds them locally (traffic to them is captured).
    /// Before they are known (None), node addresses are only removed, never
    /// added, so no VIP is taken for one.
    pub fn sync_interfaces(
        &mut self,
        vips: Option<&BTreeSet<Ipv4Addr>>,
    ) -> Result<Vec<String>, CaptureError> {
        let ifaces = interfaces().map_err(CaptureError::Interfaces)?;
        // Gone (a renamed device keeps its index, and its link).
        let stale: Vec<u32> = self
            .attached
            .keys()
            .filter(|i| !ifaces.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            self.attached.remove(&ifindex);
            let _ = std::fs::remove_file(link_pin(&self.pin_dir, ifindex));
        }
        self.remove_stale_pins(&ifaces);
        let mut added = Vec::new();
        let new: Vec<(u32, String)> = ifaces
            .iter()
            .filter(|(i, _)| !self.attached.contains_key(*i))
            .map(|(i, n)| (*i, n.clone()))
            .collect();
        for (ifindex, iface) in new {
            match self.attach(ifindex, &iface) {
                Ok(link) => {
                    self.attached.insert(
                        ifindex,
                        Attachment {
                            name: iface.clone(),
                            _link: link,
                        },
                    );
                    added.push(iface);
                }
                // An interface can vanish between listing and attaching.
                Err(e) if !interfaces().is_ok_and(|now| now.contains_key(&ifindex)) => {
                    debug!(%iface, error = %e, "interface went away before attach");
                }
                Err(e) => return Err(e),
            }
        }
        if !added.is_empty() {
            info!(component = "capture", interfaces = ?added, "capture attached");
        }
        self.sync_bridge_ports(&ifaces)?;
        let addrs = local_addresses().map_err(CaptureError::Interfaces)?;
        let current: BTreeSet<u32> = self.node_addrs.keys().filter_map(Result::ok).collect();
        let none = BTreeSet::new();
        let wanted: BTreeSet<u32> = addrs
            .difference(vips.unwrap_or(&none))
            .map(|a| key(*a))
            .collect();
        for k in current.difference(&wanted) {
            let _ = self.node_addrs.remove(k);
        }
        for k in wanted.difference(&current).filter(|_| vips.is_some()) {
            self.node_addrs
                .insert(k, 1, 0)
                .map_err(map_error(names::MAP_NODE_ADDRS))?;
        }
        Ok(added)
    }

    /// Which interfaces are ports of a Linux bridge (a bridge CNI's pod
    /// veths), with the bridge's ifindex and MAC, for the program.
    fn sync_bridge_ports(&mut self, ifaces: &BTreeMap<u32, String>) -> Result<(), CaptureError> {
        let wanted: BTreeMap<u32, [u8; 12]> = ifaces
            .iter()
            .filter_map(|(i, name)| Some((*i, bridge_port(name)?)))
            .collect();
        let current: BTreeMap<u32, [u8; 12]> =
            self.bridge_ports.iter().filter_map(Result::ok).collect();
        for k in current.keys().filter(|k| !wanted.contains_key(k)) {
            let _ = self.bridge_ports.remove(k);
        }
        for (k, v) in wanted.iter().filter(|(k, v)| current.get(k) != Some(v)) {
            self.bridge_ports
                .insert(k, v, 0)
                .map_err(map_error(names::MAP_BRIDGE_PORTS))?;
        }
        Ok(())
    }

    /// This program on `iface`'s ingress through its pinned link: the pinned
    /// one with the program replaced in place (no moment without capture), or
    /// a new one, pinned.
    fn attach(&mut self, ifindex: u32, iface: &str) -> Result<FdLink, CaptureError> {
        let path = link_pin(&self.pin_dir, ifindex);
        let attach_err = |source| CaptureError::Attach {
            iface: iface.to_string(),
            source,
        };
        let link_err = |source| CaptureError::Link {
            iface: iface.to_string(),
            source,
        };
        let program = program(&mut self.ebpf)?;
        if let Ok(pinned) = PinnedLink::from_pin(&path) {
            let adopted = SchedClassifierLink::try_from(FdLink::from(pinned))
                .map_err(link_err)
                .and_then(|link| program.attach_to_link(link).map_err(attach_err))
                .and_then(|id| program.take_link(id).map_err(attach_err))
                .and_then(|link| FdLink::try_from(link).map_err(link_err));
            match adopted {
                Ok(link) => {
                    debug!(component = "capture", %iface, ifindex, "pinned link adopted");
                    return Ok(link);
                }
                // A link whose device is gone cannot be updated: replace it.
                Err(e) => {
                    warn!(component = "capture", %iface, error = %e, "pinned link unusable; attaching anew");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let id = program
            .attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let link = FdLink::try_from(link).map_err(link_err)?;
        let pinned = link.pin(&path).map_err(|source| CaptureError::PinLink {
            iface: iface.to_string(),
            path: path.clone(),
            source,
        })?;
        Ok(FdLink::from(pinned))
    }

    /// Unpins links of interfaces no longer in this namespace (their devices
    /// are gone, so the links are already inert); nothing leaks per pod.
    fn remove_stale_pins(&self, ifaces: &BTreeMap<u32, String>) {
        let Ok(entries) = std::fs::read_dir(self.pin_dir.join("links")) else {
            return;
        };
        for entry in entries.flatten() {
            let index = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok());
            if index.is_none_or(|i| !ifaces.contains_key(&i)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// The pod map as the kernel has it: `true` captures new connections,
    /// `false` drains. A starting ztunnel begins from this.
    pub fn pods(&self) -> BTreeMap<Ipv4Addr, bool> {
        self.captured
            .iter()
            .filter_map(Result::ok)
            .map(|(k, flags)| (Ipv4Addr::from(k.to_ne_bytes()), flags & POD_CAPTURE != 0))
            .collect()
    }

    /// Makes the pod map exactly `pods`: `true` captures new connections of that
    /// address, `false` keeps only its flows already through ztunnel (draining).
    pub fn set_pods(&mut self, pods: &BTreeMap<Ipv4Addr, bool>) -> Result<(), CaptureError> {
        let current: BTreeMap<u32, u32> = self.captured.iter().filter_map(Result::ok).collect();
        let wanted: BTreeMap<u32, u32> = pods
            .iter()
            .map(|(ip, capture)| (key(*ip), if *capture { POD_CAPTURE } else { 0 }))
            .collect();
        let gone: Vec<u32> = current
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for k in &gone {
            if let Err(e) = self.captured.remove(k) {
                warn!(component = "capture", error = %e, "cannot remove pod from capture map");
            }
        }
        self.forget_flows(&gone);
        for (k, flags) in &wanted {
            if current.get(k) == Some(flags) {
                continue;
            }
            self.captured
                .insert(k, flags, 0)
                .map_err(map_error(names::MAP_CAPTURED))?;
            let pod = Ipv4Addr::from(k.to_ne_bytes());
            match *flags {
                POD_CAPTURE => info!(component = "capture", %pod, "pod captured"),
                _ => info!(component = "capture", %pod, "pod released; its open flows drain"),
            }
        }
        Ok(())
    }

    /// Drops the flow-table entries of pods gone from the node, so a new pod
    /// that gets one of their addresses inherits none of their flows.
    fn forget_flows(&mut self, gone: &[u32]) {
        if gone.is_empty() {
            return;
        }
        let stale: Vec<[u8; 12]> = self
            .flows
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let saddr = u32::from_ne_bytes([k[0], k[1], k[2], k[3]]);
                gone.contains(&saddr)
            })
            .collect();
        for k in &stale {
            let _ = self.flows.remove(k);
        }
    }

    /// The pod addresses capturing new connections, as the kernel has them.
    pub fn captured(&self) -> BTreeSet<Ipv4Addr> {
        self.pods()
            .into_iter()
            .filter_map(|(ip, capture)| capture.then_some(ip))
            .collect()
    }

    /// Released pods whose flows through ztunnel still drain.
    pub fn draining(&self) -> BTreeSet<Ipv4Addr> {
        self.pods()
            .into_iter()
            .filter_map(|(ip, capture)| (!capture).then_some(ip))
            .collect()
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> BTreeSet<&str> {
        self.attached.values().map(|a| a.name.as_str()).collect()
    }

    /// Redirect counters, summed over CPUs.
    pub fn counters(&self) -> Counters {
        names::COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = self
                    .counters
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*name, total)
            })
            .collect()
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, CaptureError> {
    ebpf.program_mut(names::PROGRAM)
        .ok_or(CaptureError::MissingProgram(names::PROGRAM))?
        .try_into()
        .map_err(|source| CaptureError::Program {
            name: names::PROGRAM,
            source,
        })
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture")
            .field("pin_dir", &self.pin_dir)
            .field("attached", &self.interfaces())
            .finish_non_exhaustive()
    }
}

/// Interfaces of the current network namespace by ifindex, except loopback.
fn interfaces() -> std::io::Result<BTreeMap<u32, String>> {
    let list = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .filter(|(_, n)| n != "lo" && !n.is_empty())
        .collect())
}

/// `struct weft_bridge_port` for `iface` when it is a port of a Linux
/// bridge: the bridge's ifindex and MAC, from sysfs.
fn bridge_port(iface: &str) -> Option<[u8; 12]> {
    let sys = Path::new("/sys/class/net");
    // A physical uplink enslaved to the bridge is no pod's side: frames
    // from off the node must not pass the pods' source check.
    if sys.join(iface).join("device").exists() {
        return None;
    }
    let master = std::fs::read_link(sys.join(iface).join("master")).ok()?;
    let bridge = sys.join(master.file_name()?);
    // A bond or a VRF is a master too; only a bridge switches frames.
    if !bridge.join("bridge").is_dir() {
        return None;
    }
    let ifindex: u32 = std::fs::read_to_string(bridge.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let mac = std::fs::read_to_string(bridge.join("address")).ok()?;
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&ifindex.to_ne_bytes());
    let octets: Vec<u8> = mac
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    if octets.len() != 6 {
        return None;
    }
    out[4..10].copy_from_slice(&octets);
    Some(out)
}

/// Interfaces that hold Service VIPs, not node addresses: kube-proxy in IPVS
/// mode binds every VIP to `kube-ipvs0`, kube-router to `kube-dummy-if`.
/// Taken for the node's own, a VIP would escape capture.
pub const VIP_INTERFACES: [&str; 2] = ["kube-ipvs0", "kube-dummy-if"];

/// IPv4 addresses of the current network namespace's interfaces, but
/// those of [`VIP_INTERFACES`].
fn local_addresses() -> std::io::Result<BTreeSet<Ipv4Addr>> {
    let mut out = BTreeSet::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        if VIP_INTERFACES.contains(&ifa.interface_name.as_str()) {
            continue;
        }
        if let Some(a) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.insert(a.ip());
        }
    }
    Ok(out)
}
