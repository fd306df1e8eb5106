/* Shared between capture.bpf.c and the Rust loader (ebpf/src/names.rs mirrors it). */
#ifndef WEFT_CAPTURE_H
#define WEFT_CAPTURE_H

/* Value of weft_captured, one entry per local pod ztunnel handles: a pod being
 * captured (WEFT_POD_CAPTURE set: new connections go to ztunnel) or released
 * but draining (flag clear: connections already through ztunnel keep going to
 * it, new ones take the direct path). */
#define WEFT_POD_CAPTURE 1u

/* Indexes of the weft_counters per-CPU array. */
enum weft_counter {
	WEFT_CNT_OUTBOUND = 0,    /* SYN from a captured pod sent to the outbound listener */
	WEFT_CNT_INBOUND = 1,     /* plaintext SYN to a captured pod sent to the inbound listener */
	WEFT_CNT_HBONE = 2,       /* SYN to a captured pod's :15008 sent to the HBONE listener */
	WEFT_CNT_ESTABLISHED = 3, /* packet of a flow ztunnel owns, assigned to its socket */
	WEFT_CNT_NO_LISTENER = 4, /* SYN dropped: ztunnel's listener is missing (fail closed) */
	WEFT_CNT_SPOOFED = 5,     /* SYN claiming a captured source but not from its veth */
	WEFT_CNT_ASSIGN_FAILED = 6, /* bpf_sk_assign refused: dropped (fail closed) */
	WEFT_CNT_ORPHANED = 7,    /* segment of a flow ztunnel owned whose socket is gone: dropped */
	WEFT_CNT_MAX = 8,
};

/* Key of weft_flows: a flow's 4-tuple as seen in a segment from a local pod,
 * addresses and ports in network order. */
struct weft_flow {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
};

/* Value of weft_bridge_ports, keyed by the ifindex of an interface that is a
 * port of a Linux bridge (a bridge CNI's pod veth): the bridge's ifindex,
 * where the node routes the pod's address, and its MAC, which an assigned
 * frame must carry for the bridge to deliver it to the node instead of
 * switching it to another port. */
struct weft_bridge_port {
	__u32 bridge;
	__u8 mac[6];
	__u8 pad[2];
};

#endif
