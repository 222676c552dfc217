"""The handler table covers every event kind a sensor produces, and counts
each under a metrics source the exporter knows."""

from __future__ import annotations

import typing

from rome_guard.handlers.table import HANDLERS
from rome_guard.layout.sensor import SensorEvent
from rome_guard.respond.metrics import EVENT_SOURCES
from rome_guard.respond.prevent import PreventionEvent
from rome_guard.sensors.nvml import GpuSnapshot
from rome_guard.sensors.poll import Event as PollEvent


def test_every_sensor_event_kind_has_a_handler():
    kinds = {*typing.get_args(SensorEvent), *typing.get_args(PollEvent)}
    kinds |= {GpuSnapshot, PreventionEvent}
    assert kinds <= set(HANDLERS)


def test_every_counted_source_is_an_exported_label():
    sources = {h.source for h in HANDLERS.values() if h.source is not None}
    assert sources <= set(EVENT_SOURCES)


def test_wire_events_are_handled_and_counted_as_payload():
    from rome_guard.events import WireEvent
    from rome_guard.handlers.wire import on_wire

    assert HANDLERS[WireEvent] == ("payload", on_wire)
