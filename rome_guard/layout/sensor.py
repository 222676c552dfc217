"""ctypes mirrors of rome_guard/bpf/sensor.h and decoding of its records.

The eBPF sensor's ring buffers carry the C structs of sensor.h; this module
turns one record's bytes into one event of rome_guard.events. It is pure:
no BPF, no /proc, no clock, so it is tested without root. Every struct here
is checked against the C layout by the table in rome_guard/layout/__init__.py
(tests/test_layout.py).

Strings from the kernel (argv, comm, paths) belong to the watched process
and may be hostile: they are decoded with textsafe.from_bytes, never
interpreted. A record that cannot be decoded raises MalformedRecord; this
module never guesses a value it did not read.
"""

from __future__ import annotations

import ctypes as ct
import socket
import struct
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

from rome_guard.events import (
    CONNECT_ATTEMPT,
    CONNECT_ESTABLISHED,
    CONNECT_FAILED,
    CONNECT_REFUSED,
    ConnectEvent,
    Endpoint,
    ExecEvent,
    ExitEvent,
    FdDupEvent,
    ForkEvent,
    GpuOpenEvent,
    RenameEvent,
)
from rome_guard.textsafe import from_bytes

# typing.Union, not X | Y: a run-time alias, and Python 3.9 has no type union
SensorEvent = Union[
    ExecEvent, ForkEvent, ExitEvent, ConnectEvent, GpuOpenEvent, FdDupEvent, RenameEvent
]

# --- constants of sensor.h (checked against the header by the layout test) --

TASK_COMM_LEN = 16

RECORD_EXEC = 1
RECORD_FORK = 2
RECORD_EXIT = 3
RECORD_CONNECT = 4
RECORD_GPU_OPEN = 5
RECORD_FD_DUP = 6
RECORD_RENAME = 7

FD_VIA_DUP = 1
FD_VIA_DUP2 = 2
FD_VIA_DUP3 = 3
FD_VIA_FCNTL = 4

ARGV_MAX_ARGS = 64
ARG_MAX_LEN = 4096
ARGV_LIMIT = 16384
FILENAME_MAX_LEN = 4096
EXEC_DATA_SIZE = ARGV_LIMIT + FILENAME_MAX_LEN
ARGC_COUNT_MAX = 1024

EXEC_ARGV_MISSING = 0x1
EXEC_ARGV_TRUNCATED = 0x2
EXEC_ARGV_FAULT = 0x4
EXEC_ARGC_CAPPED = 0x8
EXEC_FILENAME_TRUNCATED = 0x10

OUTCOME_ATTEMPT = 1
OUTCOME_ESTABLISHED = 2
OUTCOME_REFUSED = 3
OUTCOME_FAILED = 4

SOURCE_TCP_STATE = 1
SOURCE_CONNECT = 2
SOURCE_SEND = 3
SOURCE_UDP_SENDMSG = 4

GPU_PATH_MAX = 128
GPU_PATH_PREFIX_LEN = 11

PROC_FILENAME_MAX = 256
PROC_ARGS_MAX = 256
PROC_FORK_SEEN = 0x1
PROC_EXEC_SEEN = 0x2
PROC_HELD = 0x4
PROC_ARGS_CUT = 0x8
PROC_EXITED = 0x10

TABLE_LIVE_INSERTS = 0
TABLE_LIVE_DELETES = 1
TABLE_LIVE_FULL = 2
TABLE_EXITED_INSERTS = 3
TABLE_EXECS_UNSENT = 4
TABLE_FORKS_UNSENT = 5
TABLE_EXITS_UNSENT = 6
TABLE_SLOTS = 7

NEEDLE_CLASSES = 64
NEEDLE_STATES = 2048
NEEDLE_MATCH = 0xFFFF
NEEDLE_SCAN_MAX = 1024

LOST_PROCESS = 0
LOST_NETWORK = 1
LOST_SLOTS = 2
# ring buffer name -> lost_counters slot
LOST_SLOT_NAMES = {"process": LOST_PROCESS, "network": LOST_NETWORK}

# --- struct mirrors -----------------------------------------------------------


