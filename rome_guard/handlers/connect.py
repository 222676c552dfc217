"""Connect: a TCP connect (attempt and outcome) or a datagram destination.

A new distinct peer of a process re-runs the rules that have network
conditions (exe facts read at that moment: a binary deleted since exec);
every connect and datagram feeds the fanout (scan) detectors, whose verdict
names the process to blame and the actor's kind (the record's ``actor``). The first connect of a
process outside loopback re-reads its identity once and, if it changed
since exec, re-judges it with every rule (handlers.rename). A connect of
a pid the model does not know yet is parked until its exec or fork
arrives (events of two ring buffers can cross), and dropped, counted, after
sensor_filter.park_unknown_ms.

Like every handler, it never reads /proc itself (ctx.processes does) and never
writes the journal except through ctx.alerts.
"""

from __future__ import annotations

import logging
import time

from rome_guard.events import CONNECT_ATTEMPT, ConnectEvent
from rome_guard.findings import Finding
from rome_guard.handlers.context import Context, Parked
from rome_guard.handlers.fd import judge_shells_near
from rome_guard.handlers.rename import judge_again

log = logging.getLogger("rome_guard")


def on_connect(ctx: Context, event: ConnectEvent) -> None:
    processes = ctx.processes
    info = processes.resolve(event.pid)
    if info is None:
        limit_s = ctx.config.sensor_filter.park_unknown_ms / 1000
        ctx.parked.append(Parked(event, time.monotonic() + limit_s))
        return
    ep = event.endpoint
    if not ep.is_loopback and ep.daddr not in ("0.0.0.0", "::"):
        fresh = processes.first_external_connect(info)
        if fresh is not None:  # renamed or argv rewritten since exec
            judge_again(ctx, fresh)
            info = fresh
    judge_shells_near(ctx, info)  # the relay of a shell on a fifo/pty connected only now?
    if event.outcome == CONNECT_ATTEMPT or ep.dport:
        peers = processes.new_peer(info, ep)
        if peers is not None:
            subject = processes.subject(info, peers, exe_now=True)  # deleted since exec?
            ctx.alerts.raise_alerts(
                ctx.rules.engine.evaluate(subject, trigger=ep, network_only=True)
            )
    if ctx.rules.fanout:
        parent = processes.parent(info)
        for detector in ctx.rules.fanout:
            for verdict, blamed in detector.observe(
                info, parent, ep.daddr, ep.dport, event.outcome, proto=ep.proto
            ):
                lineage = tuple(processes.lineage(blamed))
                ctx.alerts.raise_alert(
                    Finding(
                        verdict.rule,
                        blamed,
                        f"{verdict.actor_kind}: {verdict.reason}",
                        lineage,
                        ep,
                        extra={"actor": verdict.actor},
                    )
                )


def retry_parked(ctx: Context) -> None:
    """Handle parked connects whose process is now known; drop the expired."""
    now = time.monotonic()
    for _ in range(len(ctx.parked)):
        parked = ctx.parked.popleft()
        pid = parked.event.pid
        if ctx.processes.known(pid) is not None:
            on_connect(ctx, parked.event)
        elif parked.until > now:
            ctx.parked.append(parked)
        else:
            # counted, exported and journaled with the rings' losses (Guard.check_lost)
            ctx.parked_dropped += 1
            log.warning(
                "event for unknown pid %s dropped after %d ms",
                pid,
                ctx.config.sensor_filter.park_unknown_ms,
            )
