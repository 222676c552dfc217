"""The one wait over every ring (kernel/poller.py) and which compiler
pages the loader gives back (kernel/loader.py); a released sensor's rings
waking the poller: tests/kernel/test_loader.py."""

from __future__ import annotations

import threading
from pathlib import Path

from rome_guard.kernel.loader import _clean_compiler_mappings
from rome_guard.kernel.poller import RingPoller

WAIT_MS = 10_000  # an upper bound on a loaded host, never a timing assertion


def test_wake_ends_a_wait_from_another_thread_and_is_consumed() -> None:
    poller = RingPoller()
    try:
        assert poller.wait(0) is False  # nothing pending
        thread = threading.Thread(target=poller.wake)
        thread.start()
        assert poller.wait(WAIT_MS) is True
        thread.join()
        assert poller.wait(0) is False  # the wake-up was read, not left pending
        assert not poller.watching  # no ring yet: the daemon polls on a short timer
    finally:
        poller.close()


def _smaps(tmp_path: Path, entries: list[tuple[str, str, str, int]]) -> str:
    lines = []
    for rng, perms, path, anonymous in entries:
        lines.append(f"{rng} {perms} 00000000 08:01 1234 {path}")
        lines += ["Size:                 64 kB", f"Anonymous:      {anonymous} kB"]
        lines.append("VmFlags: rd ex mr mw me")
    smaps = tmp_path / "smaps"
    smaps.write_text("\n".join(lines) + "\n")
    return str(smaps)


def test_only_clean_read_only_compiler_mappings_are_released(tmp_path: Path) -> None:
    smaps = _smaps(
        tmp_path,
        [
            ("1000-2000", "r-xp", "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 0),
            ("2000-3000", "r--p", "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 8),  # relocated
            ("3000-4000", "rw-p", "/usr/lib/x86_64-linux-gnu/libLLVM-14.so.1", 0),  # data
            ("4000-5000", "r-xp", "/usr/lib/llvm-14/lib/libclang-cpp.so.14", 0),
            ("5000-6000", "r-xp", "/usr/lib/x86_64-linux-gnu/libc.so.6", 0),  # not the compiler
            ("6000-7000", "r-xp", "/usr/lib/x86_64-linux-gnu/libbcc.so.0.26.0", 0),
        ],
    )
    assert _clean_compiler_mappings(smaps) == [
        (0x1000, 0x2000),
        (0x4000, 0x5000),
        (0x6000, 0x7000),
    ]
    assert _clean_compiler_mappings(str(tmp_path / "missing")) == []
