"""The shipped logrotate snippet (systemd/rome-guard.logrotate), run by
Debian's real logrotate against a running daemon: after each rotation the
daemon reopens its journal on SIGHUP, and across the rotations (renamed,
then compressed) every alert is kept once and whole."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from tests.conftest import require, require_root
from tests.fixtures.daemon import daemon
from tests.fixtures.network import wait_until

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "systemd" / "rome-guard.logrotate"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"


def _site_config(alerts_file: str, daemon_pid: int) -> str:
    """The snippet for this test's journal; the reload goes to this test's
    daemon (the snippet's `systemctl reload` sends the same SIGHUP)."""
    text = SNIPPET.read_text()
    assert "/var/lib/rome-guard/alerts.jsonl {" in text
    assert "systemctl reload rome-guard.service" in text
    assert "\n    copytruncate" not in text  # it races the daemon's writes
    text = text.replace("/var/lib/rome-guard/alerts.jsonl", alerts_file)
    return text.replace("systemctl reload rome-guard.service", f"kill -HUP {daemon_pid}")


def _every_line(directory: Path) -> list[bytes]:
    lines = []
    for path in sorted(directory.glob("alerts.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
        lines.extend(data.split(b"\n")[:-1])
    return lines


def test_logrotate_with_the_shipped_snippet_keeps_every_alert_once(tmp_path: Path):
    require_root()
    require(os.access(LOGROTATE, os.X_OK), "logrotate (Debian package) not installed")
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir(mode=0o750)
    alerts_file = str(journal_dir / "alerts.jsonl")
    conf, state = tmp_path / "logrotate.conf", tmp_path / "logrotate.state"
    config = "rules: []\njournal:\n  rotate_bytes: 0\n"
    with daemon(config_text=config, alerts_file=alerts_file) as d:
        conf.write_text(_site_config(alerts_file, d.proc.pid))
        pids = []
        for _round in range(4):
            pids += [d.caught_miner(str(tmp_path)) for _ in range(3)]
            reloads = d.log.count("reloaded:")
            result = subprocess.run(
                [LOGROTATE, "--force", "--state", str(state), str(conf)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            wait_until(lambda: d.log.count("reloaded:") > reloads, timeout=20)  # noqa: B023
        records = [json.loads(line) for line in _every_line(journal_dir)]  # none torn
    files = sorted(p.name for p in journal_dir.iterdir())
    assert "alerts.jsonl.1" in files and "alerts.jsonl.2.gz" in files  # renamed, compressed
    miners = [r["process"]["pid"] for r in records if r.get("rule") == "miner-known-binary"]
    assert sorted(p for p in miners if p in pids) == sorted(pids)  # each alert once
    # after the last rotation and SIGHUP the daemon writes the new file again
    assert os.path.exists(alerts_file)


def test_the_daemon_rotates_its_journal_by_size_and_keeps_the_retention(tmp_path: Path):
    require_root()
    journal_dir = tmp_path / "journal"
    journal_dir.mkdir(mode=0o750)
    alerts_file = str(journal_dir / "alerts.jsonl")
    config = "rules: []\njournal:\n  rotate_bytes: 3000\n  keep: 2\n"
    with daemon(config_text=config, alerts_file=alerts_file) as d:
        # an alert record is 1-3 KB: about one per file
        pids = [d.caught_miner(str(tmp_path)) for _ in range(6)]
        d.settle(1.5)
        with open(os.path.join(d.run_dir, "status.json")) as f:
            rotations = json.load(f)["journal"]["rotations"]
        # a reload that changes the outputs says they wait for a restart
        with open(d.config, "a") as f:
            f.write("outputs:\n  - type: journald\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded:")
        assert "outputs changed in" in d.log and "apply at the next restart" in d.log
    files = sorted(p.name for p in journal_dir.iterdir())
    assert files == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]  # keep: 2
    assert rotations >= 3
    assert all(
        p.stat().st_size <= 3000 or len(_every_line_of(p)) == 1 for p in journal_dir.iterdir()
    )
    oldest_first = [journal_dir / f"alerts.jsonl{ext}" for ext in (".2", ".1", "")]
    records = [json.loads(line) for path in oldest_first for line in _every_line_of(path)]
    kept = [r["process"]["pid"] for r in records if r.get("rule") == "miner-known-binary"]
    assert kept and kept == [p for p in pids if p in kept]  # the newest, in order
    assert kept[-1] == pids[-1]


def _every_line_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]
