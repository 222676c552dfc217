"""How the eBPF sensor holds up under an exec storm and a loopback connect
storm: the storm's rate without the sensor and with it (ratio), how many of
the expected events reached Python, and the lost counters.

A small C load generator (bench/storm_load.c, built with gcc into a temp
dir) produces the storms; the sensor is drained by a Python thread, as the
daemon would. Needs root. Nothing leaves loopback; the sensor is closed on
exit. Run: .venv/bin/python -m bench.ebpf_storm [--execs N] [--connects N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

from rome_guard.events import CONNECT_ATTEMPT, CONNECT_ESTABLISHED, ConnectEvent, ExecEvent
from rome_guard.sensors.ebpf import EbpfSensor, probe_ebpf

HOST = "127.0.4.1"
LOAD_SOURCE = Path(__file__).with_name("storm_load.c")
DRAIN_IDLE_S = 2.0  # stop waiting for stragglers after this long without one


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """BPF program run-time accounting, on while the returned fd is open
    (BPF_ENABLE_STATS): nothing to restore afterwards."""
    from bcc.libbcc import lib

    fd = lib.bpf_enable_stats(0)  # BPF_STATS_RUN_TIME
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def build_load(directory: str) -> str:
    binary = str(Path(directory) / "storm_load")
    subprocess.run(["gcc", "-O2", "-o", binary, str(LOAD_SOURCE)], check=True)
    return binary


def run_load(binary: str, *args: str) -> tuple[int, float]:
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True)
    ops, seconds = out.stdout.split()
    return int(ops), float(seconds)


class Drain(threading.Thread):
    """Polls the sensor and counts the storm's events, as the daemon would."""

    def __init__(self, sensor: EbpfSensor):
        super().__init__(daemon=True)
        self.sensor = sensor
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.last_event = time.monotonic()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            batch = self.sensor.poll(50)
            for event in batch:
                if isinstance(event, ExecEvent) and event.argv == ("/bin/true", "storm"):
                    self.counts["exec"] += 1
                elif isinstance(event, ConnectEvent) and event.endpoint.daddr == HOST:
                    self.counts[event.outcome] += 1
            if batch:
                self.total += len(batch)
                self.last_event = time.monotonic()

    def settle(self, want: dict[str, int]) -> None:
        while any(self.counts[k] < v for k, v in want.items()):
            if time.monotonic() - self.last_event > DRAIN_IDLE_S:
                break
            time.sleep(0.05)


def storm(sensor: EbpfSensor, binary: str, args: list[str], want: dict[str, int]) -> dict:
    lost_before = sensor.lost_events()
    drain = Drain(sensor)
    drain.start()
    started = time.perf_counter()
    ops, seconds = run_load(binary, *args)
    drain.settle(want)
    elapsed = time.perf_counter() - started
    drain.stop.set()
    drain.join()
    lost = {k: v - lost_before[k] for k, v in sensor.lost_events().items()}
    return {
        "ops": ops,
        "rate": ops / seconds,
        "counts": dict(drain.counts),
        "lost": lost,
        "events": drain.total,
        "events_per_s": drain.total / elapsed,
    }


def report(name: str, baseline: float, result: dict, want: dict[str, int]) -> None:
    seen = ", ".join(f"{k} {result['counts'].get(k, 0)}/{v}" for k, v in want.items())
    print(
        f"{name}: {result['ops']} ops; without sensor {baseline:,.0f}/s, "
        f"with sensor {result['rate']:,.0f}/s (ratio {result['rate'] / baseline:.2f})\n"
        f"  events reaching Python: {seen}; all events drained {result['events']:,} "
        f"({result['events_per_s']:,.0f}/s); lost {result['lost']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--execs", type=int, default=20_000)
    parser.add_argument("--connects", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    opts = parser.parse_args()
    reason = probe_ebpf()
    if reason:
        raise SystemExit(f"ebpf_storm: {reason}")
    workers = str(opts.workers)
    exec_args = ["exec", str(opts.execs), workers]
    connect_args = ["connect", str(opts.connects), workers, HOST]

    with tempfile.TemporaryDirectory() as tmp:
        binary = build_load(tmp)
        bare_exec = [run_load(binary, *exec_args)]
        bare_connect = [run_load(binary, *connect_args)]
        # tcp_repeat_ns=0: every connect of the storm is reported, so this
        # measures the pipeline's raw capacity (the daemon suppresses repeats)
        with EbpfSensor(tcp_repeat_ns=0) as sensor, bpf_run_time_stats():
            want_exec = {"exec": opts.execs}
            want_conn = {CONNECT_ATTEMPT: opts.connects, CONNECT_ESTABLISHED: opts.connects}
            exec_result = storm(sensor, binary, exec_args, want_exec)
            conn_result = storm(sensor, binary, connect_args, want_conn)
            programs = sensor.program_stats()
        bare_exec.append(run_load(binary, *exec_args))
        bare_connect.append(run_load(binary, *connect_args))

    def mean_rate(runs: list[tuple[int, float]]) -> float:
        return sum(ops for ops, _ in runs) / sum(s for _, s in runs)

    report("exec storm", mean_rate(bare_exec), exec_result, want_exec)
    report("connect storm", mean_rate(bare_connect), conn_result, want_conn)
    print("kernel cost per program run (whole host, both storms), busiest first:")
    busiest = sorted(programs.items(), key=lambda kv: kv[1].run_time_ns, reverse=True)
    for name, st in busiest[:10]:
        avg = st.run_time_ns / st.runs if st.runs else 0.0
        print(f"  {name:16} {st.runs:>10,} runs {avg:8.0f} ns/run  skipped {st.recursion_misses}")


if __name__ == "__main__":
    main()
