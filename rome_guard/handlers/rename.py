"""Rename events: a process that names itself anew after exec.

A miner can start as ``./helper``, overwrite its argv area and call
prctl(PR_SET_NAME, "xmrig"): judged at exec it was ``helper``. The sensor
reports the rename (task:task_rename, exec's own renames left out) and
this handler reads the process's identity afresh -- comm, cmdline, exe --
and judges it again as what it now says it is.

Reads /proc only for the renamed process; never acts (findings go to the
daemon's raise_alerts()).
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
