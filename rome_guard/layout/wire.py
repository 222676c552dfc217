"""ctypes mirrors of rome_guard/bpf/wire.h and decoding of its records.

The wire sensor's ring buffer carries struct wire_record; this module turns
one record's bytes into one rome_guard.events.WireEvent. Pure: no BPF, no
clock; every struct and constant is checked against the C header by the
table in rome_guard/layout/__init__.py (tests/test_layout.py). Constants
keep their C names.

Payload bytes belong to the sender and may be hostile: they stay bytes
here; strings (comm, SNI, ALPN) are decoded with textsafe.from_bytes.
"""

from __future__ import annotations

import ctypes as ct
import dataclasses
import socket
import struct
from typing import Any, TypeVar

from rome_guard import events
from rome_guard.layout.sensor import format_address
from rome_guard.textsafe import from_bytes

# --- constants of wire.h (checked against the header by the layout test) ----

WIRE_COMM_LEN = 16
WIRE_CAPTURE = 512
WIRE_SNI_MAX = 128
WIRE_ALPN_MAX = 32
WIRE_METHOD_SCAN = 512
WIRE_METHOD_MAX = 32
WIRE_STREAM_MAX = 4096
WIRE_SEGMENTS_MAX = 8
WIRE_STREAM_NS = 2_000_000_000
WIRE_WINDOW = 2 * WIRE_METHOD_SCAN

WIRE_FIRST_PAYLOAD = 1
WIRE_DNS_QUERY = 2
WIRE_DNS_ANSWER = 3
WIRE_DROPPED_CONNECT = 4
WIRE_STREAM_DATA = 5

WIRE_TLS_HELLO = 0x1
WIRE_DROPPED = 0x2
WIRE_PID_OF_FLOW = 0x4
WIRE_STREAM_END = 0x8
WIRE_PROXY_NAME = 0x10

WIRE_CUT_BYTES = 0
WIRE_CUT_SEGMENTS = 1
WIRE_CUT_TIME = 2
WIRE_CUTS = 3

WIRE_DROP_METHOD = 1
WIRE_DROP_METHOD_AGENT = 2
WIRE_DROP_SNI = 3
WIRE_DROP_ADDRESS = 4
WIRE_DROP_DNS = 5
WIRE_DROP_FLOW = 6
WIRE_DROP_PROXY = 7
WIRE_QNAME_MAX = 128

WIRE_SET_DROP_UNTIL = 0
WIRE_SET_OWNER = 1
WIRE_SETTINGS = 2

WIRE_FLOW_OPEN = 0
WIRE_FLOW_DROPPED = 1
WIRE_FLOW_ENDED = 2
WIRE_FLOW_DONE = 3

_KINDS = {
    WIRE_FIRST_PAYLOAD: events.WIRE_FIRST_PAYLOAD,
    WIRE_DNS_QUERY: events.WIRE_DNS_QUERY,
    WIRE_DNS_ANSWER: events.WIRE_DNS_ANSWER,
    WIRE_DROPPED_CONNECT: events.WIRE_DROPPED_CONNECT,
    WIRE_STREAM_DATA: events.WIRE_STREAM_DATA,
}
_DROP_REASONS = {
    WIRE_DROP_METHOD: "method",
    WIRE_DROP_SNI: "sni",
    WIRE_DROP_ADDRESS: "address",
    WIRE_DROP_DNS: "dns",
    WIRE_DROP_FLOW: "flow",
    WIRE_DROP_PROXY: "proxy",
}
# the names ("bytes" ...) of the wire_cut slots, for the metrics
CUT_REASONS = {WIRE_CUT_BYTES: "bytes", WIRE_CUT_SEGMENTS: "segments", WIRE_CUT_TIME: "time"}


