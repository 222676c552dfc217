"""What the wire sensor costs, side by side in one run (issue 10's targets,
tightened by issue 20):

- loopback bulk throughput with iperf3, without the wire programs and with
  them attached (target: at most 3% slower);
- new-connection rate (connect+accept+close) and new flows that send a
  first line, without and with (target for new connections: at most 3%
  slower; each sample is --connects connections: 150,000 last about a
  second, 20,000 too short a sample on a shared host);
- what the kernel measured for each program (BPF run-time statistics):
  nanoseconds added per packet, independent of other load on the host;
- the whole daemon at a paced 20,000 new flows/s, each with a first
  payload: wire events lost (target: 0) and daemon CPU per new flow;
- with --against REV, the kernel's per-packet figures of that git
  revision's wire programs too, measured in the same run, rounds
  alternating (a loaded host moves both alike).

Rounds alternate none/attached so drifting host load hits both alike.
Needs root, iperf3 and gcc. Nothing leaves loopback; everything is
detached on exit. Run: .venv/bin/python -m bench.wire_bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.daemon_bench import cpu_seconds, status
from bench.ebpf_storm import bpf_run_time_stats, build_load, run_load
from bench.prevention_overhead import run_time
from rome_guard.sensors import wire
from rome_guard.sensors.wire import WireSensor
from tests.fixtures.daemon import Daemon
from tests.fixtures.network import free_port

HOST = "127.0.3.5"
# issue 20's bounds on the side-by-side slowdowns
TARGETS = {"iperf3 loopback Gbit/s": "<= 3%", "new connections/s": "<= 3%"}


class Drain(threading.Thread):
    """Polls and decodes the sensor's records, as the daemon's loop does."""

    def __init__(self, sensor: WireSensor):
        super().__init__(daemon=True)
        self.sensor = sensor
        self.records = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.records += len(self.sensor.poll(50))

    def stop(self) -> None:
        self._done.set()
        self.join()


def iperf_gbps(seconds: float) -> float:
    port = free_port(HOST)
    server = subprocess.Popen(
        ["iperf3", "-s", "-1", "-B", HOST, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            out = subprocess.run(
                ["iperf3", "-c", HOST, "-p", str(port), "-t", str(seconds), "-J"],
                capture_output=True,
                text=True,
                check=False,
            )
            with contextlib.suppress(ValueError, KeyError):
                result = json.loads(out.stdout)
                return result["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.1)  # the server is not listening yet
        raise RuntimeError(f"iperf3 failed: {out.stderr or out.stdout}")
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()


def rate(binary: str, mode: str, count: int) -> float:
    ops, seconds = run_load(binary, mode, str(count), "2", HOST)
    return ops / seconds


def side_by_side(args: argparse.Namespace, binary: str) -> dict:
    """Median of alternating rounds: {measure: (none, attached)}."""
    measures = {
        "iperf3 loopback Gbit/s": lambda: iperf_gbps(args.iperf_s),
        "new connections/s": lambda: rate(binary, "connect", args.connects),
        "new flows with a first line/s": lambda: rate(binary, "flows", args.connects),
    }
    samples: dict[str, tuple[list, list]] = {name: ([], []) for name in measures}
    for _ in range(args.rounds):
        for name, measure in measures.items():
            samples[name][0].append(measure())
        with WireSensor() as sensor:
            drain = Drain(sensor)
            drain.start()
            try:
                for name, measure in measures.items():
                    samples[name][1].append(measure())
            finally:
                drain.stop()
    return {n: (statistics.median(a), statistics.median(b)) for n, (a, b) in samples.items()}


@contextlib.contextmanager
def programs_of(revision: str | None):
    """The wire programs of a git revision (None: the working tree's) for
    WireSensor to load while the block runs."""
    if revision is None:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="rg-wire-rev-") as tmp:
        for name in ("wire.c", "wire.h"):
            text = subprocess.run(
                ["git", "show", f"{revision}:rome_guard/bpf/{name}"],
                cwd=Path(wire.__file__).resolve().parents[2],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            # the loader puts this tree's bpf/ on the include path: the
            # revision's own header is named by its path
            text = text.replace('#include "wire.h"', f'#include "{tmp}/wire.h"')
            Path(tmp, name).write_text(text)
        saved, wire.WIRE_SOURCE = wire.WIRE_SOURCE, Path(tmp, "wire.c")
        try:
            yield
        finally:
            wire.WIRE_SOURCE = saved


def in_kernel_cost(binary: str, count: int, revision: str | None = None) -> dict[str, float]:
    """ns per program run, from the kernel's stats, while connections
    without payload and then flows with a first line are made."""
    costs = {}
    with programs_of(revision), bpf_run_time_stats(), WireSensor() as sensor:
        drain = Drain(sensor)
        drain.start()
        try:
            ids = sensor.program_ids()
            for mode in ("connect", "flows"):
                before = {name: run_time(i) for name, i in ids.items()}
                rate(binary, mode, count)
                for name, prog_id in ids.items():
                    delta = zip(run_time(prog_id), before[name])
                    ns, runs = (a - b for a, b in delta)
                    costs[f"{name} ({mode})"] = ns / runs if runs else 0.0
        finally:
            drain.stop()
    return costs


def daemon_at_rate(binary: str, flows_per_s: int, seconds: float) -> dict:
    """The real daemon (monitor mode) while flows arrive at a paced rate."""
    d = Daemon(sensor="ebpf", mode="monitor")
    try:
        d.wait_ready()
        time.sleep(1.0)
        cpu0 = cpu_seconds(d.proc.pid)
        count = int(flows_per_s * seconds)
        ops, took = run_load(binary, "flows", str(count), "2", HOST, str(flows_per_s))
        time.sleep(6.0)  # drain, and one status refresh (every 5 s)
        cpu = cpu_seconds(d.proc.pid) - cpu0
        lost = status(d.run_dir).get("events_lost", {})
    finally:
        d.stop()
        shutil.rmtree(d.workdir, ignore_errors=True)
    return {
        "flows": ops,
        "achieved_flows_per_s": ops / took,
        "wire_events_lost": lost.get("wire", 0),
        "all_events_lost": sum(lost.values()),
        "daemon_cpu_us_per_flow": cpu / ops * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iperf-s", type=float, default=3.0)
    parser.add_argument("--connects", type=int, default=150_000)
    parser.add_argument("--rate", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--against", metavar="REV", help="also measure REV's wire programs")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rg-wire-bench-")
    try:
        binary = build_load(work)
        results = side_by_side(args, binary)
        kernel = in_kernel_cost(binary, args.connects)
        against: dict[str, list[float]] = {}
        if args.against:
            ours: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for name, ns in in_kernel_cost(binary, args.connects, args.against).items():
                    against.setdefault(name, []).append(ns)
                for name, ns in in_kernel_cost(binary, args.connects).items():
                    ours.setdefault(name, []).append(ns)
            kernel = {name: statistics.median(v) for name, v in ours.items()}
        daemon = daemon_at_rate(binary, args.rate, args.seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(
            json.dumps(
                {"side_by_side": results, "kernel_ns": kernel, "against": against, "daemon": daemon}
            )
        )
        return
    print(f"{'measure':34} {'none':>12} {'wire':>12} {'slowdown':>9}  target")
    for name, (none, attached) in results.items():
        slowdown = 100 * (1 - attached / none)
        print(f"{name:34} {none:12.2f} {attached:12.2f} {slowdown:8.1f}%  {TARGETS.get(name, '-')}")
    for name, ns in kernel.items():
        line = f"in-kernel {name}: {ns:.0f} ns per packet (BPF run-time stats)"
        if name in against:
            line += f"; {args.against}: {statistics.median(against[name]):.0f} ns"
        print(line)
    print(
        f"daemon at {daemon['achieved_flows_per_s']:.0f} new flows/s ({daemon['flows']} flows): "
        f"{daemon['wire_events_lost']} wire events lost ({daemon['all_events_lost']} in all), "
        f"{daemon['daemon_cpu_us_per_flow']:.1f} us daemon CPU per flow"
    )


if __name__ == "__main__":
    main()
