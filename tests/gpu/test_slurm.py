"""Slurm GRES allocations through a real single-node Slurm (slurmctld,
slurmd, munged from Debian, started by the fixture), real jobs submitted
with --gres=gpu:N, the shipped prolog and epilog registering and
unregistering each job's launcher, and `rome-guard gpu list` over the
stand-in NVML library. Also the parsers, on Slurm 22.05's own output."""

from __future__ import annotations

import json

import pytest

from rome_guard.gpu.slurm import (
    SlurmClient,
    SlurmSource,
    StepPid,
    expand_hostlist,
    find_launcher,
    parse_jobs,
    parse_listpids,
)
from tests.fixtures.fake_nvml import FakeGpu, FakeProcess, FakeState
from tests.gpu.test_gpu_cli import rome_guard

GPUS = [f"GPU-{i:08d}-1111-2222-3333-444444444444" for i in range(4)]

# `scontrol show job -d -o` from slurm-wlm 22.05.8, trimmed
SHOW_JOB = (
    "JobId=812 JobName=llama-sft UserId=alice(1000) GroupId=alice(1000) JobState=RUNNING "
    "NodeList=gpu[07-08] NumNodes=2 JOB_GRES=gpu:a100:4   Nodes=gpu07 CPU_IDs=0-7 Mem=0 "
    "GRES=gpu:a100:2(IDX:0-1)   Nodes=gpu08 CPU_IDs=0-7 Mem=0 GRES=gpu:a100:2(IDX:2,3) "
    "MinCPUsNode=1 Command=/home/alice/train.sh\n"
    "JobId=815 JobName=wrap UserId=bob(1001) GroupId=bob(1001) JobState=RUNNING "
    "NodeList=gpu07 NumNodes=1 JOB_GRES=gpu:1   Nodes=gpu07 CPU_IDs=8 Mem=1000 "
    "GRES=gpu:1(IDX:3) MinCPUsNode=1\n"
    "JobId=816 JobName=cpu-only UserId=bob(1001) GroupId=bob(1001) JobState=RUNNING "
    "NodeList=gpu07 NumNodes=1   Nodes=gpu07 CPU_IDs=9 Mem=1000 GRES= MinCPUsNode=1\n"
    "JobId=817 JobName=old UserId=bob(1001) GroupId=bob(1001) JobState=COMPLETED "
    "NodeList=gpu07 NumNodes=1   Nodes=gpu07 CPU_IDs=9 Mem=1000 GRES=gpu:1(IDX:0)\n"
    "JobId=818 JobName=elsewhere UserId=bob(1001) GroupId=bob(1001) JobState=RUNNING "
    "NodeList=gpu09 NumNodes=1   Nodes=gpu09 CPU_IDs=0 Mem=1000 GRES=gpu:1(IDX:0)\n"
)


def test_parse_jobs_takes_the_gpus_on_this_node_only():
    jobs = {j.job_id: j for j in parse_jobs(SHOW_JOB, "gpu08")}
    assert jobs["812"].gpus == ("2", "3") and jobs["812"].on_node
    assert not jobs["815"].on_node and "817" not in jobs
    jobs = {j.job_id: j for j in parse_jobs(SHOW_JOB, "gpu07")}
    assert jobs["812"].gpus == ("0", "1") and jobs["812"].name == "llama-sft"
    assert jobs["815"].gpus == ("3",) and jobs["816"].gpus == () and jobs["816"].on_node
    assert not jobs["818"].on_node


def test_hostlists_and_listpids():
    assert expand_hostlist("gpu[07-09,11],login1") == ["gpu07", "gpu08", "gpu09", "gpu11", "login1"]
    text = (
        "PID      JOBID    STEPID   LOCALID GLOBALID\n"
        "4001     812      batch    0       0\n"
        "4002     812      batch    -       -\n"
        "4100     812      0        0       0\n"
    )
    pids = parse_listpids(text)
    assert pids[0] == StepPid(4001, "812", "batch", "0")
    parents = {4001: 3990, 4002: 4001, 4100: 4050}
    assert find_launcher(pids, "812", parents.get) == 4001
    # salloc + srun: no batch step, task 0 of the first step
    assert find_launcher(pids[2:], "812", parents.get) == 4100
    assert find_launcher(pids, "999", parents.get) is None


def _wait_registered(slurm, run_dir, pid: int) -> None:
    import time

    deadline = time.monotonic() + 120
    while not any(
        json.loads(p.read_text())["pid"] == pid for p in (run_dir / "registrations").glob("*.json")
    ):
        if time.monotonic() > deadline:
            log = slurm.root / "log" / "prolog.log"
            raise AssertionError(f"prolog did not register {pid}: {log.read_text()}")
        time.sleep(0.1)


