"""Enforce mode end to end as root: kills with verified identity, kernel
prevention before user space sees the event, protected processes spared,
and no attachment left behind, even after kill -9 of the daemon."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.fixtures.daemon import Daemon, by_pid, daemon, rule_ids
from tests.fixtures.network import listener, reverse_shell, wait_until, write_fake_miner

BLOCKED_PORT = 47999
SITE_RULES = f"""
rules:
  - id: site-blocked-pool
    category: miner
    severity: critical
    description: a pool endpoint this site blocks in the kernel
    action: kill
    match: {{remote_port: [{BLOCKED_PORT}]}}
    prevent:
      block_ports: [{BLOCKED_PORT}]
"""


@pytest.fixture(scope="module")
def enforcing(tmp_path_factory):
    require_root()
    workdir = tmp_path_factory.mktemp("enforce")
    rules = workdir / "site.yaml"
    rules.write_text(SITE_RULES)
    protected = workdir / "protected"
    protected.mkdir()
    config = f"rules: []\nprotect:\n  exe: ['{protected}/*']\n"
    with daemon("--rules", str(rules), mode="enforce", config_text=config) as d:
        d.protected_dir = protected
        yield d


def responses(d: Daemon, pid: int) -> list[dict]:
    return d.alerts_for(lambda r: r.get("event") == "response" and r["process"]["pid"] == pid)


def test_denylisted_program_dies_before_its_first_instruction(
    enforcing: Daemon, tmp_path: Path
) -> None:
    miner = tmp_path / "xmrig"
    shutil.copy("/usr/bin/touch", miner)
    marker = tmp_path / "ran"
    proc = subprocess.run([str(miner), str(marker)], check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not marker.exists()  # touch never ran a single instruction of its own
    record = enforcing.wait_alert(
        lambda r: r.get("event") == "prevention" and r["process"]["comm"] == "xmrig"
    )
    assert record["action"] == "killed" and record["rule"] == "miner-known-binary"


def test_detected_miner_is_killed_after_the_alert_is_journaled(
    enforcing: Daemon, tmp_path: Path
) -> None:
    with listener("127.0.5.6", 0, stratum=True) as pool:
        miner = write_fake_miner(str(tmp_path), "kworker-x", linger_s=30)
        proc = subprocess.Popen([miner, "-o", f"stratum+tcp://127.0.5.6:{pool.port}", "-u", "w"])
        assert proc.wait(20) == -signal.SIGKILL
    records = enforcing.alerts_for(by_pid(proc.pid))
    alert = next(r for r in records if r["event"] == "alert" and "miner-pool-url" in rule_ids(r))
    response = next(r for r in records if r["event"] == "response" and r["alert_id"] == alert["id"])
    assert alert["action"] == "kill" and response["action"] == "killed"
    assert records.index(alert) < records.index(response)  # durable before acting
    assert response["response"]["pids"] == [proc.pid]


def test_reverse_shell_tree_is_killed(enforcing: Daemon) -> None:
    with (
        listener("127.0.6.7", 0) as attacker,
        reverse_shell(attacker, then="sleep 30") as shell,
    ):
        assert shell.wait(20) == -signal.SIGKILL
        wait_until(
            lambda: (
                subprocess.run(["pgrep", "-s", str(shell.pid)], capture_output=True).returncode == 1
            )
        )  # the whole tree is gone, not just the shell
    killed = [
        r
        for r in enforcing.records()
        if r.get("event") == "response" and r["rule"].startswith("shell-")
    ]
    assert any(r["response"]["scope"] == "tree" and r["action"] == "killed" for r in killed)


def test_protected_process_survives_a_kill_rule(enforcing: Daemon) -> None:
    exe = enforcing.protected_dir / "trainer"
    shutil.copy("/bin/dash", exe)
    proc = subprocess.Popen([str(exe), "-c", "sleep 30", "trainer", "--donate-level=1"])
    try:
        wait_until(lambda: responses(enforcing, proc.pid))
        response = responses(enforcing, proc.pid)[0]
        assert response["rule"] == "miner-only-flags"
        assert response["action"] == "protected"
        time.sleep(0.2)
        assert proc.poll() is None  # still running
    finally:
        proc.kill()
        proc.wait()


def test_blocked_pool_connect_fails_with_eperm_and_is_journaled(enforcing: Daemon) -> None:
    with listener("127.0.3.3", BLOCKED_PORT) as pool:
        client = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import socket\ntry:\n socket.create_connection(('127.0.3.3', {BLOCKED_PORT}), timeout=3)\n"
                "except OSError as e:\n print(e.errno)\nelse:\n print(0)",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        time.sleep(0.3)
        assert pool.accepted == []  # no handshake ever completed
    assert client.stdout.strip() in (str(errno.EPERM), "")  # EPERM, or killed outright
    record = enforcing.wait_alert(
        lambda r: r.get("event") == "prevention" and r["rule"] == "site-blocked-pool"
    )
    assert record["action"] == "blocked"
    assert record["network"]["dport"] == BLOCKED_PORT


def _prevention_attachments() -> set[int]:
    """Ids of rgp_* programs attached to the cgroup2 root."""
    with open("/proc/mounts") as mounts:
        root = next(line.split()[1] for line in mounts if line.split()[2] == "cgroup2")
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", root], capture_output=True, text=True, check=False
    ).stdout
    return {
        p["id"] for p in json.loads(out.strip() or "[]") if p.get("name", "").startswith("rgp_")
    }


def test_clean_exit_in_enforce_mode_leaves_nothing() -> None:
    require_root()
    before = _prevention_attachments()
    with daemon(mode="enforce") as d:
        ours = _prevention_attachments() - before
        assert ours
    assert d.proc.returncode == 0
    assert ours.isdisjoint(_prevention_attachments())
