"""ctypes mirrors of rome_guard/bpf/prevent.h, the in-kernel prevention's
records and map keys.

Pure: no BPF, no clock. Every struct and constant here is checked against
the C header by the table in rome_guard/layout/__init__.py
(tests/test_layout.py), without root. This module never decodes or acts;
rome_guard/respond/prevent.py turns records into PreventionEvents.
"""

from __future__ import annotations

import ctypes as ct

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
