"""Which rules the engine even looks at (detect/engine.py RuleIndex): the
names, glob prefixes and required text of the shipped rules narrow a
benign exec to no rule at all, while every spelling a rule matches still
reaches it. The shipped-rule cases (test_shipped_rules.py) run through the
same index, so a narrowing that lost a detection would fail there too."""

from __future__ import annotations

import pytest

from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import load_rules
from tests.detect.helpers import subject, tcp


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
