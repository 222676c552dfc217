"""A rule file's own examples, run as tests (`rome-guard rules test FILE`).

A rule may carry ``examples: {match: [argv, ...], no_match: [argv, ...]}``:
command lines it must match and look-alikes it must not. Each argv becomes
a process as /proc would show it (exe under /usr/bin unless argv[0] is a
path, comm its basename) and the rule is evaluated on it alone, exceptions
applied. Pure: no /proc, no network, nothing runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rome_guard.detect.rules import Rule, RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import ProcessInfo, ProcessKey


@dataclass(frozen=True)
class ExampleResult:
    rule: str
    kind: str  # "match" | "no_match"
    argv: tuple[str, ...]
    passed: bool
    reason: str | None  # why the rule matched, when it did


def example_subject(argv: tuple[str, ...]) -> Subject:
    name = argv[0].rsplit("/", 1)[-1]
    exe = argv[0] if argv[0].startswith("/") else f"/usr/bin/{name}"
    info = ProcessInfo(
        key=ProcessKey(4242, 1000),
        ppid=1,
        uid=1000,
        user="example",
        comm=name[:15],
        exe=exe,
        cmdline=argv,
        cwd="/home/example",
        cgroup="/user.slice",
    )
    return Subject(info)


def run_examples(ruleset: RuleSet, paths: set[str] | None = None) -> list[ExampleResult]:
    """Every example of every rule (of rules defined in the files ``paths``
    only, when given; compared by real path)."""
    wanted = {os.path.realpath(p) for p in paths} if paths is not None else None
    results = []
    for rule in ruleset.rules:
        if wanted is not None and (
            rule.location is None or os.path.realpath(rule.location.path) not in wanted
        ):
            continue
        results.extend(_run(rule))
    return results


def _run(rule: Rule) -> list[ExampleResult]:
    results = []
    for kind, argvs in rule.examples.items():
        for argv in argvs:
            reason = rule.evaluate(example_subject(argv))
            passed = (reason is not None) == (kind == "match")
            results.append(ExampleResult(rule.id, kind, argv, passed, reason))
    return results
