/* Outbound connections: TCP connects with their outcome, datagram
 * destinations. Part of sensor.c.
 *
 * TCP: sock:inet_sock_set_state CLOSE->SYN_SENT runs in the task calling
 * connect(); it is recorded in tcp_connecting (keyed by socket address) and
 * reported as an attempt. The outcome arrives later in softirq context,
 * where the current task is unrelated, so it is reported with the recorded
 * task: SYN_SENT->ESTABLISHED is established; SYN_SENT->CLOSE is refused
 * when tcp:tcp_receive_reset fired for the socket in between, else failed
 * (timeout, ICMP unreachable, connect aborted). inet_sk_error_report is not
 * used: the kernel fires it after the CLOSE transition and without the
 * socket address.
 *
 * Datagrams: a tracepoint does not show a socket's type. connect() on an
 * IPv4/IPv6 address that returns 0 without sending a SYN in the same call
 * is reported as a datagram connect (protocol 0: UDP in practice; ICMP ping
 * and raw sockets look the same, as does TCP_FASTOPEN_CONNECT). sendto,
 * sendmsg and sendmmsg (first message) with an IPv4/IPv6 destination are
 * reported from sock:sock_send_length, which names the socket's protocol:
 * UDP, UDP-Lite, ICMP (ping sockets, raw ICMP sockets) and raw IP
 * (IPPROTO_RAW: packets with their own headers, as nmap sends its probes)
 * are reported, others (TCP fast open: seen as SYN_SENT anyway) are not. Without that tracepoint (kernels before 6.3)
 * every such send is reported at syscall exit with protocol 0.
 * A datagram destination is reported once per process (pid + fork/exec
 * generation) and destination per sensor_config.datagram_repeat_ns.
 *
 * A TCP connect repeating one a process made to the same destination within
 * sensor_config.tcp_repeat_ns is reported only when its outcome differs from
 * the last one reported (tcp_repeat_check).
 *
 * Loopback-to-loopback traffic of cgroups in loopback_ignore_cgroups (and
 * their descendants) is not reported: registered jobs' rendezvous.
 */

static __always_inline int is_loopback6(const __u8 *addr)
{
	/* byte by byte: callers' arrays need not be word-aligned */
	for (int i = 0; i < 8; i++) {
		if (addr[i])
			return 0;
	}
	if (addr[8] == 0 && addr[9] == 0 && addr[10] == 0 && addr[11] == 0)
		return addr[12] == 0 && addr[13] == 0 && addr[14] == 0 && addr[15] == 1; /* ::1 */
	/* IPv4-mapped ::ffff:127.x.y.z */
	return addr[8] == 0 && addr[9] == 0 && addr[10] == 0xff && addr[11] == 0xff &&
	       addr[12] == 127;
}

static __always_inline int addr_is_loopback(__u8 family, const __u8 *addr)
{
	if (family == RG_AF_INET)
		return addr[0] == 127;
	return is_loopback6(addr);
}

static __always_inline int cgroup_ignores_loopback(void)
{
	__u32 zero = 0;
	struct sensor_config *config = sensor_config.lookup(&zero);
	__u64 id;

	if (!config || !config->loopback_ignoring)
		return 0; /* no registered job: no ancestor walk per loopback connect */
	id = bpf_get_current_cgroup_id();
	if (loopback_ignore_cgroups.lookup(&id))
		return 1;
	for (int level = 1; level < CGROUP_ANCESTOR_LEVELS; level++) {
		id = bpf_get_current_ancestor_cgroup_id(level);
		if (!id)
			break;
		if (loopback_ignore_cgroups.lookup(&id))
			return 1;
	}
	return 0;
}

/* The socket as the tracepoint shows it. BCC declares tracepoint arg
 * structs at the first program using them, so helpers take this instead. */
