/* The wire sensor: what each new flow's client says first, for every process.
 *
 * Two cgroup_skb programs attached to the cgroup v2 root, so every socket
 * on the host (containers in their own network namespaces included) passes
 * through them; offset 0 of the skb is the IP header:
 *
 * - rgw_wire_out (egress): the first payload of a flow this host opened
 *   creates the flow's socket storage (struct wire_flow: the task that
 *   sent it, the SYN's sequence number); a packet that carries nothing
 *   (handshake, ACK, FIN, RST) costs its header parse and no map
 *   operation, a bare SYN one storage lookup. The client stream that
 *   follows is reported in order, each
 *   segment's bytes as one or more records placed by their stream offset,
 *   until a bound (WIRE_STREAM_MAX bytes, WIRE_SEGMENTS_MAX segments,
 *   WIRE_STREAM_NS after the first payload; wire_cut counts the flows a
 *   bound cut) or a first message that says all there is to say (a TLS
 *   ClientHello, an SSH banner, an HTTP GET/HEAD that upgrades nothing):
 *   then the flow costs one storage lookup per packet (its storage is
 *   freed with the socket).
 *   A TLS ClientHello's SNI and ALPN, and the host a SOCKS5 or HTTP
 *   CONNECT request names, are parsed here from any segment. UDP datagrams
 *   to port 53 are reported (DNS questions).
 * - rgw_wire_in (ingress): UDP datagrams from port 53 (DNS answers).
 *
 * Dropping (enforce mode): only while settings[WIRE_SET_DROP_UNTIL] lies in
 * the future, a deadline the live daemon keeps pushing forward; a dead or
 * hung daemon stops every drop within seconds, and the maps that say what
 * to drop are filled by the daemon from its rules. A flow is dropped from
 * its first identified packet: the SYN to an address DNS named as a pool;
 * the segment that completes a listed JSON-RPC method in the stream's
 * first WIRE_METHOD_SCAN bytes (kept in the flow's window while dropping, so a login
 * written in pieces is cut before it is whole); a ClientHello whose SNI,
 * or a proxy request whose host, is listed; any flow whose cookie the
 * daemon put in drop_cookies (a verdict only user space could reach). The
 * flow's state then drops its retransmissions and everything after. A
 * DNS question for a listed domain is dropped (the name never resolves).
 *
 * Both programs return 1 (pass) for everything else, and never read
 * kernel structs: only packet bytes (directly where the headers are in
 * the linear part, else bpf_skb_load_bytes) and helper results.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "wire.h"

#ifndef WIRE_RING_PAGES
#define WIRE_RING_PAGES 4096
#endif
#ifndef WIRE_BATCH_NS
#define WIRE_BATCH_NS 10000000ULL /* kernel.poller.BATCH_MS */
#endif

#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
/* n in [1, max] (max a power of two) in a form the verifier can see:
 * clang turns a plain min() into branches the verifier cannot follow */
#define BOUNDED(n, max) ((((n) - 1) & ((max) - 1)) + 1)
/* hide what clang knows about x, so a mask that follows is kept for the
 * verifier to see */
#define OPAQUE(x) asm volatile("" : "+r"(x))

struct in6_key {
	__u8 addr[16];
};

BPF_RINGBUF_OUTPUT(wire_events, WIRE_RING_PAGES);
BPF_PERCPU_ARRAY(wire_lost, __u64, 1);
BPF_PERCPU_ARRAY(wire_cut, __u64, WIRE_CUTS);
BPF_ARRAY(wire_settings, __u64, WIRE_SETTINGS);
/* CLOCK_BOOTTIME of the last record that woke user space (wake_flags) */
BPF_ARRAY(wire_woke, __u64, 1);
/* every new TCP flow's state, from its SYN until its stream ends */
BPF_SK_STORAGE(wire_flows, struct wire_flow);
/* its first bytes, while dropping (enforce mode) only */
BPF_SK_STORAGE(wire_windows, struct wire_window);
/* written by the daemon: flows a user-space verdict stops (enforce mode) */
BPF_TABLE("lru_hash", __u64, __u32, drop_cookies, 16384);
/* written by the daemon from its rules (enforce mode only) */
BPF_HASH(drop_methods, __u64, __u32, 1024); /* fnv1a(method) -> WIRE_DROP_METHOD* */
BPF_HASH(drop_hosts, __u64, __u32, 4096); /* fnv1a(reversed lower-case suffix) */
BPF_HASH(drop_v4, __u32, __u32, 16384); /* address (network order) */
BPF_HASH(drop_v6, struct in6_key, __u32, 16384);

struct packet {
	__u32 l4; /* offset of the TCP/UDP header */
	__u32 payload; /* offset of the payload */
	__u32 payload_len;
	__u32 seq; /* TCP sequence number */
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16]; /* see read_addresses */
	__u8 daddr[16];
};

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* IPv4 without options or IPv6, then TCP up to its flags: the headers
 * of nearly every packet a host sends, read in place when they are in
 * the linear part (a pure IPv4 ACK is 52 bytes: IPv4 asks for less) */
