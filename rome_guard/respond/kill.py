"""Kill offenders from user space, and never the wrong process.

The engine hands over the alerted process (a ``ProcessInfo``, identity =
pid + start time) and a scope: ``process``, ``tree`` (it and its
descendants), ``cgroup`` (cgroup v2 ``cgroup.kill``) or ``container``.
Right before any signal the identity is re-checked through a pidfd opened
*before* the check, so a pid reused since the alert is never signalled:
if /proc shows the alerted start time after ``pidfd_open``, the pidfd is
the alerted process. The outcome goes into the alert as a ``KillResult``.

The offender is its identity: an exec by the process itself keeps its pid
and start time (``nc -e /bin/sh`` becomes sh), so it is still the process
alerted on and is killed as such; its new image is checked against the
protections like any other.

This module must never: signal a process whose pid and start time were
not verified that way; signal pid 1, kernel threads, the daemon or its
ancestors, sshd's listener or anything the ``protect`` config names; kill a
host-critical cgroup (the root, init.scope, slices, runtime parents); run
in monitor mode.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Iterator

from rome_guard.attribution import container_id
from rome_guard.config import ProtectConfig
from rome_guard.detect.rules import KILL_SCOPES
from rome_guard.events import ProcessInfo, ProcessKey
from rome_guard.linux import cgroup2_root, listening_tcp_inodes, read_cgroup, without_deleted
from rome_guard.procfs import (
    PROC,
    ProcessGone,
    list_pids,
    read_process,
    read_stat,
    socket_inodes,
    start_time,
)
from rome_guard.textsafe import one_line

KILLED = "killed"
ALREADY_EXITED = "already_exited"
KILL_FAILED = "kill_failed"
PROTECTED = "protected"


# cgroups that group many unrelated workloads: killing one is never a
# response to one offender. Any *.slice is refused as well.
CRITICAL_CGROUP_NAMES = frozenset(
    {"init.scope", "kubepods", "besteffort", "burstable", "guaranteed", "docker", "lxc"}
    | {"machine", "containerd", "system", "user", "libpod_parent", "podruntime", "runtime"}
)
SSHD_NAMES = ("sshd",)
_GONE = "gone"
# A fork caught between our /proc scans can add children; each round stops
# every member, so this bound is only reached by a pathological tree.
_MAX_DISCOVERY_ROUNDS = 64


@dataclass(frozen=True)
class KillResult:
    outcome: str  # KILLED | ALREADY_EXITED | KILL_FAILED | PROTECTED
    reason: str = ""  # sanitised, safe for logs and JSON
    pids: tuple[int, ...] = ()  # processes signalled (cgroup: its members)


# --- pure decisions ---------------------------------------------------------


def configured_protection(info: ProcessInfo, protect: ProtectConfig) -> str | None:
    """Why the operator's protect list covers info, or None."""
    exe = without_deleted(info.exe)
    for pattern in protect.exe:
        if exe and fnmatchcase(exe, pattern):
            return f"protected exe {one_line(pattern)}"
    for pattern in protect.comm:
        if fnmatchcase(info.comm, pattern):
            return f"protected comm {one_line(pattern)}"
    unit = info.attribution.unit
    for pattern in protect.unit:
        if unit and fnmatchcase(unit, pattern):
            return f"protected unit {one_line(pattern)}"
    return None


def critical_cgroup_reason(path: str) -> str | None:
    """Why killing the cgroup at path (relative to the cgroup2 root) would
    hit the host rather than one workload, or None."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "the root cgroup holds the whole host"
    name = parts[-1]
    if name in CRITICAL_CGROUP_NAMES:
        return f"host-critical cgroup {one_line(path)}"
    if name.endswith(".slice"):
        return f"cgroup {one_line(path)} is a slice of many units"
    return None


def container_cgroup(path: str, cid: str) -> str | None:
    """The cgroup of the container with id cid that path lies in: the path
    up to the first component naming the container."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if cid in part:
            return "/".join(parts[: i + 1]) or "/"
    return None


# --- /proc and cgroupfs ---------------------------------------------------------


def _cgroup_members(directory: str) -> list[int]:
    """Every pid in the cgroup at directory and its descendants."""
    pids: list[int] = []
    for current, _dirs, files in os.walk(directory):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(current, "cgroup.procs")) as f:
                pids += [int(line) for line in f.read().split()]
        except FileNotFoundError:
            continue  # removed while we walked
    return pids


@dataclass
class _Member:
    key: ProcessKey
    pidfd: int
    live: ProcessInfo


