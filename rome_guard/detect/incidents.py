"""Incidents: several rule hits on one offender make one incident.

A miner launched with a pool URL, a wallet and an algorithm matches three
to six rules at once; a reverse shell's every subshell and command has
the network on its stdio. A person reading the journal or a dashboard
should see one incident per attack that lists every rule and reason, and
the offender should be killed once. An incident is opened for (offender,
category) and stays open while hits keep coming (``window_s`` after the
latest): a hit in the same category on the offender *or on one of its
descendants* (``Finding.lineage`` names the offender) joins it instead of
opening another, and so does a hit on an *ancestor* of the offender, which
then becomes the incident's offender (its tree holds the first one).
Unrelated processes that merely share an ancestor (the agent's tool
runner, sshd, systemd) are never joined: only an alerted process roots a
tree.

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

INCIDENT_WINDOW_S = 30.0
MAX_OPEN_INCIDENTS = 16384


@dataclass
class Incident:
    id: str
    process: ProcessKey  # the offender: every process of its tree joins
    category: str
    opened: float  # monotonic seconds
    findings: list[Finding] = field(default_factory=list)
    # the kill is done with: killed, or found gone (one that failed, or was
    # refused as protected, is not: the next verdict tries again, and a
    # failed one is retried by the daemon's housekeeping)
    kill_settled: bool = False
    last: float = 0.0  # monotonic seconds of the latest hit
    # the offender's ancestors: a later hit on one of them re-roots the incident there
    ancestors: tuple[ProcessKey, ...] = ()

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


def kill_rule_finding(
    findings: list[Finding], offender: ProcessKey | None = None
) -> Finding | None:
    """Of the findings whose rule asks for a kill (and is not staged in
    ``mode: monitor``), the one with the widest kill scope (a tree kill
    covers a process kill), on the offender itself (the root of the
    incident's tree) when one of its own asks."""
    killers = [f for f in findings if f.rule.enforces]
    if not killers:
        return None
    return max(
        killers,
        key=lambda f: (
            f.process.key == offender,
            KILL_SCOPES.index(f.rule.kill_scope) if f.rule.kill_scope in KILL_SCOPES else 0,
            -_rank(f)[0],
        ),
    )


class IncidentBook:
    """Open incidents by (offender, category), each until ``window_s``
    after its latest hit."""

    def __init__(self, window_s: float = INCIDENT_WINDOW_S, limit: int = MAX_OPEN_INCIDENTS):
        self.window_s = window_s
        self.limit = limit
        self._open: OrderedDict[tuple[ProcessKey, str], Incident] = OrderedDict()
        # (ancestor of an offender, category) -> its incident
        self._above: dict[tuple[ProcessKey, str], Incident] = {}

    def __len__(self) -> int:
        return len(self._open)

    def file(self, findings: list[Finding], now: float) -> list[Filed]:
        """Group findings by the incident they belong to and file each
        group: a new incident, or new rules joining an open one (on the
        offender, a descendant, or an ancestor that becomes the offender).
        Findings of a rule the incident already lists on the same process
        are dropped."""
        self._expire(now)
        groups: dict[tuple[ProcessKey, str], list[Finding]] = {}
        for finding in findings:
            key = (finding.process.key, finding.rule.category)
            groups.setdefault(key, []).append(finding)
        filed = []
        for key, group in groups.items():
            incident = self._incident_of(group[0], key, now)
            if incident is None:
                group = sorted(group, key=_rank)
                lead = group[0]
                incident = Incident(
                    uuid.uuid4().hex,
                    key[0],
                    key[1],
                    now,
                    list(group),
                    last=now,
                    ancestors=tuple(p.key for p in lead.lineage),
                )
                self._remember(key, incident)
                filed.append(Filed(incident, group, opened=True))
                continue
            known = {(f.rule.id, f.process.key) for f in incident.findings}
            new = [f for f in group if (f.rule.id, f.process.key) not in known]
            if new:
                incident.findings.extend(new)
                incident.last = now
                filed.append(Filed(incident, new, opened=False))
        return filed

    def _incident_of(
        self, finding: Finding, key: tuple[ProcessKey, str], now: float
    ) -> Incident | None:
        """The open incident finding joins: its process's own, an
        ancestor's (the finding is in that offender's tree), or one whose
        offender it is an ancestor of (re-rooted here)."""
        category = key[1]
        incident = self._open.get(key)
        if incident is not None:
            return incident
        for ancestor in finding.lineage:
            incident = self._open.get((ancestor.key, category))
            if incident is not None:
                return incident
        incident = self._above.get(key)
        if incident is None or self._open.get((incident.process, category)) is not incident:
            return None
        # the new offender is above the old one: its tree holds the first
        del self._open[(incident.process, category)]
        incident.process = key[0]
        incident.ancestors = tuple(p.key for p in finding.lineage)
        incident.kill_settled = False  # the wider tree has not been killed
        self._remember(key, incident)
        return incident

    def _remember(self, key: tuple[ProcessKey, str], incident: Incident) -> None:
        self._open[key] = incident
        for ancestor in incident.ancestors:
            self._above[(ancestor, key[1])] = incident
        while len(self._open) > self.limit:
            self._open.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Forget incidents whose latest hit is older than the window."""
        expired = [k for k, i in self._open.items() if now - i.last > self.window_s]
        for key in expired:
            del self._open[key]
        if expired or len(self._above) > self.limit * 8:
            live = set(map(id, self._open.values()))
            self._above = {k: i for k, i in self._above.items() if id(i) in live}
