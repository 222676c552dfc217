"""Host load for benchmarks: many live processes and many inet sockets.

Sockets are real TCP connections on loopback held by a few holder
processes; the rest are sleeping processes. Everything is torn down on
exit, and nothing leaves loopback.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

_HOLDER = r"""
import os, resource, socket, sys, time
pairs = int(sys.argv[1]); host = sys.argv[2]
resource.setrlimit(resource.RLIMIT_NOFILE, (pairs * 2 + 256, pairs * 2 + 256))
srv = socket.socket(); srv.bind((host, 0)); srv.listen(4096)
keep = []
for _ in range(pairs):
    c = socket.create_connection(srv.getsockname())
    a, _ = srv.accept()
    keep += [c, a]
print("ready", flush=True)
time.sleep(3600)
"""


@contextlib.contextmanager
def host_load(processes: int, sockets: int, holders: int = 20) -> Iterator[None]:
    """At least `processes` extra processes and `sockets` extra sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    children: list[subprocess.Popen] = []
    try:
        pairs = max(1, sockets // 2 // holders)
        for i in range(holders):
            host = f"127.0.{200 + i // 250}.{1 + i % 250}"
            proc = subprocess.Popen(
                [sys.executable, "-c", _HOLDER, str(pairs), host], stdout=subprocess.PIPE
            )
            children.append(proc)
        for proc in children:
            assert proc.stdout is not None and proc.stdout.readline().startswith(b"ready")
        for _ in range(max(0, processes - holders)):
            children.append(subprocess.Popen(["/bin/sleep", "3600"], stdin=subprocess.DEVNULL))
        time.sleep(0.5)
        yield
    finally:
        for proc in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        for proc in children:
            proc.wait()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def count_inet_sockets() -> int:
    from rome_guard.sensors.sockdiag import list_sockets

    return len(list_sockets())


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def loopback_ok(host: str) -> bool:
    return host.startswith("127.")


assert loopback_ok("127.0.200.1") and socket  # keep the import honest


def spawn_to_journal_ms(
    journal: str, spawn, rule: str, count: int, gap_s: float = 0.02
) -> list[float]:
    """Milliseconds from spawn() (returns a Popen) to the journal line of an
    alert of `rule` for that pid, for `count` spawns; misses are left out."""
    import subprocess  # noqa: F401 (spawn returns a Popen)
    import time

    latencies = []
    with open(journal) as f:
        f.seek(0, 2)
        for _ in range(count):
            started = time.perf_counter()
            proc = spawn()
            deadline, found = started + 10, False
            while not found and time.perf_counter() < deadline:
                found = any(
                    f'"pid":{proc.pid},' in line and f'"{rule}"' in line for line in f.readlines()
                )
                if not found:
                    time.sleep(0.0002)
            proc.kill()
            proc.wait()
            if found:
                latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(gap_s)
    return latencies