struct tcp_sock_view {
	__u64 sk;
	__u8 family;
	__u16 sport;
	__u16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

static __always_inline int emit_tcp(const struct tcp_sock_view *v, const struct record_header *who,
				    __u8 outcome)
{
	struct connect_record *r = network_events.ringbuf_reserve(sizeof(*r));

	if (!r) {
		count_lost(LOST_NETWORK);
		return 0;
	}
	__builtin_memset(r, 0, sizeof(*r));
	__builtin_memcpy(&r->hdr, who, sizeof(r->hdr));
	r->hdr.type = RECORD_CONNECT;
	r->hdr.timestamp_ns = bpf_ktime_get_boot_ns();
	r->family = v->family;
	r->protocol = IPPROTO_TCP;
	r->outcome = outcome;
	r->source = SOURCE_TCP_STATE;
	r->sport = v->sport;
	r->dport = v->dport;
	__builtin_memcpy(r->saddr, v->saddr, 16);
	__builtin_memcpy(r->daddr, v->daddr, 16);
	network_events.ringbuf_submit(r, 0);
	return 0;
}

/* A process reconnecting to the same destination (a client pool, a retry
 * loop, a connect storm) adds nothing a rule needs: rules look at distinct
 * destinations and the worst outcome of each. Within tcp_repeat_ns of a
 * reported connect, a repeat is not reported unless its outcome differs
 * from the last one reported for that process and destination. */
static __always_inline void tcp_repeat_check(const struct tcp_sock_view *v,
					     struct tcp_attempt *attempt)
{
	__u32 zero = 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sensor_config *config = sensor_config.lookup(&zero);
	struct tcp_seen fresh = {};
	struct tcp_seen *seen;
	__u64 now = bpf_ktime_get_boot_ns();

