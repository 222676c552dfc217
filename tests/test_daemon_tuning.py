"""A site's tuning file in a real daemon in enforce mode: the pool domain
it appends makes a shipped kill rule kill, the shipped kill rule it stages
in ``mode: monitor`` alerts without killing, and the tag it disables
raises nothing. Judged by this daemon's own journal only (other daemons on
this host may kill or alert on the same processes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.fixtures.daemon import Daemon, by_pid, daemon, rule_ids

SITE = """\
version: 1
append:
  lists:
    pool_domains: [pool.example.net]
tune:
  - rule: miner-only-flags
    mode: monitor
disable:
  - tag: mitre-t1046
"""


@pytest.fixture(scope="module")
def tuned_daemon(tmp_path_factory):
    require_root()
    workdir = tmp_path_factory.mktemp("tuning")
    site = workdir / "rules.d"
    site.mkdir()
    (site / "50-site.yaml").write_text(SITE)
    with daemon(mode="enforce", config_text=f"rules: [{site}]\n") as d:
        yield d


def _spawn(directory: Path, name: str, *args: str) -> subprocess.Popen:
    """A copy of dash under name, running `sleep 30` with args after $0:
    the command line carries the evidence, the program is harmless."""
    exe = directory / name
    shutil.copy("/bin/dash", exe)
    return subprocess.Popen([str(exe), "-c", "sleep 30", name, *args], start_new_session=True)


def _end(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _responses(d: Daemon, pid: int) -> list[dict]:
    return d.alerts_for(lambda r: r["event"] in ("response", "prevention") and by_pid(pid)(r))


def test_a_rule_staged_in_monitor_mode_alerts_without_killing(
    tuned_daemon: Daemon, tmp_path: Path
) -> None:
    staged = _spawn(tmp_path, "trainer", "--donate-level=1")
    killed = _spawn(tmp_path, "worker", "-o", "eu1.pool.example.net:4444")
    try:
        # the appended pool domain: the shipped kill rule now knows it and kills
        alert = tuned_daemon.wait_alert(by_pid(killed.pid, "miner-pool-domain"))
        assert alert["action"] == "kill" and "rule_mode" not in alert
        response = tuned_daemon.wait_alert(
            lambda r: r["event"] == "response" and r.get("alert_id") == alert["id"]
        )
        assert response["action"] == "killed"
        # the staged rule: alerted, said so, and this daemon never acted on it
        record = tuned_daemon.wait_alert(by_pid(staged.pid, "miner-only-flags"))
        assert record["mode"] == "enforce" and record["action"] == "alert"
        assert record["rule_mode"] == "monitor"
        assert {"rule": "miner-only-flags", "mode": "monitor"}.items() <= record["rules"][0].items()
        tuned_daemon.settle()
        assert _responses(tuned_daemon, staged.pid) == []
    finally:
        _end(staged)
        _end(killed)


def test_a_disabled_tag_raises_nothing(tuned_daemon: Daemon, tmp_path: Path) -> None:
    scanner = _spawn(tmp_path, "nmap", "-sS", "10.0.0.0/24")  # probe-scanner-binary, mitre-t1046
    marker = _spawn(tmp_path, "trainer", "--donate-level=2")
    try:
        tuned_daemon.wait_alert(by_pid(marker.pid, "miner-only-flags"))
        tuned_daemon.settle()
        assert not [
            r for r in tuned_daemon.alerts_for(by_pid(scanner.pid)) if "probe" in str(rule_ids(r))
        ]
    finally:
        _end(scanner)
        _end(marker)


def test_a_reload_stages_a_kill_rule_without_a_restart(tmp_path: Path) -> None:
    """The roll-out a site does on a running fleet: drop a tune file into
    rules.d, SIGHUP, and the kill rule alerts without killing from then on;
    a broken tune file is refused and the rules in force stay."""
    require_root()
    site = tmp_path / "rules.d"
    site.mkdir()
    with daemon(mode="enforce", config_text=f"rules: [{site}]\n") as d:
        (site / "90-bad.yaml").write_text("tune:\n  - {rule: miner-only-flags, mode: audit}\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reload rejected")
        assert "90-bad.yaml:2:" in d.log and "mode must be one of enforce, monitor" in d.log
        (site / "90-bad.yaml").unlink()
        (site / "60-stage.yaml").write_text("tune:\n  - {rule: miner-only-flags, mode: monitor}\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded:")
        assert "staged in monitor mode (they alert, never kill): miner-only-flags" in d.log
        staged = _spawn(tmp_path, "trainer", "--donate-level=1")
        try:
            record = d.wait_alert(by_pid(staged.pid, "miner-only-flags"))
            assert record["rule_mode"] == "monitor" and record["action"] == "alert"
            d.settle()
            assert _responses(d, staged.pid) == []
        finally:
            _end(staged)
