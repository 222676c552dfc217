"""Incidents: several rule hits on one offender make one incident.

A miner launched with a pool URL, a wallet and an algorithm matches three
to six rules at once; a person reading the journal or a dashboard should
see one incident that lists every rule and reason, and the process should
be killed once. An incident is keyed by (process, category) and stays open
for a short window: rule hits on the same process in the same category
within it join the incident instead of opening another.

Pure bookkeeping: this module never writes, logs or kills.
rome_guard.respond.alerts.AlertSink turns what ``IncidentBook.file()``
returns into journal records (rome_guard.findings.incident_record) and
responses.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from rome_guard.detect.rules import KILL_SCOPES, SEVERITIES
from rome_guard.events import ProcessKey
from rome_guard.findings import Finding
from rome_guard.respond.responses import KILL

INCIDENT_WINDOW_S = 30.0
MAX_OPEN_INCIDENTS = 16384


@dataclass
class Incident:
    id: str
    process: ProcessKey
    category: str
    opened: float  # monotonic seconds
    findings: list[Finding] = field(default_factory=list)
    # the kill is done with: killed, found gone or refused as protected (a
    # kill that failed is not: the next verdict, or the retry, tries again)
    kill_settled: bool = False

    @property
    def rule_ids(self) -> list[str]:
        return [f.rule.id for f in self.findings]


@dataclass(frozen=True)
class Filed:
    """What one group of new findings did: opened an incident, or joined one."""

    incident: Incident
    findings: list[Finding]  # the new ones, primary first when opened
    opened: bool


def _rank(finding: Finding) -> tuple[int, str]:
    severity = finding.rule.severity
    order = SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)
    return (order, finding.rule.id)


def primary(findings: list[Finding]) -> Finding:
    """The finding an incident is named after: the most severe, then by id
    (so the same rule hits always name the incident the same way)."""
    return min(findings, key=_rank)


def kill_rule_finding(findings: list[Finding]) -> Finding | None:
    """Of the findings whose rule asks for a kill, the one with the widest
    kill scope (a tree kill covers a process kill)."""
    killers = [f for f in findings if f.rule.action == KILL.name]
    if not killers:
        return None
    return max(
        killers,
        key=lambda f: (
            KILL_SCOPES.index(f.rule.kill_scope) if f.rule.kill_scope in KILL_SCOPES else 0,
            -_rank(f)[0],
        ),
    )


class IncidentBook:
    """Open incidents by (process, category), each for ``window_s``."""

    def __init__(self, window_s: float = INCIDENT_WINDOW_S, limit: int = MAX_OPEN_INCIDENTS):
        self.window_s = window_s
        self.limit = limit
        self._open: OrderedDict[tuple[ProcessKey, str], Incident] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open)

    def file(self, findings: list[Finding], now: float) -> list[Filed]:
        """Group findings by (process, category) and file each group: a new
        incident, or new rules joining one opened less than window_s ago.
        Findings of a rule the incident already lists are dropped."""
        groups: dict[tuple[ProcessKey, str], list[Finding]] = {}
        for finding in findings:
            key = (finding.process.key, finding.rule.category)
            groups.setdefault(key, []).append(finding)
        filed = []
        for key, group in groups.items():
            incident = self._open.get(key)
            if incident is not None and now - incident.opened > self.window_s:
                del self._open[key]
                incident = None
            if incident is None:
                group = sorted(group, key=_rank)
                incident = Incident(uuid.uuid4().hex, key[0], key[1], now, list(group))
                self._remember(key, incident, now)
                filed.append(Filed(incident, group, opened=True))
                continue
            known = set(incident.rule_ids)
            new = [f for f in group if f.rule.id not in known]
            if new:
                incident.findings.extend(new)
                filed.append(Filed(incident, new, opened=False))
        return filed

    def _remember(self, key: tuple[ProcessKey, str], incident: Incident, now: float) -> None:
        self._open[key] = incident
        while len(self._open) > self.limit:
            self._open.popitem(last=False)
        # drop the expired ones at the front (oldest first)
        while self._open:
            first = next(iter(self._open.values()))
            if now - first.opened <= self.window_s:
                break
            self._open.popitem(last=False)
