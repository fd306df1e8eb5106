//! Loads the capture program, attaches it to the node's interfaces and keeps the
//! captured-pod map in step with ztunnel's view of local workloads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType, tc};
use aya::{Ebpf, EbpfLoader, include_bytes_aligned};
use tracing::{debug, info, warn};

use crate::names;

/// `WEFT_POD_CAPTURE` in `bpf/capture.h`.
const POD_CAPTURE: u32 = 1;

static OBJECT: &[u8] = include_bytes_aligned!("../bpf/capture.bpf.o");

/// Where the capture program sends segments.
#[derive(Clone, Debug)]
pub struct CaptureConfig {
    pub port_outbound: u16,
    pub port_inbound: u16,
    pub port_hbone: u16,
    /// The address ztunnel's capture listeners are bound to.
    pub listen_addr: Ipv4Addr,
    /// Mark put on assigned segments; see [`crate::routing`].
    pub redirect_mark: u32,
}

/// The loaded program, its links and maps. Dropping it detaches everything.
pub struct Capture {
    ebpf: Ebpf,
    captured: HashMap<MapData, u32, u32>,
    node_addrs: HashMap<MapData, u32, u32>,
    counters: PerCpuArray<MapData, u64>,
    attached: BTreeSet<String>,
}

/// Totals of the program's counters, summed over CPUs, by name.
pub type Counters = BTreeMap<&'static str, u64>;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "cannot load the capture eBPF object (is this kernel ≥ 5.10 with BTF, and are we root?): {0}"
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
    #[error("cannot list network interfaces: {0}")]
    Interfaces(#[source] std::io::Error),
}

fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

// === impl Capture ===

