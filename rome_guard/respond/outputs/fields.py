"""What every output format takes from a journal record: its flat fields
and its priority.

A journal record (rome_guard.findings) nests objects (``process``,
``network``, ``gpu``, ``wire``) and lists (``cmdline``, ``rules``,
``lineage``). Outputs whose receivers want flat key/value pairs (syslog
structured data, journald fields, Falco's ``output_fields``) all take them
from ``flat_fields``, so the three agree on what an alert says. Values are
single-line text (textsafe.one_line: attacker-controlled strings keep no
newline or control character) or numbers.

This module never sends anything; it only reads records.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from rome_guard.textsafe import one_line

VALUE_LIMIT = 2048  # characters of one flat value
# syslog severities (RFC 5424 6.2.1) for rules' severities and other records
SYSLOG_SEVERITY = {"critical": 2, "high": 3, "medium": 4, "low": 5}
SYSLOG_SEVERITY_OTHER = {"events_lost": 4}  # by event; the rest are informational (6)
# what lists become: kept whole as one JSON line, or their rule ids only
_LIST_KEYS = ("cmdline", "dns_query", "pids")


def syslog_severity(record: dict[str, Any]) -> int:
    severity = record.get("severity")
    if severity in SYSLOG_SEVERITY:
        return SYSLOG_SEVERITY[severity]
    return SYSLOG_SEVERITY_OTHER.get(record.get("event", ""), 6)


def text(value: Any, limit: int = VALUE_LIMIT) -> str:
    """A flat value as one line."""
    if isinstance(value, str):
        return one_line(value, limit)
    return one_line(json.dumps(value, ensure_ascii=False, separators=(",", ":")), limit)


def flat_fields(record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every scalar of the record and of its
    objects one level down; ``cmdline`` as one line, ``rules`` as their ids;
    lineage and env are left out (the journal has them). None is skipped."""
    for key, value in record.items():
        if value is None or key in ("lineage",):
            continue
        if isinstance(value, dict):
            for inner, item in value.items():
                if item is None or inner == "env" or isinstance(item, dict):
                    continue
                if isinstance(item, list):
                    item = " ".join(str(v) for v in item) if inner in _LIST_KEYS else item
                yield f"{key}.{inner}", item if isinstance(item, (int, float)) else text(item)
        elif key == "rules" and isinstance(value, list):
            yield "rules", ",".join(str(r.get("rule", "")) for r in value if isinstance(r, dict))
        elif isinstance(value, (bool, int, float)):
            yield key, value
        else:
            yield key, text(value)
