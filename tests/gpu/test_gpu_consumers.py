"""The verdict on one GPU consumer (pure logic; processes are plain records)."""

from __future__ import annotations

from rome_guard.events import GpuProcess, ProcessInfo
from rome_guard.findings import gpu_record
from rome_guard.gpu.consumers import (
    NOT_GRANTED,
    PROCESS_NOT_VISIBLE,
    UNREGISTERED,
    judge_consumer,
)
from rome_guard.gpu.registry import GpuRegistry, Registration, parse_allow
from tests.fixtures.processes import process_info

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"


def proc(pid: int, ppid: int = 1, start: int = 1000, comm: str = "python3", **kw) -> ProcessInfo:
    return process_info(
        pid,
        start,
        ppid=ppid,
        uid=0,
        user="root",
        comm=comm,
        exe="/usr/bin/python3",
        cmdline=(comm,),
        **kw,
    )


def on_gpu(pid: int, index: int = 0, mig: str | None = None) -> GpuProcess:
    return GpuProcess(pid, index, UUID0 if index == 0 else f"GPU-{index}", mig, 2**30, 90)


def registry_with(tmp_path, *regs: Registration, allow=()) -> GpuRegistry:
    registry = GpuRegistry(str(tmp_path), parse_allow(list(allow)))
    registry._by_key = {r.key: [r] for r in regs}  # as refresh() would load them
    return registry


def test_unregistered_consumer_inside_a_registered_job_names_the_job(tmp_path):
    trainer = proc(100)
    miner = proc(200, ppid=100, start=2000, comm="xmrig")
    registry = registry_with(tmp_path, Registration(trainer.key, job="sft-42"))
    verdict = judge_consumer(on_gpu(200), miner, [trainer], registry)
    assert verdict.reason == UNREGISTERED and not verdict.allowed
    assert verdict.inside_job == "sft-42"
    assert "xmrig" in verdict.detail and "without --include-children" in verdict.detail
    assert gpu_record(verdict.process) == {
        "index": 0,
        "uuid": UUID0,
        "mig": None,
        "used_memory_bytes": 2**30,
        "sm_util": 90,
    }


def test_registered_and_inherited_consumers_are_allowed(tmp_path):
    launcher = proc(100)
    worker = proc(200, ppid=100, start=2000)
    registry = registry_with(
        tmp_path, Registration(launcher.key, job="torchrun", include_children=True)
    )
    assert judge_consumer(on_gpu(100), launcher, [], registry).allowed
    verdict = judge_consumer(on_gpu(200), worker, [launcher], registry)
    assert verdict.allowed and verdict.coverage.inherited
    assert "through ancestor pid 100" in verdict.detail


def test_registered_job_on_a_gpu_it_was_not_granted(tmp_path):
    trainer = proc(100)
    registry = registry_with(tmp_path, Registration(trainer.key, job="sft", gpus=("0",)))
    assert judge_consumer(on_gpu(100, 0), trainer, [], registry).allowed
    verdict = judge_consumer(on_gpu(100, 1), trainer, [], registry)
    assert verdict.reason == NOT_GRANTED
    assert verdict.coverage.name == "sft"
    assert "granted only GPU(s) 0" in verdict.detail


def test_allowlisted_consumer_and_invisible_pid(tmp_path):
    registry = registry_with(tmp_path, allow=[{"name": "dcgm", "exe": "/usr/bin/nv-hostengine"}])
    hostengine = process_info(
        300,
        10,
        uid=0,
        user="root",
        comm="nv-hostengine",
        exe="/usr/bin/nv-hostengine",
        cmdline=("nv-hostengine",),
    )
    assert judge_consumer(on_gpu(300), hostengine, [], registry).coverage.name == "dcgm"
    verdict = judge_consumer(on_gpu(301), None, [], registry)
    assert verdict.reason == PROCESS_NOT_VISIBLE
    assert "host PID namespace" in verdict.detail


def test_hostile_process_names_cannot_forge_lines(tmp_path):
    evil = proc(400, comm="x\nFINDING none\x1b[2J")
    verdict = judge_consumer(on_gpu(400), evil, [], registry_with(tmp_path))
    assert "\n" not in verdict.detail and "\x1b" not in verdict.detail
    assert "x\\nFINDING none\\x1b" in verdict.detail
