"""Alerts as Falco-compatible JSON POSTed to an HTTP(S) webhook.

Each record becomes the JSON Falco's http_output posts, so Falcosidekick
and routers built for Falco take it as is: ``output`` (the one-line
summary), ``priority`` (Critical, Error, Warning, Notice, Informational),
``rule``, ``time`` (RFC 3339), ``output_fields`` (never empty: Falco's
field names where one exists, ``proc.pid``, ``proc.exepath``,
``fd.rip`` ..., and ``rome_guard.<key>`` for the rest), ``source``
(``rome-guard``), ``tags`` and ``hostname``. Falcosidekick refuses a
payload without priority, rule, time or output_fields
(types.FalcoPayload.Check); every record here has all four.

HTTPS verifies the server against ``ca_file`` (or the system's CAs); a
bearer token is read from ``bearer_token_file`` at start and reload, never
from the config file itself, and never logged. A 2xx answer is delivered;
408, 429 and 5xx are retried (queue.py); any other 4xx refuses the record
for good (``Rejected``).

This module never blocks the daemon's loop (it runs on the output's
thread) and never puts a credential in a log line, a metric or status.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from typing import Any

from rome_guard import __version__
from rome_guard.config import OutputConfig
from rome_guard.respond.outputs.fields import flat_fields, text
from rome_guard.respond.outputs.queue import Rejected

SOURCE = "rome-guard"
PRIORITY = {"critical": "Critical", "high": "Error", "medium": "Warning", "low": "Notice"}
PRIORITY_OTHER = {"events_lost": "Warning"}  # by event; the rest are Informational
# journal field -> Falco's name for it (falco.org "Supported Fields")
FALCO_FIELDS = {
    "process.pid": "proc.pid",
    "process.ppid": "proc.ppid",
    "process.comm": "proc.name",
    "process.exe": "proc.exepath",
    "process.cmdline": "proc.cmdline",
    "process.cwd": "proc.cwd",
    "process.uid": "user.uid",
    "process.user": "user.name",
    "process.container_id": "container.id",
    "process.pod_uid": "k8s.pod.uid",
    "network.proto": "fd.l4proto",
    "network.saddr": "fd.lip",
    "network.sport": "fd.lport",
    "network.daddr": "fd.rip",
    "network.dport": "fd.rport",
    "host": "evt.hostname",
    "time": "evt.time.iso8601",
}
RETRIED_STATUSES = (408, 429)


def falco_payload(record: dict[str, Any]) -> dict[str, Any]:
    """The Falco JSON for one journal record."""
    event = record.get("event", "")
    fields: dict[str, Any] = {}
    for key, value in flat_fields(record):
        if key != "summary":
            fields[FALCO_FIELDS.get(key, f"rome_guard.{key}")] = value
    tags = [SOURCE]
    tags.extend(text(record[k], 64) for k in ("category", "severity", "event") if record.get(k))
    return {
        "output": text(record.get("summary") or f"rome-guard {event}", 1000),
        "priority": PRIORITY.get(record.get("severity", ""))
        or PRIORITY_OTHER.get(event, "Informational"),
        "rule": text(record.get("rule") or f"rome-guard {event}".strip(), 256),
        "time": record.get("time"),
        "output_fields": fields,
        "source": SOURCE,
        "tags": tags,
        "hostname": text(record.get("host", ""), 255),
    }


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(falco_payload(record), ensure_ascii=False, separators=(",", ":")).encode()


def read_token(path: str) -> str:
    """The bearer token in path (first line, stripped); ValueError when empty."""
    with open(path, encoding="utf-8") as f:
        token = f.readline().strip()
    if not token or any(c.isspace() or ord(c) < 33 for c in token):
        raise ValueError(f"bearer_token_file {path}: no token on its first line")
    return token


class WebhookTransport:
    """POSTs over one kept-alive connection, reopened after any error."""

    def __init__(self, url: str, timeout: float, ca_file: str = "", token: str = ""):
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=ca_file or None) if self.https else None
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"rome-guard/{__version__}",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._context is not None:
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self._context
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def send(self, payload: bytes) -> None:
        conn = self._connection()
        try:
            conn.request("POST", self.path, body=payload, headers=self._headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise OSError(f"{type(exc).__name__}: {exc}") from None
        if response.will_close:
            self.close()
        status = response.status
        if 200 <= status < 300:
            return
        if 400 <= status < 500 and status not in RETRIED_STATUSES:
            raise Rejected(f"HTTP {status} {response.reason}")
        raise OSError(f"HTTP {status} {response.reason}")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def build(config: OutputConfig) -> tuple[WebhookTransport, Any, str]:
    token = read_token(config.bearer_token_file) if config.bearer_token_file else ""
    parts = urllib.parse.urlsplit(config.url)
    shown = urllib.parse.urlunsplit(parts._replace(netloc=parts.hostname or "", query=""))
    if parts.port:
        shown = shown.replace(parts.hostname or "", f"{parts.hostname}:{parts.port}", 1)
    return WebhookTransport(config.url, config.timeout, config.ca_file, token), encode, shown
