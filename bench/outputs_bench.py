"""Alert outputs and the daemon's exec -> alert latency, side by side (issue 19):

two daemons watch the same host at once, one with no outputs and one whose
webhook and syslog (TCP) receivers are down, so its queues fill to their
bound and every later record is dropped and counted. A miner-named program
is started N times; each daemon's time from spawn to the alert's journal
line is measured, p50/p99 for both, and their ratio. Target: the ratio
stays within the host's noise (the outputs never sit between an event and
its journal line, nor block the loop).

Needs root and eBPF. Nothing leaves loopback (the receivers' ports are
closed ones on 127.0.0.1).
Run: .venv/bin/python -m bench.outputs_bench [--alerts N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile

from bench.load import percentile, spawn_to_journal_ms
from tests.fixtures.daemon import Daemon
from tests.fixtures.network import free_port

QUEUE = 50


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="rg-outputs-bench-")
    miner = os.path.join(work, "xmrig")
    shutil.copy("/bin/true", miner)
    down = (
        "rules: []\noutputs:\n"
        f"  - type: webhook\n    url: http://127.0.0.1:{free_port()}/\n    queue_size: {QUEUE}\n"
        f"  - type: syslog\n    address: tcp://127.0.0.1:{free_port()}\n    queue_size: {QUEUE}\n"
    )
    plain, outputs = Daemon(config_text="rules: []\n"), Daemon(config_text=down)
    try:
        plain.wait_ready()
        outputs.wait_ready()
        per_round = max(1, args.alerts // args.rounds)
        lat = {"none": [], "down": []}
        for n in range(args.rounds):  # alternate which daemon is measured first
            pair = [("none", plain), ("down", outputs)]
            for name, daemon in pair if n % 2 == 0 else pair[::-1]:
                lat[name] += spawn_to_journal_ms(
                    daemon.alerts,
                    lambda: subprocess.Popen([miner]),
                    "miner-known-binary",
                    per_round,
                )
        dropped = outputs.metric("rome_guard_output_dropped_total")
        queued = outputs.metric("rome_guard_output_queue_depth")
    finally:
        plain.stop()
        outputs.stop()
        shutil.rmtree(work, ignore_errors=True)
    load = os.getloadavg()[0]
    print(f"outputs benchmark ({os.cpu_count()} CPUs, load {load:.1f}), two daemons at once")
    for name, what in (("none", "no outputs"), ("down", "webhook + syslog receivers down")):
        values = lat[name]
        print(
            f"  {what:32s}: {len(values)} alerts, exec -> alert "
            f"p50 {percentile(values, 50):.2f} ms, p99 {percentile(values, 99):.2f} ms"
        )
    for q in (50, 99):
        ratio = percentile(lat["down"], q) / percentile(lat["none"], q)
        print(f"  p{q} ratio (receivers down / no outputs): {ratio:.2f}")
    print(f"  the down outputs: {queued:.0f} queued (bound {QUEUE} each), {dropped:.0f} dropped")


if __name__ == "__main__":
    main()
