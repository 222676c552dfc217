"""What a flow's client says: proxy preamble, JSON-RPC methods, HTTP head, DNS.

The kernel reports each new TCP flow's client stream (its first
WIRE_STREAM_MAX bytes, in order; handlers/wire.py puts the records back
together) and parses a TLS ClientHello's SNI itself; everything else is
parsed here, in user space, from those bytes. ``WireFacts`` is what the
wire conditions of the rule language look at (rome_guard.detect.conditions).

How a stream is read, in order:

1. a proxy preamble is peeled: SOCKS4/4a, SOCKS5 (greeting, username/
   password sub-negotiation, CONNECT) or HTTP ``CONNECT host:port``; the
   destination it names is a fact, and what follows is judged as the
   flow's first message;
2. the messages are found in any framing: raw JSON lines, an HTTP/1
   request body (Content-Length or chunked), WebSocket frames after an
   upgrade (unmasked with each frame's key);
3. each JSON object or batch array is parsed (bounded in size and
   depth); its ``method``, in any key order, is what the rules test.

Pure functions only. The bytes come from the process being watched and may
be hostile: every parser is bounded (input length, depth, message and
label counts, pointer hops) and never raises on garbage; nothing here
prints or logs them.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
from dataclasses import dataclass, field

# a method in a JSON line cut short (by the stream bound, or not yet whole)
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
# bounds of the JSON-RPC reading (the stream itself is bounded by the kernel)
JSON_DEPTH_MAX = 32
MESSAGES_MAX = 32  # JSON values (and batch members) read per stream
WS_FRAMES_MAX = 32
METHOD_MAX = 64


@dataclass(frozen=True)
class DnsMessage:
    queries: tuple[str, ...] = ()  # question names, lower-case, no trailing dot
    # (question name, address, ttl seconds) for every A/AAAA answer
    answers: tuple[tuple[str, str, int], ...] = ()
    response: bool = False


@dataclass(frozen=True)
class Preamble:
    """A proxy request at the start of a stream and the destination it names."""

    kind: str  # "socks4" | "socks4a" | "socks5" | "http-connect"
    host: str = ""  # a name (lower-case) or an address; "" not yet sent
    port: int = 0


@dataclass(frozen=True)
class WireFacts:
    """What one flow's client stream showed, for the rules."""

    text: str = ""  # the stream after any preamble, as latin-1 (one char per byte),
    # then the bodies and frames decoded from it, for payload_regex
    jsonrpc: bool = False  # some message is a JSON-RPC object (or batch)
    method: str = ""  # the first message's "method"
    methods: tuple[str, ...] = ()  # every message's "method", in stream order
    dns_queries: tuple[str, ...] = ()
    sni: str = ""  # TLS server_name, lower-case
    alpn: str = ""
    http_request: str = ""  # "GET /path HTTP/1.1"
    http_headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, value)
    remote_name: str = ""  # the destination's name: a DNS answer's, or a proxy request's
    proxy: str = ""  # the preamble's kind ("socks5" ...), "" none
    proxy_host: str = ""  # the destination the preamble names
    dropped: str = ""  # why the kernel dropped the flow, "" when it did not
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.http_headers if k == name]


# --- 1. proxy preambles -----------------------------------------------------


def _socks5(data: bytes) -> tuple[Preamble, bytes] | None:
    """Greeting, optional RFC 1929 login, CONNECT request; None: not SOCKS5."""
    if len(data) < 2 or data[0] != 5 or data[1] == 0 or len(data) < 2 + data[1]:
        return None if len(data) < 2 or data[0] != 5 or data[1] == 0 else (Preamble("socks5"), b"")
    at = 2 + data[1]
    if at < len(data) and data[at] == 1:  # username/password sub-negotiation
        if at + 2 > len(data):
            return Preamble("socks5"), b""
        ulen = data[at + 1]
        plen_at = at + 2 + ulen
        if plen_at >= len(data):
            return Preamble("socks5"), b""
        at = plen_at + 1 + data[plen_at]
    request = data[at:]
    if len(request) < 5:
        return Preamble("socks5"), b""
    if request[0] != 5 or request[2] != 0:
        return None
    atyp, rest = request[3], request[4:]
    if atyp == 1 and len(rest) >= 6:
        host, rest = socket.inet_ntop(socket.AF_INET, rest[:4]), rest[4:]
    elif atyp == 4 and len(rest) >= 18:
        host, rest = socket.inet_ntop(socket.AF_INET6, rest[:16]), rest[16:]
    elif atyp == 3 and len(rest) >= 1 + rest[0] + 2:
        host, rest = rest[1 : 1 + rest[0]].decode("latin-1").lower(), rest[1 + rest[0] :]
    else:
        return Preamble("socks5"), b""
    return Preamble("socks5", host, int.from_bytes(rest[:2], "big")), rest[2:]


