"""fd events: an inet socket duplicated onto stdin, stdout or stderr.

Python connects, os.dup2()s the socket onto 0, 1 and 2, then pty.spawn()s
a shell: judged at exec, Python had a terminal; the shell it spawns has a
pty. The sensor reports the dup (dup, dup2, dup3, fcntl F_DUPFD*, checked
at syscall exit), and this handler re-judges the process at that moment
with its real stdio. ``SocketStdio`` remembers which processes have a
connected socket on their stdio, so a shell's lineage (the pty case) is
judged from memory, without reading /proc at every exec.

This module reads /proc only for the process an fd event names (rare: a
shell pipeline's dup2 of a pipe never reaches user space) and never acts:
findings go to the daemon's raise_alerts().
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint, FdDupEvent, ProcessInfo, ProcessKey

MAX_REMEMBERED = 16384


class SocketStdio:
    """Processes known to have a connected inet socket on fd 0, 1 or 2:
    from fd events, exec-time checks and the start-up snapshot. Bounded:
    the oldest are forgotten first."""

    def __init__(self, limit: int = MAX_REMEMBERED):
        self.limit = limit
        self._known: OrderedDict[ProcessKey, dict[int, Endpoint]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def remember(self, key: ProcessKey, stdio: dict[int, Endpoint]) -> None:
        connected = {fd: ep for fd, ep in stdio.items() if ep.dport}
        if not connected:
            return
        self._known[key] = connected
        self._known.move_to_end(key)
        while len(self._known) > self.limit:
            self._known.popitem(last=False)

    def of(self, info: ProcessInfo) -> dict[int, Endpoint]:
        return self._known.get(info.key, {})

    def forget(self, key: ProcessKey) -> None:
        self._known.pop(key, None)


def on_fd_dup(guard: Any, event: FdDupEvent) -> None:
    """Re-judge the process whose stdio just became a socket."""
    info = guard.resolve(event.pid)
    if info is None:
        return  # gone already: its children's exec carries the socket stdio
    stdio = guard.stdio_of_pid(info.pid)
    if not stdio:
        return  # the fd was reused for something else since socket() (see process.c)
    guard.socket_stdio.remember(info.key, stdio)
    subject = Subject(
        info,
        lambda: guard.table.lineage(info),
        list(guard.connections_of(info)),
        stdio,
        guard.socket_stdio.of,
    )
    guard.raise_alerts(guard.engine.evaluate(subject))
