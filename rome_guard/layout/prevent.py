"""ctypes mirrors of rome_guard/bpf/prevent.h, the in-kernel prevention's
records and map keys.

Pure: no BPF, no clock. Every struct and constant here is checked against
the C header by the table in rome_guard/layout/__init__.py
(tests/test_layout.py), without root. ``decode_prevent_record`` turns a
record into a ``PreventionEvent``; this module never acts on one
(rome_guard/respond/prevent.py holds the lists, handlers/prevention.py
judges the events).
"""

from __future__ import annotations

import ctypes as ct
import socket

from rome_guard.events import (
    PREVENTION_BLOCKED_CONNECT,
    PREVENTION_KILLED_CONNECT,
    PREVENTION_KILLED_EXEC,
    PreventionEvent,
)
from rome_guard.layout.sensor import format_address
from rome_guard.textsafe import from_bytes

RG_ACT_BLOCK = 1
RG_ACT_KILL = 2
RG_EV_BLOCKED_CONNECT = 1
RG_EV_KILLED_EXEC = 2
RG_EV_KILLED_CONNECT = 3
RG_COMM_LEN = 16
RG_PATH_LEN = 256

CONSTANTS = (
    "RG_ACT_BLOCK",
    "RG_ACT_KILL",
    "RG_EV_BLOCKED_CONNECT",
    "RG_EV_KILLED_EXEC",
    "RG_EV_KILLED_CONNECT",
    "RG_COMM_LEN",
    "RG_PATH_LEN",
)


class V4Key(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint32)]


class V6Key(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint32 * 4)]


class CommKey(ct.Structure):
    _fields_ = [("comm", ct.c_char * RG_COMM_LEN)]


class PathKey(ct.Structure):
    _fields_ = [("path", ct.c_char * RG_PATH_LEN)]


class PendingKill(ct.Structure):
    _fields_ = [
        ("timestamp_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("family", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("protocol", ct.c_uint32),
        ("daddr", ct.c_uint8 * 16),
    ]


class PreventRecord(ct.Structure):
    """struct rg_event: one report of the kernel blocking or killing."""

    _fields_ = [
        ("timestamp_ns", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("tid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("kind", ct.c_uint16),
        ("family", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("action", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("daddr", ct.c_uint8 * 16),
        ("comm", ct.c_char * RG_COMM_LEN),
        ("filename", ct.c_char * RG_PATH_LEN),
    ]


# C struct name -> mirror, for the layout check
MIRRORS: dict[str, type[ct.Structure]] = {
    "rg_v4_key": V4Key,
    "rg_v6_key": V6Key,
    "rg_comm_key": CommKey,
    "rg_path_key": PathKey,
    "rg_pending_kill": PendingKill,
    "rg_event": PreventRecord,
}


class MalformedPreventRecord(ValueError):
    """A ring buffer record too short to be a struct rg_event."""


_KINDS = {
    RG_EV_BLOCKED_CONNECT: PREVENTION_BLOCKED_CONNECT,
    RG_EV_KILLED_EXEC: PREVENTION_KILLED_EXEC,
    RG_EV_KILLED_CONNECT: PREVENTION_KILLED_CONNECT,
}
_IP_VERSIONS = {socket.AF_INET: 4, socket.AF_INET6: 6}  # record family -> Endpoint.family
_PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}


def decode_prevent_record(raw: bytes) -> PreventionEvent:
    """One prevention ring buffer record -> PreventionEvent (pure)."""
    if len(raw) < ct.sizeof(PreventRecord):
        raise MalformedPreventRecord(f"short prevention event: {len(raw)} bytes")
    ev = PreventRecord.from_buffer_copy(raw[: ct.sizeof(PreventRecord)])
    version = _IP_VERSIONS.get(ev.family, 0)
    return PreventionEvent(
        kind=_KINDS.get(ev.kind, f"unknown-{ev.kind}"),
        pid=ev.pid,
        tid=ev.tid,
        uid=ev.uid,
        comm=from_bytes(ev.comm),
        cgroup_id=ev.cgroup_id,
        timestamp_ns=ev.timestamp_ns,
        family=version,
        protocol=_PROTOCOLS.get(ev.protocol, "") if version else "",
        daddr=format_address(ev.family, bytes(ev.daddr)) if version else "",
        dport=ev.dport,
        filename=from_bytes(ev.filename),
        kill_requested=bool(ev.action & RG_ACT_KILL),
    )
