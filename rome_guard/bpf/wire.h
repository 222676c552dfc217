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
/* payload bytes one record carries: a DNS question, or one chunk of a
 * client stream (a longer segment is reported as several chunks) */
#define WIRE_CAPTURE 512
#define WIRE_SNI_MAX 128
#define WIRE_ALPN_MAX 32
/* how far into the client stream the kernel looks for "method" (enforce
 * mode): the stream's first bytes are kept in the flow's window */
#define WIRE_METHOD_SCAN 512
#define WIRE_METHOD_MAX 32
/* The client stream of each new TCP flow is reported (in order, as the
 * TCP sequence numbers place it) until the first of these bounds: */
#define WIRE_STREAM_MAX 4096 /* stream bytes */
#define WIRE_SEGMENTS_MAX 8 /* client segments with payload */
#define WIRE_STREAM_NS 2000000000ULL /* ns after the first payload */
/* the flow's window: the first WIRE_METHOD_SCAN stream bytes (twice the
 * size, so that any bounded copy into it is seen in bounds) */
#define WIRE_WINDOW (2 * WIRE_METHOD_SCAN)

/* wire_record.kind */
#define WIRE_FIRST_PAYLOAD 1 /* first payload of a TCP flow this host opened */
#define WIRE_DNS_QUERY 2 /* a UDP datagram to port 53 */
#define WIRE_DNS_ANSWER 3 /* a UDP datagram from port 53 (ingress) */
#define WIRE_DROPPED_CONNECT 4 /* a SYN to a pool-named address, dropped */
#define WIRE_STREAM_DATA 5 /* later bytes of a client stream (offset > 0) */

/* wire_record.flags */
#define WIRE_TLS_HELLO 0x1 /* payload starts a TLS ClientHello; sni/alpn parsed */
#define WIRE_DROPPED 0x2 /* the kernel dropped this packet and the rest of the flow */
#define WIRE_PID_OF_FLOW 0x4 /* pid/uid/comm: the flow's sender (see wire_flow) */
#define WIRE_STREAM_END 0x8 /* the last record of this flow's stream */
#define WIRE_PROXY_NAME 0x10 /* sni[] holds the host a SOCKS5 request names */

/* wire_cut slots: flows whose stream a bound cut short (counted once) */
#define WIRE_CUT_BYTES 0
#define WIRE_CUT_SEGMENTS 1
#define WIRE_CUT_TIME 2
#define WIRE_CUTS 3

/* wire_record.drop_reason (and the values of drop_methods / drop_hosts) */
#define WIRE_DROP_METHOD 1 /* a mining JSON-RPC method in the first line */
#define WIRE_DROP_METHOD_AGENT 2 /* map value: drop only with an "agent" member */
#define WIRE_DROP_SNI 3 /* TLS SNI in a pool domain */
#define WIRE_DROP_ADDRESS 4 /* destination is an address DNS named as a pool */
#define WIRE_DROP_DNS 5 /* a DNS question for a name in a pool domain */
#define WIRE_DROP_FLOW 6 /* user space asked: a verdict on the stream (drop_cookies) */
#define WIRE_DROP_PROXY 7 /* a SOCKS5 request names a host in a listed domain */
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
	__u64 connect_ns; /* CLOCK_BOOTTIME the flow's sender was seen, 0 unknown */
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
	__u16 segment; /* the flow's client segment this chunk is from, from 1 */
	__u32 offset; /* stream offset of data[0] (0: the flow's first byte) */
	__u8 sni[WIRE_SNI_MAX];
	__u8 alpn[WIRE_ALPN_MAX];
	__u8 data[WIRE_CAPTURE];
};

/* wire_flow.state */
#define WIRE_FLOW_OPEN 0 /* reporting the client stream */
#define WIRE_FLOW_DROPPED 1 /* every later packet is dropped */
#define WIRE_FLOW_ENDED 2 /* a bound reached: the next payload is a cut */
#define WIRE_FLOW_DONE 3 /* the stream is not followed further */

/* A new TCP flow, in its socket's storage from its first payload (done
 * once its stream ends: bound reached, or a quiet first message): the task
 * that sent that payload, in its own context (the task that connected,
 * unless it handed the socket on), when (connect_ns: no process started
 * later is the sender), and how far its client stream has been reported.
 * A bare SYN makes no state, except one that enforce mode drops (then
 * connect_ns and the task are the SYN's). */
struct wire_flow {
	__u64 connect_ns;
	__u64 first_ns; /* first payload, 0 none yet */
	__u32 pid;
	__u32 uid;
	__u8 comm[WIRE_COMM_LEN];
	__u32 isn; /* the SYN's sequence number: stream offset = seq - isn - 1 */
	__u32 sent; /* stream bytes reported so far */
	__u16 segments; /* client segments with payload so far */
	__u16 state; /* WIRE_FLOW_* */
	__u32 scratch[2]; /* see method_listed */
};

/* The client stream's first WIRE_METHOD_SCAN bytes, for the kernel's own
 * verdicts: a second socket storage, made at the first payload and only
 * while dropping (enforce mode), freed with the flow's. */
struct wire_window {
	__u8 data[WIRE_WINDOW];
};

#endif
