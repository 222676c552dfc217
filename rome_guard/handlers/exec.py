"""Exec: a process becomes a new program. The model records the new
image; every match rule that can concern a program of these names is
evaluated, lineage, stdio sockets and an ssh client's effective forwards
computed only if a rule asks.

Like every handler, it never reads /proc itself (ctx.processes does) and never
writes the journal except through ctx.alerts.
"""

from __future__ import annotations

from rome_guard.events import ExecEvent
from rome_guard.handlers.context import Context


def on_exec(ctx: Context, event: ExecEvent) -> None:
    info = ctx.processes.execed(event)
    subject = ctx.processes.subject(info, ssh_forwards=ctx.ssh.forwards)
    ctx.alerts.raise_alerts(ctx.rules.engine.evaluate(subject))
