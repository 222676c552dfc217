"""`rome-guard run` judges what processes do, end to end as root: real
processes, real kernel events, real sockets on loopback. Each case has at
least two spellings that differ from one another, and a look-alike from
training-host life that must stay clean."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root
from tests.fixtures.daemon import Daemon, by_pid, daemon
from tests.fixtures.network import listener, write_fake_miner

WALLET = "4" + "8" * 94


@pytest.fixture(scope="module")
def guard():
    require_root()
    with daemon() as d:
        assert "ebpf sensor" in d.log
        yield d


def alerts_of(guard: Daemon, pid: int, event: str = "alert") -> list[dict]:
    return guard.alerts_for(lambda r: r.get("event") == event and r["process"]["pid"] == pid)


def metric_total(guard: Daemon, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/metrics", timeout=30) as r:
        body = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def incident_and_hit_counts(guard: Daemon) -> tuple[float, float]:
    return (
        metric_total(guard, "rome_guard_incidents_total", category="miner"),
        metric_total(guard, "rome_guard_alerts_total", category="miner"),
    )


# --- one incident per offender -------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ["-o", "stratum+tcp://{pool}", "-u", WALLET, "-a", "rx/0", "--donate-level=1"],
        ["--url", "{pool}", "--user", WALLET, "--algo", "kawpow", "--cpu-priority", "3"],
    ],
    ids=["xmrig-flags", "long-options"],
)
def test_a_miner_matching_many_rules_is_one_incident(
    guard: Daemon, tmp_path: Path, spelling: list[str]
) -> None:
    counts_before = incident_and_hit_counts(guard)
    with listener("127.0.5.9", 0, stratum=True) as pool:
        argv = [a.format(pool=f"127.0.5.9:{pool.port}") for a in spelling]
        miner = write_fake_miner(str(tmp_path), "trainer-helper", linger_s=0.5)
        proc = subprocess.Popen([miner, *argv])
        proc.wait()
    alert = guard.wait_alert(by_pid(proc.pid))
    guard.settle()
    alerts = alerts_of(guard, proc.pid)
    assert len(alerts) == 1, [r["rule"] for r in alerts]
    rules = [hit["rule"] for hit in alert["rules"]]
    assert len(rules) >= 3 and len(set(rules)) == len(rules)
    assert alert["rule"] == rules[0] and all(hit["reason"] for hit in alert["rules"])
    assert alert["category"] == "miner"
    updates = alerts_of(guard, proc.pid, "incident_update")
    assert all(u["alert_id"] == alert["id"] for u in updates)
    # metrics count the incident once and each of its rules (the host's
    # other processes may add incidents meanwhile: each holds >= 1 hit)
    incidents, hits = (
        after - before
        for after, before in zip(incident_and_hit_counts(guard), counts_before, strict=True)
    )
    assert incidents >= 1 and hits - incidents >= len(rules) - 1


# --- probing: single-port nc -z is a health check, a sweep is a probe ----------


def test_single_port_nc_z_health_checks_are_clean(guard: Daemon) -> None:
    """The wait-for-rendezvous idiom of launch scripts, spelled three ways:
    against a listening port, a refused one, and in an until-loop."""
    with listener("127.0.7.1", 0) as master:
        checks = [
            subprocess.Popen(["nc", "-z", "127.0.7.1", str(master.port)]),
            subprocess.Popen(["ncat", "-zw", "1", "127.0.7.2", "29500"]),
            subprocess.Popen(
                [
                    "bash",
                    "-c",
                    "for i in $(seq 1 30); do nc -z -w 1 127.0.7.3 29500 && break; done; true",
                ]
            ),
        ]
        for check in checks:
            check.wait(60)
    guard.settle()
    pids = {c.pid for c in checks}
    noisy = guard.alerts_for(
        lambda r: (
            r["category"] == "net_probe"
            and (r["process"]["pid"] in pids or any(p["pid"] in pids for p in r["lineage"]))
        )
    )
    assert noisy == [], [(r["rule"], r["reason"]) for r in noisy]


def test_nc_z_over_many_ports_or_hosts_is_still_a_probe(guard: Daemon) -> None:
    listing = subprocess.Popen(["nc", "-z", "-w", "1", "127.0.7.4", "22", "80", "443"])
    ranged = subprocess.Popen(["ncat", "-zv", "127.0.7.5", "20-40"], stderr=subprocess.DEVNULL)
    sweep = subprocess.Popen(
        ["bash", "-c", "for h in $(seq 1 40); do nc -z -w 1 127.0.10.$h 22; done; true"],
        stderr=subprocess.DEVNULL,
    )
    for proc in (listing, ranged, sweep):
        proc.wait(120)
    assert guard.wait_alert(by_pid(listing.pid, "probe-netcat-zero-io"))["category"] == "net_probe"
    guard.wait_alert(by_pid(ranged.pid, "probe-netcat-zero-io"))
    # each nc of the loop checks one port: the loop itself is the sweep
    alert = guard.wait_alert(by_pid(sweep.pid, "probe-fanout"))
    assert "destinations" in alert["reason"]


PATIENT = r"""
import socket, sys, time
hosts, port, pause = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
for host in hosts:
    s = socket.socket(); s.settimeout(1)
    try: s.connect((host, port))
    except OSError: pass
    finally: s.close()
    time.sleep(pause)
"""


def test_patient_sweep_and_port_probe_are_seen(guard: Daemon) -> None:
    """Below the old 100-per-30 s threshold, above Zeek's: 30 refused hosts
    on one port at a relaxed pace, and 18 ports of one host."""
    hosts = ",".join(f"127.0.11.{h}" for h in range(1, 31))
    sweep = subprocess.Popen([sys.executable, "-c", PATIENT, hosts, "22", "0.3"])
    probe = subprocess.Popen(
        [
            "bash",
            "-c",
            "for p in 21 22 23 25 80 110 135 139 143 445 993 995 1723 3306 3389 5900 8080 8443;"
            " do (exec 3<>/dev/tcp/127.0.11.200/$p) 2>/dev/null; sleep 0.3; done; true",
        ]
    )
    sweep.wait(120)
    probe.wait(120)
    assert "destinations" in guard.wait_alert(by_pid(sweep.pid, "probe-fanout"))["reason"]
    assert "ports on 127.0.11.200" in guard.wait_alert(by_pid(probe.pid, "probe-fanout"))["reason"]