#define FAST_HEADERS_V4 34
#define FAST_HEADERS 54

static __always_inline int parse_l4(struct packet *p, const __u8 *l4, int is_tcp)
{
	p->sport = (l4[0] << 8) | l4[1];
	p->dport = (l4[2] << 8) | l4[3];
	if (is_tcp) {
		p->seq = ((__u32)l4[4] << 24) | ((__u32)l4[5] << 16) | ((__u32)l4[6] << 8) | l4[7];
		p->tcp_flags = l4[13];
		p->payload = p->l4 + (l4[12] >> 4) * 4;
	} else {
		p->payload = p->l4 + 8;
	}
	return 0;
}

static __always_inline int parse_slow(struct __sk_buff *skb, struct packet *p)
{
	__u8 ip[40];
	__u8 l4[14];

	if (bpf_skb_load_bytes(skb, 0, ip, 1) < 0)
		return -1;
	if ((ip[0] >> 4) == 4) {
		if (bpf_skb_load_bytes(skb, 0, ip, 20) < 0)
			return -1;
		p->family = 4;
		p->protocol = ip[9];
		p->l4 = (ip[0] & 0xf) * 4;
	} else if ((ip[0] >> 4) == 6) {
		if (bpf_skb_load_bytes(skb, 0, ip, 40) < 0)
			return -1;
		p->family = 6;
		p->protocol = ip[6]; /* extension headers are not followed */
		p->l4 = 40;
	} else {
		return -1;
	}
	if (p->protocol == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, p->l4, l4, 14) < 0)
			return -1;
		return parse_l4(p, l4, 1);
	}
	if (p->protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, p->l4, l4, 4) < 0)
			return -1;
		return parse_l4(p, l4, 0);
	}
	return -1;
}

/* The headers in place (direct packet access, no copy): 0 parsed, 1 not
 * the common shape or not in the linear part (parse_slow decides), -1
 * neither TCP nor UDP. */
static __always_inline int parse_fast(struct __sk_buff *skb, struct packet *p)
{
	const __u8 *h = (const __u8 *)(long)skb->data;
	const __u8 *end = (const __u8 *)(long)skb->data_end;

	if (h + FAST_HEADERS_V4 > end)
		return 1;
	if (h[0] == 0x45) { /* IPv4, no options */
		p->family = 4;
		p->protocol = h[9];
		p->l4 = 20;
		if (p->protocol == IPPROTO_TCP || p->protocol == IPPROTO_UDP)
			return parse_l4(p, &h[20], p->protocol == IPPROTO_TCP);
		return -1;
	}
	if ((h[0] >> 4) == 6 && h + FAST_HEADERS <= end) {
		p->family = 6;
		p->protocol = h[6];
		p->l4 = 40;
		if (p->protocol == IPPROTO_TCP || p->protocol == IPPROTO_UDP)
			return parse_l4(p, &h[40], p->protocol == IPPROTO_TCP);
		return -1;
	}
	return 1;
}

static __always_inline int parse_packet(struct __sk_buff *skb, struct packet *p)
{
	int ret = parse_fast(skb, p);

	if (ret > 0)
		ret = parse_slow(skb, p);
	if (ret < 0)
		return -1;
	p->payload_len = skb->len > p->payload ? skb->len - p->payload : 0;
	return 0;
}

/* The packet's addresses into p (IPv4 in the first 4 bytes, the rest
 * zero, as p starts): read once a packet may be reported or its address
 * looked up, never for the packets that pass on their headers alone. */
static __always_inline void read_addresses(struct __sk_buff *skb, struct packet *p)
{
	if (p->family == 4) {
		bpf_skb_load_bytes(skb, 12, p->saddr, 4);
		bpf_skb_load_bytes(skb, 16, p->daddr, 4);
	} else {
		bpf_skb_load_bytes(skb, 8, p->saddr, 16);
		bpf_skb_load_bytes(skb, 24, p->daddr, 16);
	}
}

static __always_inline int dropping(void)
{
	int slot = WIRE_SET_DROP_UNTIL;
	__u64 *until = wire_settings.lookup(&slot);

	/* monitor mode (0) reads no clock */
	return until && *until && *until > bpf_ktime_get_boot_ns();
}

static __always_inline int is_owner(void)
{
	int slot = WIRE_SET_OWNER;
	__u64 *owner = wire_settings.lookup(&slot);

	return owner && *owner && *owner == (bpf_get_current_pid_tgid() >> 32);
}

static __always_inline void count_lost(void)
{
	int slot = 0;
	__u64 *n = wire_lost.lookup(&slot);

	if (n)
		*n += 1;
}

/* A record waits for user space's next drain instead of waking it (the
 * wakeup cost the sending CPU more than the rest of a first payload's
 * work), unless no record woke it for WIRE_BATCH_NS: user space drains
 * again BATCH_MS (= WIRE_BATCH_NS) after every drain that found records
 * (rome_guard/kernel/poller.py), so no record waits longer than that, and
 * a burst costs one wakeup per batch. A drop (enforce mode) wakes at once:
 * a kill may follow. Two CPUs racing here cost one extra wakeup at most. */
