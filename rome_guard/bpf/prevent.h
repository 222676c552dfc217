/* Shared definitions of rome-guard's prevention programs (prevent.c).
 *
 * Compiled by BCC into prevent.c and by gcc in tests/test_layout.py, which
 * checks the ctypes mirrors in rome_guard/layout/prevent.py against it field
 * by field (the table in rome_guard/layout/__init__.py). Change both
 * together. Conventions shared with sensor.h: pid is the thread-group id
 * (what user space calls a pid), tid the thread; family is AF_INET or
 * AF_INET6. */
#ifndef ROME_GUARD_PREVENT_H
#define ROME_GUARD_PREVENT_H

#include <linux/types.h>

/* What a deny-list entry asks for (bit flags, a map value). */
#define RG_ACT_BLOCK 1 /* connect() fails with EPERM before any packet */
#define RG_ACT_KILL 2  /* ... and the caller is SIGKILLed in the kernel */

/* Event kinds reported through the `events` ring buffer. */
#define RG_EV_BLOCKED_CONNECT 1
#define RG_EV_KILLED_EXEC 2
#define RG_EV_KILLED_CONNECT 3

#define RG_COMM_LEN 16
#define RG_PATH_LEN 256

/* LPM trie keys: prefix length in bits, then the address in network order. */
struct rg_v4_key {
    __u32 prefixlen;
    __u32 addr;
};

struct rg_v6_key {
    __u32 prefixlen;
    __u32 addr[4];
};

struct rg_comm_key {
    char comm[RG_COMM_LEN];
};

struct rg_path_key {
    char path[RG_PATH_LEN];
};

/* A connect denied with RG_ACT_KILL, waiting for its syscall to return. */
struct rg_pending_kill {
    __u64 timestamp_ns;
    __u64 cgroup_id;
    __u16 family; /* AF_INET, AF_INET6 */
    __u16 dport;
    __u32 protocol;
    __u8 daddr[16];
};

struct rg_event {
    __u64 timestamp_ns; /* CLOCK_BOOTTIME */
    __u64 cgroup_id;    /* cgroup v2 id of the task (inode of its directory) */
    __u32 pid;          /* thread-group id (the process) */
    __u32 tid;          /* thread */
    __u32 uid;
    __u16 kind;         /* RG_EV_* */
    __u16 family;       /* AF_INET, AF_INET6 for connects, 0 for exec */
    __u16 dport;        /* host order */
    __u8 action;        /* RG_ACT_* of the matching entry */
    __u8 protocol;      /* IPPROTO_* of the socket, 0 for exec */
    __u8 daddr[16];     /* 4 bytes used for IPv4 */
    char comm[RG_COMM_LEN];
    char filename[RG_PATH_LEN]; /* exec only: the path given to execve */
};

#endif
