"""The wire sensor: the client stream of every new flow, for every process.

Two cgroup_skb programs (rome_guard/bpf/wire.c) on the cgroup v2 root see
every socket on the host, containers in their own network namespaces
included, IPv4 and IPv6. Per TCP flow this host opens, WireEvents with the
client stream's first bytes, each placed by its stream offset, until the
stream's bounds (the last one says so; a flow whose first message says
all, such as a TLS ClientHello, gives one), with a ClientHello's SNI and
ALPN and a proxy request's host parsed in the kernel; per UDP datagram to
or from port 53, one DNS event.
The task that sends a flow's first payload (pid, uid, comm: in its own
context, the task that connected unless it handed the socket on) is
recorded in the socket's storage, so the stream's later segments are
attributed to it even when they leave the host from a softirq; a bare
SYN, ACK or FIN makes no state and costs no map operation. Why cgroup_skb and not TC: see
docs/architecture.md.

In enforce mode the daemon fills the drop tables (JSON-RPC methods, pool
and tunnel-service domains, pool-named addresses, flows a user-space
verdict stops) and the kernel drops a matching flow from its first
identified packet. Drops happen only while the deadline the
daemon keeps pushing forward (every poll) lies in the future: a dead or
hung daemon drops nothing a few seconds later.

The programs are attached through BPF links (kernel.loader, kernel.bpfsys):
the kernel detaches them when the daemon dies. They are also pinned under
the daemon's owner directory, so that on a kernel without cgroup links a
crashed daemon's programs are found by stale.cleanup_stale().

This module must never: attach without pinning under the daemon's owner
directory, leave a program attached after close(), or decode payload
bytes as anything but bytes (they belong to the sender).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import logging
import os
from typing import Any, Iterable, Mapping

from rome_guard import linux
from rome_guard.events import WireEvent
from rome_guard.kernel import stale
from rome_guard.kernel.loader import BPF_DIR, BpfObject, LoadError, Ring, bcc_bpf
from rome_guard.kernel.poller import BATCH_MS
from rome_guard.layout.wire import (
    CUT_REASONS,
    WIRE_CUTS,
    WIRE_DROP_ADDRESS,
    WIRE_DROP_FLOW,
    WIRE_DROP_METHOD,
    WIRE_DROP_METHOD_AGENT,
    WIRE_DROP_SNI,
    WIRE_METHOD_MAX,
    WIRE_SET_DROP_UNTIL,
    WIRE_SET_OWNER,
    MalformedWireRecord,
    decode_wire_record,
)

log = logging.getLogger(__name__)

WIRE_SOURCE = BPF_DIR / "wire.c"
DEFAULT_RING_PAGES = 4096  # 16 MiB: ~21,000 records of 792 bytes, ~1 s at 20,000 flows/s
# how long the kernel keeps dropping after the daemon's last poll
DROP_GRACE_NS = 3_000_000_000
HEARTBEAT_EVERY_NS = 500_000_000


# --- the kernel's hashes ------------------------------------------------------

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


def fnv1a(data: bytes) -> int:
    """64-bit FNV-1a, as wire.c computes it."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    return h


def method_key(method: str) -> int:
    """drop_methods key: the method name's bytes, as sent."""
    return fnv1a(method.encode())


def suffix_key(domain: str) -> int:
    """drop_hosts key: the domain lower-cased, hashed from its last byte
    (the kernel walks a SNI from its end, looking up at each dot)."""
    return fnv1a(domain.strip(".").lower().encode()[::-1])


# --- the sensor -------------------------------------------------------------------


class WireUnavailable(Exception):
    """The wire sensor cannot run here; the message names what is missing."""


