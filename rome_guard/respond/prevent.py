"""Prevention in the kernel: deny connects, kill denylisted programs.

Enforce mode only. ``Prevention`` compiles rome_guard/bpf/prevent.c once,
attaches its cgroup ``connect4``/``connect6`` programs to the cgroup2 root
and its tracepoints (exec, connect exit, TCP SYN_SENT), and then holds the
deny lists as BPF maps that the daemon updates live. Every denial and every
in-kernel kill comes back as a ``PreventionEvent`` from ``poll()``.

Crash policy: nothing this module enforces outlives the daemon. The
connect hooks are attached through BPF links (``BPF_LINK_CREATE``) whose only
reference is a file descriptor of the daemon, so the kernel detaches them
the moment the daemon dies, kill -9 included: no port, CIDR or known-pool
block stays behind to cut the host off with no guard left to record or lift
it. The exec and SYN_SENT kills are tracepoint programs, which die with the
daemon too. (docs/install.md says why; systemd restarts the daemon, which
re-applies every list from the rules.)

Each running ``Prevention`` still pins its programs under
``/sys/fs/bpf/rome-guard/<pid>-<start time>/`` so that another rome-guard
knows they have a live owner; ``stale.cleanup_stale()`` (run by ``start()``)
removes a dead owner's pins, and detaches any ``rgp_*`` program on the root
that no live owner pins (left by an older rome-guard, or by a kernel
without BPF links for cgroups, where attachments fall back to
``BPF_PROG_ATTACH`` and do outlive a crash until the next start). Compiling,
linking and pinning are rome_guard.kernel.loader's; the records are decoded
by rome_guard.layout.prevent.

This module must never: load anything in monitor mode; block by default
(every list starts empty and the programs allow whatever is not listed);
keep a cgroup attachment alive without a live daemon where the kernel has
BPF links; touch BPF programs that are not rome-guard's or that belong to
another live rome-guard; leave a program attached after ``close()``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import logging
import os
from typing import Iterable

from rome_guard.events import PreventionEvent
from rome_guard.kernel.loader import BPF_DIR, BpfObject, LoadError, Ring, bcc_bpf
from rome_guard.kernel.stale import CONNECT_PROGRAMS, PIN_ROOT, cleanup_stale
from rome_guard.layout.prevent import (
    RG_ACT_BLOCK,
    RG_ACT_KILL,
    RG_COMM_LEN,
    RG_PATH_LEN,
    MalformedPreventRecord,
    decode_prevent_record,
)
from rome_guard.linux import NoCgroup2, cgroup2_root

log = logging.getLogger(__name__)

BPF_SOURCE = BPF_DIR / "prevent.c"

# Mirrors of prevent.h.
ACT_BLOCK = RG_ACT_BLOCK
ACT_KILL = RG_ACT_KILL
COMM_LEN = RG_COMM_LEN
PATH_LEN = RG_PATH_LEN

_PINNED_MAPS = ("block_ports", "block_v4", "block_v6", "exempt_cgroups", "deny_comm", "deny_path")


class PreventionError(Exception):
    """Prevention cannot run here; the message names the missing capability."""


def comm_key(name: str) -> bytes:
    """The kernel's comm for an executable basename: at most 15 bytes."""
    raw = os.fsencode(os.path.basename(name))
    if not raw:
        raise ValueError("empty executable name")
    return raw[: COMM_LEN - 1]


