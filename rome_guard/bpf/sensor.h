/* Records the eBPF sensor writes into its ring buffers.
 *
 * This header is the one definition of every record layout. It is compiled
 * by BCC into the BPF programs (process.c, network.c, gpu.c) and by gcc in
 * tests/test_layout.py, which checks the ctypes mirrors in
 * rome_guard/layout/sensor.py against it field by field. Change both
 * together. Only fixed-width __u8/__u16/__u32/__u64/__s32 types, so the
 * layout is the same in both compilers.
 *
 * Never put kernel-internal structs here: the sensor reads nothing but
 * tracepoint arguments and helper results.
 */
#ifndef ROME_GUARD_SENSOR_H
#define ROME_GUARD_SENSOR_H

#include <linux/types.h>

#define TASK_COMM_LEN 16

/* record types, first field of every record */
#define RECORD_EXEC 1
#define RECORD_FORK 2
#define RECORD_EXIT 3
#define RECORD_CONNECT 4
#define RECORD_GPU_OPEN 5
#define RECORD_FD_DUP 6
#define RECORD_RENAME 7

/* fd_record.via: the syscall that made the new descriptor */
#define FD_VIA_DUP 1
#define FD_VIA_DUP2 2
#define FD_VIA_DUP3 3
#define FD_VIA_FCNTL 4

/* argv capture: at most ARGV_MAX_ARGS arguments, each cut at ARG_MAX_LEN
 * bytes (terminating NUL included), ARGV_LIMIT bytes in all. The filename
 * follows the arguments in data[]; the spare room after ARGV_LIMIT is what
 * lets the verifier see every read stay inside the record. */
#define ARGV_MAX_ARGS 64
#define ARG_MAX_LEN 4096
#define ARGV_LIMIT 16384
#define FILENAME_MAX_LEN 4096
#define EXEC_DATA_SIZE (ARGV_LIMIT + FILENAME_MAX_LEN)
/* argv entries are counted (not copied) up to this many */
#define ARGC_COUNT_MAX 1024 /* ARGV_MAX_ARGS copied + the rest counted */

/* exec_record.flags */
#define EXEC_ARGV_MISSING 0x1 /* no argv: exec not seen at syscall entry */
#define EXEC_ARGV_TRUNCATED 0x2 /* an argument was cut or not copied */
#define EXEC_ARGV_FAULT 0x4 /* user memory was unreadable (not paged in) */
#define EXEC_ARGC_CAPPED 0x8 /* argc counted only up to ARGC_COUNT_MAX */
#define EXEC_FILENAME_TRUNCATED 0x10

/* connect_record.outcome */
#define OUTCOME_ATTEMPT 1
#define OUTCOME_ESTABLISHED 2
#define OUTCOME_REFUSED 3
#define OUTCOME_FAILED 4

/* connect_record.source: the syscall or transition that produced it */
#define SOURCE_TCP_STATE 1 /* sock:inet_sock_set_state */
#define SOURCE_CONNECT 2 /* connect() on a socket that sent no SYN */
#define SOURCE_SEND 3 /* sendto/sendmsg/sendmmsg with a destination */
#define SOURCE_UDP_SENDMSG 4 /* cgroup udp4/udp6_sendmsg: any unconnected UDP send, io_uring's too */

#define GPU_PATH_MAX 128
#define GPU_PATH_PREFIX "/dev/nvidia"
#define GPU_PATH_PREFIX_LEN 11

/* in-kernel process table (proc_live, proc_exited): what is kept of argv
 * and the filename; a longer one is cut (PROC_ARGS_CUT) */
#define PROC_FILENAME_MAX 256
#define PROC_ARGS_MAX 256

/* proc_entry.flags */
#define PROC_FORK_SEEN 0x1 /* start_ns is its fork time, else when first met */
#define PROC_EXEC_SEEN 0x2 /* filename, args: its last exec; else its parent's */
#define PROC_HELD 0x4 /* user space holds it: its execs and exit are sent */
#define PROC_ARGS_CUT 0x8 /* args holds only the head of argv */
#define PROC_EXITED 0x10 /* in proc_exited: exit_ns, exit_code are set */

/* table_counters indexes (per-CPU array): the process table's bounds and
 * the records the exec filter did not send */
#define TABLE_LIVE_INSERTS 0
#define TABLE_LIVE_DELETES 1
#define TABLE_LIVE_FULL 2 /* a new process not tracked: proc_live was full */
#define TABLE_EXITED_INSERTS 3 /* over PROC_EXITED_MAX: the oldest evicted */
#define TABLE_EXECS_UNSENT 4
#define TABLE_FORKS_UNSENT 5
#define TABLE_EXITS_UNSENT 6
#define TABLE_SLOTS 7

/* needle_dfa: the command-line test of the rules no name narrows, as one
 * automaton over the lower-cased argv (rome_guard/layout/needles.py) */
#define NEEDLE_CLASSES 64
#define NEEDLE_STATES 2048
#define NEEDLE_MATCH 0xFFFF /* a needle occurs: send the exec */
#define NEEDLE_SCAN_MAX 1024 /* longer command lines are sent unscanned */

/* lost_counters indexes (per-CPU array) */
#define LOST_PROCESS 0
#define LOST_NETWORK 1
#define LOST_SLOTS 2