class Killer:
    """Signals verified processes; enforce mode only."""

    def __init__(
        self,
        protect: ProtectConfig | None = None,
        *,
        mode: str,
        cgroup_root: str | None = None,
        proc: str = PROC,
    ):
        if mode != "enforce":
            raise ValueError(f"the killer acts only in enforce mode, not {mode!r}")
        self._protect = protect or ProtectConfig()
        self._cgroup_root = cgroup_root
        self._proc = proc

    # --- protection ---

    def _daemon_lineage(self) -> set[ProcessKey]:
        keys = set()
        pid = os.getpid()
        while pid > 0:
            try:
                stat = read_stat(pid, self._proc)
            except ProcessGone:
                break
            keys.add(ProcessKey(pid, stat.start_time))
            pid = stat.ppid
        return keys

    def _is_sshd_listener(self, info: ProcessInfo) -> bool:
        if info.uid != 0 or posixpath.basename(without_deleted(info.exe)) not in SSHD_NAMES:
            return False
        listening = listening_tcp_inodes(info.pid, self._proc)
        return any(inode in listening for inode in socket_inodes(info.pid, self._proc))

    def is_protected(self, info: ProcessInfo) -> str | None:
        """Why info must never be killed, or None."""
        if info.pid == 1:
            return "pid 1"
        if info.kernel_thread or info.pid == 2 or info.ppid == 2:
            return "kernel thread"
        if info.key in self._daemon_lineage():
            return "rome-guard itself or one of its ancestors"
        if self._is_sshd_listener(info):
            return "sshd listener"
        return configured_protection(info, self._protect)

    # --- identity ---

    def _open(self, key: ProcessKey) -> tuple[_Member | None, str]:
        """A pidfd for key, verified after opening; (None, why) otherwise.
        Only (pid, start time) is compared: an exec since the alert is the
        offender's own doing and does not make it another process."""
        try:
            pidfd = os.pidfd_open(key.pid)
        except ProcessLookupError:
            return None, _GONE
        except OSError as exc:
            return None, f"pidfd_open({key.pid}): {exc.strerror}"
        live = read_process(key.pid, proc=self._proc)
        if live is None or live.key != key or live.zombie:
            os.close(pidfd)
            return None, _GONE
        return _Member(key, pidfd, live), ""

    @staticmethod
    def _send(member: _Member, sig: int) -> bool:
        """False when the process exited after verification."""
        try:
            signal.pidfd_send_signal(member.pidfd, sig)
        except ProcessLookupError:
            return False
        return True

    # --- kill ---

    def kill(
        self,
        target: ProcessInfo,
        scope: str = "process",
        descendants: Iterable[ProcessInfo] = (),
    ) -> KillResult:
        """SIGKILL target within scope. descendants (from the process table)
        add to those found in /proc for scope ``tree``: a daemonised
        grandchild is no longer a child of anyone we can see."""
        if scope not in KILL_SCOPES:
            raise ValueError(f"unknown kill scope {scope!r} (known: {', '.join(KILL_SCOPES)})")
        reason = self.is_protected(target)
        if reason:
            return KillResult(PROTECTED, f"pid {target.pid}: {reason}")
        try:
            if scope == "process":
                return self._kill_process(target)
            if scope == "tree":
                return self._kill_tree(target, descendants)
            return self._kill_cgroup(target, scope)
        except OSError as exc:
            return KillResult(KILL_FAILED, one_line(str(exc)))

    @contextlib.contextmanager
    def _verified(self, target: ProcessInfo) -> Iterator[tuple[_Member | None, KillResult | None]]:
        """The target's pidfd, opened and checked against the alerted
        identity, with the refusal to act (gone or protected, as it is now)
        if there is one. The pidfd is closed on leaving."""
        member, problem = self._open(target.key)
        if member is None:
            yield None, _not_opened(problem)
            return
        try:
            reason = self.is_protected(member.live)
            yield member, KillResult(PROTECTED, f"pid {target.pid}: {reason}") if reason else None
        finally:
            os.close(member.pidfd)

    def _kill_process(self, target: ProcessInfo) -> KillResult:
        with self._verified(target) as (member, refusal):
            if refusal is not None:
                return refusal
            if not self._send(member, signal.SIGKILL):
                return KillResult(ALREADY_EXITED)
            return KillResult(KILLED, pids=(target.pid,))

    def _new_children(self, members: dict[ProcessKey, _Member]) -> list[ProcessKey]:
        parents = {key.pid: key.start_time for key in members}
        found = []
        for pid in list_pids(self._proc):
            try:
                stat = read_stat(pid, self._proc)
            except ProcessGone:
                continue
            key = ProcessKey(pid, stat.start_time)
            parent_start = parents.get(stat.ppid)
            # A child starts after its parent; anything else is a reused pid.
            if key not in members and parent_start is not None and key.start_time >= parent_start:
                found.append(key)
        return found

    def _kill_tree(self, target: ProcessInfo, descendants: Iterable[ProcessInfo]) -> KillResult:
        members: dict[ProcessKey, _Member] = {}
        stopped: list[_Member] = []
        try:
            for info in (target, *descendants):
                if info.key in members:
                    continue
                member, problem = self._open(info.key)
                if member is not None:
                    members[info.key] = member
                elif info is target and problem != _GONE:
                    return KillResult(KILL_FAILED, problem)
            # Stop first, parents before children, so nobody forks past us.
            pending = sorted(members.values(), key=lambda m: m.key.start_time)
            for _ in range(_MAX_DISCOVERY_ROUNDS):
                for member in pending:
                    reason = self.is_protected(member.live)
                    if reason:
                        self._resume(stopped)
                        return KillResult(PROTECTED, f"pid {member.key.pid}: {reason}")
                    if self._send(member, signal.SIGSTOP):
                        stopped.append(member)
                pending = []
                for key in self._new_children(members):
                    member, _problem = self._open(key)
                    if member is not None:
                        members[key] = member
                        pending.append(member)
                if not pending:
                    break
            killed = tuple(m.key.pid for m in stopped if self._send(m, signal.SIGKILL))
            if not killed:
                return KillResult(ALREADY_EXITED)
            return KillResult(KILLED, pids=killed)
        except OSError:
            self._resume(stopped)
            raise
        finally:
            for member in members.values():
                os.close(member.pidfd)

    def _resume(self, stopped: list[_Member]) -> None:
        for member in stopped:
            self._send(member, signal.SIGCONT)

    def _root(self) -> str:
        if self._cgroup_root is None:
            self._cgroup_root = cgroup2_root()
        return self._cgroup_root

    def _kill_cgroup(self, target: ProcessInfo, scope: str) -> KillResult:
        with self._verified(target) as (_member, refusal):
            if refusal is not None:
                return refusal
            live_path = read_cgroup(target.pid, self._proc)
            if live_path is None or start_time(target.pid, self._proc) != target.key.start_time:
                return KillResult(ALREADY_EXITED)
            if scope == "cgroup":
                if target.cgroup and live_path != target.cgroup:
                    return KillResult(
                        KILL_FAILED,
                        f"moved from cgroup {one_line(target.cgroup)} to "
                        f"{one_line(live_path)} since the alert",
                    )
                path: str | None = live_path
            else:
                cid = target.attribution.container_id or container_id(live_path)
                path = container_cgroup(live_path, cid) if cid else None
                if path is None:
                    return KillResult(KILL_FAILED, f"not in a container: {one_line(live_path)}")
            reason = critical_cgroup_reason(path)
            if reason:
                return KillResult(PROTECTED, reason)
            return self._kill_cgroup_path(path)

    def _kill_cgroup_path(self, path: str) -> KillResult:
        directory = os.path.join(self._root(), path.lstrip("/"))
        pids = _cgroup_members(directory)
        for pid in pids:
            info = read_process(pid, proc=self._proc)
            reason = self.is_protected(info) if info is not None else None
            if reason:
                return KillResult(PROTECTED, f"cgroup {one_line(path)} holds pid {pid}: {reason}")
        kill_file = os.path.join(directory, "cgroup.kill")
        if os.path.exists(kill_file):
            with open(kill_file, "w") as f:
                f.write("1")
            return KillResult(KILLED, pids=tuple(sorted(pids)))
        return self._kill_each(pids)  # kernels before 5.14 have no cgroup.kill

    def _kill_each(self, pids: list[int]) -> KillResult:
        killed = []
        for pid in pids:
            now = start_time(pid, self._proc)
            if now is None:
                continue
            member, _problem = self._open(ProcessKey(pid, now))
            if member is None:
                continue
            try:
                if self._send(member, signal.SIGKILL):
                    killed.append(pid)
            finally:
                os.close(member.pidfd)
        if not killed:
            return KillResult(ALREADY_EXITED)
        return KillResult(KILLED, pids=tuple(killed))


def _not_opened(problem: str) -> KillResult:
    if problem == _GONE:
        return KillResult(ALREADY_EXITED)
    return KillResult(KILL_FAILED, problem)
