"""The process model (rome_guard/state/processes.py) fed the events a real
fork and exec produce: a child is built from its parent once, at exec, and
lineage walks through children that never exec."""

from __future__ import annotations

import os
import subprocess
import time

from rome_guard.events import ExecEvent, ForkEvent
from rome_guard.sensors import procfs
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
