"""The process model (rome_guard/state/processes.py) fed the events a real
fork and exec produce: a child is built from its parent once, at exec, and
lineage walks through children that never exec."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

from rome_guard import procfs
from rome_guard.events import Endpoint, ExecEvent, ForkEvent, ProcessKey
from rome_guard.state.processes import ProcessModel

NS_PER_TICK = 10_000_000


def _model_with_self() -> tuple[ProcessModel, object]:
    model = ProcessModel()
    me = procfs.read_process(os.getpid())
    assert me is not None
    model.table.add(me)
    return model, me


def _fork(parent: int, child: int) -> ForkEvent:
    start = procfs.start_time(child)
    assert start is not None
    return ForkEvent(parent_pid=parent, child_pid=child, timestamp_ns=start * NS_PER_TICK)


def test_an_exec_after_a_fork_takes_the_parents_context_and_the_kernels_argv(tmp_path):
    model, me = _model_with_self()
    child = subprocess.Popen(["sleep", "30"], cwd=tmp_path)
    try:
        model.forked(_fork(os.getpid(), child.pid))  # Popen returns once it has exec'd
        assert len(model) == 1  # nothing built at fork
        info = model.execed(
            ExecEvent(
                pid=child.pid,
                ppid=os.getpid(),
                filename="/bin/sleep",
                argv=("sleep", "30"),
                timestamp_ns=0,
                uid=os.getuid(),
                comm="sleep",
            )
        )
        assert info.key.start_time == procfs.start_time(child.pid)
        assert info.ppid == os.getpid() and info.cmdline == ("sleep", "30")
        assert info.exe.endswith("/sleep") and info.comm == "sleep"
        assert info.cwd == me.cwd  # the parent's: the exec path reads no cwd
        assert info.cgroup == me.cgroup and info.user == me.user
        assert model.lineage(info)[0].key == me.key
        model.exited(child.pid)
        assert model.known(child.pid) is None
    finally:
        child.kill()
        child.wait()


def test_a_child_that_never_execs_is_built_when_asked_and_joins_lineage():
    model, me = _model_with_self()
    # a subshell forks a grandchild that execs: the subshell itself never execs
    shell = subprocess.Popen(["sh", "-c", "sleep 30; :"])
    try:
        deadline = time.monotonic() + 10
        grandchild = None
        while grandchild is None and time.monotonic() < deadline:
            for pid in procfs.list_pids():
                try:
                    if procfs.read_stat(pid).ppid == shell.pid:
                        grandchild = pid
                except procfs.ProcessGone:
                    continue
            time.sleep(0.01)
        assert grandchild is not None
        model.forked(_fork(os.getpid(), shell.pid))
        model.forked(_fork(shell.pid, grandchild))
        info = model.execed(
            ExecEvent(
                pid=grandchild,
                ppid=shell.pid,
                filename="/bin/sleep",
                argv=("sleep", "30"),
                timestamp_ns=0,
                comm="sleep",
            )
        )
        # the subshell was never exec'd: lineage builds it from its own parent
        chain = model.lineage(info)
        assert [p.pid for p in chain[:2]] == [shell.pid, os.getpid()]
        assert chain[0].cmdline == me.cmdline  # a fork is its parent's image
        assert model.exited(shell.pid) is not None
    finally:
        shell.kill()
        shell.wait()


def test_cgroup_path_of_an_id_walks_once_per_id_and_survives_no_hierarchy(monkeypatch):
    from rome_guard.linux import NoCgroup2
    from rome_guard.state import processes as module

    walks = []

    def walk(cgroup_id, root=None):
        walks.append(cgroup_id)
        if cgroup_id == 3:
            raise NoCgroup2("no cgroup2 mount")
        return {7: "/system.slice/x.service"}.get(cgroup_id, "")

    monkeypatch.setattr(module, "cgroup_path_of_id", walk)
    model = ProcessModel()
    assert model.cgroup_path_of(7) == model.cgroup_path_of(7) == "/system.slice/x.service"
    assert model.cgroup_path_of(9) == model.cgroup_path_of(9) == ""  # gone: asked once
    assert model.cgroup_path_of(0) == ""
    assert model.cgroup_path_of(3) == ""
    assert walks == [7, 9, 3]


def test_a_flow_is_blamed_on_its_connector_never_on_a_reused_pid():
    model, me = _model_with_self()
    connected_at = (me.key.start_time + 5) * NS_PER_TICK  # CLOCK_BOOTTIME ns
    assert model.connected_by(me.pid, connected_at, 0, "x", 0) is me
    before_start = (me.key.start_time - 5) * NS_PER_TICK  # the pid was someone else's then
    stranger = model.connected_by(me.pid, before_start, 1000, "miner", 0)
    assert stranger is not me
    assert (stranger.comm, stranger.uid, stranger.key.start_time) == ("miner", 1000, 0)


def test_a_resync_adds_only_what_the_model_lost_and_keeps_its_identities():
    """The /proc re-read after lost events: a process whose exec was lost
    is added (not pre-existing); a known one keeps its record, and every
    live process comes back under the model's identity, so judging it
    again still alerts once."""
    model = ProcessModel()
    model.seed()
    me = model.known(os.getpid())
    parent = model.known(os.getppid())
    assert me is not None and me.pre_existing and parent is not None
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while os.path.basename(os.readlink(f"/proc/{child.pid}/exe")) != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert model.known(child.pid) is None  # its exec was never seen
        subjects = {s.process.pid: s for s in model.seed(resync=True)}
        added = model.known(child.pid)
        assert added is not None and not added.pre_existing
        assert subjects[child.pid].process.key == added.key
        assert model.known(os.getpid()) is me  # not replaced
        assert subjects[os.getppid()].process.key == parent.key
        assert os.getpid() not in subjects  # the guard never judges itself
    finally:
        child.kill()
        child.wait()


def test_a_rename_is_read_afresh_once_and_the_first_external_connect_once(tmp_path):
    """Issue 11's identity re-reads, now in the model: a process that
    renamed itself (prctl) and rewrote nothing else is known by its new comm;
    the first connect outside loopback re-reads it once, later ones not."""
    model = ProcessModel()
    script = "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'rgrenamed', 0, 0, 0); sys.stdout.write('x\\n'); sys.stdout.flush(); time.sleep(30)"
    child = subprocess.Popen(["python3", "-c", script], stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        assert child.stdout.readline() == b"x\n"
        before = procfs.read_process(child.pid)
        assert before is not None and before.comm == "rgrenamed"
        stale = replace(before, comm="python3")
        model.table.add(stale)
        renamed = model.renamed(child.pid, "rgrenamed")
        assert renamed is not None and renamed.comm == "rgrenamed"
        assert model.known(child.pid).comm == "rgrenamed"
        assert model.renamed(child.pid, "rgrenamed") is None  # nothing changed since
        model.table.add(stale)
        assert model.first_external_connect(stale).comm == "rgrenamed"
        model.table.add(stale)
        assert model.first_external_connect(stale) is None  # once per process
        assert model.exe_now(stale) == before.exe  # the same file: read now
        other = replace(stale, exe="/usr/bin/other")
        assert model.exe_now(other) == ""  # another image since: not this one's fact
    finally:
        child.kill()
        child.wait()


def test_socket_stdio_is_remembered_for_lineage_and_forgotten_at_exit():
    model = ProcessModel()
    key = ProcessKey(4242, 1)
    connected = Endpoint("tcp", 4, "10.0.0.1", 5555, "10.0.0.2", 4444, "ESTABLISHED")
    listening = Endpoint("tcp", 4, "0.0.0.0", 4444, "0.0.0.0", 0, "LISTEN")
    model.socket_stdio.remember(key, {0: connected, 1: listening})
    info = procfs.read_process(os.getpid())
    assert info is not None
    assert model.socket_stdio.of(info) == {}
    mine = replace(info, key=key)
    assert model.socket_stdio.of(mine) == {0: connected}  # a listener is no peer
    model.table.add(mine)
    model.exited(4242)
    assert model.socket_stdio.of(mine) == {}


# A parent with the rollout id in its environment forks a child that exits
# at once and is never reaped: the child's environ reads as empty (a zombie,
# like a miner killed at exec), so its exec can only carry its parent's.
ZOMBIE_PARENT = (
    "import os, sys, time\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os._exit(0)\n"
    "print(pid, flush=True)\n"
    "time.sleep(30)\n"
)


def test_env_keys_are_captured_at_exec_and_inherited_when_unreadable():
    env = dict(os.environ, RG_ROLLOUT_ID="rollout-7")
    parent = subprocess.Popen(
        [sys.executable, "-c", ZOMBIE_PARENT], env=env, stdout=subprocess.PIPE
    )
    try:
        child = int(parent.stdout.readline())
        model = ProcessModel(env_keys=["RG_ROLLOUT_ID"])
        known = model.resolve(parent.pid)
        assert known is not None
        assert dict(known.attribution.env) == {"RG_ROLLOUT_ID": "rollout-7"}
        assert known.attribution.env_inherited_from == 0  # its own, read now
        while procfs.read_stat(child).state != "Z":
            time.sleep(0.01)
        exec_event = ExecEvent(
            child, parent.pid, "/tmp/xmrig", ("/tmp/xmrig",), time.monotonic_ns()
        )
        info = model.execed(exec_event)
        assert dict(info.attribution.env) == {"RG_ROLLOUT_ID": "rollout-7"}
        assert info.attribution.env_inherited_from == parent.pid
    finally:
        parent.kill()
        parent.wait()
