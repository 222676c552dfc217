"""How fast offenders die in enforce mode, and proof that a pool connect
never completes its handshake.

1. exec of a denylisted binary -> its death: spawn to reaped (user space)
   and spawn to the in-kernel kill (the event's CLOCK_BOOTTIME stamp),
   side by side with an allowed copy of the same binary running normally.
2. connect() to a kill destination -> the kill, and -> its death, from a
   forked "miner"; a listener on the pool address counts handshakes it
   accepted (target: zero).

Needs root. Prints p50/p99. Nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from rome_guard.events import PREVENTION_KILLED_CONNECT, PREVENTION_KILLED_EXEC
from rome_guard.linux import boottime_ns
from rome_guard.respond.prevent import Prevention

POOL = "127.0.3.5"
DENIED_NAME = "rg-bench-xmrig"


def percentiles(samples_ns: list[int]) -> str:
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2] / 1e3
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3
    return f"p50 {p50:9.1f}us  p99 {p99:9.1f}us"


def spawn_and_reap(path: str) -> tuple[int, int, int]:
    """(start boottime, reaped boottime, wait status)."""
    start = boottime_ns()
    pid = os.posix_spawn(path, [path], {})
    _, status = os.waitpid(pid, 0)
    return start, boottime_ns(), status


def exec_latency(prevention: Prevention, iterations: int) -> None:
    workdir = tempfile.mkdtemp(prefix="rg-bench-")
    try:
        denied = os.path.join(workdir, DENIED_NAME)
        allowed = os.path.join(workdir, "rg-bench-true")
        shutil.copy("/bin/true", denied)
        shutil.copy("/bin/true", allowed)
        prevention.deny_exec(names=[DENIED_NAME])
        to_death, to_kill, normal = [], [], []
        for _ in range(iterations):
            start, end, status = spawn_and_reap(denied)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            to_death.append(end - start)
            kills = [e for e in prevention.poll(1000) if e.kind == PREVENTION_KILLED_EXEC]
            to_kill += [e.timestamp_ns - start for e in kills]
            start, end, status = spawn_and_reap(allowed)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
            normal.append(end - start)
    finally:
        shutil.rmtree(workdir)
    print(f"exec -> death, {iterations} runs")
    print(f"  denylisted: spawn -> in-kernel kill   {percentiles(to_kill)}")
    print(f"  denylisted: spawn -> reaped           {percentiles(to_death)}")
    print(f"  allowed copy: spawn -> normal exit    {percentiles(normal)}")
    ratio = sorted(to_death)[len(to_death) // 2] / sorted(normal)[len(normal) // 2]
    print(f"  ratio killed/normal (p50)             {ratio:.3f}")


class CountingPool:
    """A listener on the pool address that counts completed handshakes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((POOL, 0))
        self.sock.listen(4096)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


# Forks the "miners" from a small process: a child forked from this one
# (BCC loaded, ~200 MB) would spend milliseconds tearing down its copy.
MINER_FACTORY = r"""
import os, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(count):
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, time.clock_gettime_ns(time.CLOCK_BOOTTIME).to_bytes(8, "little"))
        try:
            socket.socket().connect((host, port))
        finally:
            os._exit(0)  # reached only if the kill failed
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    died = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    start = int.from_bytes(os.read(read_end, 8), "little")
    os.close(read_end)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
    print(pid, start, died, int(killed), flush=True)
"""


def connect_latency(prevention: Prevention, iterations: int) -> None:
    pool = CountingPool()
    try:
        prevention.kill_on_connect(cidrs=[f"{POOL}/32"])
        factory = subprocess.Popen(
            [sys.executable, "-c", MINER_FACTORY, POOL, str(pool.port), str(iterations)],
            stdout=subprocess.PIPE,
            text=True,
        )
        kill_stamp: dict[int, int] = {}
        while factory.poll() is None:  # drain the ring buffer as a daemon would
            for event in prevention.poll(100):
                if event.kind == PREVENTION_KILLED_CONNECT:
                    kill_stamp[event.pid] = event.timestamp_ns
        for event in prevention.poll(100):
            if event.kind == PREVENTION_KILLED_CONNECT:
                kill_stamp[event.pid] = event.timestamp_ns
        assert factory.stdout is not None and factory.wait() == 0
        runs = [tuple(map(int, line.split())) for line in factory.stdout.read().splitlines()]
        assert len(runs) == iterations and all(killed for *_, killed in runs)
        to_kill = [kill_stamp[pid] - start for pid, start, _, _ in runs if pid in kill_stamp]
        to_death = [died - start for _, start, died, _ in runs]
        time.sleep(0.5)  # let the acceptor look at its queue once more
    finally:
        pool.close()
    print(f"pool connect -> kill, {iterations} runs (in-kernel: EPERM, then SIGKILL)")
    print(f"  connect() -> in-kernel kill           {percentiles(to_kill)}")
    print(f"  connect() -> reaped by its parent     {percentiles(to_death)}")
    print(f"  handshakes the pool accepted          {pool.accepted} of {iterations}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=500)
    args = parser.parse_args()
    with Prevention("enforce") as prevention:
        exec_latency(prevention, args.iterations)
        connect_latency(prevention, args.iterations)
        lost = prevention.lost_events()
    if lost:
        print(f"  ({lost} events lost: ring buffer full)")


if __name__ == "__main__":
    main()
