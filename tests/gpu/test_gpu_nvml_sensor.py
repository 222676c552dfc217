"""The NVML sensor through the real pynvml bindings, against the stand-in
libnvidia-ml.so.1 (tests/fixtures/fake_nvml.c) in a worker process. The
processes on the scripted GPUs are real processes started by the test."""

from __future__ import annotations

import json
import time

from tests.fixtures import fake_nvml
from tests.fixtures.fake_nvml import FakeAccounting, FakeGpu, FakeProcess, FakeState

GPU0 = "GPU-00000000-1111-2222-3333-444444444444"
GPU1 = "GPU-11111111-1111-2222-3333-444444444444"
GPU2 = "GPU-22222222-1111-2222-3333-444444444444"
MIG_A = "MIG-aaaaaaaa-1111-2222-3333-444444444444"
MIG_B = "MIG-bbbbbbbb-1111-2222-3333-444444444444"


def by_pid(snapshot: dict) -> dict[int, dict]:
    return {p["pid"]: p for p in snapshot["processes"]}


def log_lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


def three_gpus(pids: list[int]) -> FakeState:
    a, b, c, d = pids
    return FakeState(
        gpus=[
            FakeGpu(0, GPU0, power_mw=312_000),
            FakeGpu(1, GPU1, name="NVIDIA A100-SXM4-80GB", power_mw=None),
            FakeGpu(2, GPU2, mig=[(0, MIG_A, 1, 0), (3, MIG_B, 2, 0)]),
        ],
        processes=[
            FakeProcess(0, a, memory=3 * 2**30, sm_util=87),
            FakeProcess(0, b, memory=None, graphics=True),
            FakeProcess(1, c, memory=2**30),
            FakeProcess(2, d, memory=5 * 2**30, slot=3),
        ],
    )


def test_inventory_and_processes_of_full_and_mig_gpus(nvml_worker, processes):
    pids = [processes.sleeper().pid for _ in range(4)]
    worker, _ = nvml_worker(three_gpus(pids))
    snap = worker.poll()
    assert snap["available"] is True
    devices = {d["index"]: d for d in snap["devices"]}
    assert [devices[i]["uuid"] for i in (0, 1, 2)] == [GPU0, GPU1, GPU2]
    assert devices[0]["name"] == "NVIDIA H100 80GB HBM3"
    assert devices[1]["name"] == "NVIDIA A100-SXM4-80GB"
    assert devices[0]["power_mw"] == 312_000
    assert devices[1]["power_mw"] is None  # NOT_SUPPORTED is a missing value, not a failure
    assert devices[2]["mig_enabled"] is True
    assert [(m["slot"], m["uuid"]) for m in devices[2]["mig_devices"]] == [(0, MIG_A), (3, MIG_B)]
    assert devices[2]["accounting"] is False  # unavailable under MIG
    assert devices[0]["accounting"] is True

    found = by_pid(snap)
    a, b, c, d = pids
    assert set(found) == set(pids)
    assert found[a] == {
        "pid": a,
        "gpu_index": 0,
        "gpu_uuid": GPU0,
        "mig": None,
        "used_memory_bytes": 3 * 2**30,
        "sm_util": 87,
        "mps_client": False,
    }
    assert found[b]["used_memory_bytes"] is None  # a graphics process without a figure
    assert (found[c]["gpu_index"], found[c]["gpu_uuid"]) == (1, GPU1)
    assert found[d]["mig"] == MIG_B and found[d]["gpu_index"] == 2
    assert found[d]["sm_util"] is None
    assert snap["failing"] == []
    worker.close()
    assert worker.finish().count("Traceback") == 0


def test_handles_are_acquired_once_and_reused(nvml_worker, processes):
    pids = [processes.sleeper().pid for _ in range(4)]
    worker, _ = nvml_worker(three_gpus(pids))
    for _ in range(5):
        assert len(worker.poll()["processes"]) == 4
        worker.advance(5)
    worker.close()
    worker.finish()
    calls = worker.calls()
    assert calls["nvmlInitWithFlags"] == 1
    assert calls["nvmlDeviceGetHandleByIndex_v2"] == 3
    assert calls["nvmlDeviceGetMigDeviceHandleByIndex"] == 8  # one enumeration of 8 slots
    # per poll: a size query on each of 2 GPUs and 2 MIG devices, and a
    # second call to fetch the list on the 3 that have compute processes
    assert calls["nvmlDeviceGetComputeRunningProcesses_v3"] == 5 * (4 + 3)
    assert calls["nvmlShutdown"] == 1


def test_library_that_cannot_be_loaded_turns_gpu_features_off(nvml_worker):
    worker, _ = nvml_worker(FakeState(), variant=fake_nvml.BROKEN)
    assert worker.start() is False
    for _ in range(3):
        snap = worker.poll()
        assert snap["available"] is False
        assert snap["processes"] == []
        assert "libnvidia-ml.so.1" in snap["reason"]
        worker.advance(1000)
    worker.close()
    stderr = worker.finish()
    assert len(log_lines(stderr, "NVML disabled")) == 1
    assert "Traceback" not in stderr


