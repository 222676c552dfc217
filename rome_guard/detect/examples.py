"""A rule file's own examples, run as tests (`rome-guard rules test FILE`).

A rule may carry ``examples: {match: [...], no_match: [...]}``: processes
it must match and look-alikes it must not. Each example is an argv, or a
mapping with the argv and what else the process holds (rules.Example: its
exe path, TCP connections, socket stdio, ancestors, files it names, the
first bytes of a new flow, a ``stdio_relay``: a process feeding its
stdin and reading its stdout through pipes while holding its own
``connect`` peers). It becomes a process as /proc and the sensors
would show it and the rule is evaluated on it alone, exceptions applied.
A ``tune`` entry may add examples to the rule it tunes: they run
against the rule as tuned (appended lists and macros, exceptions, mode),
which is how a site proves its tuning. Pure: no /proc, no network, nothing
runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rome_guard.detect.payload import WireFacts, facts_for
from rome_guard.detect.rules import Example, Rule, RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint, ProcessInfo, ProcessKey
from rome_guard.respond.responses import ALERT
from rome_guard.state.stdio import Relay


@dataclass(frozen=True)
class ExampleResult:
    rule: str
    kind: str  # "match" | "no_match"
    argv: tuple[str, ...]
    passed: bool
    reason: str | None  # why the rule matched, when it did
    response: str = ALERT.name  # what an enforcing daemon does on a match: alert | kill


def _process(example: Example, pid: int) -> ProcessInfo:
    argv = example.argv
    name = argv[0].rsplit("/", 1)[-1]
    exe = example.exe or (argv[0] if argv[0].startswith("/") else f"/usr/bin/{name}")
    return ProcessInfo(
        key=ProcessKey(pid, 1000),
        ppid=pid - 1,
        uid=1000,
        user="example",
        comm=name[:15],
        exe=exe,
        cmdline=argv,
        cwd="/home/example",
        cgroup="/user.slice",
    )


def _peer(text: str, state: str = "ESTABLISHED") -> Endpoint:
    address, port = text.rsplit(":", 1)
    address = address.strip("[]")
    family = 6 if ":" in address else 4
    local = "::1" if family == 6 else "10.0.0.2"
    return Endpoint("tcp", family, local, 40000, address, int(port), state, inode=1)


def _stdio(example: Example) -> dict[int, Endpoint]:
    return {fd: _peer(example.stdio) for fd in (0, 1, 2)} if example.stdio else {}


def _wire(example: Example) -> WireFacts | None:
    """The flow's first bytes, parsed as the daemon parses a capture."""
    if not example.on_the_wire:
        return None
    if example.dns_query:
        return WireFacts(dns_queries=tuple(q.lower() for q in example.dns_query))
    port = _peer(example.connect[0]).dport if example.connect else 443
    return facts_for(
        example.payload.encode("utf-8"),
        "tcp",
        port,
        sni=example.sni,
        remote_name=example.remote_name,
    )


def example_subject(example: Example | tuple[str, ...]) -> Subject:
    """A process as /proc and the sensors would show it: exe under /usr/bin
    unless argv[0] is a path (or ``exe`` says), comm its basename; with the
    example's connections, socket stdio, ancestors, readable files and the
    first bytes of a flow when it gives them."""
    if not isinstance(example, Example):
        example = Example(tuple(example))
    lineage = [_process(p, 4241 - i) for i, p in enumerate(example.parents)]
    by_pid = {4241 - i: p for i, p in enumerate(example.parents)}
    files = dict(example.files)

    def read(_process: ProcessInfo, path: str) -> str:
        return files.get(path, "")

    return Subject(
        _process(example, 4242),
        lineage,
        [_peer(c) for c in example.connect],
        _stdio(example),
        stdio_of=lambda info: _stdio(by_pid[info.pid]) if info.pid in by_pid else {},
        read_config=read,
        wire=_wire(example),
        stdio_relays=lambda: _relays(example),
    )


def _relays(example: Example) -> list[Relay]:
    """The example's stdio relay (pid 4240), through pipes both ways, with
    its first connection (10.0.0.1:4444 when it names none)."""
    relay = example.stdio_relay
    if relay is None:
        return []
    peer = _peer(relay.connect[0] if relay.connect else "10.0.0.1:4444")
    return [Relay(_process(relay, 4240), peer, ("pipe",), ("pipe",))]


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
    for kind, examples in rule.examples.items():
        for example in examples:
            argv = example.argv
            reason = rule.evaluate(example_subject(example))
            passed = (reason is not None) == (kind == "match")
            response = rule.enforce_response
            results.append(ExampleResult(rule.id, kind, argv, passed, reason, response))
    return results