static __always_inline __u64 wake_flags(struct wire_record *r)
{
	int slot = 0;
	__u64 *woke;

	if (r->flags & WIRE_DROPPED)
		return BPF_RB_FORCE_WAKEUP;
	woke = wire_woke.lookup(&slot);
	if (woke && r->timestamp_ns - *woke < WIRE_BATCH_NS)
		return BPF_RB_NO_WAKEUP;
	if (woke)
		*woke = r->timestamp_ns;
	return BPF_RB_FORCE_WAKEUP;
}

static __always_inline void fill(struct wire_record *r, struct __sk_buff *skb,
				 struct packet *p, __u32 kind)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	r->kind = kind;
	r->pid = pid_tgid >> 32;
	r->uid = (__u32)bpf_get_current_uid_gid();
	r->flags = 0;
	r->drop_reason = 0;
	r->timestamp_ns = bpf_ktime_get_boot_ns();
	r->connect_ns = 0;
	r->cookie = bpf_get_socket_cookie(skb);
	r->cgroup_id = bpf_skb_cgroup_id(skb);
	bpf_get_current_comm(r->comm, sizeof(r->comm));
	r->family = p->family;
	r->protocol = p->protocol;
	r->sport = p->sport;
	r->dport = p->dport;
	r->sni_len = 0;
	r->alpn_len = 0;
	r->segment = 0;
	r->offset = 0;
	__builtin_memcpy(r->saddr, p->saddr, 16);
	__builtin_memcpy(r->daddr, p->daddr, 16);
	r->payload_len = p->payload_len;
	r->captured = 0;
}

/* up to WIRE_CAPTURE of the len payload bytes from skip on */
static __always_inline void capture(struct wire_record *r, struct __sk_buff *skb,
				    struct packet *p, __u32 skip, __u32 len)
{
	if (len > WIRE_CAPTURE)
		len = WIRE_CAPTURE;
	if (len == 0)
		return;
	len = BOUNDED(len, WIRE_CAPTURE);
	if (bpf_skb_load_bytes(skb, p->payload + skip, r->data, len) == 0)
		r->captured = len;
}

static __always_inline __u32 be16_at(struct __sk_buff *skb, __u32 off, int *ok)
{
	__u8 b[2];

	if (bpf_skb_load_bytes(skb, off, b, 2) < 0) {
		*ok = 0;
		return 0;
	}
	return (b[0] << 8) | b[1];
}

/* TLS ClientHello: walk to the extensions, copy server_name and the first
 * ALPN protocol. Returns 1 when the payload is a ClientHello. */
static __always_inline int parse_client_hello(struct wire_record *r, struct __sk_buff *skb,
					      struct packet *p)
{
	__u8 head[6];
	__u8 one;
	__u32 off, end, limit = skb->len;
	int ok = 1;

	if (r->captured < 44 || r->data[0] != 0x16 || r->data[1] != 0x03 || r->data[5] != 0x01)
		return 0;
	off = p->payload + 43;
	if (bpf_skb_load_bytes(skb, off, &one, 1) < 0)
		return 1;
	off += 1 + one; /* session id */
	off += 2 + be16_at(skb, off, &ok); /* cipher suites */
	if (bpf_skb_load_bytes(skb, off, &one, 1) < 0)
		return 1;
	off += 1 + one; /* compression methods */
	end = off + 2 + be16_at(skb, off, &ok);
	off += 2;
	if (!ok)
		return 1;
	if (end > limit)
		end = limit;

	for (int i = 0; i < 24; i++) {
		__u32 type, len;

		if (off + 4 > end || bpf_skb_load_bytes(skb, off, head, 6) < 0)
			break;
		type = (head[0] << 8) | head[1];
		len = (head[2] << 8) | head[3];
		if (type == 0 && r->sni_len == 0) {
			/* list length(2) type(1) name length(2) name */
			__u32 n = be16_at(skb, off + 7, &ok);

			if (n > WIRE_SNI_MAX)
				n = WIRE_SNI_MAX;
			if (ok && n > 0 &&
			    bpf_skb_load_bytes(skb, off + 9, r->sni, BOUNDED(n, WIRE_SNI_MAX)) == 0)
				r->sni_len = n;
		} else if (type == 16 && r->alpn_len == 0) {
			/* list length(2) then length-prefixed protocols */
			__u32 n = 0;

			if (bpf_skb_load_bytes(skb, off + 6, &one, 1) == 0)
				n = one;
			if (n > WIRE_ALPN_MAX)
				n = WIRE_ALPN_MAX;
			if (n > 0 &&
			    bpf_skb_load_bytes(skb, off + 7, r->alpn, BOUNDED(n, WIRE_ALPN_MAX)) == 0)
				r->alpn_len = n;
		}
		off += 4 + len;
	}
	return 1;
}

/* fnv1a over the SNI from its end, looked up at every label boundary:
 * "pool.minexmr.com" tries "com", "minexmr.com" and the whole name. */
