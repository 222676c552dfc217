"""Verdicts with the schedulers' allocations: pure logic over snapshots, no
scheduler, NVML or /proc. The real sources are tested against a real gRPC
server (test_kubelet.py) and a real Slurm (test_slurm.py)."""

from __future__ import annotations

import pytest

from rome_guard.config import Config, load_config
from rome_guard.events import Attribution, GpuProcess, ProcessKey
from rome_guard.gpu.allocations import (
    OWNER_POD,
    OWNER_SLURM_JOB,
    SOURCE_KUBELET,
    SOURCE_SLURM,
    Allocation,
    Allocations,
    AllocationSnapshot,
    Owner,
    gpu_matches,
)
from rome_guard.gpu.consumers import (
    NOT_ALLOCATED,
    NOT_GRANTED,
    UNREGISTERED,
    judge_consumer,
    judge_open,
)
from rome_guard.gpu.registry import GpuRef, GpuRegistry, Registration
from rome_guard.yamlsrc import SourceError
from tests.fixtures.processes import process_info

GPU0 = "GPU-00000000-1111-2222-3333-444444444444"
GPU1 = "GPU-11111111-1111-2222-3333-444444444444"
MIG_A = "MIG-aaaaaaaa-1111-2222-3333-444444444444"
MIG_B = "MIG-bbbbbbbb-1111-2222-3333-444444444444"
TRAINER_POD = "5f3c1a2b-0000-4000-8000-000000000001"
NOTEBOOK_POD = "5f3c1a2b-0000-4000-8000-000000000002"
NEW_POD = "5f3c1a2b-0000-4000-8000-000000000003"


class FixedSource:
    def __init__(self, snapshot: AllocationSnapshot):
        self.name = snapshot.source
        self.snap = snapshot
        self.asked = 0

    def snapshot(self) -> AllocationSnapshot:
        self.asked += 1
        return self.snap

    def close(self) -> None:
        pass


def pod(uid: str, name: str, *gpus: str) -> Allocation:
    return Allocation(Owner(OWNER_POD, uid, name, SOURCE_KUBELET), gpus)


def job(job_id: str, *gpus: str) -> Allocation:
    return Allocation(Owner(OWNER_SLURM_JOB, job_id, job_id, SOURCE_SLURM), gpus)


def registry(tmp_path, *allocs: Allocation, source: str = SOURCE_KUBELET, live=True, pids=None):
    snap = AllocationSnapshot(source, live, "", tuple(allocs), pids=pids or {})
    reg = GpuRegistry(str(tmp_path), allocations=Allocations([FixedSource(snap)]))
    reg.allocations.refresh()
    return reg


def in_pod(pid: int, uid: str, **kw):
    return process_info(pid, attribution=Attribution(pod_uid=uid), **kw)


def in_job(pid: int, job_id: str | None, **kw):
    return process_info(pid, attribution=Attribution(slurm_job=job_id), **kw)


def on(pid: int, index: int, uuid: str, mig: str | None = None) -> GpuProcess:
    return GpuProcess(pid, index, uuid, mig, 2**30, None)


def test_a_pod_given_no_gpu_is_not_allocated_and_another_pods_gpu_is_not_granted(tmp_path):
    reg = registry(tmp_path, pod(TRAINER_POD, "ml/trainer", GPU0), pod(NOTEBOOK_POD, "ml/nb"))
    v = judge_consumer(on(10, 0, GPU0), in_pod(10, NOTEBOOK_POD), [], reg)
    assert v.reason == NOT_ALLOCATED and v.source == SOURCE_KUBELET
    assert "ml/nb" in v.detail and "no GPU" in v.detail

    v = judge_consumer(on(11, 1, GPU1), in_pod(11, TRAINER_POD), [], reg)
    assert v.reason == NOT_GRANTED and v.source == SOURCE_KUBELET
    assert v.owner.name == "ml/trainer"

    # a host process (no pod) on the trainer's GPU
    v = judge_consumer(on(12, 0, GPU0), process_info(12), [], reg)
    assert v.reason == NOT_GRANTED and "ml/trainer" in v.detail


