"""Effective ssh configuration: parsing ssh -G, and asking the real ssh."""

from __future__ import annotations

import os

from rome_guard.sensors.sshconfig import EffectiveSshConfig, parse_effective
from tests.fixtures.processes import process_info

G_OUTPUT = """user root
hostname 127.0.0.1
tunnel false
remoteforward 127.0.0.1:9000 localhost:22
dynamicforward 127.0.0.1:1080
"""


def test_parse_effective() -> None:
    forwards = parse_effective(G_OUTPUT)
    assert forwards.kinds() == {
        "remote": "127.0.0.1:9000 localhost:22",
        "dynamic": "127.0.0.1:1080",
    }
    assert parse_effective("tunnel point-to-point\n").kinds() == {"tunnel": "point-to-point"}
    assert parse_effective("tunnel false\nlocalforward x\n").kinds() == {"local": "x"}


def test_asks_the_real_ssh_with_the_process_arguments(tmp_path) -> None:
    cfg = tmp_path / "cfg"
    cfg.write_text("Host h1\n  HostName 127.0.0.1\n  DynamicForward 1080\n")
    config = EffectiveSshConfig()
    info = process_info(
        uid=os.geteuid(), cwd=str(tmp_path), comm="ssh", cmdline=("ssh", "-F", "cfg", "h1")
    )
    assert config.forwards(info).kinds() == {"dynamic": "1080"}  # -F relative to its cwd
    assert config.forwards(info) is not None and config.runs == 1  # cached
    # never for an argv with -G (the guard's own ssh -G is an ssh exec too)
    assert config.forwards(process_info(cmdline=("ssh", "-G", "h1"), uid=os.geteuid())) is None
    unreadable = process_info(uid=os.geteuid(), cmdline=("ssh", "-F", "/nonexistent", "h1"))
    assert config.forwards(unreadable) is None


def test_a_slow_config_costs_the_guard_one_timeout_then_nothing(tmp_path) -> None:
    """Match exec runs a command while ssh -G evaluates the config: a slow
    one is cut at the timeout (with everything it started) and that user
    is not asked again for a while."""
    cfg = tmp_path / "cfg"
    cfg.write_text('Match exec "sleep 30"\n  DynamicForward 1080\nHost *\n  User x\n')
    config = EffectiveSshConfig(timeout_s=0.5)
    slow = process_info(uid=os.geteuid(), cwd=str(tmp_path), cmdline=("ssh", "-F", "cfg", "h1"))
    assert config.forwards(slow) is None
    other = process_info(uid=os.geteuid(), cwd=str(tmp_path), cmdline=("ssh", "-F", "cfg", "h2"))
    assert config.forwards(other) is None
    assert config.runs == 1 and config.skipped == 1
