"""The daemon's GPU side on the stand-in libnvidia-ml (issue 5 targets):

- daemon CPU at gpu.poll_interval 1 s with 8 GPUs x 20 real processes on
  them, against the same daemon with no NVML library (same run, same host);
- time from a process's first open of /dev/nvidia-uvm (a stand-in node) to
  its gpu_unregistered alert in the journal, p50/p99.

Needs root and eBPF (the open is seen by the eBPF sensor). Everything it
starts is stopped; the stand-in device node is removed.
Run: .venv/bin/python -m bench.gpu_daemon_bench
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.daemon_bench import cpu_seconds
from bench.load import percentile, spawn_to_journal_ms
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon

CONFIG = "rules: []\ngpu:\n  poll_interval: 1\n  accounting: false\n"


def measure_cpu(daemon: Daemon, seconds: float) -> float:
    time.sleep(2)
    cpu0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(daemon.proc.pid) - cpu0) / (time.monotonic() - t0) * 100


def open_to_alert(daemon: Daemon, count: int) -> list[float]:
    fd, node = tempfile.mkstemp(prefix="nvidia-uvm-bench-", dir="/dev")
    os.close(fd)
    opener = f"import os, time; os.open({node!r}, 0); time.sleep(3)"
    try:
        return spawn_to_journal_ms(
            daemon.alerts,
            lambda: subprocess.Popen([sys.executable, "-c", opener]),
            "gpu-unregistered-consumer",
            count,
        )
    finally:
        os.unlink(node)


def python_startup_ms(count: int = 20) -> float:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import os"], check=True)
        samples.append((time.perf_counter() - started) * 1000)
    return percentile(samples, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--opens", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rg-gpu-bench-"))
    state_file = work / "nvml.state"
    holders = [subprocess.Popen(["sleep", "600"]) for _ in range(160)]
    try:
        gpus = [fake_nvml.FakeGpu(i, f"GPU-{i:08d}-0000-0000-0000-000000000000") for i in range(8)]
        procs = [
            fake_nvml.FakeProcess(i // 20, p.pid, memory=2**30, sm_util=50)
            for i, p in enumerate(holders)
        ]
        fake_nvml.FakeState(gpus=gpus, processes=procs).write(state_file)
        without = Daemon(
            env=fake_nvml.environment(state_file, fake_nvml.MISSING), config_text=CONFIG
        )
        try:
            without.wait_ready()
            cpu_without = measure_cpu(without, args.seconds)
        finally:
            without.stop()
        loaded = Daemon(env=fake_nvml.environment(state_file), config_text=CONFIG)
        try:
            loaded.wait_ready()
            loaded.wait_log("GPU features on: 8 GPU(s)")
            cpu_with = measure_cpu(loaded, args.seconds)
            alerts = len([r for r in loaded.records() if r["rule"] == "gpu-unregistered-consumer"])
            startup = python_startup_ms()
            latencies = open_to_alert(loaded, args.opens)
        finally:
            loaded.stop()
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
    print("GPU daemon benchmark: stand-in libnvidia-ml, 8 GPUs x 20 real processes, poll every 1 s")
    print(
        f"  daemon CPU: {cpu_with:.1f}% of a core with GPUs, {cpu_without:.1f}% without NVML "
        f"(GPU side costs {cpu_with - cpu_without:.1f} points); "
        f"{alerts} unregistered consumers alerted"
    )
    if latencies:
        print(
            f"  spawn -> gpu alert: n={len(latencies)}/{args.opens}, "
            f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms; "
            f"of which interpreter start-up before the open ~{startup:.1f} ms (p50)"
        )


if __name__ == "__main__":
    main()