def _socks4(data: bytes) -> tuple[Preamble, bytes] | None:
    """04 cmd port ip userid NUL [host NUL] (4a: ip 0.0.0.x names the host)."""
    if len(data) < 9 or data[0] != 4 or data[1] not in (1, 2):
        return None
    end = data.find(b"\0", 8, 8 + 256)
    if end < 0:
        return Preamble("socks4"), b""
    port = int.from_bytes(data[2:4], "big")
    if data[4:7] == b"\0\0\0" and data[7]:
        host_end = data.find(b"\0", end + 1, end + 1 + 256)
        if host_end < 0:
            return Preamble("socks4a"), b""
        host = data[end + 1 : host_end].decode("latin-1").lower()
        return Preamble("socks4a", host, port), data[host_end + 1 :]
    return Preamble("socks4", socket.inet_ntop(socket.AF_INET, data[4:8]), port), data[end + 1 :]


def _http_connect(data: bytes) -> tuple[Preamble, bytes] | None:
    if not data.startswith(b"CONNECT "):
        return None
    head_end = data.find(b"\r\n\r\n")
    line = data.split(b"\r\n", 1)[0].split(b" ")
    target = line[1].decode("latin-1") if len(line) > 1 else ""
    host, _, port = target.rpartition(":")
    host = host.strip("[]").lower()
    preamble = Preamble("http-connect", host, int(port) if port.isdigit() else 0)
    return preamble, data[head_end + 4 :] if head_end >= 0 else b""


def peel_preamble(data: bytes) -> tuple[Preamble | None, bytes]:
    """(the proxy request the stream starts with, what follows it); (None,
    data) when it starts with none."""
    for peel in (_socks5, _socks4, _http_connect):
        found = peel(data)
        if found is not None:
            return found
    return None, data


# --- 2. framings ------------------------------------------------------------


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