static __always_inline __u32 sni_listed(struct wire_record *r)
{
	__u64 h = FNV_OFFSET;
	__u32 n = r->sni_len;

	if (n > WIRE_SNI_MAX)
		return 0;
	for (int i = 0; i < WIRE_SNI_MAX; i++) {
		int idx = (int)n - 1 - i;
		__u8 c;

		if (idx < 0)
			break;
		c = r->sni[idx & (WIRE_SNI_MAX - 1)];
		if (c == '.') {
			__u32 *hit = drop_hosts.lookup(&h);

			if (hit)
				return WIRE_DROP_SNI;
		}
		if (c >= 'A' && c <= 'Z')
			c += 'a' - 'A';
		h = (h ^ c) * FNV_PRIME;
	}
	if (drop_hosts.lookup(&h))
		return WIRE_DROP_SNI;
	return 0;
}

/* the 8 bytes at window[i], compared whole: one branch per position keeps
 * the verifier's walk of these loops short */
static __always_inline __u64 word_at(const __u8 *window, __u32 i)
{
	OPAQUE(i);
	return *(const __u64 *)&window[i & (WIRE_METHOD_SCAN - 1)];
}

#define AGENT_WORD 0x3a22746e65676122ULL /* "agent": */
#define METHOD_WORD 0x22646f6874656d22ULL /* "method" */
#define UPGRADE_WORD 0x3a65646172677075ULL /* upgrade: (any case, or'ed 0x20) */
#define LOWER_WORD 0x2020202020202020ULL

/* How much of the window is filled, read afresh for each scan: a scan's
 * exit refines its n, and a value the caller still holds must not be
 * refined with it (the verifier would walk the rest once per position). */
static __always_inline __u32 window_len(struct wire_flow *f)
{
	__u32 n = *(volatile __u32 *)&f->sent;

	if (n > WIRE_METHOD_SCAN)
		n = WIRE_METHOD_SCAN;
	OPAQUE(n); /* else clang drops a scan loop's own bound, implied by n's */
	return n;
}

static __always_inline int has_agent(struct wire_window *w, struct wire_flow *f)
{
	__u32 n = window_len(f);

	for (__u32 i = 0; i < WIRE_METHOD_SCAN; i++) {
		if (i + 8 > n)
			break;
		if (word_at(w->data, i) == AGENT_WORD)
			return 1;
	}
	return 0;
}

/* An HTTP request head in the flow's first record asks to upgrade the
 * connection (a WebSocket: what follows is frames, still to be read). */
static __always_inline int asks_upgrade(struct wire_record *r)
{
	__u32 n = r->captured;

	for (__u32 i = 0; i < WIRE_CAPTURE - 8; i++) {
		__u32 j = i;

		if (i + 8 > n)
			break;
		OPAQUE(j);
		j &= WIRE_CAPTURE - 1;
		if (j > WIRE_CAPTURE - 8)
			break;
		if ((*(__u64 *)&r->data[j] | LOWER_WORD) == UPGRADE_WORD)
			return 1;
	}
	return 0;
}

/* The value of the first "method" member in the stream's first n (at most
 * WIRE_METHOD_SCAN) bytes, hashed and looked up once it is whole. Escaped
 * spellings, and methods only a later message names, are left to user
 * space (whose verdict reaches the kernel through drop_cookies). */
static __always_inline __u32 method_listed(struct wire_window *w, struct wire_flow *f)
{
	__u32 at = 0, n = window_len(f);
	__u64 h = FNV_OFFSET;
	__u32 *verdict;

	for (__u32 i = 0; i < WIRE_METHOD_SCAN; i++) {
		if (i + 8 > n)
			return 0;
		if (word_at(w->data, i) == METHOD_WORD) {
			at = i + 8;
			break;
		}
	}
	if (at == 0)
		return 0;
	/* through memory, so the verifier walks what follows once rather
	 * than once per position the loop above could have stopped at */
	*(volatile __u32 *)&f->scratch[0] = at;
	at = *(volatile __u32 *)&f->scratch[0];
	/* whitespace, ':', whitespace, '"' */
	for (int i = 0; i < 8; i++) {
		__u8 c;

		if (at >= n)
			return 0;
		c = w->data[at & (WIRE_WINDOW - 1)];
		at++;
		if (c == '"')
			break;
		if (c != ' ' && c != ':' && c != '\t' && c != '\r' && c != '\n')
			return 0;
	}
	for (int i = 0; i < WIRE_METHOD_MAX; i++) {
		__u8 c;

		if (at + i >= n)
			return 0;
		c = w->data[(at + i) & (WIRE_WINDOW - 1)];
		if (c == '"')
			break;
		h = (h ^ c) * FNV_PRIME;
	}
	verdict = drop_methods.lookup(&h);
	if (!verdict)
		return 0;
	if (*verdict == WIRE_DROP_METHOD_AGENT && !has_agent(w, f))
		return 0;
	return WIRE_DROP_METHOD;
}

