"""The process table: every known process keyed by (pid, start time).

A pid alone never identifies a process here. The table answers "who is this
pid now", "who was its parent" and "what is its lineage to pid 1"; a parent
is only a parent if it started no later than the child, so a reused pid can
never be mistaken for an ancestor. Exited processes are kept for a grace
period so that late events and alerts can still name them.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

from rome_guard.events import ProcessInfo, ProcessKey

LINEAGE_LIMIT = 64  # deeper trees are cut, not looped


class ProcessTable:
    """``missing(pid, started_by)`` may supply a pid the table does not
    hold (the process model's forked-but-not-exec'd children, the kernel's
    process table), one that started no later than started_by (ticks), so
    lineage walks through them."""

    def __init__(
        self,
        exited_grace_s: float = 30.0,
        missing: Callable[[int, int], ProcessInfo | None] | None = None,
    ):
        self._missing = missing
        self._by_key: dict[ProcessKey, ProcessInfo] = {}
        self._current: dict[int, ProcessKey] = {}  # pid -> newest live key
        self._exited: dict[ProcessKey, float] = {}  # key -> monotonic exit time
        self._grace = exited_grace_s

    def __len__(self) -> int:
        return len(self._current)

    def __iter__(self) -> Iterator[ProcessInfo]:
        return (self._by_key[key] for key in list(self._current.values()))

    def __contains__(self, key: ProcessKey) -> bool:
        return key in self._by_key

    def add(self, info: ProcessInfo) -> None:
        old = self._current.get(info.pid)
        if old is not None and old != info.key and old.start_time > info.key.start_time:
            # a stale record arrived after its pid was reused: keep it for
            # lookups by key, but it is not the pid's current process
            self._by_key[info.key] = info
            return
        if old is not None and old != info.key:
            self._mark_exited(old)
        self._by_key[info.key] = info
        self._current[info.pid] = info.key
        self._exited.pop(info.key, None)

    def extend(self, infos: Iterable[ProcessInfo]) -> None:
        for info in infos:
            self.add(info)

    def get(self, key: ProcessKey) -> ProcessInfo | None:
        return self._by_key.get(key)

    def by_pid(self, pid: int) -> ProcessInfo | None:
        key = self._current.get(pid)
        return self._by_key.get(key) if key else None

    def parent(self, info: ProcessInfo) -> ProcessInfo | None:
        if info.ppid <= 0:
            return None
        candidate = self.by_pid(info.ppid)
        too_new = candidate is not None and candidate.key.start_time > info.key.start_time
        if (candidate is None or too_new) and self._missing is not None:
            candidate = self._missing(info.ppid, info.key.start_time)
        if candidate is None or candidate.key.start_time > info.key.start_time:
            return None
        return candidate

    def lineage(self, info: ProcessInfo) -> list[ProcessInfo]:
        """Ancestors of info, nearest first, up to pid 1 (or as far as known)."""
        chain: list[ProcessInfo] = []
        seen = {info.key}
        node = self.parent(info)
        while node is not None and node.key not in seen and len(chain) < LINEAGE_LIMIT:
            chain.append(node)
            seen.add(node.key)
            node = self.parent(node)
        return chain

    def children(self, info: ProcessInfo) -> list[ProcessInfo]:
        return [
            p for p in self if (parent := self.parent(p)) is not None and parent.key == info.key
        ]

    def descendants(self, info: ProcessInfo) -> list[ProcessInfo]:
        result, frontier = [], [info]
        while frontier:
            node = frontier.pop()
            for child in self.children(node):
                result.append(child)
                frontier.append(child)
        return result

    def exit(self, pid: int, now: float | None = None) -> ProcessInfo | None:
        key = self._current.pop(pid, None)
        if key is None:
            return None
        self._exited[key] = time.monotonic() if now is None else now
        return self._by_key.get(key)

    def _mark_exited(self, key: ProcessKey) -> None:
        self._exited.setdefault(key, time.monotonic())

    def expire(self, now: float | None = None) -> int:
        """Forget processes that exited more than the grace period ago."""
        now = time.monotonic() if now is None else now
        old = [key for key, when in self._exited.items() if now - when > self._grace]
        for key in old:
            del self._exited[key]
            if self._current.get(key.pid) != key:
                self._by_key.pop(key, None)
        return len(old)
