"""Human-readable output: fixed-width tables for terminals.

Every cell goes through textsafe.one_line, so hostile argv cannot break a
row or inject terminal escapes.
"""

from __future__ import annotations

from typing import Sequence

from rome_guard.findings import Finding
from rome_guard.textsafe import command_line, one_line


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], max_width: int = 60) -> str:
    cells = [[one_line(str(c), max_width) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.upper().ljust(widths[i]) for i, h in enumerate(headers)).rstrip()]
    for row in cells:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(lines)


def owner(finding: Finding) -> str:
    att = finding.process.attribution
    if att.container_id:
        return f"container {att.container_id[:12]}"
    if att.pod_uid:
        return f"pod {att.pod_uid}"
    if att.slurm_job:
        return f"slurm {att.slurm_job}"
    return att.unit or "-"


def findings_table(findings: Sequence[Finding]) -> str:
    rows = [
        (
            f.rule.severity,
            f.rule.id,
            f.process.pid,
            f.process.user or f.process.uid,
            owner(f),
            command_line(f.process.cmdline or (f.process.comm,), 60),
            f.reason,
        )
        for f in findings
    ]
    return table(("severity", "rule", "pid", "user", "owner", "command", "why"), rows)
