/* rome-guard prevention: deny connects and kill offenders in the kernel.
 *
 * Loaded only in enforce mode by rome_guard/respond/prevent.py, which owns
 * the deny lists below and updates them live. Everything here is default
 * allow: an empty map blocks nothing, a failed lookup allows, so a stale
 * copy left by a crashed daemon can only block what was on its lists.
 *
 *   rgp_connect4/6   cgroup/connect4|6 on the cgroup2 root: return 0 -> the
 *                    connect() fails with EPERM before any packet is sent.
 *   sys_exit_connect SIGKILL for a denied connect whose entry asked for a
 *                    kill (bpf_send_signal is not allowed in cgroup hooks).
 *   sched_process_exec  SIGKILL a denylisted executable before its first
 *                    user instruction (current is already the new image).
 *   inet_sock_set_state SYN_SENT: SIGKILL for kill destinations where no
 *                    connect hook runs (hosts without a cgroup2 mount).
 *
 * Never: kill pid 1 or the daemon itself (settings[0]); read kernel structs
 * by offset (the build headers may not match the running kernel).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <linux/socket.h>
#include "prevent.h"

#define RG_MAX_CGROUP_DEPTH 16
/* A pending kill older than this belongs to an earlier, unrelated connect. */
#define RG_PENDING_MAX_AGE_NS (5ULL * 1000000000ULL)
#define RG_EPERM 1
#define RG_TCP_SYN_SENT 2
#define RG_SIGKILL 9

BPF_HASH(block_ports, u16, u32, 4096);
BPF_LPM_TRIE(block_v4, struct rg_v4_key, u32, 65536);
BPF_LPM_TRIE(block_v6, struct rg_v6_key, u32, 65536);
BPF_HASH(exempt_cgroups, u64, u32, 4096);
BPF_HASH(deny_comm, struct rg_comm_key, u32, 1024);
BPF_HASH(deny_path, struct rg_path_key, u32, 1024);
BPF_TABLE("lru_hash", u64, struct rg_pending_kill, pending_kills, 4096);
BPF_ARRAY(settings, u32, 1); /* [0]: the daemon's tgid, never killed */
BPF_ARRAY(lost_events, u64, 1);
BPF_PERCPU_ARRAY(path_scratch, struct rg_path_key, 1);
BPF_RINGBUF_OUTPUT(events, 256); /* 1 MiB: ~3000 events between polls */

static __always_inline bool never_kill(u32 tgid)
{
    int zero = 0;
    u32 *self = settings.lookup(&zero);

    if (tgid <= 1)
        return true;
    return self && *self == tgid;
}

/* Registered jobs are exempted by their cgroup: any ancestor counts, so a
 * job's sub-cgroups (Slurm steps, pod containers) are exempt too. */
static __always_inline bool exempt_current(void)
{
    u64 id = bpf_get_current_cgroup_id();

    if (exempt_cgroups.lookup(&id))
        return true;
#pragma unroll
    for (int level = 1; level < RG_MAX_CGROUP_DEPTH; level++) {
        u64 ancestor = bpf_get_current_ancestor_cgroup_id(level);

        if (ancestor == 0)
            break;
        if (exempt_cgroups.lookup(&ancestor))
            return true;
    }
    return false;
}

static __always_inline u32 v4_action(u32 addr, u16 port)
{
    struct rg_v4_key key = {.prefixlen = 32, .addr = addr};
    u32 action = 0;
    u32 *hit = block_ports.lookup(&port);

    if (hit)
        action |= *hit;
    hit = block_v4.lookup(&key);
    if (hit)
        action |= *hit;
    return action;
}

static __always_inline u32 v6_action(const u32 *addr, u16 port)
{
    struct rg_v6_key key = {.prefixlen = 128};
    u32 action = 0;
    u32 *hit;

    /* ::ffff:a.b.c.d is an IPv4 destination reached through an IPv6 socket */
    if (addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff))
        return v4_action(addr[3], port);
    hit = block_ports.lookup(&port);
    if (hit)
        action |= *hit;
    key.addr[0] = addr[0];
    key.addr[1] = addr[1];
    key.addr[2] = addr[2];
    key.addr[3] = addr[3];
    hit = block_v6.lookup(&key);
    if (hit)
        action |= *hit;
    return action;
}

static __always_inline struct rg_event *new_event(u16 kind)
{
    struct rg_event *ev = events.ringbuf_reserve(sizeof(struct rg_event));
    u64 id = bpf_get_current_pid_tgid();

    if (!ev) {
        int zero = 0;
        u64 *lost = lost_events.lookup(&zero);

        if (lost)
            __sync_fetch_and_add(lost, 1);
        return NULL;
    }
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->timestamp_ns = bpf_ktime_get_boot_ns();
    ev->cgroup_id = bpf_get_current_cgroup_id();
    ev->pid = id >> 32;
    ev->tid = (u32)id;
    ev->uid = (u32)bpf_get_current_uid_gid();
    ev->kind = kind;
    bpf_get_current_comm(ev->comm, sizeof(ev->comm));
    return ev;
}

