"""The process model: every process fact the daemon holds, and the only
place that fills gaps from /proc.

Anchors: Tetragon's process cache and Falco's thread table. Fork, exec and
exit events become ``ProcessInfo`` records in a ``ProcessTable`` keyed by
(pid, start time); lineage, children and the recent peers of a process are
answered here; a process first met in a connect, a GPU open or a kernel
prevention event is read from /proc on the spot (``resolve``). A child
seen forked keeps its parent's context across its exec, so the common exec
costs one readlink, not a full /proc read; its record is built once, at
exec (or when asked for), not copied at fork.

This module never decides (rules do) and never acts (responders do). For a
process it already knows it reads from /proc only what an event cannot
carry: the exe link an exec changes, the cgroup file for a cgroup id not
seen before, stdio sockets when a rule asks or an fd event says they
changed, the exe link again when a rule asks at judgement time (a binary
deleted since exec), a config file a rule names, and comm/cmdline/exe
afresh after a rename and at a process's first connect outside loopback.

With the eBPF sensor's exec filter on, most processes are never sent: they
live in the kernel's process table (state.kernel_table), read here when an
event needs one the model does not hold (``resolve``, lineage through a
parent that exited unseen); what the model reads from /proc on its own it
``hold()``s there, so that the kernel sends its exit.

Socket stdio is remembered (``SocketStdio``) for processes seen with a
connected inet socket on fd 0-2, so a shell's lineage (a pty driven by
such a process) is judged from memory, not from /proc at every exec.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterable

from rome_guard import procfs
from rome_guard.attribution import attribute
from rome_guard.detect.subject import Subject
from rome_guard.events import (
    USER_HZ,
    Attribution,
    Endpoint,
    ExecEvent,
    ForkEvent,
    ProcessInfo,
    ProcessKey,
    boottime_ns_to_ticks,
)
from rome_guard.layout.sensor import PROC_EXEC_SEEN
from rome_guard.linux import cgroup_path_of_id, read_cgroup, without_deleted
from rome_guard.sensors import sockdiag
from rome_guard.sensors.sshconfig import EffectiveSshConfig
from rome_guard.state.kernel_table import KernelProcessTable, TableProcess
from rome_guard.state.snapshot import subject_for, take_snapshot
from rome_guard.state.stdio import StdioGraph
from rome_guard.state.table import ProcessTable

if TYPE_CHECKING:
    from rome_guard.detect.payload import WireFacts

PEERS_PER_PROCESS = 32  # recent distinct peers kept for network rules
SOCKET_CACHE_S = 0.2  # a sock_diag dump answers stdio lookups this long
TRACKING_LIMIT = 65536
SOCKET_STDIO_LIMIT = 16384  # processes remembered with socket stdio
TICK_NS = 1_000_000_000 // USER_HZ

SshForwards = Callable[[ProcessInfo], Any]  # sensors.sshconfig.EffectiveSshConfig.forwards


class SocketStdio:
    """Processes known to have a connected inet socket on fd 0, 1 or 2:
    from fd events, exec-time checks and the start-up snapshot. Bounded:
    the oldest are forgotten first."""

    def __init__(self, limit: int = SOCKET_STDIO_LIMIT):
        self.limit = limit
        self._known: OrderedDict[ProcessKey, dict[int, Endpoint]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def remember(self, key: ProcessKey, stdio: dict[int, Endpoint]) -> None:
        connected = {fd: ep for fd, ep in stdio.items() if ep.dport}
        if not connected:
            return
        self._known[key] = connected
        self._known.move_to_end(key)
        while len(self._known) > self.limit:
            self._known.popitem(last=False)

    def of(self, info: ProcessInfo) -> dict[int, Endpoint]:
        return self._known.get(info.key, {})

    def forget(self, key: ProcessKey) -> None:
        self._known.pop(key, None)


class ProcessModel:
    """Processes as the kernel reports them, plus what /proc fills in.
    Single-threaded: the daemon's loop is the only caller."""

    def __init__(self, env_keys: Iterable[str] = ()):
        self.env_keys = tuple(env_keys)  # attribution keys read from environ
        self.table = ProcessTable(missing=self._materialize)
        self._fork_ticks: dict[int, int] = {}  # child pid -> start ticks from fork
        # child pid -> parent pid, for children forked but not yet exec'd:
        # most exec at once, so their record is built once, at exec
        self._forked: dict[int, int] = {}
        self._peers: dict[ProcessKey, deque[Endpoint]] = {}
        self._socket_cache: tuple[float, dict[int, Endpoint]] = (0.0, {})
        # cgroup v2 id -> path: an exec in the cgroup its fork was in reads no cgroup file
        self._cgroup_paths: dict[int, str] = {}
        self._cgroup_unknown: set[int] = set()  # ids no cgroup had when looked up
        self.socket_stdio = SocketStdio()
        # who drives a shell through pipes, fifos and ptys (reverse shells without socket stdio)
        self.stdio_graph = StdioGraph(
            self.resolve, self.table.lineage, lambda: self._sockets_by_inode(fresh=True)
        )
        # processes whose identity was re-read at their first connect outside loopback
        self._externally_connected: set[ProcessKey] = set()
        # the eBPF sensor's process table, when its exec filter keeps processes there
        self.kernel: KernelProcessTable | None = None

    def __len__(self) -> int:
        return len(self.table)

    # --- seeding -----------------------------------------------------------------

    def seed(self, ssh: EffectiveSshConfig | None = None, resync: bool = False) -> list[Subject]:
        """Every live process, read after the sensor is attached so nothing
        starts unseen; returns them as subjects for a first evaluation.

        resync: the re-read after lost events. Only the processes the model
        does not know (their exec was lost) are added, not marked
        pre-existing; every live process is returned under the model's
        identity, so that judging it again still alerts once per process."""
        snapshot = take_snapshot(self.env_keys, pre_existing=not resync)
        own = os.getpid()
        subjects = []
        for info in snapshot.table:
            if not resync or self.table.get(self._same_identity(info).key) is None:
                self._hold(info)
        for info in snapshot.table:
            if info.pid == own:
                continue
            if resync:
                info = self._same_identity(info)
            subject = subject_for(snapshot, info, ssh)
            self.socket_stdio.remember(info.key, subject.stdio)
            if subject.connections:
                self._peers[info.key] = deque(subject.connections[-PEERS_PER_PROCESS:])
            subjects.append(subject)
        return subjects

    # --- lifecycle events --------------------------------------------------------

    def forked(self, event: ForkEvent) -> None:
        """Until it execs, a child is its parent's image under a new identity
        (a subshell in a probe loop connects without ever exec'ing); that
        record is built only when asked for (known(), lineage)."""
        self._fork_ticks[event.child_pid] = event.child_start_ticks
        self._forked[event.child_pid] = event.parent_pid

    def _materialize(self, pid: int, started_by: int | None = None) -> ProcessInfo | None:
        """The record of a child known only from its fork, or of a process
        only the kernel's table holds (one that started by started_by
        ticks), now in the table."""
        parent_pid = self._forked.pop(pid, None)
        parent = self.table.by_pid(parent_pid) if parent_pid is not None else None
        if parent is None:
            return self._from_kernel(pid, started_by)
        key = ProcessKey(pid, self._fork_ticks[pid])
        info = replace(parent, key=key, ppid=parent.pid, pre_existing=False)
        self.table.add(info)
        return info

    def known(self, pid: int) -> ProcessInfo | None:
        """The model's process for pid, without reading /proc."""
        info = self.table.by_pid(pid)
        if info is None and pid in self._forked:
            info = self._materialize(pid)
        return info

    def execed(self, event: ExecEvent) -> ProcessInfo:
        """The process as it is after this exec, now in the table."""
        info = self._exec_of_known_fork(event)
        if info is None:
            info = self._exec_from_proc(event)
        self._fork_ticks.pop(event.pid, None)
        self._forked.pop(event.pid, None)
        self.table.add(info)
        self._peers.pop(info.key, None)
        return info

    def exited(self, pid: int) -> ProcessInfo | None:
        self._fork_ticks.pop(pid, None)
        self._forked.pop(pid, None)
        info = self.table.exit(pid)
        if info is not None:
            self._peers.pop(info.key, None)
            self.socket_stdio.forget(info.key)
            self.stdio_graph.forget(info.key)
            self._externally_connected.discard(info.key)
        return info

    def _exec_of_known_fork(self, event: ExecEvent) -> ProcessInfo | None:
        """The fast path (an exec storm must not make the daemon read all of
        /proc/PID per exec): a child we saw forked keeps its parent's cwd
        and context across exec; only the new image (exe link, argv from the
        kernel) and the cgroup (runtimes move a child before they exec it;
        the kernel's cgroup id says whether it did) are new. None when a
        full read is needed."""
        pid = event.pid
        ticks = self._fork_ticks.get(pid)
        if ticks is None or event.argv_truncated or not event.argv:
            return None
        parent_pid = self._forked.get(pid)
        if parent_pid is not None:
            base = self.table.by_pid(parent_pid)  # not exec'd before: the parent's copy
            ppid = parent_pid
        else:
            base = self.table.by_pid(pid)  # materialized, or an exec after an exec
            ppid = base.ppid if base is not None else 0
        if base is None:
            return None
        exe = procfs.read_exe(pid) or event.filename  # unreadable: what the kernel ran
        cgroup = self._cgroup_path(pid, event.cgroup_id)
        if cgroup is None:
            return None  # gone already: the slow path reconstructs it
        attribution = base.attribution if cgroup == base.cgroup else attribute(cgroup)
        uid = event.uid if event.uid >= 0 else base.uid
        return self._with_exec_env(
            ProcessInfo(
                ProcessKey(pid, ticks) if parent_pid is not None else base.key,
                ppid,
                uid,
                procfs.user_name(uid) if uid != base.uid else base.user,
                event.comm or base.comm,
                exe,
                event.argv,
                base.cwd,
                cgroup,
                attribution,
            )
        )

    # --- the kernel's process table ----------------------------------------------

    def _hold(self, info: ProcessInfo) -> None:
        """info (read from /proc, not from an exec record) into the table;
        the kernel is asked for its exit."""
        self.table.add(info)
        if self.kernel is not None:
            self.kernel.hold(info.pid)

    def _from_kernel(self, pid: int, started_by: int | None = None) -> ProcessInfo | None:
        """pid as the kernel's process table has it (live, or exited not
        long ago: lineage through ancestors that are gone), now in the
        table; None when the kernel does not know it either."""
        if self.kernel is None:
            return None
        before_ns = None if started_by is None else (started_by + 1) * TICK_NS
        entry = self.kernel.lookup(pid, before_ns)
        if entry is None:
            return None
        info = self._info_of_entry(entry)
        self.table.add(info)  # older than the pid's current process: kept by key only
        if self.table.by_pid(pid) is info:
            if entry.exit_ns:
                self.table.exit(pid)
            else:
                self.kernel.hold(pid)
        return info

    def _as_execed(self, info: ProcessInfo) -> ProcessInfo:
        """info (read from /proc now) as the kernel's table saw it, for a
        process whose fork and exec were not sent. Its parent is the process
        that created it, as for a sent exec: /proc names init or a subreaper
        once the creator exited (a daemonising double fork), which would cut
        its lineage off from the tool call that started it. Its name and
        argv are the ones at its exec: a title it rewrote since (no rename)
        is then judged at its first connect outside loopback
        (first_external_connect), as when the model holds the exec. argv is
        unchanged when the kernel has not seen it exec, or when its argv was
        longer than the table keeps and /proc starts the same."""
        entry = self.kernel.lookup(info.pid) if self.kernel is not None else None
        if entry is None or entry.exit_ns:
            return info
        if entry.start_ns and abs(boottime_ns_to_ticks(entry.start_ns) - info.key.start_time) > 1:
            return info  # another process under that pid
        if entry.ppid and entry.ppid != info.ppid:
            info = replace(info, ppid=entry.ppid)
        if not entry.flags & PROC_EXEC_SEEN:
            return info
        if entry.args_cut and info.cmdline[: len(entry.args)] == entry.args:
            return info
        return replace(info, comm=entry.comm, cmdline=entry.args)

    def _info_of_entry(self, entry: TableProcess) -> ProcessInfo:
        cgroup = self.cgroup_path_of(entry.cgroup_id)
        return ProcessInfo(
            key=ProcessKey(entry.pid, boottime_ns_to_ticks(entry.start_ns)),
            ppid=entry.ppid,
            uid=entry.uid,
            user=procfs.user_name(entry.uid),
            comm=entry.comm,
            exe=entry.filename,
            cmdline=entry.args,
            cwd="",
            cgroup=cgroup,
            attribution=attribute(cgroup),
            zombie=bool(entry.exit_ns),
        )

    def _cgroup_path(self, pid: int, cgroup_id: int) -> str | None:
        """The cgroup path of pid, from the kernel's cgroup id where it was
        seen before; None if the process is gone."""
        if cgroup_id:
            known = self._cgroup_paths.get(cgroup_id)
            if known is not None:
                return known
        path = read_cgroup(pid)
        if path is None:
            return None
        if cgroup_id:
            if len(self._cgroup_paths) >= TRACKING_LIMIT:
                self._cgroup_paths.clear()
            self._cgroup_paths[cgroup_id] = path
        return path

    def _exec_from_proc(self, event: ExecEvent) -> ProcessInfo:
        info = procfs.read_process(event.pid)
        if info is None:
            return self._with_exec_env(self._from_event(event))
        info = self._same_identity(info)
        if event.ppid and info.ppid != event.ppid:
            # the kernel's parent is who created it; /proc names the
            # reaper once that one has exited
            info = replace(info, ppid=event.ppid)
        if event.argv and not event.argv_truncated and info.cmdline != event.argv:
            # the kernel's argv is what was executed; /proc may already
            # show a rewritten title or a later exec
            info = replace(info, cmdline=event.argv)
        return self._with_exec_env(info)

    def _with_exec_env(self, info: ProcessInfo) -> ProcessInfo:
        """info with the configured env keys captured now, at its exec (the
        one moment they are known to belong to this image: an alert or a
        kill record written after the process is gone still carries
        them); its nearest ancestor's, marked inherited, when its own
        environ cannot be read (gone, a zombie, killed at exec) -- or its
        own previous image's (an exec keeps the environment unless told
        otherwise), marked as inherited from its own pid."""
        if not self.env_keys:
            return info
        env = procfs.read_environ(info.pid, self.env_keys)
        source = 0
        if env is None:
            before = self.table.by_pid(info.pid)
            if before is not None and before.key == info.key:
                env, source = dict(before.attribution.env), info.pid
            else:
                env, source = self.inherited_env(info)
        return replace(
            info, attribution=replace(info.attribution, env=env, env_inherited_from=source)
        )

    def inherited_env(self, info: ProcessInfo) -> tuple[dict[str, str], int]:
        """The configured env keys' values info would carry from its
        nearest known ancestor, and the pid they were read from (the
        ancestor's own source when it inherited them too); ({}, 0) when
        no ancestor is known. ``ProcessInfo.attribution.env`` of a process
        the model knows was captured at its exec: this is for the rest."""
        for ancestor in self.table.lineage(info):
            att = ancestor.attribution
            return dict(att.env), att.env_inherited_from or ancestor.pid
        if info.ppid > 1:  # a parent whose exec event has not arrived yet
            env = procfs.read_environ(info.ppid, self.env_keys)
            if env is not None:
                return env, info.ppid
        return {}, 0

    def _same_identity(self, info: ProcessInfo) -> ProcessInfo:
        """/proc's start time for a process first known from its fork event
        may differ from the fork timestamp's by one clock tick: same process."""
        known = self.known(info.pid)
        if (
            known is not None
            and known.key != info.key
            and abs(known.key.start_time - info.key.start_time) <= 1
        ):
            return replace(info, key=known.key)
        return info

    def _start_ticks(self, pid: int, fallback_ns: int, start_ns: int = 0) -> int:
        """pid's start: from its fork event, else from the kernel's table
        (start_ns), else fallback_ns."""
        ticks = self._fork_ticks.get(pid)
        if ticks is not None:
            return ticks
        return boottime_ns_to_ticks(start_ns or fallback_ns)

    def _from_event(self, event: ExecEvent) -> ProcessInfo:
        """The process exited before /proc could be read: what the kernel
        told us, plus what its parent tells about its context."""
        parent = self.known(event.ppid) if event.ppid else None
        uid = event.uid if event.uid >= 0 else (parent.uid if parent else -1)
        return ProcessInfo(
            key=ProcessKey(
                event.pid, self._start_ticks(event.pid, event.timestamp_ns, event.start_ns)
            ),
            ppid=event.ppid,
            uid=uid,
            user=procfs.user_name(uid) if uid >= 0 else "",
            comm=event.comm,
            exe=event.filename,
            cmdline=event.argv,
            cwd=parent.cwd if parent else "",
            cgroup=parent.cgroup if parent else "",
            attribution=parent.attribution if parent else Attribution(),
        )

    # --- lookups -------------------------------------------------------------------

    def resolve(self, pid: int) -> ProcessInfo | None:
        """The model's process for pid, else read it from /proc now, else
        from the kernel's process table (gone already)."""
        info = self.known(pid)
        if info is not None:
            return info
        info = procfs.read_process(pid)
        if info is not None:
            info = self._with_exec_env(self._as_execed(info))
            self._hold(info)
            return info
        return self._from_kernel(pid)

    def unattributed(self, pid: int, comm: str, timestamp_ns: int) -> ProcessInfo:
        """A process that came and went before anything could be read
        about it: what the event itself says."""
        return ProcessInfo(
            key=ProcessKey(pid, self._start_ticks(pid, timestamp_ns)),
            ppid=0,
            uid=-1,
            user="",
            comm=comm,
            exe="",
            cmdline=(),
            cwd="",
            cgroup="",
        )

    def cgroup_path_of(self, cgroup_id: int) -> str:
        """The cgroup path of a kernel cgroup id ("" unknown): from the ids
        execs were seen in, else by walking the hierarchy once per id (a
        wire event's socket outlives its process, its cgroup may not)."""
        if not cgroup_id or cgroup_id in self._cgroup_unknown:
            return ""
        known = self._cgroup_paths.get(cgroup_id)
        if known is not None:
            return known
        try:
            path = cgroup_path_of_id(cgroup_id)
        except OSError:  # no cgroup2 hierarchy (NoCgroup2)
            return ""
        if len(self._cgroup_paths) >= TRACKING_LIMIT:
            self._cgroup_paths.clear()
        if len(self._cgroup_unknown) >= TRACKING_LIMIT:
            self._cgroup_unknown.clear()
        if path:
            self._cgroup_paths[cgroup_id] = path
        else:
            self._cgroup_unknown.add(cgroup_id)
        return path

    def connected_by(
        self, pid: int, connect_ns: int, uid: int, comm: str, cgroup_id: int
    ) -> ProcessInfo:
        """The process that opened a flow at connect_ns (CLOCK_BOOTTIME);
        when it is gone (or its pid was reused since), what the kernel said
        about it plus its cgroup, so the alert still names the unit,
        container, pod or job."""
        info = self.resolve(pid) if pid else None
        if info is not None and info.key.start_time > boottime_ns_to_ticks(connect_ns) + 1:
            info = None  # started after the connect: the pid was reused
        if info is not None:
            return info
        cgroup = self.cgroup_path_of(cgroup_id)
        return ProcessInfo(
            key=ProcessKey(pid, 0),
            ppid=0,
            uid=uid,
            user="",
            comm=comm,
            exe="",
            cmdline=(),
            cwd="",
            cgroup=cgroup,
            attribution=attribute(cgroup),
        )

    def get(self, key: ProcessKey) -> ProcessInfo | None:
        return self.table.get(key)

    def parent(self, info: ProcessInfo) -> ProcessInfo | None:
        return self.table.parent(info)

    def lineage(self, info: ProcessInfo) -> list[ProcessInfo]:
        return self.table.lineage(info)

    def descendants(self, info: ProcessInfo) -> list[ProcessInfo]:
        """info's descendants the model holds, and those only the kernel's
        table does (their forks and benign execs were not sent): a child
        counts only when its parent identity (pid and fork time) is the
        node's, so a reused pid never makes a stranger a descendant."""
        found = self.table.descendants(info)
        if self.kernel is None:
            return found
        live = {entry.pid: entry for entry in self.kernel.live()}
        root = live.get(info.pid)
        if root is None or not root.start_ns or not self._same_start(info, root.start_ns):
            return found
        children: dict[tuple[int, int], list[TableProcess]] = {}
        for entry in live.values():
            children.setdefault((entry.ppid, entry.parent_start_ns), []).append(entry)
        held = {p.pid for p in found}
        frontier = [root]
        while frontier:
            node = frontier.pop()
            for child in children.get((node.pid, node.start_ns), ()):
                frontier.append(child)
                if child.pid in held:
                    continue
                proc = self.resolve(child.pid)
                if proc is not None and self._same_start(proc, child.start_ns):
                    held.add(child.pid)
                    found.append(proc)
        return found

    @staticmethod
    def _same_start(info: ProcessInfo, start_ns: int) -> bool:
        """info started at start_ns (its fork, CLOCK_BOOTTIME), within the
        tick /proc and the fork event may differ by."""
        return abs(info.key.start_time - boottime_ns_to_ticks(start_ns)) <= 1

    def subject(
        self,
        info: ProcessInfo,
        connections: list[Endpoint] = (),
        *,
        stdio: dict[int, Endpoint] | None = None,
        exe_now: bool = False,
        ssh_forwards: SshForwards | None = None,
        wire: WireFacts | None = None,
    ) -> Subject:
        """What rules look at; lineage, stdio (remembered for the lineage of
        what it spawns), the exe link now (``exe_now``: a binary deleted
        since exec), the effective ssh forwards and config files are read
        only if a rule asks. Ancestors' socket stdio comes from memory."""
        return Subject(
            info,
            lambda: self.table.lineage(info),
            connections,
            stdio if stdio is not None else (lambda: self.stdio_now(info)),
            self.socket_stdio.of,
            exe=(lambda: self.exe_now(info)) if exe_now else None,
            ssh_forwards=ssh_forwards,
            read_config=procfs.read_config_file,
            stdio_relays=lambda: self.stdio_graph.relays(info),
            wire=wire,
        )

    # --- identity changes ----------------------------------------------------------

    def _refreshed(self, known: ProcessInfo, comm: str = "") -> ProcessInfo | None:
        """known with comm, cmdline and exe as /proc shows them now; None when
        the process is gone or is another process under a reused pid."""
        fresh = procfs.read_process(known.pid)
        if fresh is None or abs(fresh.key.start_time - known.key.start_time) > 1:
            return None
        return replace(
            known,
            comm=fresh.comm or comm or known.comm,
            cmdline=fresh.cmdline or known.cmdline,
            exe=fresh.exe or known.exe,
        )

    def exe_now(self, info: ProcessInfo) -> str:
        """info's executable as /proc shows it now, when it is still the same
        file (only " (deleted)" may have been added since exec); "" when the
        process has exec'd another program since, or is gone: the event being
        judged belongs to the image info describes."""
        current = procfs.read_exe(info.pid)
        if without_deleted(current) == without_deleted(info.exe):
            return current
        return ""

    def renamed(self, pid: int, new_comm: str) -> ProcessInfo | None:
        """The process after it renamed itself (task_rename: prctl
        PR_SET_NAME, /proc/self/comm; its argv may have been rewritten too),
        now in the table; None when unknown or nothing changed."""
        known = self.resolve(pid)
        if known is None:
            return None
        info = self._refreshed(known, new_comm) or replace(known, comm=new_comm)
        if info == known:
            return None
        self.table.add(info)
        return info

    def first_external_connect(self, info: ProcessInfo) -> ProcessInfo | None:
        """At the first connect of a process outside loopback, its identity
        read afresh (an argv rewritten without a rename), now in the table;
        None when it was read before or nothing changed."""
        seen = self._externally_connected
        if info.key in seen:
            return None
        if len(seen) >= TRACKING_LIMIT:
            seen.clear()
        seen.add(info.key)
        fresh = self._refreshed(info)
        if fresh is None or fresh == info:
            return None
        self.table.add(fresh)
        return fresh

    # --- sockets -------------------------------------------------------------------

    def new_peer(self, info: ProcessInfo, ep: Endpoint) -> list[Endpoint] | None:
        """Record a destination of info; its recent peers when ep is a new
        one (rules then look again), None when it was already known."""
        peers = self._peers.setdefault(info.key, deque(maxlen=PEERS_PER_PROCESS))
        if any((p.daddr, p.dport) == (ep.daddr, ep.dport) for p in peers):
            return None
        peers.append(ep)
        return list(peers)

    def peers(self, info: ProcessInfo) -> list[Endpoint]:
        """The recent distinct destinations of info."""
        return list(self._peers.get(info.key, ()))

    def stdio_now(self, info: ProcessInfo) -> dict[int, Endpoint]:
        """info's socket stdio read now, and remembered for the lineage of
        what it spawns."""
        stdio = self.stdio_of(info.pid)
        self.socket_stdio.remember(info.key, stdio)
        return stdio

    def stdio_of(self, pid: int) -> dict[int, Endpoint]:
        """fd (0, 1, 2) -> the inet socket it is, for pid now."""
        stdio = procfs.stdio_socket_inodes(pid)
        if not stdio:
            return {}
        sockets = self._sockets_by_inode()
        result = {fd: sockets[inode] for fd, inode in stdio.items() if inode in sockets}
        if len(result) < len(stdio):  # a socket newer than the cached dump
            sockets = self._sockets_by_inode(fresh=True)
            result = {fd: sockets[inode] for fd, inode in stdio.items() if inode in sockets}
        return result

    def _sockets_by_inode(self, fresh: bool = False) -> dict[int, Endpoint]:
        taken, cached = self._socket_cache
        if fresh or time.monotonic() - taken > SOCKET_CACHE_S:
            cached = sockdiag.by_inode(sockdiag.list_sockets(owned_only=True))
            self._socket_cache = (time.monotonic(), cached)
        return cached

    # --- upkeep ----------------------------------------------------------------------

    def expire(self) -> None:
        self.table.expire()
        if len(self._fork_ticks) > TRACKING_LIMIT:
            self._fork_ticks.clear()
            self._forked.clear()
