"""The fanout (internal probing) detector, as pure logic."""

from __future__ import annotations

import random

import pytest

from rome_guard.detect.rules import load_rules
from rome_guard.detect.stateful import ACTOR_PARENT, ACTOR_PROCESS, FanoutDetector, _History
from rome_guard.events import CONNECT_ATTEMPT, CONNECT_ESTABLISHED, CONNECT_REFUSED, ProcessKey
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


def test_tcp_attempts_without_outcome_do_not_count(detector) -> None:
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
    assert verdicts[0][0].actor == {"kind": ACTOR_PARENT, "id": str(loop.key)}


def test_a_scanner_is_blamed_alone_never_its_parent(detector) -> None:
    """A Python script scanning 80 hosts, run by the agent's shell: one
    verdict, on the script; the shell is not an actor for what the script
    did by itself, before or after it crossed the threshold."""
    shell = process("bash", "-c", "python3 scan.py", pid=200)
    scanner = process("python3", "scan.py", pid=201)
    verdicts = feed(
        detector, scanner, [(f"10.0.8.{h}", 22) for h in range(1, 81)], CONNECT_REFUSED, shell
    )
    assert [(v.actor_kind, blamed.pid) for v, blamed in verdicts] == [(ACTOR_PROCESS, 201)]
    # the shell's other short-lived children later: the script's 80 do not count for it
    for h in range(1, 20):
        child = process("nc", pid=300 + h)
        verdicts += detector.observe(child, shell, f"10.0.9.{h}", 22, CONNECT_REFUSED, now=5 + h)
    assert [blamed.pid for _, blamed in verdicts] == [201]


def test_a_containers_processes_together_are_the_container(detector) -> None:
    """Two long-lived workers of one container, 15 hosts each: neither is a
    scanner alone, the container is (named by the process that crossed)."""
    one = process("python3", "a.py", pid=401, container="c" * 64)
    two = process("python3", "b.py", pid=402, container="c" * 64)
    verdicts = feed(detector, one, [(f"10.0.10.{h}", 22) for h in range(15)], CONNECT_REFUSED)
    verdicts += feed(detector, two, [(f"10.0.11.{h}", 22) for h in range(15)], CONNECT_REFUSED)
    assert [(v.actor_kind, v.actor_id, b.pid) for v, b in verdicts] == [
        ("container", "c" * 64, 402)
    ]


def test_a_process_blamed_alone_leaves_its_container_count(detector) -> None:
    scanner = process("python3", "scan.py", pid=501, container="d" * 64)
    quiet = process("python3", "train.py", pid=502, container="d" * 64)
    verdicts = feed(detector, scanner, [(f"10.0.12.{h}", 22) for h in range(40)], CONNECT_REFUSED)
    verdicts += feed(detector, quiet, [(f"10.0.13.{h}", 22) for h in range(10)], CONNECT_REFUSED)
    assert [(v.actor_kind, b.pid) for v, b in verdicts] == [(ACTOR_PROCESS, 501)]


# --- every protocol -------------------------------------------------------------


@pytest.mark.parametrize(
    ("proto", "targets", "expected"),
    [
        ("udp", [(f"10.1.0.{h}", 161) for h in range(60)], "25 destinations"),  # SNMP sweep
        ("icmp", [(f"10.1.1.{h}", 0) for h in range(30)], "icmp 25"),  # ping sweep
        ("udp", [("10.1.2.1", p) for p in range(1, 100)], "15 ports on 10.1.2.1"),  # nmap -sU
        ("raw", [(f"10.1.3.{h}", 161) for h in range(30)], "raw 25"),  # nmap's raw packets
    ],
    ids=["udp-sweep", "icmp-sweep", "udp-port-scan", "raw-sweep"],
)
def test_datagram_probes_count_like_failed_connects(detector, proto, targets, expected) -> None:
    verdicts = []
    for i, (daddr, dport) in enumerate(targets):
        verdicts += detector.observe(
            process("python3", "x.py"), None, daddr, dport, CONNECT_ATTEMPT, i * 0.01, proto
        )
    assert len(verdicts) == 1 and expected in verdicts[0][0].reason


