"""Decide whether one GPU consumer is allowed to be where NVML saw it.

Pure logic: given a ``GpuProcess`` from the NVML sensor, the process it
names (``ProcessInfo``, or None when /proc no longer or never showed it), its
lineage, the registry's answer and, when a scheduler source is live, which
pod or Slurm job was allocated the GPU (rome_guard.gpu.allocations), say
whether it is allowed, and if not why:

- ``gpu_not_allocated``: its pod or job was allocated no GPU at all;
- ``gpu_not_granted``: the GPU belongs to another pod or job (or to none
  while the process's own allocation, or registration, names other GPUs);
- ``unregistered``: nothing registers or allows it. Inside the right
  allocation this is still the verdict unless ``gpu.trust: allocation``: an
  agent's tool call inside a training job's pod is exactly what the
  registration exists to tell apart from the trainer.

The engine turns a verdict with a reason into a ``gpu_unregistered`` alert;
nothing here reads /proc, talks to NVML, alerts or kills.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from rome_guard.events import GpuProcess, ProcessInfo
from rome_guard.gpu.allocations import (
    TRUST_ALLOCATION,
    Allocation,
    AllocationVerdict,
    Owner,
    describe_owner,
)
from rome_guard.gpu.registry import SOURCE_REGISTRATION, Coverage, GpuRef, Registration
from rome_guard.textsafe import one_line

# reasons, from most to least certain
UNREGISTERED = "unregistered"  # nothing registers or allows this process
NOT_ALLOCATED = "gpu_not_allocated"  # its pod or job was allocated no GPU
NOT_GRANTED = "gpu_not_granted"  # a known pod, job or registration, on a GPU not its own
PROCESS_NOT_VISIBLE = "process_not_visible"  # NVML names a pid /proc does not show
REASONS = (UNREGISTERED, NOT_ALLOCATED, NOT_GRANTED, PROCESS_NOT_VISIBLE)
ALERTING = (UNREGISTERED, NOT_ALLOCATED, NOT_GRANTED)  # a process the guard can name
ALLOWED = "allowed"  # the verdict of a consumer with no reason against it
VERDICTS = (ALLOWED, *REASONS)  # every verdict, as metrics label it

# NVIDIA's MPS server holds the contexts of its clients: under MPS, NVML's
# compute list names it, while the clients (the processes that asked for the
# GPU) come from the MPS query and are judged like any compute process. It
# is known by its binary in a system directory, where an unprivileged
# process cannot put one (a root process in a container of its own can
# pose as it: docs/gpu.md). It is never the consumer an alert names.
SOURCE_MPS_SERVER = "mps_server"
MPS_SERVER_EXES = frozenset(
    f"{folder}/nvidia-cuda-mps-server"
    for folder in ("/usr/bin", "/usr/sbin", "/bin", "/usr/local/bin", "/run/nvidia/driver/usr/bin")
)


def _mps_server(process: GpuProcess, info: ProcessInfo, who: str) -> GpuConsumerVerdict | None:
    if info.exe not in MPS_SERVER_EXES or process.mps_client:
        return None
    coverage = Coverage(SOURCE_MPS_SERVER, "MPS server", True, None)
    detail = f"{who} is NVIDIA's MPS server: it holds its clients' contexts, each judged itself"
    return GpuConsumerVerdict(process, info, coverage, None, detail, source=SOURCE_MPS_SERVER)


class AllocationView(Protocol):
    def judge(self, info: ProcessInfo, gpu: GpuRef) -> AllocationVerdict | None: ...

    def owner_of(self, info: ProcessInfo) -> tuple[Owner | None, Any, bool]: ...


class CoverageSource(Protocol):
    allocations: AllocationView | None
    trust: str

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
    allocation: AllocationVerdict | None = None  # the scheduler's view, when one is live
    source: str | None = None  # who decided: kubelet, slurm, registration, allow

    @property
    def allowed(self) -> bool:
        return self.reason is None

    @property
    def owner(self) -> Owner | None:
        return self.allocation.owner if self.allocation is not None else None


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
    server = _mps_server(process, info, who)
    if server is not None:
        return server
    ref = gpu_ref(process)
    coverage = registry.covering(info, lineage, ref)
    view = registry.allocations.judge(info, ref) if registry.allocations is not None else None
    if view is not None:
        verdict = _judge_with_scheduler(process, info, registry, coverage, view, who, gpu)
        if verdict is not None:
            return verdict
    return _judge_registration(process, info, lineage, registry, coverage, who, gpu, view)


def _holders(view: AllocationVerdict) -> str:
    return ", ".join(one_line(describe_owner(h), 96) for h in view.holders[:4]) or "no one"


def _inside_allocation(
    process: GpuProcess,
    info: ProcessInfo,
    owner: Owner,
    alloc: Allocation,
    who: str,
    view: AllocationVerdict | None = None,
) -> GpuConsumerVerdict:
    """gpu.trust: allocation: inside its pod's or job's allocation is allowed."""
    return GpuConsumerVerdict(
        process,
        info,
        Coverage(owner.source, owner.name, True, alloc.gpus),
        None,
        f"{who} is inside the allocation of {one_line(describe_owner(owner), 96)} "
        "(gpu.trust: allocation)",
        allocation=view,
        source=owner.source,
    )


def _judge_with_scheduler(
    process: GpuProcess,
    info: ProcessInfo,
    registry: CoverageSource,
    coverage: Coverage | None,
    view: AllocationVerdict,
    who: str,
    gpu: str,
) -> GpuConsumerVerdict | None:
    """The scheduler's verdict, or None to judge on registrations alone."""
    owner, alloc = view.owner, view.allocation
    if owner is not None and alloc is not None:
        mine = one_line(describe_owner(owner), 96)
        if not alloc.gpus:
            return GpuConsumerVerdict(
                process,
                info,
                coverage,
                NOT_ALLOCATED,
                f"{who} of {mine} holds {_memory(process)} on {gpu}, but {owner.source} "
                f"allocated {mine} no GPU",
                allocation=view,
                source=owner.source,
            )
        if not view.granted:
            grant = one_line(",".join(alloc.gpus), 128)
            return GpuConsumerVerdict(
                process,
                info,
                coverage,
                NOT_GRANTED,
                f"{who} of {mine} uses {gpu} ({_memory(process)}), allocated to "
                f"{_holders(view)}; {owner.source} allocated {mine} only {grant}",
                allocation=view,
                source=owner.source,
            )
        if registry.trust == TRUST_ALLOCATION:
            return _inside_allocation(process, info, owner, alloc, f"{who} on {gpu}", view)
        return None  # the right allocation: registrations decide (gpu.trust: process)
    if coverage is not None and coverage.granted:
        return None  # a registered or allowed host process on a scheduled GPU
    return GpuConsumerVerdict(
        process,
        info,
        coverage,
        NOT_GRANTED,
        f"{who}, in no pod or job, uses {gpu} ({_memory(process)}), which "
        f"{view.source} allocated to {_holders(view)}",
        allocation=view,
        source=view.source,
    )


