"""What the prevention programs cost everyone else: an exec loop and a
loopback connect loop with no rome-guard programs vs with Prevention
attached (connect4/6 on the cgroup2 root, exec / connect-exit / TCP-state
tracepoints) and realistically filled deny lists, alternating in one run.

Needs root. Prints per-operation wall and CPU time and the ratio
attached/none; on a busy host those move with other load, so it also
prints what the kernel itself measured for each program (bpf run-time
statistics, enabled for the run and restored after): the time our
programs add to each exec and each connect, independent of other load.
Nothing leaves loopback; everything is detached on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import threading
import time
from typing import Callable, Iterator, NamedTuple

from rome_guard.respond.prevent import Prevention

HOST = "127.0.3.1"


class Cost(NamedTuple):
    wall: float  # seconds per operation
    cpu: float  # CPU seconds per operation, this process and its children


def _cpu() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(loop: Callable[[], None], iterations: int) -> Cost:
    wall, cpu = time.perf_counter(), _cpu()
    for _ in range(iterations):
        loop()
    return Cost((time.perf_counter() - wall) / iterations, (_cpu() - cpu) / iterations)


def exec_once() -> None:
    """fork+exec+wait of /bin/true."""
    pid = os.posix_spawn("/bin/true", ["/bin/true"], {})
    os.waitpid(pid, 0)


def connect_once(port: int) -> None:
    """socket+connect+close to a loopback listener."""
    with socket.socket() as s:
        s.connect((HOST, port))


class Acceptor:
    """Accepts and closes connections so the backlog never fills."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


def fill(prevention: Prevention) -> None:
    """Deny lists of a realistic size that never match the loops above."""
    prevention.block_cidrs(f"198.18.{i // 256}.{i % 256}/32" for i in range(1000))
    prevention.block_cidrs(["203.0.113.0/24", "2001:db8::/32"], kill=True)
    prevention.block_ports([3333, 3334, 3335, 3336, 4444, 5555, 7777, 14433, 14444, 45700])
    names = ["xmrig", "xmr-stak", "minerd", "cpuminer", "ccminer", "ethminer", "nbminer"]
    prevention.deny_exec(names=names + [f"rg-bench-{i}" for i in range(40)])
    prevention.deny_exec(paths=[f"/opt/rg-bench/bin/miner{i}" for i in range(20)])


def measure(args: argparse.Namespace, acceptor: Acceptor) -> tuple[Cost, Cost]:
    return (
        timed(exec_once, args.execs),
        timed(lambda: connect_once(acceptor.port), args.connects),
    )


BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    with open(BPF_STATS) as f:
        before = f.read().strip()
    with open(BPF_STATS, "w") as f:
        f.write("1")
    try:
        yield
    finally:
        with open(BPF_STATS, "w") as f:
            f.write(before)


def run_time(prog_id: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of one program, from bpftool."""
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show", "id", str(prog_id)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    info = json.loads(out)
    return info.get("run_time_ns", 0), info.get("run_cnt", 0)


def in_kernel_cost(args: argparse.Namespace, acceptor: Acceptor) -> None:
    """Nanoseconds our programs run per exec and per connect."""
    with bpf_run_time_stats(), Prevention("enforce") as prevention:
        fill(prevention)
        ids = prevention.program_ids()
        print("in-kernel cost (bpf run-time statistics)")
        print(f"{'loop':<9}{'program':<40}{'runs/op':>8}{'ns/run':>8}{'ns/op':>8}")
        for loop, once, count in (
            ("exec", exec_once, args.execs),
            ("connect", lambda: connect_once(acceptor.port), args.connects),
        ):
            before = {name: run_time(i) for name, i in ids.items()}
            timed(once, count)
            total = 0.0
            for name, prog_id in ids.items():
                ns, runs = (a - b for a, b in zip(run_time(prog_id), before[name], strict=True))
                if runs:
                    total += ns / count
                    print(
                        f"{loop:<9}{name:<40}{runs / count:>8.1f}{ns / runs:>8.0f}"
                        f"{ns / count:>8.0f}"
                    )
            print(f"{loop:<9}{'all programs':<40}{'':>8}{'':>8}{total:>8.0f}")
        prevention.poll(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--execs", type=int, default=2000)
    parser.add_argument("--connects", type=int, default=5000)
    args = parser.parse_args()

    acceptor = Acceptor()
    results: dict[str, list[tuple[Cost, Cost]]] = {"none": [], "attached": []}
    try:
        measure(args, acceptor)  # warm caches
        for _ in range(args.rounds):
            results["none"].append(measure(args, acceptor))
            with Prevention("enforce") as prevention:
                fill(prevention)
                results["attached"].append(measure(args, acceptor))
                prevention.poll(0)
        in_kernel_cost(args, acceptor)
    finally:
        acceptor.close()

    print(f"prevention overhead, {args.rounds} alternating rounds, per operation")
    print("(CPU time is less disturbed by other load on the host than wall time)")
    print(f"{'loop':<9}{'measure':<13}{'none':>11}{'attached':>11}{'ratio':>8}")
    picks = (("wall", "best", min), ("cpu", "best", min), ("cpu", "median", statistics.median))
    for index, loop in enumerate(("exec", "connect")):
        for field, stat, pick in picks:
            none = pick(getattr(r[index], field) for r in results["none"]) * 1e6
            attached = pick(getattr(r[index], field) for r in results["attached"]) * 1e6
            label = f"{field} {stat}"
            print(f"{loop:<9}{label:<13}{none:>9.1f}us{attached:>9.1f}us{attached / none:>8.3f}")


if __name__ == "__main__":
    main()
