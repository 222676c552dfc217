"""The whole host read once: every process from /proc and every inet socket
from sock_diag, joined by socket inode.

`rome-guard scan` evaluates it; the daemon's process model seeds itself
from it after the sensor is attached. A process or socket that appears
between the reads simply has no partner in this snapshot. This module
only reads; it never decides or acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rome_guard import procfs
from rome_guard.detect.subject import Subject
from rome_guard.events import Endpoint, ProcessInfo
from rome_guard.linux import has_peer
from rome_guard.sensors import sockdiag
from rome_guard.sensors.sshconfig import EffectiveSshConfig
from rome_guard.state.stdio import StdioGraph
from rome_guard.state.table import ProcessTable


@dataclass
class Snapshot:
    table: ProcessTable
    sockets: list[Endpoint]
    # pid -> (connections with a remote peer, fd -> inet socket for 0/1/2)
    sockets_of: dict[int, tuple[list[Endpoint], dict[int, Endpoint]]] = field(default_factory=dict)
    stdio_graph: StdioGraph | None = None  # shells' relays, from this snapshot's sockets


def take_snapshot(
    env_keys: list[str] | tuple[str, ...] = (), pre_existing: bool = True
) -> Snapshot:
    """Processes and connected sockets, then the inode join: a socket that
    appears in between simply has no owner in this snapshot. `pre_existing`
    marks every process as found at start (False for a re-read after lost
    events: those processes may be new)."""
    table = ProcessTable()
    table.extend(procfs.iter_processes(env_keys, pre_existing=pre_existing))
    sockets = sockdiag.list_sockets(owned_only=True, connected_only=True)
    by_inode = sockdiag.by_inode(sockets)
    snapshot = Snapshot(table, sockets)
    snapshot.stdio_graph = StdioGraph(table.by_pid, table.lineage, lambda: by_inode)
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
            if has_peer(ep):
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
        stdio_relays=(
            (lambda: snapshot.stdio_graph.relays(info))
            if snapshot.stdio_graph is not None
            else None
        ),
    )
