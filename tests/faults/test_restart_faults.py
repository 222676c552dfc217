"""Restart under load (what `systemctl restart` does while the host is
busy): the stopped daemon leaves nothing attached, the new one does not
alert again on what the old one reported, and still catches the new."""

from __future__ import annotations

import subprocess

from tests.conftest import require_root
from tests.faults.conftest import load, miner_still_caught
from tests.fixtures.daemon import Daemon, by_pid, loaded_bpf_programs, owned_bpf_programs

MARKER_RULES = """rules:
  - id: site-restart-marker
    category: custom
    severity: low
    description: an alert-only rule, so that its process outlives the alert
    match: {arg: [rg-restart-marker]}
"""


def marker() -> subprocess.Popen:
    return subprocess.Popen(["/bin/sh", "-c", "sleep 300", "rg-restart-marker"])


def test_restart_under_load_no_duplicates_nothing_left(tmp_path) -> None:
    require_root()
    rules = tmp_path / "site.yaml"
    rules.write_text(MARKER_RULES)
    old = marker()
    new = None
    try:
        with load(exec_loops=3, connect_loops=1):
            first = Daemon("--rules", str(rules), mode="enforce")
            try:
                first.wait_ready()
                first_programs = owned_bpf_programs(first.proc.pid)
                assert first_programs  # sensor and prevention programs
                first.wait_alert(by_pid(old.pid, "site-restart-marker"))
            finally:
                assert first.stop() == 0
            left = first_programs & loaded_bpf_programs()
            assert not left, f"left loaded by the stopped daemon: {left}"
            second = Daemon("--rules", str(rules), mode="enforce", alerts_file=first.alerts)
            try:
                second.wait_ready()
                second_programs = owned_bpf_programs(second.proc.pid)
                new = marker()
                second.wait_alert(by_pid(new.pid, "site-restart-marker"))
                miner_still_caught(second, str(tmp_path))
                second.settle(1.0)
                counts = [
                    len(second.alerts_for(by_pid(p.pid, "site-restart-marker"))) for p in (old, new)
                ]
                assert counts == [1, 1]  # the old one was not alerted again
            finally:
                assert second.stop() == 0
        left = second_programs & loaded_bpf_programs()
        assert not left, f"left loaded: {left}"
    finally:
        for proc in (old, new):
            if proc is not None:
                proc.kill()
                proc.wait()
