"""A rule file's own examples, run as tests (`rome-guard rules test FILE`).

A rule may carry ``examples: {match: [argv, ...], no_match: [argv, ...]}``:
command lines it must match and look-alikes it must not. Each argv becomes
a process as /proc would show it (exe under /usr/bin unless argv[0] is a
path, comm its basename) and the rule is evaluated on it alone, exceptions
applied. An example may be ``{argv: [...], stdio_relay: [...]}``: the
process is then driven through pipes by a parent running stdio_relay that
holds a connection (for ``stdio_relay`` rules). Pure: no /proc, no network,
nothing runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rome_guard.detect.rules import Rule, RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint, ProcessInfo, ProcessKey
from rome_guard.state.stdio import Relay


@dataclass(frozen=True)
class ExampleResult:
    rule: str
    kind: str  # "match" | "no_match"
    argv: tuple[str, ...]
    passed: bool
    reason: str | None  # why the rule matched, when it did


def _example_process(argv: tuple[str, ...], pid: int, ppid: int) -> ProcessInfo:
    name = argv[0].rsplit("/", 1)[-1]
    exe = argv[0] if argv[0].startswith("/") else f"/usr/bin/{name}"
    return ProcessInfo(
        key=ProcessKey(pid, 1000),
        ppid=ppid,
        uid=1000,
        user="example",
        comm=name[:15],
        exe=exe,
        cmdline=argv,
        cwd="/home/example",
        cgroup="/user.slice",
    )


def example_subject(argv: tuple[str, ...], stdio_relay: tuple[str, ...] = ()) -> Subject:
    """argv as a process; with stdio_relay, driven through pipes by its
    parent running stdio_relay, connected to 10.0.0.1:4444."""
    info = _example_process(argv, 4242, 4241 if stdio_relay else 1)
    if not stdio_relay:
        return Subject(info)
    relay = Relay(
        _example_process(stdio_relay, 4241, 1),
        Endpoint("tcp", 4, "10.0.0.2", 51000, "10.0.0.1", 4444, "ESTABLISHED"),
        ("pipe",),
        ("pipe",),
    )
    return Subject(info, stdio_relays=lambda: [relay])


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
    for kind, examples in rule.examples.items():
        for example in examples:
            reason = rule.evaluate(example_subject(example.argv, example.stdio_relay))
            passed = (reason is not None) == (kind == "match")
            results.append(ExampleResult(rule.id, kind, example.argv, passed, reason))
    return results
