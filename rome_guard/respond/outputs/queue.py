"""One alert output's delivery: a bounded queue drained by its own thread.

``Output`` takes records from the daemon's loop (``offer``: a deque append,
never a wait, never I/O) and hands them, one at a time and in order, to a
``Transport`` on a thread of its own. A send that fails is retried with
back-off (0.5 s doubling up to ``max_backoff``) until the receiver takes
it; meanwhile new records queue up to ``queue_size`` and past it are
dropped and counted: the alert journal already holds every record, an
output is a copy for the fleet's pipelines. A record the receiver refuses
for good (``Rejected``: an HTTP 400) is counted as failed and dropped, so
one bad record never stalls the rest.

This module never blocks the caller, never raises into the daemon's loop
and never decides what a record says (the formats live beside their
transports: syslog.py, webhook.py, journald.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from rome_guard.config import OUTPUT_SEVERITIES
from rome_guard.textsafe import one_line

log = logging.getLogger(__name__)

FIRST_BACKOFF_S = 0.5
ERROR_LOG_EVERY_S = 30.0  # at most one "output failing" line per output per interval


class Rejected(Exception):
    """The receiver refused this record for good: retrying cannot help."""


class Transport(Protocol):
    def send(self, payload: bytes) -> None:
        """Deliver one payload; OSError (or Rejected) when it did not arrive."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class OutputState:
    """What metrics and `rome-guard status` show about one output."""

    name: str
    type: str
    target: str  # where it sends (address or URL, without credentials)
    up: bool  # the last attempt was delivered (true before the first)
    sent: int
    failed: int  # attempts that did not arrive (each retry counts)
    dropped: int  # records given up: the queue was full, or the receiver refused them
    queued: int
    queue_size: int
    last_error: str


def severity_rank(severity: Any) -> int:
    """Rules' severities, low 0 to critical 3; records without one rank top."""
    if severity in OUTPUT_SEVERITIES:
        return OUTPUT_SEVERITIES.index(severity)
    return len(OUTPUT_SEVERITIES)


class Output:
    """A bounded queue, a transport and the thread between them."""

    def __init__(
        self,
        name: str,
        kind: str,
        target: str,
        transport: Transport,
        encode: Callable[[dict], bytes],
        queue_size: int = 1000,
        max_backoff: float = 30.0,
        min_severity: str = "low",
    ):
        self.name = name
        self.kind = kind
        self.target = target
        self._transport = transport
        self._encode = encode
        self._limit = queue_size
        self._max_backoff = max(max_backoff, FIRST_BACKOFF_S)
        self._min_rank = severity_rank(min_severity)
        self._queue: deque[dict] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self.sent = self.failed = self.dropped = 0
        self._up = True
        self._last_error = ""
        self._last_logged = 0.0
        self._thread = threading.Thread(
            target=self._drain, name=f"rome-guard-output-{name}", daemon=True
        )
        self._thread.start()

    def offer(self, record: dict) -> bool:
        """Queue a record for sending; False when it is filtered out or
        dropped (the queue is full). Never blocks, never raises."""
        if severity_rank(record.get("severity")) < self._min_rank:
            return False
        with self._wake:
            if self._closing or len(self._queue) >= self._limit:
                self.dropped += 1
                return False
            self._queue.append(record)
            self._wake.notify()
        return True

    def state(self) -> OutputState:
        with self._wake:
            return OutputState(
                self.name,
                self.kind,
                self.target,
                self._up,
                self.sent,
                self.failed,
                self.dropped,
                len(self._queue),
                self._limit,
                self._last_error,
            )

    def close(self, timeout: float = 1.0) -> None:
        """Send what the receiver takes within timeout, then stop; records
        left over are counted as dropped."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._wake:
            left = len(self._queue)
            self.dropped += left
            self._queue.clear()
        if left:
            log.warning("output %s closed with %d record(s) unsent", self.name, left)
        self._transport.close()

    # --- the output's thread ------------------------------------------------

    def _drain(self) -> None:
        backoff = FIRST_BACKOFF_S
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                record = self._queue[0]
            outcome = self._deliver(record)
            with self._wake:
                if outcome != "retry":
                    if self._queue and self._queue[0] is record:
                        self._queue.popleft()
                    backoff = FIRST_BACKOFF_S
                    continue
                if self._closing:
                    return  # the receiver is down: close() counts what is left
                self._wake.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _deliver(self, record: dict) -> str:
        """ "sent", "dropped" (never deliverable) or "retry"."""
        try:
            payload = self._encode(record)
        except Exception as exc:  # noqa: BLE001 -- a format bug costs one record, counted
            self._count("dropped", f"cannot encode: {type(exc).__name__}: {exc}")
            return "dropped"
        try:
            self._transport.send(payload)
        except Rejected as exc:
            self._count("rejected", str(exc))
            return "dropped"
        except (OSError, ValueError) as exc:  # ssl.SSLError and http.client errors included
            self._count("failed", f"{type(exc).__name__}: {exc}")
            return "retry"
        with self._wake:
            self.sent += 1
            if not self._up:
                log.warning("output %s delivering again", self.name)
            self._up = True
        return "sent"

    def _count(self, what: str, error: str) -> None:
        error = one_line(error, 200)
        with self._wake:
            if what in ("failed", "rejected"):
                self.failed += 1
            if what in ("dropped", "rejected"):
                self.dropped += 1
            self._up = what != "failed"
            self._last_error = error
        now = time.monotonic()
        if now - self._last_logged >= ERROR_LOG_EVERY_S:
            self._last_logged = now
            log.error(
                "OUTPUT %s (%s to %s) %s: %s; alerts stay in the journal, retrying with "
                "back-off up to every %.0fs",
                self.name,
                self.kind,
                self.target,
                "refused a record" if what == "rejected" else "failing",
                error,
                self._max_backoff,
            )