def test_inside_the_right_allocation_registration_still_decides_by_default(tmp_path):
    reg = registry(tmp_path, pod(TRAINER_POD, "ml/trainer", GPU0))
    trainer = in_pod(20, TRAINER_POD, start=500)
    tool_call = in_pod(21, TRAINER_POD, start=600, ppid=20)
    v = judge_consumer(on(21, 0, GPU0), tool_call, [trainer], reg)
    assert v.reason == UNREGISTERED and v.inside_job == "ml/trainer"
    assert v.source == SOURCE_KUBELET and "allocation of pod ml/trainer" in v.detail

    reg._by_key = {trainer.key: [Registration(ProcessKey(20, 500), "trainer", (GPU0,))]}
    v = judge_consumer(on(20, 0, GPU0), trainer, [], reg)
    assert v.allowed and v.source == "registration"
    v = judge_consumer(on(21, 0, GPU0), tool_call, [trainer], reg)
    assert v.reason == UNREGISTERED  # the trainer's child: the case registration exists for

    reg.trust = "allocation"
    v = judge_consumer(on(21, 0, GPU0), tool_call, [trainer], reg)
    assert v.allowed and v.source == SOURCE_KUBELET and v.coverage.name == "ml/trainer"
    # the allocation alone never grants a GPU the pod was not given
    v = judge_consumer(on(21, 1, GPU1), tool_call, [trainer], reg)
    assert v.reason == NOT_GRANTED


def test_the_uvm_open_is_judged_through_the_allocations_too(tmp_path):
    """judge_open (the CUDA context open, before NVML names a GPU): a pod
    allocated no GPU is certain at once; inside an allocation the
    registration decides unless gpu.trust: allocation."""
    reg = registry(tmp_path, pod(TRAINER_POD, "ml/trainer", GPU0), pod(NOTEBOOK_POD, "ml/nb"))
    v = judge_open(in_pod(40, NOTEBOOK_POD), [], reg)
    assert v.reason == NOT_ALLOCATED and v.source == SOURCE_KUBELET
    assert "ml/nb" in v.detail and "no GPU" in v.detail

    trainer = in_pod(41, TRAINER_POD, start=800)
    tool_call = in_pod(42, TRAINER_POD, start=900, ppid=41)
    v = judge_open(tool_call, [trainer], reg)
    assert v.reason == UNREGISTERED and v.source is None

    reg._by_key = {trainer.key: [Registration(trainer.key, "trainer", (GPU0,))]}
    v = judge_open(trainer, [], reg)
    assert v.allowed and v.source == "registration"
    assert judge_open(tool_call, [trainer], reg).reason == UNREGISTERED
    assert judge_open(in_pod(43, NOTEBOOK_POD), [], reg).reason == NOT_ALLOCATED

    reg.trust = "allocation"
    v = judge_open(tool_call, [trainer], reg)
    assert v.allowed and v.source == SOURCE_KUBELET and v.coverage.name == "ml/trainer"
    # the trust switch never allows a pod that was given no GPU
    assert judge_open(in_pod(44, NOTEBOOK_POD), [], reg).reason == NOT_ALLOCATED


def test_a_registered_host_process_on_a_scheduled_gpu_stays_allowed(tmp_path):
    reg = registry(tmp_path, pod(TRAINER_POD, "ml/trainer", GPU0))
    host = process_info(30, start=700)
    reg._by_key = {host.key: [Registration(host.key, "dcgm-probe", None)]}
    assert judge_consumer(on(30, 0, GPU0), host, [], reg).allowed
    # and an unregistered one on an unscheduled GPU is what it was before
    v = judge_consumer(on(31, 1, GPU1), process_info(31), [], reg)
    assert v.reason == UNREGISTERED and v.allocation is None


