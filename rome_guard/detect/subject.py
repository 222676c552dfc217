"""What a rule looks at: one process with everything known about it.

A Subject bundles a ProcessInfo with its lineage, the network endpoints it
holds or tried, and its standard fds, and caches the parsed views of argv
that many conditions share. A Subject built for a wire event also carries
the flow's WireFacts. The same Subject type is built by `scan`
(snapshot) and by the daemon (events), so both run the same rules.
"""

from __future__ import annotations

from functools import cached_property
from typing import Callable

from rome_guard.detect import argv as argvlib
from rome_guard.detect.payload import WireFacts
from rome_guard.events import Endpoint, ProcessInfo
from rome_guard.linux import without_deleted


class Subject:
    """``lineage`` and ``stdio`` may be given as zero-argument callables:
    they are then computed only if a rule asks (most execs never need
    them, and the daemon sees thousands of execs a second)."""

    def __init__(
        self,
        process: ProcessInfo,
        lineage: list[ProcessInfo] | Callable[[], list[ProcessInfo]] = (),
        connections: list[Endpoint] = (),
        stdio: dict[int, Endpoint] | Callable[[], dict[int, Endpoint]] | None = None,
        wire: WireFacts | None = None,
    ):
        self.process = process
        self.connections = list(connections)
        self.wire = wire  # what a new flow said first (wire events only)
        self._lineage = lineage
        self._stdio = stdio

    @cached_property
    def lineage(self) -> list[ProcessInfo]:
        """Ancestors, nearest first."""
        value = self._lineage
        return list(value() if callable(value) else value)

    @cached_property
    def stdio(self) -> dict[int, Endpoint]:
        """fd (0, 1, 2) -> the inet socket it is."""
        value = self._stdio
        return dict((value() if callable(value) else value) or {})

    @cached_property
    def peer_ports(self) -> dict[int, Endpoint]:
        """Destination port -> the first connection to it (a process may
        hold thousands of connections to a handful of ports)."""
        ports: dict[int, Endpoint] = {}
        for ep in self.connections:
            ports.setdefault(ep.dport, ep)
        return ports

    @cached_property
    def peer_addresses(self) -> dict[str, Endpoint]:
        """Destination address -> the first connection to it."""
        addresses: dict[str, Endpoint] = {}
        for ep in self.connections:
            addresses.setdefault(ep.daddr, ep)
        return addresses

    @cached_property
    def argv(self) -> tuple[str, ...]:
        return self.process.cmdline

    @cached_property
    def names(self) -> frozenset[str]:
        """The names this process goes by: exe basename, comm, argv[0]
        basename, lower-cased. Any of them can be forged, so rules use
        names for known tools and arguments for behaviour."""
        candidates = {
            self.process.comm,
            argvlib.basename(without_deleted(self.process.exe)),
        }
        if self.argv:
            candidates.add(argvlib.basename(self.argv[0]))
        return frozenset(n.lower() for n in candidates if n)

    @cached_property
    def command_line(self) -> str:
        return " ".join(self.argv)

    @cached_property
    def argument_values(self) -> tuple[str, ...]:
        return tuple(argvlib.argument_values(self.argv))

    @cached_property
    def host_refs(self) -> tuple[argvlib.HostRef, ...]:
        refs = []
        for value in self.argument_values:
            if "." in value or ":" in value:
                ref = argvlib.parse_hostref(value)
                if ref is not None:
                    refs.append(ref)
        return tuple(refs)
