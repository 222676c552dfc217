/* Capability probe for tests/ops/test_capabilities.py: the kinds of BPF
 * program rome-guard loads (tracepoint with ring buffer, user-memory reads
 * and bpf_send_signal; cgroup connect filter; TC egress classifier), each
 * doing nothing harmful: the connect filter allows everything, the
 * classifier passes every packet, and the signal is never sent. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

BPF_RINGBUF_OUTPUT(events, 8);

TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct { u32 pid; char name[16]; } ev = {};
    ev.pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&ev.name, sizeof(ev.name));
    if (ev.pid == 0xffffffff) {
        char buf[8];
        bpf_probe_read_user(buf, sizeof(buf), (void *)0);
        bpf_send_signal(9);
    }
    events.ringbuf_output(&ev, sizeof(ev), 0);
    return 0;
}

int probe_connect(struct bpf_sock_addr *ctx) { return 1; }

int probe_egress(struct __sk_buff *skb) { return TC_ACT_OK; }