class RecordHeader(ct.Structure):
    _fields_ = [
        ("type", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("timestamp_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("comm", ct.c_uint8 * TASK_COMM_LEN),
    ]


_EXEC_FIXED_FIELDS = [
    ("hdr", RecordHeader),
    ("ppid", ct.c_uint32),
    ("old_pid", ct.c_uint32),
    ("argc", ct.c_uint32),
    ("args_count", ct.c_uint32),
    ("args_size", ct.c_uint32),
    ("filename_size", ct.c_uint32),
    ("flags", ct.c_uint32),
    ("_pad", ct.c_uint32),
    ("args_cut", ct.c_uint64),
    ("start_ns", ct.c_uint64),
    ("parent_start_ns", ct.c_uint64),
]


class ExecRecord(ct.Structure):
    """struct exec_record; only the used part of data is in a record."""

    _fields_ = [*_EXEC_FIXED_FIELDS, ("data", ct.c_uint8 * EXEC_DATA_SIZE)]


class ExecRecordHead(ct.Structure):
    """The fixed part of struct exec_record, before data[]."""

    _fields_ = _EXEC_FIXED_FIELDS


class ForkRecord(ct.Structure):
    _fields_ = [
        ("hdr", RecordHeader),
        ("child_pid", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("clone_flags", ct.c_uint64),
    ]


class ExitRecord(ct.Structure):
    _fields_ = [
        ("hdr", RecordHeader),
        ("exit_code", ct.c_int32),
        ("_pad", ct.c_uint32),
    ]


class ConnectRecord(ct.Structure):
    _fields_ = [
        ("hdr", RecordHeader),
        ("family", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("outcome", ct.c_uint8),
        ("source", ct.c_uint8),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("result", ct.c_int32),
        ("_pad", ct.c_uint32),
    ]


class GpuOpenRecord(ct.Structure):
    _fields_ = [
        ("hdr", RecordHeader),
        ("result", ct.c_int32),
        ("flags", ct.c_uint32),
        ("path", ct.c_uint8 * GPU_PATH_MAX),
    ]


class FdRecord(ct.Structure):
    _fields_ = [
        ("hdr", RecordHeader),
        ("oldfd", ct.c_int32),
        ("newfd", ct.c_int32),
        ("via", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class RenameRecord(ct.Structure):
    _fields_ = [("hdr", RecordHeader), ("newcomm", ct.c_char * TASK_COMM_LEN)]


class SensorConfig(ct.Structure):
    _fields_ = [
        ("datagram_repeat_ns", ct.c_uint64),
        ("tcp_repeat_ns", ct.c_uint64),
        ("quiet_lifecycle", ct.c_uint32),
        ("exec_filter", ct.c_uint32),
        ("loopback_ignoring", ct.c_uint32),
        ("_pad", ct.c_uint32),
    ]


class ProcEntry(ct.Structure):
    """struct proc_entry: one process of the in-kernel process table."""

    _fields_ = [
        ("pid", ct.c_uint32),
        ("ppid", ct.c_uint32),
        ("start_ns", ct.c_uint64),
        ("parent_start_ns", ct.c_uint64),
        ("exec_ns", ct.c_uint64),
        ("exit_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("uid", ct.c_uint32),
        ("exit_code", ct.c_int32),
        ("flags", ct.c_uint32),
        ("argc", ct.c_uint32),
        ("args_size", ct.c_uint32),
        ("_pad", ct.c_uint32),
        ("comm", ct.c_uint8 * TASK_COMM_LEN),
        ("filename", ct.c_uint8 * PROC_FILENAME_MAX),
        ("args", ct.c_uint8 * PROC_ARGS_MAX),
    ]


class NeedleDfa(ct.Structure):
    """struct needle_dfa: the exec filter's command-line automaton."""

    _fields_ = [
        ("classes", ct.c_uint8 * 256),
        ("next", ct.c_uint16 * (NEEDLE_STATES * NEEDLE_CLASSES)),
    ]


class WakeName(ct.Structure):
    """struct wake_name: a key of the wake_names LPM trie."""

    _fields_ = [("prefixlen", ct.c_uint32), ("name", ct.c_char * TASK_COMM_LEN)]


def wake_key(name: str, prefix: bool) -> WakeName:
    """The trie key matching a comm equal to name (cut to what comm can
    hold), or, with prefix, every comm starting with it."""
    raw = name.encode()[: TASK_COMM_LEN - 1]
    bits = len(raw) * 8 if prefix else (len(raw) + 1) * 8
    return WakeName(prefixlen=bits, name=raw)


class BpfProgInfoHead(ct.Structure):
    """The start of the kernel's struct bpf_prog_info (uapi linux/bpf.h), up
    to recursion_misses: runs the kernel skipped because another BPF
    program was already running on that CPU (counted since 6.7). run_cnt
    and run_time_ns count only while BPF stats are enabled."""

    _fields_ = [
        ("_before", ct.c_uint8 * 192),
        ("run_time_ns", ct.c_uint64),
        ("run_cnt", ct.c_uint64),
        ("recursion_misses", ct.c_uint64),
    ]


# constants of sensor.h this module mirrors, for the layout check
CONSTANTS = (
    "TASK_COMM_LEN",
    "RECORD_EXEC",
    "RECORD_FORK",
    "RECORD_EXIT",
    "RECORD_CONNECT",
    "RECORD_GPU_OPEN",
    "RECORD_FD_DUP",
    "RECORD_RENAME",
    "FD_VIA_DUP",
    "FD_VIA_DUP2",
    "FD_VIA_DUP3",
    "FD_VIA_FCNTL",
    "ARGV_MAX_ARGS",
    "ARG_MAX_LEN",
    "ARGV_LIMIT",
    "FILENAME_MAX_LEN",
    "EXEC_DATA_SIZE",
    "ARGC_COUNT_MAX",
    "EXEC_ARGV_MISSING",
    "EXEC_ARGV_TRUNCATED",
    "EXEC_ARGV_FAULT",
    "EXEC_ARGC_CAPPED",
    "EXEC_FILENAME_TRUNCATED",
    "OUTCOME_ATTEMPT",
    "OUTCOME_ESTABLISHED",
    "OUTCOME_REFUSED",
    "OUTCOME_FAILED",
    "SOURCE_TCP_STATE",
    "SOURCE_CONNECT",
    "SOURCE_SEND",
    "SOURCE_UDP_SENDMSG",
    "GPU_PATH_MAX",
    "GPU_PATH_PREFIX_LEN",
    "PROC_FILENAME_MAX",
    "PROC_ARGS_MAX",
    "PROC_FORK_SEEN",
    "PROC_EXEC_SEEN",
    "PROC_HELD",
    "PROC_ARGS_CUT",
    "PROC_EXITED",
    "TABLE_LIVE_INSERTS",
    "TABLE_LIVE_DELETES",
    "TABLE_LIVE_FULL",
    "TABLE_EXITED_INSERTS",
    "TABLE_EXECS_UNSENT",
    "TABLE_FORKS_UNSENT",
    "TABLE_EXITS_UNSENT",
    "TABLE_SLOTS",
    "NEEDLE_CLASSES",
    "NEEDLE_STATES",
    "NEEDLE_MATCH",
    "NEEDLE_SCAN_MAX",
    "LOST_PROCESS",
    "LOST_NETWORK",
    "LOST_SLOTS",
)

# C struct name -> mirror, for the layout check
MIRRORS: dict[str, type[ct.Structure]] = {
    "record_header": RecordHeader,
    "exec_record": ExecRecord,
    "fork_record": ForkRecord,
    "exit_record": ExitRecord,
    "connect_record": ConnectRecord,
    "gpu_open_record": GpuOpenRecord,
    "fd_record": FdRecord,
    "rename_record": RenameRecord,
    "sensor_config": SensorConfig,
    "wake_name": WakeName,
    "proc_entry": ProcEntry,
    "needle_dfa": NeedleDfa,
}

EXEC_DATA_OFFSET = ExecRecord.data.offset

# --- decoding -------------------------------------------------------------------

_AF_INET = 2
_AF_INET6 = 10
_OUTCOMES = {
    OUTCOME_ATTEMPT: CONNECT_ATTEMPT,
    OUTCOME_ESTABLISHED: CONNECT_ESTABLISHED,
    OUTCOME_REFUSED: CONNECT_REFUSED,
    OUTCOME_FAILED: CONNECT_FAILED,
}
# IP protocol number -> Endpoint.proto. 0: a datagram socket whose protocol
# the kernel did not show (connect() without a SYN; see network.c). 255: a
# raw IP socket writing its own headers (nmap's probes, any protocol inside).
_PROTOCOLS = {6: "tcp", 17: "udp", 136: "udp", 0: "udp", 1: "icmp", 58: "icmp", 255: "raw"}


class MalformedRecord(ValueError):
    """A ring buffer record that does not match sensor.h."""


# The decoders read records with struct rather than the ctypes mirrors: the
# same layout (checked against the mirrors in the layout test), several
# times faster, and the daemon decodes tens of thousands of records a second.
_HEADER = "IIIIQQ16s"  # struct record_header
EXEC_HEAD_FORMAT = struct.Struct("=" + _HEADER + "IIIIIIIIQQQ")
FORK_FORMAT = struct.Struct("=" + _HEADER + "IIQ")
EXIT_FORMAT = struct.Struct("=" + _HEADER + "iI")
CONNECT_FORMAT = struct.Struct("=" + _HEADER + "BBBBHH16s16siI")
GPU_OPEN_FORMAT = struct.Struct("=" + _HEADER + "iI128s")
FD_FORMAT = struct.Struct("=" + _HEADER + "iiII")
RENAME_FORMAT = struct.Struct("=" + _HEADER + "16s")
PROC_ENTRY_FORMAT = struct.Struct("=IIQQQQQIiIIII16s256s256s")  # struct proc_entry
# mirror -> format, for the layout test
FORMATS = {
    ExecRecordHead: EXEC_HEAD_FORMAT,
    ForkRecord: FORK_FORMAT,
    ExitRecord: EXIT_FORMAT,
    ConnectRecord: CONNECT_FORMAT,
    GpuOpenRecord: GPU_OPEN_FORMAT,
    FdRecord: FD_FORMAT,
    RenameRecord: RENAME_FORMAT,
    ProcEntry: PROC_ENTRY_FORMAT,
}


@lru_cache(maxsize=4096)
def _text(raw: bytes) -> str:
    """A NUL-terminated kernel string (comm, path) as text, bytes kept."""
    end = raw.find(b"\0")
    return from_bytes(raw if end < 0 else raw[:end])


@lru_cache(maxsize=16384)
def format_address(family: int, raw: bytes) -> str:
    """Text form of an address as sock_diag and /proc show it; IPv4-mapped
    IPv6 addresses keep their dotted tail (::ffff:127.0.0.1)."""
    if family == _AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def _unpack(fmt: struct.Struct, raw: bytes, what: str) -> tuple:
    if len(raw) < fmt.size:
        raise MalformedRecord(f"{what}: {len(raw)} bytes, need {fmt.size}")
    return fmt.unpack_from(raw)


def decode_exec(raw: bytes) -> ExecEvent:
    fields = _unpack(EXEC_HEAD_FORMAT, raw, "exec record")
    _, pid, _, uid, ts, cgroup, comm, ppid = fields[:8]
    args_count, args_size, name_size, flags = fields[10:14]
    start_ns, parent_start_ns = fields[16:18]
    start = EXEC_HEAD_FORMAT.size
    args_end = start + args_size
    name_end = args_end + name_size
    if args_size > ARGV_LIMIT or name_end > len(raw):
        raise MalformedRecord(f"exec record sizes {args_size}+{name_size}")
    args = raw[start:args_end].split(b"\0")[:args_count]
    return ExecEvent(
        pid=pid,
        ppid=ppid,
        filename=_text(raw[args_end:name_end]),
        argv=tuple(from_bytes(arg) for arg in args),
        timestamp_ns=ts,
        uid=uid,
        comm=_text(comm),
        argv_truncated=bool(flags & (EXEC_ARGV_MISSING | EXEC_ARGV_TRUNCATED)),
        cgroup_id=cgroup,
        start_ns=start_ns,
        parent_start_ns=parent_start_ns,
    )


def decode_fork(raw: bytes) -> ForkEvent:
    fields = _unpack(FORK_FORMAT, raw, "fork record")
    return ForkEvent(parent_pid=fields[1], child_pid=fields[7], timestamp_ns=fields[4])


def decode_exit(raw: bytes) -> ExitEvent:
    fields = _unpack(EXIT_FORMAT, raw, "exit record")
    return ExitEvent(pid=fields[1], timestamp_ns=fields[4], exit_code=fields[7])


def decode_connect(raw: bytes) -> ConnectEvent:
    fields = _unpack(CONNECT_FORMAT, raw, "connect record")
    _, pid, _, _, ts, cgroup, comm, family, protocol, outcome_code = fields[:10]
    sport, dport, saddr, daddr = fields[11:15]
    if family not in (_AF_INET, _AF_INET6):
        raise MalformedRecord(f"connect record family {family}")
    try:
        outcome = _OUTCOMES[outcome_code]
        proto = _PROTOCOLS[protocol]
    except KeyError as exc:
        raise MalformedRecord(f"connect record value {exc}") from None
    endpoint = Endpoint(
        proto=proto,
        family=4 if family == _AF_INET else 6,
        saddr=format_address(family, saddr),
        sport=sport,
        daddr=format_address(family, daddr),
        dport=dport,
        state=outcome,
    )
    return ConnectEvent(
        pid=pid,
        endpoint=endpoint,
        outcome=outcome,
        timestamp_ns=ts,
        comm=_text(comm),
        cgroup_id=cgroup,
    )


def decode_gpu_open(raw: bytes) -> GpuOpenEvent:
    fields = _unpack(GPU_OPEN_FORMAT, raw, "gpu open record")
    return GpuOpenEvent(
        pid=fields[1],
        path=_text(fields[9]),
        timestamp_ns=fields[4],
        comm=_text(fields[6]),
        cgroup_id=fields[5],
    )


_VIA = {FD_VIA_DUP: "dup", FD_VIA_DUP2: "dup2", FD_VIA_DUP3: "dup3", FD_VIA_FCNTL: "fcntl"}


def decode_fd(raw: bytes) -> FdDupEvent:
    fields = _unpack(FD_FORMAT, raw, "fd record")
    oldfd, newfd, via = fields[7:10]
    if not 0 <= newfd <= 2 or via not in _VIA:
        raise MalformedRecord(f"fd record newfd {newfd} via {via}")
    return FdDupEvent(
        pid=fields[1],
        oldfd=oldfd,
        newfd=newfd,
        via=_VIA[via],
        timestamp_ns=fields[4],
        comm=_text(fields[6]),
    )


def decode_rename(raw: bytes) -> RenameEvent:
    fields = _unpack(RENAME_FORMAT, raw, "rename record")
    return RenameEvent(
        pid=fields[1],
        old_comm=_text(fields[6]),
        new_comm=_text(fields[7]),
        timestamp_ns=fields[4],
    )


@dataclass(frozen=True)
class TableProcess:
    """One entry of the in-kernel process table (struct proc_entry)."""

    pid: int
    ppid: int
    start_ns: int  # its fork, CLOCK_BOOTTIME; 0 when not seen forked
    parent_start_ns: int  # 0 unknown
    exec_ns: int
    exit_ns: int  # 0 while it lives
    cgroup_id: int
    uid: int
    exit_code: int
    flags: int
    comm: str
    filename: str  # what it last exec'd (or its parent did), not resolved
    args: tuple[str, ...]  # the head of argv
    args_cut: bool


def decode_proc_entry(raw: bytes) -> TableProcess:
    fields = _unpack(PROC_ENTRY_FORMAT, raw, "process table entry")
    pid, ppid, start, parent_start, exec_ns, exit_ns, cgroup, uid, code, flags = fields[:10]
    args_size = min(fields[11], PROC_ARGS_MAX)
    args = fields[15][:args_size].split(b"\0")
    if args and not args[-1]:
        args.pop()  # the last argument's NUL
    cut = bool(flags & PROC_ARGS_CUT)
    if cut and args_size == PROC_ARGS_MAX and args:
        args.pop()  # an argument cut mid-way is not one
    return TableProcess(
        pid=pid,
        ppid=ppid,
        start_ns=start if flags & PROC_FORK_SEEN else 0,
        parent_start_ns=parent_start,
        exec_ns=exec_ns,
        exit_ns=exit_ns,
        cgroup_id=cgroup,
        uid=uid,
        exit_code=code,
        flags=flags,
        comm=_text(fields[13]),
        filename=_text(fields[14]),
        args=tuple(from_bytes(arg) for arg in args),
        args_cut=cut,
    )


_DECODERS = {
    RECORD_EXEC: decode_exec,
    RECORD_FORK: decode_fork,
    RECORD_EXIT: decode_exit,
    RECORD_CONNECT: decode_connect,
    RECORD_GPU_OPEN: decode_gpu_open,
    RECORD_FD_DUP: decode_fd,
    RECORD_RENAME: decode_rename,
}


def decode_record(raw: bytes) -> SensorEvent:
    """One ring buffer record -> one event; MalformedRecord if it is not one."""
    if len(raw) < 4:
        raise MalformedRecord(f"record of {len(raw)} bytes")
    record_type = int.from_bytes(raw[:4], sys.byteorder)
    decoder = _DECODERS.get(record_type)
    if decoder is None:
        raise MalformedRecord(f"unknown record type {record_type}")
    return decoder(raw)