def test_protocols_add_up_per_host_and_count_apart_per_port(detector) -> None:
    """15 hosts pinged and 10 others probed over UDP: 25 hosts. The same
    port number over UDP and TCP is two ports."""
    info = process("python3", "mixed.py")
    verdicts = []
    for h in range(15):
        verdicts += detector.observe(info, None, f"10.2.0.{h}", 0, CONNECT_ATTEMPT, h, "icmp")
    for h in range(10):
        verdicts += detector.observe(info, None, f"10.2.1.{h}", 53, CONNECT_ATTEMPT, 20 + h, "udp")
    assert len(verdicts) == 1 and "icmp 15, udp 10" in verdicts[0][0].reason
    other = process("python3", "ports.py", pid=77)
    for port in range(8):
        for proto in ("udp", "tcp"):
            outcome = CONNECT_ATTEMPT if proto == "udp" else CONNECT_REFUSED
            verdicts += detector.observe(other, None, "10.2.2.1", port, outcome, port, proto)
    # 8 port numbers, each over UDP and TCP: 15 ports before the last one
    assert len(verdicts) == 2 and "15 ports on 10.2.2.1" in verdicts[1][0].reason


@pytest.mark.parametrize(
    "traffic",
    [
        [("10.3.0.53", 53), ("10.3.0.54", 53)] * 500,  # a resolver pair, 1000 queries
        [(f"10.3.1.{h}", 123) for h in range(8)] * 20,  # NTP: a pool of 8 servers
        [("10.3.2.1", 8125)] * 1000,  # StatsD: one collector
        [(f"127.0.3.{h}", 29500 + h) for h in range(8)] * 50,  # NCCL-like fixed peers
        [("10.3.3.1", 0)] * 300,  # ping of one gateway
    ],
    ids=["dns", "ntp", "statsd", "fixed-peers", "gateway-ping"],
)
def test_benign_datagram_traffic_is_quiet(detector, traffic) -> None:
    worker = process("python3", "train.py")
    verdicts = []
    for i, (daddr, dport) in enumerate(traffic):
        proto = "icmp" if dport == 0 else "udp"
        verdicts += detector.observe(worker, None, daddr, dport, CONNECT_ATTEMPT, i * 0.1, proto)
    assert verdicts == []


def test_a_loop_pinging_one_gateway_is_quiet_for_the_parent(detector) -> None:
    loop = process("bash", "-c", "while :; do ping -c1 gw; sleep 1; done", pid=600)
    verdicts = []
    for n in range(300):
        ping = process("ping", "-c1", "gw", pid=10_000 + n)
        verdicts += detector.observe(ping, loop, "10.3.3.1", 0, CONNECT_ATTEMPT, n, "icmp")
    assert verdicts == []


def test_a_loop_of_ping_children_over_30_hosts_is_its_parent(detector) -> None:
    loop = process("bash", "-c", "for h in ...; do ping -c1 $h; done", pid=700)
    verdicts = []
    for h in range(30):
        ping = process("ping", "-c1", pid=20_000 + h)
        verdicts += detector.observe(ping, loop, f"10.4.0.{h}", 0, CONNECT_ATTEMPT, h, "icmp")
    assert [(v.actor_kind, b.pid) for v, b in verdicts] == [(ACTOR_PARENT, 700)]


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
            step,
            f"10.0.0.{rng.randint(1, 30)}",
            (rng.choice(["tcp", "udp"]), rng.randint(1, 40)),
            rng.choice([0.25, 1.0]),
            ProcessKey(rng.randint(1, 50), 1),
        )
        history.expire(step, window=300, cap=10_000)
        if step % 700 == 0:
            history.remove(ProcessKey(rng.randint(1, 50), 1))  # a contributor blamed alone
        if step % 500 == 0:
            best: dict = {}
            for _t, daddr, dport, weight, _who in history.attempts:
                best[(daddr, dport)] = max(best.get((daddr, dport), 0), weight)
            per_destination: dict = {}
            for (daddr, _port), weight in best.items():
                per_destination[daddr] = max(per_destination.get(daddr, 0), weight)
                assert history.port_score[daddr] == sum(
                    w for (d, _), w in best.items() if d == daddr
                )
            assert history.destination_score == sum(per_destination.values())