class WireSensor:
    """The wire programs of one daemon, attached from start() to close()."""

    def __init__(
        self,
        owner_pid: int | None = None,
        ring_pages: int = DEFAULT_RING_PAGES,
        cgroup_root: str | None = None,
        pin_root: str | None = None,
    ):
        self._owner_pid = owner_pid if owner_pid is not None else os.getpid()
        self._ring_pages = ring_pages
        self._cgroup_root = cgroup_root
        self._pin_root = pin_root
        self._bpf: BpfObject | None = None
        self._ring: Ring[WireEvent] | None = None
        self._enforcing = False
        self._heartbeat_ns = 0
        self._methods: dict[int, int] = {}
        self._hosts: set[int] = set()
        self._addresses: set[str] = set()
        self.degraded: list[str] = []

    def __enter__(self) -> WireSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._bpf is not None:
            return
        try:
            root = self._cgroup_root or linux.cgroup2_root()
        except linux.NoCgroup2 as exc:
            raise WireUnavailable(str(exc)) from exc
        try:
            bpf = BpfObject.compile(
                WIRE_SOURCE,
                # a record wakes user space at most once per batch: the
                # daemon drains again BATCH_MS after any drain that found some
                cflags=[
                    f"-DWIRE_RING_PAGES={self._ring_pages}",
                    f"-DWIRE_BATCH_NS={BATCH_MS * 1_000_000}ULL",
                ],
                pin_root=self._pin_root or stale.PIN_ROOT,
            )
        except LoadError as exc:
            raise WireUnavailable(str(exc)) from exc
        self._bpf = bpf
        try:
            self._set(WIRE_SET_OWNER, self._owner_pid)
            self._ring = bpf.open_ring("wire_events", decode_wire_record, (MalformedWireRecord,))
            self._attach(bpf, root)
        except LoadError as exc:
            self.close()
            raise WireUnavailable(str(exc)) from exc
        except OSError as exc:
            self.close()
            raise WireUnavailable(
                f"attaching to the cgroup2 root {root} failed: {exc} "
                "(needs CAP_BPF and CAP_NET_ADMIN)"
            ) from exc
        except BaseException:
            self.close()
            raise

    def _attach(self, bpf: BpfObject, root: str) -> None:
        # named rgw_* and pinned in the owner directory: stale.cleanup_stale()
        # detaches what a dead owner left; a BPF link: detached by the kernel
        # if the daemon dies
        prog_type = bcc_bpf().CGROUP_SKB
        for func, (attach_type, pin) in stale.WIRE_PROGRAMS.items():
            bpf.attach_to_cgroup(root, func, prog_type, attach_type, pin=pin)
        self.degraded += bpf.degraded
        fallback = bpf.fallback_reason()
        if fallback:
            self.degraded.append(
                f"{fallback}: after a crash the wire programs stay "
                "attached (observing, never dropping) until rome-guard starts again"
            )

    def _set(self, slot: int, value: int) -> None:
        self._bpf["wire_settings"][ct.c_int(slot)] = ct.c_uint64(value)

    @property
    def running(self) -> bool:
        return self._bpf is not None

    def poll(self, timeout_ms: int) -> list[WireEvent]:
        """Records since the last poll (waits up to timeout_ms for the
        first); in enforce mode also pushes the drop deadline forward.
        Within BATCH_MS of the record that woke the reader, records do not
        wake it: a caller that found records polls again within BATCH_MS
        (as the daemon does), or they wait for its next poll."""
        if self._bpf is None:
            return []
        if self._enforcing:
            now = linux.boottime_ns()
            if now - self._heartbeat_ns >= HEARTBEAT_EVERY_NS:
                self._set(WIRE_SET_DROP_UNTIL, now + DROP_GRACE_NS)
                self._heartbeat_ns = now
        self._bpf.poll(timeout_ms)
        return self._ring.take() if self._ring is not None else []

    def heartbeat_in_s(self) -> float | None:
        """Seconds until poll() must run again to keep drops on (the
        deadline is renewed every HEARTBEAT_EVERY_NS, good for
        DROP_GRACE_NS): an idle daemon's loop must wake for it. None when
        not enforcing."""
        if self._bpf is None or not self._enforcing:
            return None
        due = self._heartbeat_ns + HEARTBEAT_EVERY_NS - linux.boottime_ns()
        return max(0.0, due / 1e9)

    def ring_fds(self) -> list[int]:
        """The ring buffer's fd, for kernel.poller.RingPoller."""
        return self._bpf.ring_fds() if self._bpf is not None else []

    def lost_events(self) -> dict[str, int]:
        malformed = self._ring.malformed if self._ring is not None else 0
        if self._bpf is None:
            return {"wire": malformed}
        values = self._bpf["wire_lost"][ct.c_int(0)]
        return {"wire": sum(int(getattr(v, "value", v)) for v in values) + malformed}

    def stream_cuts(self) -> dict[str, int]:
        """Flows whose client stream a bound cut short, by bound ("bytes",
        "segments", "time"): what the rules never saw of them."""
        if self._bpf is None:
            return {}
        table = self._bpf["wire_cut"]
        return {
            CUT_REASONS[slot]: sum(int(getattr(v, "value", v)) for v in table[ct.c_int(slot)])
            for slot in range(WIRE_CUTS)
        }

    # --- enforce mode: what the kernel drops -----------------------------------

    def enforce(self, on: bool) -> None:
        """Start (or stop) dropping; the deadline is renewed by poll()."""
        self._enforcing = on
        self._heartbeat_ns = 0
        if self._bpf is not None and not on:
            self._set(WIRE_SET_DROP_UNTIL, 0)

    def set_drop_policy(self, methods: Mapping[str, bool], hosts: Iterable[str]) -> None:
        """methods: JSON-RPC method -> True when it is dropped only with an
        "agent" member (XMRig's generic "login"); hosts: domain suffixes
        whose TLS SNI and DNS questions are dropped. Replaces the previous
        lists."""
        want_methods = {
            method_key(m): (WIRE_DROP_METHOD_AGENT if agent else WIRE_DROP_METHOD)
            for m, agent in methods.items()
            if 0 < len(m.encode()) < WIRE_METHOD_MAX
        }
        want_hosts = {suffix_key(h) for h in hosts if h.strip(".")}
        table = self._bpf["drop_methods"]
        for key in set(self._methods) - set(want_methods):
            _discard(table, table.Key(key))
        for key, value in want_methods.items():
            table[table.Key(key)] = table.Leaf(value)
        table = self._bpf["drop_hosts"]
        for key in self._hosts - want_hosts:
            _discard(table, table.Key(key))
        for key in want_hosts - self._hosts:
            table[table.Key(key)] = table.Leaf(WIRE_DROP_SNI)
        self._methods, self._hosts = want_methods, want_hosts

    def _address_key(self, address: str) -> tuple[Any, Any]:
        ip = ipaddress.ip_address(address)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.version == 4:
            table = self._bpf["drop_v4"]
            return table, table.Key(int.from_bytes(ip.packed, "little"))
        table = self._bpf["drop_v6"]
        key = table.Key()
        ct.memmove(key.addr, ip.packed, 16)
        return table, key

    def drop_address(self, address: str) -> None:
        """Drop every new TCP flow to this address from its SYN on."""
        table, key = self._address_key(address)
        table[key] = table.Leaf(WIRE_DROP_ADDRESS)
        self._addresses.add(address)

    def undrop_address(self, address: str) -> None:
        table, key = self._address_key(address)
        _discard(table, key)
        self._addresses.discard(address)

    def drop_flow(self, cookie: int) -> None:
        """Drop the rest of one flow (its socket cookie), from its next
        packet on: a verdict only user space could reach."""
        table = self._bpf["drop_cookies"]
        table[table.Key(cookie)] = table.Leaf(WIRE_DROP_FLOW)

    def program_ids(self) -> dict[str, int]:
        return self._bpf.program_ids() if self._bpf is not None else {}

    def close(self) -> None:
        """Detach, unpin and free everything. Idempotent."""
        bpf, self._bpf = self._bpf, None
        if bpf is not None:
            bpf.close()


def _discard(table: Any, key: Any) -> None:
    with contextlib.suppress(KeyError):
        del table[key]


def open_wire_sensor() -> WireSensor | None:
    """Start the wire sensor, or log why the host runs without it."""
    sensor = WireSensor()
    try:
        sensor.start()
    except WireUnavailable as exc:
        log.warning(
            "DEGRADED COVERAGE: wire sensor unavailable (%s); Stratum, DNS and TLS rules "
            "will not fire",
            exc,
        )
        sensor.close()
        return None
    for line in sensor.degraded:
        log.warning("wire sensor: %s", line)
    return sensor
