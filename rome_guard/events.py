"""The one event model shared by every sensor and by the engine.

Every sensor (procfs snapshot, eBPF, sock_diag, NVML) produces these frozen
dataclasses; the engine and responders consume nothing else. They carry no
behaviour beyond small derived properties, so they are cheap to build and
safe to hand between threads.

Identity of a process is always ``ProcessKey(pid, start_time)``: pids are
reused, the pair is not. ``start_time`` is in clock ticks since boot, exactly
as field 22 of /proc/PID/stat, so every source agrees on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True, order=True)
class ProcessKey:
    pid: int
    start_time: int  # clock ticks since boot (/proc/PID/stat field 22)

    def __str__(self) -> str:
        return f"{self.pid}@{self.start_time}"


@dataclass(frozen=True)
class Attribution:
    """Answers "whose is this process?" for operators and RL teams."""

    unit: str | None = None  # systemd unit, e.g. "sshd.service"
    container_id: str | None = None  # 64-hex docker/containerd/cri-o/podman id
    pod_uid: str | None = None  # Kubernetes pod UID (dashes restored)
    slurm_job: str | None = None  # Slurm job id
    env: Mapping[str, str] = field(default_factory=dict)  # configured env keys
    # 0: env is the process's own, read at its exec; else the pid of the
    # ancestor whose values it carries (its own environ was unreadable: the
    # process was gone, a zombie, or killed at exec before it could be read)
    env_inherited_from: int = 0


@dataclass(frozen=True)
class ProcessInfo:
    """A process as read at one instant. Strings are decoded with
    ``surrogateescape`` so that hostile bytes survive round trips; sanitise
    them (rome_guard.textsafe) before they reach a log, JSON or a label."""

    key: ProcessKey
    ppid: int
    uid: int
    user: str
    comm: str
    exe: str  # resolved path; "" for kernel threads or when unreadable
    cmdline: tuple[str, ...]
    cwd: str
    cgroup: str  # cgroup v2 path ("0::" line), "" when unknown
    attribution: Attribution = Attribution()
    kernel_thread: bool = False
    zombie: bool = False
    pre_existing: bool = False  # seen at start-up, not born under our watch

    @property
    def pid(self) -> int:
        return self.key.pid


@dataclass(frozen=True)
class Endpoint:
    """One socket or connection attempt with its addresses."""

    proto: str  # "tcp" | "udp"
    family: int  # 4 | 6
    saddr: str
    sport: int
    daddr: str
    dport: int
    state: str = ""  # sock_diag state name, or connect outcome
    inode: int = 0

    @property
    def is_loopback(self) -> bool:
        return self.daddr.startswith("127.") or self.daddr in ("::1", "::ffff:127.0.0.1")


# --- events produced by real-time sensors -----------------------------------


@dataclass(frozen=True)
class ExecEvent:
    pid: int
    ppid: int
    filename: str  # resolved by sched_process_exec
    argv: tuple[str, ...]
    timestamp_ns: int  # CLOCK_BOOTTIME
    uid: int = -1
    comm: str = ""
    # argv is incomplete (cut, or not captured): read /proc/PID/cmdline if it matters
    argv_truncated: bool = False
    cgroup_id: int = 0  # cgroup v2 id (inode of the cgroup dir), 0 when unknown
    # its fork (CLOCK_BOOTTIME) and its parent's, from the kernel's process table; 0 unknown
    start_ns: int = 0
    parent_start_ns: int = 0


@dataclass(frozen=True)
class ForkEvent:
    parent_pid: int
    child_pid: int
    timestamp_ns: int  # CLOCK_BOOTTIME, ~ the child's start time

    @property
    def child_start_ticks(self) -> int:
        return boottime_ns_to_ticks(self.timestamp_ns)


@dataclass(frozen=True)
class ExitEvent:
    pid: int
    timestamp_ns: int
    exit_code: int = 0


# Connect outcomes reported by the network sensor.
CONNECT_ATTEMPT = "attempt"
CONNECT_ESTABLISHED = "established"
CONNECT_REFUSED = "refused"
CONNECT_FAILED = "failed"  # timed out, unreachable, or reset before established
CONNECT_BLOCKED = "blocked"  # denied in the kernel by rome-guard


@dataclass(frozen=True)
class ConnectEvent:
    pid: int
    endpoint: Endpoint
    outcome: str  # one of CONNECT_*
    timestamp_ns: int
    comm: str = ""
    cgroup_id: int = 0  # cgroup v2 id of the connecting process, 0 when unknown


# What a wire event reports (rome_guard.sensors.wire).
WIRE_FIRST_PAYLOAD = "first_payload"  # the first payload of a TCP flow this host opened
WIRE_STREAM_DATA = "stream_data"  # later bytes of that flow's client stream
WIRE_DNS_QUERY = "dns_query"  # a UDP datagram to port 53
WIRE_DNS_ANSWER = "dns_answer"  # a UDP datagram from port 53
WIRE_DROPPED_CONNECT = "dropped_connect"  # a SYN to a pool-named address, dropped


@dataclass(frozen=True)
class WireEvent:
    """What a flow said first, seen leaving (or, for DNS answers, reaching)
    the host. ``pid`` is the task that sent the flow's SYN (its connect),
    0 when unknown; ``connect_ns`` is when, so a reused pid can be told
    apart. ``payload`` is attacker-controlled bytes: never print it raw."""

    kind: str  # one of WIRE_*
    pid: int
    uid: int
    comm: str
    cgroup_id: int
    cookie: int  # the kernel's socket cookie
    endpoint: Endpoint
    timestamp_ns: int  # CLOCK_BOOTTIME of the packet
    connect_ns: int  # CLOCK_BOOTTIME of the SYN, 0 unknown
    payload: bytes  # the first bytes of the payload
    payload_len: int  # payload bytes in that packet
    sni: str = ""  # TLS ClientHello server_name, parsed in the kernel
    alpn: str = ""  # its first ALPN protocol
    tls: bool = False  # the payload starts a TLS ClientHello
    dropped: str = ""  # why the kernel dropped it: "method" | "sni" | "address" | "dns" ...
    offset: int = 0  # client stream offset of payload[0] (TCP flows)
    segment: int = 0  # which client segment of the flow, from 1 (TCP flows)
    stream_end: bool = False  # the last record of the flow's client stream
    proxy_name: str = ""  # the host a SOCKS5/HTTP CONNECT request in it names


PREVENTION_BLOCKED_CONNECT = "blocked_connect"  # a connect denied in the kernel
PREVENTION_KILLED_EXEC = "killed_exec"  # a denylisted program killed at exec
PREVENTION_KILLED_CONNECT = "killed_connect"  # killed at the connect to a kill destination


@dataclass(frozen=True)
class PreventionEvent:
    """A connect denied or a process killed in the kernel. Strings come
    from the offender: sanitise them (rome_guard.textsafe) before output."""

    kind: str  # PREVENTION_*
    pid: int  # thread group id (the process)
    tid: int
    uid: int
    comm: str
    cgroup_id: int
    timestamp_ns: int  # CLOCK_BOOTTIME
    family: int = 0  # 4 | 6 for connects
    protocol: str = ""  # "tcp" | "udp" | "" for exec
    daddr: str = ""
    dport: int = 0
    filename: str = ""  # exec: the path given to execve
    kill_requested: bool = False  # the matching entry asked for a kill

    @property
    def action(self) -> str:
        """The journal's action: ``killed`` or ``blocked``."""
        return "blocked" if self.kind == PREVENTION_BLOCKED_CONNECT else "killed"

    def connect_event(self) -> ConnectEvent | None:
        """The denied connect in the shared event model, for the engine."""
        if self.kind == PREVENTION_KILLED_EXEC:
            return None
        endpoint = Endpoint(
            proto=self.protocol or "tcp",
            family=self.family,
            saddr="",
            sport=0,
            daddr=self.daddr,
            dport=self.dport,
            state=CONNECT_BLOCKED,
        )
        return ConnectEvent(
            pid=self.pid,
            endpoint=endpoint,
            outcome=CONNECT_BLOCKED,
            timestamp_ns=self.timestamp_ns,
            comm=self.comm,
            cgroup_id=self.cgroup_id,
        )


