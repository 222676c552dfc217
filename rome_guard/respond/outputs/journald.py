"""Alerts as systemd journal entries, over journald's native protocol.

Each record is one datagram to ``/run/systemd/journal/socket`` (the
daemon runs under systemd; elsewhere the socket is missing and the output
reports itself failing while it retries). Fields: ``MESSAGE`` (the
one-line summary), ``MESSAGE_ID`` (one id for every rome-guard record, so
``journalctl MESSAGE_ID=...`` lists them), ``PRIORITY`` (syslog severity
from the rule's), ``SYSLOG_IDENTIFIER``, ``SYSLOG_FACILITY``, and
``ROME_GUARD_<KEY>`` for every flat field of the record (fields.py:
``ROME_GUARD_RULE``, ``ROME_GUARD_PROCESS_PID``, ``ROME_GUARD_NETWORK_DADDR``
...). Names are upper-case ``[A-Z0-9_]``; values are single lines, so the
plain ``KEY=value`` form always applies, and bounded (fields.VALUE_LIMIT),
so an entry stays far below the socket's datagram limit.

This module never blocks the daemon's loop (it runs on the output's thread)
and never writes a field name that a watched process chose.
"""

from __future__ import annotations

import socket
from typing import Any

from rome_guard.config import SYSLOG_FACILITIES, OutputConfig
from rome_guard.respond.outputs.fields import flat_fields, syslog_severity, text

# `journalctl MESSAGE_ID=...` lists every rome-guard record (a random id,
# fixed once, as systemd's catalog asks: `systemd-id128 new`)
MESSAGE_ID = "5c0e2a4b7d9f4e31a6b8c0d2e4f61a3b"
FIELD_PREFIX = "ROME_GUARD_"


def field_name(key: str) -> str:
    """A journal field name: upper-case letters, digits and '_', starting
    with a letter, at most 64 characters."""
    name = "".join(c if c.isascii() and c.isalnum() else "_" for c in key.upper())
    return (FIELD_PREFIX + name)[:64]


def format_entry(record: dict[str, Any], app_name: str, facility: str) -> bytes:
    """The native-protocol datagram for one journal record."""
    fields = [
        ("MESSAGE", text(record.get("summary") or f"rome-guard {record.get('event', '')}")),
        ("MESSAGE_ID", MESSAGE_ID),
        ("PRIORITY", str(syslog_severity(record))),
        ("SYSLOG_IDENTIFIER", text(app_name, 64)),
        ("SYSLOG_FACILITY", str(SYSLOG_FACILITIES.index(facility))),
    ]
    fields.extend(
        (field_name(k), v if isinstance(v, str) else text(v)) for k, v in flat_fields(record)
    )
    # every value is one line (fields.text), so KEY=value needs no binary form
    return b"".join(f"{name}={value}\n".encode() for name, value in fields)


class JournaldTransport:
    def __init__(self, path: str):
        self.path = path
        self._sock: socket.socket | None = None

    def send(self, payload: bytes) -> None:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.sendto(payload, self.path)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def build(config: OutputConfig) -> tuple[JournaldTransport, Any, str]:
    app, facility = config.app_name, config.facility
    return (
        JournaldTransport(config.address),
        lambda record: format_entry(record, app, facility),
        config.address,
    )