NO_LIBRARY_RUN = """
import json, threading
from rome_guard.sensors.nvml import NvmlSensor

sensor = NvmlSensor(poll_interval=0.1)
stop = threading.Event()
snapshots = []
thread = threading.Thread(target=sensor.run, args=(snapshots.append, stop))
thread.start()
stop.wait(1.0)  # ten poll intervals
polls = sensor.polls_total
stop.set()
thread.join(5)
print(json.dumps({"polls": polls, "snapshots": len(snapshots), "ended": not thread.is_alive(),
                  "available": snapshots[0].available}))
"""


def test_a_host_without_the_library_is_polled_once_then_the_thread_only_waits(tmp_path):
    # no GPU, no driver: nothing a later poll sees can differ, so the NVML
    # thread of an idle daemon must not wake every poll interval for it
    state = tmp_path / "state.txt"
    FakeState().write(state)
    result = fake_nvml.run_python(NO_LIBRARY_RUN, state, variant=fake_nvml.BROKEN)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {"polls": 1, "snapshots": 1, "ended": True, "available": False}


def test_driver_not_loaded_is_retried_and_recovers(nvml_worker, processes):
    pid = processes.sleeper().pid
    state = FakeState(
        gpus=[FakeGpu(0, GPU0)],
        processes=[FakeProcess(0, pid)],
        init_error=fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED,
    )
    worker, state_file = nvml_worker(state)
    assert worker.poll()["available"] is False
    worker.advance(60)
    snap = worker.poll()
    assert snap["available"] is False and "DRIVER_NOT_LOADED" in snap["reason"]
    state.init_error = 0
    state.write(state_file)
    worker.advance(MAX_WAIT)
    snap = worker.poll()
    assert snap["available"] is True
    assert [p["pid"] for p in snap["processes"]] == [pid]
    assert worker.errors()[("", "nvmlInit", "DRIVER_NOT_LOADED")] == 2
    worker.close()
    stderr = worker.finish()
    assert len(log_lines(stderr, "NVML unavailable (DRIVER_NOT_LOADED)")) == 1
    assert len(log_lines(stderr, "NVML recovered")) == 1


MAX_WAIT = 301  # longer than the longest back-off


def test_gpu_lost_mid_run_is_skipped_counted_and_retried(nvml_worker, processes):
    on0, on1 = processes.sleeper().pid, processes.sleeper().pid
    state = FakeState(
        gpus=[FakeGpu(0, GPU0), FakeGpu(1, GPU1)],
        processes=[FakeProcess(0, on0), FakeProcess(1, on1)],
    )
    worker, state_file = nvml_worker(state)
    assert set(by_pid(worker.poll())) == {on0, on1}

    state.gpus[1].fail_code, state.gpus[1].fail_count = fake_nvml.NVML_ERROR_GPU_IS_LOST, -1
    state.write(state_file)
    worker.advance(5)
    snap = worker.poll()
    assert snap["available"] is True
    assert set(by_pid(snap)) == {on0}  # the healthy GPU is still watched
    assert snap["failing"] == [1]
    lost = {k: n for k, n in worker.errors().items() if k[0] == "1" and k[2] == "GPU_IS_LOST"}
    assert sum(lost.values()) == 1

    # within the back-off the lost GPU is not asked again
    worker.advance(1)
    assert worker.poll()["failing"] == [1]
    lost_now = {k: n for k, n in worker.errors().items() if k[0] == "1" and k[2] == "GPU_IS_LOST"}
    assert lost_now == lost

    # still lost at the retry: the back-off doubles
    worker.advance(5)
    assert worker.poll()["failing"] == [1]
    state.gpus[1].fail_code = 0
    state.write(state_file)
    worker.advance(5)
    assert worker.poll()["failing"] == [1]  # 10 s back-off not over yet
    worker.advance(5)
    snap = worker.poll()
    assert snap["failing"] == []
    assert set(by_pid(snap)) == {on0, on1}
    worker.close()
    stderr = worker.finish()
    assert len(log_lines(stderr, "GPU 1 (" + GPU1 + ") failed with GPU_IS_LOST")) == 1
    assert len(log_lines(stderr, "answers again")) == 1


def test_driver_reload_reinitialises_nvml(nvml_worker, processes):
    pid = processes.sleeper().pid
    state = FakeState(gpus=[FakeGpu(0, GPU0)], processes=[FakeProcess(0, pid)])
    worker, state_file = nvml_worker(state)
    assert worker.poll()["available"] is True
    state.generation = 1  # every handle of the old driver answers UNINITIALIZED
    state.write(state_file)
    worker.advance(5)
    snap = worker.poll()
    assert snap["available"] is False
    assert "UNINITIALIZED" in snap["reason"]
    worker.advance(5)
    snap = worker.poll()
    assert snap["available"] is True
    assert [p["pid"] for p in snap["processes"]] == [pid]
    assert worker.errors()[("", "library", "UNINITIALIZED")] == 1
    worker.close()
    worker.finish()
    assert worker.calls()["nvmlInitWithFlags"] == 2


