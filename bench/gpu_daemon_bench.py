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
from bench.load import percentile
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon

CONFIG = "rules: []\ngpu:\n  poll_interval: 1\n  accounting: false\n"


def measure_cpu(daemon: Daemon, seconds: float) -> float:
    time.sleep(2)
    cpu0, t0 = cpu_seconds(daemon.proc.pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(daemon.proc.pid) - cpu0) / (time.monotonic() - t0) * 100


def open_to_alert(daemon: Daemon, count: int) -> list[float]:
    """Milliseconds from a process's open of /dev/nvidia-uvm (it prints the
    wall-clock time right after the open) to its alert in the journal."""
    fd, node = tempfile.mkstemp(prefix="nvidia-uvm-bench-", dir="/dev")
    os.close(fd)
    opener = f"import os, time; os.open({node!r}, 0); print(time.time(), flush=True); time.sleep(3)"
    latencies = []
    try:
        with open(daemon.alerts) as journal:
            journal.seek(0, os.SEEK_END)
            for _ in range(count):
                proc = subprocess.Popen(
                    [sys.executable, "-c", opener], stdout=subprocess.PIPE, text=True
                )
                opened_at = float(proc.stdout.readline())
                deadline, seen_at = time.time() + 10, None
                while seen_at is None and time.time() < deadline:
                    for line in journal.readlines():
                        if f'"pid":{proc.pid},' in line and "gpu-unregistered-consumer" in line:
                            seen_at = time.time()
                    if seen_at is None:
                        time.sleep(0.0002)
                proc.kill()
                proc.wait()
                if seen_at is not None:
                    latencies.append((seen_at - opened_at) * 1000)
    finally:
        os.unlink(node)
    return latencies


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
            f"  /dev/nvidia-uvm open -> gpu alert: n={len(latencies)}/{args.opens}, "
            f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms "
            "(wall clock, 0.2 ms polling of the journal)"
        )


if __name__ == "__main__":
    main()
