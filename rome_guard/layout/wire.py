"""ctypes mirrors of rome_guard/bpf/wire.h, the wire sensor's ring record
and its per-flow map value.

Pure: no BPF, no clock. Every struct and constant here is checked against
the C header by the table in rome_guard/layout/__init__.py
(tests/test_layout.py), without root. Names are the header's;
rome_guard/sensors/wire.py decodes records into WireEvents.

Unlike sensor.h and prevent.h, a wire record's ``family`` is the IP
version (4 or 6), as the packet says, not AF_INET/AF_INET6; ``pid`` is the
thread-group id, as in both.
"""

from __future__ import annotations

import ctypes as ct

WIRE_COMM_LEN = 16
WIRE_CAPTURE = 512
WIRE_SNI_MAX = 128
WIRE_ALPN_MAX = 32
WIRE_METHOD_SCAN = 256
WIRE_METHOD_MAX = 32
WIRE_QNAME_MAX = 128

# record kinds
WIRE_FIRST_PAYLOAD = 1
WIRE_DNS_QUERY = 2
WIRE_DNS_ANSWER = 3
WIRE_DROPPED_CONNECT = 4

# record flags
WIRE_TLS_HELLO = 0x1
WIRE_DROPPED = 0x2
WIRE_PID_AT_CONNECT = 0x4

# drop reasons (and drop map values)
WIRE_DROP_METHOD = 1
WIRE_DROP_METHOD_AGENT = 2
WIRE_DROP_SNI = 3
WIRE_DROP_ADDRESS = 4
WIRE_DROP_DNS = 5

# settings slots
WIRE_SET_DROP_UNTIL = 0
WIRE_SET_OWNER = 1
WIRE_SETTINGS = 2

CONSTANTS = (
    "WIRE_COMM_LEN",
    "WIRE_CAPTURE",
    "WIRE_SNI_MAX",
    "WIRE_ALPN_MAX",
    "WIRE_METHOD_SCAN",
    "WIRE_METHOD_MAX",
    "WIRE_QNAME_MAX",
    "WIRE_FIRST_PAYLOAD",
    "WIRE_DNS_QUERY",
    "WIRE_DNS_ANSWER",
    "WIRE_DROPPED_CONNECT",
    "WIRE_TLS_HELLO",
    "WIRE_DROPPED",
    "WIRE_PID_AT_CONNECT",
    "WIRE_DROP_METHOD",
    "WIRE_DROP_METHOD_AGENT",
    "WIRE_DROP_SNI",
    "WIRE_DROP_ADDRESS",
    "WIRE_DROP_DNS",
    "WIRE_SET_DROP_UNTIL",
    "WIRE_SET_OWNER",
    "WIRE_SETTINGS",
)


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
        ("_pad1", ct.c_uint16),
        ("_pad2", ct.c_uint32),
        ("sni", ct.c_uint8 * WIRE_SNI_MAX),
        ("alpn", ct.c_uint8 * WIRE_ALPN_MAX),
        ("data", ct.c_uint8 * WIRE_CAPTURE),
    ]


class WireFlow(ct.Structure):
    _fields_ = [
        ("connect_ns", ct.c_uint64),
        ("pid", ct.c_uint32),
        ("uid", ct.c_uint32),
        ("comm", ct.c_uint8 * WIRE_COMM_LEN),
    ]


# C struct name -> mirror, for the layout table
MIRRORS: dict[str, type[ct.Structure]] = {"wire_record": WireRecord, "wire_flow": WireFlow}
