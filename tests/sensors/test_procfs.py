"""The /proc reader against real processes, including hostile ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from rome_guard import procfs
from rome_guard.events import ProcessKey
from rome_guard.findings import process_record
from rome_guard.state.table import ProcessTable
from rome_guard.textsafe import command_line, one_line

HOSTILE = [
    "line1\nline2",  # forged log line
    "\x1b[31mred\x1b[0m\r",  # terminal escapes
    "ünïcødé",
    "A" * 100 * 1024,  # 100 KiB argument
]
INVALID_UTF8 = b"\xff\xfe\xc3("


@pytest.fixture
def hostile_process():
    argv = [os.fsencode(a) for a in ["/bin/sleep", "30"]]
    # sleep ignores extra args after the duration only if given as a suffix:
    # run it through sh with the hostile args as positional parameters
    args = (
        [b"/bin/sh", b"-c", b"sleep 30", b"name"] + [a.encode() for a in HOSTILE] + [INVALID_UTF8]
    )
    proc = subprocess.Popen(args, env={"ROLLOUT_ID": "rollout-7\nforged", "PATH": "/bin"})
    time.sleep(0.2)
    yield proc
    proc.kill()
    proc.wait()
    del argv


def test_reads_real_process_with_hostile_argv(hostile_process) -> None:
    info = procfs.read_process(hostile_process.pid, env_keys=["ROLLOUT_ID"])
    assert info is not None
    assert info.key == ProcessKey(hostile_process.pid, procfs.start_time(hostile_process.pid))
    assert info.ppid == os.getpid()
    assert info.cmdline[:3] == ("/bin/sh", "-c", "sleep 30")
    assert list(info.cmdline[4:8]) == HOSTILE
    assert os.fsencode(info.cmdline[8]) == INVALID_UTF8  # no byte lost
    assert info.exe.endswith("sh") or "dash" in info.exe
    assert dict(info.attribution.env) == {"ROLLOUT_ID": "rollout-7\nforged"}
    # serialised: valid strict JSON on one line, invalid bytes shown as \xNN
    line = json.dumps(process_record(info), ensure_ascii=False)
    assert "\n" not in line
    decoded = json.loads(line)
    assert decoded["cmdline"][8] == "\\xff\\xfe\\xc3("
    line.encode("utf-8")  # strict: no lone surrogates
    # logged: one line, bounded, no escapes
    shown = command_line(info.cmdline)
    assert "\n" not in shown and "\x1b" not in shown and len(shown) < 400
    assert "\\x1b" in one_line(HOSTILE[1])


def test_vanished_process_is_none_not_an_error() -> None:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait()
    assert procfs.read_process(proc.pid) is None
    assert procfs.start_time(proc.pid) is None


def test_zombie_and_kernel_thread() -> None:
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    time.sleep(0.3)  # exited, not yet reaped: a zombie
    info = procfs.read_process(zombie.pid)
    assert info is not None and info.zombie and info.cmdline == ()
    zombie.wait()
    kthreadd = procfs.read_process(2)
    assert kthreadd is not None and kthreadd.kernel_thread and kthreadd.exe == ""


def test_comm_with_spaces_and_parens(tmp_path) -> None:
    script = tmp_path / "a) b (c"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(0o755)
    proc = subprocess.Popen([str(script)])
    try:
        time.sleep(0.2)
        info = procfs.read_process(proc.pid)
        assert info is not None and info.comm == "a) b (c"
        assert info.ppid == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_table_lineage_and_pid_reuse_guard() -> None:
    table = ProcessTable()
    table.extend(procfs.iter_processes())
    me = table.by_pid(os.getpid())
    assert me is not None
    chain = table.lineage(me)
    assert chain and chain[-1].pid == 1 or chain[-1].ppid == 0
    # a "parent" that started after its child is a reused pid, not a parent
    from dataclasses import replace

    child = replace(me, key=ProcessKey(999999, 10), ppid=me.pid)
    assert table.parent(child) is None
    late_child = replace(me, key=ProcessKey(999998, me.key.start_time + 1), ppid=me.pid)
    assert table.parent(late_child) == me


def test_stdio_socket_detection() -> None:
    import socket

    a, b = socket.socketpair()
    proc = subprocess.Popen(["/bin/sleep", "30"], stdin=a, stdout=a)
    try:
        stdio = procfs.stdio_socket_inodes(proc.pid)
        assert set(stdio) == {0, 1}
        assert stdio[0] == os.fstat(a.fileno()).st_ino
    finally:
        proc.kill()
        proc.wait()
        a.close()
        b.close()
