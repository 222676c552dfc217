"""The engine: run the rule set over Subjects and return Findings.

One engine for `scan` and for the daemon. Stateless rules (``match``) are
evaluated here; stateful detectors (rome_guard.detect.stateful) feed their
conclusions back as Findings through the same Rule objects. The engine
never acts: responders decide what a Finding leads to.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from rome_guard.detect.conditions import AT_ARGUMENT, AT_ARGUMENT_OR_DASH
from rome_guard.detect.rules import Rule, RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint
from rome_guard.findings import Finding

log = logging.getLogger(__name__)

# Longer command lines skip the required-text test: on a 16 KiB argv, one
# regex search per rule costs more than evaluating the rules themselves.
TEXT_TEST_MAX = 1024


class Engine:
    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        process_rules = [r for r in ruleset.match_rules if not r.needs_wire]
        self._match_rules = RuleIndex(process_rules)
        self._network_rules = RuleIndex([r for r in process_rules if r.needs_network])
        # wire rules are few and no name narrows them: each wire event checks all
        self._wire_rules = [r for r in ruleset.match_rules if r.needs_wire]

    @property
    def exec_names(self) -> frozenset[str]:
        """Names (and "prefix*"es) of programs whose exec some indexed rule
        may alert on at once: the sensor wakes the daemon for those."""
        return self._match_rules.indexed_names

    @property
    def exec_needles(self) -> frozenset[str] | None:
        """What the command line of an exec whose names no rule indexes
        must contain for some rule to be evaluated on it (see
        RuleIndex.needles); None: every exec must be evaluated."""
        return self._match_rules.needles

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
            candidates = self._wire_rules
        else:
            index = self._network_rules if network_only else self._match_rules
            candidates = index.candidates(subject)
        findings = []
        for rule in candidates:
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
    conditions.Condition.names): most rules concern one family of programs,
    and most execs are of none of them."""

    def __init__(self, rules: list[Rule]):
        self._order = {id(rule): n for n, rule in enumerate(rules)}
        # rules no name narrows, each with what its command line must contain
        # and whether it can hold only once the process has connections
        self._always: list[tuple[Rule, re.Pattern[str] | None, bool]] = []
        self._by_name: dict[str, list[Rule]] = {}
        self._by_prefix: dict[str, list[Rule]] = {}
        needles: set[str] | None = set()
        for rule in rules:
            names = rule.match.names
            if names is None:
                text = rule.match.text
                needs_connection = rule.match.needs_connection
                self._always.append((rule, _text_test(text), needs_connection))
                if needles is not None and not needs_connection:
                    needles = None if text is None else needles | text
                continue
            for name in names:
                if name.endswith("*"):
                    self._by_prefix.setdefault(name[:-1], []).append(rule)
                else:
                    self._by_name.setdefault(name, []).append(rule)
        self._prefixes = tuple(self._by_prefix.items())
        self._prefix_test = _prefix_test(self._by_prefix)
        # an exec (no connections yet) of no indexed name is a candidate of
        # some rule only if its command line contains one of these, or is
        # longer than TEXT_TEST_MAX; None: of some rule always
        self.needles = None if needles is None else frozenset(needles)

    def __len__(self) -> int:
        return len(self._order)

    @property
    def indexed_names(self) -> frozenset[str]:
        """Every name (and "prefix*") some indexed rule requires."""
        return frozenset(self._by_name) | {prefix + "*" for prefix in self._by_prefix}

    def candidates(self, subject: Subject) -> list[Rule]:
        """The rules that may match subject, in rule order: those indexed
        under a name it goes by, and those no name narrows whose required
        text its command line contains."""
        names = subject.names
        picked = [rule for name in names for rule in self._by_name.get(name, ())]
        if self._prefix_test is not None and any(map(self._prefix_test, names)):
            for prefix, rules in self._prefixes:
                if any(name.startswith(prefix) for name in names):
                    picked += rules
        if self._always:
            text = subject.command_line
            connected = bool(subject.connections)
            if len(text) > TEXT_TEST_MAX:  # searching costs more than the rules
                picked += [rule for rule, _, needs in self._always if connected or not needs]
            else:
                text = text.lower()
                picked += [
                    rule
                    for rule, test, needs in self._always
                    if (connected or not needs) and (test is None or test.search(text))
                ]
        if len(picked) < 2:
            return picked
        unique = {id(rule): rule for rule in picked}
        return sorted(unique.values(), key=lambda rule: self._order[id(rule)])


def _prefix_test(by_prefix: dict[str, list[Rule]]) -> Callable[[str], object] | None:
    """One match for "does this name start with any indexed prefix"."""
    if not by_prefix:
        return None
    return re.compile("|".join(re.escape(p) for p in by_prefix)).match


_ANCHORS = {AT_ARGUMENT: r"(?:^|(?<=[\s=]))", AT_ARGUMENT_OR_DASH: r"(?:^|(?<=[\s=-]))"}


def _text_test(needles: frozenset[str] | None) -> re.Pattern[str] | None:
    """One search for any of needles (see conditions.Condition.text); None:
    no test, always a candidate. Anchored needles share one anchor, so most
    positions fail on the anchor before any needle is tried."""
    if needles is None:
        return None
    groups: dict[str, list[str]] = {}
    for needle in needles:
        anchor = needle[:1] if needle[:1] in _ANCHORS else ""
        groups.setdefault(anchor, []).append(re.escape(needle[len(anchor) :]))
    parts = [
        _ANCHORS.get(anchor, "") + "(?:" + "|".join(sorted(alts, key=len, reverse=True)) + ")"
        for anchor, alts in sorted(groups.items())
    ]
    return re.compile("|".join(parts))


def _network_for(rule: Rule, subject: Subject, trigger: Endpoint | None) -> Endpoint | None:
    if trigger is not None and (rule.needs_network or rule.needs_wire):
        return trigger
    if rule.needs_network and subject.connections:
        return subject.connections[0]
    if rule.needs_stdio:
        for fd in (0, 1, 2):
            if fd in subject.stdio and subject.stdio[fd].dport:
                return subject.stdio[fd]
        for relay in subject.stdio_relays:  # asked again only when the rule asked first
            return relay.socket
    return None
