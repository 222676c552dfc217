"""Make attacker-controlled strings safe to print, log and serialise.

argv, comm, paths and environment values come from the process being
watched, which may be hostile: newlines to forge log lines, terminal escapes,
invalid UTF-8 and arguments of 100 KiB. Everything that leaves the daemon
as text goes through here. This module never drops a value silently: a cut
value says how much was cut.
"""

from __future__ import annotations

# Longest single value kept in the journal and JSON output.
JSON_VALUE_LIMIT = 8192
# Longest single value shown in a log line or table cell.
LOG_VALUE_LIMIT = 256


def from_bytes(raw: bytes) -> str:
    """Decode bytes from the kernel or /proc without losing any of them."""
    return raw.decode("utf-8", "surrogateescape")


def printable(value: str) -> str:
    """Valid UTF-8 with invalid bytes shown as ``\\xNN``, no other change."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return f"{value[:limit]}...[{len(value) - limit} more chars]"


def for_json(value: str, limit: int = JSON_VALUE_LIMIT) -> str:
    """A string that json.dumps renders as valid, strict UTF-8 JSON."""
    return truncate(printable(value), limit)


def one_line(value: str, limit: int = LOG_VALUE_LIMIT) -> str:
    """A string safe inside one log line or table cell: no control
    characters (escaped as \\n, \\t, \\xNN), no invalid UTF-8, bounded."""
    text = printable(value)
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or 0x7F <= code < 0xA0 or code in (0x2028, 0x2029):
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return truncate("".join(out), limit)


def command_line(argv: tuple[str, ...] | list[str], limit: int = LOG_VALUE_LIMIT) -> str:
    """argv as one readable, bounded line."""
    return one_line(" ".join(argv), limit)
