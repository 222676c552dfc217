"""Which pod or Slurm job the scheduler gave which GPU: the ground truth.

A scheduler source (the kubelet's PodResources API, Slurm's controller)
produces an ``AllocationSnapshot``: the owners it knows on this node (a pod,
a Slurm job) and the GPUs each was allocated, or, when the source is not
reachable, why not. ``Allocations`` keeps the latest snapshot of every
source, refreshes them on a thread of their own (a bounded interval, sooner
when a consumer names an owner no snapshot knows: a pod or job that just
started) and answers two questions in pure code:

- ``owner_of(info)``: the pod or job a process belongs to (its cgroup path,
  or for Slurm without cgroups the pids slurmd reports);
- ``allocated_to(gpu)``: the owners a GPU was given to.

``judge_allocation`` turns those into the scheduler's part of a verdict.
Nothing here reads NVML, alerts or kills; a source that is down makes the
registry work as it does without schedulers, and says so.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable, Protocol

from rome_guard.events import ProcessInfo
from rome_guard.gpu.registry import GpuRef

log = logging.getLogger(__name__)

SOURCE_KUBELET = "kubelet"
SOURCE_SLURM = "slurm"
SOURCES = (SOURCE_KUBELET, SOURCE_SLURM)
SOURCES = (SOURCE_KUBELET, SOURCE_SLURM)
OWNER_POD = "pod"
OWNER_SLURM_JOB = "slurm_job"
OWNER_KINDS = (OWNER_POD, OWNER_SLURM_JOB)

TRUST_PROCESS = "process"  # the scheduler's word is needed, and so is a registration
TRUST_ALLOCATION = "allocation"  # anything inside the right allocation may use it
TRUST_CHOICES = (TRUST_PROCESS, TRUST_ALLOCATION)

MIN_REFRESH_S = 1.0  # churn-triggered refreshes come no closer than this


@dataclass(frozen=True)
class Owner:
    """A pod or Slurm job, as the scheduler names it."""

    kind: str  # OWNER_POD | OWNER_SLURM_JOB
    id: str  # pod UID | Slurm job id
    name: str  # namespace/name | job id (and name)
    source: str  # SOURCE_KUBELET | SOURCE_SLURM


@dataclass(frozen=True)
class Allocation:
    owner: Owner
    # GPU ids as the scheduler gave them: GPU or MIG UUIDs (kubelet), NVML
    # indices (Slurm); empty: the owner was allocated no GPU
    gpus: tuple[str, ...] = ()
    # per container (kubelet) or step (Slurm), when the scheduler says
    parts: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True)
class AllocationSnapshot:
    source: str
    live: bool
    reason: str = ""  # why the source is not live, or what it could not do
    allocations: tuple[Allocation, ...] = ()
    allocatable: tuple[str, ...] = ()  # GPUs the scheduler manages on this node
    # Slurm without cgroups: pid -> job id, from slurmd (scontrol listpids)
    pids: dict[int, str] = field(default_factory=dict)
    # kubelet: container id -> container name, where the node tells them
    # apart; an allocation's parts are then judged per container
    containers: dict[str, str] = field(default_factory=dict)
    taken_at: float = 0.0

    @cached_property
    def _owners(self) -> dict[str, Allocation]:
        return {a.owner.id: a for a in self.allocations}

    def by_owner(self) -> dict[str, Allocation]:
        return self._owners


class AllocationSource(Protocol):
    name: str

    def snapshot(self) -> AllocationSnapshot: ...

    def close(self) -> None: ...


def gpu_matches(grant: str, gpu: GpuRef) -> bool:
    """A scheduler's device id against the GPU NVML saw. A GPU UUID or index
    covers its MIG devices; a MIG UUID covers that MIG device only. Kubelet
    ids of shared (time-sliced) GPUs carry a replica suffix: GPU-...::3."""
    grant = grant.split("::", 1)[0].strip()
    if grant.isdigit():
        return int(grant) == gpu.index
    low = grant.lower()
    return low == gpu.uuid.lower() or bool(gpu.mig and low == gpu.mig.lower())


@dataclass(frozen=True)
class AllocationVerdict:
    """The scheduler's view of one process on one GPU."""

    owner: Owner | None  # the process's pod/job, when a live source knows it
    allocation: Allocation | None  # its allocation
    holders: tuple[Owner, ...]  # who the GPU was allocated to
    granted: bool  # the owner was allocated this GPU

    @property
    def source(self) -> str | None:
        if self.owner is not None:
            return self.owner.source
        return self.holders[0].source if self.holders else None


def describe_owner(owner: Owner) -> str:
    kind = "pod" if owner.kind == OWNER_POD else "Slurm job"
    return f"{kind} {owner.name}"


def _narrowed(alloc: Allocation, part: str | None) -> tuple[Owner, Allocation]:
    """A pod's allocation narrowed to the container a process runs in, when
    the kubelet listed that container: a sidecar of a GPU pod was given none."""
    parts = dict(alloc.parts)
    if part is None or part not in parts:
        return alloc.owner, alloc
    pod = alloc.owner
    owner = Owner(pod.kind, pod.id, f"{pod.name}/{part}", pod.source)
    return owner, Allocation(owner, parts[part], ((part, parts[part]),))


