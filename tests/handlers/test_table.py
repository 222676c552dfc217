"""The handler table covers every event kind a sensor produces, and counts
each under a metrics source the exporter knows."""

from __future__ import annotations

import typing

from rome_guard.events import GpuSnapshot, PreventionEvent
from rome_guard.handlers.table import HANDLERS
from rome_guard.layout.sensor import SensorEvent
from rome_guard.respond.metrics import EVENT_SOURCES
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


def test_a_handler_that_raises_drops_its_event_never_the_guard(tmp_path, monkeypatch, caplog):
    """A bug that one crafted event trips costs that event, counted as lost
    ("failed", journaled and exported like ring losses), not the guard:
    the next event is still judged and alerted."""
    import json

    from rome_guard.config import Config
    from rome_guard.daemon import Guard
    from rome_guard.detect.rules import load_rules
    from rome_guard.events import RenameEvent
    from rome_guard.handlers import table
    from rome_guard.respond.journal import Journal
    from tests.detect.helpers import subject

    def broken(_ctx, _event):
        raise ValueError("a bug \n with a forged line")

    monkeypatch.setitem(table.HANDLERS, RenameEvent, table.Handler("rename", broken))
    journal = tmp_path / "alerts.jsonl"
    guard = Guard(Config(), load_rules([]), Journal(str(journal)))
    event = RenameEvent.__new__(RenameEvent)  # its fields are never read by the broken handler
    guard.handle(event)
    guard.handle(event)
    assert guard.ctx.failed_events == 2
    failures = [r for r in caplog.records if "failed, event dropped" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info and not failures[1].exc_info
    assert all("\n" not in r.getMessage() for r in failures)
    # the guard goes on: a miner judged after the failures is alerted
    miner = subject("xmrig", "-o", "stratum+tcp://10.0.0.9:3333")
    guard.ctx.alerts.raise_alerts(guard.ctx.rules.engine.evaluate(miner))
    records = [json.loads(line) for line in journal.read_text().splitlines()]
    assert any(r["event"] == "alert" for r in records)
