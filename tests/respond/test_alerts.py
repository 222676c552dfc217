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
from rome_guard.respond.kill import ALREADY_EXITED, KILL_FAILED, KILLED, PROTECTED, KillResult
from rome_guard.respond.metrics import GuardMetrics, NullMetrics
from rome_guard.respond.responses import BLOCK, DROP, KILL

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


class ScriptedKiller:
    """The Killer's outcomes in a given order (the Killer itself is tested
    against real processes in test_kill.py; here: what AlertSink does with
    a kill that failed)."""

    def __init__(self, *outcomes: str):
        self.outcomes = list(outcomes)
        self.calls = 0

    def kill(self, target, scope="process", descendants=()):
        self.calls += 1
        return KillResult(self.outcomes.pop(0), "scripted")


KILL_RULE = Rule("kill-rule", "reverse_shell", "critical", "kills", action="kill")
OTHER_KILL_RULE = Rule("other-kill-rule", "reverse_shell", "high", "kills too", action="kill")
ALERT_RULE = Rule("alert-rule", "reverse_shell", "medium", "alerts only")


def test_a_failed_kill_is_retried_by_the_next_verdict_and_then_holds(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    killer = ScriptedKiller(KILL_FAILED, KILLED)
    sink = AlertSink(Journal(path), NullMetrics(), "enforce", "host", killer=killer)
    me = _me()
    sink.raise_alert(Finding(KILL_RULE, me, "first verdict"))
    # a later verdict on the same offender joins the incident: even an
    # alert-only rule's verdict retries the incident's failed kill
    update = sink.raise_alert(Finding(ALERT_RULE, me, "second verdict"))
    assert update is not None and update["event"] == "incident_update"
    assert update["action"] == "kill"
    # killed now: no third kill for the same incident
    sink.raise_alert(Finding(OTHER_KILL_RULE, me, "third verdict"))
    sink.retry_kills()
    assert killer.calls == 2
    responses = [r for r in _records(path) if r["event"] == "response"]
    assert [r["action"] for r in responses] == [KILL_FAILED, KILLED]


def test_a_failed_kill_is_retried_without_a_new_verdict(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    killer = ScriptedKiller(KILL_FAILED, KILL_FAILED, ALREADY_EXITED)
    sink = AlertSink(Journal(path), NullMetrics(), "enforce", "host", killer=killer)
    sink.raise_alert(Finding(KILL_RULE, _me(), "verdict"))
    sink.retry_kills()
    sink.retry_kills()
    sink.retry_kills()  # settled (gone) after the second retry: not tried again
    assert killer.calls == 3


def test_a_protected_offender_is_judged_again_by_the_next_verdict_only(tmp_path):
    """Protection is a property of the live image: the next verdict asks
    again (an offender that exec'd out of a protected program is killed),
    housekeeping does not retry."""
    path = str(tmp_path / "alerts.jsonl")
    killer = ScriptedKiller(PROTECTED, KILLED)
    sink = AlertSink(Journal(path), NullMetrics(), "enforce", "host", killer=killer)
    me = _me()
    sink.raise_alert(Finding(KILL_RULE, me, "verdict"))
    sink.retry_kills()
    assert killer.calls == 1
    sink.raise_alert(Finding(ALERT_RULE, me, "after its exec"))
    assert killer.calls == 2


def test_a_finding_the_kernel_dropped_is_journaled_and_counted_as_a_drop(tmp_path):
    """The wire programs dropped the DNS question (or the flow's segment)
    themselves: the alert says ``drop``, and counts under the ``drop``
    action; a kill rule's finding on a dropped flow still says ``kill`` (a
    kill follows, and its ``wire.dropped`` says what the kernel did)."""
    path = str(tmp_path / "alerts.jsonl")
    metrics = GuardMetrics()
    killer = ScriptedKiller(KILLED)
    sink = AlertSink(Journal(path), metrics, "enforce", "host", killer=killer)
    me = _me()
    question = {"wire": {"kind": "dns_query", "dropped": "dns"}}
    assert sink.raise_alert(Finding(ALERT_RULE, me, "dns", extra=question))["action"] == DROP.name
    other = procfs.read_process(os.getppid())
    assert other is not None
    login = {"wire": {"kind": "first_payload", "dropped": "method"}}
    assert sink.raise_alert(Finding(KILL_RULE, other, "login", extra=login))["action"] == KILL.name
    assert killer.calls == 1

    def hits(rule: Rule, action: str):
        labels = {"rule": rule.id, "category": rule.category, "severity": rule.severity}
        return metrics.registry.get_sample_value(
            "rome_guard_alerts_total", {**labels, "action": action}
        )

    assert hits(ALERT_RULE, DROP.name) == 1 and not hits(ALERT_RULE, BLOCK.name)
    assert hits(KILL_RULE, KILL.name) == 1
    assert [r["action"] for r in _records(path) if r["event"] == "alert"] == ["drop", "kill"]
