"""The running daemon's status, live: the file the daemon rewrites every
second while it handles events and every 2 s when it handles none
(``<run_dir>/status.json``, ``rewrite_due``), and the reading
`rome-guard status` makes of it.

The daemon writes the file from its event loop, so the file's age is the
daemon's pulse: a stopped, hung or dead daemon stops refreshing it.
``read_status`` says whether the daemon is running (its pid still has the
start time the file names) and how old the file is; past ``STALE_AFTER_S``
the status is stale. The JSON shape is versioned (``schema``) and only
grows. This module never reports a stale or orphaned file as a live daemon,
and never lets a failed write (a full /run) reach the daemon's loop.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from rome_guard.procfs import start_time
from rome_guard.report import table

log = logging.getLogger(__name__)

SCHEMA = 1
WRITE_EVERY_S = 1.0  # the daemon's refresh interval while it handles events
IDLE_WRITE_EVERY_S = 2.0  # and when it handled none since the last write
STALE_AFTER_S = 5.0  # older than this: the daemon is stopped or hung


class StatusUnavailable(Exception):
    """No status to show; the message says why in one line."""


@dataclass(frozen=True)
class StatusReading:
    state: dict[str, Any]  # what the daemon wrote
    age_s: float  # seconds since it wrote it
    running: bool  # its pid is alive with the same start time
    stale: bool  # older than STALE_AFTER_S

    @property
    def healthy(self) -> bool:
        return self.running and not self.stale

    def as_json(self) -> dict[str, Any]:
        """The daemon's document plus the reader's verdict (stable keys)."""
        return {
            **self.state,
            "age_s": round(self.age_s, 3),
            "running": self.running,
            "stale": self.stale,
        }


def own_start_ticks() -> int | None:
    """This process's start time, which the status file names with its pid
    (a reused pid then does not read as the daemon running)."""
    return start_time(os.getpid())


def rewrite_due(since_write_s: float, events_since_write: int) -> bool:
    """Whether the daemon rewrites the file at its once-a-second tick:
    every WRITE_EVERY_S while events come, every IDLE_WRITE_EVERY_S when
    none came since the last write (what else the file shows, the kernel's
    counters, changes every 5 s at most; two idle writes fit in
    STALE_AFTER_S). Half a tick of slack: the ticks are not exact."""
    every = WRITE_EVERY_S if events_since_write else IDLE_WRITE_EVERY_S
    return since_write_s >= every - WRITE_EVERY_S / 2


def write_status(path: str, status: dict[str, Any]) -> None:
    """Replace the status file atomically; a failure is logged, never raised."""
    tmp = f"{path}.tmp"
    # dumps, not dump: dump writes chunk by chunk from the pure-Python encoder
    text = json.dumps({"schema": SCHEMA, **status})
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:  # a full /run must not stop the guard either
        log.debug("status file not written: %s", exc)


def read_status(path: str, now: float | None = None) -> StatusReading:
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise StatusUnavailable(f"no running daemon (no status file {path})") from None
    except (OSError, ValueError) as exc:
        raise StatusUnavailable(f"unreadable status file {path}: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("time"), (int, float)):
        raise StatusUnavailable(f"status file {path} is not a rome-guard status")
    age = max(0.0, (time.time() if now is None else now) - state["time"])
    pid, ticks = state.get("pid"), state.get("start_ticks")
    running = isinstance(pid, int) and pid > 0 and start_time(pid) == ticks
    return StatusReading(state, age, running, age > STALE_AFTER_S)


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def human_time(epoch: float) -> str:
    moment = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def problem(reading: StatusReading) -> str | None:
    """Why the status cannot be trusted, in one line; None when live."""
    pid = reading.state.get("pid")
    if not reading.running:
        return (
            f"no running daemon: pid {pid} is gone (status written "
            f"{human_duration(reading.age_s)} ago)"
        )
    if reading.stale:
        return (
            f"status is stale: last written {human_duration(reading.age_s)} ago "
            f"(pid {pid} is stopped or hung; it refreshes at least every "
            f"{IDLE_WRITE_EVERY_S:.0f}s)"
        )
    return None


def render(reading: StatusReading) -> str:
    """The status for a terminal: a summary, then tables."""
    s = reading.state
    journal = s.get("journal") or {}
    started = s.get("started")
    lines = [
        f"rome-guard {s.get('version', '?')} on {s.get('host', '?')}, pid {s.get('pid')}"
        + (
            f", up {human_duration(s['time'] - started)} (since {human_time(started)})"
            if isinstance(started, (int, float))
            else ""
        ),
        f"status written {reading.age_s:.1f}s ago, at {human_time(s['time'])}",
        "",
    ]
    if journal.get("ok", True):
        journal_text = f"{journal.get('path', '?')}: ok"
    else:
        journal_text = (
            f"{journal.get('path', '?')}: FAILING ({journal.get('last_error', '')}); "
            f"{journal.get('spooled', 0)} record(s) waiting in memory, "
            f"{journal.get('dropped', 0)} dropped"
        )
    rows = [
        ("mode", s.get("mode", "?")),
        ("sensor", s.get("sensor", "?")),
        ("rules", f"{s.get('rules', 0):,}"),
        ("processes tracked", f"{s.get('processes_tracked', 0):,}"),
        ("events", f"{s.get('events', 0):,}"),
        ("alerts", f"{s.get('alerts', 0):,}"),
        ("journal", journal_text),
        ("journal errors", f"{journal.get('errors', 0):,}"),
    ]
    lines.append(table(("state", "value"), rows, 120))
    lost = s.get("events_lost") or {}
    lines.append("")
    lines.append(
        table(("ring or queue", "events lost"), [(k, f"{v:,}") for k, v in sorted(lost.items())])
        if lost
        else "events lost: none"
    )
    rejected = s.get("config_rejected") or []
    if s.get("metrics_unavailable"):
        lines += ["", f"metrics: NOT SERVED, {s['metrics_unavailable']} in use (retrying)"]
    if rejected:
        lines += ["", "left out (the guard runs without them):"]
        for item in rejected:
            lines.append(f"  {item.get('left_out', '?')} of {item.get('file', '?')}:")
            lines += [f"    {problem}" for problem in item.get("problems", [])[:20]]
    ssh = s.get("ssh_config")
    if isinstance(ssh, dict):
        unknown = ssh.get("unknown") or {}
        lines.append("")
        lines.append(
            f"ssh configs: {ssh.get('runs', 0):,} ssh -G run(s), "
            f"{ssh.get('skipped', 0):,} skipped; "
            + (
                "not established: "
                + ", ".join(f"{reason} {count:,}" for reason, count in sorted(unknown.items()))
                if unknown
                else "all established"
            )
        )
    outputs = s.get("outputs") or []
    if outputs:
        rows = [
            (
                f"{o.get('name', '?')} ({o.get('type', '?')})",
                o.get("target", ""),
                "up" if o.get("up") else f"FAILING: {o.get('last_error', '')}",
                f"{o.get('sent', 0):,}",
                f"{o.get('failed', 0):,}",
                f"{o.get('dropped', 0):,}",
                f"{o.get('queued', 0):,}/{o.get('queue_size', 0):,}",
            )
            for o in outputs
            if isinstance(o, dict)
        ]
        header = ("output", "target", "state", "sent", "failed", "dropped", "queued")
        lines.append("")
        lines.append(table(header, rows, 160))
    gpu = s.get("gpu")
    if isinstance(gpu, dict):
        sources = gpu.get("allocation_sources") or {}
        rows = [("nvml", "live" if gpu.get("nvml") else "unavailable")]
        rows += [(name, str(state)) for name, state in sorted(sources.items())]
        lines.append("")
        lines.append(table(("GPU source", "state"), rows, 120))
    return "\n".join(lines)
