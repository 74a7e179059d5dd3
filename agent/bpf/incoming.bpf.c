// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * kmirror incoming traffic: one TC ingress classifier on the pod's interfaces.
 *
 * For a port in `incoming_ports`, and only for packets to one of the target's own addresses
 * (`local_addrs`, the addresses of the interfaces of its network namespace, kept current by the
 * agent): traffic that merely passes through the namespace (a host-network target's node
 * forwarding other workloads' packets) is never taken or copied.
 *
 *  - STEAL: a packet that belongs to no existing connection and opens one (a SYN, or the final
 *    ACK of a SYN-cookie handshake) is assigned to the agent's listener (`steal_listener`,
 *    a SOCKMAP filled by the agent). Packets of existing connections are left alone, so
 *    connections that predate the session keep going to the pod's app, and once the agent's
 *    link or listener is gone every new connection reaches the pod's app again (fail open).
 *  - MIRROR: the TCP segment (addresses, ports, sequence number, flags, payload) is copied into
 *    the `mirror_events` ring buffer in fixed-size chunks; the packet itself goes on untouched.
 *    A chunk that does not fit is counted in `stats`, never half-written. Only segments the
 *    kernel will take are copied: a connection-opening SYN, or a segment of a connection or
 *    handshake that has a socket (anything else the kernel drops or resets).
 *
 * Every path returns TC_ACT_UNSPEC (TCX_NEXT) so programs after this one still run.
 * Only uapi headers are used; IPv4 and IPv6 (without extension headers) are handled.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define MODE_STEAL 1
#define MODE_MIRROR 2

#define CHUNK 2048
#define MAX_CHUNKS 100

enum stat {
	STAT_STEAL_ASSIGNED,
	STAT_STEAL_EXISTING,
	STAT_STEAL_NO_LISTENER,
	STAT_STEAL_ASSIGN_FAILED,
	STAT_MIRROR_PACKETS,
	STAT_MIRROR_LOST,
	STAT_NOT_LOCAL,
	STAT_MIRROR_NO_SOCKET,
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16); /* destination port, host order */
	__type(value, __u8); /* MODE_* */
} incoming_ports SEC(".maps");

/* The target's own addresses (IPv4 as v4-mapped IPv6); value unused. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u8[16]);
	__type(value, __u8);
} local_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} steal_listener SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} mirror_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/* Per-CPU packet sequence numbers: a packet's id is (sequence << 12) | cpu, unique across
 * CPUs without an atomic fetch-and-add, which kernels before 5.12 refuse ("BPF_STX uses
 * reserved fields"); TC programs are not preempted, so the plain increment is safe. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} packet_counter SEC(".maps");

/* One ring-buffer record: a slice of one TCP segment's payload. Layout shared with the agent. */
struct mirror_chunk {
	__u64 packet_id;
	__u8 saddr[16]; /* IPv4 addresses are v4-mapped */
	__u8 daddr[16];
	__u16 sport; /* host order */
	__u16 dport;
	__u32 seq;
	__u32 payload_len; /* of the whole segment */
	__u32 offset;      /* of this chunk within the payload */
	__u32 chunk_len;
	__u8 flags; /* TCP flags byte: FIN 1, SYN 2, RST 4, PSH 8, ACK 16 */
	__u8 pad[3];
	__u8 data[CHUNK];
};

static __always_inline void count(__u32 which)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &which);
	if (v)
		*v += 1;
}

struct parsed {
	struct bpf_sock_tuple tuple;
	__u32 tuple_len;
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 l4_off;
	__u32 l3_len; /* IP total length (0 if unknown) counted from the IP header */
	__u32 l3_off;
	struct tcphdr tcp;
};

static __always_inline void v4_mapped(__u8 out[16], __u32 addr)
{
	__builtin_memset(out, 0, 10);
	out[10] = 0xff;
	out[11] = 0xff;
	__builtin_memcpy(out + 12, &addr, 4);
}