def _dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's data, as far as it is whole."""
    out, at = [], 0
    while at < len(body):
        line_end = body.find(b"\r\n", at, at + 32)
        if line_end < 0:
            break
        size_text = body[at:line_end].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            break
        if size == 0:
            break
        out.append(body[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2
    return b"".join(out)


def websocket_messages(frames: bytes) -> list[bytes]:
    """The data messages in client WebSocket frames, each unmasked with its
    frame's key; fragments joined; control frames skipped. A frame cut by
    the stream bound gives what it holds."""
    messages: list[bytes] = []
    current: list[bytes] = []
    at = 0
    for _ in range(WS_FRAMES_MAX):
        if at + 2 > len(frames):
            break
        b0, b1 = frames[at], frames[at + 1]
        opcode, length, at = b0 & 0x0F, b1 & 0x7F, at + 2
        if length == 126:
            length, at = int.from_bytes(frames[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(frames[at : at + 8], "big"), at + 8
        key = b""
        if b1 & 0x80:
            key, at = frames[at : at + 4], at + 4
            if len(key) < 4:
                break
        data = frames[at : at + min(length, len(frames))]
        at += length
        if key:
            data = bytes(c ^ key[i & 3] for i, c in enumerate(data))
        if opcode >= 8:  # close, ping, pong
            continue
        current.append(data)
        if b0 & 0x80 or at >= len(frames):
            messages.append(b"".join(current))
            current = []
    return messages


def _bodies(rest: bytes) -> tuple[str, tuple[tuple[str, str], ...], list[bytes]]:
    """(request line, headers, the message bodies) of what follows any
    preamble: an HTTP request's body or WebSocket messages, else the
    bytes themselves."""
    request, headers = http_head(rest)
    if not request:
        return "", (), [rest]
    head_end = rest.find(b"\r\n\r\n")
    body = rest[head_end + 4 :] if head_end >= 0 else b""
    fields = dict(headers)
    if "websocket" in fields.get("upgrade", "").lower():
        return request, headers, websocket_messages(body)
    if "chunked" in fields.get("transfer-encoding", "").lower():
        return request, headers, [_dechunk(body)]
    length = fields.get("content-length", "")
    if length.isdigit():
        body = body[: int(length)]
    return request, headers, [body]


# --- 3. JSON-RPC ------------------------------------------------------------


def _depth(text: bytes) -> int:
    """How deeply a JSON text nests (strings skipped), without parsing it."""
    depth = deepest = 0
    in_string = escaped = False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x7B, 0x5B):
            depth += 1
            deepest = max(deepest, depth)
        elif c in (0x7D, 0x5D):
            depth -= 1
    return deepest


def _values(body: bytes) -> tuple[list[object], list[bytes]]:
    """(the JSON values in a body: one document, or one per line; the
    pieces that look like JSON but do not parse, cut or garbled)."""
    values: list[object] = []
    broken: list[bytes] = []
    stripped = body.strip()
    pieces = [stripped] if stripped[:1] in (b"{", b"[") else []
    if b"\n" in stripped:
        pieces = [line.strip() for line in stripped.split(b"\n")]
    for piece in pieces[:MESSAGES_MAX]:
        if piece[:1] not in (b"{", b"["):
            continue
        if _depth(piece) > JSON_DEPTH_MAX:
            broken.append(piece)
            continue
        try:
            values.append(json.loads(piece))
        except (ValueError, RecursionError):
            broken.append(piece)
    return values, broken


def _method(value: object) -> str | None:
    if isinstance(value, dict):
        method = value.get("method")
        if isinstance(method, str) and 0 < len(method) <= METHOD_MAX:
            return method
        return "" if "method" in value or "id" in value or "jsonrpc" in value else None
    return None


def jsonrpc_methods(bodies: list[bytes]) -> tuple[bool, tuple[str, ...]]:
    """(some body holds JSON-RPC, every method named, in order) for the
    message bodies of one stream: objects and batch arrays parsed, in any
    key order; a piece cut short still gives its method by pattern."""
    found = False
    methods: list[str] = []
    for body in bodies:
        values, broken = _values(body)
        for value in values:
            members = value if isinstance(value, list) else [value]
            for member in members[:MESSAGES_MAX]:
                method = _method(member)
                if method is None:
                    continue
                found = True
                if method:
                    methods.append(method)
        for piece in broken:
            m = _METHOD.search(piece)
            if m:
                found = True
                methods.append(m.group(1).decode("latin-1"))
    return found, tuple(methods[:MESSAGES_MAX])


def first_line_method(payload: bytes) -> tuple[bool, str]:
    """(is JSON-RPC, method) of the first line (one message, read as the
    stream is)."""
    found, methods = jsonrpc_methods([payload.split(b"\n", 1)[0]])
    return found, methods[0] if methods else ""


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


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def facts_for(
    payload: bytes,
    proto: str,
    dport: int,
    sni: str = "",
    alpn: str = "",
    remote_name: str = "",
    dropped: str = "",
) -> WireFacts:
    """Everything the rules can ask about one flow's client stream (or one
    DNS datagram)."""
    if dport == DNS_PORT:
        return WireFacts(
            text=payload.decode("latin-1"),
            dns_queries=parse_dns(dns_payload(payload, proto)).queries,
            remote_name=remote_name,
            dropped=dropped,
        )
    preamble, rest = peel_preamble(payload)
    jsonrpc, methods, request, headers = False, (), "", ()
    text = rest.decode("latin-1")
    if not sni:
        request, headers, bodies = _bodies(rest)
        jsonrpc, methods = jsonrpc_methods(bodies)
        decoded = [b for b in bodies if b and b not in rest]
        if decoded:
            text += "\n" + "\n".join(b.decode("latin-1") for b in decoded)
    proxy_host = preamble.host if preamble is not None else ""
    if proxy_host and not _is_address(proxy_host):
        remote_name = proxy_host.strip(".")  # the client named its destination itself
    return WireFacts(
        text=text,
        jsonrpc=jsonrpc,
        method=methods[0] if methods else "",
        methods=methods,
        sni=sni.strip(".").lower(),
        alpn=alpn,
        http_request=request,
        http_headers=headers,
        remote_name=remote_name,
        proxy=preamble.kind if preamble is not None else "",
        proxy_host=proxy_host,
        dropped=dropped,
    )
