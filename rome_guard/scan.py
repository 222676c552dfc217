"""`rome-guard scan`: one snapshot of the host through the daemon's engine.

The snapshot (rome_guard/state/snapshot.py: every process from /proc and
every inet socket from sock_diag, joined by socket inode) goes through the
same Engine the daemon uses. Scan never acts on what it finds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rome_guard.config import Config
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import RuleSet
from rome_guard.findings import Finding
from rome_guard.linux import (
    CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH,
    CAP_SYS_PTRACE,
    effective_capabilities,
)
from rome_guard.sensors.sshconfig import EffectiveSshConfig
from rome_guard.state.snapshot import subject_for, take_snapshot

# capability -> (bits, any of which grants it; what /proc hides from a scan
# without it: other users' processes)
_HIDDEN_WITHOUT = {
    "CAP_SYS_PTRACE": ((CAP_SYS_PTRACE,), "executable, working directory and fd links"),
    "CAP_DAC_READ_SEARCH": (
        (CAP_DAC_READ_SEARCH, CAP_DAC_OVERRIDE),
        "open-file lists (/proc/PID/fd) and environments",
    ),
}


def visibility_warning(capabilities: int | None = None) -> str | None:
    """One line naming the capabilities this scan lacks and what they hide,
    or None when it sees every process whole (root, or both granted)."""
    caps = effective_capabilities() if capabilities is None else capabilities
    missing = [
        (name, hides)
        for name, (bits, hides) in _HIDDEN_WITHOUT.items()
        if not any(caps >> bit & 1 for bit in bits)
    ]
    if not missing:
        return None
    names = " and ".join(name for name, _ in missing)
    hidden = "; ".join(hides for _, hides in missing)
    return (
        f"warning: without {names}, other users' processes are scanned without their "
        f"{hidden}, so sockets on their stdio (reverse shells), their connections, deleted or "
        "memfd executables and environment attribution are missed for them; run as root "
        "for a complete scan"
    )


@dataclass
class ScanResult:
    findings: list[Finding]
    processes: int
    sockets: int
    duration_s: float
    timestamp: float


def scan(
    ruleset: RuleSet, config: Config, exclude_pids: frozenset[int] = frozenset()
) -> ScanResult:
    started = time.monotonic()
    timestamp = time.time()
    snapshot = take_snapshot(config.attribution.env_keys)
    engine = Engine(ruleset)
    ssh = EffectiveSshConfig()
    findings: list[Finding] = []
    for info in snapshot.table:
        if info.pid in exclude_pids:
            continue
        findings.extend(engine.evaluate(subject_for(snapshot, info, ssh)))
    findings.sort(key=lambda f: (_SEVERITY_ORDER[f.rule.severity], f.rule.id, f.process.pid))
    return ScanResult(
        findings=findings,
        processes=len(snapshot.table),
        sockets=len(snapshot.sockets),
        duration_s=time.monotonic() - started,
        timestamp=timestamp,
    )


_SEVERITY_ORDER = {"critical": 0, "high": 1, "medium": 2, "low": 3}
