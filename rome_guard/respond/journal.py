"""The alert journal: one JSON object per line, durable when the disk allows.

Every alert is appended, flushed and fsynced here before a responder kills
or blocks anything, so a crash between decision and action never loses the
evidence. The journal is evidence, never a gate: when the disk refuses a
write or an fsync (full, read-only, I/O error), the record goes to stderr
(the system journal under systemd) and into a bounded in-memory spool that
every later write and ``retry()`` try again, in order; the caller goes on
detecting and acting. A write that failed half way is cut back
(``ftruncate``) so the file never holds a torn line.

The file rotates itself by size (``rotate_bytes``, ``keep``): before a
record would take it past the size, ``alerts.jsonl`` is renamed to
``alerts.jsonl.1`` (older ones shift up, the oldest past ``keep`` goes)
and a fresh file opened, all under the write lock, so a record is never
split across two files and none is written between the rename and the
open. ``reopen()`` (SIGHUP, after logrotate renamed the file) starts a new
file at the path the same way. After each record has been handed to the
disk (or the spool), ``set_forward``'s callable gets it: the alert outputs
(respond/outputs) send copies, never before the journal has it.

Records are built by rome_guard.findings (one shape for scan and daemon)
and are strict UTF-8 JSON on a single line whatever the process put in its
argv. This module never decides, never acts, and never raises on a failed
write: ``open_journal`` is the only place a journal error stops anything
(at start-up, as a one-line ``JournalError``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from rome_guard.respond.responses import KILL

log = logging.getLogger(__name__)

RECENT_BYTES = 8 << 20  # how much of the journal's tail a restart reads back
SPOOL_RECORDS = 10_000  # records held in memory while the disk refuses them
ERROR_LOG_EVERY_S = 10.0  # at most one "journal failing" line per interval


class JournalError(Exception):
    """The journal cannot be opened; the message is one line for operators."""


@dataclass(frozen=True)
class JournalState:
    """What `status` and metrics show about the journal."""

    path: str
    ok: bool  # the last write (or retry) reached the disk
    errors: int  # failed write/fsync attempts since start
    spooled: int  # records waiting in memory
    dropped: int  # records pushed out of a full spool (they went to stderr only)
    last_error: str  # "ENOSPC: No space left on device", or ""


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name}: {exc.strerror or exc}"


def open_journal(path: str, rotate_bytes: int = 0, keep: int = 0) -> Journal:
    """The journal at path, creating its directory; JournalError (one
    line: the path, what is wrong) when it cannot be written at all."""
    try:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        if os.path.isdir(path):
            raise JournalError(f"alerts file {path} is a directory")
        return Journal(path, rotate_bytes=rotate_bytes, keep=keep)
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) else path
        raise JournalError(f"cannot open alerts file {path} ({where}: {_describe(exc)})") from None


def _tail_lines(path: str, tail_bytes: int) -> list[bytes]:
    """The whole lines in the last tail_bytes of path ([] when unreadable)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail_bytes))
            data = f.read(tail_bytes)
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > tail_bytes:
        lines = lines[1:]  # the first line is cut
    return [line for line in lines if line]


def recent_alerts(
    path: str, mode: str, tail_bytes: int = RECENT_BYTES
) -> set[tuple[str, int, int, str]]:
    """(rule, pid, start time, exe) of the alerts in the journal's last
    tail_bytes (reaching into alerts.jsonl.1 right after a rotation) that
    were fully handled in this mode: a restarted daemon does
    not alert again on a process the previous one already reported. An
    alert from another mode, or a kill alert with no response record (the
    daemon died between the two), is left out so that it is judged and acted
    on again. Unreadable or torn lines are skipped."""
    lines = _tail_lines(path, tail_bytes)
    short = tail_bytes - sum(len(line) + 1 for line in lines)
    if short > 0:  # just rotated: the tail continues in the newest rotated file
        lines = _tail_lines(f"{path}.1", short) + lines
    # incident (alert id) -> the (rule, process image) keys filed under it:
    # the alert's own and every rule its incident_update records added
    alerts: dict[str, set[tuple[str, int, int, str]]] = {}
    kills: set[str] = set()
    responded: set[str] = set()
    for line in lines:
        if b'"alert' not in line and b'"response"' not in line and b'"incident' not in line:
            continue
        try:
            record = json.loads(line)
            event = record.get("event")
            if event == "response":
                responded.add(record["alert_id"])
                continue
            if event not in ("alert", "incident_update") or record.get("mode") != mode:
                continue
            process = record["process"]
            image = (process["pid"], process["start_time"], process["exe"])
            rules = [record["rule"]] + [
                r["rule"]
                for r in record.get("rules") or ()
                if r.get("pid", process["pid"]) == process["pid"]  # hits on this process
            ]
            incident = record["id"] if event == "alert" else record["alert_id"]
            alerts.setdefault(incident, set()).update((rule, *image) for rule in rules)
            if record.get("action") == KILL.name:
                kills.add(incident)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return {
        key for id_, keys in alerts.items() if id_ not in kills or id_ in responded for key in keys
    }


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


