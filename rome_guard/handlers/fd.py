"""fd events: an inet socket duplicated onto stdin, stdout or stderr.

Python connects, os.dup2()s the socket onto 0, 1 and 2, then pty.spawn()s
a shell: judged at exec, Python had a terminal; the shell it spawns has a
pty. The sensor reports the dup (dup, dup2, dup3, fcntl F_DUPFD*, checked
at syscall exit; the record always wakes the daemon), and this handler
re-judges the process at that moment with its real stdio. The process
model remembers which processes have a connected socket on their stdio
(``state.processes.SocketStdio``), so a shell's lineage (the pty case) is
judged from memory, without reading /proc at every exec.

The model reads /proc only for the process an fd event names (rare: a
shell pipeline's dup2 of a pipe never reaches user space).
"""

from __future__ import annotations

from rome_guard.events import FdDupEvent
from rome_guard.handlers.context import Context


def on_fd_dup(ctx: Context, event: FdDupEvent) -> None:
    """Re-judge the process whose stdio just became a socket."""
    processes = ctx.processes
    info = processes.resolve(event.pid)
    if info is None:
        return  # gone already: its children's exec carries the socket stdio
    stdio = processes.stdio_now(info)
    if not stdio:
        return  # the fd was reused for something else since socket() (see process.c)
    subject = processes.subject(info, processes.peers(info), stdio=stdio, exe_now=True)
    ctx.alerts.raise_alerts(ctx.rules.engine.evaluate(subject))
