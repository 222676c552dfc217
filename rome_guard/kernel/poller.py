"""One wait for the whole daemon: an epoll over every ring buffer's map
fd (process, network, wire, prevention) and a wake-up pipe for what has no
fd (a signal, the GPU thread's snapshots).

A ring buffer's fd is readable while it holds records, but the kernel only
wakes a sleeping waiter for a record submitted with a wakeup
(BPF_RB_FORCE_WAKEUP, or the default when the ring was empty). In the
sensor's quiet mode (sensor.c) the execs of programs no rule names wake
user space at most once per ``BATCH_MS``, and forks and exits only once
per 2,048 (the next wakeup or timer drains them); a wire record wakes it
only when none did for ``BATCH_MS`` (wire.c's wake_flags; a drop at once).
After any wakeup the daemon drains again ``BATCH_MS`` later, for as long
as records keep coming, and sleeps until its next timer once a batch
finds nothing.
Nothing happening costs one wakeup per timer, not one per ``BATCH_MS``.

This module never reads a record: the BpfObject that owns the ring
consumes it after ``wait()``.
"""

from __future__ import annotations

import contextlib
import os
import select
from typing import Iterable

# How long a quiet record may wait for user space, and how long the daemon
# keeps draining after a wakeup before it sleeps in wait() again. Compiled
# into sensor.c (QUIET_BATCH_NS) from here.
BATCH_MS = 10


class RingPoller:
    """Sleeps until a ring buffer has a record worth a wakeup, wake() is
    called, or the timeout passes. wake() may be called from any thread
    and from a signal handler."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._fds: set[int] = set()

    def watch(self, fds: Iterable[int]) -> None:
        """Wake up for records in these ring buffer map fds."""
        for fd in fds:
            if fd not in self._fds:
                self._epoll.register(fd, select.EPOLLIN)
                self._fds.add(fd)

    @property
    def watching(self) -> bool:
        """True when some ring buffer can wake wait()."""
        return bool(self._fds)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"\0")

    def wait(self, timeout_ms: int) -> bool:
        """Block for at most timeout_ms (< 0: until woken). True when a
        ring or wake() woke it, False on timeout."""
        events = self._epoll.poll(timeout_ms / 1000 if timeout_ms >= 0 else -1)
        for fd, _mask in events:
            if fd == self._wake_read:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_read, 512):
                        pass
        return bool(events)

    def close(self) -> None:
        self._epoll.close()
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)