def test_older_driver_without_v3_queries_utilization_or_accounting(nvml_worker, processes):
    pid = processes.sleeper().pid
    state = FakeState(gpus=[FakeGpu(0, GPU0)], processes=[FakeProcess(0, pid, sm_util=50)])
    worker, _ = nvml_worker(state, variant=fake_nvml.OLD)
    for _ in range(3):
        snap = worker.poll()
        assert snap["available"] is True
        assert by_pid(snap)[pid]["used_memory_bytes"] == 2**30  # through the _v2 query
        assert by_pid(snap)[pid]["sm_util"] is None
        assert snap["devices"][0]["accounting"] is False
        worker.advance(5)
    errors = worker.errors()
    # each missing function is noticed once, then not called again
    assert errors[("0", "nvmlDeviceGetComputeRunningProcesses_v3", "FUNCTION_NOT_FOUND")] == 1
    assert errors[("0", "nvmlDeviceGetProcessUtilization", "FUNCTION_NOT_FOUND")] == 1
    assert errors[("0", "nvmlDeviceGetAccountingMode", "FUNCTION_NOT_FOUND")] == 1
    worker.close()
    assert "Traceback" not in worker.finish()
    assert worker.calls()["nvmlDeviceGetComputeRunningProcesses_v2"] == 3 * 2  # size + fetch


def test_zero_sample_utilization_raises_bare_nvmlerror_and_is_tolerated(
    fake_library, nvml_worker, processes, tmp_path
):
    pid = processes.sleeper().pid
    state = FakeState(
        gpus=[FakeGpu(0, GPU0, no_util_samples=True)], processes=[FakeProcess(0, pid)]
    )
    state_file = tmp_path / "bare.txt"
    state.write(state_file)
    # what the bindings do with it: a bare NVMLError with value 0
    probe = fake_nvml.run_python(
        "import pynvml as n\n"
        "n.nvmlInit()\n"
        "try:\n"
        "    n.nvmlDeviceGetProcessUtilization(n.nvmlDeviceGetHandleByIndex(0), 0)\n"
        "except n.NVMLError as e:\n"
        "    print(type(e).__name__, e.value)\n",
        state_file,
    )
    assert probe.stdout.split() == ["NVMLError", "0"], probe.stderr
    worker, _ = nvml_worker(state)
    snap = worker.poll()
    assert by_pid(snap)[pid]["sm_util"] is None
    assert snap["failing"] == []
    worker.close()
    assert "Traceback" not in worker.finish()


def test_accounting_reports_processes_that_ended_between_polls(nvml_worker, processes):
    running = processes.sleeper().pid
    old, short, seen = processes.exited_pid(), processes.exited_pid(), processes.sleeper()
    start_us = int(time.time() * 1e6) - 2_000_000
    state = FakeState(
        gpus=[FakeGpu(0, GPU0)],
        processes=[FakeProcess(0, running), FakeProcess(0, seen.pid)],
        accounting=[FakeAccounting(0, old, 2**20, False, start_us - 10**9)],
    )
    worker, state_file = nvml_worker(state)
    snap = worker.poll()
    assert snap["devices"][0]["accounting"] is True
    assert snap["finished"] == []  # history from before the guard started is not news

    # one process came and went between two polls; another was seen, then ended
    state.processes = [FakeProcess(0, running)]
    state.accounting += [
        FakeAccounting(0, short, 7 * 2**30, False, start_us),
        FakeAccounting(0, seen.pid, 2**30, False, start_us - 60_000_000),
    ]
    state.write(state_file)
    worker.advance(5)
    snap = worker.poll()
    assert [(f["pid"], f["max_memory_bytes"], f["gpu_uuid"]) for f in snap["finished"]] == [
        (short, 7 * 2**30, GPU0)
    ]
    worker.advance(5)
    assert worker.poll()["finished"] == []  # reported once
    worker.close()
    worker.finish()
    # accounting mode was switched on for the run and restored at close
    assert worker.calls()["nvmlDeviceSetAccountingMode"] == 2


def test_accounting_not_permitted_is_logged_once_and_polling_goes_on(nvml_worker, processes):
    pid = processes.sleeper().pid
    state = FakeState(
        gpus=[FakeGpu(0, GPU0, accounting_permitted=False)], processes=[FakeProcess(0, pid)]
    )
    worker, _ = nvml_worker(state)
    for _ in range(2):
        snap = worker.poll()
        assert snap["devices"][0]["accounting"] is False
        assert [p["pid"] for p in snap["processes"]] == [pid]
        worker.advance(5)
    worker.close()
    stderr = worker.finish()
    assert len(log_lines(stderr, "accounting mode unavailable (NO_PERMISSION)")) == 1


def test_listing_sensor_leaves_accounting_mode_alone(nvml_worker, processes):
    pid = processes.sleeper().pid
    state = FakeState(gpus=[FakeGpu(0, GPU0)], processes=[FakeProcess(0, pid)])
    worker, _ = nvml_worker(state, accounting=False)
    assert worker.poll()["devices"][0]["accounting"] is False
    worker.close()
    worker.finish()
    calls = worker.calls()
    assert "nvmlDeviceSetAccountingMode" not in calls
    assert "nvmlDeviceGetAccountingMode" not in calls
