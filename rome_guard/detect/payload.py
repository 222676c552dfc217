"""What a flow's first bytes say: JSON-RPC method, HTTP head, DNS message.

The kernel captures the first WIRE_CAPTURE bytes of each new flow once
(and parses a TLS ClientHello's SNI itself, since a ClientHello can be
longer than the capture); everything else is parsed here, in user space,
from those bytes: ``WireFacts`` is what the wire conditions of the rule
language look at (rome_guard.detect.conditions).

Pure functions only. The bytes come from the process being watched and may
be hostile: every parser is bounded (input length, label count, pointer
hops) and never raises on garbage; nothing here prints or logs them.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from dataclasses import dataclass, field

# Zeek's first-line test for JSON-RPC: an object whose first member is one
# of these. The fallback regex finds a method in a line cut by the capture.
_JSONRPC_START = re.compile(rb'^\s*\{\s*"(?:jsonrpc|method|params|id)"\s*:')
_METHOD = re.compile(rb'"method"\s*:\s*"([^"\\]{1,64})"')
_HTTP_REQUEST = re.compile(
    rb"^(GET|POST|PUT|HEAD|OPTIONS|DELETE|PATCH|CONNECT|PRI) (\S{1,2048}) HTTP/[12](?:\.[01])?\r?$"
)
HTTP_HEADERS_MAX = 32
DNS_PORT = 53
DNS_NAMES_MAX = 16
DNS_ANSWERS_MAX = 32
_DNS_A = 1
_DNS_AAAA = 28


@dataclass(frozen=True)
class DnsMessage:
    queries: tuple[str, ...] = ()  # question names, lower-case, no trailing dot
    # (question name, address, ttl seconds) for every A/AAAA answer
    answers: tuple[tuple[str, str, int], ...] = ()
    response: bool = False


@dataclass(frozen=True)
class WireFacts:
    """What one flow's first packet showed, for the rules."""

    text: str = ""  # the captured bytes as latin-1 (one char per byte), for payload_regex
    jsonrpc: bool = False  # the first line is a JSON-RPC object
    method: str = ""  # its "method"
    dns_queries: tuple[str, ...] = ()
    sni: str = ""  # TLS server_name, lower-case
    alpn: str = ""
    http_request: str = ""  # "GET /path HTTP/1.1"
    http_headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value)
    remote_name: str = ""  # the name DNS gave for the destination address
    dropped: str = ""  # why the kernel dropped the flow, "" when it did not
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.http_headers if k == name]


def first_line_method(payload: bytes) -> tuple[bool, str]:
    """(is JSON-RPC, method) of the first line."""
    line = payload.split(b"\n", 1)[0]
    if not _JSONRPC_START.match(line):
        return False, ""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        method = value.get("method")
        return True, method if isinstance(method, str) and len(method) <= 64 else ""
    # cut by the capture, or not quite JSON: the method is still readable
    m = _METHOD.search(line)
    return True, m.group(1).decode("latin-1") if m else ""


def http_head(payload: bytes) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(request line, headers) of an HTTP/1 request, ("", ()) otherwise."""
    lines = payload.split(b"\n", HTTP_HEADERS_MAX + 1)
    m = _HTTP_REQUEST.match(lines[0])
    if not m:
        return "", ()
    headers = []
    for raw in lines[1 : HTTP_HEADERS_MAX + 1]:
        raw = raw.rstrip(b"\r")
        if not raw:
            break
        name, sep, value = raw.partition(b":")
        if not sep or not name.strip():
            continue
        headers.append((name.strip().lower().decode("latin-1"), value.strip().decode("latin-1")))
    return lines[0].rstrip(b"\r").decode("latin-1"), tuple(headers)


def _dns_name(msg: bytes, offset: int) -> tuple[str, int]:
    """(name, offset after it) with compression; ValueError on garbage."""
    labels: list[str] = []
    end = -1
    hops = 0
    while True:
        if offset >= len(msg):
            raise ValueError("name runs past the message")
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg) or hops > 16:
                raise ValueError("bad compression pointer")
            if end < 0:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            hops += 1
            continue
        if length & 0xC0:
            raise ValueError("unknown label type")
        offset += 1
        if length == 0:
            break
        labels.append(msg[offset : offset + length].decode("latin-1"))
        offset += length
        if len(labels) > 127:
            raise ValueError("too many labels")
    return ".".join(labels).lower(), end if end >= 0 else offset


def parse_dns(msg: bytes) -> DnsMessage:
    """Questions and A/AAAA answers of a DNS message; what cannot be
    parsed is left out."""
    if len(msg) < 12:
        return DnsMessage()
    _id, flags, qdcount, ancount = struct.unpack_from("!HHHH", msg)
    response = bool(flags & 0x8000)
    queries: list[str] = []
    answers: list[tuple[str, str, int]] = []
    offset = 12
    try:
        for _ in range(min(qdcount, DNS_NAMES_MAX)):
            name, offset = _dns_name(msg, offset)
            offset += 4  # type, class
            if name:
                queries.append(name)
        asked = queries[0] if queries else ""
        for _ in range(min(ancount, DNS_ANSWERS_MAX)):
            _owner, offset = _dns_name(msg, offset)
            if offset + 10 > len(msg):
                break
            rtype, _cls, ttl, rdlen = struct.unpack_from("!HHIH", msg, offset)
            offset += 10
            rdata = msg[offset : offset + rdlen]
            offset += rdlen
            if rtype == _DNS_A and len(rdata) == 4:
                answers.append((asked, socket.inet_ntop(socket.AF_INET, rdata), ttl))
            elif rtype == _DNS_AAAA and len(rdata) == 16:
                answers.append((asked, socket.inet_ntop(socket.AF_INET6, rdata), ttl))
    except (ValueError, struct.error):
        pass
    return DnsMessage(tuple(queries), tuple(answers), response)


def dns_payload(payload: bytes, proto: str) -> bytes:
    """The DNS message in a UDP payload, or in the first segment of DNS
    over TCP (after its two-byte length)."""
    return payload[2:] if proto == "tcp" else payload


def facts_for(
    payload: bytes,
    proto: str,
    dport: int,
    sni: str = "",
    alpn: str = "",
    remote_name: str = "",
    dropped: str = "",
) -> WireFacts:
    """Everything the rules can ask about one flow's first bytes."""
    queries: tuple[str, ...] = ()
    jsonrpc, method, request, headers = False, "", "", ()
    if dport == DNS_PORT:
        queries = parse_dns(dns_payload(payload, proto)).queries
    elif not sni:
        jsonrpc, method = first_line_method(payload)
        if not jsonrpc:
            request, headers = http_head(payload)
    return WireFacts(
        text=payload.decode("latin-1"),
        jsonrpc=jsonrpc,
        method=method,
        dns_queries=queries,
        sni=sni.strip(".").lower(),
        alpn=alpn,
        http_request=request,
        http_headers=headers,
        remote_name=remote_name,
        dropped=dropped,
    )
