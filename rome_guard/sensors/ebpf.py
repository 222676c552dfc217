"""The real-time eBPF sensor: process spawns, outbound connections and
/dev/nvidia* opens as they happen, from kernel tracepoints (BCC).

What it reports (details in rome_guard/bpf/*.c):
- ExecEvent for every successful exec, with argv copied at syscall entry
  (argv_truncated when any part is missing: read /proc/PID/cmdline then)
  and ppid = the creating process at fork time (0 when the process was
  created before the sensor started: read /proc then);
- ForkEvent for every new process (threads are not reported);
- ExitEvent when the last thread of a process exits;
- ConnectEvent for TCP connects (an "attempt", then "established",
  "refused" or "failed" for the same socket) and for datagram destinations
  (UDP connect()/sendto(): outcome "attempt", no source address);
- GpuOpenEvent for successful opens of /dev/nvidia*;
- FdDupEvent when an inet socket the process made is duplicated onto fd
  0, 1 or 2 (dup, dup2, dup3, fcntl F_DUPFD*), checked at syscall exit;
- RenameEvent when a process renames itself after exec (prctl
  PR_SET_NAME, /proc/self/comm);
- ConnectEvent (attempt) for every unconnected UDP send, from cgroup
  udp_sendmsg hooks linked to the cgroup2 root: io_uring's
  IORING_OP_SENDMSG enters no send syscall.

It only observes: it never kills or blocks (rome_guard/respond does), and
never drops what a rule could need without counting it: failed ring buffer
writes and undecodable records are in lost_events(). Everything it loads
is detached and freed by close(), also when start() fails half-way.
One instance compiles once (~2 s, ~150 MB while compiling).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import importlib.util
import os
import re
import struct
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Iterable, NamedTuple

from rome_guard.kernel import btf
from rome_guard.kernel.loader import BPF_DIR, BpfObject, LoadError, Ring, bcc_bpf
from rome_guard.kernel.poller import BATCH_MS
from rome_guard.layout.needles import TooComplex, build_dfa
from rome_guard.layout.sensor import (
    LOST_SLOT_NAMES,
    BpfProgInfoHead,
    MalformedRecord,
    SensorConfig,
    SensorEvent,
    WakeName,
    decode_record,
    wake_key,
)
from rome_guard.linux import can_load_bpf, cgroup2_root

SENSOR_SOURCE = BPF_DIR / "sensor.c"
TRACEFS_MOUNTS = ("/sys/kernel/debug/tracing", "/sys/kernel/tracing")  # bcc's order
TRACEFS_MOUNT_POINT = "/sys/kernel/tracing"
# every BPF program of the sensor is named rgs_*; nothing else uses the prefix
PROGRAM_PREFIX = "rgs_"
MIN_KERNEL = (5, 8)  # BPF ring buffers, bpf_ktime_get_boot_ns

DEFAULT_PROCESS_RING_PAGES = 4096  # 16 MiB: exec records carry argv
DEFAULT_NETWORK_RING_PAGES = 2048  # 8 MiB
# One datagram destination is reported once per process per this interval:
# a UDP flood must not blind the sensor to TCP connects in the same buffer.
DEFAULT_DATAGRAM_REPEAT_NS = 1_000_000_000
# a repeated TCP connect (same process, destination and outcome) is reported
# once per this long; rules look at distinct destinations and worst outcomes
DEFAULT_TCP_REPEAT_NS = 1_000_000_000
WAKE_NAMES_MAX = 4096  # entries of the wake_names trie (sensor.c)
# the process table (sensor.c): live processes tracked, exited ones kept for lineage
DEFAULT_LIVE_TABLE_SIZE = 32768
RAW_TCP_STATE_FEATURE = "HAVE_RAW_TCP_STATE"
DEFAULT_EXITED_TABLE_SIZE = 16384
EXEC_SCAN_PROGRAM = "rgs_exec_scan"  # tail-called by rgs_exec (exec_tail)
PROCESS_TABLE_MAPS = ("proc_live", "proc_exited", "held_pids", "table_counters")

# cgroup/udp{4,6}_sendmsg hooks (enum bpf_attach_type): unconnected UDP sends
# that no send syscall carries (io_uring's IORING_OP_SENDMSG)
UDP_SENDMSG_HOOKS = (("rgs_udp4_sendmsg", 14), ("rgs_udp6_sendmsg", 15))


class EbpfUnavailable(Exception):
    """The eBPF sensor cannot run here; the message names what is missing."""


@dataclass(frozen=True)
class Attachment:
    tracepoint: str  # "category:event"
    program: str  # function in rome_guard/bpf/*.c
    feature: str | None = None  # -D macro compiling it in; None: required
    ring: str = "network"  # the ring buffer its events go to
    raw: bool = False  # a raw tracepoint (the event of tracepoint), not a perf-event one
    replaces: str | None = None  # the program it stands in for when its feature is there
    unless: str | None = None  # a feature that does its job another way: then not attached


def _process(
    tracepoint: str, program: str, feature: str | None = None, unless: str | None = None
) -> Attachment:
    return Attachment(tracepoint, program, feature, ring="process", unless=unless)


# the fd table read from the running kernel's BTF (FD_TABLE_MEMBERS): a dup
# onto stdio asks the caller's fd table whether it is an inet socket, so
# socket() and accept() need not be traced
FD_TABLE_FEATURE = "HAVE_FD_TABLE"
# task_struct.exit_code read at sched_process_exit: exit_group() is not traced
TASK_EXIT_CODE_FEATURE = "HAVE_TASK_EXIT_CODE"


ATTACHMENTS: tuple[Attachment, ...] = (
    _process("syscalls:sys_enter_execve", "rgs_execve"),
    _process("syscalls:sys_exit_execve", "rgs_execve_ret"),
    _process("syscalls:sys_enter_execveat", "rgs_execveat", "HAVE_EXECVEAT"),
    _process("syscalls:sys_exit_execveat", "rgs_execveat_rt", "HAVE_EXECVEAT"),
    _process("sched:sched_prepare_exec", "rgs_prep_exec", "HAVE_PREPARE_EXEC"),
    _process("sched:sched_process_exec", "rgs_exec"),
    _process("task:task_newtask", "rgs_newtask"),
    _process("syscalls:sys_enter_exit_group", "rgs_exit_group", unless=TASK_EXIT_CODE_FEATURE),
    _process("sched:sched_process_exit", "rgs_exit"),
    _process("syscalls:sys_enter_socket", "rgs_socket", unless=FD_TABLE_FEATURE),
    _process("syscalls:sys_exit_socket", "rgs_socket_ret", unless=FD_TABLE_FEATURE),
    # not on arm64
    _process("syscalls:sys_enter_accept", "rgs_accept", "HAVE_ACCEPT", FD_TABLE_FEATURE),
    _process("syscalls:sys_exit_accept", "rgs_accept_ret", "HAVE_ACCEPT", FD_TABLE_FEATURE),
    _process("syscalls:sys_enter_accept4", "rgs_accept4", unless=FD_TABLE_FEATURE),
    _process("syscalls:sys_exit_accept4", "rgs_accept4_ret", unless=FD_TABLE_FEATURE),
    _process("syscalls:sys_enter_dup", "rgs_dup"),
    _process("syscalls:sys_exit_dup", "rgs_dup_ret"),
    _process("syscalls:sys_enter_dup2", "rgs_dup2", "HAVE_DUP2"),  # not on arm64
    _process("syscalls:sys_exit_dup2", "rgs_dup2_ret", "HAVE_DUP2"),
    _process("syscalls:sys_enter_dup3", "rgs_dup3"),
    _process("syscalls:sys_exit_dup3", "rgs_dup3_ret"),
    _process("syscalls:sys_enter_fcntl", "rgs_fcntl"),
    _process("syscalls:sys_exit_fcntl", "rgs_fcntl_ret"),
    _process("task:task_rename", "rgs_rename"),
    Attachment("sock:inet_sock_set_state", "rgs_tcp_state"),
    # where the running kernel's BTF names struct sock's members (RAW_TCP_STATE_MEMBERS)
    Attachment(
        "sock:inet_sock_set_state",
        "rgs_tcp_state_raw",
        RAW_TCP_STATE_FEATURE,
        raw=True,
        replaces="rgs_tcp_state",
    ),
    Attachment("tcp:tcp_receive_reset", "rgs_tcp_reset", raw=True),
    Attachment("syscalls:sys_enter_connect", "rgs_connect"),
    Attachment("syscalls:sys_exit_connect", "rgs_connect_ret"),
    Attachment("syscalls:sys_enter_sendto", "rgs_sendto"),
    Attachment("syscalls:sys_exit_sendto", "rgs_sendto_ret"),
    Attachment("syscalls:sys_enter_sendmsg", "rgs_sendmsg"),
    Attachment("syscalls:sys_exit_sendmsg", "rgs_sendmsg_ret"),
    Attachment("syscalls:sys_enter_sendmmsg", "rgs_sendmmsg"),
    Attachment("syscalls:sys_exit_sendmmsg", "rgs_sendmmsg_rt"),
    Attachment("sock:sock_send_length", "rgs_send_len", "HAVE_SOCK_SEND_LENGTH"),
    Attachment("syscalls:sys_enter_openat", "rgs_openat"),
    Attachment("syscalls:sys_exit_openat", "rgs_openat_ret"),
    Attachment("syscalls:sys_enter_open", "rgs_open", "HAVE_OPEN"),
    Attachment("syscalls:sys_exit_open", "rgs_open_ret", "HAVE_OPEN"),
    Attachment("syscalls:sys_enter_openat2", "rgs_openat2", "HAVE_OPENAT2"),
    Attachment("syscalls:sys_exit_openat2", "rgs_openat2_ret", "HAVE_OPENAT2"),
)


# struct members rgs_tcp_state_raw reads, by the -D macro that carries each offset
RAW_TCP_STATE_MEMBERS = (
    ("RG_OFF_SK_PROTOCOL", "sock", "sk_protocol"),
    ("RG_OFF_SKC_FAMILY", "sock_common", "skc_family"),
    ("RG_OFF_SKC_DPORT", "sock_common", "skc_dport"),
    ("RG_OFF_SKC_DADDR", "sock_common", "skc_daddr"),
    ("RG_OFF_SKC_V6_DADDR", "sock_common", "skc_v6_daddr"),
    ("RG_OFF_SKC_V6_RCV_SADDR", "sock_common", "skc_v6_rcv_saddr"),
    ("RG_OFF_INET_SPORT", "inet_sock", "inet_sport"),
    ("RG_OFF_INET_SADDR", "inet_sock", "inet_saddr"),
)

# what fd_is_inet (process.c) reads: current->files->fdt->fd[fd], its inode's
# mode, and a socket file's struct socket -> sock -> family
FD_TABLE_MEMBERS = (
    ("RG_OFF_TASK_FILES", "task_struct", "files"),
    ("RG_OFF_FILES_FDT", "files_struct", "fdt"),
    ("RG_OFF_FDT_MAX_FDS", "fdtable", "max_fds"),
    ("RG_OFF_FDT_FD", "fdtable", "fd"),
    ("RG_OFF_FILE_INODE", "file", "f_inode"),
    ("RG_OFF_INODE_MODE", "inode", "i_mode"),
    ("RG_OFF_FILE_PRIVATE_DATA", "file", "private_data"),
    ("RG_OFF_SOCKET_SK", "socket", "sk"),
    ("RG_OFF_SKC_FAMILY", "sock_common", "skc_family"),
)


@dataclass(frozen=True)
class BtfFeature:
    """A -D feature whose programs read kernel structs at the running
    kernel's offsets (kernel/btf.py): built only when its BTF names every
    member; else left out, and the sensor says what it sees instead."""

    name: str
    members: tuple[tuple[str, str, str], ...]  # (RG_OFF_* macro, struct, member)
    without: str  # the sensor's degraded line when it is left out


BTF_FEATURES = (
    BtfFeature(
        RAW_TCP_STATE_FEATURE,
        RAW_TCP_STATE_MEMBERS,
        "TCP outcomes from the sock:inet_sock_set_state tracepoint: no kernel BTF for "
        "struct sock, so another tracing program on the CPU can make one be missed",
    ),
    BtfFeature(
        TASK_EXIT_CODE_FEATURE,
        (("RG_OFF_TASK_EXIT_CODE", "task_struct", "exit_code"),),
        "exit codes from exit_group(2), one more traced syscall (no kernel BTF for "
        "task_struct): a last thread's exit(2) is reported as -1",
    ),
    BtfFeature(
        FD_TABLE_FEATURE,
        FD_TABLE_MEMBERS,
        "an inet socket duplicated onto stdio is seen only when the process made or "
        "accepted it itself (no kernel BTF for the fd table): one inherited across fork "
        "or passed over a unix socket is judged only at the next exec",
    ),
)


class ProgramStats(NamedTuple):
    runs: int
    run_time_ns: int
    recursion_misses: int  # runs the kernel skipped: events possibly lost


# A feature that is not an extra tracepoint but a field of one.
GROUP_DEAD_FEATURE = "HAVE_GROUP_DEAD"


# --- what the kernel offers (pure given a tracefs path) -------------------------


def _tracepoint_dir(tracefs: str, tracepoint: str) -> str:
    category, event = tracepoint.split(":")
    return os.path.join(tracefs, "events", category, event)


def tracepoint_exists(tracefs: str, tracepoint: str) -> bool:
    return os.path.isdir(_tracepoint_dir(tracefs, tracepoint))


def missing_required(tracefs: str) -> list[str]:
    return [
        a.tracepoint
        for a in ATTACHMENTS
        if a.feature is None and not tracepoint_exists(tracefs, a.tracepoint)
    ]


def available_features(tracefs: str) -> set[str]:
    """The optional -D features whose tracepoints (all of them) exist."""
    features: dict[str, bool] = {}
    for a in ATTACHMENTS:
        if a.feature:
            present = tracepoint_exists(tracefs, a.tracepoint)
            features[a.feature] = features.get(a.feature, True) and present
    found = {name for name, ok in features.items() if ok}
    exit_format = os.path.join(_tracepoint_dir(tracefs, "sched:sched_process_exit"), "format")
    try:
        with open(exit_format) as f:
            if re.search(r"\bgroup_dead;", f.read()):
                found.add(GROUP_DEAD_FEATURE)
    except OSError:
        pass
    return found


def attachments_for(features: set[str]) -> list[Attachment]:
    chosen = [
        a
        for a in ATTACHMENTS
        if (a.feature is None or a.feature in features) and a.unless not in features
    ]
    replaced = {a.replaces for a in chosen if a.replaces}
    return [a for a in chosen if a.program not in replaced]


def btf_offsets(wanted: Iterable[BtfFeature]) -> dict[str, dict[str, int] | None]:
    """Per feature wanted, the RG_OFF_* offsets of its members in the
    running kernel (its BTF); None where it has no BTF or lacks one."""
    wanted = list(wanted)
    try:
        kernel = btf.Btf.of_running_kernel() if wanted else None
    except (OSError, btf.BtfError, struct.error):
        return {feature.name: None for feature in wanted}
    found: dict[str, dict[str, int] | None] = {}
    for feature in wanted:
        try:
            found[feature.name] = btf.offsets(kernel, feature.members)
        except (btf.BtfError, struct.error):
            found[feature.name] = None
    return found


def compile_unit(features: Iterable[str] = ()) -> tuple[str, list[str]]:
    """The sensor's C source as one text, and the cflags to compile it.

    BCC declares a tracepoint's argument struct only in the main file, so
    the program files included by sensor.c are inlined here (with #line
    so compiler messages still name the right file and line)."""
    lines = []
    for number, line in enumerate(SENSOR_SOURCE.read_text().splitlines(), start=1):
        m = re.fullmatch(r'#include "(\w+\.c)"', line.strip())
        if m:
            lines.append(f'#line 1 "{m.group(1)}"')
            lines.append((BPF_DIR / m.group(1)).read_text())
            lines.append(f'#line {number + 1} "sensor.c"')
        else:
            lines.append(line)
    cflags = [f"-I{BPF_DIR}", *(f"-D{name}" for name in sorted(features))]
    return "\n".join(lines), cflags


# --- checks that need no compile -----------------------------------------------


def find_tracefs() -> str | None:
    for path in TRACEFS_MOUNTS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def _kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _tracefs_supported() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "tracefs" for line in f if line.strip())
    except OSError:
        return False


def probe_ebpf() -> str | None:
    """None when the eBPF sensor can start here, else why not. Cheap: no
    compile, no import of bcc, nothing changed on the host."""
    if not can_load_bpf():
        return (
            "not root: loading BPF programs needs root, or CAP_BPF and CAP_PERFMON "
            "(and CAP_SYS_ADMIN on kernels before 5.8)"
        )
    if _kernel_version() < MIN_KERNEL:
        return f"kernel {os.uname().release} is older than 5.8 (BPF ring buffers)"
    if importlib.util.find_spec("bcc") is None:
        return (
            "bcc is not importable by this Python: install python3-bpfcc (Debian/Ubuntu) "
            "or python3-bcc (RHEL) and make its bcc package visible to the interpreter"
        )
    build = f"/lib/modules/{os.uname().release}/build"
    if not os.path.isdir(build):
        return (
            f"kernel headers missing at {build}: install linux-headers-{os.uname().release} "
            "(BCC compiles the sensor against them)"
        )
    tracefs = find_tracefs()
    if tracefs is None:
        if not _tracefs_supported():
            return "tracefs is not mounted and this kernel does not offer it"
        return None  # start() mounts it
    missing = missing_required(tracefs)
    if missing:
        return f"tracepoints missing in {tracefs}/events: {', '.join(missing)}"
    return None


def mount_tracefs() -> str:
    """The tracefs path, mounting tracefs at /sys/kernel/tracing if needed."""
    found = find_tracefs()
    if found:
        return found
    libc = ct.CDLL(None, use_errno=True)
    if libc.mount(b"tracefs", TRACEFS_MOUNT_POINT.encode(), b"tracefs", 0, None) != 0:
        err = ct.get_errno()
        if err != errno.EBUSY:
            raise EbpfUnavailable(
                f"tracefs is not mounted at {TRACEFS_MOUNT_POINT} and mounting it failed: "
                f"{os.strerror(err)}"
            )
    found = find_tracefs()
    if found is None:
        raise EbpfUnavailable(f"tracefs mounted at {TRACEFS_MOUNT_POINT} shows no events/")
    return found


# --- the sensor -------------------------------------------------------------------


class EbpfSensor:
    """Kernel events as rome_guard.events, drained with poll().

    Not thread-safe: call poll() and the set_* methods from one thread.
    Events of one poll() are in timestamp order, and a lifecycle event
    (exec, fork) that happened before a network or GPU event of the same
    process is never returned by a later poll() than that event."""

    def __init__(
        self,
        ignore_pids: Iterable[int] = (),
        *,
        process_ring_pages: int = DEFAULT_PROCESS_RING_PAGES,
        network_ring_pages: int = DEFAULT_NETWORK_RING_PAGES,
        datagram_repeat_ns: int = DEFAULT_DATAGRAM_REPEAT_NS,
        tcp_repeat_ns: int = DEFAULT_TCP_REPEAT_NS,
        disable_features: Iterable[str] = (),
        live_table_size: int = DEFAULT_LIVE_TABLE_SIZE,
        exited_table_size: int = DEFAULT_EXITED_TABLE_SIZE,
    ):
        self._ignore_pids = set(ignore_pids)
        self._loopback_ignore_cgroups: set[int] = set()
        self._wake_names: frozenset[str] | None = None  # None: every record wakes
        self._needles: Any = None  # NeedleDfa of the exec filter; None: every exec is sent
        self._process_ring_pages = process_ring_pages
        self._network_ring_pages = network_ring_pages
        self._datagram_repeat_ns = datagram_repeat_ns
        self._tcp_repeat_ns = tcp_repeat_ns
        self._table_sizes = (live_table_size, exited_table_size)
        # optional tracepoints not to use (HAVE_* names), as on older kernels
        self._disable_features = set(disable_features)
        self._bpf: BpfObject | None = None
        self._rings: list[Ring[SensorEvent]] = []
        self.features: set[str] = set()
        self.attached: list[Attachment] = []
        self.linked: list[str] = []  # programs linked to the cgroup2 root
        self.tail_called: list[str] = []  # programs loaded for tail calls only
        self.degraded: list[str] = []  # what is not seen here, and why

    @property
    def running(self) -> bool:
        return self._bpf is not None

    def start(self) -> None:
        """Compile once and attach every tracepoint; EbpfUnavailable (with
        nothing left loaded) when that is not possible."""
        if self._bpf is not None:
            return
        reason = probe_ebpf()
        if reason:
            raise EbpfUnavailable(reason)
        tracefs = mount_tracefs()  # before importing bcc: it picks its path at import
        missing = missing_required(tracefs)
        if missing:
            raise EbpfUnavailable(f"tracepoints missing in {tracefs}/events: {', '.join(missing)}")
        self.features = available_features(tracefs) | {f.name for f in BTF_FEATURES}
        self.features -= self._disable_features
        offsets: dict[str, int] = {}
        wanted = [f for f in BTF_FEATURES if f.name in self.features]
        found_offsets = btf_offsets(wanted)
        for feature in wanted:
            found = found_offsets[feature.name]
            if found is None:
                self.features.discard(feature.name)
                self.degraded.append(feature.without)
            else:
                offsets.update(found)
        text, cflags = compile_unit(self.features)
        cflags += [f"-D{name}={value}" for name, value in sorted(offsets.items())]
        cflags += [
            f"-DPROCESS_RING_PAGES={self._process_ring_pages}",
            f"-DNETWORK_RING_PAGES={self._network_ring_pages}",
            f"-DPROC_LIVE_MAX={self._table_sizes[0]}",
            f"-DPROC_EXITED_MAX={self._table_sizes[1]}",
            f"-DQUIET_BATCH_NS={BATCH_MS * 1_000_000}ULL",
        ]
        try:
            bpf = BpfObject.compile(SENSOR_SOURCE, text=text, cflags=cflags)
        except LoadError as exc:
            raise EbpfUnavailable(str(exc)) from exc
        try:
            for attachment in attachments_for(self.features):
                try:
                    if attachment.raw:
                        bpf.attach_raw_tracepoint(attachment.tracepoint, attachment.program)
                    else:
                        bpf.attach_tracepoint(attachment.tracepoint, attachment.program)
                except LoadError as exc:
                    raise EbpfUnavailable(str(exc)) from exc
                self.attached.append(attachment)
            self._attach_udp_sendmsg(bpf)
            # rgs_exec hands the exec filter's needle scan to this one
            try:
                scan = bpf.load_func(EXEC_SCAN_PROGRAM, bcc_bpf().TRACEPOINT)
            except LoadError as exc:
                raise EbpfUnavailable(str(exc)) from exc
            bpf["exec_tail"][ct.c_int(0)] = ct.c_int(scan.fd)
            self.tail_called.append(EXEC_SCAN_PROGRAM)
            self._bpf = bpf
            self._write_config()
            self._sync_set("ignored_pids", ct.c_uint32, set(), self._ignore_pids)
            self._sync_set(
                "loopback_ignore_cgroups", ct.c_uint64, set(), self._loopback_ignore_cgroups
            )
            if self._wake_names is not None:
                self._sync_wake_names(frozenset(), self._wake_names)
            if self._needles is not None:
                self._bpf["needle_dfa"][ct.c_int(0)] = self._needles
            # consume() drains rings in this order: process last, so an exec
            # is never returned after a connect it preceded.
            self._rings = [
                bpf.open_ring("network_events", decode_record, (MalformedRecord,), "network"),
                bpf.open_ring("process_events", decode_record, (MalformedRecord,), "process"),
            ]
        except BaseException:
            self._bpf = None
            self.attached.clear()
            self.linked.clear()
            self.tail_called.clear()
            self._rings = []
            bpf.close()
            raise

    def _attach_udp_sendmsg(self, bpf: BpfObject) -> None:
        """Hook unconnected UDP sends at the cgroup2 root through BPF links:
        a link lives as long as its fd, so a crashed sensor leaves nothing
        attached (no stale-attachment cleanup needed). Optional: without
        cgroup2 or links, only syscall sends are seen (self.degraded says)."""
        try:
            root = cgroup2_root()
        except OSError as exc:  # NoCgroup2
            self.degraded.append(f"io_uring UDP sends unseen: {exc}")
            return
        prog_type = bcc_bpf().CGROUP_SOCK_ADDR
        for name, attach_type in UDP_SENDMSG_HOOKS:
            try:
                # links only: these hooks are named in no stale-cleanup list
                bpf.attach_to_cgroup(root, name, prog_type, attach_type, fallback=False)
            except OSError as exc:
                self.degraded.append(
                    f"io_uring UDP sends unseen: linking {name} to {root}: {exc.strerror}"
                )
                bpf.detach_cgroups()
                self.linked.clear()
                return
            self.linked.append(name)

    def _write_config(self) -> None:
        table = self._bpf["sensor_config"]
        table[ct.c_int(0)] = SensorConfig(
            datagram_repeat_ns=self._datagram_repeat_ns,
            tcp_repeat_ns=self._tcp_repeat_ns,
            quiet_lifecycle=int(self._wake_names is not None),
            exec_filter=int(self._wake_names is not None and self._needles is not None),
            loopback_ignoring=int(bool(self._loopback_ignore_cgroups)),
        )

    def _sync_set(self, table_name: str, key_type: Any, old: set[int], new: set[int]) -> None:
        table = self._bpf[table_name]
        for value in old - new:
            with contextlib.suppress(KeyError):
                del table[key_type(value)]
        for value in new - old:
            table[key_type(value)] = ct.c_uint8(1)

    def poll(self, timeout_ms: int) -> list[SensorEvent]:
        """Wait up to timeout_ms for events, then drain both ring buffers."""
        if self._bpf is None:
            raise RuntimeError("EbpfSensor.poll() before start() or after close()")
        self._bpf.poll(timeout_ms)
        self._bpf.consume()
        batch = [event for ring in self._rings for event in ring.take()]
        batch.sort(key=attrgetter("timestamp_ns"))
        return batch

    def ring_fds(self) -> list[int]:
        """The ring buffers' fds, for kernel.poller.RingPoller."""
        return self._bpf.ring_fds() if self._bpf is not None else []

    def lost_events(self) -> dict[str, int]:
        """Events lost per ring buffer ("process", "network") since start():
        ring buffer or tracking table full in the kernel, program runs the
        kernel skipped (another BPF program was running on that CPU), or a
        record that did not decode. An upper bound: a skipped run of a
        helper program costs at most one event."""
        lost = dict.fromkeys(LOST_SLOT_NAMES, 0)
        for ring in self._rings:
            lost[ring.name] += ring.malformed
        if self._bpf is not None:
            table = self._bpf["lost_counters"]
            for name, slot in LOST_SLOT_NAMES.items():
                lost[name] += int(table.sum(ct.c_int(slot)).value)
            stats = self.program_stats()
            for attachment in self.attached:
                lost[attachment.ring] += stats[attachment.program].recursion_misses
        return lost

    def program_stats(self) -> dict[str, ProgramStats]:
        """Per attached program: runs and run time (counted only while BPF
        stats are enabled, kernel.bpf_stats_enabled), and skipped runs."""
        from bcc.libbcc import lib

        stats = {}
        for attachment in self.attached:
            info = BpfProgInfoHead()
            size = ct.c_uint32(ct.sizeof(info))
            fd = self._bpf.bpf.funcs[attachment.program.encode()].fd
            if lib.bpf_obj_get_info(fd, ct.byref(info), ct.byref(size)) != 0:
                info = BpfProgInfoHead()
            stats[attachment.program] = ProgramStats(
                info.run_cnt, info.run_time_ns, info.recursion_misses
            )
        return stats

    def set_ignored_pids(self, pids: Iterable[int]) -> None:
        """Processes (tgids) whose connects, datagrams and GPU opens are not
        reported, e.g. the daemon itself. Their lifecycle still is."""
        new = set(pids)
        if self._bpf is not None:
            self._sync_set("ignored_pids", ct.c_uint32, self._ignore_pids, new)
        self._ignore_pids = new

    def set_loopback_ignore_cgroups(self, cgroup_ids: Iterable[int]) -> None:
        """cgroup v2 ids (see rome_guard.linux.cgroup_id()) whose loopback-to-loopback traffic
        is not reported, for them and every cgroup below them."""
        new = set(cgroup_ids)
        if self._bpf is not None:
            self._sync_set(
                "loopback_ignore_cgroups", ct.c_uint64, self._loopback_ignore_cgroups, new
            )
        self._loopback_ignore_cgroups = new
        if self._bpf is not None:
            self._write_config()

    def set_wake_names(self, names: Iterable[str] | None) -> None:
        """Quiet lifecycle: forks, exits and the execs of programs whose comm
        is not one of names (a name ending in "*" is a prefix) wake the
        caller at most once per kernel.poller.BATCH_MS; the others stay in
        the ring buffer until the next poll(), and the caller, once woken,
        must poll() again BATCH_MS later while records keep coming: that
        bounds their delay. None: every record wakes (the default), as it
        does when there are more names than the kernel's trie holds."""
        new = None if names is None else frozenset(names)
        if new is not None and len(new) > WAKE_NAMES_MAX:
            new = None
        if self._bpf is not None:
            self._sync_wake_names(self._wake_names or frozenset(), new or frozenset())
            self._wake_names = new
            self._write_config()
        self._wake_names = new

    def set_exec_needles(self, needles: Iterable[str] | None) -> None:
        """The exec filter: with wake names set (set_wake_names), an exec
        whose names are none of them and whose command line holds none of
        needles (engine.exec_needles) is kept in the kernel's process table
        and not sent; forks are not sent, and exits only of processes user
        space holds (it was sent their exec, or hold() them). None: every
        exec is sent (a rule evaluates every command line), as when the
        needles do not fit the kernel's automaton (degraded says so)."""
        dfa = None
        if needles is not None:
            try:
                dfa = build_dfa(needles)
            except TooComplex as exc:
                self.degraded.append(f"every exec is sent to user space: {exc}")
        if self._bpf is not None and dfa is not None:
            self._bpf["needle_dfa"][ct.c_int(0)] = dfa
        self._needles = dfa
        if self._bpf is not None:
            self._write_config()

    def process_table_maps(self) -> dict[str, Any] | None:
        """The maps of the kernel's process table (PROCESS_TABLE_MAPS), for
        rome_guard.state.kernel_table to read what it was not sent."""
        if self._bpf is None:
            return None
        return {name: self._bpf[name] for name in PROCESS_TABLE_MAPS}

    def _sync_wake_names(self, old: frozenset[str], new: frozenset[str]) -> None:
        table = self._bpf["wake_names"]

        def key(name: str) -> WakeName:
            return wake_key(name.removesuffix("*"), prefix=name.endswith("*"))

        for name in old - new:
            with contextlib.suppress(KeyError):
                del table[key(name)]
        for name in new - old:
            table[key(name)] = ct.c_uint8(1)

    def close(self) -> None:
        """Detach every tracepoint and free every map; idempotent."""
        bpf, self._bpf = self._bpf, None
        self.attached.clear()
        self.linked.clear()
        self.tail_called.clear()
        if bpf is not None:
            bpf.close()

    def __enter__(self) -> EbpfSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