def _judge_registration(
    process: GpuProcess,
    info: ProcessInfo,
    lineage: list[ProcessInfo],
    registry: CoverageSource,
    coverage: Coverage | None,
    who: str,
    gpu: str,
    view: AllocationVerdict | None,
) -> GpuConsumerVerdict:
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
            allocation=view,
            source=coverage.source,
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
            allocation=view,
            source=coverage.source,
        )
    detail = f"{who} holds {_memory(process)} on {gpu} and is not registered"
    inside = None
    source = None
    if view is not None and view.owner is not None:
        inside = view.owner.name
        source = view.owner.source
        detail += (
            f"; it runs inside the GPU allocation of {one_line(describe_owner(view.owner), 96)} "
            "(gpu.trust: process needs a registration too)"
        )
    ancestor = registry.registered_ancestor(lineage)
    if ancestor is not None:
        reg, _ = ancestor
        inside = reg.name
        detail += (
            f"; it descends from registered job {one_line(reg.name, 64)!r} "
            f"(pid {reg.key.pid}), which was registered without --include-children"
        )
    return GpuConsumerVerdict(
        process, info, None, UNREGISTERED, detail, inside, allocation=view, source=source
    )


def judge_open(
    info: ProcessInfo, lineage: list[ProcessInfo], registry: CoverageSource
) -> GpuConsumerVerdict:
    """The verdict on a process that opened /dev/nvidia-uvm (CUDA creating a
    context), seconds before NVML lists it on a GPU. No GPU is known yet, so
    of the schedulers' verdicts only "its pod or job was allocated no GPU"
    is certain here; otherwise a grant on any GPU (or, with ``gpu.trust:
    allocation``, an allocation of any GPU) covers it, and NVML's sighting
    decides the rest."""
    process = GpuProcess(info.pid, -1, "", None, None, None)
    what = "opened /dev/nvidia-uvm (creating a CUDA context)"
    who = f"pid {info.pid} ({one_line(info.comm, 32)})"
    server = _mps_server(process, info, who)
    if server is not None:
        return server
    owner = None
    if registry.allocations is not None:
        owner, alloc, _ = registry.allocations.owner_of(info)
        if owner is not None and alloc is not None:
            mine = one_line(describe_owner(owner), 96)
            if not alloc.gpus:
                return GpuConsumerVerdict(
                    process,
                    info,
                    None,
                    NOT_ALLOCATED,
                    f"{what}, but {owner.source} allocated {mine} no GPU",
                    source=owner.source,
                )
            if registry.trust == TRUST_ALLOCATION:
                return _inside_allocation(process, info, owner, alloc, who)
    coverage = registry.covering(info, lineage, GpuRef(-1, "", None))
    if coverage is not None:
        return GpuConsumerVerdict(
            process,
            info,
            coverage,
            None,
            f"{who} is allowed: {one_line(coverage.name, 64)!r}",
            source=coverage.source,
        )
    detail = f"{what} and is not registered"
    inside = None
    ancestor = registry.registered_ancestor(lineage)
    if ancestor is not None:
        inside = ancestor[0].name
        detail += (
            f"; it descends from job {one_line(inside, 64)!r}, registered without "
            "--include-children"
        )
    return GpuConsumerVerdict(process, info, None, UNREGISTERED, detail, inside)
