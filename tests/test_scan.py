"""`rome-guard scan` end to end against real processes and real peers on
loopback: a renamed miner talking Stratum to a fake pool, a real reverse
shell, a real `ssh -N -R` to a real sshd."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import require, require_root
from tests.fixtures.network import listener, reverse_shell, sshd, wait_until, write_fake_miner

WALLET = "4" + "8" * 94


def run_scan(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rome_guard", "scan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def scan_json(*args: str) -> dict:
    result = run_scan("--json", *args)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def findings_for(document: dict, pid: int) -> dict[str, dict]:
    return {f["rule"]: f for f in document["findings"] if f["process"]["pid"] == pid}


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_renamed_miner_talking_stratum_to_a_pool(tmp_path: Path) -> None:
    with listener("127.0.5.5", 3333, stratum=True) as pool:
        miner = write_fake_miner(str(tmp_path), "kworker-upd")
        proc = subprocess.Popen(
            [
                miner,
                "-o",
                "stratum+tcp://127.0.5.5:3333",
                "-u",
                WALLET,
                "-p",
                "x",
                "--donate-level=1",
                "note\nforged\x1b[2J",
                os.fsdecode(b"\xff\xfe"),
            ]
        )
        try:
            wait_until(lambda: pool.received)
            assert b'"method": "login"' in pool.received[0]
            doc = scan_json()
            found = findings_for(doc, proc.pid)
            assert {
                "miner-pool-url",
                "miner-only-flags",
                "miner-wallet-and-pool",
                "miner-pool-port-supporting",
            } <= set(found)
            supporting = found["miner-pool-port-supporting"]
            assert supporting["network"]["daddr"] == "127.0.5.5"
            assert supporting["network"]["dport"] == 3333
            record = found["miner-pool-url"]
            assert record["process"]["comm"] == "kworker-upd"
            assert record["process"]["start_time"] > 0
            assert record["category"] == "miner" and record["severity"] == "critical"
            assert record["lineage"][0]["pid"] == os.getpid()
            assert record["process"]["cmdline"][-1] == "\\xff\\xfe"
            # the table stays one row per finding despite newlines in argv
            table = run_scan()
            assert table.returncode == 1
            rows = [line for line in table.stdout.splitlines() if f" {proc.pid} " in line]
            assert len(rows) == len(found)
            assert "\x1b" not in table.stdout
        finally:
            kill(proc)


def test_reverse_shell_to_a_listener() -> None:
    with listener("127.0.6.6", 4444) as attacker, reverse_shell(attacker):
        time.sleep(0.2)
        doc = scan_json()
        shells = [
            f
            for f in doc["findings"]
            if f["rule"] == "shell-stdio-socket" and f["network"]["daddr"] == "127.0.6.6"
        ]
        assert shells, doc["findings"]
        assert shells[0]["network"]["dport"] == 4444
        assert shells[0]["action"] == "alert"  # scan never acts


def test_ssh_remote_forward_to_a_real_sshd() -> None:
    require_root()
    with sshd("127.0.0.1") as server:
        argv = server.ssh_argv("-N", "-R", "127.0.0.1:0:localhost:22", "root@127.0.0.1")
        tunnel = subprocess.Popen(argv, stderr=subprocess.PIPE)
        try:

            def connected() -> bool:
                out = subprocess.run(
                    ["ss", "-tnp", "dst", f"127.0.0.1:{server.port}"],
                    capture_output=True,
                    text=True,
                ).stdout
                return f"pid={tunnel.pid}," in out

            wait_until(connected)
            found = findings_for(scan_json(), tunnel.pid)
            assert set(found) == {"tunnel-ssh-remote-forward"}
            assert found["tunnel-ssh-remote-forward"]["reason"] == "name ssh; option -R"
        finally:
            kill(tunnel)
        # the same sshd used the ordinary way is not an alert
        plain = subprocess.run(server.ssh_argv("root@127.0.0.1", "true"), timeout=20, check=False)
        assert plain.returncode == 0


def test_ordinary_client_connected_to_8080_is_clean() -> None:
    with listener("127.0.7.7", 8080) as web:
        client = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import socket,time; s=socket.create_connection(('127.0.7.7',8080)); time.sleep(30)",
            ]
        )
        try:
            wait_until(lambda: web.accepted)
            assert findings_for(scan_json(), client.pid) == {}
        finally:
            kill(client)


def test_exit_status_clean_in_an_empty_pid_namespace() -> None:
    require_root()
    require(shutil.which("unshare") is not None, "unshare missing")
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "rome_guard", "scan"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 finding(s)" in result.stderr
    # a clean scan says what it could not look at
    assert "wire rule(s) not evaluated: a snapshot cannot see bytes" in result.stderr
    assert "miner-stratum-method" in result.stderr


def test_json_names_the_wire_rules_a_snapshot_cannot_evaluate(tmp_path: Path) -> None:
    document = scan_json()
    assert "miner-pool-sni" in document["not_evaluated"]["rules"]
    assert "cannot see bytes" in document["not_evaluated"]["why"]
    site = tmp_path / "no-wire.yaml"
    site.write_text("disable:\n  - {tag: wire}\n")  # every wire rule carries the tag
    assert scan_json("--rules", str(site))["not_evaluated"] is None


def test_exit_status_error_on_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("mode: enforce\nsensor: laser\n")
    result = run_scan("--config", str(config))
    assert result.returncode == 2
    assert f"{config}:2:1: sensor must be one of auto, ebpf, poll" in result.stderr


def test_extra_rules_and_env_attribution(tmp_path: Path) -> None:
    rules = tmp_path / "extra.yaml"
    rules.write_text(
        "rules:\n  - id: sleeper\n    category: custom\n    severity: low\n"
        "    description: a marker process\n    match: {arg: [rg-marker-8123]}\n"
    )
    config = tmp_path / "config.yaml"
    config.write_text("attribution:\n  env_keys: [ROME_ROLLOUT]\n")
    proc = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 30", "rg-marker-8123"],
        env={"ROME_ROLLOUT": "rollout-42"},
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.2)
        doc = scan_json("--rules", str(rules), "--config", str(config))
        found = findings_for(doc, proc.pid)
        assert set(found) == {"sleeper"}
        assert found["sleeper"]["process"]["env"] == {"ROME_ROLLOUT": "rollout-42"}
    finally:
        kill(proc)
