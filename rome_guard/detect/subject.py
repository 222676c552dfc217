"""What a rule looks at: one process with everything known about it.

A Subject bundles a ProcessInfo with its lineage, the network endpoints it
holds or tried, and its standard fds, and caches the parsed views of argv
that many conditions share. The same Subject type is built by `scan`
(snapshot) and by the daemon (events), so both run the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from rome_guard.detect import argv as argvlib
from rome_guard.events import Endpoint, ProcessInfo


def _no_names(_address: str) -> frozenset[str]:
    return frozenset()


@dataclass
class Subject:
    process: ProcessInfo
    lineage: list[ProcessInfo] = field(default_factory=list)  # nearest first
    connections: list[Endpoint] = field(default_factory=list)  # remote peers
    stdio: dict[int, Endpoint] = field(default_factory=dict)  # fd -> inet socket
    # Names known for an address (from resolved rule hostnames); the daemon
    # supplies a resolver cache, scan a static one.
    names_for: Callable[[str], frozenset[str]] = _no_names

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
            argvlib.basename(self.process.exe.removesuffix(" (deleted)")),
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
