"""A rule file's own examples, run as tests (`rome-guard rules test FILE`).

A rule may carry ``examples: {match: [argv, ...], no_match: [argv, ...]}``:
command lines it must match and look-alikes it must not. Each argv becomes
a process as /proc would show it (exe under /usr/bin unless argv[0] is a
path, comm its basename) and the rule is evaluated on it alone, exceptions
applied. A ``tune`` entry may add examples to the rule it tunes: they run
against the rule as tuned (appended lists and macros, exceptions, mode),
which is how a site proves its tuning. Pure: no /proc, no network, nothing
runs.
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
    response: str = "alert"  # what an enforcing daemon does on a match: alert | kill


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


def _in(location, wanted: set[str] | None) -> bool:
    return wanted is None or (location is not None and os.path.realpath(location.path) in wanted)


def concerned(ruleset: RuleSet, paths: set[str] | None = None) -> list[Rule]:
    """The rules the files ``paths`` define or tune (every rule when None;
    compared by real path)."""
    wanted = {os.path.realpath(p) for p in paths} if paths is not None else None
    return [
        rule
        for rule in ruleset.rules
        if _in(rule.location, wanted) or any(_in(at, wanted) for at in rule.tuned_at)
    ]


def disabled_by(ruleset: RuleSet, paths: set[str]) -> list[Rule]:
    """The rules those files leave out (``disable:``, ``tune: enabled: false``)."""
    wanted = {os.path.realpath(p) for p in paths}
    return [r for r in ruleset.left_out if r.disabled_at and _in(r.disabled_at, wanted)]


def run_examples(ruleset: RuleSet, paths: set[str] | None = None) -> list[ExampleResult]:
    """Every example of every rule (of rules the files ``paths`` define or
    tune only, when given)."""
    results = []
    for rule in concerned(ruleset, paths):
        results.extend(_run(rule))
    return results


def _run(rule: Rule) -> list[ExampleResult]:
    results = []
    for kind, argvs in rule.examples.items():
        for argv in argvs:
            reason = rule.evaluate(example_subject(argv))
            passed = (reason is not None) == (kind == "match")
            response = "kill" if rule.enforces else "alert"
            results.append(ExampleResult(rule.id, kind, argv, passed, reason, response))
    return results
