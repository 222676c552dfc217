"""Identity changes after exec: renames, and a first connect outside loopback.

A miner can start as ``./helper``, overwrite its argv area and call
prctl(PR_SET_NAME, "xmrig"): judged at exec it was ``helper``. The sensor
reports the rename (task:task_rename, exec's own renames left out; it
wakes the daemon when the new name is one the rules index, else the next
drain reads it) and the process model reads the process's identity
afresh -- comm, cmdline, exe -- so it is judged again as what it now says
it is.

The same fresh read happens once per process when it first connects
outside loopback (an argv rewritten without a rename is seen then): the
connect handler calls ``judge_again`` when the identity changed.
"""

from __future__ import annotations

from rome_guard.events import ProcessInfo, RenameEvent
from rome_guard.handlers.context import Context


def on_rename(ctx: Context, event: RenameEvent) -> None:
    info = ctx.processes.renamed(event.pid, event.new_comm)
    if info is not None:
        judge_again(ctx, info)


def judge_again(ctx: Context, info: ProcessInfo) -> None:
    """Every rule, over the process as it now is (exe facts read now)."""
    processes = ctx.processes
    subject = processes.subject(info, processes.peers(info), exe_now=True)
    ctx.alerts.raise_alerts(ctx.rules.engine.evaluate(subject))