@dataclass(frozen=True)
class GpuOpenEvent:
    """A process opened /dev/nvidia*: it is creating a GPU context."""

    pid: int
    path: str
    timestamp_ns: int
    comm: str = ""
    cgroup_id: int = 0  # cgroup v2 id of the opening process, 0 when unknown


@dataclass(frozen=True)
class FdDupEvent:
    """An inet socket the process holds (made, accepted, inherited or
    received) was duplicated onto fd 0, 1 or 2 (dup, dup2, dup3 or fcntl
    F_DUPFD*): its stdio may now be the network."""

    pid: int
    oldfd: int
    newfd: int
    via: str  # "dup" | "dup2" | "dup3" | "fcntl"
    timestamp_ns: int
    comm: str = ""


@dataclass(frozen=True)
class RenameEvent:
    """A process renamed itself after exec (prctl PR_SET_NAME or a write to
    /proc/self/comm); its argv may have been rewritten too."""

    pid: int
    old_comm: str
    new_comm: str
    timestamp_ns: int


@dataclass(frozen=True)
class GpuProcess:
    """One process holding a context on one GPU (or MIG device), from NVML."""

    pid: int
    gpu_index: int
    gpu_uuid: str
    mig: str | None  # MIG device UUID, None on a full GPU
    used_memory_bytes: int | None
    sm_util: int | None  # percent, None where unsupported
    mps_client: bool = False  # listed by NVML's MPS query: a client of the MPS server


