"""The stdio graph over real processes, pipes, fifos and ptys (no root, no
kernel events): which process feeds a shell and reads it, and whether
that process holds a network connection."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rome_guard import procfs
from rome_guard.detect.argv import reads_commands_from_stdin
from rome_guard.events import ProcessInfo
from rome_guard.sensors import sockdiag
from rome_guard.state.stdio import PENDING_S, SWEEP_S, StdioGraph
from tests.fixtures.network import listener, wait_until

# A relay: connects (or not), starts `sh -i` with its stdin and stdout on
# pipes to itself (or stdout to a file), prints the shell's pid, waits.
RELAY = textwrap.dedent(
    """
    import socket, subprocess, sys, time
    host, port, stdout = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    s = socket.create_connection((host, port)) if port else None
    out = subprocess.PIPE if stdout == "pipe" else open(stdout, "w")
    sh = subprocess.Popen(["sh", "-i"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    print(sh.pid, flush=True)
    time.sleep(30)
    """
)


def _graph(clock=None) -> StdioGraph:
    def lineage(info: ProcessInfo) -> list[ProcessInfo]:
        chain, pid = [], info.ppid
        while pid > 1 and len(chain) < 8:
            parent = procfs.read_process(pid)
            if parent is None:
                break
            chain.append(parent)
            pid = parent.ppid
        return chain

    sockets = lambda: sockdiag.by_inode(sockdiag.list_sockets(owned_only=True))  # noqa: E731
    if clock is None:
        return StdioGraph(procfs.read_process, lineage, sockets)
    return StdioGraph(procfs.read_process, lineage, sockets, clock=clock)


def _relay(tmp_path: Path, port: int, stdout: str = "pipe", host: str = "127.0.32.1"):
    script = tmp_path / "relay.py"
    script.write_text(RELAY)
    proc = subprocess.Popen(
        [sys.executable, str(script), host, str(port), stdout],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    shell_pid = int(proc.stdout.readline())
    shell = wait_until(lambda: procfs.read_process(shell_pid))
    return proc, shell


def _stop(proc: subprocess.Popen) -> None:
    for pid in procfs.children_of(proc.pid):
        os.kill(pid, 9)
    proc.kill()
    proc.wait()


def test_a_relay_holding_a_connection_is_found_through_its_pipes(tmp_path: Path) -> None:
    with listener("127.0.32.1", 0) as attacker:
        proc, shell = _relay(tmp_path, attacker.port)
        try:
            wait_until(lambda: attacker.accepted)
            relays = _graph().relays(shell)
        finally:
            _stop(proc)
    assert [r.process.pid for r in relays] == [proc.pid]
    relay = relays[0]
    assert relay.input_via == ("pipe",) and relay.output_via == ("pipe",)
    assert (relay.socket.daddr, relay.socket.dport) == ("127.0.32.1", attacker.port)
    assert f"pid {proc.pid} " in relay.describe()


def test_output_only_to_the_connected_process_is_no_relay(tmp_path: Path) -> None:
    """Input from the relay but output to a file: the relay does not read
    the shell, so it does not drive it."""
    with listener("127.0.32.1", 0) as attacker:
        proc, shell = _relay(tmp_path, attacker.port, stdout=str(tmp_path / "out.log"))
        try:
            wait_until(lambda: attacker.accepted)
            graph = _graph()
            assert graph.relays(shell) == []
        finally:
            _stop(proc)
    assert len(graph) == 0  # its output is a file: no relay can ever read it, nothing pending


def test_a_shell_on_pipes_without_a_connection_waits_then_is_forgotten(tmp_path: Path) -> None:
    now = [100.0]
    graph = _graph(clock=lambda: now[0])
    proc, shell = _relay(tmp_path, 0)
    try:
        assert graph.relays(shell) == []
        relay = procfs.read_process(proc.pid)
        assert relay is not None
        # a connect by the relay (the shell's parent) asks at once
        assert graph.pending_near(relay) == [shell.key]
        assert graph.due() == []
        now[0] += SWEEP_S
        assert graph.due() == [shell.key]
        now[0] += PENDING_S
        assert graph.due() == []
        assert len(graph) == 0
    finally:
        _stop(proc)


def test_a_shell_on_its_own_terminal_or_files_is_not_read_further(tmp_path: Path) -> None:
    calls = []
    graph = StdioGraph(
        procfs.read_process,
        lambda info: calls.append(info) or [],
        lambda: {},
    )
    with open(tmp_path / "in", "w") as f:
        f.write("exit\n")
    with open(tmp_path / "in") as stdin:
        sh = subprocess.Popen(["sh", "-c", "sleep 5"], stdin=stdin, stdout=subprocess.DEVNULL)
    try:
        info = wait_until(lambda: procfs.read_process(sh.pid))
        assert graph.relays(info) == []
    finally:
        sh.kill()
        sh.wait()
    assert calls == []  # no neighbourhood was looked at
    assert len(graph) == 0


def test_fifo_and_pipe_ends_are_read_with_their_direction(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["sh", "-c", f"cat {fifo} | cat >/dev/null"])
    try:
        with open(fifo, "w") as writer:
            table = procfs.read_fds(os.getpid(), [writer.fileno()])
            end = table.ends[writer.fileno()]
            assert end.channel[0] == procfs.END_FIFO and end.writes and not end.reads
    finally:
        reader.wait(10)


@pytest.mark.parametrize(
    ("argv", "reads"),
    [
        (["sh", "-i"], True),
        (["/bin/sh"], True),
        (["-bash"], True),
        (["bash", "--norc", "--noprofile", "-i"], True),
        (["bash", "-s"], True),
        (["bash", "-"], True),
        (["python3"], True),
        (["python3", "-i", "tool.py"], True),
        (["node"], True),
        (["php", "-a"], True),
        (["sh", "-c", "make train"], False),
        (["bash", "-e", "-o", "pipefail", "/tmp/step.sh"], False),
        (["bash", "train.sh"], False),
        (["python3", "-m", "ipykernel_launcher", "-f", "k.json"], False),
        (["python3", "-W", "ignore", "train.py"], False),
        (["node", "-e", "x()"], False),
        (["perl", "-ne", "print"], False),
    ],
)
def test_reads_commands_from_stdin(argv: list[str], reads: bool) -> None:
    assert reads_commands_from_stdin(tuple(argv)) is reads


def test_a_storm_of_shells_on_pipes_is_deferred_past_the_read_budget(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("rome_guard.state.stdio.READS_PER_S", 3)
    graph = _graph(clock=lambda: 100.0)
    proc, shell = _relay(tmp_path, 0)
    try:
        for _ in range(5):
            assert graph.relays(shell) == []
    finally:
        _stop(proc)
    assert graph.deferred == 2  # the 4th and 5th: left pending for the sweep
    assert len(graph) == 1


def test_deferred_judgements_are_exported_by_the_daemon(tmp_path: Path, monkeypatch) -> None:
    """rome_guard_stdio_relay_judgements_deferred_total follows the graph
    the daemon judges shells with, counted once however often it is read."""
    from rome_guard.config import Config
    from rome_guard.daemon import Guard
    from rome_guard.detect.rules import load_rules
    from rome_guard.respond.journal import Journal
    from rome_guard.respond.metrics import GuardMetrics

    monkeypatch.setattr("rome_guard.state.stdio.READS_PER_S", 0)  # every read is over budget
    metrics = GuardMetrics(process_collector=False)
    guard = Guard(Config(), load_rules([]), Journal(str(tmp_path / "a.jsonl")), metrics=metrics)
    name = "rome_guard_stdio_relay_judgements_deferred_total"
    guard.export_health()
    assert metrics.registry.get_sample_value(name) == 0  # there from the first scrape
    proc, shell = _relay(tmp_path, 0)
    try:
        model = guard.ctx.processes
        for pid in (os.getpid(), proc.pid):  # the shell's neighbourhood, as the model holds it
            model.resolve(pid)
        held = model.resolve(shell.pid)
        assert held is not None and model.lineage(held)
        for _ in range(3):
            assert model.stdio_graph.relays(held) == []
    finally:
        _stop(proc)
    guard.export_health()
    guard.export_health()
    assert metrics.registry.get_sample_value(name) == 3