/* A DNS question's name (labels after the 12-byte header), checked like a
 * SNI: a forward pass marks where the length bytes are (in the record's
 * sni[], unused by DNS records), a backward pass hashes the name from its
 * end and looks up at every label boundary. */
static __always_inline __u32 dns_query_listed(struct wire_record *r)
{
	__u64 h = FNV_OFFSET;
	__u32 pos = 0, n = r->captured;
	int ended = 0;

	__builtin_memset(r->sni, 0, WIRE_SNI_MAX);
	for (int k = 0; k < 64; k++) {
		__u8 len;

		if (pos >= WIRE_QNAME_MAX || 12 + pos >= n)
			return 0;
		OPAQUE(pos);
		len = r->data[12 + (pos & (WIRE_QNAME_MAX - 1))];
		if (len == 0) {
			ended = 1;
			break;
		}
		if (len > 63)
			return 0; /* compression or garbage: not a question */
		r->sni[pos & (WIRE_QNAME_MAX - 1)] = 1;
		pos += len + 1;
	}
	if (!ended || pos == 0)
		return 0;
	*(volatile __u32 *)&r->offset = pos; /* see method_listed */
	pos = *(volatile __u32 *)&r->offset;
	r->offset = 0;
	for (int i = 0; i < WIRE_QNAME_MAX; i++) {
		__u32 j = pos - 1 - i;
		__u8 c;

		if (i + 1 >= pos)
			break;
		OPAQUE(j);
		j &= WIRE_QNAME_MAX - 1;
		if (r->sni[j]) {
			if (drop_hosts.lookup(&h))
				return WIRE_DROP_DNS;
			h = (h ^ '.') * FNV_PRIME;
			continue;
		}
		c = r->data[12 + j];
		if (c >= 'A' && c <= 'Z')
			c += 'a' - 'A';
		h = (h ^ c) * FNV_PRIME;
	}
	if (drop_hosts.lookup(&h))
		return WIRE_DROP_DNS;
	return 0;
}

static __always_inline __u32 address_listed(struct packet *p)
{
	if (p->family == 4) {
		__u32 addr;

		__builtin_memcpy(&addr, p->daddr, 4);
		return drop_v4.lookup(&addr) ? WIRE_DROP_ADDRESS : 0;
	}
	struct in6_key key = {};

	__builtin_memcpy(key.addr, p->daddr, 16);
	return drop_v6.lookup(&key) ? WIRE_DROP_ADDRESS : 0;
}


#define CONNECT_WORD 0x205443454e4e4f43ULL /* "CONNECT " */

/* SOCKS4a: 04 01 port(2) 0.0.0.x userid NUL host NUL; the host into sni[] */
static __always_inline int socks4a_name(struct wire_record *r)
{
	__u32 start = 0, n = 0;

	for (__u32 i = 8; i < 8 + 64; i++) {
		if (i >= r->captured)
			return 0;
		if (r->data[i & (WIRE_CAPTURE - 1)] == 0) {
			start = i + 1;
			break;
		}
	}
	/* through memory (see method_listed; alpn[] is unused without a
	 * ClientHello): the copy is walked once */
	*(volatile __u32 *)r->alpn = start;
	start = *(volatile __u32 *)r->alpn;
	*(__u32 *)r->alpn = 0;
	for (int i = 0; i < WIRE_SNI_MAX; i++) {
		__u8 c;

		if (start == 0 || start + i >= r->captured)
			break;
		c = r->data[(start + i) & (WIRE_CAPTURE - 1)];
		if (c == 0)
			break;
		r->sni[i & (WIRE_SNI_MAX - 1)] = c;
		n++;
	}
	r->sni_len = n;
	return n > 0;
}

/* The host a proxy request in this chunk names, copied into sni[]: a
 * SOCKS5 CONNECT by domain name (alone, or after a one-method greeting
 * in the same write), a SOCKS4a request or an HTTP CONNECT host:port. */
static __always_inline int proxy_name(struct wire_record *r, struct __sk_buff *skb,
				      struct packet *p, __u32 skip)
{
	__u32 at = 0, n;
	if (r->captured < 8)
		return 0;
	if (r->data[0] == 5 && r->data[1] == 1 && r->data[2] == 0 && r->data[3] == 3)
		at = 4;
	else if (r->data[0] == 5 && r->data[3] == 5 && r->data[4] == 1 && r->data[5] == 0 &&
		 r->data[6] == 3)
		at = 7;
	if (at) {
		n = r->data[at & 7];
		if (n == 0 || at + 1 + n > r->captured)
			return 0;
		if (n > WIRE_SNI_MAX)
			n = WIRE_SNI_MAX;
		if (bpf_skb_load_bytes(skb, p->payload + skip + at + 1, r->sni,
				       BOUNDED(n, WIRE_SNI_MAX)) < 0)
			return 0;
		r->sni_len = n;
		return 1;
	}
	if (r->data[0] == 4 && r->data[1] == 1 && r->data[4] == 0 && r->data[5] == 0 &&
	    r->data[6] == 0 && r->data[7] != 0)
		return socks4a_name(r);
	if (*(__u64 *)r->data != CONNECT_WORD)
		return 0;
	n = 0;
	for (int i = 0; i < WIRE_SNI_MAX; i++) {
		__u8 c;

		if (8 + i >= r->captured)
			break;
		c = r->data[(8 + i) & (WIRE_CAPTURE - 1)];
		if (c == ':' || c == ' ' || c == '\r' || c == '\n')
			break;
		r->sni[i & (WIRE_SNI_MAX - 1)] = c;
		n++;
	}
	r->sni_len = n;
	return n > 0;
}