def test_jobs_on_their_gpus_and_on_each_others(slurm, tmp_path, fake_library):
    run_dir = slurm.run_dir
    run_dir.mkdir(exist_ok=True)
    # the launcher computes itself and starts a helper (an agent's tool call)
    trainer_job = slurm.submit("#!/bin/sh\nsleep 1000 &\nwait\n", "--gres=gpu:2", "-J", "sft")
    thief_job = slurm.submit("#!/bin/sh\nsleep 1001 &\nwait\n", "--gres=gpu:1", "-J", "thief")
    cpu_job = slurm.submit("#!/bin/sh\nsleep 1002 &\nwait\n", "-J", "cpu-only")
    pids = {}
    for job_id in (trainer_job, thief_job, cpu_job):
        rows = slurm.wait_running(job_id, processes=2)
        launcher = next(pid for pid, step, local in rows if step == "batch" and local == "0")
        child = next(pid for pid, _, _ in rows if pid != launcher)
        pids[job_id] = (launcher, child)
    trainer, helper = pids[trainer_job]
    thief, _ = pids[thief_job]
    cpu_launcher, _ = pids[cpu_job]
    for launcher in (trainer, thief):
        _wait_registered(slurm, run_dir, launcher)

    state = tmp_path / "state.txt"
    FakeState(
        gpus=[FakeGpu(i, GPUS[i]) for i in range(4)],
        processes=[
            FakeProcess(0, trainer),  # GPUs 0-1 are the trainer's (gres.conf order)
            FakeProcess(1, helper),
            FakeProcess(1, thief),  # the thief was given GPU 2
            FakeProcess(3, cpu_launcher),  # a job with no GPU at all
        ],
    ).write(state)
    (run_dir / "config.yaml").write_text(
        f"gpu:\n  kubelet:\n    enabled: 'off'\n  slurm:\n    conf: {slurm.conf}\n"
        f"    node: {slurm.node}\n"
    )
    out = rome_guard(run_dir, "list", "--json", state=state)
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    by = {p["pid"]: p for g in doc["gpus"] for p in g["processes"]}
    assert by[trainer]["status"] == "registered" and by[trainer]["job"] == f"slurm-{trainer_job}"
    assert by[helper]["status"] == "unregistered"
    assert by[helper]["owner"]["id"] == trainer_job and by[helper]["source"] == "slurm"
    # registered by the prolog, for GPU 2 only: Slurm's word decides
    assert by[thief]["status"] == "gpu_not_granted" and by[thief]["source"] == "slurm"
    assert f"allocated to Slurm job {trainer_job} (sft)" in by[thief]["detail"]
    assert by[cpu_launcher]["status"] == "gpu_not_allocated"
    assert by[cpu_launcher]["coverage"] is None  # the prolog registers no GPU-less job
    allocated = {g["index"]: [o["id"] for o in g["allocated_to"]] for g in doc["gpus"]}
    assert allocated == {0: [trainer_job], 1: [trainer_job], 2: [thief_job], 3: []}
    [src] = doc["allocation_sources"]
    assert src["source"] == "slurm" and src["live"]

    # the epilog removes what the prolog registered
    slurm.cancel_all()
    assert not list((run_dir / "registrations").glob("*.json"))


def test_slurm_source_degrades_when_slurm_is_absent(tmp_path):
    src = SlurmSource(SlurmClient(conf=str(tmp_path / "slurm.conf")), node="gpu07")
    snap = src.snapshot()
    assert not snap.live and "slurm.conf" in snap.reason
    src = SlurmSource(SlurmClient(scontrol=str(tmp_path / "no-scontrol")), node="gpu07")
    assert "not found" in src.snapshot().reason


@pytest.mark.parametrize("second", [1, 2])
def test_the_cluster_fixture_starts_and_stops_cleanly(tmp_path_factory, second):
    """Twice in a row, each time from nothing: no daemon of the first stays."""
    import os

    from tests.conftest import require
    from tests.fixtures.slurm import SlurmCluster

    require(os.geteuid() == 0, "slurmd runs jobs as root here")
    cluster = SlurmCluster(tmp_path_factory.mktemp(f"slurm-{second}"), gpus=1)
    try:
        cluster.start()
        job = cluster.submit("#!/bin/sh\nsleep 1000\n", "--gres=gpu:1")
        cluster.wait_running(job)
        assert len(cluster.daemons) == 3
    finally:
        cluster.stop()
    assert cluster.daemons == []
    assert cluster.leftovers() == []