def _sync_directory(path: str) -> None:
    """Make the renames durable too."""
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Journal:
    def __init__(
        self,
        path: str,
        spool_records: int = SPOOL_RECORDS,
        on_error: Callable[[], None] | None = None,
        rotate_bytes: int = 0,
        keep: int = 0,
    ):
        self.path = path
        self._fd = _open_append(path)
        self._lock = threading.Lock()
        self.rotate_bytes = self.keep = 0
        self.set_rotation(rotate_bytes, keep)
        self.rotations = 0
        self._forward: Callable[[dict[str, Any]], None] | None = None
        self._spool: deque[bytes] = deque()
        self._spool_limit = spool_records
        self._on_error = on_error
        self.errors = 0
        self.dropped = 0
        self._last_error = ""
        self._last_logged = 0.0

    def set_error_hook(self, on_error: Callable[[], None] | None) -> None:
        """Called once per failed write or fsync (the metrics counter)."""
        self._on_error = on_error

    def set_rotation(self, rotate_bytes: int, keep: int) -> None:
        """Rotate before a record would pass rotate_bytes, keeping keep
        files; never when either is 0."""
        with self._lock:
            self.rotate_bytes = rotate_bytes if keep > 0 else 0
            self.keep = keep

    def set_forward(self, forward: Callable[[dict[str, Any]], None] | None) -> None:
        """Called with each record once the journal has it (the outputs)."""
        self._forward = forward

    def write(self, record: dict[str, Any]) -> bool:
        """Append one record and make it durable (fsync). True when it and
        everything spooled before it reached the disk; False when it waits
        in the spool (it has been printed to stderr). Never raises."""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        data = line.encode("utf-8")  # strict: textsafe already removed surrogates
        with self._lock:
            self._spool.append(data)
            written = self._flush_locked()
            if not written:
                self._keep_bounded()
        if not written:
            # outside the lock: stderr may block, the journal must not
            sys.stderr.write("rome-guard journal unavailable, record follows: " + line)
            sys.stderr.flush()
        if self._forward is not None:
            self._forward(record)
        return written

    def reopen(self) -> bool:
        """Write to a file opened afresh at the path (SIGHUP: logrotate
        renamed the old one). On failure the old file stays in use."""
        try:
            fd = _open_append(self.path)
        except OSError as exc:
            log.error("journal not reopened, still writing the old file: %s", _describe(exc))
            return False
        with self._lock:
            old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        return True

    def retry(self) -> bool:
        """Try the spooled records again (the daemon's housekeeping calls
        this every second). True when nothing is left waiting."""
        with self._lock:
            if not self._spool:
                return True
            before = len(self._spool)
            done = self._flush_locked()
            written = before - len(self._spool)
        if written:
            log.warning("journal writable again: %d spooled record(s) written", written)
        return done

    def state(self) -> JournalState:
        with self._lock:
            return JournalState(
                self.path,
                not self._spool,
                self.errors,
                len(self._spool),
                self.dropped,
                self._last_error,
            )

    def _flush_locked(self) -> bool:
        while self._spool:
            if self._fd < 0:
                return False
            try:
                self._append(self._spool[0])
            except OSError as exc:
                self._failed(exc)
                return False
            self._spool.popleft()
        return True

    def _append(self, data: bytes) -> None:
        start = os.fstat(self._fd).st_size
        if self.rotate_bytes and start and start + len(data) > self.rotate_bytes:
            start = self._rotate_locked(start)
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError:
            # no torn line: cut the file back to where this record began
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            raise

    def _rotate_locked(self, size: int) -> int:
        """Shift alerts.jsonl.N up, rename the journal to .1, open a new
        one; the new file's size (0), or size when rotation failed (the
        record then goes to the old file: never lost for a rename)."""
        try:
            for n in range(self.keep - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
            fd = _open_append(self.path)
        except OSError as exc:
            log.error("journal not rotated, still writing %s: %s", self.path, _describe(exc))
            return size
        os.close(self._fd)
        self._fd = fd
        self.rotations += 1
        _sync_directory(self.path)
        return 0

    def _failed(self, exc: OSError) -> None:
        self.errors += 1
        self._last_error = _describe(exc)
        if self._on_error is not None:
            self._on_error()
        now = time.monotonic()
        if now - self._last_logged >= ERROR_LOG_EVERY_S:
            self._last_logged = now
            log.error(
                "JOURNAL WRITE FAILED on %s (%s): still detecting and acting; records go to "
                "stderr and a memory spool (%d waiting, %d max) retried every second",
                self.path,
                self._last_error,
                len(self._spool),
                self._spool_limit,
            )

    def _keep_bounded(self) -> None:
        while len(self._spool) > self._spool_limit:
            self._spool.popleft()
            self.dropped += 1

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                self._flush_locked()
                os.close(self._fd)
                self._fd = -1
        left = self.state()
        if left.spooled:
            log.error(
                "journal closed with %d record(s) never written to %s (they are in stderr)",
                left.spooled,
                self.path,
            )
