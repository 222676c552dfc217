"""Prevention: the kernel denied a connect or killed at exec on its own
(rome_guard/bpf/prevent.c). Journal it with the rule that asked for it and
what the kernel did; a denied connect then also runs through the connect
handler, so network rules and fanout see the attempt.

Like every handler, it never reads /proc itself (ctx.processes does) and never
writes the journal except through ctx.alerts.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from rome_guard.events import PreventionEvent
from rome_guard.findings import Finding
from rome_guard.handlers.connect import on_connect
from rome_guard.handlers.context import Context
from rome_guard.respond.enforce import rule_for

log = logging.getLogger("rome_guard")


def on_prevention(ctx: Context, event: PreventionEvent) -> None:
    processes = ctx.processes
    info = processes.resolve(event.pid) or processes.unattributed(
        event.pid, event.comm, event.timestamp_ns
    )
    if event.filename:  # killed at exec: it died as the new program, not its parent's copy
        info = replace(info, comm=event.comm, exe=event.filename)
    policy = ctx.rules.policy
    rule = rule_for(policy, event) if policy is not None else None
    if rule is None:
        log.warning("kernel %s pid=%d with no matching rule", event.kind, event.pid)
        return
    connect = event.connect_event()
    finding = Finding(
        rule,
        info,
        f"in-kernel {event.action}: {event.kind}",
        tuple(processes.lineage(info)),
        network=connect.endpoint if connect is not None else None,
    )
    ctx.alerts.prevented(finding, event.action)
    if connect is not None:
        on_connect(ctx, connect)
