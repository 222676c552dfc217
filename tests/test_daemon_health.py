"""The daemon's health as an operator alerts on it, end to end as root: the
mode, the sensors up, build_info with the hashes of the rules and config in
force (changed by a reload, one series at a time), and `rome-guard status`
showing the outputs with their counters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from rome_guard.config import load_config
from rome_guard.detect.rules import rules_for
from rome_guard.respond import health
from tests.conftest import require_root
from tests.fixtures.daemon import daemon
from tests.fixtures.network import free_port, wait_until


def _series(d, name: str) -> list[dict[str, str]]:
    import urllib.request

    url = f"http://127.0.0.1:{d.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        {**s.labels, "value": str(s.value)}
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def _status(d) -> dict:
    with open(os.path.join(d.run_dir, "status.json")) as f:
        return json.load(f)


def test_mode_sensors_and_build_hashes_follow_the_daemon(tmp_path: Path):
    require_root()
    port = free_port()
    config = (
        "rules: []\noutputs:\n"
        f"  - type: syslog\n    name: siem\n    address: tcp://127.0.0.1:{port}\n"
    )
    with daemon(config_text=config) as d:
        wait_until(lambda: _series(d, "rome_guard_sensor_up"), timeout=10)
        assert d.metric("rome_guard_mode", mode="monitor") == 1
        assert d.metric("rome_guard_mode", mode="enforce") == 0
        sensors = {s["sensor"]: s["value"] for s in _series(d, "rome_guard_sensor_up")}
        assert sensors["ebpf"] == "1.0" and sensors["poll"] == "0.0"
        assert "wire" in sensors  # beside eBPF, up or down but never missing
        (build,) = _series(d, "rome_guard_build_info")
        expected = health.rules_hash(rules_for(load_config(d.config)))
        assert build["rules_hash"] == expected == _status(d)["rules_hash"]
        assert build["config_hash"] == health.config_hash(load_config(d.config)) != "default"

        # a reload with a rule left out: new hashes, the old series gone
        with open(d.config, "a") as f:
            f.write("disabled_rules: [miner-known-binary]\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded:")
        (after,) = _series(d, "rome_guard_build_info")
        assert after["rules_hash"] != build["rules_hash"]
        assert after["config_hash"] != build["config_hash"]

        # status: the output with its target and counters, as JSON and as a table
        result = subprocess.run(
            [sys.executable, "-m", "rome_guard", "status", "--run-dir", d.run_dir],
            capture_output=True,
            text=True,
            check=False,
        )
        (output,) = _status(d)["outputs"]
        assert output["name"] == "siem" and output["target"] == f"tcp://127.0.0.1:{port}"
    assert "siem (syslog)" in result.stdout and f"tcp://127.0.0.1:{port}" in result.stdout


def test_rules_hash_is_the_same_for_the_same_rules_and_changes_with_them(tmp_path: Path):
    site = tmp_path / "site.yaml"
    site.write_text("rules: []\n")
    config = tmp_path / "config.yaml"
    config.write_text(f"rules: [{site}]\n")
    first = health.rules_hash(rules_for(load_config(str(config))))
    assert first == health.rules_hash(rules_for(load_config(str(config))))
    assert len(first) == health.HASH_DIGITS
    config.write_text(f"rules: [{site}]\ndisabled_rules: [miner-known-binary]\n")
    assert health.rules_hash(rules_for(load_config(str(config)))) != first
    assert health.config_hash(load_config(None)) == health.DEFAULT


def test_sensors_up_without_gpu_names_only_what_applies():
    assert health.sensors_up("ebpf", True, None) == [
        ("ebpf", True),
        ("poll", False),
        ("wire", True),
    ]
    assert health.sensors_up("poll", False, None) == [("ebpf", False), ("poll", True)]