class WireRecord(ct.Structure):
    _fields_ = [
        ("kind", ct.c_uint32),
        ("pid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("flags", ct.c_uint16),
        ("drop_reason", ct.c_uint16),
        ("timestamp_ns", ct.c_uint64),
        ("connect_ns", ct.c_uint64),
        ("cookie", ct.c_uint64),
        ("cgroup_id", ct.c_uint64),
        ("comm", ct.c_uint8 * WIRE_COMM_LEN),
        ("family", ct.c_uint8),
        ("protocol", ct.c_uint8),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("sni_len", ct.c_uint16),
        ("saddr", ct.c_uint8 * 16),
        ("daddr", ct.c_uint8 * 16),
        ("payload_len", ct.c_uint32),
        ("captured", ct.c_uint32),
        ("alpn_len", ct.c_uint16),
        ("segment", ct.c_uint16),
        ("offset", ct.c_uint32),
        ("sni", ct.c_uint8 * WIRE_SNI_MAX),
        ("alpn", ct.c_uint8 * WIRE_ALPN_MAX),
        ("data", ct.c_uint8 * WIRE_CAPTURE),
    ]


class WireFlow(ct.Structure):
    _fields_ = [
        ("connect_ns", ct.c_uint64),
        ("first_ns", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("comm", ct.c_uint8 * WIRE_COMM_LEN),
        ("isn", ct.c_uint32),
        ("sent", ct.c_uint32),
        ("segments", ct.c_uint16),
        ("state", ct.c_uint16),
        ("scratch", ct.c_uint32 * 2),
    ]


class WireWindow(ct.Structure):
    _fields_ = [("data", ct.c_uint8 * WIRE_WINDOW)]


# C struct name -> mirror, and the constants copied, for the layout table
MIRRORS: dict[str, type[ct.Structure]] = {
    "wire_record": WireRecord,
    "wire_flow": WireFlow,
    "wire_window": WireWindow,
}
CONSTANTS = (
    "WIRE_COMM_LEN",
    "WIRE_CAPTURE",
    "WIRE_SNI_MAX",
    "WIRE_ALPN_MAX",
    "WIRE_METHOD_SCAN",
    "WIRE_METHOD_MAX",
    "WIRE_STREAM_MAX",
    "WIRE_SEGMENTS_MAX",
    "WIRE_STREAM_NS",
    "WIRE_WINDOW",
    "WIRE_QNAME_MAX",
    "WIRE_FIRST_PAYLOAD",
    "WIRE_DNS_QUERY",
    "WIRE_DNS_ANSWER",
    "WIRE_DROPPED_CONNECT",
    "WIRE_STREAM_DATA",
    "WIRE_TLS_HELLO",
    "WIRE_DROPPED",
    "WIRE_PID_OF_FLOW",
    "WIRE_STREAM_END",
    "WIRE_PROXY_NAME",
    "WIRE_CUT_BYTES",
    "WIRE_CUT_SEGMENTS",
    "WIRE_CUT_TIME",
    "WIRE_CUTS",
    "WIRE_DROP_METHOD",
    "WIRE_DROP_METHOD_AGENT",
    "WIRE_DROP_SNI",
    "WIRE_DROP_ADDRESS",
    "WIRE_DROP_DNS",
    "WIRE_DROP_FLOW",
    "WIRE_DROP_PROXY",
    "WIRE_FLOW_OPEN",
    "WIRE_FLOW_DROPPED",
    "WIRE_FLOW_ENDED",
    "WIRE_FLOW_DONE",
    "WIRE_SET_DROP_UNTIL",
    "WIRE_SET_OWNER",
    "WIRE_SETTINGS",
)

# the decoder reads with struct (same layout, checked by the layout test)
WIRE_FORMAT = struct.Struct(
    f"=IIIHHQQQQ{WIRE_COMM_LEN}sBBHHH16s16sIIHHI{WIRE_SNI_MAX}s{WIRE_ALPN_MAX}s{WIRE_CAPTURE}s"
)
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_PROTOCOLS = {6: "tcp", 17: "udp"}


class MalformedWireRecord(ValueError):
    """A ring buffer record that does not match wire.h."""


Frozen = TypeVar("Frozen")


def _frozen(cls: type[Frozen], values: dict[str, Any]) -> Frozen:
    """cls(**values) for a frozen dataclass, every field given, without
    its generated __init__ (one object.__setattr__ per field: 4 of the
    6.6 us a record took to decode, at every record of every flow)."""
    made = object.__new__(cls)
    made.__dict__.update(values)
    return made


# the fields _frozen must be given, all of them (tests/test_layout.py holds
# the decoder to a WireEvent built by its own __init__)
ENDPOINT_FIELDS = frozenset(f.name for f in dataclasses.fields(events.Endpoint))
WIRE_EVENT_FIELDS = frozenset(f.name for f in dataclasses.fields(events.WireEvent))


def decode_wire_record(raw: bytes) -> events.WireEvent:
    """One ring buffer record -> one WireEvent (pure)."""
    if len(raw) < WIRE_FORMAT.size:
        raise MalformedWireRecord(f"wire record of {len(raw)} bytes, need {WIRE_FORMAT.size}")
    (
        kind,
        pid,
        uid,
        flags,
        drop_reason,
        ts,
        connect_ns,
        cookie,
        cgroup,
        comm,
        family,
        protocol,
        sport,
        dport,
        sni_len,
        saddr,
        daddr,
        payload_len,
        captured,
        alpn_len,
        segment,
        offset,
        sni,
        alpn,
        data,
    ) = WIRE_FORMAT.unpack_from(raw)
    if kind not in _KINDS or family not in _AF or protocol not in _PROTOCOLS:
        raise MalformedWireRecord(f"wire record kind {kind} family {family} proto {protocol}")
    if captured > WIRE_CAPTURE or sni_len > WIRE_SNI_MAX or alpn_len > WIRE_ALPN_MAX:
        raise MalformedWireRecord(f"wire record sizes {captured}/{sni_len}/{alpn_len}")
    af = socket.AF_INET if family == 4 else socket.AF_INET6
    endpoint = _frozen(
        events.Endpoint,
        {
            "proto": _PROTOCOLS[protocol],
            "family": family,
            "saddr": format_address(af, saddr),
            "sport": sport,
            "daddr": format_address(af, daddr),
            "dport": dport,
            "state": "",
            "inode": 0,
        },
    )
    named = from_bytes(sni[:sni_len]) if sni_len else ""
    return _frozen(
        events.WireEvent,
        {
            "kind": _KINDS[kind],
            "pid": pid,
            "uid": uid,
            "comm": from_bytes(comm.split(b"\0", 1)[0]),
            "cgroup_id": cgroup,
            "cookie": cookie,
            "endpoint": endpoint,
            "timestamp_ns": ts,
            "connect_ns": connect_ns,
            "payload": data[:captured],
            "payload_len": payload_len,
            "sni": "" if flags & WIRE_PROXY_NAME else named,
            "alpn": from_bytes(alpn[:alpn_len]) if alpn_len else "",
            "tls": bool(flags & WIRE_TLS_HELLO),
            "dropped": _DROP_REASONS.get(drop_reason, "") if flags & WIRE_DROPPED else "",
            "offset": offset,
            "segment": segment,
            "stream_end": bool(flags & WIRE_STREAM_END),
            "proxy_name": named if flags & WIRE_PROXY_NAME else "",
        },
    )