class Allocations:
    """The latest snapshot of every scheduler source, refreshed on a thread
    (``start``) or by hand (``refresh``). Lookups are pure over the
    snapshots and safe from any thread."""

    def __init__(
        self,
        sources: Iterable[AllocationSource],
        interval: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.sources = list(sources)
        self.interval = interval
        self._clock = clock
        self._snapshots: dict[str, AllocationSnapshot] = {
            s.name: AllocationSnapshot(s.name, False, "not queried yet") for s in self.sources
        }
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._refreshed_at = -1e9
        self._said: dict[str, bool] = {}
        # unknown owners that already asked for a refresh: one that the next
        # answer does not name either (a static pod, a job on another
        # cluster) waits for the regular interval instead of asking each poll
        self._asked: set[str] = set()

    # --- refreshing -------------------------------------------------------

    def refresh(self) -> None:
        for source in self.sources:
            if self._stop.is_set():
                return
            try:
                snap = source.snapshot()
            except Exception as exc:  # a source bug must not stop the others
                log.exception("GPU allocation source %s failed", source.name)
                snap = AllocationSnapshot(source.name, False, f"error: {exc}")
            self._report(snap)
            self._snapshots[source.name] = snap
        self._refreshed_at = self._clock()

    def _report(self, snap: AllocationSnapshot) -> None:
        """Say once when a source goes live or down, not on every refresh."""
        if self._said.get(snap.source) == snap.live:
            return
        self._said[snap.source] = snap.live
        if snap.live:
            log.info(
                "GPU allocations from %s: %d owner(s) on this node",
                snap.source,
                len(snap.allocations),
            )
        else:
            log.warning(
                "GPU allocations from %s unavailable (%s): consumers are judged on "
                "registrations and gpu.allow only",
                snap.source,
                snap.reason,
            )

    def request_refresh(self) -> None:
        """A consumer named a pod or job no snapshot knows (it just started):
        refresh soon, but no more often than MIN_REFRESH_S."""
        self._wake.set()

    def start(self) -> None:
        if not self.sources or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gpu-allocations", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            if not self._wake.wait(self.interval):
                self._asked.clear()  # the regular refresh: unknown owners may ask again
            self._wake.clear()
            # churn can come in bursts (a job array): one refresh per second at most
            self._stop.wait(max(0.0, MIN_REFRESH_S - (self._clock() - self._refreshed_at)))

    def close(self) -> None:
        """Stop refreshing. A query in flight is not waited for (the daemon
        has 2 s to exit): closing the sources cancels a gRPC call, and the
        thread is a daemon thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(0.2)
        for source in self.sources:
            source.close()

    # --- reading ----------------------------------------------------------

    def snapshots(self) -> list[AllocationSnapshot]:
        return [self._snapshots[s.name] for s in self.sources]

    def live_sources(self) -> list[str]:
        return [s.source for s in self.snapshots() if s.live]

    def owner_of(self, info: ProcessInfo) -> tuple[Owner | None, Allocation | None, bool]:
        """The pod or job info belongs to, its allocation, and whether a live
        source should know it but does not (a pod or job that started after
        the last refresh): then the caller judges without the scheduler."""
        att = info.attribution
        for snap in self.snapshots():
            if not snap.live:
                continue
            if snap.source == SOURCE_KUBELET:
                key = att.pod_uid
            else:
                key = att.slurm_job or snap.pids.get(info.pid)
            if not key:
                continue
            found = snap.by_owner().get(key)
            if found is None:
                if key not in self._asked:
                    self._asked.add(key)
                    self.request_refresh()
                return None, None, True
            return (*_narrowed(found, snap.containers.get(att.container_id or "")), False)
        return None, None, False

    def allocated_to(self, gpu: GpuRef) -> tuple[Owner, ...]:
        holders = []
        for snap in self.snapshots():
            if snap.live:
                for alloc in snap.allocations:
                    if any(gpu_matches(g, gpu) for g in alloc.gpus):
                        holders.append(alloc.owner)
        return tuple(holders)

    def judge(self, info: ProcessInfo, gpu: GpuRef) -> AllocationVerdict | None:
        """The scheduler's view, or None when no live source has one (no
        scheduler, or a pod/job too new to be in the last snapshot)."""
        return judge_allocation(self, info, gpu)


def judge_allocation(
    allocations: Allocations, info: ProcessInfo, gpu: GpuRef
) -> AllocationVerdict | None:
    owner, allocation, unknown = allocations.owner_of(info)
    if unknown:
        return None
    holders = allocations.allocated_to(gpu)
    if owner is None and not holders:
        return None
    granted = allocation is not None and any(gpu_matches(g, gpu) for g in allocation.gpus)
    return AllocationVerdict(owner, allocation, holders, granted)


def from_config(config: object) -> Allocations:
    """The scheduler sources the config asks for (gpu.kubelet, gpu.slurm).
    A source in ``auto`` that finds nothing on this host reports itself down
    at every refresh and costs one stat (kubelet) or one PATH lookup (Slurm)."""
    gpu = config.gpu  # type: ignore[attr-defined]
    sources: list[AllocationSource] = []
    if gpu.kubelet.enabled != "off":
        from rome_guard.gpu.kubelet import PodResourcesSource

        sources.append(
            PodResourcesSource(
                gpu.kubelet.socket,
                gpu.kubelet.pod_logs_dir,
                gpu.kubelet.timeout,
                gpu.kubelet.resources,
                gpu.kubelet.container_logs_dir,
            )
        )
    if gpu.slurm.enabled != "off":
        from rome_guard.gpu.slurm import SlurmClient, SlurmSource

        client = SlurmClient(gpu.slurm.scontrol, gpu.slurm.conf, gpu.slurm.timeout)
        sources.append(SlurmSource(client, gpu.slurm.node))
    return Allocations(sources, interval=gpu.allocation_refresh)