	if (!config || !config->tcp_repeat_ns)
		return;
	attempt->seen_key.generation_ns = generation_of(tgid);
	attempt->seen_key.pid = tgid;
	attempt->seen_key.family = v->family;
	attempt->seen_key.protocol = IPPROTO_TCP;
	attempt->seen_key.dport = v->dport;
	__builtin_memcpy(attempt->seen_key.daddr, v->daddr, 16);
	attempt->tracked = 1;
	seen = tcp_seen.lookup(&attempt->seen_key);
	if (seen && now - seen->last_ns < config->tcp_repeat_ns) {
		attempt->quiet = 1;
		attempt->seen_outcome = seen->outcome;
		return;
	}
	fresh.last_ns = now;
	fresh.outcome = OUTCOME_ATTEMPT; /* no outcome reported yet */
	tcp_seen.update(&attempt->seen_key, &fresh);
}

static __always_inline int tcp_syn_sent(const struct tcp_sock_view *v)
{
	__u64 sk = v->sk;
	__u32 tid = current_tid();
	struct tcp_attempt attempt = {};

	/* this connect() is TCP: not a datagram connect */
	connect_pending.delete(&tid);
	if (current_is_ignored())
		return 0;
	if (addr_is_loopback(v->family, v->daddr) && addr_is_loopback(v->family, v->saddr) &&
	    cgroup_ignores_loopback())
		return 0;

	fill_header(&attempt.hdr, RECORD_CONNECT);
	tcp_repeat_check(v, &attempt);
	if (tcp_connecting.update(&sk, &attempt) < 0)
		count_lost(LOST_NETWORK); /* its outcome cannot be reported */
	if (attempt.quiet)
		return 0;
	return emit_tcp(v, &attempt.hdr, OUTCOME_ATTEMPT);
}

static __always_inline int tcp_left_syn_sent(const struct tcp_sock_view *v, int newstate)
{
	__u64 sk = v->sk;
	struct tcp_attempt *a = tcp_connecting.lookup(&sk);
	struct record_header who;
	__u8 outcome;

	if (!a)
		return 0;
	if (newstate == RG_TCP_ESTABLISHED)
		outcome = OUTCOME_ESTABLISHED;
	else if (newstate == RG_TCP_CLOSE)
		outcome = a->reset ? OUTCOME_REFUSED : OUTCOME_FAILED;
	else
		return 0; /* simultaneous open: SYN_RECV, then ESTABLISHED */
	if (a->quiet && outcome == a->seen_outcome) {
		tcp_connecting.delete(&sk);
		return 0; /* the same outcome as last time, to the same place */
	}
	if (a->tracked) {
		struct tcp_seen *seen = tcp_seen.lookup(&a->seen_key);

		if (seen)
			seen->outcome = outcome;
	}
	__builtin_memcpy(&who, &a->hdr, sizeof(who));
	tcp_connecting.delete(&sk);
	return emit_tcp(v, &who, outcome);
}

int rgs_tcp_state(struct tracepoint__sock__inet_sock_set_state *args)
{
	struct tcp_sock_view v = {};
	int oldstate = args->oldstate;
	int newstate = args->newstate;

	if (args->protocol != IPPROTO_TCP)
		return 0;
	if (newstate == RG_TCP_SYN_SENT) {
		if (oldstate != RG_TCP_CLOSE)
			return 0;
	} else if (oldstate != RG_TCP_SYN_SENT && oldstate != RG_TCP_SYN_RECV) {
		return 0;
	}
	v.sk = (__u64)args->skaddr;
	v.family = args->family;
	v.sport = args->sport;
	v.dport = args->dport;
	if (v.family == RG_AF_INET) {
		__builtin_memcpy(v.saddr, args->saddr, 4);
		__builtin_memcpy(v.daddr, args->daddr, 4);
	} else {
		__builtin_memcpy(v.saddr, args->saddr_v6, 16);
		__builtin_memcpy(v.daddr, args->daddr_v6, 16);
	}
	if (newstate == RG_TCP_SYN_SENT)
		return tcp_syn_sent(&v);
	return tcp_left_syn_sent(&v, newstate);
}

#ifdef HAVE_RAW_TCP_STATE
/* The same transitions from the raw tracepoint, which is what user space
 * attaches when the running kernel's BTF gives the offsets below: a raw
 * tracepoint program is skipped only when it interrupts itself, whereas a
 * perf-event one is skipped whenever any other tracing program runs on that
 * CPU (the outcome transitions come in softirq, over other programs). The
 * struct sock and inet_sock members are read at offsets from the running
 * kernel's BTF (rome_guard/kernel/btf.py, RG_OFF_* macros), never at the
 * compile-time headers' offsets. */
int rgs_tcp_state_raw(struct bpf_raw_tracepoint_args *ctx)
{
	struct tcp_sock_view v = {};
	void *sk = (void *)ctx->args[0];
	int oldstate = (int)ctx->args[1];
	int newstate = (int)ctx->args[2];
	__u16 protocol = 0, family = 0, sport = 0, dport = 0;

	if (newstate == RG_TCP_SYN_SENT) {
		if (oldstate != RG_TCP_CLOSE)
			return 0;
	} else if (oldstate != RG_TCP_SYN_SENT && oldstate != RG_TCP_SYN_RECV) {
		return 0;
	}
	RG_READ(protocol, sk, RG_OFF_SK_PROTOCOL);
	if (protocol != IPPROTO_TCP)
		return 0;
	RG_READ(family, sk, RG_OFF_SKC_FAMILY);
	RG_READ(sport, sk, RG_OFF_INET_SPORT);
	RG_READ(dport, sk, RG_OFF_SKC_DPORT);
	v.sk = (__u64)sk;
	v.family = family;
	v.sport = RG_NTOHS(sport);
	v.dport = RG_NTOHS(dport);
	if (family == RG_AF_INET) {
		bpf_probe_read_kernel(v.saddr, 4, (char *)sk + RG_OFF_INET_SADDR);
		bpf_probe_read_kernel(v.daddr, 4, (char *)sk + RG_OFF_SKC_DADDR);
	} else if (family == RG_AF_INET6) {
		bpf_probe_read_kernel(v.saddr, 16, (char *)sk + RG_OFF_SKC_V6_RCV_SADDR);
		bpf_probe_read_kernel(v.daddr, 16, (char *)sk + RG_OFF_SKC_V6_DADDR);
	} else {
		return 0;
	}
	if (newstate == RG_TCP_SYN_SENT)
		return tcp_syn_sent(&v);
	return tcp_left_syn_sent(&v, newstate);
}
#endif

/* A reset received for a connecting socket: its CLOSE is a refusal. A raw
 * tracepoint (its first argument is the struct sock), for the reason given
 * above: it fires in softirq, often over a syscall's tracing program, where
 * a perf-event program would be skipped and the refusal reported as a plain
 * failure. Raw tracepoints need no BTF: every supported kernel has them. */
int rgs_tcp_reset(struct bpf_raw_tracepoint_args *ctx)
{
	__u64 sk = (__u64)ctx->args[0];
	struct tcp_attempt *a = tcp_connecting.lookup(&sk);

	if (a)
		a->reset = 1;
	return 0;
}

/* --- datagrams ----------------------------------------------------------- */

struct rg_sockaddr_in {
	__u16 family;
	__u16 port;
	__u8 addr[4];
};

struct rg_sockaddr_in6 {
	__u16 family;
	__u16 port;
	__u32 flowinfo;
	__u8 addr[16];
};

/* struct user_msghdr, uapi: only the destination fields */
struct rg_msghdr_name {
	__u64 name;
	__s32 namelen;
};

static __always_inline int read_sockaddr(struct datagram_dest *d, const void *uaddr, __u64 len)
{
	__u16 family = 0;

	if (!uaddr || bpf_probe_read_user(&family, sizeof(family), uaddr) < 0)
		return -1;
	if (family == RG_AF_INET) {
		struct rg_sockaddr_in sin;

		if (len < sizeof(sin) || bpf_probe_read_user(&sin, sizeof(sin), uaddr) < 0)
			return -1;
		d->family = RG_AF_INET;
		d->dport = RG_NTOHS(sin.port);
		__builtin_memcpy(d->daddr, sin.addr, 4);
		return 0;
	}
	if (family == RG_AF_INET6) {
		struct rg_sockaddr_in6 sin6;

		if (len < sizeof(sin6) || bpf_probe_read_user(&sin6, sizeof(sin6), uaddr) < 0)
			return -1;
		d->family = RG_AF_INET6;
		d->dport = RG_NTOHS(sin6.port);
		__builtin_memcpy(d->daddr, sin6.addr, 16);
		return 0;
	}
	return -1;
}

static __always_inline int emit_datagram(const struct datagram_dest *d, __u8 protocol,
					 __s32 result)
{
	__u32 zero = 0;
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	struct sensor_config *config = sensor_config.lookup(&zero);
	struct datagram_key key = {};
	struct connect_record *r;
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 *seen;

	if (addr_is_loopback(d->family, d->daddr) && cgroup_ignores_loopback())
		return 0;
	if (config && config->datagram_repeat_ns) {
		key.generation_ns = generation_of(tgid);
		key.pid = tgid;
		key.family = d->family;
		key.protocol = protocol;
		key.dport = d->dport;
		__builtin_memcpy(key.daddr, d->daddr, 16);
		seen = datagram_seen.lookup(&key);
		if (seen && now - *seen < config->datagram_repeat_ns)
			return 0;
		datagram_seen.update(&key, &now);
	}

	r = network_events.ringbuf_reserve(sizeof(*r));
	if (!r) {
		count_lost(LOST_NETWORK);
		return 0;
	}
	__builtin_memset(r, 0, sizeof(*r));
	fill_header(&r->hdr, RECORD_CONNECT);
	r->family = d->family;
	r->protocol = protocol;
	r->outcome = OUTCOME_ATTEMPT;
	r->source = d->source;
	r->dport = d->dport;
	__builtin_memcpy(r->daddr, d->daddr, 16);
	r->result = result;
	network_events.ringbuf_submit(r, 0);
	return 0;
}

int rgs_connect(struct tracepoint__syscalls__sys_enter_connect *args)
{
	struct datagram_dest d = {};
	__u32 tid = current_tid();

	if (current_is_ignored())
		return 0;
	if (read_sockaddr(&d, args->uservaddr, args->addrlen) < 0)
		return 0;
	d.source = SOURCE_CONNECT;
	/* full table: a datagram connect could go unreported (upper bound) */
	if (connect_pending.update(&tid, &d) < 0)
		count_lost(LOST_NETWORK);
	return 0;
}

int rgs_connect_ret(struct tracepoint__syscalls__sys_exit_connect *args)
{
	__u32 tid = current_tid();
	struct datagram_dest *pending = connect_pending.lookup(&tid);
	struct datagram_dest d;

	if (!pending)
		return 0;
	__builtin_memcpy(&d, pending, sizeof(d));
	connect_pending.delete(&tid);
	/* still pending: no SYN was sent by this call */
	if (args->ret == 0)
		emit_datagram(&d, 0, 0);
	return 0;
}

static __always_inline int stash_send(const void *uaddr, __u64 len)
{
	struct datagram_dest d = {};
	__u32 tid = current_tid();

	if (!uaddr || current_is_ignored())
		return 0;
	if (read_sockaddr(&d, uaddr, len) < 0)
		return 0;
	d.source = SOURCE_SEND;
	if (send_pending.update(&tid, &d) < 0)
		count_lost(LOST_NETWORK);
	return 0;
}

static __always_inline int stash_send_msghdr(const void *umsg)
{
	struct rg_msghdr_name h = {};

	if (!umsg || bpf_probe_read_user(&h, sizeof(h), umsg) < 0)
		return 0;
	if (!h.name || h.namelen <= 0)
		return 0;
	return stash_send((const void *)h.name, h.namelen);
}

static __always_inline int finish_send(long ret)
{
	__u32 tid = current_tid();
	struct datagram_dest *pending = send_pending.lookup(&tid);

	if (!pending)
		return 0;
#ifndef HAVE_SOCK_SEND_LENGTH
	{
		struct datagram_dest d;

		__builtin_memcpy(&d, pending, sizeof(d));
		send_pending.delete(&tid);
		if (ret >= 0)
			emit_datagram(&d, 0, ret);
		return 0;
	}
#endif
	send_pending.delete(&tid);
	return 0;
}

int rgs_sendto(struct tracepoint__syscalls__sys_enter_sendto *args)
{
	return stash_send(args->addr, args->addr_len);
}

int rgs_sendto_ret(struct tracepoint__syscalls__sys_exit_sendto *args)
{
	return finish_send(args->ret);
}

int rgs_sendmsg(struct tracepoint__syscalls__sys_enter_sendmsg *args)
{
	return stash_send_msghdr(args->msg);
}

int rgs_sendmsg_ret(struct tracepoint__syscalls__sys_exit_sendmsg *args)
{
	return finish_send(args->ret);
}

int rgs_sendmmsg(struct tracepoint__syscalls__sys_enter_sendmmsg *args)
{
	/* struct mmsghdr starts with its struct user_msghdr */
	return stash_send_msghdr(args->mmsg);
}

int rgs_sendmmsg_rt(struct tracepoint__syscalls__sys_exit_sendmmsg *args)
{
	return finish_send(args->ret);
}

#ifdef HAVE_SOCK_SEND_LENGTH
int rgs_send_len(struct tracepoint__sock__sock_send_length *args)
{
	__u32 tid = current_tid();
	struct datagram_dest *pending = send_pending.lookup(&tid);
	struct datagram_dest d;
	__u16 protocol = args->protocol;

	if (!pending)
		return 0;
	__builtin_memcpy(&d, pending, sizeof(d));
	/* one per syscall: sendmmsg's later messages add nothing */
	send_pending.delete(&tid);
	if (protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE || protocol == IPPROTO_ICMP ||
	    protocol == RG_IPPROTO_ICMPV6 || protocol == RG_IPPROTO_RAW)
		emit_datagram(&d, protocol, args->ret);
	return 0;
}
#endif

/* cgroup/udp4_sendmsg and udp6_sendmsg on the cgroup2 root (attached through
 * BPF links, which the kernel removes when the sensor's process goes): every
 * unconnected UDP send on the host, whatever submitted it -- sendto(2), or
 * io_uring's IORING_OP_SENDMSG that never enters a send syscall. Never
 * changes or refuses the send (returns 1). */
static __always_inline int udp_sendmsg_seen(struct bpf_sock_addr *ctx, __u8 family)
{
	struct datagram_dest d = {};
	__u32 port = ctx->user_port;

	if (current_is_ignored())
		return 1;
	d.family = family;
	d.source = SOURCE_UDP_SENDMSG;
	d.dport = RG_NTOHS((__u16)port);
	if (family == RG_AF_INET) {
		__u32 ip4 = ctx->user_ip4;

		__builtin_memcpy(d.daddr, &ip4, 4);
	} else {
		__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
		__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];

		__builtin_memcpy(&d.daddr[0], &w0, 4);
		__builtin_memcpy(&d.daddr[4], &w1, 4);
		__builtin_memcpy(&d.daddr[8], &w2, 4);
		__builtin_memcpy(&d.daddr[12], &w3, 4);
	}
	emit_datagram(&d, IPPROTO_UDP, 0);
	return 1;
}

int rgs_udp4_sendmsg(struct bpf_sock_addr *ctx)
{
	return udp_sendmsg_seen(ctx, RG_AF_INET);
}

int rgs_udp6_sendmsg(struct bpf_sock_addr *ctx)
{
	return udp_sendmsg_seen(ctx, RG_AF_INET6);
}