/* Parses Ethernet + IPv4/IPv6 + TCP with bpf_skb_load_bytes (works on non-linear skbs). */
static __always_inline int parse(struct __sk_buff *skb, struct parsed *p)
{
	__u16 proto = bpf_ntohs(skb->protocol);
	__u32 off = ETH_HLEN;
	p->l3_off = off;
	if (proto == ETH_P_IP) {
		struct iphdr ip;
		if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.protocol != IPPROTO_TCP)
			return -1;
		/* Fragments other than the first carry no TCP header. */
		if (ip.frag_off & bpf_htons(0x1fff))
			return -1;
		p->tuple.ipv4.saddr = ip.saddr;
		p->tuple.ipv4.daddr = ip.daddr;
		p->tuple_len = sizeof(p->tuple.ipv4);
		v4_mapped(p->saddr, ip.saddr);
		v4_mapped(p->daddr, ip.daddr);
		p->l3_len = bpf_ntohs(ip.tot_len);
		off += (ip.ihl & 0xf) * 4;
	} else if (proto == ETH_P_IPV6) {
		struct ipv6hdr ip6;
		if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.nexthdr != IPPROTO_TCP)
			return -1;
		__builtin_memcpy(p->tuple.ipv6.saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->tuple.ipv6.daddr, &ip6.daddr, 16);
		p->tuple_len = sizeof(p->tuple.ipv6);
		__builtin_memcpy(p->saddr, &ip6.saddr, 16);
		__builtin_memcpy(p->daddr, &ip6.daddr, 16);
		p->l3_len = ip6.payload_len ? bpf_ntohs(ip6.payload_len) + sizeof(ip6) : 0;
		off += sizeof(ip6);
	} else {
		return -1;
	}
	if (bpf_skb_load_bytes(skb, off, &p->tcp, sizeof(p->tcp)) < 0)
		return -1;
	p->l4_off = off;
	if (p->tuple_len == sizeof(p->tuple.ipv4)) {
		p->tuple.ipv4.sport = p->tcp.source;
		p->tuple.ipv4.dport = p->tcp.dest;
	} else {
		p->tuple.ipv6.sport = p->tcp.source;
		p->tuple.ipv6.dport = p->tcp.dest;
	}
	return 0;
}

