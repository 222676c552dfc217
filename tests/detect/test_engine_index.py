"""Which rules the engine even looks at (detect/engine.py RuleIndex): the
names, glob prefixes and required text of the shipped rules narrow a
benign exec to no rule at all, while every spelling a rule matches still
reaches it. The shipped-rule cases (test_shipped_rules.py) run through the
same index, so a narrowing that lost a detection would fail there too."""

from __future__ import annotations

from pathlib import Path

import pytest

from rome_guard.detect.conditions import AT_ARGUMENT
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import load_rules
from tests.detect.helpers import process, subject, tcp


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_rules([]))


def candidates(engine: Engine, s) -> set[str]:
    return {rule.id for rule in engine._match_rules.candidates(s)}


@pytest.mark.parametrize(
    "argv",
    [
        ["/bin/true", "storm"],
        ["git", "status", "--porcelain"],
        ["pip", "download", "--no-deps", "torch==2.3.0"],
        ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv"],
        ["/usr/bin/make", "-j8", "all"],
    ],
)
def test_a_benign_exec_is_checked_against_no_rule(engine: Engine, argv: list[str]) -> None:
    assert candidates(engine, subject(*argv)) == set()


def test_glob_names_index_interpreters(engine: Engine) -> None:
    """python3.11 reaches the interpreter rules through the "python3*" prefix."""
    found = candidates(
        engine, subject("python3.11", "-m", "torch.distributed.run", "train.py", comm="python3.11")
    )
    assert {"shell-interpreter-oneliner", "shell-stdio-socket"} <= found
    assert not any(rule.startswith(("miner-", "tunnel-", "probe-")) for rule in found)


@pytest.mark.parametrize(
    "argv,rule",
    [
        (["/opt/x/helper", "--donate-level=1"], "miner-only-flags"),
        (["/opt/x/helper", "--donate-level", "1"], "miner-only-flags"),
        (["./w", "-o", "STRATUM+TCP://pool.example:3333"], "miner-pool-url"),
        (["./w", "--url=gulf.MoneroOcean.stream:10128"], "miner-pool-domain"),
        (["./w", "-a", "rx/0", "-o", "10.0.0.1:3333"], "miner-algorithm-and-pool"),
    ],
)
def test_required_text_lets_every_spelling_through(engine: Engine, argv, rule) -> None:
    assert rule in candidates(engine, subject(*argv))


def test_rules_needing_a_connection_wait_for_one(engine: Engine) -> None:
    bare = subject("curl", "http://169.254.169.254/latest/meta-data/")
    assert "probe-metadata-service" not in candidates(engine, bare)
    connected = subject("curl", "-s", "x", connections=[tcp("169.254.169.254", 80)])
    assert "probe-metadata-service" in candidates(engine, connected)


# What a rule's match needs is derived from its parts (conditions.Condition):
# a remote_port inside any/not/parent must neither hide the rule from an exec
# it can match nor be lost when the process connects later.
def one_rule(tmp_path: Path, match: str) -> Engine:
    path = tmp_path / "nested.yaml"
    path.write_text(
        "version: 1\nmacros:\n  to_c2: {remote_port: [4444]}\nrules:\n"
        "  - {id: nested, category: net_probe, severity: low, description: d,\n"
        f"     match: {match}}}\n"
    )
    return Engine(load_rules([str(path)], include_shipped=False))


CAN_HOLD_ON_AN_EXEC = [
    "{any: [{remote_port: 4444}, {arg: --evil}]}",
    "{any: [{macro: to_c2}, {arg: --evil}]}",
    "{all: [{arg: --evil}, {not: {remote_port: 22}}]}",
    "{arg: --evil, not: {any: [{remote_port: 22}, {remote_cidr: 10.0.0.0/8}]}}",
]


@pytest.mark.parametrize("match", CAN_HOLD_ON_AN_EXEC)
def test_a_connection_inside_any_or_not_does_not_hide_the_rule_from_an_exec(
    tmp_path: Path, match: str
) -> None:
    engine = one_rule(tmp_path, match)
    exec_ = subject("/opt/x/agent-tool", "--evil")  # just exec'd: no connections
    assert {f.rule.id for f in engine.evaluate(exec_)} == {"nested"}
    # and the kernel's exec filter sends that exec to the daemon
    assert engine.exec_needles is None or AT_ARGUMENT + "--evil" in engine.exec_needles
    assert {f.rule.id for f in engine.evaluate(subject("/opt/x/agent-tool", "--calm"))} == set()


NEEDS_A_CONNECTION = [
    "{any: [{remote_port: 4444}, {remote_cidr: 10.0.0.0/8}]}",
    "{any: [{macro: to_c2}, {all: [{arg: --evil}, {remote_port: 5555}]}]}",
    "{all: [{not: {arg: --calm}}, {macro: to_c2}]}",
]


@pytest.mark.parametrize("match", NEEDS_A_CONNECTION)
def test_a_rule_that_needs_a_connection_in_every_branch_waits_for_one(
    tmp_path: Path, match: str
) -> None:
    engine = one_rule(tmp_path, match)
    assert engine._match_rules.candidates(subject("/opt/x/agent-tool", "--evil")) == []
    # an exec of any name and command line is kept in the kernel by this rule
    assert engine.exec_needles == frozenset()
    connected = subject("/opt/x/agent-tool", "--evil", connections=[tcp("10.1.2.3", 4444)])
    assert {f.rule.id for f in engine.evaluate(connected, network_only=True)} == {"nested"}


@pytest.mark.parametrize(
    "match,arg,port",
    [
        ("{arg: --evil, not: {remote_port: 22}}", "--evil", 8080),
        ("{any: [{arg: --never}, {macro: to_c2}]}", "--calm", 4444),
        ("{parent: {name: [bash]}, any: [{arg: --never}, {remote_port: 4444}]}", "--calm", 4444),
    ],
)
def test_a_connection_nested_anywhere_rechecks_the_rule_at_a_connect(
    tmp_path: Path, match: str, arg: str, port: int
) -> None:
    engine = one_rule(tmp_path, match)
    connected = subject(
        "/opt/x/agent-tool", arg, connections=[tcp("10.1.2.3", port)], lineage=[process("bash")]
    )
    assert {f.rule.id for f in engine.evaluate(connected, network_only=True)} == {"nested"}
