// SPDX-License-Identifier: (MIT OR GPL-2.0-only)
/*
 * Redirects captured pods' TCP traffic into the node's ztunnel.
 *
 * Attached at tc ingress of every interface of the node network namespace
 * (pod veths and the underlay). For a TCP segment whose source or destination
 * is a local pod in weft_captured:
 *   - a segment of a flow ztunnel already owns is assigned to its socket;
 *   - a SYN from a pod with WEFT_POD_CAPTURE (arriving on that pod's own veth)
 *     goes to the outbound listener (15001);
 *   - a SYN to a pod with WEFT_POD_CAPTURE goes to the HBONE listener (15008)
 *     when it is for port 15008, else to the inbound plaintext listener (15006).
 * On a bridge CNI (pods' veths are ports of a Linux bridge), a segment to
 * capture is sent to the bridge's own ingress, addressed to the bridge, and
 * assigned there: left on the port, the bridge would switch it straight to
 * a pod on the same node.
 * Everything else passes untouched (to the next program on the interface, if
 * any), so flows that existed before capture keep their direct path. Assigned segments get `redirect_mark`; the node has a
 * policy route sending that mark to a local table, so they are delivered to
 * the assigned socket instead of being forwarded.
 *
 * Capture fails closed: a SYN that should reach ztunnel but finds no listener,
 * or that the kernel will not assign, is dropped (the client retries), and a
 * segment of a flow that ztunnel owned (weft_flows) but whose socket is gone
 * (ztunnel died or restarted) is dropped rather than forwarded in plaintext.
 * The program, its links and these maps are pinned in bpffs by the loader, so
 * all of this holds while no ztunnel runs.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "capture.h"

#ifndef AF_INET
#define AF_INET 2
#endif
/* linux/if_packet.h: a frame addressed to another host's MAC. */
#define WEFT_PACKET_OTHERHOST 3

/* What the program returns for segments it leaves alone: TC_ACT_UNSPEC, which
 * TCX reads as "next program" (TCX_NEXT), so programs attached after ours (a
 * CNI's) still see them. TC_ACT_OK would end the chain. */
#define PASS TC_ACT_UNSPEC

/* Set by the loader (EbpfLoader::set_global). Ports are in host order. */
const volatile __u16 port_outbound = 15001;
const volatile __u16 port_inbound = 15006;
const volatile __u16 port_hbone = 15008;
const volatile __u32 listen_addr = 0x7f000001; /* host order: 127.0.0.1 */
const volatile __u32 redirect_mark = 0x5e0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* pod IPv4, network order */
	__type(value, __u32); /* WEFT_POD_* flags */
} weft_captured SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u32); /* node IPv4 address, network order */
	__type(value, __u32);
} weft_node_addrs SEC(".maps");

/* Flows ztunnel took over, keyed by the tuple of the segments a local pod
 * sends in them: the pod's SYN to a ztunnel listener, or the pod's SYN-ACK to a
 * ztunnel upstream socket. Least recently used entries go first. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weft_flow);
	__type(value, __u8);
} weft_flows SEC(".maps");

/* Bridge ports (bridge CNIs): ifindex → struct weft_bridge_port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct weft_bridge_port);
} weft_bridge_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, WEFT_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} weft_counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&weft_counters, &idx);
	if (v)
		*v += 1;
}

/* Output FIB lookup of `addr` (network order) from the node's point of view,
 * out of interface `via`. */
static __always_inline int fib_lookup(struct __sk_buff *skb, __u32 addr, __u32 via, __u32 *ifindex)
{
	struct bpf_fib_lookup p = {};
	p.family = AF_INET;
	p.ipv4_dst = addr;
	p.ifindex = via;
	int rc = bpf_fib_lookup(skb, &p, sizeof(p), BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_OUTPUT);
	*ifindex = p.ifindex;
	return rc;
}

/* True when `saddr` is routed out of the interface the segment came in on:
 * a captured pod's SYN must come from its own veth, not from the underlay.
 * On a bridge CNI the node routes pods through the bridge, so a port of that
 * bridge is the pod's side too. */
static __always_inline int from_own_veth(struct __sk_buff *skb, __u32 saddr)
{
	__u32 in = skb->ingress_ifindex;
	struct weft_bridge_port *port = bpf_map_lookup_elem(&weft_bridge_ports, &in);
	__u32 via = port ? port->bridge : in;
	__u32 oif = 0;
	int rc = fib_lookup(skb, saddr, via, &oif);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH)
		return 0;
	return oif == via;
}

/* True for destinations that are the node itself (its addresses, loopback,
 * link-local): node-local traffic is never captured. The FIB cannot tell a
 * local address from an unroutable one (a Service VIP), hence the map. */
static __always_inline int node_local(__u32 daddr)
{
	__u32 h = bpf_ntohl(daddr);
	if ((h >> 24) == 127 || (h >> 16) == 0xa9fe)
		return 1;
	return bpf_map_lookup_elem(&weft_node_addrs, &daddr) != NULL;
}

/* Hands the segment to ztunnel's socket; a segment that cannot be handed over
 * is dropped, never let through to its original destination. */
