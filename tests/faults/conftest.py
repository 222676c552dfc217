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


def miner_still_caught(d: Daemon, workdir: str, host: str = "127.0.9.9") -> dict:
    """Start a fake miner that logs in to a loopback pool: the daemon must
    alert on it, and in enforce mode kill it. Returns the alert as the
    journal or, when the journal's disk refuses it, the log shows it."""
    with listener(host, 0, stratum=True) as pool:
        miner = write_fake_miner(workdir, "kworker-fault", linger_s=30)
        proc = subprocess.Popen([miner, "-o", f"stratum+tcp://{host}:{pool.port}", "-u", "w"])
        try:
            if d.mode == "enforce":
                assert proc.wait(30) == -signal.SIGKILL
            d.wait_log(f"pid={proc.pid}", timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return {"pid": proc.pid}
