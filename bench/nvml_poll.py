"""Cost of one NVML poll cycle, per GPU, side by side.

Default: the stand-in libnvidia-ml.so.1 (tests/fixtures) scripted with 8 GPUs
x 20 processes (real sleeping processes, so /proc reads are real), loaded
through LD_LIBRARY_PATH in a child interpreter that runs the real pynvml
bindings. ``--real`` measures the host's own NVML instead (on a GPU host).

Compared per cycle:
  reused   NvmlSensor.poll(): handles kept from start-up (what the daemon does)
  naive    the same poll from a fresh sensor: nvmlInit, every handle (and MIG
           handle) looked up again, nvmlShutdown, every cycle
  judged   poll + /proc read and lineage of every consumer + registry verdicts
           (what `rome-guard gpu list` and the daemon's GPU check cost)

The stand-in answers from memory, so its figures are the Python and ctypes
overhead of our code; a real driver adds its own per-call latency (which is
why handles are kept). Results print as a table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MEASURE = r"""
import json, sys, time, tempfile
from rome_guard.sensors.nvml import NvmlSensor
from rome_guard.gpu.registry import GpuRegistry
from rome_guard.gpu.report import collect

cycles = int(sys.argv[1])

def timed(fn):
    fn()  # warm-up
    began = time.perf_counter()
    for _ in range(cycles):
        fn()
    return (time.perf_counter() - began) / cycles

def naive():
    # the same poll, with NVML initialised and every handle acquired anew
    with NvmlSensor(poll_interval=5.0, accounting=False) as fresh:
        fresh.poll()

sensor = NvmlSensor(poll_interval=5.0, accounting=False)
assert sensor.start(), sensor.unavailable_reason
snap = sensor.poll()
gpus = len(snap.devices)
consumers = len(snap.processes)
run_dir = tempfile.TemporaryDirectory(prefix="rg-bench-")
registry = GpuRegistry(run_dir.name)
reused = timed(sensor.poll)
judged = timed(lambda: collect(sensor.poll(), registry))
sensor.close()
naive_s = timed(naive)
run_dir.cleanup()
print(json.dumps({"gpus": gpus, "consumers": consumers, "reused": reused,
                  "naive": naive_s, "judged": judged}))
"""


def run_measure(env: dict[str, str], cycles: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(cycles)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def stand_in_environment(gpus: int, per_gpu: int, workdir: str) -> tuple[dict, list]:
    from tests.fixtures import fake_nvml
    from tests.fixtures.fake_nvml import FakeGpu, FakeProcess, FakeState

    sleepers = [
        subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL) for _ in range(gpus * per_gpu)
    ]
    state = FakeState(
        gpus=[FakeGpu(i, f"GPU-{i:08x}-0000-0000-0000-000000000000") for i in range(gpus)],
        processes=[
            FakeProcess(i // per_gpu, p.pid, memory=2**30, sm_util=50)
            for i, p in enumerate(sleepers)
        ],
    )
    state_file = Path(workdir) / "state.txt"
    state.write(state_file)
    return fake_nvml.environment(state_file), sleepers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--per-gpu", type=int, default=20)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--real", action="store_true", help="the host's NVML, not the stand-in")
    args = parser.parse_args()

    sleepers: list = []
    with tempfile.TemporaryDirectory(prefix="rg-nvml-bench-") as workdir:
        try:
            if args.real:
                env = dict(os.environ, PYTHONPATH=str(REPO))
                label = "host NVML"
            else:
                env, sleepers = stand_in_environment(args.gpus, args.per_gpu, workdir)
                label = "stand-in libnvidia-ml.so.1"
            result = run_measure(env, args.cycles)
        finally:
            for proc in sleepers:
                proc.kill()
                proc.wait()

    gpus = max(result["gpus"], 1)
    print(f"NVML poll cycle, {label}: {result['gpus']} GPU(s), {result['consumers']} consumers")
    print(f"{'cycle':8} {'per cycle':>12} {'per GPU':>12} {'vs reused':>10}")
    for name in ("reused", "naive", "judged"):
        seconds = result[name]
        ratio = seconds / result["reused"]
        print(f"{name:8} {seconds * 1e3:10.3f}ms {seconds * 1e3 / gpus:10.3f}ms {ratio:9.2f}x")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    name = "nvml_poll_real.json" if args.real else "nvml_poll.json"
    (results / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
