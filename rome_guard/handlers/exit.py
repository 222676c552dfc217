"""Exit: the process leaves the model (kept a grace period for late
events) and the stateful detectors forget it.

Like every handler, it never reads /proc itself (ctx.processes does) and never
writes the journal except through ctx.alerts.
"""

from __future__ import annotations

from rome_guard.events import ExitEvent
from rome_guard.handlers.context import Context


def on_exit(ctx: Context, event: ExitEvent) -> None:
    info = ctx.processes.exited(event.pid)
    if info is not None:
        for detector in ctx.rules.fanout:
            detector.forget(info)
