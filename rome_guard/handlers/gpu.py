"""GPU: a process opened /dev/nvidia-uvm (from the eBPF sensor), or NVML's
periodic list of GPU processes (from the GPU watch).

Both ask gpu.consumers whether the process is allowed: by the schedulers'
allocations when a source is live (kubelet PodResources, Slurm: verdicts
gpu_not_allocated / gpu_not_granted), by a registered job or an allowlist
entry. A process it does not allow alerts under every gpu_unregistered
rule, the alert naming who decided (allocation_source). An open alerts
seconds before NVML lists the process; when NVML then lists it, the GPU
and memory are journalled as a confirmation of that alert, not as a
second alert. A registry change also tells the sensor which registered
jobs' cgroups to spare their loopback storm
(sensor_filter.ignore_registered_loopback).

Like every handler, it never reads /proc itself (ctx.processes does) and never
writes the journal except through ctx.alerts.
"""

from __future__ import annotations

from rome_guard.events import GpuOpenEvent, GpuProcess, GpuSnapshot, ProcessInfo
from rome_guard.findings import Finding
from rome_guard.gpu.consumers import (
    ALERTING,
    ALLOWED,
    GpuConsumerVerdict,
    judge_consumer,
    judge_open,
)
from rome_guard.handlers.context import Context
from rome_guard.linux import cgroup_id
from rome_guard.respond.metrics import gpu_usage

UVM_DEVICE = "/dev/nvidia-uvm"  # NVML-only tools (nvidia-smi, exporters) never open it


def on_gpu_open(ctx: Context, event: GpuOpenEvent) -> None:
    if ctx.gpu is None or not ctx.rules.gpu or not event.path.startswith(UVM_DEVICE):
        return
    info = ctx.processes.resolve(event.pid)
    if info is None:
        return
    lineage = ctx.processes.lineage(info)
    verdict = judge_open(info, lineage, ctx.gpu.registry)
    if not verdict.allowed:
        _alert(ctx, verdict, info, lineage, "open")


def on_gpu_snapshot(ctx: Context, snapshot: GpuSnapshot) -> None:
    assert ctx.gpu is not None
    if ctx.gpu.registry.refresh():
        sync_loopback_filter(ctx)
    ctx.metrics.event("nvml", len(snapshot.processes))
    verdicts: dict[tuple[int, str, int], str] = {}
    for device in snapshot.processes:
        info = ctx.processes.resolve(device.pid)
        lineage = ctx.processes.lineage(info) if info is not None else []
        verdict = judge_consumer(device, info, lineage, ctx.gpu.registry)
        verdicts[(device.gpu_index, device.gpu_uuid, device.pid)] = verdict.reason or ALLOWED
        if ctx.rules.gpu and verdict.reason in ALERTING and info is not None:
            _alert(ctx, verdict, info, lineage, "nvml")

    def verdict_of(p: GpuProcess) -> str:
        return verdicts[(p.gpu_index, p.gpu_uuid, p.pid)]

    gpus = [(d.index, d.uuid) for d in snapshot.devices]
    ctx.metrics.set_gpu_usage(
        gpu_usage(
            snapshot.processes,
            lambda p: verdict_of(p) == ALLOWED,
            gpus,
            verdict_of,
            ctx.gpu.owner_kinds,
        )
    )
    ctx.metrics.set_allocation_sources(ctx.gpu.sources_live())


def _alert(
    ctx: Context,
    verdict: GpuConsumerVerdict,
    info: ProcessInfo,
    lineage: list[ProcessInfo],
    source: str,
) -> None:
    earlier = ctx.gpu_alerts.pop(info.key, None) if source == "nvml" else None
    if earlier is not None:
        ctx.alerts.confirmed(earlier[0], earlier[1], info, verdict.process)
        return
    for rule in ctx.rules.gpu:
        finding = Finding(
            rule,
            info,
            verdict.detail,
            tuple(lineage),
            gpu=verdict.process,
            extra={
                "gpu_verdict": verdict.reason,
                "gpu_source": source,
                "allocation_source": verdict.source,
            },
        )
        record = ctx.alerts.raise_alert(finding)
        if record is not None and source == "open":
            # the incident's alert, also when this hit joined one as an update
            ctx.gpu_alerts[info.key] = (record.get("alert_id", record["id"]), rule.id)


def sync_loopback_filter(ctx: Context) -> None:
    """Registered jobs in cgroups of their own (a container, pod or Slurm
    job) make thousands of loopback connects (rendezvous, NCCL bootstrap)
    that no rule needs: the kernel drops those, and only those, for their
    cgroups. A shared cgroup (a user session, a system service) keeps
    everything."""
    if (
        ctx.sensor is None
        or ctx.gpu is None
        or not ctx.config.sensor_filter.ignore_registered_loopback
    ):
        return
    ids = set()
    for registration in ctx.gpu.registry.registrations():
        info = ctx.processes.get(registration.key)
        att = info.attribution if info is not None else None
        if att is None or not (att.container_id or att.pod_uid or att.slurm_job):
            continue
        try:
            ids.add(cgroup_id(info.cgroup))
        except OSError:
            continue
    if ids != ctx.loopback_ignored:
        ctx.sensor.set_loopback_ignore_cgroups(ids)
        ctx.loopback_ignored = ids
