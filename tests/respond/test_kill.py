"""Killing from user space: real processes, real cgroups, real pid reuse.

Every process these tests start is a throwaway `sleep` (or a renamed copy
of it); cgroups are created under the cgroup2 root as rg-test-* and removed
afterwards, even when a test fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import shutil
import signal
import subprocess
import time
from dataclasses import replace

import pytest

from rome_guard.config import ProtectConfig
from rome_guard.events import ProcessInfo, ProcessKey
from rome_guard.linux import cgroup2_root
from rome_guard.procfs import read_process, read_stat
from rome_guard.respond.kill import (
    ALREADY_EXITED,
    KILL_FAILED,
    KILLED,
    PROTECTED,
    Killer,
    configured_protection,
    container_cgroup,
    critical_cgroup_reason,
)
from tests.conftest import require_root
from tests.fixtures.network import sshd, wait_until
from tests.fixtures.processes import process_info

SLEEP = shutil.which("sleep") or "/bin/sleep"

# --- pure decisions (no root) ----------------------------------------------------


def test_killer_refuses_monitor_mode() -> None:
    with pytest.raises(ValueError, match="enforce"):
        Killer(ProtectConfig(), mode="monitor")


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "",
        "/init.scope",
        "/system.slice",
        "/user.slice/user-1000.slice",
        "/kubepods",
        "/kubepods/besteffort",
        "/docker",
        "/machine.slice",
    ],
)
def test_host_critical_cgroups_are_refused(path: str) -> None:
    assert critical_cgroup_reason(path)


@pytest.mark.parametrize(
    "path",
    [
        "/system.slice/docker-" + "a" * 64 + ".scope",
        "/slurm/job_42",
        "/rg-test-x/job",
        "/system.slice/ssh-tunnel.service",
    ],
)
def test_workload_cgroups_may_be_killed(path: str) -> None:
    assert critical_cgroup_reason(path) is None


def test_container_cgroup_is_the_component_naming_the_container() -> None:
    cid = "b" * 64
    assert container_cgroup(f"/system.slice/docker-{cid}.scope", cid) == (
        f"/system.slice/docker-{cid}.scope"
    )
    assert container_cgroup(f"/docker/{cid}/inner", cid) == f"/docker/{cid}"
    assert container_cgroup("/system.slice/foo.service", cid) is None


def _info(**changes: object) -> ProcessInfo:
    return process_info(**changes)


def test_configured_protection_matches_exe_comm_and_unit_globs() -> None:
    from rome_guard.events import Attribution

    protect = ProtectConfig(exe=["/usr/bin/python3*"], comm=["nvidia-*"], unit=["slurm*.service"])
    assert configured_protection(_info(), protect)
    assert configured_protection(_info(exe="/tmp/x", comm="nvidia-smi"), protect)
    unit = Attribution(unit="slurmd.service")
    assert configured_protection(_info(exe="/tmp/x", attribution=unit), protect)
    assert configured_protection(_info(exe="/tmp/x (deleted)", comm="x"), protect) is None
    deleted = _info(exe="/usr/bin/python3.11 (deleted)")
    assert configured_protection(deleted, protect), "an upgraded binary stays protected"


# --- helpers for the real tests ------------------------------------------------------


def _spawn(argv: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(argv or [SLEEP, "1000"], stdin=subprocess.DEVNULL)


def _info_of(pid: int) -> ProcessInfo:
    # Popen returns after exec started; wait until /proc shows the new image.
    for _ in range(1000):
        info = read_process(pid)
        assert info is not None, f"pid {pid} vanished"
        if info.comm not in ("python", "python3", "pytest"):
            return info
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never finished exec")


def _exited(pid: int, timeout: float = 60.0) -> bool:
    """True once pid has exited (a safety bound, not a timing assertion)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(fd)


