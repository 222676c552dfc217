"""Identity changes after exec: renames, and a first connect outside loopback.

A miner can start as ``./helper``, overwrite its argv area and call
prctl(PR_SET_NAME, "xmrig"): judged at exec it was ``helper``. The sensor
reports the rename (task:task_rename, exec's own renames left out) and
this handler reads the process's identity afresh -- comm, cmdline, exe --
and judges it again as what it now says it is.

The same fresh read happens once per process when it first connects
outside loopback (an argv rewritten without a rename is seen then).

Reads /proc only for the renamed or newly connecting process; never acts
(findings go to the daemon's raise_alerts()).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from rome_guard.detect.subject import Subject
from rome_guard.events import ProcessInfo, RenameEvent
from rome_guard.sensors import procfs


def refreshed_identity(known: ProcessInfo, comm: str = "") -> ProcessInfo | None:
    """known with comm, cmdline and exe as /proc shows them now; None when
    the process is gone or is another process under a reused pid."""
    fresh = procfs.read_process(known.pid)
    if fresh is None or abs(fresh.key.start_time - known.key.start_time) > 1:
        return None
    return replace(
        known,
        comm=fresh.comm or comm or known.comm,
        cmdline=fresh.cmdline or known.cmdline,
        exe=fresh.exe or known.exe,
    )


def exe_now(info: ProcessInfo) -> str:
    """info's executable as /proc shows it now, when it is still the same
    file (only " (deleted)" may have been added since exec); "" when the
    process has exec'd another program since, or is gone: the event being
    judged belongs to the image info describes."""
    current = procfs.read_exe(info.pid)
    if current.removesuffix(" (deleted)") == info.exe.removesuffix(" (deleted)"):
        return current
    return ""


def on_rename(guard: Any, event: RenameEvent) -> None:
    known = guard.resolve(event.pid)
    if known is None:
        return
    info = refreshed_identity(known, event.new_comm)
    if info is None:
        info = replace(known, comm=event.new_comm)
    if info == known:
        return
    _judge_again(guard, info)


MAX_CONNECTED_REMEMBERED = 65536


def on_first_external_connect(guard: Any, info: ProcessInfo) -> ProcessInfo:
    """The first connect of a process outside loopback: read its identity
    afresh and, if it changed since exec, judge it again. Returns the
    process as now known."""
    seen = guard.externally_connected
    if info.key in seen:
        return info
    if len(seen) >= MAX_CONNECTED_REMEMBERED:
        seen.clear()
    seen.add(info.key)
    fresh = refreshed_identity(info)
    if fresh is None or fresh == info:
        return info
    _judge_again(guard, fresh)
    return fresh


def _judge_again(guard: Any, info: ProcessInfo) -> None:
    guard.table.add(info)
    subject = Subject(
        info,
        lambda: guard.table.lineage(info),
        list(guard.connections_of(info)),
        lambda: guard.stdio_of_pid(info.pid),
        guard.socket_stdio.of,
        lambda: exe_now(info),
    )
    guard.raise_alerts(guard.engine.evaluate(subject))
