"""Effective ssh configuration: parsing ssh -G, and asking the real ssh."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from rome_guard.detect.argv import ssh_descriptor_config
from rome_guard.events import (
    SSH_UNKNOWN_CHANGED,
    SSH_UNKNOWN_DELETED,
    SSH_UNKNOWN_DESCRIPTOR,
    SSH_UNKNOWN_FAILED,
    SSH_UNKNOWN_NOT_A_FILE,
    SSH_UNKNOWN_SKIPPED,
    SSH_UNKNOWN_TIMEOUT,
)
from rome_guard.procfs import start_time
from rome_guard.sensors.sshconfig import (
    EffectiveSshConfig,
    SshConfigUnknown,
    parse_effective,
)
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
    # the same argv with the file rewritten: asked again (a benign first run
    # must not vouch for a second one with a forward)
    cfg.write_text("Host h1\n  HostName 127.0.0.1\n  RemoteForward 9000 localhost:22\n")
    assert config.forwards(info).kinds() == {"remote": "9000 [localhost]:22"} and config.runs == 2
    # never for an argv with -G (the guard's own ssh -G is an ssh exec too)
    assert config.forwards(process_info(cmdline=("ssh", "-G", "h1"), uid=os.geteuid())) is None
    gone = process_info(uid=os.geteuid(), cmdline=("ssh", "-F", "/nonexistent", "h1"))
    assert config.forwards(gone) == SshConfigUnknown(SSH_UNKNOWN_DELETED, "-F /nonexistent is gone")


def test_a_slow_config_costs_the_guard_one_timeout_then_nothing(tmp_path) -> None:
    """Match exec runs a command while ssh -G evaluates the config: a slow
    one is cut at the timeout (with everything it started) and that user
    is not asked again for a while."""
    cfg = tmp_path / "cfg"
    cfg.write_text('Match exec "sleep 30"\n  DynamicForward 1080\nHost *\n  User x\n')
    config = EffectiveSshConfig(timeout_s=0.5)
    slow = process_info(uid=os.geteuid(), cwd=str(tmp_path), cmdline=("ssh", "-F", "cfg", "h1"))
    assert config.forwards(slow).reason == SSH_UNKNOWN_TIMEOUT
    other = process_info(uid=os.geteuid(), cwd=str(tmp_path), cmdline=("ssh", "-F", "cfg", "h2"))
    assert config.forwards(other).reason == SSH_UNKNOWN_SKIPPED
    assert config.runs == 1 and config.skipped == 1
    assert config.status()["unknown"] == {SSH_UNKNOWN_TIMEOUT: 1, SSH_UNKNOWN_SKIPPED: 1}


@pytest.mark.parametrize(
    "argv",
    [
        ("ssh", "-F", "/dev/stdin", "-N", "h1"),
        ("ssh", "-NF/dev/fd/2", "h1"),
        ("ssh", "h1", "-F", "/proc/self/fd/0", "-N"),
        ("ssh", "-F", "/dev/fd/63", "h1"),  # bash's <(...)
    ],
)
def test_a_config_from_a_descriptor_cannot_be_established(argv) -> None:
    """Only the client could read it: ssh -G is not run (it would read the
    guard's own stdin) and the answer says why."""
    config = EffectiveSshConfig()
    found = config.forwards(process_info(uid=os.geteuid(), cmdline=argv))
    assert found.reason == SSH_UNKNOWN_DESCRIPTOR and "descriptor" in found.detail
    assert config.runs == 0 and ssh_descriptor_config(argv) is not None
    assert ssh_descriptor_config(("ssh", "-F", "/etc/ssh/ssh_config", "h1")) is None


def test_the_config_file_is_read_through_the_clients_root_and_judged_by_its_times(
    tmp_path,
) -> None:
    """A real process (sleep, standing in for the client) in tmp_path: its
    -F file is read through /proc/PID/root and handed to ssh -G; rewritten
    after the process started it is "changed"; a fifo is "not_a_file"."""
    cfg = tmp_path / "cfg"
    cfg.write_text("Host h1\n  HostName 127.0.0.1\n  RemoteForward 9000 localhost:22\n")
    time.sleep(0.05)
    client = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        info = process_info(
            pid=client.pid,
            start=start_time(client.pid),
            uid=os.geteuid(),
            cwd=str(tmp_path),
            cmdline=("ssh", "-N", "h1", "-F", "cfg"),
        )
        found = EffectiveSshConfig().forwards(info)
        assert found.kinds() == {"remote": "9000 [localhost]:22"}
        time.sleep(0.05)
        cfg.write_text("Host h1\n  HostName 127.0.0.1\n")  # after the start: hidden
        assert EffectiveSshConfig().forwards(info).reason == SSH_UNKNOWN_CHANGED
        cfg.unlink()
        assert EffectiveSshConfig().forwards(info).reason == SSH_UNKNOWN_DELETED
        os.mkfifo(cfg)
        assert EffectiveSshConfig().forwards(info).reason == SSH_UNKNOWN_NOT_A_FILE
    finally:
        client.kill()
        client.wait()


def test_ssh_g_failing_is_an_unknown_config_with_its_message(tmp_path) -> None:
    cfg = tmp_path / "cfg"
    cfg.write_text("Host h1\n  NoSuchKeyword yes\n")
    found = EffectiveSshConfig().forwards(
        process_info(uid=os.geteuid(), cwd=str(tmp_path), cmdline=("ssh", "-F", "cfg", "h1"))
    )
    assert found.reason == SSH_UNKNOWN_FAILED and "Bad configuration option" in found.detail
