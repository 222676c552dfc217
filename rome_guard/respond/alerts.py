"""What happens to a finding: journal it, count it, log it, then respond.

``AlertSink`` is the one path from a Finding to the outside world: the
record (built by rome_guard.findings) goes to the journal first (fsynced
when the disk allows; printed and spooled in memory when it refuses: a
failing disk never stops a response), then counted, then logged as one
sanitised line, and only then, in enforce mode for a ``kill`` rule, handed
to the killer, whose outcome is journalled against the alert. Each (rule,
process, image) alerts once, across a restart too (``remember``: what the
previous daemon journaled).

This module never decides whether something is bad (rules do) and never
signals a process itself (the Killer does, by verified pidfd).
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Protocol

from rome_guard.events import GpuProcess, ProcessInfo, ProcessKey
from rome_guard.findings import (
    Finding,
    confirmation_record,
    event_record,
    lost_record,
    response_record,
)
from rome_guard.respond.journal import Journal
from rome_guard.respond.kill import KillResult
from rome_guard.respond.metrics import MetricsSink
from rome_guard.textsafe import command_line, one_line

log = logging.getLogger("rome_guard")

ALERTED_LIMIT = 100_000


class ProcessKiller(Protocol):
    def kill(
        self, target: ProcessInfo, scope: str = "process", descendants: Iterable[ProcessInfo] = ()
    ) -> KillResult: ...


class AlertSink:
    def __init__(
        self,
        journal: Journal,
        metrics: MetricsSink,
        mode: str,
        host: str,
        killer: ProcessKiller | None = None,
        descendants: Callable[[ProcessInfo], list[ProcessInfo]] = lambda _info: [],
    ):
        self.journal = journal
        self.metrics = metrics
        self.mode = mode
        self.host = host
        self.killer = killer
        self._descendants = descendants
        self._alerted: set[tuple[str, ProcessKey, str]] = set()
        self.raised = 0

    def remember(self, keys: Iterable[tuple[str, int, int, str]]) -> None:
        """Alerts an earlier daemon journaled, as (rule, pid, start time,
        exe): after a restart the same process image is not alerted twice."""
        for rule_id, pid, start, exe in keys:
            self._alerted.add((rule_id, ProcessKey(pid, start), exe))

    def raise_alert(self, finding: Finding) -> dict | None:
        """Journal the finding (durably), count it, then respond. None when
        this rule already alerted on this process image."""
        # once per (rule, process image): an exec into a new program under
        # the same identity (pyenv shims, wrappers) is judged afresh
        key = (finding.rule.id, finding.process.key, finding.process.exe)
        if key in self._alerted:
            return None
        if len(self._alerted) >= ALERTED_LIMIT:
            self._alerted.clear()
        self._alerted.add(key)
        rule = finding.rule
        enforce = self.mode == "enforce" and rule.action == "kill" and self.killer is not None
        action = "kill" if enforce else "alert"
        record = event_record(finding, "alert", action, self.mode, self.host)
        # handed to the journal before anything acts on it: durable when the
        # disk allows, spooled in memory when it refuses (never a reason not to act)
        self.journal.write(record)
        self.raised += 1
        self.metrics.alert(rule.id, rule.category, rule.severity, action)
        process = finding.process
        log.warning(
            "ALERT %s %s pid=%d user=%s %s: %s",
            rule.severity,
            rule.id,
            process.pid,
            one_line(process.user, 32),
            command_line(process.cmdline or (process.comm,), 160),
            one_line(finding.reason, 200),
        )
        if enforce:
            self._respond(finding, record)
        return record

    def _respond(self, finding: Finding, alert: dict) -> None:
        rule = finding.rule
        assert self.killer is not None
        descendants = self._descendants(finding.process) if rule.kill_scope == "tree" else []
        result = self.killer.kill(finding.process, rule.kill_scope, descendants)
        self.journal.write(
            response_record(alert, rule.kill_scope, result.outcome, result.reason, result.pids)
        )
        self.metrics.kill(result.outcome)
        log.warning(
            "RESPONSE %s %s pid=%d: %s %s",
            rule.id,
            rule.kill_scope,
            finding.process.pid,
            result.outcome,
            one_line(result.reason, 200),
        )

    def prevented(self, finding: Finding, action: str) -> None:
        """The kernel already blocked a connect or killed at exec: journal
        it under the rule that asked for it."""
        rule = finding.rule
        self.journal.write(event_record(finding, "prevention", action, self.mode, self.host))
        self.metrics.alert(rule.id, rule.category, rule.severity, "block")
        if action == "blocked":
            self.metrics.blocked_connection()
        else:
            self.metrics.kill("killed")
        log.warning(
            "PREVENTED %s %s pid=%d %s",
            rule.id,
            action,
            finding.process.pid,
            one_line(finding.process.comm, 32),
        )

    def confirmed(self, alert_id: str, rule_id: str, info: ProcessInfo, gpu: GpuProcess) -> None:
        self.journal.write(confirmation_record(alert_id, rule_id, info, gpu, self.host))

    def events_lost(self, lost: dict[str, int], totals: dict[str, int]) -> None:
        """Journal that events went unseen: where and how many."""
        self.journal.write(lost_record(lost, totals, self.mode, self.host))
