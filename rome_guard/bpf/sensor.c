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
#ifndef PROC_LIVE_MAX
#define PROC_LIVE_MAX 32768 /* live processes tracked (a full table is counted) */
#endif
#ifndef PROC_EXITED_MAX
#define PROC_EXITED_MAX 16384 /* exited processes kept for lineage, oldest evicted */
#endif
#define HELD_PIDS_MAX 65536
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
#define RG_EEXIST 17
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
/* the process table: live processes by pid, then the recently exited
 * (lineage of an offender whose ancestors are gone); held_pids: processes
 * user space read on its own (seed, /proc), whose exit it needs */
BPF_HASH(proc_live, __u32, struct proc_entry, PROC_LIVE_MAX);
BPF_TABLE("lru_hash", __u32, struct proc_entry, proc_exited, PROC_EXITED_MAX);
BPF_PERCPU_ARRAY(proc_scratch, struct proc_entry, 1);
BPF_HASH(held_pids, __u32, __u64, HELD_PIDS_MAX);
BPF_PERCPU_ARRAY(table_counters, __u64, TABLE_SLOTS);
BPF_ARRAY(needle_dfa, struct needle_dfa, 1);
/* rgs_exec -> rgs_exec_scan: the exec it hands over */
struct exec_scan {
	__u32 old_pid;
	__u32 pending; /* the record is exec_pending[old_pid], else exec_scratch */
	__u64 name_off;
	long name_size;
};
#define EXEC_TAIL_SCAN 0
BPF_PERCPU_ARRAY(exec_scan_state, struct exec_scan, 1);
BPF_PROG_ARRAY(exec_tail, 1);
#ifndef HAVE_TASK_EXIT_CODE
BPF_TABLE("lru_hash", __u32, __s32, exit_codes, 16384);
#endif
#ifndef HAVE_FD_TABLE
/* Without the running kernel's BTF for the fd table: inet sockets made by
 * socket(2) or accepted, by process and descriptor. Entries are not removed
 * at close (close is too hot to trace): a stale one only makes user space
 * look at /proc/PID/fd, which says what the fd really is. */
BPF_TABLE("lru_hash", struct fd_key, __u8, inet_fds, 65536);
BPF_HASH(socket_pending, __u32, __u8, 4096); /* tid in socket(AF_INET*) */
#endif
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

/* a kernel struct member at an offset from the running kernel's BTF
 * (RG_OFF_* macros, rome_guard/kernel/btf.py); 0 when the read worked */
#define RG_READ(dst, base, off) \
	bpf_probe_read_kernel(&(dst), sizeof(dst), (const char *)(base) + (off))

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

static __always_inline void count_table(__u32 slot)
{
	__u64 *n = table_counters.lookup(&slot);

	if (n)
		*n += 1;
}

/* a process's exec generation (its fork or last exec), 0 untracked: what
 * the repeat-suppression keys of network.c are per */
static __always_inline __u64 generation_of(__u32 tgid)
{
	struct proc_entry *e = proc_live.lookup(&tgid);

	if (!e)
		return 0;
	return e->exec_ns ? e->exec_ns : e->start_ns;
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

static __always_inline int exec_filter_on(void)
{
	__u32 zero = 0;
	struct sensor_config *config = sensor_config.lookup(&zero);

	return config && config->exec_filter;
}

/* 1 when byte c is v, else 0, without a branch (a branch per byte of a
 * scan multiplies the states the verifier walks) */
static __always_inline __u32 byte_is(__u32 c, __u32 v)
{
	return (((c ^ v) & 0xff) - 1) >> 31;
}

/* ASCII upper case to lower, eight bytes at a time and without a branch
 * (a branch per byte doubles the paths the verifier walks each time) */
static __always_inline __u64 lower_word(__u64 x)
{
	__u64 low7 = x & 0x7f7f7f7f7f7f7f7fULL;
	__u64 ge_a = low7 + 0x3f3f3f3f3f3f3f3fULL; /* high bit: >= 'A' */
	__u64 gt_z = low7 + 0x2525252525252525ULL; /* high bit: > 'Z' */
	__u64 upper = ~x & (ge_a ^ gt_z) & 0x8080808080808080ULL;

	return x | (upper >> 2);
}

/* Whether some rule names a program called name (TASK_COMM_LEN bytes
 * readable; a longer name cut to TASK_COMM_LEN - 1, as comm is): the
 * first len bytes, compared lower-cased, as the rules' names are. */
static __always_inline int name_wanted_len(const char *name, __u32 len)
{
	struct wake_name key = {};
	__u64 words[2];

	if (len > TASK_COMM_LEN - 1)
		len = TASK_COMM_LEN - 1;
	key.prefixlen = (len + 1) * 8; /* the name and its NUL; the trie ignores the rest */
	__builtin_memcpy(words, name, TASK_COMM_LEN);
	words[0] = lower_word(words[0]);
	words[1] = lower_word(words[1]);
	__builtin_memcpy(key.name, words, TASK_COMM_LEN);
	key.name[TASK_COMM_LEN - 1] = 0;
	return wake_names.lookup(&key) != NULL;
}

/* the same for a NUL-padded comm */
static __always_inline int name_wanted(const char *comm)
{
	return name_wanted_len(comm, TASK_COMM_LEN - 1);
}

/* A record some rule may concern wakes user space at once; in quiet mode
 * the others are quiet records (quiet_flags). */
static __always_inline __u64 wanted_flags(int wanted)
{
	if (!quiet_mode())
		return 0;
	return wanted ? BPF_RB_FORCE_WAKEUP : quiet_flags();
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
