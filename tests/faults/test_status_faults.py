"""`rome-guard status` against a real daemon: live counts, then a daemon
stopped with SIGSTOP is reported stale (exit 2), and live again after
SIGCONT; after the daemon exits there is no daemon (exit 2)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.conftest import require_root
from tests.faults.conftest import miner_still_caught
from tests.fixtures.daemon import Daemon
from tests.fixtures.network import wait_until


def status(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rome_guard", "status", "--run-dir", d.run_dir, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_status_is_live_then_stale_under_sigstop_then_gone(tmp_path) -> None:
    require_root()
    d = Daemon(mode="enforce")
    try:
        d.wait_ready()
        miner_still_caught(d, str(tmp_path))
        # main showed "alerts 0" after four alerts: the counts are live now
        live = wait_until(
            lambda: json.loads(status(d, "--json").stdout)["alerts"] >= 1 and status(d)
        )
        assert live.returncode == 0 and "alerts" in live.stdout and "{" not in live.stdout
        d.signal(signal.SIGSTOP)
        try:
            stale = wait_until(lambda: (r := status(d)).returncode == 2 and r, timeout=30)
            assert "stale" in stale.stderr and "stopped or hung" in stale.stderr
        finally:
            d.signal(signal.SIGCONT)
        wait_until(lambda: status(d).returncode == 0, timeout=30)
        miner_still_caught(d, str(tmp_path), host="127.0.9.11")
    finally:
        assert d.stop() == 0
    gone = status(d)
    assert gone.returncode == 2 and "no running daemon" in gone.stderr