static __always_inline int assign(struct __sk_buff *skb, struct bpf_sock *sk, __u32 counter)
{
	/* On a bridge port (a bridge CNI's pod veth) the bridge would switch
	 * the frame to another port, around the node's stack, whatever socket
	 * it carries. It goes to the bridge's own ingress instead, addressed to
	 * the bridge, where this program runs again and assigns it. */
	__u32 in = skb->ingress_ifindex;
	struct weft_bridge_port *port = bpf_map_lookup_elem(&weft_bridge_ports, &in);
	if (port) {
		__u8 mac[ETH_ALEN];
		__builtin_memcpy(mac, port->mac, ETH_ALEN);
		__u32 bridge = port->bridge;
		bpf_sk_release(sk);
		if (bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0) != 0) {
			count(WEFT_CNT_ASSIGN_FAILED);
			return TC_ACT_SHOT;
		}
		return bpf_redirect(bridge, BPF_F_INGRESS);
	}
	/* A frame for another host on a port not (yet) known as a bridge's
	 * would be switched away from the node with its socket ignored:
	 * dropped, never let through around ztunnel. */
	if (skb->pkt_type == WEFT_PACKET_OTHERHOST) {
		bpf_sk_release(sk);
		count(WEFT_CNT_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	long rc = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (rc != 0) {
		count(WEFT_CNT_ASSIGN_FAILED);
		return TC_ACT_SHOT;
	}
	skb->mark = redirect_mark;
	count(counter);
	return TC_ACT_OK;
}

static __always_inline void remember(struct weft_flow *f)
{
	__u8 one = 1;
	bpf_map_update_elem(&weft_flows, f, &one, BPF_ANY);
}

SEC("classifier")
int weft_capture(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP || ip->ihl < 5)
		return PASS;
	if (ip->frag_off & bpf_htons(0x1fff)) /* non-first fragment: no TCP header */
		return PASS;
	struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
	if ((void *)(tcp + 1) > end)
		return PASS;

	__u32 saddr = ip->saddr, daddr = ip->daddr;
	__u32 *src_pod = bpf_map_lookup_elem(&weft_captured, &saddr);
	__u32 src_flags = src_pod ? *src_pod : 0;
	int src_known = src_pod != NULL;
	__u32 *dst_pod = bpf_map_lookup_elem(&weft_captured, &daddr);
	__u32 dst_flags = dst_pod ? *dst_pod : 0;
	int dst_known = dst_pod != NULL;
	/* Keep clang from OR-ing the two map pointers, which the verifier refuses. */
	asm volatile("" : "+r"(src_known), "+r"(dst_known));
	if (!src_known && !dst_known)
		return PASS;
	int src_captured = (src_flags & WEFT_POD_CAPTURE) != 0;
	int dst_captured = (dst_flags & WEFT_POD_CAPTURE) != 0;

	struct bpf_sock_tuple t = {};
	t.ipv4.saddr = saddr;
	t.ipv4.daddr = daddr;
	t.ipv4.sport = tcp->source;
	t.ipv4.dport = tcp->dest;
	struct weft_flow flow = {
		.saddr = saddr, .daddr = daddr, .sport = tcp->source, .dport = tcp->dest,
	};

	/* A flow ztunnel owns: its accepted socket, its transparent upstream
	 * socket, or a request socket mid-handshake. A pod's SYN-ACK to one of
	 * ztunnel's upstream sockets starts such a flow on the pod's side. */
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN) {
			/* Node-local peers (kubelet probes) are never captured:
			 * nothing of theirs to remember. A pod's FIN or RST ends
			 * what it can send on the flow: forget it. */
			if (src_known && tcp->syn && !node_local(daddr))
				remember(&flow);
			else if (src_known && (tcp->fin || tcp->rst))
				bpf_map_delete_elem(&weft_flows, &flow);
			return assign(skb, sk, WEFT_CNT_ESTABLISHED);
		}
		bpf_sk_release(sk);
	}

	if (!tcp->syn || tcp->ack) {
		if (!src_known)
			return PASS;
		if (tcp->syn) {
			/* The pod answers a direct connection: that tuple is no
			 * longer one of ztunnel's. */
			bpf_map_delete_elem(&weft_flows, &flow);
			return PASS;
		}
		/* No socket: either a flow that predates capture (passes) or one
		 * ztunnel owned and lost (dropped: it must not leave in plaintext). */
		if (bpf_map_lookup_elem(&weft_flows, &flow)) {
			count(WEFT_CNT_ORPHANED);
			return TC_ACT_SHOT;
		}
		return PASS;
	}

	__u16 port;
	__u32 counter;
	if (src_captured) {
		/* A captured pod's address may only enter on its own veth. */
		if (!from_own_veth(skb, saddr)) {
			count(WEFT_CNT_SPOOFED);
			return TC_ACT_SHOT;
		}
		if (!node_local(daddr)) {
			port = port_outbound;
			counter = WEFT_CNT_OUTBOUND;
			goto lookup;
		}
	}
	if (!dst_captured) {
		if (src_known)
			bpf_map_delete_elem(&weft_flows, &flow);
		return PASS;
	}
	if (tcp->dest == bpf_htons(port_hbone)) {
		port = port_hbone;
		counter = WEFT_CNT_HBONE;
	} else {
		port = port_inbound;
		counter = WEFT_CNT_INBOUND;
	}
lookup:
	t.ipv4.daddr = bpf_htonl(listen_addr);
	t.ipv4.dport = bpf_htons(port);
	sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		count(WEFT_CNT_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		count(WEFT_CNT_NO_LISTENER);
		return TC_ACT_SHOT;
	}
	if (src_known)
		remember(&flow);
	return assign(skb, sk, counter);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
