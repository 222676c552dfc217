"""Fuzzing the ring-record decoders (Hypothesis): any bytes the kernel (or
a bug) puts in a ring give an event or MalformedRecord / ValueError, never
another exception; a malformed record is counted and skipped, not fatal."""

from __future__ import annotations

import contextlib
import struct
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from rome_guard.events import (
    ConnectEvent,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    GpuOpenEvent,
    PreventionEvent,
)
from rome_guard.layout.prevent import decode_prevent_record
from rome_guard.layout.sensor import (
    RECORD_CONNECT,
    RECORD_EXEC,
    RECORD_EXIT,
    RECORD_FORK,
    RECORD_GPU_OPEN,
    MalformedRecord,
    decode_record,
)

FUZZ = settings(max_examples=2000, deadline=None)
EVENTS = (ExecEvent, ForkEvent, ExitEvent, ConnectEvent, GpuOpenEvent)
TYPES = st.sampled_from(
    [RECORD_EXEC, RECORD_FORK, RECORD_EXIT, RECORD_CONNECT, RECORD_GPU_OPEN, 0, 99]
)


@FUZZ
@given(st.binary(max_size=64))
def test_short_or_random_records(raw: bytes) -> None:
    with contextlib.suppress(MalformedRecord):
        assert isinstance(decode_record(raw), EVENTS)


@FUZZ
@given(TYPES, st.binary(min_size=40, max_size=700))
def test_records_with_a_known_type_and_random_body(record_type: int, body: bytes) -> None:
    raw = record_type.to_bytes(4, sys.byteorder) + body
    try:
        event = decode_record(raw)
    except MalformedRecord:
        return
    assert isinstance(event, EVENTS)
    if isinstance(event, ExecEvent):  # argv stays text, whatever the bytes
        assert all(isinstance(arg, str) for arg in event.argv)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=600))
def test_exec_records_with_lying_sizes(args_size: int, name_size: int, tail: bytes) -> None:
    head = struct.pack("=IIIIQQ16sIIIIIIIIQ", RECORD_EXEC, 1, 1, 0, 0, 0, b"x", 0, 0, 3, 0,
                       args_size, name_size, 0, 0, 0)  # fmt: skip
    with contextlib.suppress(MalformedRecord):
        assert isinstance(decode_record(head + tail), ExecEvent)


@FUZZ
@given(st.binary(max_size=400))
def test_prevention_records(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(decode_prevent_record(raw), PreventionEvent)
