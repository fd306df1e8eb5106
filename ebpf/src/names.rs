//! Names shared with `bpf/capture.bpf.c`: programs, maps, globals, counters.

pub const PROGRAM: &str = "weft_capture";
pub const MAP_CAPTURED: &str = "weft_captured";
pub const MAP_NODE_ADDRS: &str = "weft_node_addrs";
pub const MAP_COUNTERS: &str = "weft_counters";
pub const MAP_FLOWS: &str = "weft_flows";
pub const MAP_BRIDGE_PORTS: &str = "weft_bridge_ports";
/// Every map, pinned under `<pin dir>/maps/` so capture outlives ztunnel.
pub const PINNED_MAPS: [&str; 5] = [
    MAP_CAPTURED,
    MAP_NODE_ADDRS,
    MAP_COUNTERS,
    MAP_FLOWS,
    MAP_BRIDGE_PORTS,
];

pub const GLOBAL_PORT_OUTBOUND: &str = "port_outbound";
pub const GLOBAL_PORT_INBOUND: &str = "port_inbound";
pub const GLOBAL_PORT_HBONE: &str = "port_hbone";
pub const GLOBAL_LISTEN_ADDR: &str = "listen_addr";
pub const GLOBAL_REDIRECT_MARK: &str = "redirect_mark";

/// Indexes of `weft_counters`, as `enum weft_counter` in `bpf/capture.h`.
pub const COUNTER_NAMES: [&str; 8] = [
    "outbound",
    "inbound",
    "hbone",
    "established",
    "no_listener",
    "spoofed",
    "assign_failed",
    "orphaned",
];

/// `WEFT_POD_CAPTURE` in `bpf/capture.h`.
pub const POD_CAPTURE: u32 = 1;