static __always_inline void count_cut(__u32 slot)
{
	__u64 *n = wire_cut.lookup(&slot);

	if (n)
		*n += 1;
}

/* A first message that says all there is to say: the rest of the flow is
 * encrypted (TLS, SSH) or an answer is awaited first (an HTTP GET/HEAD
 * that upgrades nothing). The stream is not followed further. */
static __always_inline int quiet(struct wire_record *r)
{
	__u32 w;
	if (r->flags & WIRE_TLS_HELLO)
		return 1;
	if (r->captured < 4)
		return 0;
	w = *(__u32 *)r->data;
	if (w == 0x2d485353) /* "SSH-" */
		return 1;
	if (w == 0x20544547 || w == 0x44414548) /* "GET ", "HEAD" */
		return !asks_upgrade(r);
	return 0;
}

static __always_inline void own(struct wire_record *r, struct wire_flow *f)
{
	/* the flow's sender, seen in its own task when its state was made
	 * (connect() for a SYN, send() for a first payload): a later
	 * segment may leave the host from a softirq */
	r->pid = f->pid;
	r->uid = f->uid;
	r->connect_ns = f->connect_ns;
	__builtin_memcpy(r->comm, f->comm, WIRE_COMM_LEN);
	r->flags = WIRE_PID_OF_FLOW;
}

/* A flow's state, made in the sending task; isn is the flow's SYN's
 * sequence number (the stream's first byte is at isn + 1). */
static __always_inline struct wire_flow *open_flow(struct bpf_sock *sk, __u32 isn)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct wire_flow *flow;

	flow = wire_flows.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!flow)
		return 0;
	flow->connect_ns = bpf_ktime_get_boot_ns();
	flow->first_ns = 0;
	flow->pid = pid_tgid >> 32;
	flow->uid = (__u32)bpf_get_current_uid_gid();
	bpf_get_current_comm(flow->comm, sizeof(flow->comm));
	flow->isn = isn;
	flow->sent = 0;
	flow->segments = 0;
	flow->state = WIRE_FLOW_OPEN;
	return flow;
}

/* A payload on a socket without flow state starts a client stream only
 * when it is the socket's first data transmission (data_segs_out counts
 * retransmissions too) at stream offset 0 of a flow this host opened:
 * snd_una - bytes_acked is the ISN of a socket that sent a SYN (its SYN
 * counts as acked) and ISN + 1 of an accepted one. So a server's reply,
 * a flow older than the sensor and a retransmission after the stream
 * ended all pass without state, and a bare SYN needs none. */
static __always_inline int starts_client_stream(struct __sk_buff *skb, struct packet *p,
						struct bpf_sock *sk)
{
	struct bpf_tcp_sock *tp = bpf_tcp_sock(sk);
	__u32 segments = skb->gso_segs ? skb->gso_segs : 1;

	if (!tp || tp->data_segs_out != segments)
		return 0;
	return p->seq - (tp->snd_una - (__u32)tp->bytes_acked) == 1;
}

/* The stream is no longer followed: the flow costs one lookup a packet.
 * Its state stays until the socket is freed (deleting it cost a first
 * payload more than the rest of its work, and the socket's end frees it
 * anyway); the window goes at once (enforce mode only: the window exists
 * only while dropping, and a window left by a mode change goes with the
 * socket). */
static __always_inline void end_flow(struct bpf_sock *sk, struct wire_flow *flow)
{
	flow->state = WIRE_FLOW_DONE;
	if (dropping())
		wire_windows.sk_storage_delete(sk);
}

/* a reused socket's last flow, forgotten */
static __always_inline void forget_flow(struct bpf_sock *sk)
{
	wire_flows.sk_storage_delete(sk);
	wire_windows.sk_storage_delete(sk);
}

/* A SYN: the state a reused socket kept from its last flow goes (a
 * retransmitted SYN keeps it: same sequence number); in enforce mode a
 * SYN to an address DNS named as a pool is dropped, and only then is the
 * flow's state made here, to drop its retransmissions quietly. 0: drop. */
