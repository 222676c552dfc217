/* The rome-guard eBPF sensor: one compile unit (one BCC compile, ~2 s).
 *
 * Maps and helpers shared by the program families live here; the programs
 * are in process.c (exec, fork, exit), network.c (TCP connects, datagram
 * destinations) and gpu.c (opens of /dev/nvidia*), included below.
 *
 * Rules for everything in this unit:
 * - tracepoints only; read nothing but tracepoint arguments, helper results
 *   and the user memory a syscall argument points to (uapi layouts only:
 *   sockaddr, msghdr, open_how). Kernel structs are never read by offset:
 *   the headers BCC compiles against may not match the running kernel.
 * - never lose silently: every failed ring buffer write is counted in
 *   lost_counters; a record that is incomplete says so in its flags.
 * - filter in the kernel only where no rule can need what is dropped.
 *
 * Optional tracepoints are compiled in when user space finds them in tracefs
 * and passes -DHAVE_<NAME> (see rome_guard/sensors/ebpf.py).
 */
#include <uapi/linux/in.h>
#include "sensor.h"

#ifndef PROCESS_RING_PAGES
#define PROCESS_RING_PAGES 4096 /* 16 MiB */
#endif
#ifndef NETWORK_RING_PAGES
#define NETWORK_RING_PAGES 2048 /* 8 MiB */
#endif
#ifndef QUIET_BATCH_NS
#define QUIET_BATCH_NS 10000000ULL /* kernel.poller.BATCH_MS */
#endif
#define LIFECYCLE_WAKE_EVERY 2048
#define QUIET_WOKE 0
#define QUIET_LIFECYCLE_WRITTEN 1

#define RG_AF_INET 2
#define RG_AF_INET6 10
#define RG_CLONE_THREAD 0x00010000
#define RG_IPPROTO_ICMPV6 58
#define RG_IPPROTO_RAW 255 /* raw IP sockets with their own headers (nmap) */
/* include/net/tcp_states.h */
#define RG_TCP_ESTABLISHED 1
#define RG_TCP_SYN_SENT 2
#define RG_TCP_SYN_RECV 3
#define RG_TCP_CLOSE 7
/* how many cgroup ancestors are checked against loopback_ignore_cgroups */
#define CGROUP_ANCESTOR_LEVELS 16

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define RG_NTOHS(x) __builtin_bswap16(x)
#else
#define RG_NTOHS(x) (x)
#endif

_Static_assert(FILENAME_MAX_LEN >= ARG_MAX_LEN, "argv reads need ARG_MAX_LEN spare bytes");
_Static_assert(ARGV_MAX_ARGS <= 64, "args_cut is a 64-bit mask");

/* --- internal state (not records: no ctypes mirror needed) --------------- */

struct proc_state {
	__u32 ppid; /* tgid of the process that created it */
	__u32 _pad;
	__u64 generation_ns; /* time of its fork or last exec */
};

struct datagram_dest {
	__u8 family;
	__u8 source;
	__u16 dport;
	__u8 daddr[16];
};

struct datagram_key {
	__u64 generation_ns;
	__u32 pid;
	__u8 family;
	__u8 protocol;
	__u16 dport;
	__u8 daddr[16];
};

struct tcp_attempt {
	struct record_header hdr; /* the task that sent the SYN */
	__u32 reset; /* an RST arrived while in SYN_SENT */
	__u8 tracked; /* seen_key is set: repeats of this destination are tracked */
	__u8 quiet; /* a repeat within tcp_repeat_ns: report only a new outcome */
	__u8 seen_outcome; /* the outcome last reported for this destination */
	__u8 _pad;
	struct datagram_key seen_key; /* this process (and exec generation) + destination */
};

/* tcp_seen: when a process last had a connect to a destination reported,
 * and with which outcome */
struct tcp_seen {
	__u64 last_ns;
	__u32 outcome;
	__u32 _pad;
};

/* a descriptor of one process */
struct fd_key {
	__u32 tgid;
	__s32 fd;
};

struct dup_pending {
	__s32 oldfd;
	__u32 via;
};

struct gpu_pending {
	__u64 path_ptr; /* user pointer, re-read at exit when not yet readable */
	__u32 flags;
	__u32 resolved; /* path[] holds the path read at entry */
	char path[GPU_PATH_MAX];
};

/* --- maps ---------------------------------------------------------------- */

BPF_RINGBUF_OUTPUT(process_events, PROCESS_RING_PAGES);
BPF_RINGBUF_OUTPUT(network_events, NETWORK_RING_PAGES);
BPF_PERCPU_ARRAY(lost_counters, __u64, LOST_SLOTS);
BPF_ARRAY(sensor_config, struct sensor_config, 1);
/* QUIET_WOKE: when a quiet exec or rename last woke user space (boot ns);
 * QUIET_LIFECYCLE_WRITTEN: fork and exit records written in quiet mode */
BPF_ARRAY(quiet_state, __u64, 2);

/* written by user space */
BPF_HASH(ignored_pids, __u32, __u8, 4096);
BPF_HASH(loopback_ignore_cgroups, __u64, __u8, 4096);
BPF_LPM_TRIE(wake_names, struct wake_name, __u8, 4096);