static __always_inline void report_connect(u16 kind, u16 family, u16 dport, u32 action,
                                           u32 protocol, const u8 *daddr)
{
    struct rg_event *ev = new_event(kind);

    if (!ev)
        return;
    ev->family = family;
    ev->dport = dport;
    ev->action = action;
    ev->protocol = protocol;
    __builtin_memcpy(ev->daddr, daddr, 16);
    events.ringbuf_submit(ev, 0);
}

/* The connect is denied; remember a kill for its syscall exit. */
static __always_inline void deny(u16 family, u16 dport, u32 action, u32 protocol,
                                 const u8 *daddr)
{
    u64 id = bpf_get_current_pid_tgid();

    report_connect(RG_EV_BLOCKED_CONNECT, family, dport, action, protocol, daddr);
    if ((action & RG_ACT_KILL) && !never_kill(id >> 32)) {
        struct rg_pending_kill pending = {};

        pending.timestamp_ns = bpf_ktime_get_boot_ns();
        pending.cgroup_id = bpf_get_current_cgroup_id();
        pending.family = family;
        pending.dport = dport;
        pending.protocol = protocol;
        __builtin_memcpy(pending.daddr, daddr, 16);
        pending_kills.update(&id, &pending);
    }
}

int rgp_connect4(struct bpf_sock_addr *ctx)
{
    u32 addr = ctx->user_ip4;
    u16 port = bpf_ntohs((u16)ctx->user_port);
    u32 action = v4_action(addr, port);
    u8 daddr[16] = {};

    if (!action || exempt_current())
        return 1;
    __builtin_memcpy(daddr, &addr, 4);
    deny(AF_INET, port, action, ctx->protocol, daddr);
    return 0;
}

int rgp_connect6(struct bpf_sock_addr *ctx)
{
    u32 addr[4];
    u16 port = bpf_ntohs((u16)ctx->user_port);
    u32 action;

    addr[0] = ctx->user_ip6[0];
    addr[1] = ctx->user_ip6[1];
    addr[2] = ctx->user_ip6[2];
    addr[3] = ctx->user_ip6[3];
    action = v6_action(addr, port);
    if (!action || exempt_current())
        return 1;
    deny(AF_INET6, port, action, ctx->protocol, (const u8 *)addr);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    u64 id = bpf_get_current_pid_tgid();
    struct rg_pending_kill *found = pending_kills.lookup(&id);
    struct rg_pending_kill pending;

    if (!found)
        return 0;
    pending = *found;
    pending_kills.delete(&id);
    if (args->ret != -RG_EPERM)
        return 0;
    if (bpf_ktime_get_boot_ns() - pending.timestamp_ns > RG_PENDING_MAX_AGE_NS)
        return 0;
    if (never_kill(id >> 32))
        return 0;
    bpf_send_signal(RG_SIGKILL);
    report_connect(RG_EV_KILLED_CONNECT, pending.family, pending.dport, RG_ACT_BLOCK | RG_ACT_KILL,
                   pending.protocol, pending.daddr);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    u8 daddr[16] = {};
    u32 addr6[4];
    u32 action = 0;
    u16 family;

    if (args->newstate != RG_TCP_SYN_SENT || args->protocol != IPPROTO_TCP)
        return 0;
    if (args->family == AF_INET) {
        u32 addr;

        __builtin_memcpy(&addr, args->daddr, 4);
        action = v4_action(addr, args->dport);
        __builtin_memcpy(daddr, &addr, 4);
        family = AF_INET;
    } else if (args->family == AF_INET6) {
        __builtin_memcpy(addr6, args->daddr_v6, 16);
        action = v6_action(addr6, args->dport);
        __builtin_memcpy(daddr, addr6, 16);
        family = AF_INET6;
    } else {
        return 0;
    }
    if (!(action & RG_ACT_KILL))
        return 0;
    if (never_kill(bpf_get_current_pid_tgid() >> 32) || exempt_current())
        return 0;
    bpf_send_signal(RG_SIGKILL);
    report_connect(RG_EV_KILLED_CONNECT, family, args->dport, action, IPPROTO_TCP, daddr);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct rg_comm_key comm = {};
    struct rg_path_key *path;
    struct rg_event *ev;
    int zero = 0;
    u32 *hit;

    bpf_get_current_comm(comm.comm, sizeof(comm.comm));
    path = path_scratch.lookup(&zero);
    if (!path)
        return 0;
    __builtin_memset(path, 0, sizeof(*path));
    TP_DATA_LOC_READ_STR(path->path, filename, sizeof(path->path));
    hit = deny_comm.lookup(&comm);
    if (!hit)
        hit = deny_path.lookup(path);
    if (!hit || never_kill(bpf_get_current_pid_tgid() >> 32))
        return 0;
    bpf_send_signal(RG_SIGKILL);
    ev = new_event(RG_EV_KILLED_EXEC);
    if (!ev)
        return 0;
    ev->action = RG_ACT_KILL;
    __builtin_memcpy(ev->filename, path->path, sizeof(ev->filename));
    events.ringbuf_submit(ev, 0);
    return 0;
}
