"""`rome-guard run`: the daemon that follows the host as it happens.

Data path, in the order an event travels:

    sensor (eBPF, or /proc polling) -> Guard.handle() -> ProcessTable
      -> Engine (same rules as scan) and stateful detectors -> Guard.raise_alert()
      -> Journal (fsync) -> metrics -> Killer (enforce mode only)

Start-up misses nothing: the sensor attaches first, then the table is
seeded from /proc (processes marked pre-existing) and evaluated, then
events are drained; an event for a pid the table does not know is resolved
from /proc on the spot, or parked briefly until its exec/fork arrives.

This module never kills by pid alone (the Killer verifies identity through
a pidfd) and never acts before the alert is durable in the journal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

from rome_guard.attribution import attribute
from rome_guard.config import Config, load_config
from rome_guard.detect.engine import Engine
from rome_guard.detect.incidents import (
    Filed,
    IncidentBook,
    kill_rule_finding,
    primary,
    rules_record,
)
from rome_guard.detect.rules import Rule, RuleSet, rules_for
from rome_guard.detect.stateful import FanoutDetector
from rome_guard.detect.subject import Subject
from rome_guard.events import (
    CONNECT_ATTEMPT,
    Attribution,
    ConnectEvent,
    Endpoint,
    ExecEvent,
    ExitEvent,
    FdDupEvent,
    ForkEvent,
    GpuOpenEvent,
    GpuProcess,
    ProcessInfo,
    ProcessKey,
    RenameEvent,
    boottime_ns_to_ticks,
)
from rome_guard.findings import Finding, finding_record, gpu_record, network_record, rfc3339
from rome_guard.gpu.consumers import NOT_GRANTED, UNREGISTERED, judge_consumer
from rome_guard.gpu.registry import GpuRef
from rome_guard.handlers import fd, rename
from rome_guard.proctable import ProcessTable
from rome_guard.respond.enforce import KernelPolicy, apply_policy, policy_for, rule_for
from rome_guard.respond.journal import Journal
from rome_guard.respond.metrics import gpu_usage
from rome_guard.scan import is_peer, subject_for, take_snapshot
from rome_guard.sensors import procfs, sockdiag
from rome_guard.sensors.poll import PollSensor
from rome_guard.sensors.sshconfig import EffectiveSshConfig
from rome_guard.textsafe import command_line, one_line
from rome_guard.yamlsrc import SourceError

log = logging.getLogger("rome_guard")

CONNECTIONS_PER_PROCESS = 32  # recent distinct peers kept for network rules
ALERTED_LIMIT = 100_000
STATUS_EVERY_S = 5.0
SHUTDOWN_BUDGET_S = 2.0


class Sensor(Protocol):
    def start(self) -> None: ...

    def poll(self, timeout_ms: int) -> list: ...

    def lost_events(self) -> dict[str, int]: ...

    def close(self) -> None: ...


class SensorUnavailable(Exception):
    """The requested sensor cannot run here; the message says what is missing."""


def open_sensor(choice: str, ignore_pids: tuple[int, ...]) -> tuple[Sensor, str, str | None]:
    """Attach the sensor the config asks for. Returns it, its mode ("ebpf"
    or "poll") and, when polling, why eBPF is not in use."""
    if choice == "poll":
        sensor: Sensor = PollSensor(ignore_pids=ignore_pids)
        sensor.start()
        return sensor, "poll", "polling was requested (--sensor poll)"
    try:
        from rome_guard.sensors import ebpf
    except ImportError as exc:  # bcc itself missing
        reason = f"the eBPF sensor cannot load: {exc}"
        ebpf = None
    else:
        reason = ebpf.probe_ebpf()
    if ebpf is not None and reason is None:
        try:
            sensor = ebpf.EbpfSensor(ignore_pids=ignore_pids)
            sensor.start()
            return sensor, "ebpf", None
        except ebpf.EbpfUnavailable as exc:
            reason = str(exc)
    if choice == "ebpf":
        raise SensorUnavailable(reason or "eBPF is unavailable")
    sensor = PollSensor(ignore_pids=ignore_pids)
    sensor.start()
    return sensor, "poll", reason


@dataclass
class Parked:
    event: Any
    until: float


class Guard:
    """The daemon's state and its event handlers. Single-threaded: every
    event, timer and signal is handled on the loop in run()."""

    def __init__(
        self,
        config: Config,
        ruleset: RuleSet,
        journal: Journal,
        extra_rules: tuple[str, ...] = (),
        metrics: Any = None,
        killer: Any = None,
        host: str | None = None,
        gpu: Any = None,
        prevention: Any = None,
    ):
        self.config = config
        self.extra_rules = extra_rules
        self.journal = journal
        self.metrics = metrics
        self.killer = killer
        self.gpu = gpu  # GpuWatch, or None
        self.metrics_server: Any = None  # MetricsServer, reloaded on SIGHUP
        self._loopback_ignored: set[int] = set()  # cgroup ids the sensor drops loopback for
        self.prevention = prevention  # Prevention (enforce mode only), or None
        self.policy: KernelPolicy | None = None
        # key -> (alert id, rule id) of open-event alerts awaiting NVML's confirmation
        self._gpu_alerts: dict[ProcessKey, tuple[str, str]] = {}
        self.host = host or socket.gethostname()
        self.table = ProcessTable()
        self.sensor: Sensor | None = None
        self.sensor_mode = "none"
        self._connections: dict[ProcessKey, deque[Endpoint]] = {}
        self._fork_ticks: dict[int, int] = {}  # child pid -> start ticks from fork
        self._alerted: set[tuple[str, ProcessKey, str]] = set()
        self.incidents = IncidentBook()
        self.socket_stdio = fd.SocketStdio()
        self.ssh_config = EffectiveSshConfig()
        self.externally_connected: set[ProcessKey] = set()  # first-connect identity re-read
        self._parked: deque[Parked] = deque()
        self._socket_cache: tuple[float, dict[int, Endpoint]] = (0.0, {})
        self._stop = threading.Event()
        self._reload = threading.Event()
        self.alerts_raised = 0
        self.events_seen = 0
        self.lost: dict[str, int] = {}
        # event type -> (metrics source, handler)
        self._routes: dict[type, tuple[str, Callable[[Any], None]]] = {
            ExecEvent: ("exec", self.on_exec),
            ConnectEvent: ("connect", self.on_connect),
            ForkEvent: ("fork", self.on_fork),
            ExitEvent: ("exit", self.on_exit),
            GpuOpenEvent: ("gpu_open", self.on_gpu_open),
            FdDupEvent: ("fd", lambda event: fd.on_fd_dup(self, event)),
            RenameEvent: ("rename", lambda event: rename.on_rename(self, event)),
        }
        self._install_rules(ruleset)

    # --- rules --------------------------------------------------------------

    def _install_rules(self, ruleset: RuleSet) -> None:
        self.ruleset = ruleset
        self.engine = Engine(ruleset)
        self.fanout = [FanoutDetector(rule) for rule in ruleset.detector_rules("fanout")]
        self.gpu_rules = ruleset.detector_rules("gpu_unregistered")
        if self.prevention is not None:
            policy = policy_for(ruleset)
            apply_policy(self.prevention, policy, self.policy)
            self.policy = policy
        if self.metrics is not None:
            self.metrics.set_rules((r.id, r.category, r.severity) for r in ruleset.rules)

    def reload(self) -> bool:
        """SIGHUP: re-read config and rules; keep the old set on any error."""
        try:
            config = load_config(self.config.source or None)
            ruleset = rules_for(replace(config, rules=list(config.rules) + list(self.extra_rules)))
        except SourceError as exc:
            log.error("reload rejected, keeping %d rules in force:\n%s", len(self.ruleset), exc)
            if self.metrics is not None:
                self.metrics.rule_reload_failed()
            return False
        # what was fixed at start (command-line overrides, open files, the
        # sensor) stays; rules, attribution, protection and web config apply
        current = self.config
        self.config = replace(
            config,
            mode=current.mode,
            sensor=current.sensor,
            alerts_file=current.alerts_file,
            run_dir=current.run_dir,
            state_dir=current.state_dir,
        )
        if self.metrics_server is not None:
            try:
                self.metrics_server.reload(self.config.metrics.web_config_file)
            except (OSError, ValueError, SourceError) as exc:
                log.error("metrics web config not reloaded, keeping the old one: %s", exc)
        self._install_rules(ruleset)
        log.info("reloaded: %d rules from %d files", len(ruleset), len(ruleset.sources))
        return True

    # --- start-up -----------------------------------------------------------

    def attach(self, sensor: Sensor, mode: str) -> None:
        self.sensor = sensor
        self.sensor_mode = mode
        if self.metrics is not None:
            self.metrics.set_sensor(mode)

    def seed(self) -> int:
        """Read every live process after the sensor is attached, so nothing
        starts unseen; evaluate them like a scan (pre-existing offenders
        are alerted on too)."""
        snapshot = take_snapshot(self.config.attribution.env_keys)
        for info in snapshot.table:
            self.table.add(info)
        own = os.getpid()
        for info in snapshot.table:
            if info.pid == own:
                continue
            subject = subject_for(snapshot, info, self.ssh_config)
            self.socket_stdio.remember(info.key, subject.stdio)
            if subject.connections:
                self._connections[info.key] = deque(subject.connections[-CONNECTIONS_PER_PROCESS:])
            self.raise_alerts(self.engine.evaluate(subject))
        if self.metrics is not None:
            self.metrics.event("procfs", len(snapshot.table))
        return len(snapshot.table)

    # --- events -------------------------------------------------------------

    def handle(self, event: Any) -> None:
        self.events_seen += 1
        self._dispatch(event)

    def _dispatch(self, event: Any) -> None:
        route = self._routes.get(type(event))
        if route is not None:
            source, handler = route
            self._count(source)
            handler(event)

    def _count(self, source: str) -> None:
        if self.metrics is not None:
            self.metrics.event(source)

    def _start_ticks(self, pid: int, fallback_ns: int) -> int:
        ticks = self._fork_ticks.get(pid)
        return ticks if ticks is not None else boottime_ns_to_ticks(fallback_ns)

    def on_fork(self, event: ForkEvent) -> None:
        """Until it execs, a child is its parent's image under a new identity
        (a subshell in a probe loop connects without ever exec'ing)."""
        ticks = event.child_start_ticks
        self._fork_ticks[event.child_pid] = ticks
        parent = self.table.by_pid(event.parent_pid)
        if parent is not None:
            key = ProcessKey(event.child_pid, ticks)
            self.table.add(replace(parent, key=key, ppid=parent.pid, pre_existing=False))

    def _same_identity(self, info: ProcessInfo) -> ProcessInfo:
        """/proc's start time for a process first known from its fork event
        may differ from the fork timestamp's by one clock tick: same process."""
        known = self.table.by_pid(info.pid)
        if (
            known is not None
            and known.key != info.key
            and abs(known.key.start_time - info.key.start_time) <= 1
        ):
            return replace(info, key=known.key)
        return info

    def on_exec(self, event: ExecEvent) -> None:
        truncated = getattr(event, "argv_truncated", False)
        info = self._exec_of_known_fork(event, truncated)
        if info is None:
            info = self._exec_from_proc(event, truncated)
        self._fork_ticks.pop(event.pid, None)
        self.table.add(info)
        self._connections.pop(info.key, None)
        subject = Subject(
            info,
            lambda: self.table.lineage(info),
            [],
            lambda: self._exec_stdio(info),
            self.socket_stdio.of,
            ssh_forwards=self.ssh_config.forwards,
            read_config=procfs.read_config_file,
        )
        self.raise_alerts(self.engine.evaluate(subject))

    def _exec_of_known_fork(self, event: ExecEvent, truncated: bool) -> ProcessInfo | None:
        """The fast path (an exec storm must not make the daemon read all of
        /proc/PID per exec): a child we saw forked keeps its identity, cwd
        and user across exec; only the new image (exe link, from the
        kernel's argv) and the cgroup (runtimes move a child before they
        exec it) are read. None when a full read is needed."""
        forked = self.table.by_pid(event.pid)
        if (
            forked is None
            or event.pid not in self._fork_ticks
            or truncated
            or not event.argv
            or self.config.attribution.env_keys  # the environment changes at exec
        ):
            return None
        image = procfs.read_image(event.pid)
        if image is None:
            return None  # gone already: the slow path reconstructs it
        exe, cgroup = image
        exe = exe or event.filename  # unreadable link: the path the kernel executed
        attribution = forked.attribution
        if cgroup != forked.cgroup:
            attribution = attribute(cgroup)
        uid = event.uid if event.uid >= 0 else forked.uid
        return replace(
            forked,
            exe=exe,
            cmdline=event.argv,
            comm=event.comm or forked.comm,
            cgroup=cgroup,
            attribution=attribution,
            uid=uid,
            user=procfs.user_name(uid) if uid != forked.uid else forked.user,
        )

    def _exec_from_proc(self, event: ExecEvent, truncated: bool) -> ProcessInfo:
        info = procfs.read_process(event.pid, self.config.attribution.env_keys)
        if info is not None:
            info = self._same_identity(info)
            if event.argv and not truncated and info.cmdline != event.argv:
                # the kernel's argv is what was executed; /proc may already
                # show a rewritten title or a later exec
                info = replace(info, cmdline=event.argv)
            return info
        return self._from_event(event)

    def _from_event(self, event: ExecEvent) -> ProcessInfo:
        """The process exited before /proc could be read: what the kernel
        told us, plus what its parent tells about its context."""
        parent = self.table.by_pid(event.ppid) if event.ppid else None
        uid = event.uid if event.uid >= 0 else (parent.uid if parent else -1)
        return ProcessInfo(
            key=ProcessKey(event.pid, self._start_ticks(event.pid, event.timestamp_ns)),
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

    def _exec_stdio(self, info: ProcessInfo) -> dict[int, Endpoint]:
        """A new program's socket stdio (read only when a rule asks), kept
        for the lineage of what it spawns."""
        stdio = self.stdio_of_pid(info.pid)
        self.socket_stdio.remember(info.key, stdio)
        return stdio

    def connections_of(self, info: ProcessInfo) -> tuple[Endpoint, ...]:
        return tuple(self._connections.get(info.key, ()))

    def stdio_of_pid(self, pid: int) -> dict[int, Endpoint]:
        """fd (0, 1, 2) -> the inet socket it is, read from /proc now."""
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
        if fresh or time.monotonic() - taken > 0.2:
            cached = sockdiag.by_inode(sockdiag.list_sockets(owned_only=True))
            self._socket_cache = (time.monotonic(), cached)
        return cached

    def resolve(self, pid: int) -> ProcessInfo | None:
        """The table's process for pid, else read it from /proc now."""
        info = self.table.by_pid(pid)
        if info is not None:
            return info
        info = procfs.read_process(pid, self.config.attribution.env_keys)
        if info is not None:
            self.table.add(info)
        return info

    def _unattributed(self, pid: int, comm: str, timestamp_ns: int) -> ProcessInfo:
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

    def on_connect(self, event: ConnectEvent) -> None:
        info = self.resolve(event.pid)
        if info is None:
            self._park(event)
            return
        ep = event.endpoint
        if not ep.is_loopback and ep.daddr not in ("0.0.0.0", "::"):
            info = rename.on_first_external_connect(self, info)
        if event.outcome == CONNECT_ATTEMPT or is_peer(ep) or ep.dport:
            peers = self._connections.setdefault(info.key, deque(maxlen=CONNECTIONS_PER_PROCESS))
            if all((p.daddr, p.dport) != (ep.daddr, ep.dport) for p in peers):
                peers.append(ep)
                subject = Subject(
                    info,
                    lambda: self.table.lineage(info),
                    list(peers),
                    stdio_of=self.socket_stdio.of,
                    exe=lambda: rename.exe_now(info),  # deleted since exec?
                )
                self.raise_alerts(self.engine.evaluate(subject, trigger=ep, network_only=True))
        if self.fanout:
            parent = self.table.parent(info)
            for detector in self.fanout:
                for verdict, blamed in detector.observe(
                    info, parent, ep.daddr, ep.dport, event.outcome
                ):
                    lineage = tuple(self.table.lineage(blamed))
                    self.raise_alert(Finding(verdict.rule, blamed, verdict.reason, lineage, ep))

    def on_exit(self, event: ExitEvent) -> None:
        self._fork_ticks.pop(event.pid, None)
        info = self.table.exit(event.pid)
        if info is not None:
            self._connections.pop(info.key, None)
            self.socket_stdio.forget(info.key)
            self.externally_connected.discard(info.key)
            for detector in self.fanout:
                detector.forget(info)

    def on_gpu_open(self, event: GpuOpenEvent) -> None:
        """Opening /dev/nvidia-uvm is CUDA creating a context: judge the
        process now, seconds before NVML lists it. NVML-only tools
        (nvidia-smi, exporters, rome-guard itself) open /dev/nvidiactl and
        /dev/nvidiaN but never the UVM device."""
        info = self.resolve(event.pid)
        if info is None or not event.path.startswith("/dev/nvidia-uvm") or self.gpu is None:
            return
        index = -1
        device = GpuProcess(event.pid, index, "", None, None, None)
        self._judge_gpu(device, info, source="open")

    def _judge_gpu(self, device: GpuProcess, info: ProcessInfo | None, source: str) -> None:
        if not self.gpu_rules:
            return
        lineage = self.table.lineage(info) if info is not None else []
        if source == "open":
            # no GPU is known yet: any grant on any GPU covers the process
            covered = self.gpu.registry.covering(info, lineage, GpuRef(-1, "", None))
            if covered is not None:
                return
            ancestor = self.gpu.registry.registered_ancestor(lineage)
            detail = "opened /dev/nvidia-uvm (creating a CUDA context) and is not registered"
            if ancestor is not None:
                job = one_line(ancestor[0].name, 64)
                detail += f"; it descends from job {job!r}, registered without --include-children"
            reason, verdict_info = UNREGISTERED, info
        else:
            verdict = judge_consumer(device, info, lineage, self.gpu.registry)
            if verdict.reason not in (UNREGISTERED, NOT_GRANTED):
                return
            reason, detail, verdict_info = verdict.reason, verdict.detail, verdict.info
        if verdict_info is None:
            return
        earlier = self._gpu_alerts.pop(verdict_info.key, None) if source == "nvml" else None
        if earlier is not None:
            self._confirm_gpu(earlier, verdict_info, device)
            return
        for rule in self.gpu_rules:
            finding = Finding(
                rule,
                verdict_info,
                detail,
                tuple(lineage),
                gpu=device,
                extra={"gpu_verdict": reason, "gpu_source": source},
            )
            record = self.raise_alert(finding)
            if record is not None and source == "open":
                # the incident's alert, also when this hit joined one as an update
                self._gpu_alerts[verdict_info.key] = (record.get("alert_id", record["id"]), rule.id)

    def _confirm_gpu(self, alert: tuple[str, str], info: ProcessInfo, device: GpuProcess) -> None:
        """NVML now lists the process an open event alerted on: record
        which GPU and how much memory, against the same alert."""
        self.journal.write(
            {
                "event": "confirmed",
                "alert_id": alert[0],
                "rule": alert[1],
                "time": rfc3339(time.time()),
                "host": self.host,
                "process": {"pid": info.pid, "start_time": info.key.start_time},
                "gpu": gpu_record(device),
            }
        )

    def sync_loopback_filter(self) -> None:
        """Registered jobs in cgroups of their own (a container, pod or Slurm
        job) make thousands of loopback connects (rendezvous, NCCL
        bootstrap) that no rule needs: the kernel drops those, and only
        those, for their cgroups (config sensor_filter.ignore_registered_loopback)."""
        setter = getattr(self.sensor, "set_loopback_ignore_cgroups", None)
        if (
            setter is None
            or self.gpu is None
            or not self.config.sensor_filter.ignore_registered_loopback
        ):
            return
        from rome_guard.respond.prevent import PreventionError, cgroup_id

        ids = set()
        for registration in self.gpu.registry.registrations():
            info = self.table.get(registration.key)
            att = info.attribution if info is not None else None
            if att is None or not (att.container_id or att.pod_uid or att.slurm_job):
                continue  # a shared cgroup (a user session, a system service): keep everything
            try:
                ids.add(cgroup_id(info.cgroup))
            except (OSError, PreventionError):
                continue
        if ids != self._loopback_ignored:
            setter(ids)
            self._loopback_ignored = ids

    def on_gpu_snapshot(self, snapshot: Any) -> None:
        if self.gpu.registry.refresh():
            self.sync_loopback_filter()
        if self.metrics is not None:
            self.metrics.event("nvml", len(snapshot.processes))
        allowed: set[tuple[int, str, int]] = set()
        for device in snapshot.processes:
            info = self.resolve(device.pid)
            lineage = self.table.lineage(info) if info is not None else []
            verdict = judge_consumer(device, info, lineage, self.gpu.registry)
            if verdict.allowed:
                allowed.add((device.gpu_index, device.gpu_uuid, device.pid))
            else:
                self._judge_gpu(device, info, source="nvml")
        if self.metrics is not None:
            gpus = [(d.index, d.uuid) for d in snapshot.devices]
            self.metrics.set_gpu_usage(
                gpu_usage(
                    snapshot.processes, lambda p: (p.gpu_index, p.gpu_uuid, p.pid) in allowed, gpus
                )
            )

    def on_prevention(self, event: Any) -> None:
        """The kernel denied a connect or killed at exec: journal it with the
        rule that asked for it and what the kernel did."""
        info = self.resolve(event.pid) or self._unattributed(
            event.pid, event.comm, event.timestamp_ns
        )
        if event.filename:  # killed at exec: it died as the new program, not its parent's copy
            info = replace(info, comm=event.comm, exe=event.filename)
        rule = rule_for(self.policy, event) if self.policy is not None else None
        if rule is None:
            log.warning("kernel %s pid=%d with no matching rule", event.kind, event.pid)
            return
        connect = event.connect_event()
        finding = Finding(
            rule,
            info,
            f"in-kernel {event.action}: {event.kind}",
            tuple(self.table.lineage(info)),
            network=connect.endpoint if connect is not None else None,
        )
        record = finding_record(finding, event.action, time.time(), self.host)
        record.update(id=uuid.uuid4().hex, event="prevention", mode=self.config.mode)
        self.journal.write(record)
        if self.metrics is not None:
            self.metrics.alert(rule.id, rule.category, rule.severity, "block")
            if event.action == "blocked":
                self.metrics.blocked_connection()
            else:
                self.metrics.kill("killed")
        log.warning(
            "PREVENTED %s %s pid=%d %s", rule.id, event.action, event.pid, one_line(event.comm, 32)
        )
        if connect is not None:
            self.on_connect(connect)

    def _park(self, event: Any) -> None:
        self._parked.append(
            Parked(event, time.monotonic() + self.config.sensor_filter.park_unknown_ms / 1000)
        )

    def retry_parked(self) -> None:
        now = time.monotonic()
        for _ in range(len(self._parked)):
            parked = self._parked.popleft()
            pid = getattr(parked.event, "pid", None)
            if pid is not None and self.table.by_pid(pid) is not None:
                self._dispatch(parked.event)
            elif parked.until > now:
                self._parked.append(parked)
            else:
                self.lost["parked"] = self.lost.get("parked", 0) + 1
                if self.metrics is not None:
                    self.metrics.lost("parked")
                log.warning(
                    "event for unknown pid %s dropped after %d ms",
                    pid,
                    self.config.sensor_filter.park_unknown_ms,
                )

    # --- alerts and responses ----------------------------------------------

    def raise_alert(self, finding: Finding) -> dict | None:
        """One finding (see raise_alerts); the record of its incident when
        it was new, else None."""
        records = self.raise_alerts([finding])
        return records[0] if records else None

    def raise_alerts(self, findings: list[Finding]) -> list[dict]:
        """Journal the findings (durably), count them, then respond. Each
        (rule, process image) counts once; findings on one process in one
        category within the incident window make one incident: one alert
        record listing every rule, later rules as incident_update records,
        one kill. Returns the incident alert record of each group filed."""
        fresh = []
        for finding in findings:
            # once per (rule, process image): an exec into a new program under
            # the same identity (pyenv shims, wrappers) is judged afresh
            key = (finding.rule.id, finding.process.key, finding.process.exe)
            if key in self._alerted:
                continue
            if len(self._alerted) >= ALERTED_LIMIT:
                self._alerted.clear()
            self._alerted.add(key)
            fresh.append(finding)
        if not fresh:
            return []
        records = []
        for filed in self.incidents.file(fresh, time.monotonic()):
            records.append(self._journal_incident(filed))
        return records

    def _journal_incident(self, filed: Filed) -> dict:
        incident = filed.incident
        killer = kill_rule_finding(filed.findings)
        enforce = (
            self.config.mode == "enforce"
            and killer is not None
            and self.killer is not None
            and not incident.responded
        )
        lead = primary(filed.findings) if filed.opened else filed.findings[0]
        record = finding_record(lead, "kill" if enforce else "alert", time.time(), self.host)
        record["mode"] = self.config.mode
        record["rules"] = rules_record(incident.findings)
        if "network" not in record:  # the peer another of its rules saw
            peer = next((f.network for f in filed.findings if f.network is not None), None)
            if peer is not None:
                record["network"] = network_record(peer)
        if filed.opened:
            record["id"] = incident.id
            record["event"] = "alert"
        else:
            record["id"] = uuid.uuid4().hex
            record["event"] = "incident_update"
            record["alert_id"] = incident.id
        self.journal.write(record)  # durable before anything acts on it
        if filed.opened:
            self.alerts_raised += 1
        action = "kill" if enforce else "alert"
        if self.metrics is not None:
            if filed.opened:
                self.metrics.incident(lead.rule.category, lead.rule.severity, action)
            for finding in filed.findings:
                rule = finding.rule
                self.metrics.alert(rule.id, rule.category, rule.severity, action)
        log.warning(
            "%s %s %s pid=%d user=%s %s: %s",
            "ALERT" if filed.opened else "ALERT+",
            lead.rule.severity,
            "+".join(f.rule.id for f in filed.findings),
            lead.process.pid,
            one_line(lead.process.user, 32),
            command_line(lead.process.cmdline or (lead.process.comm,), 160),
            one_line("; ".join(f.reason for f in filed.findings), 300),
        )
        if enforce:
            incident.responded = True  # the kill happens once per incident
            self.respond(killer, record)
        return record

    def respond(self, finding: Finding, alert: dict) -> None:
        rule: Rule = finding.rule
        descendants = self.table.descendants(finding.process) if rule.kill_scope == "tree" else []
        result = self.killer.kill(finding.process, rule.kill_scope, descendants)
        outcome = dict(alert)
        outcome.update(
            event="response",
            alert_id=alert["id"],
            id=uuid.uuid4().hex,
            action=result.outcome,
            response={"scope": rule.kill_scope, "reason": result.reason, "pids": list(result.pids)},
        )
        self.journal.write(outcome)
        if self.metrics is not None:
            self.metrics.kill(result.outcome)
        log.warning(
            "RESPONSE %s %s pid=%d: %s %s",
            rule.id,
            rule.kill_scope,
            finding.process.pid,
            result.outcome,
            one_line(result.reason, 200),
        )

    # --- the loop -----------------------------------------------------------

    def request_stop(self, *_args: Any) -> None:
        self._stop.set()

    def request_reload(self, *_args: Any) -> None:
        self._reload.set()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": self.host,
            "mode": self.config.mode,
            "sensor": self.sensor_mode,
            "rules": len(self.ruleset),
            "processes_tracked": len(self.table),
            "events": self.events_seen,
            "alerts": self.alerts_raised,
            "events_lost": dict(self.lost),
            "time": time.time(),
        }

    def check_lost(self) -> None:
        if self.sensor is None:
            return
        totals = dict(self.sensor.lost_events())
        if self.prevention is not None:
            totals["prevention"] = self.prevention.lost_events()
        for buffer, total in totals.items():
            previous = self.lost.get(buffer, 0)
            if total > previous:
                log.error(
                    "LOST %d events in the %s ring buffer (total %d)",
                    total - previous,
                    buffer,
                    total,
                )
            self.lost[buffer] = total
            if self.metrics is not None:
                self.metrics.set_lost(buffer, total)

    def housekeeping(self) -> None:
        self.retry_parked()
        self.table.expire()
        self.check_lost()
        if self.metrics is not None:
            self.metrics.set_processes_tracked(len(self.table))
        if len(self._fork_ticks) > 65536:
            self._fork_ticks.clear()

    def run(self, notifier: Any, status_path: str | None = None) -> None:
        """Drain events until SIGTERM/SIGINT."""
        assert self.sensor is not None
        next_watchdog = next_status = time.monotonic()
        while not self._stop.is_set():
            for event in self.sensor.poll(100):
                self.handle(event)
            if self.prevention is not None:
                for event in self.prevention.poll(0):
                    self.on_prevention(event)
            if self.gpu is not None:
                for snapshot in self.gpu.snapshots():
                    self.on_gpu_snapshot(snapshot)
            if self._reload.is_set():
                self._reload.clear()
                notifier.reloading()
                self.reload()
                notifier.ready(self.status_line())
            now = time.monotonic()
            if self._parked or now >= next_status:
                self.housekeeping()
            if notifier.watchdog_interval_s and now >= next_watchdog:
                notifier.watchdog()
                next_watchdog = now + notifier.watchdog_interval_s
            if now >= next_status:
                next_status = now + STATUS_EVERY_S
                notifier.status(self.status_line())
                if status_path:
                    write_status(status_path, self.status())

    def status_line(self) -> str:
        lost = sum(self.lost.values())
        return (
            f"{self.config.mode} mode, {self.sensor_mode} sensor, {len(self.ruleset)} rules, "
            f"{len(self.table)} processes, {self.alerts_raised} alerts, {lost} events lost"
        )


def write_status(path: str, status: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def setup_logging(level: int = logging.INFO) -> None:
    """One line per event on stderr; messages are built with textsafe so a
    hostile argv cannot forge a line."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger("rome_guard")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _responders(config: Config) -> tuple[Any, Any]:
    """The killer and the kernel prevention, in enforce mode only. Stale
    attachments of a crashed daemon are removed in every mode: a crash must
    never leave the host unable to connect."""
    from rome_guard.respond import prevent

    try:
        for removed in prevent.cleanup_stale():
            log.warning("removed a stale attachment left by a crashed rome-guard: %s", removed)
    except OSError as exc:  # no BPF syscalls here (container, no privileges)
        log.warning("cannot look for stale attachments: %s", exc)
    if config.mode != "enforce":
        return None, None
    from rome_guard.respond.kill import Killer

    killer = Killer(config.protect, mode="enforce")
    prevention = prevent.Prevention("enforce")
    try:
        prevention.start()
    except Exception as exc:  # no cgroup2, no BPF: user-space kills still work
        log.error("in-kernel prevention unavailable, killing from user space only: %s", exc)
        prevention.close()
        return killer, None
    for line in getattr(prevention, "degraded", ()) or ():
        log.warning("prevention: %s", line)
    return killer, prevention


def _gpu_watch(config: Config) -> Any:
    from rome_guard.gpu.watch import GpuWatch

    try:
        return GpuWatch(config)
    except SourceError as exc:
        log.error("invalid gpu.allow, GPU checks off:\n%s", exc)
        return None


def main(config: Config, extra_rules: tuple[str, ...], metrics_addr: str | None) -> int:
    """The daemon's whole life; returns the exit status."""
    from rome_guard.sdnotify import Notifier

    setup_logging()
    notifier = Notifier()
    try:
        ruleset = rules_for(replace(config, rules=list(config.rules) + list(extra_rules)))
    except SourceError as exc:
        log.error("invalid rules, not starting:\n%s", exc)
        return 2
    journal = Journal(config.alerts_file)
    metrics = server = None
    addr = config.metrics.addr if metrics_addr is None else metrics_addr
    try:
        from rome_guard.respond.metrics import GuardMetrics

        metrics = GuardMetrics()
        server = metrics.serve(addr, config.metrics.web_config_file) if addr else None
    except OSError as exc:
        log.error("cannot serve metrics on %s: %s", addr, exc)
        return 2
    killer, prevention = _responders(config)
    gpu = _gpu_watch(config)
    guard = Guard(
        config, ruleset, journal, extra_rules, metrics, killer, gpu=gpu, prevention=prevention
    )
    guard.metrics_server = server
    signal.signal(signal.SIGTERM, guard.request_stop)
    signal.signal(signal.SIGINT, guard.request_stop)
    signal.signal(signal.SIGHUP, guard.request_reload)
    try:
        sensor, mode, degraded = open_sensor(config.sensor, (os.getpid(),))
    except SensorUnavailable as exc:
        log.error("--sensor ebpf: %s", exc)
        return 2
    if degraded:
        log.warning(
            "DEGRADED COVERAGE: eBPF sensor unavailable (%s); polling /proc and sock_diag "
            "every %.1fs -- short-lived processes and connections will be missed",
            degraded,
            getattr(sensor, "interval_s", 0.5),
        )
    for line in getattr(sensor, "degraded", ()) or ():
        log.warning("sensor: %s", line)
    guard.attach(sensor, mode)
    if gpu is not None:
        gpu.start()
    status_path = None
    try:
        os.makedirs(config.run_dir, exist_ok=True)
        status_path = os.path.join(config.run_dir, "status.json")
    except OSError as exc:
        log.warning("no status file: %s", exc)
    try:
        seeded = guard.seed()
        log.info(
            "rome-guard running: %s mode, %s sensor, %d rules, %d pre-existing processes, "
            "alerts to %s%s",
            config.mode,
            mode,
            len(ruleset),
            seeded,
            config.alerts_file,
            f", metrics on {addr}" if server else "",
        )
        if status_path:
            write_status(status_path, guard.status())
        notifier.ready(guard.status_line())
        guard.run(notifier, status_path)
    finally:
        notifier.stopping()
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        sensor.close()
        if prevention is not None:
            prevention.close()
        if gpu is not None:
            gpu.close()
        if server is not None:
            server.close()
        journal.close()
        if status_path:
            with contextlib.suppress(OSError):
                os.unlink(status_path)
        log.info(
            "rome-guard stopped (%.2fs to detach)",
            SHUTDOWN_BUDGET_S - (deadline - time.monotonic()),
        )
    return 0
