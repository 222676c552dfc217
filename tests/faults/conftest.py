"""The fault suite's shared pieces: a small tmpfs the test mounts, and the
check every fault ends with: a miner started right after the fault is
still alerted on (and killed, in enforce mode)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
from typing import Iterator

from tests.fixtures.daemon import Daemon
from tests.fixtures.network import listener, write_fake_miner


@contextlib.contextmanager
def small_tmpfs(size: str = "1m") -> Iterator[str]:
    """A tmpfs of `size` mounted on a fresh directory; unmounted after."""
    where = tempfile.mkdtemp(prefix="rg-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def fill(directory: str) -> str:
    """Write a file in directory until its filesystem is full; returns it."""
    path = f"{directory}/filler"
    with open(path, "wb") as f:
        chunk = b"\0" * 65536
        try:
            while True:
                f.write(chunk)
                f.flush()
        except OSError:
            pass
    with contextlib.suppress(OSError), open(path, "ab") as f:
        try:
            while True:
                f.write(b"\0")
                f.flush()
        except OSError:
            pass
    return path


@contextlib.contextmanager
def fake_miner(
    workdir: str, host: str = "127.0.9.9", linger_s: float = 30
) -> Iterator[subprocess.Popen]:
    """A fake miner logged in to a loopback pool, lingering; killed on leaving."""
    with listener(host, 0, stratum=True) as pool:
        miner = write_fake_miner(workdir, "kworker-fault", linger_s=linger_s)
        proc = subprocess.Popen([miner, "-o", f"stratum+tcp://{host}:{pool.port}", "-u", "w"])
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def assert_caught(d: Daemon, proc: subprocess.Popen, timeout: float = 30) -> None:
    """The daemon alerted on proc (its log names the pid) and, in enforce
    mode, killed it."""
    if d.mode == "enforce":
        assert proc.wait(timeout) == -signal.SIGKILL
    d.wait_log(f"pid={proc.pid}", timeout=timeout)


def miner_still_caught(d: Daemon, workdir: str, host: str = "127.0.9.9") -> dict:
    """Start a fake miner that logs in to a loopback pool: the daemon must
    alert on it, and in enforce mode kill it. Returns its pid."""
    with fake_miner(workdir, host) as proc:
        assert_caught(d, proc)
    return {"pid": proc.pid}


# 40 arguments of 300 bytes: each exec record carries ~12 KiB of argv, so a
# loop of them fills the 16 MiB process ring within seconds when nobody drains it
_EXEC_LOOP = (
    'A=$(head -c 300 /dev/zero | tr "\\0" x); while :; do /bin/true '
    + " ".join(["$A"] * 40)
    + "; done"
)
_CONNECT_LOOP = """
import socket, struct, sys
host, n = sys.argv[1], 0
linger = struct.pack("ii", 1, 0)
while True:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    s.connect_ex((host, 20000 + n % 20000))  # refused: a new destination each time
    s.close()
    n += 1
"""


@contextlib.contextmanager
def load(exec_loops: int = 3, connect_loops: int = 1) -> Iterator[None]:
    """Fork/exec loops with long argv and loopback connect loops (refused
    ports on 127.0.8.1), each in a session of its own, killed on leaving."""
    import os
    import sys

    procs = [
        subprocess.Popen(["bash", "-c", _EXEC_LOOP], start_new_session=True)
        for _ in range(exec_loops)
    ] + [
        subprocess.Popen([sys.executable, "-c", _CONNECT_LOOP, "127.0.8.1"], start_new_session=True)
        for _ in range(connect_loops)
    ]
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
