"""User-space mirrors of every BPF header, and the one table that checks them.

Each header in rome_guard/bpf/ that user space reads or writes has a module
here (sensor.h -> layout.sensor, prevent.h -> layout.prevent, wire.h ->
layout.wire) with ctypes
mirrors of its structs (``MIRRORS``: C struct name -> mirror) and the names
of the constants it copies (``CONSTANTS``). ``HEADERS`` lists them all;
tests/test_layout.py compiles each header with gcc (no root, no BPF) and
checks every size, offset and constant against its mirror. A new header
joins by adding a module and one line to HEADERS.

sensor.h and prevent.h share two conventions: ``pid`` is the thread-group
id (what user space calls a pid) and ``tid`` the thread; an address family
is AF_INET or AF_INET6. wire.h's ``pid`` is the thread-group id too, but
its ``family`` is the packet's IP version (4 or 6).

This package never touches the kernel: it only describes bytes.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from rome_guard.layout import prevent, sensor, wire

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"


@dataclass(frozen=True)
class Header:
    path: Path
    module: ModuleType  # has MIRRORS and CONSTANTS

    @property
    def mirrors(self) -> dict[str, type[ct.Structure]]:
        return self.module.MIRRORS

    @property
    def constants(self) -> dict[str, int]:
        return {name: getattr(self.module, name) for name in self.module.CONSTANTS}


HEADERS: tuple[Header, ...] = (
    Header(BPF_DIR / "sensor.h", sensor),
    Header(BPF_DIR / "prevent.h", prevent),
    Header(BPF_DIR / "wire.h", wire),
)
