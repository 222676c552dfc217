"""The engine: run the rule set over Subjects and return Findings.

One engine for `scan` and for the daemon. Stateless rules (``match``) are
evaluated here; stateful detectors (rome_guard.detect.stateful) feed their
conclusions back as Findings through the same Rule objects. The engine
never acts: responders decide what a Finding leads to.
"""

from __future__ import annotations

import logging

from rome_guard.detect.conditions import required_names
from rome_guard.detect.rules import Rule, RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint
from rome_guard.findings import Finding

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        process_rules = [r for r in ruleset.match_rules if not r.needs_wire]
        self._match_rules = RuleIndex(process_rules)
        self._network_rules = RuleIndex([r for r in process_rules if r.needs_network])
        self._wire_rules = RuleIndex([r for r in ruleset.match_rules if r.needs_wire])

    def evaluate(
        self, subject: Subject, trigger: Endpoint | None = None, network_only: bool = False
    ) -> list[Finding]:
        """Every match rule that subject satisfies. ``network_only``
        re-checks just the rules with network conditions (a new connect
        on a process whose other facts were already evaluated). A subject
        that carries wire facts (a flow's first bytes) is checked against
        the wire rules only: those are never evaluated without them."""
        if subject.process.kernel_thread:
            return []
        if subject.wire is not None:
            index = self._wire_rules
        elif network_only:
            index = self._network_rules
        else:
            index = self._match_rules
        findings = []
        # a subject's names are only worth computing when some rule needs them
        names = subject.names if index.by_name else frozenset()
        for rule in index.candidates(names):
            try:
                reason = rule.evaluate(subject)
            except Exception:  # a rule must never take the engine down
                log.exception("rule %s failed on pid %d", rule.id, subject.process.pid)
                continue
            if reason is not None:
                findings.append(
                    Finding(
                        rule=rule,
                        process=subject.process,
                        reason=reason,
                        lineage=tuple(subject.lineage),
                        network=_network_for(rule, subject, trigger),
                    )
                )
        return findings


class RuleIndex:
    """Rules by the names a subject must go by for them to match (see
    conditions.required_names): most rules concern one family of programs,
    and most execs are of none of them."""

    def __init__(self, rules: list[Rule]):
        self._order = {id(rule): n for n, rule in enumerate(rules)}
        self._always: list[Rule] = []
        self._by_name: dict[str, list[Rule]] = {}
        for rule in rules:
            names = required_names(rule.match)
            if names is None:
                self._always.append(rule)
            else:
                for name in names:
                    self._by_name.setdefault(name, []).append(rule)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def by_name(self) -> bool:
        """Whether any rule is indexed by name."""
        return bool(self._by_name)

    def candidates(self, names: frozenset[str]) -> list[Rule]:
        """The rules that may match a subject going by these names, in rule order."""
        picked = [rule for name in names for rule in self._by_name.get(name, ())]
        if not picked:
            return self._always
        unique = {id(rule): rule for rule in self._always + picked}
        return sorted(unique.values(), key=lambda rule: self._order[id(rule)])


def _network_for(rule: Rule, subject: Subject, trigger: Endpoint | None) -> Endpoint | None:
    if trigger is not None and (rule.needs_network or rule.needs_wire):
        return trigger
    if rule.needs_network and subject.connections:
        return subject.connections[0]
    if rule.needs_stdio:
        for fd in (0, 1, 2):
            if fd in subject.stdio and subject.stdio[fd].dport:
                return subject.stdio[fd]
    return None
