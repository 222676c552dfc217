"""One incident per attack, end to end as root (monitor mode): a reverse
shell whose every subshell and command has the network on its stdio, a
miner, and a probe loop of short-lived children each raise one alert per
category in the journal and one ``rome_guard_incidents_total``; later
hits on the offender's tree are incident updates."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.fixtures.daemon import Daemon, ebpf_monitor
from tests.fixtures.network import listener, reverse_shell, wait_until
from tests.fixtures.wire import fake_miner

guard = pytest.fixture(scope="module", name="guard")(ebpf_monitor)


def in_tree(root_pid: int):
    return lambda r: (
        r["process"]["pid"] == root_pid or any(p["pid"] == root_pid for p in r["lineage"])
    )


def tree_records(guard: Daemon, root_pid: int, event: str) -> list[dict]:
    return guard.alerts_for(lambda r: r.get("event") == event and in_tree(root_pid)(r))


def incidents_total(guard: Daemon, category: str) -> float:
    return guard.metric("rome_guard_incidents_total", category=category)


def test_a_reverse_shell_with_subshells_is_one_incident(guard: Daemon) -> None:
    before = incidents_total(guard, "reverse_shell")
    with listener("127.0.36.1", 0) as attacker, reverse_shell(attacker) as shell:
        commands = (
            b"sh -c 'id'; bash --norc -c 'ls / >/dev/null'; (cd /tmp; pwd);"
            b" python3 -c 'print(1)'; sh -c 'sh -c \"echo nested\"'; echo rg-done-$((6*7))\n"
        )
        attacker.conns[0].sendall(commands)
        attacker.conns[0].settimeout(20)
        seen = b""
        while b"rg-done-42" not in seen:
            seen += attacker.conns[0].recv(4096)
        guard.wait_alert(in_tree(shell.pid))
        wait_until(lambda: len(tree_records(guard, shell.pid, "incident_update")) >= 3)
        guard.settle()
    alerts = tree_records(guard, shell.pid, "alert")
    assert [a["category"] for a in alerts] == ["reverse_shell"], [a["rule"] for a in alerts]
    updates = tree_records(guard, shell.pid, "incident_update")
    assert all(u["alert_id"] == alerts[0]["id"] for u in updates)
    # the subshells were seen: updates name processes other than the offender
    assert {u["process"]["pid"] for u in updates} - {alerts[0]["process"]["pid"]}
    # other attacks on the shared host may add incidents meanwhile, never fewer
    assert incidents_total(guard, "reverse_shell") - before >= 1


def test_a_miner_from_a_config_file_is_one_incident(guard: Daemon, tmp_path) -> None:
    with listener("127.0.36.2", 0, stratum=True) as pool:
        miner = fake_miner(str(tmp_path), f"127.0.36.2:{pool.port}")
        miner.wait(30)
    guard.wait_alert(in_tree(miner.pid))
    guard.settle()
    alerts = tree_records(guard, miner.pid, "alert")
    assert len(alerts) == 1 and alerts[0]["category"] == "miner", [a["rule"] for a in alerts]


def test_a_probe_loop_is_one_incident_per_category(guard: Daemon) -> None:
    loop = subprocess.Popen(
        ["sh", "-c", "for p in $(seq 20001 20060); do nc -z -w1 127.0.36.3 $p; done"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    loop.wait(120)
    guard.wait_alert(lambda r: r.get("category") == "net_probe" and in_tree(loop.pid)(r))
    guard.settle()
    time.sleep(1)
    alerts = tree_records(guard, loop.pid, "alert")
    categories = [a["category"] for a in alerts]
    assert len(categories) == len(set(categories)), [a["rule"] for a in alerts]
