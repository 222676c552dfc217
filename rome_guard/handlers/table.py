"""The handler table: which module handles which event kind.

A new event kind is one module in rome_guard/handlers/ with a function
``on_<kind>(ctx, event)`` and one line below. ``source`` is the metrics
label counted per event (rome_guard_events_total); None where the handler
counts itself or the event is not a sensor event.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, NamedTuple

from rome_guard.events import (
    ConnectEvent,
    ExecEvent,
    ExitEvent,
    FdDupEvent,
    ForkEvent,
    GpuOpenEvent,
    GpuSnapshot,
    PreventionEvent,
    RenameEvent,
    WireEvent,
)
from rome_guard.handlers.connect import on_connect
from rome_guard.handlers.context import Context
from rome_guard.handlers.exec import on_exec
from rome_guard.handlers.exit import on_exit
from rome_guard.handlers.fd import on_fd_dup
from rome_guard.handlers.fork import on_fork
from rome_guard.handlers.gpu import on_gpu_open, on_gpu_snapshot
from rome_guard.handlers.prevention import on_prevention
from rome_guard.handlers.rename import on_rename
from rome_guard.handlers.wire import on_wire
from rome_guard.textsafe import one_line

log = logging.getLogger("rome_guard")


class Handler(NamedTuple):
    source: str | None  # metrics event source, or None
    handle: Callable[[Context, Any], None]


HANDLERS: dict[type, Handler] = {
    ExecEvent: Handler("exec", on_exec),
    ForkEvent: Handler("fork", on_fork),
    ExitEvent: Handler("exit", on_exit),
    ConnectEvent: Handler("connect", on_connect),
    GpuOpenEvent: Handler("gpu_open", on_gpu_open),
    FdDupEvent: Handler("fd", on_fd_dup),
    RenameEvent: Handler("rename", on_rename),
    GpuSnapshot: Handler(None, on_gpu_snapshot),  # counted per GPU process
    PreventionEvent: Handler(None, on_prevention),
    WireEvent: Handler("payload", on_wire),
}


def dispatch(ctx: Context, event: object) -> None:
    """Hand event to its handler; an event kind without one is ignored.

    A handler that raises never ends the guard: the event is counted as
    lost (buffer "failed", which also triggers the /proc re-read that
    judges every live process again), the first failure of each kind is logged with
    its traceback and later ones in one line, and the loop goes on with
    the next event. Whoever can craft an input that trips a bug must not
    be able to switch detection off with it."""
    kind = type(event)
    handler = HANDLERS.get(kind)
    if handler is None:
        return
    if handler.source is not None:
        ctx.metrics.event(handler.source)
    try:
        handler.handle(ctx, event)
    except Exception as exc:  # noqa: BLE001 -- one event, never the guard
        ctx.failed_events += 1  # reported with the rings' losses (Guard.check_lost)
        first = kind not in ctx.failed_kinds
        ctx.failed_kinds.add(kind)
        log.error(
            "handling a %s failed, event dropped: %s",
            kind.__name__,
            one_line(f"{type(exc).__name__}: {exc}", 300),
            exc_info=first,
        )
