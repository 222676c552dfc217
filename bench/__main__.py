"""`make bench`: every benchmark in turn (each prints its own side-by-side
figures and ratios; docs/benchmarks.md records them). Needs root; the
storms and daemons use loopback only."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = (
    "bench.scan_bench",
    "bench.daemon_bench",
    "bench.ebpf_storm",
    "bench.prevention_overhead",
    "bench.kill_latency",
    "bench.nvml_poll",
    "bench.gpu_daemon_bench",
    "bench.metrics_overhead",
    "bench.wire_bench",
    "bench.hostile_inputs",
    "bench.outputs_bench",
)


def main() -> int:
    failed = []
    for module in sys.argv[1:] or BENCHMARKS:
        print(f"\n== {module}", flush=True)
        if subprocess.run([sys.executable, "-m", module], check=False).returncode != 0:
            failed.append(module)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
