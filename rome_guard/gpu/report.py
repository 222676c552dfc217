"""``rome-guard gpu list``: GPUs, their processes and who registered them.

``collect`` joins one NVML snapshot with /proc (each consumer and its
lineage), the schedulers' allocations and the registry's verdicts;
``to_json`` and ``to_table`` render the result. Every string that a
watched process controls (comm, exe, argv, job names) is sanitised here
before it is printed. Nothing here alerts,
kills or changes a registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rome_guard import procfs
from rome_guard.events import GpuDevice, GpuSnapshot, ProcessInfo
from rome_guard.gpu.allocations import AllocationSnapshot, Owner, describe_owner, gpu_matches
from rome_guard.gpu.consumers import SOURCE_MPS_SERVER, GpuConsumerVerdict, judge_consumer
from rome_guard.gpu.registry import (
    SOURCE_ALLOW,
    SOURCE_REGISTRATION,
    GpuRef,
    GpuRegistry,
    Registration,
)
from rome_guard.textsafe import command_line, for_json, one_line

LINEAGE_LIMIT = 64

Reader = Callable[[int], "ProcessInfo | None"]


@dataclass(frozen=True)
class GpuListing:
    snapshot: GpuSnapshot
    verdicts: tuple[GpuConsumerVerdict, ...]
    registrations: tuple[Registration, ...]
    live: frozenset  # keys of registrations whose process still runs
    driver: str = ""
    sources: tuple[AllocationSnapshot, ...] = ()  # the schedulers asked, live or not

    @property
    def findings(self) -> list[GpuConsumerVerdict]:
        return [v for v in self.verdicts if not v.allowed]


def proc_lineage(info: ProcessInfo, read: Reader) -> list[ProcessInfo]:
    """Ancestors of info from /proc, nearest first. A parent that started
    after its child is a reused pid, not a parent: the walk stops there."""
    chain: list[ProcessInfo] = []
    node = info
    while node.ppid > 0 and len(chain) < LINEAGE_LIMIT:
        parent = read(node.ppid)
        if parent is None or parent.key.start_time > node.key.start_time:
            break
        chain.append(parent)
        node = parent
    return chain


def collect(
    snapshot: GpuSnapshot,
    registry: GpuRegistry,
    read: Reader | None = None,
    driver: str = "",
) -> GpuListing:
    cache: dict[int, ProcessInfo | None] = {}

    def cached(pid: int) -> ProcessInfo | None:
        if pid not in cache:
            cache[pid] = (read or procfs.read_process)(pid)
        return cache[pid]

    registry.refresh()
    verdicts = []
    for proc in snapshot.processes:
        info = cached(proc.pid)
        lineage = proc_lineage(info, cached) if info is not None else []
        verdicts.append(judge_consumer(proc, info, lineage, registry))
    registrations = tuple(registry.registrations())
    live = frozenset(
        r.key for r in registrations if procfs.start_time(r.key.pid) == r.key.start_time
    )
    sources = tuple(registry.allocations.snapshots()) if registry.allocations is not None else ()
    return GpuListing(snapshot, tuple(verdicts), registrations, live, driver, sources)


def allocated_to(listing: GpuListing, gpu: GpuRef) -> list[Owner]:
    """Who the live schedulers gave this GPU (or MIG device) to."""
    return [
        alloc.owner
        for snap in listing.sources
        if snap.live
        for alloc in snap.allocations
        if any(gpu_matches(g, gpu) for g in alloc.gpus)
    ]


# --- rendering --------------------------------------------------------------


def _job(verdict: GpuConsumerVerdict) -> str:
    if verdict.owner is not None:
        return verdict.owner.name
    if verdict.coverage is not None:
        return verdict.coverage.name
    return verdict.inside_job or "-"


def status(verdict: GpuConsumerVerdict) -> str:
    if verdict.reason is not None:
        return verdict.reason
    assert verdict.coverage is not None
    if verdict.coverage.source == SOURCE_REGISTRATION:
        return "registered"
    if verdict.coverage.source == SOURCE_MPS_SERVER:
        return "mps_server"
    return "allowed" if verdict.coverage.source == SOURCE_ALLOW else "allocated"


def _owner_json(owner: Owner) -> dict[str, Any]:
    return {
        "kind": owner.kind,
        "id": for_json(owner.id),
        "name": for_json(owner.name),
        "source": owner.source,
    }


def _source_json(snap: AllocationSnapshot) -> dict[str, Any]:
    return {
        "source": snap.source,
        "live": snap.live,
        "reason": for_json(snap.reason) if snap.reason else None,
        "owners": len(snap.allocations),
        "allocatable": list(snap.allocatable),
        "taken_at": snap.taken_at,
    }


def _device_json(dev: GpuDevice, failing: bool) -> dict[str, Any]:
    return {
        "index": dev.index,
        "uuid": dev.uuid,
        "name": for_json(dev.name),
        "mig_enabled": dev.mig_enabled,
        "mig_devices": [
            {
                "slot": m.slot,
                "uuid": m.uuid,
                "gpu_instance_id": m.gpu_instance_id,
                "compute_instance_id": m.compute_instance_id,
            }
            for m in dev.mig_devices
        ],
        "power_mw": dev.power_mw,
        "memory_total_bytes": dev.memory_total_bytes,
        "memory_used_bytes": dev.memory_used_bytes,
        "utilization": dev.utilization,
        "accounting": dev.accounting,
        "failing": failing,
        "processes": [],
    }


def _verdict_json(verdict: GpuConsumerVerdict) -> dict[str, Any]:
    proc, info, cov = verdict.process, verdict.info, verdict.coverage
    out: dict[str, Any] = {
        "pid": proc.pid,
        "mig": proc.mig,
        "used_memory_bytes": proc.used_memory_bytes,
        "sm_util": proc.sm_util,
        "status": status(verdict),
        "reason": verdict.reason,
        "detail": for_json(verdict.detail),
        "job": for_json(cov.name) if cov is not None else None,
        "inside_job": for_json(verdict.inside_job) if verdict.inside_job else None,
        "source": verdict.source,
        "owner": _owner_json(verdict.owner) if verdict.owner is not None else None,
        "coverage": None,
        "process": None,
    }
    if cov is not None:
        out["coverage"] = {
            "source": cov.source,
            "name": for_json(cov.name),
            "granted": cov.granted,
            "gpus": list(cov.gpus) if cov.gpus is not None else None,
            "holder": {"pid": cov.holder.pid, "start_time": cov.holder.start_time}
            if cov.holder
            else None,
            "inherited": cov.inherited,
        }
    if info is not None:
        att = info.attribution
        out["process"] = {
            "start_time": info.key.start_time,
            "ppid": info.ppid,
            "uid": info.uid,
            "user": for_json(info.user),
            "comm": for_json(info.comm),
            "exe": for_json(info.exe),
            "cmdline": [for_json(arg) for arg in info.cmdline[:256]],
            "cgroup": for_json(info.cgroup),
            "unit": for_json(att.unit) if att.unit else None,
            "container_id": att.container_id,
            "pod_uid": att.pod_uid,
            "slurm_job": att.slurm_job,
        }
    return out


def to_json(listing: GpuListing) -> dict[str, Any]:
    snap = listing.snapshot
    gpus = {d.index: _device_json(d, d.index in snap.failing) for d in snap.devices}
    for dev in snap.devices:
        entry = gpus[dev.index]
        entry["allocated_to"] = [
            _owner_json(o) for o in allocated_to(listing, GpuRef(dev.index, dev.uuid))
        ]
        for mig in entry["mig_devices"]:
            ref = GpuRef(dev.index, dev.uuid, mig["uuid"])
            mig["allocated_to"] = [_owner_json(o) for o in allocated_to(listing, ref)]
    for verdict in listing.verdicts:
        entry = gpus.get(verdict.process.gpu_index)
        if entry is not None:
            entry["processes"].append(_verdict_json(verdict))
    return {
        "nvml": {"available": snap.available, "reason": snap.reason, "driver": listing.driver},
        "taken_at": snap.taken_at,
        "gpus": [gpus[i] for i in sorted(gpus)],
        "finished": [
            {
                "pid": f.pid,
                "gpu_index": f.gpu_index,
                "gpu_uuid": f.gpu_uuid,
                "max_memory_bytes": f.max_memory_bytes,
                "gpu_start_us": f.gpu_start_us,
                "gpu_time_ms": f.gpu_time_ms,
            }
            for f in snap.finished
        ],
        "registrations": [
            {
                "pid": r.key.pid,
                "start_time": r.key.start_time,
                "job": for_json(r.job) if r.job else None,
                "gpus": list(r.gpus) if r.gpus is not None else None,
                "include_children": r.include_children,
                "registered_at": r.registered_at,
                "owner_uid": r.owner_uid,
                "alive": r.key in listing.live,
            }
            for r in listing.registrations
        ],
        "findings": len(listing.findings),
        "allocation_sources": [_source_json(s) for s in listing.sources],
    }


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 2**30:
        return f"{value / 2**30:.1f}G"
    return f"{value / 2**20:.0f}M"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def to_table(listing: GpuListing) -> str:
    snap = listing.snapshot
    if not snap.available:
        return f"NVML unavailable: {snap.reason}\n"
    lines = []
    for dev in snap.devices:
        facts = [f"GPU {dev.index}", one_line(dev.name, 48), dev.uuid]
        if dev.power_mw is not None:
            facts.append(f"{dev.power_mw / 1000:.0f} W")
        if dev.memory_total_bytes is not None:
            used = _bytes(dev.memory_used_bytes)
            facts.append(f"mem {used}/{_bytes(dev.memory_total_bytes)}")
        if dev.utilization is not None:
            facts.append(f"util {dev.utilization}%")
        if dev.mig_enabled:
            facts.append(f"MIG x{len(dev.mig_devices)}")
        facts.append("accounting on" if dev.accounting else "accounting off")
        if dev.index in snap.failing:
            facts.append("NOT ANSWERING")
        lines.append("  ".join(facts))
        if any(src.live for src in listing.sources):
            owners = allocated_to(listing, GpuRef(dev.index, dev.uuid))
            names = ", ".join(one_line(describe_owner(o), 64) for o in owners[:8])
            lines.append(f"  allocated to: {names or 'no pod or job'}")
    rows = [["GPU", "MIG", "PID", "USER", "MEM", "SM%", "STATUS", "JOB", "COMMAND"]]
    for v in sorted(listing.verdicts, key=lambda v: (v.process.gpu_index, v.process.pid)):
        proc, info = v.process, v.info
        rows.append(
            [
                str(proc.gpu_index),
                (proc.mig or "-")[:16],
                str(proc.pid),
                one_line(info.user, 16) if info else "?",
                _bytes(proc.used_memory_bytes),
                "-" if proc.sm_util is None else str(proc.sm_util),
                status(v),
                one_line(_job(v), 24),
                command_line(info.cmdline or (info.comm,), 60) if info else "?",
            ]
        )
    for src in listing.sources:
        state = "live" if src.live else "down"
        why = f" ({one_line(src.reason, 160)})" if src.reason else ""
        lines.append(f"allocations from {src.source}: {state}{why}")
    lines.append("")
    if len(rows) > 1:
        lines.extend(_table(rows))
    else:
        lines.append("no processes on any GPU")
    for f in snap.finished:
        lines.append(
            f"finished between polls: pid {f.pid} on GPU {f.gpu_index}, "
            f"max {_bytes(f.max_memory_bytes)}"
        )
    for v in listing.findings:
        lines.append(f"FINDING {v.reason}: {v.detail}")
    return "\n".join(lines) + "\n"