def _alive(proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        return False
    return read_stat(proc.pid).state not in ("Z", "X")


@pytest.fixture
def procs():
    """Processes a test starts. The test process is made a child subreaper,
    so orphans (children of a killed shell) come back to it: pid 1 on these
    hosts does not reap, and every leftover is killed and reaped here."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)
        for pid in _children(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] or _children(os.getpid()):
                time.sleep(0.01)


@pytest.fixture
def killer() -> Killer:
    require_root()
    return Killer(ProtectConfig(comm=["rgprotected"]), mode="enforce")


@pytest.fixture
def cgroups():
    """Make cgroups under the cgroup2 root; kill their members and remove
    them afterwards."""
    require_root()
    root = cgroup2_root()
    made: list[str] = []

    def make(rel: str) -> str:
        path = os.path.join(root, rel)
        os.makedirs(path)
        made.append(path)
        return path

    yield make
    for path in sorted(made, key=len, reverse=True):
        if not os.path.isdir(path):
            continue
        for current, _dirs, _files in os.walk(path, topdown=False):
            with open(os.path.join(current, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                _exited(pid)
            for _ in range(500):
                try:
                    os.rmdir(current)
                    break
                except OSError:
                    time.sleep(0.01)  # the kernel drops a dead member lazily


def _move(proc: subprocess.Popen, cgroup_dir: str) -> None:
    with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
        f.write(str(proc.pid))


# --- process scope and identity ---------------------------------------------------


def test_process_scope_kills_only_the_verified_target(killer, procs) -> None:
    target, bystander = _spawn(), _spawn()
    procs += [target, bystander]
    result = killer.kill(_info_of(target.pid))
    assert result.outcome == KILLED
    assert result.pids == (target.pid,)
    assert target.wait() == -signal.SIGKILL
    assert _alive(bystander)


def test_target_gone_is_already_exited(killer, procs) -> None:
    target = _spawn()
    procs.append(target)
    info = _info_of(target.pid)
    target.kill()
    target.wait()
    assert killer.kill(info).outcome == ALREADY_EXITED


def test_other_start_time_on_the_same_pid_is_never_signalled(killer, procs) -> None:
    """The alerted identity is a process that used this pid before."""
    newcomer = _spawn()
    procs.append(newcomer)
    live = _info_of(newcomer.pid)
    earlier = replace(live, key=ProcessKey(live.pid, live.key.start_time - 1))
    for scope in ("process", "tree", "cgroup"):
        assert killer.kill(earlier, scope).outcome == ALREADY_EXITED
    assert _alive(newcomer)


def _set_last_pid(value: int) -> None:
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(value))


def test_real_pid_reuse_never_kills_the_newcomer(killer, procs) -> None:
    """The alerted process exits, its pid is handed to a new process (same
    program, same exe) via ns_last_pid, then the kill arrives."""
    original = _spawn()
    procs.append(original)
    alerted = _info_of(original.pid)
    original.kill()
    original.wait()
    # A new clock tick, so the newcomer's start time differs: (pid, start
    # time) in 10 ms ticks is the identity, as everywhere in rome-guard.
    while _ticks_now() <= alerted.key.start_time + 1:
        time.sleep(0.02)
    newcomer = None
    for _ in range(500):
        _set_last_pid(alerted.pid - 1)
        candidate = _spawn()
        procs.append(candidate)
        if candidate.pid == alerted.pid:
            newcomer = candidate
            break
        candidate.kill()
    assert newcomer is not None, "could not reuse the pid"
    reborn = _info_of(newcomer.pid)
    assert reborn.exe == alerted.exe and reborn.key != alerted.key
    assert killer.kill(alerted).outcome == ALREADY_EXITED
    assert killer.kill(alerted, "tree").outcome == ALREADY_EXITED
    assert _alive(newcomer)


def _ticks_now() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * 100)


def test_an_exec_by_the_offender_itself_does_not_save_it(killer, procs, tmp_path) -> None:
    """nc -e /bin/sh: alerted as one program, it execs another under the
    same pid and start time. Still the offender: killed, not refused."""
    marker = tmp_path / "execed"
    target = _spawn(
        ["sh", "-c", f"while [ ! -e {marker} ]; do sleep 0.05; done; exec {SLEEP} 1000"]
    )
    procs.append(target)
    alerted = _info_of(target.pid)
    marker.touch()
    wait_until(lambda: (read_process(target.pid) or alerted).exe != alerted.exe)
    now = read_process(target.pid)
    assert now is not None and now.key == alerted.key and now.exe != alerted.exe
    result = killer.kill(alerted)
    assert result.outcome == KILLED, result.reason
    target.wait(10)
    assert not _alive(target)


# --- protection ----------------------------------------------------------------------


def test_builtin_protection(killer) -> None:
    init = read_process(1)
    assert init is not None and killer.is_protected(init) == "pid 1"
    kthreadd = read_process(2)
    assert kthreadd is not None and killer.is_protected(kthreadd) == "kernel thread"
    parent = read_process(os.getppid())
    assert parent is not None and "ancestors" in (killer.is_protected(parent) or "")
    me = read_process(os.getpid())
    assert me is not None
    for scope in ("process", "tree", "cgroup", "container"):
        result = killer.kill(me, scope)
        assert result.outcome == PROTECTED, scope  # and we are still running


def test_configured_comm_survives_every_scope(killer, procs, tmp_path) -> None:
    protected_sleep = tmp_path / "rgprotected"
    shutil.copy(SLEEP, protected_sleep)
    target = _spawn([str(protected_sleep), "1000"])
    procs.append(target)
    info = _info_of(target.pid)
    for scope in ("process", "tree", "cgroup", "container"):
        assert killer.kill(info, scope).outcome == PROTECTED
    assert _alive(target)


def test_tree_with_a_protected_member_is_refused_and_left_running(killer, procs, tmp_path) -> None:
    protected_sleep = tmp_path / "rgprotected"
    shutil.copy(SLEEP, protected_sleep)
    shell = _spawn(["/bin/sh", "-c", f"{protected_sleep} 1000 & {SLEEP} 1000 & wait"])
    procs.append(shell)
    children = _wait_children(shell.pid, 2)
    result = killer.kill(_info_of(shell.pid), "tree")
    assert result.outcome == PROTECTED
    assert "rgprotected" in result.reason
    for pid in [shell.pid, *children]:
        assert read_stat(pid).state not in ("T", "t", "Z"), "a refused tree must be resumed"


def test_sshd_listener_is_protected(killer) -> None:
    with sshd("127.0.0.9") as server:
        info = read_process(server.process.pid)
        assert info is not None
        assert killer.is_protected(info) == "sshd listener"
        assert killer.kill(info).outcome == PROTECTED
        assert killer.kill(info, "tree").outcome == PROTECTED
        assert server.process.poll() is None


# --- tree ------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if read_stat(int(name)).ppid == pid:
                    found.append(int(name))
            except Exception:
                continue
    return found


def _wait_children(pid: int, count: int) -> list[int]:
    for _ in range(3000):
        children = [c for c in _children(pid) if (read_process(c) or _info()).comm != "sh"]
        if len(children) >= count:
            return children
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never had {count} children")


def test_tree_kills_descendants_and_daemonised_ones_it_is_told_about(
    killer, procs, tmp_path
) -> None:
    ready = tmp_path / "daemon.pid"
    shell = _spawn(
        [
            "/bin/sh",
            "-c",
            f"({SLEEP} 1000 & echo $! > {ready}) ; {SLEEP} 1000 & {SLEEP} 1000 & wait",
        ]
    )
    bystander = _spawn()
    procs += [shell, bystander]
    children = _wait_children(shell.pid, 2)
    for _ in range(3000):
        if ready.exists() and ready.read_text().strip():
            break
        time.sleep(0.01)
    daemonised = int(ready.read_text())
    assert read_stat(daemonised).ppid != shell.pid  # no longer in the tree
    told = [_info_of(daemonised)]
    result = killer.kill(_info_of(shell.pid), "tree", descendants=told)
    assert result.outcome == KILLED
    assert set(result.pids) == {shell.pid, daemonised, *children}
    assert shell.wait() == -signal.SIGKILL
    for pid in (daemonised, *children):
        assert _exited(pid)
    assert _alive(bystander)


# --- cgroup and container ------------------------------------------------------------


def test_cgroup_scope_kills_the_whole_cgroup_and_nothing_else(killer, procs, cgroups) -> None:
    base = f"rg-test-{secrets.token_hex(4)}"
    cgroups(base)
    job = cgroups(f"{base}/job")
    job_step = cgroups(f"{base}/job/step")
    other = cgroups(f"{base}/other")
    target, peer, stepper, bystander = _spawn(), _spawn(), _spawn(), _spawn()
    procs += [target, peer, stepper, bystander]
    _move(target, job)
    _move(peer, job)
    _move(stepper, job_step)
    _move(bystander, other)
    info = _info_of(target.pid)
    assert info.cgroup == f"/{base}/job"
    result = killer.kill(info, "cgroup")
    assert result.outcome == KILLED, result.reason
    assert set(result.pids) == {target.pid, peer.pid, stepper.pid}
    for proc in (target, peer, stepper):
        assert proc.wait() == -signal.SIGKILL
    assert _alive(bystander)


def test_cgroup_scope_refuses_the_root_and_slices(killer, procs, cgroups) -> None:
    target = _spawn()
    procs.append(target)
    info = _info_of(target.pid)
    if info.cgroup != "/":
        with open(os.path.join(cgroup2_root(), "cgroup.procs"), "w") as f:
            f.write(str(target.pid))
        info = _info_of(target.pid)
    result = killer.kill(info, "cgroup")
    assert result.outcome == PROTECTED
    assert "root" in result.reason
    slice_dir = cgroups(f"rg-test-{secrets.token_hex(4)}.slice")
    _move(target, slice_dir)
    result = killer.kill(_info_of(target.pid), "cgroup")
    assert result.outcome == PROTECTED
    assert "slice" in result.reason
    assert _alive(target)


def test_cgroup_holding_a_protected_process_is_refused(killer, procs, cgroups, tmp_path) -> None:
    protected_sleep = tmp_path / "rgprotected"
    shutil.copy(SLEEP, protected_sleep)
    job = cgroups(f"rg-test-{secrets.token_hex(4)}")
    target, guarded = _spawn(), _spawn([str(protected_sleep), "1000"])
    procs += [target, guarded]
    _move(target, job)
    _move(guarded, job)
    result = killer.kill(_info_of(target.pid), "cgroup")
    assert result.outcome == PROTECTED
    assert str(guarded.pid) in result.reason
    assert _alive(target) and _alive(guarded)


def test_cgroup_moved_since_the_alert_is_not_killed(killer, procs, cgroups) -> None:
    base = f"rg-test-{secrets.token_hex(4)}"
    first, second = cgroups(base + "-a"), cgroups(base + "-b")
    target, peer = _spawn(), _spawn()
    procs += [target, peer]
    _move(target, first)
    alerted = _info_of(target.pid)
    _move(target, second)
    _move(peer, second)
    result = killer.kill(alerted, "cgroup")
    assert result.outcome == KILL_FAILED
    assert "moved" in result.reason
    assert _alive(target) and _alive(peer)


def test_container_scope_kills_the_container(killer, procs, cgroups) -> None:
    base = f"rg-test-{secrets.token_hex(4)}.slice"
    cid, other_cid = secrets.token_hex(32), secrets.token_hex(32)
    cgroups(base)
    container = cgroups(f"{base}/docker-{cid}.scope")
    inner = cgroups(f"{base}/docker-{cid}.scope/init")
    neighbour = cgroups(f"{base}/docker-{other_cid}.scope")
    target, sibling, bystander = _spawn(), _spawn(), _spawn()
    procs += [target, sibling, bystander]
    _move(target, inner)
    _move(sibling, container)
    _move(bystander, neighbour)
    info = _info_of(target.pid)
    assert info.attribution.container_id == cid
    result = killer.kill(info, "container")
    assert result.outcome == KILLED, result.reason
    assert set(result.pids) == {target.pid, sibling.pid}
    assert target.wait() == -signal.SIGKILL
    assert sibling.wait() == -signal.SIGKILL
    assert _alive(bystander)


def test_container_scope_outside_a_container_fails(killer, procs, cgroups) -> None:
    target = _spawn()
    procs.append(target)
    _move(target, cgroups(f"rg-test-{secrets.token_hex(4)}"))
    info = _info_of(target.pid)
    assert info.attribution.container_id is None
    result = killer.kill(info, "container")
    assert result.outcome == KILL_FAILED
    assert "not in a container" in result.reason
    assert _alive(target)
