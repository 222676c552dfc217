"""AlertSink's issue-12 duties in the issue-9 structure: an alert the
previous daemon journaled is not raised again after a restart (read back
with journal.recent_alerts), and lost events are journaled as one
events_lost record."""

from __future__ import annotations

import json
import os

from rome_guard import procfs
from rome_guard.detect.rules import Rule
from rome_guard.findings import Finding
from rome_guard.respond.alerts import AlertSink
from rome_guard.respond.journal import Journal, recent_alerts
from rome_guard.respond.metrics import NullMetrics

RULE = Rule("test-rule", "mining", "high", "a test rule")


def _me():
    info = procfs.read_process(os.getpid())
    assert info is not None
    return info


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_a_restart_does_not_alert_again_on_what_the_previous_daemon_journaled(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    me = _me()
    first = AlertSink(Journal(path), NullMetrics(), "monitor", "host")
    assert first.raise_alert(Finding(RULE, me, "matched")) is not None
    assert first.raise_alert(Finding(RULE, me, "matched")) is None  # once per process
    first.journal.close()

    restarted = AlertSink(Journal(path), NullMetrics(), "monitor", "host")
    restarted.remember(recent_alerts(path, "monitor"))
    assert restarted.raise_alert(Finding(RULE, me, "matched")) is None
    assert restarted.raised == 0
    # in another mode the earlier alert does not count: judged and acted on again
    other = AlertSink(Journal(path), NullMetrics(), "enforce", "host")
    other.remember(recent_alerts(path, "enforce"))
    assert other.raise_alert(Finding(RULE, me, "matched")) is not None
    assert [r["event"] for r in _records(path)] == ["alert", "alert"]


def test_lost_events_are_journaled_per_ring_with_the_totals(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    sink = AlertSink(Journal(path), NullMetrics(), "enforce", "host-a")
    sink.events_lost({"process": 12, "parked": 1}, {"process": 40, "network": 3, "parked": 1})
    (record,) = _records(path)
    assert record["event"] == "events_lost"
    assert record["lost"] == {"process": 12, "parked": 1}
    assert record["totals"] == {"process": 40, "network": 3, "parked": 1}
    assert record["host"] == "host-a" and record["mode"] == "enforce"
    assert record["id"] and record["time"]
