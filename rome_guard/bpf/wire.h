/* Records the wire sensor (wire.c) writes into its ring buffer.
 *
 * The one definition of the wire record layout: compiled by BCC into
 * wire.c and by gcc in tests/test_layout.py, which checks the ctypes
 * mirror in rome_guard/layout/wire.py against it field by field.
 * Change both together. Only fixed-width types.
 */
#ifndef ROME_GUARD_WIRE_H
#define ROME_GUARD_WIRE_H

#include <linux/types.h>

#define WIRE_COMM_LEN 16
/* first payload bytes copied per flow: a Stratum/JSON-RPC first line, an
 * HTTP request head, a DNS question */
#define WIRE_CAPTURE 512
#define WIRE_SNI_MAX 128
#define WIRE_ALPN_MAX 32
/* how far into the payload the kernel looks for "method" (enforce mode) */
#define WIRE_METHOD_SCAN 256
#define WIRE_METHOD_MAX 32

/* wire_record.kind */
#define WIRE_FIRST_PAYLOAD 1 /* first payload of a TCP flow this host opened */
#define WIRE_DNS_QUERY 2 /* a UDP datagram to port 53 */
#define WIRE_DNS_ANSWER 3 /* a UDP datagram from port 53 (ingress) */
#define WIRE_DROPPED_CONNECT 4 /* a SYN to a pool-named address, dropped */

/* wire_record.flags */
#define WIRE_TLS_HELLO 0x1 /* payload starts a TLS ClientHello; sni/alpn parsed */
#define WIRE_DROPPED 0x2 /* the kernel dropped this packet and the rest of the flow */
#define WIRE_PID_AT_CONNECT 0x4 /* pid/uid/comm are the connecting task's (SYN) */

/* wire_record.drop_reason (and the values of drop_methods / drop_hosts) */
#define WIRE_DROP_METHOD 1 /* a mining JSON-RPC method in the first line */
#define WIRE_DROP_METHOD_AGENT 2 /* map value: drop only with an "agent" member */
#define WIRE_DROP_SNI 3 /* TLS SNI in a pool domain */
#define WIRE_DROP_ADDRESS 4 /* destination is an address DNS named as a pool */
#define WIRE_DROP_DNS 5 /* a DNS question for a name in a pool domain */
/* DNS question names the kernel checks: the first this many bytes */
#define WIRE_QNAME_MAX 128

/* settings slots (u64 array written by user space) */
#define WIRE_SET_DROP_UNTIL 0 /* CLOCK_BOOTTIME ns; drops only before this */
#define WIRE_SET_OWNER 1 /* the daemon's tgid: its own traffic is not reported */
#define WIRE_SETTINGS 2

struct wire_record {
	__u32 kind;
	__u32 pid; /* tgid of the sending (or connecting) process, 0 unknown */
	__u32 uid;
	__u16 flags;
	__u16 drop_reason;
	__u64 timestamp_ns; /* CLOCK_BOOTTIME of this packet */
	__u64 connect_ns; /* CLOCK_BOOTTIME of the flow's SYN, 0 unknown */
	__u64 cookie; /* socket cookie */
	__u64 cgroup_id; /* cgroup v2 id of the socket */
	__u8 comm[WIRE_COMM_LEN];
	__u8 family; /* 4 | 6 */
	__u8 protocol; /* IPPROTO_TCP | IPPROTO_UDP */
	__u16 sport;
	__u16 dport;
	__u16 sni_len;
	__u8 saddr[16];
	__u8 daddr[16];
	__u32 payload_len; /* payload bytes in the packet */
	__u32 captured; /* bytes of data[] filled */
	__u16 alpn_len;
	__u16 _pad1;
	__u32 _pad2;
	__u8 sni[WIRE_SNI_MAX];
	__u8 alpn[WIRE_ALPN_MAX];
	__u8 data[WIRE_CAPTURE];
};

/* what the SYN told about a flow, until its first payload */
struct wire_flow {
	__u64 connect_ns;
	__u32 pid;
	__u32 uid;
	__u8 comm[WIRE_COMM_LEN];
};

#endif
