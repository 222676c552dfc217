"""Fork: a new process, its parent's image under a new identity until it
execs. Only the process model changes; no rule looks at a bare fork.

Like every handler, it never reads /proc itself (ctx.processes does) and never
writes the journal except through ctx.alerts.
"""

from __future__ import annotations

from rome_guard.events import ForkEvent
from rome_guard.handlers.context import Context


def on_fork(ctx: Context, event: ForkEvent) -> None:
    ctx.processes.forked(event)