@pytest.mark.parametrize(
    ("grant", "gpu", "expected"),
    [
        (GPU0, GpuRef(0, GPU0), True),
        (GPU0.lower(), GpuRef(0, GPU0), True),
        (GPU0, GpuRef(0, GPU0, MIG_A), True),  # a whole GPU covers its MIG devices
        (MIG_A, GpuRef(0, GPU0, MIG_A), True),
        (MIG_A, GpuRef(0, GPU0, MIG_B), False),
        (MIG_A, GpuRef(0, GPU0), False),
        (f"{GPU0}::3", GpuRef(0, GPU0), True),  # time-sliced replica
        ("0", GpuRef(0, GPU0), True),  # Slurm index
        ("1", GpuRef(0, GPU0), False),
        (GPU1, GpuRef(0, GPU0), False),
    ],
)
def test_scheduler_device_ids_match_gpus_and_mig_devices(grant, gpu, expected):
    assert gpu_matches(grant, gpu) is expected


def test_mig_devices_of_one_gpu_given_to_two_pods(tmp_path):
    reg = registry(tmp_path, pod(TRAINER_POD, "ml/a", MIG_A), pod(NOTEBOOK_POD, "ml/b", MIG_B))
    v = judge_consumer(on(40, 0, GPU0, MIG_B), in_pod(40, TRAINER_POD), [], reg)
    assert v.reason == NOT_GRANTED and "ml/b" in v.detail
    reg.trust = "allocation"
    assert judge_consumer(on(40, 0, GPU0, MIG_A), in_pod(40, TRAINER_POD), [], reg).allowed


def test_a_pod_too_new_for_the_snapshot_is_judged_on_registrations_and_asks_for_a_refresh(
    tmp_path,
):
    reg = registry(tmp_path, pod(TRAINER_POD, "ml/trainer", GPU0))
    assert not reg.allocations._wake.is_set()
    v = judge_consumer(on(50, 1, GPU1), in_pod(50, NEW_POD), [], reg)
    assert v.reason == UNREGISTERED and v.allocation is None
    assert reg.allocations._wake.is_set()
    # the refresh did not name it either (a static pod): no refresh per poll
    reg.allocations._wake.clear()
    reg.allocations.refresh()
    judge_consumer(on(50, 1, GPU1), in_pod(50, NEW_POD), [], reg)
    assert not reg.allocations._wake.is_set()


def test_slurm_jobs_found_by_cgroup_or_by_slurmd_pids(tmp_path):
    reg = registry(
        tmp_path,
        job("812", "0", "1"),
        job("815", "2"),
        job("816"),
        source=SOURCE_SLURM,
        pids={60: "815"},
    )
    # job 815 (known from slurmd's pids, no cgroup) on job 812's GPU
    v = judge_consumer(on(60, 0, GPU0), in_job(60, None), [], reg)
    assert v.reason == NOT_GRANTED and v.source == SOURCE_SLURM
    assert "812" in v.detail and "only 2" in v.detail
    v = judge_consumer(on(61, 3, GPU1), in_job(61, "816"), [], reg)
    assert v.reason == NOT_ALLOCATED
    reg.trust = "allocation"
    assert judge_consumer(on(62, 1, GPU1), in_job(62, "812"), [], reg).allowed


def test_a_source_that_is_down_leaves_the_registry_as_it_was(tmp_path):
    reg = registry(tmp_path, pod(NOTEBOOK_POD, "ml/nb"), live=False)
    v = judge_consumer(on(70, 0, GPU0), in_pod(70, NOTEBOOK_POD), [], reg)
    assert v.reason == UNREGISTERED and v.allocation is None and v.source is None
    assert reg.allocations.live_sources() == []


def test_config_trust_and_scheduler_keys(tmp_path):
    assert Config().gpu.trust == "process"
    path = tmp_path / "config.yaml"
    path.write_text(
        "gpu:\n  trust: allocation\n  kubelet:\n    socket: /run/k.sock\n"
        "  slurm:\n    enabled: 'off'\n"
    )
    config = load_config(str(path))
    assert config.gpu.trust == "allocation"
    assert config.gpu.kubelet.socket == "/run/k.sock"
    assert config.gpu.slurm.enabled == "off"
    path.write_text("gpu:\n  trust: pods\n")
    with pytest.raises(SourceError, match=r"config.yaml:2.*gpu.trust must be one of"):
        load_config(str(path))