impl Capture {
    /// Loads and verifies the program. Nothing is attached yet.
    pub fn load(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let listen_addr = u32::from(cfg.listen_addr);
        let mut ebpf = EbpfLoader::new()
            .override_global(names::GLOBAL_PORT_OUTBOUND, &cfg.port_outbound, true)
            .override_global(names::GLOBAL_PORT_INBOUND, &cfg.port_inbound, true)
            .override_global(names::GLOBAL_PORT_HBONE, &cfg.port_hbone, true)
            .override_global(names::GLOBAL_LISTEN_ADDR, &listen_addr, true)
            .override_global(names::GLOBAL_REDIRECT_MARK, &cfg.redirect_mark, true)
            .load(OBJECT)
            .map_err(CaptureError::Load)?;
        program(&mut ebpf)?
            .load()
            .map_err(|source| CaptureError::Program {
                name: names::PROGRAM,
                source,
            })?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))
        };
        let map_err = |name| move |source| CaptureError::Map { name, source };
        let captured = HashMap::try_from(take(&mut ebpf, names::MAP_CAPTURED)?)
            .map_err(map_err(names::MAP_CAPTURED))?;
        let node_addrs = HashMap::try_from(take(&mut ebpf, names::MAP_NODE_ADDRS)?)
            .map_err(map_err(names::MAP_NODE_ADDRS))?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, names::MAP_COUNTERS)?)
            .map_err(map_err(names::MAP_COUNTERS))?;
        info!(component = "capture", "eBPF capture program loaded");
        Ok(Capture {
            ebpf,
            captured,
            node_addrs,
            counters,
            attached: BTreeSet::new(),
        })
    }

    /// Attaches at tc ingress of every interface of this network namespace not
    /// attached yet (pods come and go, so this is called again on changes), and
    /// refreshes the node's own addresses. Returns the newly attached interfaces.
    pub fn sync_interfaces(&mut self) -> Result<Vec<String>, CaptureError> {
        let ifaces = interfaces().map_err(CaptureError::Interfaces)?;
        self.attached.retain(|i| ifaces.contains(i));
        let program = program(&mut self.ebpf)?;
        let mut added = Vec::new();
        let new: Vec<&String> = ifaces
            .iter()
            .filter(|i| !self.attached.contains(*i))
            .collect();
        for iface in new {
            // Needed only for the netlink fallback on kernels before 6.6 (no TCX).
            let _ = tc::qdisc_add_clsact(iface);
            match program.attach(iface, TcAttachType::Ingress) {
                Ok(_) => {
                    self.attached.insert(iface.clone());
                    added.push(iface.clone());
                }
                // An interface can vanish between listing and attaching.
                Err(source) if !interfaces().is_ok_and(|now| now.contains(iface)) => {
                    debug!(%iface, %source, "interface went away before attach");
                }
                Err(source) => {
                    return Err(CaptureError::Attach {
                        iface: iface.clone(),
                        source,
                    });
                }
            }
        }
        if !added.is_empty() {
            info!(component = "capture", interfaces = ?added, "capture attached");
        }
        let addrs = local_addresses().map_err(CaptureError::Interfaces)?;
        let current: BTreeSet<u32> = self.node_addrs.keys().filter_map(Result::ok).collect();
        let wanted: BTreeSet<u32> = addrs.iter().map(|a| key(*a)).collect();
        for k in current.difference(&wanted) {
            let _ = self.node_addrs.remove(k);
        }
        for k in wanted.difference(&current) {
            self.node_addrs
                .insert(k, 1, 0)
                .map_err(map_error(names::MAP_NODE_ADDRS))?;
        }
        Ok(added)
    }

    /// Makes the pod map exactly `pods`: `true` captures new connections of that
    /// address, `false` keeps only its flows already through ztunnel (draining).
    pub fn set_pods(&mut self, pods: &BTreeMap<Ipv4Addr, bool>) -> Result<(), CaptureError> {
        let current: BTreeMap<u32, u32> = self.captured.iter().filter_map(Result::ok).collect();
        let wanted: BTreeMap<u32, u32> = pods
            .iter()
            .map(|(ip, capture)| (key(*ip), if *capture { POD_CAPTURE } else { 0 }))
            .collect();
        for k in current.keys().filter(|k| !wanted.contains_key(k)) {
            if let Err(e) = self.captured.remove(k) {
                warn!(component = "capture", error = %e, "cannot remove pod from capture map");
            }
        }
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

    /// The pod addresses capturing new connections, as the kernel has them.
    pub fn captured(&self) -> BTreeSet<Ipv4Addr> {
        self.captured
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flags)| flags & POD_CAPTURE != 0)
            .map(|(k, _)| Ipv4Addr::from(k.to_ne_bytes()))
            .collect()
    }

    /// Released pods whose flows through ztunnel still drain.
    pub fn draining(&self) -> BTreeSet<Ipv4Addr> {
        self.captured
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, flags)| flags & POD_CAPTURE == 0)
            .map(|(k, _)| Ipv4Addr::from(k.to_ne_bytes()))
            .collect()
    }

    /// The interfaces the program is attached to.
    pub fn interfaces(&self) -> &BTreeSet<String> {
        &self.attached
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
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

/// Interfaces of the current network namespace, except loopback.
fn interfaces() -> std::io::Result<BTreeSet<String>> {
    let dev = std::fs::read_to_string("/proc/self/net/dev")?;
    Ok(dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|n| n.trim().to_string())
        .filter(|n| n != "lo" && !n.is_empty())
        .collect())
}

/// IPv4 addresses local to the current network namespace (from the FIB's
/// `/32 host LOCAL` entries).
fn local_addresses() -> std::io::Result<BTreeSet<Ipv4Addr>> {
    let trie = std::fs::read_to_string("/proc/self/net/fib_trie")?;
    Ok(parse_fib_trie(&trie))
}

fn parse_fib_trie(trie: &str) -> BTreeSet<Ipv4Addr> {
    let mut out = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in trie.lines() {
        let t = line.trim_start_matches([' ', '|', '+', '-']).trim();
        if let Ok(ip) = t.parse::<Ipv4Addr>() {
            last = Some(ip);
        } else if t.contains("/32 host LOCAL")
            && let Some(ip) = last
        {
            out.insert(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Local addresses are the leaves marked `/32 host LOCAL`, nothing else.
    #[test]
    fn fib_trie_locals() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.240.0.0\n        /24 link UNICAST\n     |-- 10.240.0.11\n        /32 host LOCAL\n     |-- 169.254.1.1\n        /32 host LOCAL\n     |-- 10.240.0.255\n        /32 link BROADCAST\n";
        let got: Vec<String> = parse_fib_trie(trie).iter().map(|a| a.to_string()).collect();
        assert_eq!(got, ["10.240.0.11", "169.254.1.1"]);
    }
}