@dataclass(frozen=True)
class MigDevice:
    slot: int  # index passed to nvmlDeviceGetMigDeviceHandleByIndex
    uuid: str  # "MIG-..."
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


@dataclass(frozen=True)
class GpuDevice:
    """One physical GPU as last polled (the GPU inventory)."""

    index: int
    uuid: str
    name: str
    mig_devices: tuple[MigDevice, ...] = ()
    power_mw: int | None = None
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization: int | None = None  # whole-GPU percent
    accounting: bool = False  # accounting mode on, so short-lived processes are caught
    mig_enabled: bool = False


@dataclass(frozen=True)
class FinishedGpuProcess:
    """From accounting mode: a process that used the GPU and exited without
    ever being seen by a poll. Its pid may already be reused: match it to a
    process only through a process table that kept the exited process, using
    ``gpu_start_us`` (when its GPU context began, µs since the epoch)."""

    pid: int
    gpu_index: int
    gpu_uuid: str
    max_memory_bytes: int | None
    gpu_start_us: int
    gpu_time_ms: int


@dataclass(frozen=True)
class GpuSnapshot:
    taken_at: float  # time.time()
    available: bool  # NVML answered; False: GPU features are off for now
    devices: tuple[GpuDevice, ...] = ()
    processes: tuple[GpuProcess, ...] = ()
    finished: tuple[FinishedGpuProcess, ...] = ()
    failing: tuple[int, ...] = ()  # GPU indices skipped in this poll (back-off after errors)
    reason: str = ""  # why NVML is unavailable, for operators


USER_HZ = 100  # the kernel's clock_t for /proc is always 100 on Linux


def boottime_ns_to_ticks(ns: int) -> int:
    """CLOCK_BOOTTIME nanoseconds -> /proc start-time clock ticks."""
    return ns // (1_000_000_000 // USER_HZ)


# Why an ssh client's effective configuration could not be established
# (sensors.sshconfig; rome_guard_ssh_config_unknown_total{reason}).
SSH_UNKNOWN_DESCRIPTOR = "descriptor"  # -F /dev/stdin, /dev/fd/N, <(...)
SSH_UNKNOWN_NOT_A_FILE = "not_a_file"  # -F names a fifo, socket or device
SSH_UNKNOWN_DELETED = "deleted"  # -F file gone since the client read it
SSH_UNKNOWN_CHANGED = "changed"  # rewritten after the client started
SSH_UNKNOWN_UNREADABLE = "unreadable"  # the guard could not read the -F file
SSH_UNKNOWN_FAILED = "failed"  # ssh -G exited non-zero or could not start
SSH_UNKNOWN_TIMEOUT = "timeout"  # ssh -G ran past its timeout
SSH_UNKNOWN_SKIPPED = "skipped"  # not asked: over budget, or a slow user
SSH_UNKNOWN_NO_SSH = "no_ssh"  # no ssh binary on the host to ask
SSH_UNKNOWN_NO_USER = "no_user"  # the process's uid has no passwd entry
SSH_UNKNOWN_REASONS = (
    SSH_UNKNOWN_DESCRIPTOR,
    SSH_UNKNOWN_NOT_A_FILE,
    SSH_UNKNOWN_DELETED,
    SSH_UNKNOWN_CHANGED,
    SSH_UNKNOWN_UNREADABLE,
    SSH_UNKNOWN_FAILED,
    SSH_UNKNOWN_TIMEOUT,
    SSH_UNKNOWN_SKIPPED,
    SSH_UNKNOWN_NO_SSH,
    SSH_UNKNOWN_NO_USER,
)
