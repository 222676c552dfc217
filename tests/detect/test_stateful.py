"""The fanout (internal probing) detector, as pure logic."""

from __future__ import annotations

import random

import pytest

from rome_guard.detect.rules import load_rules
from rome_guard.detect.stateful import FanoutDetector, _History
from rome_guard.events import CONNECT_ATTEMPT, CONNECT_ESTABLISHED, CONNECT_REFUSED
from tests.detect.helpers import process


@pytest.fixture
def detector() -> FanoutDetector:
    return FanoutDetector(load_rules([]).get("probe-fanout"))


def feed(detector, info, targets, outcome, parent=None, start=0.0, step=0.01):
    verdicts = []
    for i, (daddr, dport) in enumerate(targets):
        verdicts += detector.observe(info, parent, daddr, dport, outcome, now=start + i * step)
    return verdicts


def test_port_scan_fires_once_on_the_scanner(detector) -> None:
    scanner = process("python3", "scan.py")
    verdicts = feed(detector, scanner, [("10.0.0.5", p) for p in range(1, 200)], CONNECT_REFUSED)
    assert len(verdicts) == 1
    verdict, blamed = verdicts[0]
    assert blamed is scanner and "15 ports on 10.0.0.5" in verdict.reason


def test_sweep_fires_on_destinations(detector) -> None:
    verdicts = feed(
        detector, process("x"), [(f"10.0.1.{h}", 22) for h in range(1, 255)], CONNECT_REFUSED
    )
    assert len(verdicts) == 1 and "25 destinations" in verdicts[0][0].reason


def test_patient_sweep_over_minutes_fires(detector) -> None:
    """Zeek's scan.zeek thresholds: 40 refused connects to 40 hosts on port
    22, one every 5 s (over three minutes), is a sweep."""
    verdicts = feed(
        detector,
        process("python3", "sweep.py"),
        [(f"10.0.3.{h}", 22) for h in range(1, 41)],
        CONNECT_REFUSED,
        step=5.0,
    )
    assert len(verdicts) == 1 and "25 destinations in 300s" in verdicts[0][0].reason


def test_patient_port_probe_of_one_host_fires(detector) -> None:
    verdicts = feed(
        detector,
        process("python3", "probe.py"),
        [
            ("10.0.3.9", p)
            for p in (
                21,
                22,
                23,
                25,
                80,
                110,
                135,
                139,
                143,
                443,
                445,
                993,
                995,
                1723,
                3306,
                3389,
                5900,
                8080,
            )
        ],
        CONNECT_REFUSED,
        step=10.0,
    )
    assert len(verdicts) == 1 and "15 ports on 10.0.3.9" in verdicts[0][0].reason


def test_single_port_health_check_loop_is_quiet(detector) -> None:
    """until nc -z master 29500; do sleep 1; done: hundreds of refusals, one
    destination port."""
    loop = process("bash", "-c", "until nc -z master 29500; do sleep 1; done", pid=300)
    verdicts = []
    for attempt in range(600):
        child = process("nc", "-z", "10.0.4.1", "29500", pid=10_000 + attempt)
        verdicts += detector.observe(child, loop, "10.0.4.1", 29500, CONNECT_REFUSED, attempt)
    assert verdicts == []


def test_ddp_rendezvous_of_64_peers_is_quiet(detector) -> None:
    """A rank connecting to 63 peers on one port (and to the master's store,
    refused while it starts): successful fan-out, one failing destination."""
    rank = process("python3", "-m", "torch.distributed.run", "train.py")
    verdicts = feed(detector, rank, [("10.0.5.1", 29500)] * 20, CONNECT_REFUSED)
    verdicts += feed(
        detector, rank, [(f"10.0.5.{h}", 29500) for h in range(1, 65)], CONNECT_ESTABLISHED
    )
    verdicts += feed(
        detector, rank, [(f"10.0.5.{h}", 40000 + h) for h in range(1, 65)], CONNECT_ESTABLISHED
    )
    assert verdicts == []


def test_successful_rendezvous_fan_out_is_quiet(detector) -> None:
    trainer = process("torchrun")
    assert (
        feed(
            detector, trainer, [(f"10.0.2.{h}", 29500) for h in range(1, 255)], CONNECT_ESTABLISHED
        )
        == []
    )
    assert (
        feed(detector, trainer, [("10.0.2.1", p) for p in range(29500, 29600)], CONNECT_ESTABLISHED)
        == []
    )


def test_attempts_without_outcome_do_not_count(detector) -> None:
    assert (
        feed(detector, process("x"), [("10.0.0.5", p) for p in range(1, 500)], CONNECT_ATTEMPT)
        == []
    )


def test_loop_of_short_lived_children_is_blamed_on_the_parent(detector) -> None:
    loop = process("bash", "-c", "for p in ...", pid=100)
    verdicts = []
    for port in range(1, 80):
        child = process("bash", pid=1000 + port)  # one subshell per probe
        verdicts += detector.observe(
            child, loop, "10.0.0.9", port, CONNECT_REFUSED, now=port * 0.01
        )
    assert [blamed.pid for _, blamed in verdicts] == [100]


def test_window_expiry_forgets_old_attempts(detector) -> None:
    info = process("x")
    feed(detector, info, [("10.0.0.5", p) for p in range(1, 12)], CONNECT_REFUSED, start=0)
    # 11 more ports long after the window: never 15 in one window
    assert (
        feed(detector, info, [("10.0.0.5", p) for p in range(20, 31)], CONNECT_REFUSED, start=1000)
        == []
    )


def test_incremental_scores_equal_a_recount() -> None:
    rng = random.Random(7)
    history = _History()
    for step in range(5000):
        history.add(
            step, f"10.0.0.{rng.randint(1, 30)}", rng.randint(1, 40), rng.choice([0.25, 1.0])
        )
        history.expire(step, window=300, cap=10_000)
        if step % 500 == 0:
            best: dict = {}
            for _t, daddr, dport, weight in history.attempts:
                best[(daddr, dport)] = max(best.get((daddr, dport), 0), weight)
            per_destination: dict = {}
            for (daddr, _port), weight in best.items():
                per_destination[daddr] = max(per_destination.get(daddr, 0), weight)
                assert history.port_score[daddr] == sum(
                    w for (d, _), w in best.items() if d == daddr
                )
            assert history.destination_score == sum(per_destination.values())
