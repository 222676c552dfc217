"""Decide whether one GPU consumer is allowed to be where NVML saw it.

Pure logic: given a ``GpuProcess`` from the NVML sensor, the process it
names (``ProcessInfo``, or None when /proc no longer or never showed it), its
lineage and the registry's answer, say whether it is registered, registered
but on a GPU it was not granted, or unregistered, and why. The engine turns
a verdict with a reason into a ``gpu_unregistered`` alert; nothing here
reads /proc, talks to NVML, alerts or kills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from rome_guard.events import GpuProcess, ProcessInfo
from rome_guard.gpu.registry import SOURCE_REGISTRATION, Coverage, GpuRef, Registration
from rome_guard.textsafe import one_line

# reasons, from most to least certain
UNREGISTERED = "unregistered"  # nothing registers or allows this process
NOT_GRANTED = "gpu_not_granted"  # a known job, on a GPU it was not granted
PROCESS_NOT_VISIBLE = "process_not_visible"  # NVML names a pid /proc does not show


class CoverageSource(Protocol):
    def covering(
        self, info: ProcessInfo, lineage: list[ProcessInfo], gpu: GpuRef
    ) -> Coverage | None: ...

    def registered_ancestor(
        self, lineage: list[ProcessInfo]
    ) -> tuple[Registration, bool] | None: ...


@dataclass(frozen=True)
class GpuConsumerVerdict:
    process: GpuProcess
    info: ProcessInfo | None
    coverage: Coverage | None
    reason: str | None  # None: allowed
    detail: str  # one line for operators, safe to log
    inside_job: str | None = None  # a registered ancestor that did not cover this process

    @property
    def allowed(self) -> bool:
        return self.reason is None


def gpu_ref(process: GpuProcess) -> GpuRef:
    return GpuRef(process.gpu_index, process.gpu_uuid, process.mig)


def describe_gpu(process: GpuProcess) -> str:
    where = f"GPU {process.gpu_index} ({process.gpu_uuid})"
    return f"{where} MIG {process.mig}" if process.mig else where


def _memory(process: GpuProcess) -> str:
    if process.used_memory_bytes is None:
        return "an unknown amount of memory"
    return f"{process.used_memory_bytes / 2**20:.0f} MiB"


def judge_consumer(
    process: GpuProcess,
    info: ProcessInfo | None,
    lineage: list[ProcessInfo],
    registry: CoverageSource,
) -> GpuConsumerVerdict:
    """The verdict on one process holding a context on one GPU."""
    gpu = describe_gpu(process)
    if info is None:
        return GpuConsumerVerdict(
            process,
            None,
            None,
            PROCESS_NOT_VISIBLE,
            f"pid {process.pid} holds {_memory(process)} on {gpu} but is not visible in "
            "/proc: it exited, or the guard does not run in the host PID namespace",
        )
    who = f"pid {info.pid} ({one_line(info.comm, 32)})"
    coverage = registry.covering(info, lineage, gpu_ref(process))
    if coverage is not None and coverage.granted:
        if coverage.inherited and coverage.holder is not None:
            how = f"through ancestor pid {coverage.holder.pid}, registered with children"
        elif coverage.source == SOURCE_REGISTRATION:
            how = "registered itself"
        else:
            how = "allowlist entry"
        return GpuConsumerVerdict(
            process,
            info,
            coverage,
            None,
            f"{who} on {gpu} is allowed: {one_line(coverage.name, 64)!r} ({how})",
        )
    if coverage is not None:
        grant = ",".join(coverage.gpus or ())
        return GpuConsumerVerdict(
            process,
            info,
            coverage,
            NOT_GRANTED,
            f"{who} of {coverage.source} {one_line(coverage.name, 64)!r} uses {gpu} "
            f"({_memory(process)}) but was granted only GPU(s) {one_line(grant, 128)}",
        )
    detail = f"{who} holds {_memory(process)} on {gpu} and is not registered"
    inside = None
    ancestor = registry.registered_ancestor(lineage)
    if ancestor is not None:
        reg, _ = ancestor
        inside = reg.name
        detail += (
            f"; it descends from registered job {one_line(reg.name, 64)!r} "
            f"(pid {reg.key.pid}), which was registered without --include-children"
        )
    return GpuConsumerVerdict(process, info, None, UNREGISTERED, detail, inside)


def judge_open(
    info: ProcessInfo, lineage: list[ProcessInfo], registry: CoverageSource
) -> GpuConsumerVerdict:
    """The verdict on a process that opened /dev/nvidia-uvm (CUDA creating a
    context), seconds before NVML lists it on a GPU: no GPU is known yet,
    so a grant on any GPU covers it."""
    process = GpuProcess(info.pid, -1, "", None, None, None)
    coverage = registry.covering(info, lineage, GpuRef(-1, "", None))
    who = f"pid {info.pid} ({one_line(info.comm, 32)})"
    if coverage is not None:
        return GpuConsumerVerdict(
            process, info, coverage, None, f"{who} is allowed: {one_line(coverage.name, 64)!r}"
        )
    detail = "opened /dev/nvidia-uvm (creating a CUDA context) and is not registered"
    inside = None
    ancestor = registry.registered_ancestor(lineage)
    if ancestor is not None:
        inside = ancestor[0].name
        detail += (
            f"; it descends from job {one_line(inside, 64)!r}, registered without "
            "--include-children"
        )
    return GpuConsumerVerdict(process, info, None, UNREGISTERED, detail, inside)
