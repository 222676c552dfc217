"""`rome-guard scan`: one snapshot of the host through the daemon's engine.

The snapshot sensor reads every process from /proc and every inet socket
from sock_diag once, joins them by socket inode, and hands each process to
the same Engine the daemon uses. Scan never acts on what it finds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rome_guard.config import Config
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint, ProcessInfo
from rome_guard.findings import Finding
from rome_guard.proctable import ProcessTable
from rome_guard.sensors import procfs, sockdiag
from rome_guard.sensors.sshconfig import EffectiveSshConfig

_NOT_A_PEER = ("LISTEN", "UNCONNECTED", "CLOSE")


@dataclass
class Snapshot:
    table: ProcessTable
    sockets: list[Endpoint]
    # pid -> (connections with a remote peer, fd -> inet socket for 0/1/2)
    sockets_of: dict[int, tuple[list[Endpoint], dict[int, Endpoint]]] = field(default_factory=dict)


def is_peer(ep: Endpoint) -> bool:
    return ep.state not in _NOT_A_PEER and ep.dport != 0


def take_snapshot(env_keys: list[str] | tuple[str, ...] = ()) -> Snapshot:
    """Processes and connected sockets, then the inode join: a socket that
    appears in between simply has no owner in this snapshot."""
    table = ProcessTable()
    table.extend(procfs.iter_processes(env_keys, pre_existing=True))
    sockets = sockdiag.list_sockets(owned_only=True, connected_only=True)
    by_inode = sockdiag.by_inode(sockets)
    snapshot = Snapshot(table, sockets)
    for info in table:
        if info.kernel_thread:
            continue
        owned = procfs.socket_inodes(info.pid)
        if not owned:
            continue
        connections: list[Endpoint] = []
        stdio: dict[int, Endpoint] = {}
        for inode, fds in owned.items():
            ep = by_inode.get(inode)
            if ep is None:
                continue
            if is_peer(ep):
                connections.append(ep)
            for fd in fds:
                if fd <= 2:
                    stdio[fd] = ep
        snapshot.sockets_of[info.pid] = (connections, stdio)
    return snapshot


def subject_for(
    snapshot: Snapshot, info: ProcessInfo, ssh: EffectiveSshConfig | None = None
) -> Subject:
    connections, stdio = snapshot.sockets_of.get(info.pid, ([], {}))
    return Subject(
        process=info,
        lineage=lambda: snapshot.table.lineage(info),
        connections=connections,
        stdio=stdio,
        stdio_of=lambda other: snapshot.sockets_of.get(other.pid, ([], {}))[1],
        ssh_forwards=ssh.forwards if ssh is not None else None,
        read_config=procfs.read_config_file,
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