static __always_inline int on_syn(struct __sk_buff *skb, struct packet *p, struct bpf_sock *sk)
{
	struct wire_flow *flow = wire_flows.sk_storage_get(sk, 0, 0);
	struct wire_record *r;
	__u32 reason;

	if (flow && flow->isn == p->seq) {
		if (flow->state == WIRE_FLOW_DROPPED)
			return dropping() ? 0 : 1;
		return 1;
	}
	if (flow)
		forget_flow(sk);
	if (!dropping() || is_owner())
		return 1;
	read_addresses(skb, p);
	reason = address_listed(p);
	if (!reason)
		return 1;
	flow = open_flow(sk, p->seq);
	if (!flow)
		return 1;
	flow->state = WIRE_FLOW_DROPPED;
	r = wire_events.ringbuf_reserve(sizeof(struct wire_record));
	if (!r) {
		count_lost();
		return 0;
	}
	fill(r, skb, p, WIRE_DROPPED_CONNECT);
	own(r, flow);
	r->flags = WIRE_DROPPED | WIRE_PID_OF_FLOW;
	r->drop_reason = reason;
	wire_events.ringbuf_submit(r, wake_flags(r));
	return 0;
}

/* the verdict on a flow's segment, from its first record and the window */
static __always_inline __u32 segment_listed(struct wire_record *r, struct wire_flow *f,
					    struct wire_window *w)
{
	__u32 reason = 0;

	if (r->sni_len) {
		reason = sni_listed(r);
		if (reason && (r->flags & WIRE_PROXY_NAME))
			reason = WIRE_DROP_PROXY;
	}
	if (!reason && w)
		reason = method_listed(w, f);
	return reason;
}

/* A client segment of a flow in its socket's storage: report it (as the
 * chunks of WIRE_CAPTURE bytes its new stream bytes fill), judge it in
 * enforce mode, and end the stream at its bounds. */
static __always_inline int on_segment(struct __sk_buff *skb, struct packet *p,
				      struct bpf_sock *sk, struct wire_flow *flow)
{
	struct wire_window *window = 0;
	struct wire_record *r;
	__u64 now = bpf_ktime_get_boot_ns();
	__u32 off, skip = 0, at, take, reason = 0, cut = WIRE_CUTS, ended;

	if (flow->state == WIRE_FLOW_DROPPED)
		return dropping() ? 0 : 1;
	if (flow->state == WIRE_FLOW_DONE)
		return 1;
	if (flow->state == WIRE_FLOW_ENDED) {
		/* more than a bound let through: counted once, then let go */
		count_cut(flow->segments >= WIRE_SEGMENTS_MAX ? WIRE_CUT_SEGMENTS : WIRE_CUT_BYTES);
		end_flow(sk, flow);
		return 1;
	}
	/* a SYN's payload (TCP Fast Open) starts at isn + 1 */
	off = p->seq - flow->isn - ((p->tcp_flags & TCP_SYN) ? 0 : 1);
	if (off < flow->sent) {
		if (off + p->payload_len <= flow->sent)
			return 1; /* a retransmission: reported already */
		skip = flow->sent - off;
	}
	at = off + skip;
	if (flow->first_ns == 0) {
		flow->first_ns = now;
	} else if (now - flow->first_ns > WIRE_STREAM_NS) {
		count_cut(WIRE_CUT_TIME);
		end_flow(sk, flow);
		return 1;
	}
	if (at >= WIRE_STREAM_MAX || flow->segments >= WIRE_SEGMENTS_MAX) {
		count_cut(flow->segments >= WIRE_SEGMENTS_MAX ? WIRE_CUT_SEGMENTS : WIRE_CUT_BYTES);
		end_flow(sk, flow);
		return 1;
	}
	take = p->payload_len - skip;
	if (take > WIRE_STREAM_MAX - at) {
		take = WIRE_STREAM_MAX - at;
		cut = WIRE_CUT_BYTES;
	}
	flow->segments++;
	if (dropping() && at < WIRE_METHOD_SCAN && take > 0) {
		__u32 n = take < WIRE_METHOD_SCAN - at ? take : WIRE_METHOD_SCAN - at;

		window = wire_windows.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		OPAQUE(at);
		if (window)
			bpf_skb_load_bytes(skb, p->payload + skip,
					   &window->data[at & (WIRE_METHOD_SCAN - 1)],
					   BOUNDED(n, WIRE_METHOD_SCAN));
	}
	if (at + take > flow->sent)
		flow->sent = at + take;
	ended = flow->sent >= WIRE_STREAM_MAX || flow->segments >= WIRE_SEGMENTS_MAX;