/* Common to every record. pid is the thread-group id (what user space
 * calls a pid), tid the thread; both in the initial pid namespace. */
struct record_header {
	__u32 type;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u64 timestamp_ns; /* CLOCK_BOOTTIME */
	__u64 cgroup_id; /* cgroup v2 id (inode number of the cgroup dir) */
	char comm[TASK_COMM_LEN];
};

/* Variable length: only the used part of data[] (args_size +
 * filename_size bytes) is written to the ring buffer. */
struct exec_record {
	struct record_header hdr;
	__u32 ppid; /* parent at fork time, 0 when unknown */
	__u32 old_pid; /* thread that called execve */
	__u32 argc; /* argv entries seen */
	__u32 args_count; /* argv entries copied into data[] */
	__u32 args_size; /* bytes of data[] holding NUL-terminated args */
	__u32 filename_size; /* bytes after them holding the filename + NUL */
	__u32 flags; /* EXEC_* */
	__u32 _pad;
	__u64 args_cut; /* bit i: argument i was cut */
	__u64 start_ns; /* the process's identity in proc_live (its fork), 0 unknown */
	__u64 parent_start_ns; /* the parent's, 0 unknown */
	char data[EXEC_DATA_SIZE];
};

struct fork_record {
	struct record_header hdr; /* the parent */
	__u32 child_pid;
	__u32 _pad;
	__u64 clone_flags;
};

struct exit_record {
	struct record_header hdr;
	__s32 exit_code; /* exit()/exit_group() status, -1 when not called */
	__u32 _pad;
};

struct connect_record {
	struct record_header hdr; /* the connecting process */
	__u8 family; /* AF_INET, AF_INET6 */
	__u8 protocol; /* IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, ... */
	__u8 outcome; /* OUTCOME_* */
	__u8 source; /* SOURCE_* */
	__u16 sport; /* host byte order; 0 before the kernel picks one */
	__u16 dport;
	__u8 saddr[16]; /* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	__s32 result; /* syscall result for SOURCE_CONNECT/SEND, else 0 */
	__u32 _pad;
};

struct gpu_open_record {
	struct record_header hdr;
	__s32 result; /* fd returned by open */
	__u32 flags; /* open flags */
	char path[GPU_PATH_MAX];
};

/* An inet socket this process created was duplicated onto fd 0, 1 or 2
 * (dup, dup2, dup3, fcntl F_DUPFD*): the reverse-shell move. */
struct fd_record {
	struct record_header hdr;
	__s32 oldfd; /* the socket's descriptor */
	__s32 newfd; /* 0, 1 or 2 */
	__u32 via; /* FD_VIA_* */
	__u32 _pad;
};

/* A process renamed itself after exec (prctl PR_SET_NAME, /proc/self/comm):
 * hdr.comm is the old name. Renames done by exec itself are not reported. */
struct rename_record {
	struct record_header hdr;
	char newcomm[TASK_COMM_LEN];
};

/* sensor_config[0], written by user space */
struct sensor_config {
	__u64 datagram_repeat_ns; /* report one datagram destination once per this */
	__u64 tcp_repeat_ns; /* a repeated TCP connect to one destination: report a
				new outcome only, within this long (0: report all) */
	__u32 quiet_lifecycle; /* 1: fork, exit and the execs of programs not in
				  wake_names do not wake user space (it drains
				  them on its own schedule); 0: every record wakes */
	__u32 exec_filter; /* 1: an exec no rule can concern (wake_names,
			      needle_dfa) is kept in proc_live, not sent; forks
			      are not sent, exits only of held processes */
	__u32 loopback_ignoring; /* 1: loopback_ignore_cgroups has entries */
	__u32 _pad;
};

/* One process in proc_live (pid -> entry) or, after its exit, proc_exited.
 * A child starts as a copy of its parent (comm, filename, args) until it
 * execs. Times are CLOCK_BOOTTIME. */
struct proc_entry {
	__u32 pid;
	__u32 ppid; /* the creating process, 0 unknown */
	__u64 start_ns;
	__u64 parent_start_ns; /* 0 unknown (the parent predates the sensor) */
	__u64 exec_ns; /* its last exec, 0 none seen */
	__u64 exit_ns;
	__u64 cgroup_id;
	__u32 uid;
	__s32 exit_code; /* -1 when exit() was not called */
	__u32 flags; /* PROC_* */
	__u32 argc;
	__u32 args_size; /* bytes of args holding NUL-terminated arguments */
	__u32 _pad;
	char comm[TASK_COMM_LEN];
	char filename[PROC_FILENAME_MAX];
	char args[PROC_ARGS_MAX];
};

/* needle_dfa[0], written by user space */
struct needle_dfa {
	__u8 classes[256]; /* byte -> character class */
	__u16 next[NEEDLE_STATES * NEEDLE_CLASSES]; /* state * classes + class */
};

/* wake_names key (LPM trie over the exec'd task's comm): an exact name is
 * stored with its NUL ((len + 1) * 8 bits), a name prefix without it */
struct wake_name {
	__u32 prefixlen;
	char name[TASK_COMM_LEN];
};

#endif /* ROME_GUARD_SENSOR_H */
