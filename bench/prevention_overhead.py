"""What the prevention programs cost everyone else: an exec loop and a
loopback connect loop with no rome-guard programs vs with Prevention
attached (connect4/6 on the cgroup2 root, exec / connect-exit / TCP-state
tracepoints) and realistically filled deny lists, alternating in one run.

Needs root. Prints per-operation medians and the ratio attached/none.
Nothing leaves loopback; everything is detached on exit.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import threading
import time
from typing import Callable, NamedTuple

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
