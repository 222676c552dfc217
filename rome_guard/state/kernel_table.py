"""The process model's reader of the eBPF sensor's in-kernel process table.

With the exec filter on (sensors.ebpf.EbpfSensor.set_exec_needles), the
kernel keeps every process in proc_live (and, after its exit, proc_exited:
the most recent PROC_EXITED_MAX) and sends only what some rule may concern:
an exec of a program a rule names or whose command line holds a rule's
needle, and the execs and exits of processes user space holds. Everything
else (benign execs, forks, the exits of processes user space never read)
stays in the kernel; the process model reads an entry here when an event
needs a process it does not hold (a connect, a GPU open, a flow, the
lineage of an offender whose parent already exited) and ``hold()``s what
it read from /proc on its own, so that its exit is sent.

This module only reads the maps and writes held_pids: it never decides,
never reads /proc and never loads BPF (the sensor owns the maps).
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass
from typing import Any, Iterator

from rome_guard.layout.sensor import (
    TABLE_EXECS_UNSENT,
    TABLE_EXITED_INSERTS,
    TABLE_EXITS_UNSENT,
    TABLE_FORKS_UNSENT,
    TABLE_LIVE_DELETES,
    TABLE_LIVE_FULL,
    TABLE_LIVE_INSERTS,
    MalformedRecord,
    TableProcess,
    decode_proc_entry,
)

CHILDREN_SCAN_MAX = 65536  # entries read when looking for a process's descendants


@dataclass(frozen=True)
class TableStats:
    """The bounds of the kernel's maps and what the filter kept back,
    running totals since the sensor started."""

    live_entries: int
    live_capacity: int
    live_full: int  # new processes not tracked: proc_live was full
    exited_entries: int
    exited_capacity: int
    exited_evictions: int  # exits beyond the capacity: the oldest forgotten
    held_full: int  # processes user space could not mark held (held_pids full)
    unsent: dict[str, int]  # "exec", "fork", "exit" -> records not sent


class KernelProcessTable:
    """maps: the sensor's proc_live, proc_exited, held_pids and
    table_counters (EbpfSensor.process_table_maps()). One thread."""

    def __init__(self, maps: dict[str, Any]):
        self._live = maps["proc_live"]
        self._exited = maps["proc_exited"]
        self._held = maps["held_pids"]
        self._counters = maps["table_counters"]
        self._held_full = 0

    def lookup(self, pid: int, started_before_ns: int | None = None) -> TableProcess | None:
        """The process under pid: the live one, else the last one that
        exited. started_before_ns: the one that started no later (an
        ancestor of a process that started then; a reused pid is not)."""
        for table in (self._live, self._exited):
            entry = self._read(table, pid)
            if entry is None:
                continue
            if started_before_ns is not None and entry.start_ns > started_before_ns:
                continue
            return entry
        return None

    def _read(self, table: Any, pid: int) -> TableProcess | None:
        try:
            leaf = table[table.Key(pid)]
        except KeyError:
            return None
        try:
            return decode_proc_entry(bytes(leaf))
        except MalformedRecord:
            return None

    def live(self) -> Iterator[TableProcess]:
        """Every live process the kernel tracks (at most CHILDREN_SCAN_MAX)."""
        for n, leaf in enumerate(self._live.values()):
            if n >= CHILDREN_SCAN_MAX:
                return
            try:
                yield decode_proc_entry(bytes(leaf))
            except MalformedRecord:
                continue

    def hold(self, pid: int, start_ns: int = 0) -> bool:
        """Ask for pid's exit (and its next exec): user space holds it now."""
        try:
            self._held[self._held.Key(pid)] = ct.c_uint64(start_ns)
        except Exception:  # noqa: BLE001 -- bcc raises bare Exception when the map is full
            self._held_full += 1
            return False
        return True

    def _total(self, slot: int) -> int:
        return int(self._counters.sum(ct.c_int(slot)).value)

    def stats(self) -> TableStats:
        inserts, deletes = self._total(TABLE_LIVE_INSERTS), self._total(TABLE_LIVE_DELETES)
        exited = self._total(TABLE_EXITED_INSERTS)
        exited_capacity = int(self._exited.max_entries)
        return TableStats(
            live_entries=max(inserts - deletes, 0),
            live_capacity=int(self._live.max_entries),
            live_full=self._total(TABLE_LIVE_FULL),
            exited_entries=min(exited, exited_capacity),
            exited_capacity=exited_capacity,
            exited_evictions=max(exited - exited_capacity, 0),
            held_full=self._held_full,
            unsent={
                "exec": self._total(TABLE_EXECS_UNSENT),
                "fork": self._total(TABLE_FORKS_UNSENT),
                "exit": self._total(TABLE_EXITS_UNSENT),
            },
        )