/* process.c */
BPF_PERCPU_ARRAY(exec_scratch, struct exec_record, 1);
BPF_HASH(exec_pending, __u32, struct exec_record, 512);
BPF_HASH(exec_retry, __u32, __u64, 512); /* tid -> argv to read again */
BPF_TABLE("lru_hash", __u32, struct proc_state, procs, 131072);
BPF_TABLE("lru_hash", __u32, __s32, exit_codes, 16384);
/* inet sockets made by socket(2), by process and descriptor. Entries are
 * not removed at close (close is too hot to trace): a stale one only makes
 * user space look at /proc/PID/fd, which says what the fd really is. */
BPF_TABLE("lru_hash", struct fd_key, __u8, inet_fds, 65536);
BPF_HASH(socket_pending, __u32, __u8, 4096); /* tid in socket(AF_INET*) */
BPF_HASH(dup_pending, __u32, struct dup_pending, 4096); /* tid duplicating one */

/* network.c */
BPF_HASH(tcp_connecting, __u64, struct tcp_attempt, 65536);
BPF_HASH(connect_pending, __u32, struct datagram_dest, 16384);
BPF_HASH(send_pending, __u32, struct datagram_dest, 16384);
BPF_TABLE("lru_hash", struct datagram_key, __u64, datagram_seen, 65536);
BPF_TABLE("lru_hash", struct datagram_key, struct tcp_seen, tcp_seen, 65536);

/* gpu.c */
BPF_HASH(gpu_pending, __u32, struct gpu_pending, 4096);

/* --- helpers ------------------------------------------------------------- */

static __always_inline void fill_header(struct record_header *h, __u32 type)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	h->type = type;
	h->pid = pid_tgid >> 32;
	h->tid = (__u32)pid_tgid;
	h->uid = (__u32)bpf_get_current_uid_gid();
	h->timestamp_ns = bpf_ktime_get_boot_ns();
	h->cgroup_id = bpf_get_current_cgroup_id();
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

static __always_inline void count_lost(__u32 slot)
{
	__u64 *n = lost_counters.lookup(&slot);

	if (n)
		*n += 1; /* per-CPU slot: no other writer */
}

static __always_inline __u32 current_tid(void)
{
	return (__u32)bpf_get_current_pid_tgid();
}

static __always_inline int quiet_mode(void)
{
	__u32 zero = 0;
	struct sensor_config *config = sensor_config.lookup(&zero);

	return config && config->quiet_lifecycle;
}

/* The exec (or rename) of a program no rule names waits for user space's
 * next drain instead of waking it (a wakeup costs user space more than
 * decoding the record does), unless no such record woke it for
 * QUIET_BATCH_NS: then it wakes user space, which drains again
 * QUIET_BATCH_NS later for as long as records keep coming
 * (rome_guard/kernel/poller.py). A storm costs one wakeup per batch, and a
 * daemon with nothing to do sleeps instead of draining on a timer. Two
 * CPUs racing here cost one extra wakeup at most. */
static __always_inline __u64 quiet_flags(void)
{
	__u32 slot = QUIET_WOKE;
	__u64 now = bpf_ktime_get_boot_ns();
	__u64 *woke = quiet_state.lookup(&slot);

	if (woke && now - *woke < QUIET_BATCH_NS)
		return BPF_RB_NO_WAKEUP;
	if (woke)
		*woke = now;
	return BPF_RB_FORCE_WAKEUP;
}

/* Ring buffer flags for a fork or exit record. They only update user
 * space's process table, so in quiet mode they never wake it on their own
 * (the next exec, connect or timer drains them), except once every
 * LIFECYCLE_WAKE_EVERY of them: a fork storm must not fill the ring while
 * user space sleeps. (A racy count only moves that wakeup a little.) */
static __always_inline __u64 lifecycle_flags(void)
{
	__u32 slot = QUIET_LIFECYCLE_WRITTEN;
	__u64 *written;

	if (!quiet_mode())
		return 0;
	written = quiet_state.lookup(&slot);
	if (!written)
		return BPF_RB_NO_WAKEUP;
	__sync_fetch_and_add(written, 1);
	return *written % LIFECYCLE_WAKE_EVERY ? BPF_RB_NO_WAKEUP : BPF_RB_FORCE_WAKEUP;
}

/* An exec of a program some rule names wakes user space at once; in quiet
 * mode the others are quiet records. */
static __always_inline __u64 exec_flags(const char *comm)
{
	struct wake_name key = {};

	if (!quiet_mode())
		return 0;
	key.prefixlen = TASK_COMM_LEN * 8;
	__builtin_memcpy(key.name, comm, TASK_COMM_LEN);
	return wake_names.lookup(&key) ? BPF_RB_FORCE_WAKEUP : quiet_flags();
}

/* A record that asks user space to judge a process again now (an inet
 * socket dup'd onto stdio): rare, so it always wakes it. Without this, in
 * quiet mode the ring's adaptive wakeup would be suppressed while
 * unconsumed quiet records sit ahead of it. */
static __always_inline __u64 judge_now_flags(void)
{
	return quiet_mode() ? BPF_RB_FORCE_WAKEUP : 0;
}

static __always_inline int current_is_ignored(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	return ignored_pids.lookup(&tgid) != NULL;
}

#include "process.c"
#include "network.c"
#include "gpu.c"
