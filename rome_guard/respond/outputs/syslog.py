"""Alerts as RFC 5424 syslog messages over UDP, TCP or a unix socket.

One message per record: ``<PRI>1 TIME HOST APP PROCID MSGID [SD] MSG``
with the facility configured, the severity from the rule's (critical 2 ..
low 5), MSGID the record's event (``alert``, ``response`` ...), one
structured-data element ``rome-guard@32473`` (32473: the example
enterprise number of RFC 5612, as unregistered senders use it) holding the
record's flat fields (fields.py), and MSG the record's one-line summary
after a UTF-8 BOM. TCP frames by octet counting (RFC 6587 3.4.1:
``LEN SP MSG``), so no value can end a frame early; UDP and unix send one
datagram per message. A message stays under MAX_MESSAGE_BYTES (rsyslog's
default maxMessageSize is 8 KiB): long values are cut first.

This module never blocks the daemon's loop (it runs on the output's
thread, queue.py) and never lets a watched process's text break a field:
SD values escape ``"``, ``\\`` and ``]``; nothing holds a newline.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any

from rome_guard.config import SYSLOG_FACILITIES, OutputConfig
from rome_guard.respond.outputs.fields import flat_fields, syslog_severity, text

SD_ID = "rome-guard@32473"
MAX_MESSAGE_BYTES = 8000
SD_VALUE_LIMIT = 512
_NILVALUE = "-"
_BOM = "\ufeff"


def _header_token(value: Any, limit: int) -> str:
    """PRINTUSASCII without spaces (RFC 5424 6.2), or the NILVALUE."""
    token = "".join(c for c in str(value or "") if 33 <= ord(c) <= 126)[:limit]
    return token or _NILVALUE


def _sd_name(key: str) -> str:
    # SD-NAME: printable ASCII except '=', ' ', ']' and '"', at most 32
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:32]


def _sd_value(value: Any, limit: int) -> str:
    raw = value if isinstance(value, str) else text(value)
    raw = raw[:limit]
    return raw.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_message(
    record: dict[str, Any], facility: str, app_name: str, pid: int | None = None
) -> bytes:
    """The RFC 5424 message for one journal record (no transport framing)."""
    pri = SYSLOG_FACILITIES.index(facility) * 8 + syslog_severity(record)
    header = " ".join(
        (
            f"<{pri}>1",
            _header_token(record.get("time"), 64),
            _header_token(record.get("host"), 255),
            _header_token(app_name, 48),
            _header_token(os.getpid() if pid is None else pid, 128),
            _header_token(record.get("event"), 32),
        )
    )
    summary = text(record.get("summary") or record.get("event") or "rome-guard record", 1000)
    fields = [(k, v) for k, v in flat_fields(record) if k != "summary"]
    for limit in (SD_VALUE_LIMIT, 128, 32):
        params = "".join(f' {_sd_name(k)}="{_sd_value(v, limit)}"' for k, v in fields)
        message = f"{header} [{SD_ID}{params}] {_BOM}{summary}".encode()
        if len(message) <= MAX_MESSAGE_BYTES:
            return message
    return message[:MAX_MESSAGE_BYTES]


def parse_address(address: str) -> tuple[str, str, int]:
    """("udp"|"tcp", host, port) or ("unix", path, 0), from the config's
    udp://HOST:PORT, tcp://HOST:PORT, unix:PATH (checked by config.py)."""
    scheme, _, rest = address.partition(":")
    if scheme == "unix":
        return "unix", rest[2:] if rest.startswith("//") else rest, 0
    host, _, port = rest.lstrip("/").rpartition(":")
    return scheme, host.strip("[]"), int(port)


class SyslogTransport:
    """One socket, opened on first use and again after any error."""

    def __init__(self, address: str, timeout: float):
        self.protocol, self.host, self.port = parse_address(address)
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sockaddr: Any
        if self.protocol == "unix":  # a datagram socket, as /dev/log is
            family, kind, sockaddr = socket.AF_UNIX, socket.SOCK_DGRAM, self.host
        else:
            kind = socket.SOCK_DGRAM if self.protocol == "udp" else socket.SOCK_STREAM
            family, _, _, _, sockaddr = socket.getaddrinfo(self.host, self.port, type=kind)[0]
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.timeout)
            sock.connect(sockaddr)
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, payload: bytes) -> None:
        sock = self._sock
        if sock is not None and sock.type == socket.SOCK_STREAM and _peer_closed(sock):
            self.close()
            sock = None
        if sock is None:
            sock = self._sock = self._connect()
        try:
            if sock.type == socket.SOCK_STREAM:
                sock.sendall(b"%d %s" % (len(payload), payload))
            else:
                sock.send(payload)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _peer_closed(sock: socket.socket) -> bool:
    """A stream whose receiver went away reads as EOF (or an error): send
    on a fresh connection rather than into a dead one."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def build(config: OutputConfig) -> tuple[SyslogTransport, Any, str]:
    """The transport, the encoder and the target's description."""
    facility, app = config.facility, config.app_name
    return (
        SyslogTransport(config.address, config.timeout),
        lambda record: format_message(record, facility, app),
        config.address,
    )
