"""What happens to a finding: journal it, count it, log it, then respond.

``AlertSink`` is the one path from a Finding to the outside world: the
record (built by rome_guard.findings) goes to the journal first (fsynced
when the disk allows; printed and spooled in memory when it refuses: a
failing disk never stops a response), then counted, then logged as one
sanitised line, and only then, in enforce mode for a ``kill`` rule, handed
to the killer, whose outcome is journalled against the alert. A kill
that failed is not the last word: the next verdict on the incident, and
``retry_kills`` in the daemon's housekeeping, try again. Each (rule,
process, image) counts once, across a restart too (``remember``: what the
previous daemon journaled).

Findings on one offender tree (a process and its descendants) in one
category within the incident window (rome_guard.detect.incidents) make one
incident: one ``alert`` record listing every rule and reason, later hits
as ``incident_update`` records against it, one successful kill (the
widest kill scope of its rules). Metrics count incidents and rule hits
apart.

This module never decides whether something is bad (rules do) and never
signals a process itself (the Killer does, by verified pidfd).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from rome_guard.detect.incidents import Filed, Incident, IncidentBook, kill_rule_finding, primary
from rome_guard.events import GpuProcess, ProcessInfo, ProcessKey
from rome_guard.findings import (
    Finding,
    confirmation_record,
    dropped_in_kernel,
    event_record,
    incident_record,
    lost_record,
    response_record,
)
from rome_guard.respond.journal import Journal
from rome_guard.respond.kill import ALREADY_EXITED, KILL_FAILED, KILLED, KillResult
from rome_guard.respond.metrics import MetricsSink
from rome_guard.respond.responses import ALERT, BLOCK, BLOCKED, DROP, KILL
from rome_guard.textsafe import command_line, one_line

log = logging.getLogger("rome_guard")

ALERTED_LIMIT = 100_000
KILL_RETRIES = 3  # housekeeping retries of a failed kill before it waits for a verdict


@dataclass
class _FailedKill:
    incident: Incident
    finding: Finding
    alert: dict
    retries: int


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
        self.incidents = IncidentBook()
        self._failed_kills: dict[str, _FailedKill] = {}  # incident id -> the kill to retry
        self.raised = 0  # incidents opened

    def remember(self, keys: Iterable[tuple[str, int, int, str]]) -> None:
        """Alerts an earlier daemon journaled, as (rule, pid, start time,
        exe): after a restart the same process image is not alerted twice."""
        for rule_id, pid, start, exe in keys:
            self._alerted.add((rule_id, ProcessKey(pid, start), exe))

    def raise_alert(self, finding: Finding) -> dict | None:
        """One finding (see raise_alerts); the record it was filed under,
        None when this rule already alerted on this process image."""
        records = self.raise_alerts([finding])
        return records[0] if records else None

    def raise_alerts(self, findings: Iterable[Finding]) -> list[dict]:
        """Journal the findings (durably), count them, then respond: the
        findings of one evaluation go in together, so the incident they
        open is named after the most severe. Returns the record of each
        group filed (an incident's alert, or an incident_update)."""
        fresh = []
        for finding in findings:
            # once per (rule, process image): an exec into a new program under
            # the same identity (pyenv shims, wrappers) is judged afresh
            key = (finding.rule.id, finding.process.key, finding.process.exe)
            if key in self._alerted:
                continue
            if len(self._alerted) >= ALERTED_LIMIT:
                self._alerted.clear()
            self._alerted.add(key)
            fresh.append(finding)
        if not fresh:
            return []
        return [self._file(filed) for filed in self.incidents.file(fresh, time.monotonic())]

    def _file(self, filed: Filed) -> dict:
        incident = filed.incident
        # the widest kill of every rule the incident holds: a verdict joining
        # an incident whose kill failed retries it, whatever its own action
        killer = kill_rule_finding(incident.findings, incident.process)
        enforce = (
            self.mode == "enforce"
            and killer is not None
            and self.killer is not None
            and not incident.kill_settled
        )
        # the kernel already stopped it and no kill follows (a wire drop: a
        # DNS question that never left, a flow cut at its first identified
        # segment): the record and the metrics say "drop"
        dropped = any(dropped_in_kernel(f) for f in filed.findings)
        action = KILL.name if enforce else DROP.name if dropped else ALERT.name
        lead = primary(filed.findings) if filed.opened else filed.findings[0]
        record = incident_record(
            lead,
            filed.findings,
            incident.findings,
            incident.id,
            filed.opened,
            action,
            self.mode,
            self.host,
        )
        # handed to the journal before anything acts on it: durable when the
        # disk allows, spooled in memory when it refuses (never a reason not to act)
        self.journal.write(record)
        if filed.opened:
            self.raised += 1
            self.metrics.incident(lead.rule.category, lead.rule.severity, action)
        for finding in filed.findings:
            rule = finding.rule
            self.metrics.alert(rule.id, rule.category, rule.severity, action)
        process = lead.process
        log.warning(
            "%s %s %s pid=%d user=%s %s: %s",
            "ALERT" if filed.opened else "ALERT+",
            lead.rule.severity,
            "+".join(f.rule.id for f in filed.findings),
            process.pid,
            one_line(process.user, 32),
            command_line(process.cmdline or (process.comm,), 160),
            one_line("; ".join(f.reason for f in filed.findings), 300),
        )
        if enforce:
            assert killer is not None
            self._respond(incident, killer, record)
        return record

    def _respond(self, incident: Incident, finding: Finding, alert: dict) -> None:
        """Kill for the incident, once it succeeds: the offender is its
        identity (pid, start time), whatever it exec'd into since; a failed
        kill is retried (``retry_kills``, and by the next verdict)."""
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
        # protection is judged on the live image: a protected offender that
        # execs into something else is killed by the next verdict on it
        incident.kill_settled = result.outcome in (KILLED, ALREADY_EXITED)
        if result.outcome != KILL_FAILED:
            self._failed_kills.pop(incident.id, None)
        else:
            retry = self._failed_kills.get(incident.id)
            retries = retry.retries + 1 if retry is not None else 0
            if retries <= KILL_RETRIES:
                self._failed_kills[incident.id] = _FailedKill(incident, finding, alert, retries)
            else:
                self._failed_kills.pop(incident.id, None)  # the next verdict tries again

    def retry_kills(self) -> None:
        """Kills that failed, tried again (the daemon's housekeeping, about
        once a second; KILL_RETRIES times, then only by the next verdict)."""
        for failed in list(self._failed_kills.values()):
            if not failed.incident.kill_settled:
                self._respond(failed.incident, failed.finding, failed.alert)

    def prevented(self, finding: Finding, action: str) -> None:
        """The kernel already blocked a connect or killed at exec: journal
        it under the rule that asked for it."""
        rule = finding.rule
        self.journal.write(event_record(finding, "prevention", action, self.mode, self.host))
        self.metrics.alert(rule.id, rule.category, rule.severity, BLOCK.name)
        if action == BLOCKED:
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
