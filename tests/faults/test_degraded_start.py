"""Degraded, never down: at start, a broken site rule file, a config key the
guard cannot use and a metrics address already taken are reported and left
out; the guard runs on the shipped rules and every good file. Before, each
made `rome-guard run` exit 2 and a restarting guard stayed down."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_root
from tests.faults.conftest import miner_still_caught
from tests.fixtures.daemon import Daemon, by_pid, daemon
from tests.fixtures.network import free_port, wait_until

GOOD_SITE_RULE = """rules:
  - id: site-no-frobnicator
    category: custom
    severity: low
    description: a site's own rule in a good file next to a broken one
    action: alert
    match:
      name: [frobnicator]
"""
BROKEN_SITE_RULE = """rules:
  - id: site-broken
    category: custom
    severity: low
    description: a mistake on line 7
    match:
      no_such_condition: true
"""


def _exec(tmp_path: Path, name: str) -> subprocess.Popen:
    program = tmp_path / name
    shutil.copy("/bin/sleep", program)
    return subprocess.Popen([str(program), "5"])


def _status(d: Daemon) -> dict:
    shown = subprocess.run(
        [sys.executable, "-m", "rome_guard", "status", "--run-dir", d.run_dir, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(shown.stdout)


def test_a_broken_rule_file_and_a_bad_config_key_are_left_out(tmp_path: Path) -> None:
    require_root()
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "10-good.yaml").write_text(GOOD_SITE_RULE)
    broken = rules_d / "20-broken.yaml"
    broken.write_text(BROKEN_SITE_RULE)
    config = f"rules:\n  - {rules_d}\nmetrics:\n  adress: 127.0.0.1:1\n"
    with daemon(sensor="ebpf", config_text=config) as d:
        log = d.log
        assert f"{broken}:7:" in log and "DEGRADED: left out rule file" in log
        assert f"{d.config}:4:" in log  # the misspelt key, with its line
        rejected = [r for r in d.records() if r["event"] == "config_rejected"]
        assert {r["file"] for r in rejected} == {str(broken), d.config}
        assert {r["left_out"] for r in rejected} == {"rule file", "config keys metrics"}
        assert all(r["problems"] and isinstance(r["problems"][0]["line"], int) for r in rejected)
        # the journal's envelope, as every record has it (docs/alerts.md)
        assert all(len(r["id"]) == 32 and r["time"].endswith("Z") and r["host"] for r in rejected)
        assert len({r["id"] for r in rejected}) == 2
        assert d.metric("rome_guard_config_rejected_files") == 2
        wait_until(lambda: os.path.exists(os.path.join(d.run_dir, "status.json")))
        shown = _status(d)
        assert {r["file"] for r in shown["config_rejected"]} == {str(broken), d.config}
        # the shipped rules and the good site file are in force
        miner = _exec(tmp_path, "xmrig")
        d.wait_alert(by_pid(miner.pid, "miner-known-binary"))
        site = _exec(tmp_path, "frobnicator")
        d.wait_alert(by_pid(site.pid, "site-no-frobnicator"))
        for proc in (miner, site):
            proc.kill()
            proc.wait()
        # fixed and reloaded: nothing is left out any more
        broken.unlink()
        Path(d.config).write_text(f"rules:\n  - {rules_d}\n")
        d.signal(1)
        d.wait_log("reloaded:")
        wait_until(lambda: d.metric("rome_guard_config_rejected_files") == 0)


def test_a_config_file_that_is_not_yaml_runs_on_the_defaults(tmp_path: Path) -> None:
    require_root()
    with daemon(sensor="ebpf", config_text="mode: [enforce\n") as d:
        assert "DEGRADED: left out config file" in d.log
        record = next(r for r in d.records() if r["event"] == "config_rejected")
        assert record["left_out"] == "config file" and record["mode"] == "monitor"
        miner_still_caught(d, str(tmp_path))


def test_enforce_without_a_usable_protect_list_runs_in_monitor_mode(tmp_path: Path) -> None:
    require_root()
    config = "mode: enforce\nprotect:\n  exe: 7\n"
    d = Daemon(sensor="ebpf", mode="monitor", config_text=config)
    try:
        d.wait_ready()
        assert "config keys protect, mode (enforce needs the protect list)" in d.log
        assert _status(d)["mode"] == "monitor"
    finally:
        d.stop()


def test_a_metrics_address_in_use_is_reported_and_retried(tmp_path: Path) -> None:
    require_root()
    port = free_port()
    taken = socket.create_server(("127.0.0.1", port))
    d = Daemon("--metrics-addr", f"127.0.0.1:{port}", sensor="ebpf")
    try:
        d.wait_ready()
        assert f"DEGRADED: cannot serve metrics on 127.0.0.1:{port}" in d.log
        miner_still_caught(d, str(tmp_path))  # detection and the journal go on
        assert _status(d)["metrics_unavailable"] == f"127.0.0.1:{port}"
        taken.close()
        d.metrics_port = port
        d.wait_log(f"metrics served on 127.0.0.1:{port} now", timeout=40)
        assert d.metric("rome_guard_rules_loaded") > 0
    finally:
        taken.close()
        d.stop()
