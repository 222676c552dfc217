"""The fallback sensor: poll /proc and sock_diag when eBPF is unavailable.

Degraded by design and said so loudly by the daemon: a process that lives
less than one interval, or a connection opened and closed between two
polls, is never seen. It produces the same events as the eBPF sensor so
the rest of the daemon does not know the difference.
"""

from __future__ import annotations

import time
from typing import Iterable, Union

from rome_guard import procfs
from rome_guard.events import (
    CONNECT_ATTEMPT,
    CONNECT_ESTABLISHED,
    ConnectEvent,
    ExecEvent,
    ExitEvent,
)
from rome_guard.linux import boottime_ns, has_peer
from rome_guard.sensors import sockdiag

Event = Union[ExecEvent, ExitEvent, ConnectEvent]  # not X | Y: Python 3.9


class PollSensor:
    def __init__(self, interval_s: float = 0.5, ignore_pids: Iterable[int] = ()):
        self.interval_s = interval_s
        self.ignore_pids = frozenset(ignore_pids)
        self._known: dict[int, int] = {}  # pid -> start time
        self._sockets: set[int] = set()  # inodes already reported
        self._next = 0.0

    def start(self) -> None:
        for pid in procfs.list_pids():
            start = procfs.start_time(pid)
            if start is not None:
                self._known[pid] = start
        self._sockets = {s.inode for s in sockdiag.list_sockets(owned_only=True) if has_peer(s)}
        self._next = time.monotonic() + self.interval_s

    def lost_events(self) -> dict[str, int]:
        return {}

    def set_wake_names(self, names: Iterable[str] | None) -> None:
        """Nothing to wake: polling reads /proc on its own schedule."""

    def set_exec_needles(self, needles: Iterable[str] | None) -> None:
        """Nothing to filter: polling sees what /proc shows at each tick."""

    def ring_fds(self) -> list[int]:
        """No ring buffer: the daemon polls this sensor on a short timer."""
        return []

    def set_loopback_ignore_cgroups(self, cgroup_ids: Iterable[int]) -> None:
        """Nothing to filter: polling never sees a loopback storm's connects
        one by one (see EbpfSensor.set_loopback_ignore_cgroups)."""

    def poll(self, timeout_ms: int) -> list[Event]:
        wait = self._next - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout_ms / 1000))
            if time.monotonic() < self._next:
                return []
        self._next = time.monotonic() + self.interval_s
        return self._processes() + self._connections()

    def _processes(self) -> list[Event]:
        now = boottime_ns()
        events: list[Event] = []
        current: dict[int, int] = {}
        for pid in procfs.list_pids():
            if pid in self.ignore_pids:
                continue
            start = self._known.get(pid)
            stat_start = procfs.start_time(pid)
            if stat_start is None:
                continue
            current[pid] = stat_start
            if start == stat_start:
                continue
            if start is not None:
                events.append(ExitEvent(pid, now))
            info = procfs.read_process(pid)
            if info is None or info.kernel_thread:
                continue
            events.append(
                ExecEvent(pid, info.ppid, info.exe, info.cmdline, now, info.uid, info.comm)
            )
        for pid in self._known.keys() - current.keys():
            events.append(ExitEvent(pid, now))
        self._known = current
        return events

    def _connections(self) -> list[Event]:
        now = boottime_ns()
        peers = [s for s in sockdiag.list_sockets(owned_only=True) if has_peer(s)]
        fresh = [s for s in peers if s.inode not in self._sockets]
        self._sockets = {s.inode for s in peers}  # closed sockets are forgotten
        if not fresh:
            return []
        owners: dict[int, int] = {}
        wanted = {s.inode for s in fresh}
        for pid in self._known:
            for inode in procfs.socket_inodes(pid):
                if inode in wanted:
                    owners.setdefault(inode, pid)
        events: list[Event] = []
        for ep in fresh:
            pid = owners.get(ep.inode)
            if pid is None or pid in self.ignore_pids:
                continue
            outcome = CONNECT_ATTEMPT if ep.state == "SYN_SENT" else CONNECT_ESTABLISHED
            events.append(ConnectEvent(pid, ep, outcome, now))
        return events

    def close(self) -> None:
        self._known.clear()