def path_key(path: str) -> bytes:
    raw = os.fsencode(path)
    if not raw.startswith(b"/"):
        raise ValueError(f"deny paths must be absolute: {path!r}")
    if len(raw) >= PATH_LEN:
        raise ValueError(f"deny path longer than {PATH_LEN - 1} bytes cannot match: {path!r}")
    return raw


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR or a single address; host bits are allowed and dropped."""
    return ipaddress.ip_network(text.strip(), strict=False)


# --- the live programs ----------------------------------------------------------


class Prevention:
    """The prevention programs of one daemon, attached from ``start()`` to
    ``close()``. All deny lists start empty."""

    def __init__(
        self,
        mode: str,
        cgroup_root: str | None = None,
        connect_hooks: bool = True,
        pin_root: str = PIN_ROOT,
    ):
        if mode != "enforce":
            raise ValueError(
                f"prevention blocks and kills, so it runs only in enforce mode, not {mode!r}"
            )
        self._cgroup_root = cgroup_root
        self._connect_hooks = connect_hooks
        self._pin_root = pin_root
        self._bpf: BpfObject | None = None
        self._ring: Ring[PreventionEvent] | None = None
        self._closed = False
        self.degraded: list[str] = []  # what this host cannot do, for the operator

    def __enter__(self) -> Prevention:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def denies_connects(self) -> bool:
        """True when the connect hooks are attached (connects get EPERM);
        otherwise kill destinations are only killed at SYN_SENT."""
        return self._bpf is not None and self._bpf.cgroup_attached

    def start(self) -> list[str]:
        """Remove stale attachments, compile once, attach. Returns what
        cleanup_stale() removed, for the log."""
        if self._bpf is not None or self._closed:
            raise RuntimeError("a Prevention starts once")
        if os.geteuid() != 0:
            raise PreventionError("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_KILL)")
        try:
            bcc_bpf()
        except LoadError as exc:
            raise PreventionError(str(exc)) from exc
        root = None
        if self._connect_hooks:
            try:
                root = self._cgroup_root or cgroup2_root()
            except NoCgroup2 as exc:
                self.degraded.append(f"{exc}; kill destinations are killed at SYN_SENT instead")
        stale = cleanup_stale(root, self._pin_root)
        try:
            self._bpf = BpfObject.compile(BPF_SOURCE, pin_root=self._pin_root)
        except LoadError as exc:
            raise PreventionError(str(exc)) from exc
        try:
            self._bpf["settings"][ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())
            if root is not None:
                self._attach_connect_hooks(root)
            self._ring = self._bpf.open_ring(
                "events", decode_prevent_record, (MalformedPreventRecord,), "prevention"
            )
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        return stale

    def _attach_connect_hooks(self, root: str) -> None:
        bpf = self._bpf
        prog_type = bcc_bpf().CGROUP_SOCK_ADDR
        for func, (attach_type, pin) in CONNECT_PROGRAMS.items():
            # the pin marks the program as owned by a live rome-guard; pinning
            # a program keeps no attachment alive (the link does)
            bpf.attach_to_cgroup(root, func, prog_type, attach_type, pin=pin)
        self.degraded += bpf.degraded
        fallback = bpf.fallback_reason()
        if fallback:
            self.degraded.append(
                f"{fallback}: after a crash the connect hooks stay "
                "attached until rome-guard starts again"
            )
        for name in _PINNED_MAPS:
            bpf.pin_map(name)

    def poll(self, timeout_ms: int = 0) -> list[PreventionEvent]:
        """Events reported since the last poll; waits up to timeout_ms for
        the first one (-1: forever)."""
        if self._bpf is None or self._ring is None:
            return []
        self._bpf.poll(timeout_ms)
        return self._ring.take()

    def program_ids(self) -> dict[str, int]:
        """Kernel id of each loaded program by function name, for
        `bpftool prog show id N` and run-time statistics."""
        return self._bpf.program_ids() if self._bpf is not None else {}

    def ring_fds(self) -> list[int]:
        """The ring buffer's fd, for kernel.poller.RingPoller."""
        return self._bpf.ring_fds() if self._bpf is not None else []

    def lost_events(self) -> int:
        """Events the kernel could not report because the ring buffer was
        full, and records that did not decode."""
        malformed = self._ring.malformed if self._ring is not None else 0
        if self._bpf is None:
            return malformed
        return int(self._bpf["lost_events"][ctypes.c_int(0)].value) + malformed

    # --- deny lists (live) ---

    def _map(self, name: str):
        if self._bpf is None:
            raise RuntimeError("Prevention is not started")
        return self._bpf[name]

    def block_ports(self, ports: Iterable[int], kill: bool = False) -> None:
        """Deny connects to these destination ports on every address."""
        table = self._map("block_ports")
        action = ACT_BLOCK | (ACT_KILL if kill else 0)
        for port in ports:
            if not 0 < int(port) < 65536:
                raise ValueError(f"not a port: {port!r}")
            table[table.Key(int(port))] = table.Leaf(action)

    def unblock_ports(self, ports: Iterable[int]) -> None:
        table = self._map("block_ports")
        for port in ports:
            _discard(table, table.Key(int(port)))

    def block_cidrs(self, cidrs: Iterable[str], kill: bool = False) -> None:
        """Deny connects to these networks ("10.0.0.0/8", "2001:db8::/32",
        or a bare address), on every port."""
        action = ACT_BLOCK | (ACT_KILL if kill else 0)
        for text in cidrs:
            table, key = self._network_key(parse_network(text))
            table[key] = table.Leaf(action)

    def unblock_cidrs(self, cidrs: Iterable[str]) -> None:
        for text in cidrs:
            table, key = self._network_key(parse_network(text))
            _discard(table, key)

    def block_addresses(self, addresses: Iterable[str], kill: bool = False) -> None:
        """Deny single addresses, e.g. those a pool name in a rule resolved to."""
        self.block_cidrs((str(ipaddress.ip_address(a.strip())) for a in addresses), kill)

    def unblock_addresses(self, addresses: Iterable[str]) -> None:
        self.unblock_cidrs(str(ipaddress.ip_address(a.strip())) for a in addresses)

    def kill_on_connect(self, ports: Iterable[int] = (), cidrs: Iterable[str] = ()) -> None:
        """Deny these destinations and SIGKILL whoever tries them, in the
        kernel: the connect never sends a SYN."""
        self.block_ports(ports, kill=True)
        self.block_cidrs(cidrs, kill=True)

    def _network_key(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network):
        if network.version == 4:
            table = self._map("block_v4")
            key = table.Key()
            key.prefixlen = network.prefixlen
            key.addr = int.from_bytes(network.network_address.packed, "little")
            return table, key
        table = self._map("block_v6")
        key = table.Key()
        key.prefixlen = network.prefixlen
        packed = network.network_address.packed
        for i in range(4):
            key.addr[i] = int.from_bytes(packed[4 * i : 4 * i + 4], "little")
        return table, key

    def exempt_cgroups(self, ids: Iterable[int]) -> None:
        """Never deny connects from these cgroups or their descendants
        (e.g. registered jobs). Ids come from cgroup_id()."""
        table = self._map("exempt_cgroups")
        for cid in ids:
            table[table.Key(int(cid))] = table.Leaf(1)

    def unexempt_cgroups(self, ids: Iterable[int]) -> None:
        table = self._map("exempt_cgroups")
        for cid in ids:
            _discard(table, table.Key(int(cid)))

    def deny_exec(self, names: Iterable[str] = (), paths: Iterable[str] = ()) -> None:
        """SIGKILL these programs at exec, before their first instruction.
        names match the executable's basename (the kernel keeps its first
        15 bytes); paths match the path given to execve exactly, so each
        path is entered as given and as resolved."""
        comm_table, path_table = self._map("deny_comm"), self._map("deny_path")
        for name in names:
            key = comm_table.Key()
            key.comm = comm_key(name)
            comm_table[key] = comm_table.Leaf(1)
        for path in paths:
            for variant in {path, os.path.realpath(path)}:
                key = path_table.Key()
                key.path = path_key(variant)
                path_table[key] = path_table.Leaf(1)

    def allow_exec(self, names: Iterable[str] = (), paths: Iterable[str] = ()) -> None:
        comm_table, path_table = self._map("deny_comm"), self._map("deny_path")
        for name in names:
            key = comm_table.Key()
            key.comm = comm_key(name)
            _discard(comm_table, key)
        for path in paths:
            for variant in {path, os.path.realpath(path)}:
                key = path_table.Key()
                key.path = path_key(variant)
                _discard(path_table, key)

    def close(self) -> None:
        """Detach and unpin everything this Prevention made. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            bpf.close()


def _discard(table, key) -> None:
    with contextlib.suppress(KeyError):
        del table[key]