static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct parsed *p)
{
	/* The verifier wants a constant tuple size. */
	if (p->tuple_len == sizeof(p->tuple.ipv4))
		return bpf_skc_lookup_tcp(skb, &p->tuple, sizeof(p->tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	return bpf_skc_lookup_tcp(skb, &p->tuple, sizeof(p->tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
}

static __always_inline void steal(struct __sk_buff *skb, struct parsed *p)
{
	struct bpf_sock *sk = lookup(skb, p);
	if (sk) {
		/* The lookup falls back to listeners: only a non-listening socket means "this
		 * packet belongs to an existing connection (or handshake)". */
		int existing = sk->state != BPF_TCP_LISTEN;
		bpf_sk_release(sk);
		if (existing) {
			count(STAT_STEAL_EXISTING);
			return;
		}
	}
	int opens = p->tcp.syn && !p->tcp.ack;
	/* The final ACK of a SYN-cookie handshake has no request socket to find. */
	int cookie_ack = !p->tcp.syn && p->tcp.ack && !p->tcp.rst && !p->tcp.fin;
	if (!opens && !cookie_ack)
		return;
	__u32 zero = 0;
	struct bpf_sock *listener = bpf_map_lookup_elem(&steal_listener, &zero);
	if (!listener) {
		count(STAT_STEAL_NO_LISTENER);
		return;
	}
	if (listener->state != BPF_TCP_LISTEN) {
		bpf_sk_release(listener);
		count(STAT_STEAL_NO_LISTENER);
		return;
	}
	long err = bpf_sk_assign(skb, listener, 0);
	bpf_sk_release(listener);
	count(err ? STAT_STEAL_ASSIGN_FAILED : STAT_STEAL_ASSIGNED);
}

static __always_inline void mirror(struct __sk_buff *skb, struct parsed *p)
{
	if (!(p->tcp.syn && !p->tcp.ack)) {
		/* Not a SYN: it belongs to a connection (or handshake) with a socket, or the kernel
		 * drops it (no listener-only match: a stray ACK to a listener is reset). A SYN-cookie
		 * handshake's final ACK is skipped too; the reassembler starts at the first segment
		 * the new connection's socket sees. */
		struct bpf_sock *sk = lookup(skb, p);
		if (!sk) {
			count(STAT_MIRROR_NO_SOCKET);
			return;
		}
		int listening = sk->state == BPF_TCP_LISTEN;
		bpf_sk_release(sk);
		if (listening) {
			count(STAT_MIRROR_NO_SOCKET);
			return;
		}
	}
	__u64 payload_off = p->l4_off + p->tcp.doff * 4;
	__u64 end = skb->len;
	/* Short frames are padded to 60 bytes: trust the IP length when there is one. */
	if (p->l3_len && p->l3_off + p->l3_len < end)
		end = p->l3_off + p->l3_len;
	__u64 payload_len = end > payload_off ? end - payload_off : 0;
	__u32 zero = 0;
	__u64 *counter = bpf_map_lookup_elem(&packet_counter, &zero);
	if (!counter)
		return;
	__u64 id = (*counter << 12) | (bpf_get_smp_processor_id() & 0xfff);
	*counter += 1;
	count(STAT_MIRROR_PACKETS);

	for (__u32 i = 0; i < MAX_CHUNKS; i++) {
		__u64 off = (__u64)i * CHUNK;
		if (i > 0 && off >= payload_len)
			break;
		struct mirror_chunk *c = bpf_ringbuf_reserve(&mirror_events, sizeof(*c), 0);
		if (!c) {
			count(STAT_MIRROR_LOST);
			return;
		}
		c->packet_id = id;
		__builtin_memcpy(c->saddr, p->saddr, 16);
		__builtin_memcpy(c->daddr, p->daddr, 16);
		c->sport = bpf_ntohs(p->tcp.source);
		c->dport = bpf_ntohs(p->tcp.dest);
		c->seq = bpf_ntohl(p->tcp.seq);
		c->payload_len = payload_len;
		c->offset = off;
		c->flags = ((__u8 *)&p->tcp)[13];
		__u64 cl = payload_len > off ? payload_len - off : 0;
		if (cl > CHUNK)
			cl = CHUNK;
		c->chunk_len = cl;
		if (cl >= 1) {
			/* The length is bounded on one register, then passed as that register plus
			 * one: clang otherwise tests `cl >= 1` on a copy, and verifiers before 6.x
			 * (Debian 12's 6.1) then see a length that may be 0 and reject the program. */
			__u64 last = cl - 1; /* 64 bits: a 32-bit value is compared on a zero-extended copy */
			asm volatile("" : "+r"(last));
			if (last >= CHUNK) {
				bpf_ringbuf_discard(c, 0);
				return;
			}
			if (bpf_skb_load_bytes(skb, payload_off + off, c->data, last + 1) < 0) {
				bpf_ringbuf_discard(c, 0);
				count(STAT_MIRROR_LOST);
				return;
			}
		}
		bpf_ringbuf_submit(c, 0);
	}
}

SEC("tc")
int incoming(struct __sk_buff *skb)
{
	struct parsed p = {};
	if (parse(skb, &p) < 0)
		return TC_ACT_UNSPEC;
	__u16 port = bpf_ntohs(p.tcp.dest);
	__u8 *mode = bpf_map_lookup_elem(&incoming_ports, &port);
	if (!mode)
		return TC_ACT_UNSPEC;
	if (!bpf_map_lookup_elem(&local_addrs, p.daddr)) {
		count(STAT_NOT_LOCAL);
		return TC_ACT_UNSPEC;
	}
	if (*mode == MODE_STEAL)
		steal(skb, &p);
	else if (*mode == MODE_MIRROR)
		mirror(skb, &p);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
