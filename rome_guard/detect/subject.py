"""What a rule looks at: one process with everything known about it.

A Subject bundles a ProcessInfo with its lineage, the network endpoints it
holds or tried, and its standard fds, and caches the parsed views of argv
that many conditions share. A Subject built for a wire event also carries
the flow's WireFacts. The same Subject type is built by `scan`
(snapshot) and by the daemon (events), so both run the same rules.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Callable

from rome_guard.detect import argv as argvlib
from rome_guard.detect.payload import WireFacts
from rome_guard.events import Endpoint, ProcessInfo
from rome_guard.linux import is_deleted, is_memfd, without_deleted


def _no_stdio(_process: ProcessInfo) -> dict[int, Endpoint]:
    return {}


class Subject:
    """``lineage`` and ``stdio`` may be given as zero-argument callables:
    they are then computed only if a rule asks (most execs never need
    them, and the daemon sees thousands of execs a second).

    ``stdio_of`` tells the socket stdio of another process (an ancestor,
    for lineage conditions) from what the caller already knows; ``exe``
    (a callable) reads the executable's path at judgement time, for a
    binary deleted or replaced after exec -- only a rule that asks pays."""

    def __init__(
        self,
        process: ProcessInfo,
        lineage: list[ProcessInfo] | Callable[[], list[ProcessInfo]] = (),
        connections: list[Endpoint] = (),
        stdio: dict[int, Endpoint] | Callable[[], dict[int, Endpoint]] | None = None,
        stdio_of: Callable[[ProcessInfo], dict[int, Endpoint]] = _no_stdio,
        exe: Callable[[], str] | None = None,
        ssh_forwards: Callable[[ProcessInfo], Any] | None = None,
        read_config: Callable[[ProcessInfo, str], str] | None = None,
        wire: WireFacts | None = None,
        stdio_relays: Callable[[], list[Any]] | None = None,
    ):
        self.process = process
        self.connections = list(connections)
        self.wire = wire  # what a new flow said first (wire events only)
        self._lineage = lineage
        self._stdio = stdio
        self.stdio_of = stdio_of
        self._exe = exe
        self._ssh_forwards = ssh_forwards
        self._read_config = read_config
        self._stdio_relays = stdio_relays

    def related(self, other: ProcessInfo, lineage: list[ProcessInfo]) -> Subject:
        """Another process of this one's lineage, judged with what is known
        about it (its socket stdio through stdio_of)."""
        return Subject(other, lineage, (), lambda: self.stdio_of(other), stdio_of=self.stdio_of)

    @cached_property
    def stdio_relays(self) -> list[Any]:
        """The processes that feed this one's stdin and read its stdout
        through pipes, fifos, ptys or socket pairs while holding a network
        connection (state.stdio.Relay); asked only when a rule needs it."""
        if self._stdio_relays is None:
            return []
        return list(self._stdio_relays())

    @cached_property
    def ssh_forwards(self) -> Any:
        """The ssh client's effective forwards (sensors.sshconfig.SshForwards),
        or None when unknown; asked only when a rule needs it."""
        if self._ssh_forwards is None:
            return None
        return self._ssh_forwards(self.process)

    def config_text(self, path: str) -> str:
        """The start of a file the process names in its arguments (relative
        to its cwd), "" when there is no reader or it cannot be read."""
        if self._read_config is None:
            return ""
        return self._read_config(self.process, path)

    @cached_property
    def exe(self) -> str:
        """The executable's path now (" (deleted)" once removed), falling
        back to the one known at exec when it cannot be read."""
        if self._exe is not None:
            current = self._exe()
            if current:
                return current
        return self.process.exe

    @property
    def exe_deleted(self) -> bool:
        return is_deleted(self.exe)

    @property
    def exe_memfd(self) -> bool:
        return is_memfd(self.exe)

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
            # a memfd's name ("/memfd:xmrig (deleted)") is the name it goes by
            argvlib.basename(without_deleted(self.process.exe)).removeprefix("memfd:"),
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