	r = wire_events.ringbuf_reserve(sizeof(struct wire_record));
	if (!r) {
		count_lost();
	} else {
		fill(r, skb, p, at == 0 ? WIRE_FIRST_PAYLOAD : WIRE_STREAM_DATA);
		own(r, flow);
		r->segment = flow->segments;
		r->offset = at;
		capture(r, skb, p, skip, take);
		if (skip == 0 && parse_client_hello(r, skb, p))
			r->flags |= WIRE_TLS_HELLO;
		else if (proxy_name(r, skb, p, skip))
			r->flags |= WIRE_PROXY_NAME;
		if (dropping())
			reason = segment_listed(r, flow, window);
		if (reason) {
			r->flags |= WIRE_DROPPED;
			r->drop_reason = reason;
			flow->state = WIRE_FLOW_DROPPED;
		} else if (at == 0 && quiet(r)) {
			ended = 2;
		}
		if (ended && take <= WIRE_CAPTURE)
			r->flags |= WIRE_STREAM_END;
		wire_events.ringbuf_submit(r, wake_flags(r));
	}
	if (reason)
		return 0;
	/* the rest of a segment longer than one record; its place read back
	 * from memory, so that the verifier walks this loop once for every
	 * way the code above could have got here */
	*(volatile __u32 *)&flow->scratch[0] = at;
	*(volatile __u32 *)&flow->scratch[1] = take;
	at = *(volatile __u32 *)&flow->scratch[0];
	take = *(volatile __u32 *)&flow->scratch[1];
	for (__u32 i = 1; i < WIRE_STREAM_MAX / WIRE_CAPTURE; i++) {
		__u32 from = i * WIRE_CAPTURE;

		if (from >= take)
			break;
		r = wire_events.ringbuf_reserve(sizeof(struct wire_record));
		if (!r) {
			count_lost();
			break;
		}
		fill(r, skb, p, WIRE_STREAM_DATA);
		own(r, flow);
		r->segment = flow->segments;
		r->offset = at + from;
		capture(r, skb, p, skip + from, take - from);
		if (ended && take - from <= WIRE_CAPTURE)
			r->flags |= WIRE_STREAM_END;
		wire_events.ringbuf_submit(r, wake_flags(r));
	}
	if (cut != WIRE_CUTS) {
		count_cut(cut); /* this very segment went past the byte bound */
		end_flow(sk, flow);
	} else if (ended == 1) {
		flow->state = WIRE_FLOW_ENDED; /* a later segment is a cut */
		if (dropping())
			wire_windows.sk_storage_delete(sk);
	} else if (ended) {
		end_flow(sk, flow); /* a quiet first message: nothing was cut */
	}
	return 1;
}

int rgw_wire_out(struct __sk_buff *skb)
{
	struct packet p = {};
	struct wire_flow *flow;
	struct wire_record *r;
	struct bpf_sock *sk;
	__u64 cookie;
	__u32 reason;
	int syn;

	if (parse_packet(skb, &p) < 0)
		return 1;
	if (p.protocol == IPPROTO_UDP) {
		if (p.dport != 53 || p.payload_len == 0 || is_owner())
			return 1;
		read_addresses(skb, &p);
		r = wire_events.ringbuf_reserve(sizeof(struct wire_record));
		if (!r) {
			count_lost();
			return 1;
		}
		fill(r, skb, &p, WIRE_DNS_QUERY);
		capture(r, skb, &p, 0, p.payload_len);
		reason = dropping() ? dns_query_listed(r) : 0;
		if (reason) {
			r->flags |= WIRE_DROPPED;
			r->drop_reason = reason;
		}
		wire_events.ringbuf_submit(r, wake_flags(r));
		return reason ? 0 : 1;
	}
	/* monitor mode (no deadline) never looks the cookie up */
	if (dropping()) {
		cookie = bpf_get_socket_cookie(skb);
		if (drop_cookies.lookup(&cookie))
			return 0;
	}
	/* the common packets first, with no map operation: a packet without
	 * payload (ACK, SYN-ACK, FIN, RST) is nothing; a first payload that
	 * carries a FIN is still a payload */
	syn = (p.tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
	if (!syn && (p.payload_len == 0 || (p.tcp_flags & TCP_RST)))
		return 1;
	sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	if (syn) {
		if (!on_syn(skb, &p, sk))
			return 0;
		/* TCP Fast Open: the SYN carries the first payload */
		if (p.payload_len == 0)
			return 1;
	}
	flow = wire_flows.sk_storage_get(sk, 0, 0);
	if (!flow) {
		if (!syn && !starts_client_stream(skb, &p, sk))
			return 1;
		if (is_owner())
			return 1;
		/* a first payload sits at isn + 1; a SYN's (TCP Fast Open) at
		 * its own sequence number + 1 */
		flow = open_flow(sk, syn ? p.seq : p.seq - 1);
		if (!flow)
			return 1;
	}
	read_addresses(skb, &p);
	return on_segment(skb, &p, sk, flow);
}

int rgw_wire_in(struct __sk_buff *skb)
{
	struct packet p = {};
	struct wire_record *r;

	if (parse_packet(skb, &p) < 0 || p.protocol != IPPROTO_UDP || p.sport != 53 ||
	    p.payload_len == 0)
		return 1;
	read_addresses(skb, &p);
	r = wire_events.ringbuf_reserve(sizeof(struct wire_record));
	if (!r) {
		count_lost();
		return 1;
	}
	fill(r, skb, &p, WIRE_DNS_ANSWER);
	r->pid = 0; /* softirq: whoever runs is not the receiver */
	r->uid = 0;
	__builtin_memset(r->comm, 0, WIRE_COMM_LEN);
	capture(r, skb, &p, 0, p.payload_len);
	wire_events.ringbuf_submit(r, wake_flags(r));
	return 1;
}
