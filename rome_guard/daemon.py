"""`rome-guard run`: the daemon that follows the host as it happens.

This module is wiring and the loop only. Data path, in the order an event
travels (docs/architecture.md has the picture):

    sensor (eBPF, or /proc polling), prevention, wire sensor, GPU watch
      -> handlers.table.dispatch -> handlers/<kind>.py
         -> state.processes.ProcessModel (every process fact, /proc gaps)
         -> detect (same rules as scan) -> respond.alerts.AlertSink
            -> journal (fsync; spooled in memory when the disk refuses)
               -> outputs (syslog, webhook, journald: queued, own threads)
            -> metrics -> Killer (enforce mode only)

The loop sleeps in one epoll over every ring buffer (kernel.poller): woken
by a record worth a wakeup, a signal or a GPU snapshot, it drains every
source, and drains again BATCH_MS later for as long as records keep coming;
with nothing to do it sleeps until its next timer (housekeeping, once a
second).

Start-up misses nothing: the sensor attaches first, then the model is
seeded from /proc (processes marked pre-existing) and evaluated, then
events are drained. The kernel's counters are read every COUNTERS_EVERY_S;
after any lost event they show, /proc is read again (at most every
RESYNC_EVERY_S, or four times what the last re-read took) and every live
process judged again, so a miner whose exec was lost is still caught; the
loss itself is journaled (events_lost).

This module never reads /proc (the process model does), never builds a
record (findings does), never kills by pid alone (the Killer verifies
identity through a pidfd) and never acts before the alert has been handed
to the journal (durable when the disk allows; a failing disk never stops a
response).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Iterable

from rome_guard import __version__
from rome_guard.config import Config, load_config
from rome_guard.detect.rules import RuleSet, rules_for
from rome_guard.findings import rejection_record
from rome_guard.handlers.connect import retry_parked
from rome_guard.handlers.context import Context, Rules, Sensor
from rome_guard.handlers.fd import judge_pending_shells
from rome_guard.handlers.table import dispatch
from rome_guard.kernel.loader import release_compiler_memory
from rome_guard.kernel.poller import BATCH_MS, RingPoller
from rome_guard.linux import in_host_pid_namespace
from rome_guard.respond import health
from rome_guard.respond.alerts import AlertSink, ProcessKiller
from rome_guard.respond.enforce import apply_policy
from rome_guard.respond.exposition import RETRY_S as METRICS_RETRY_S
from rome_guard.respond.exposition import MetricsEndpoint
from rome_guard.respond.journal import Journal, JournalError, open_journal, recent_alerts
from rome_guard.respond.metrics import MetricsSink, NullMetrics
from rome_guard.respond.outputs import Outputs
from rome_guard.sensors.poll import PollSensor
from rome_guard.siteconfig import Rejection, rejected_reload, usable_rules
from rome_guard.state.kernel_table import KernelProcessTable
from rome_guard.state.processes import ProcessModel
from rome_guard.status import WRITE_EVERY_S, own_start_ticks, rewrite_due, write_status
from rome_guard.textsafe import one_line
from rome_guard.yamlsrc import SourceError

if TYPE_CHECKING:
    from rome_guard.gpu.watch import GpuWatch
    from rome_guard.handlers.wire import WireHandler
    from rome_guard.respond.prevent import Prevention
    from rome_guard.sdnotify import Notifier
    from rome_guard.sensors.wire import WireSensor

log = logging.getLogger("rome_guard")

STATUS_EVERY_S = WRITE_EVERY_S  # housekeeping (what is pending: retries), the status file when due
COUNTERS_EVERY_S = 5.0  # the kernel's counters (lost events, its process table) and health
SHUTDOWN_BUDGET_S = 2.0
PULSE_EVERY_EVENTS = 1024  # within a batch, check the timers this often
RESYNC_EVERY_S = 2.0  # at most one /proc re-read per interval while events are lost


# eBPF programs report the kernel's (host) pids, and a pinned attachment is
# stale when its owner's pid is gone: both mean nothing to a guard whose
# /proc numbers processes in a PID namespace of its own (a container without
# hostPID, a systemd-nspawn machine). Such a guard polls /proc, kills from
# user space and leaves every BPF attachment alone.
CHILD_PID_NAMESPACE = (
    "this guard runs in a PID namespace of its own, where the kernel's pids are not "
    "its /proc's; run it in the host PID namespace (hostPID: true) for eBPF"
)


class SensorUnavailable(Exception):
    """The requested sensor cannot run here; the message says what is missing."""


def open_sensor(choice: str, ignore_pids: tuple[int, ...]) -> tuple[Sensor, str, str | None]:
    """Attach the sensor the config asks for. Returns it, its mode ("ebpf"
    or "poll") and, when polling, why eBPF is not in use."""
    if choice == "poll":
        sensor: Sensor = PollSensor(ignore_pids=ignore_pids)
        sensor.start()
        return sensor, "poll", "polling was requested (--sensor poll)"
    ebpf = None
    if not in_host_pid_namespace():
        reason: str | None = CHILD_PID_NAMESPACE
    else:
        try:
            from rome_guard.sensors import ebpf
        except ImportError as exc:  # bcc itself missing
            reason = f"the eBPF sensor cannot load: {exc}"
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


class Guard:
    """The daemon: its collaborators, the rules in force and the loop.
    Single-threaded: every event, timer and signal is handled in run()."""

    def __init__(
        self,
        config: Config,
        ruleset: RuleSet,
        journal: Journal,
        extra_rules: tuple[str, ...] = (),
        metrics: MetricsSink | None = None,
        killer: ProcessKiller | None = None,
        host: str | None = None,
        gpu: GpuWatch | None = None,
        prevention: Prevention | None = None,
    ):
        self.extra_rules = extra_rules
        self.journal = journal
        self.prevention = prevention
        self.metrics_endpoint: MetricsEndpoint | None = None  # retried, reloaded on SIGHUP
        self.outputs = Outputs()  # fixed at start (main); status shows them
        self.sensor_mode = "none"
        self.wire_sensor: WireSensor | None = None
        self.events_seen = 0
        self.started = time.time()
        self.rejected: list[Rejection] = []  # left out at start or at the last reload
        self._start_ticks_of_self = own_start_ticks()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._resync_due = False  # events were lost: re-read /proc at the next housekeeping
        self._next_resync = 0.0
        self._next_watchdog = self._next_status = self._next_counters = 0.0  # run()'s timers
        self._status_written = (0.0, -1)  # (when, events_seen then): status.rewrite_due
        self._poller: RingPoller | None = None  # while run() runs
        metrics = metrics if metrics is not None else NullMetrics()
        processes = ProcessModel(config.attribution.env_keys)
        alerts = AlertSink(
            journal,
            metrics,
            config.mode,
            host or socket.gethostname(),
            killer,
            processes.descendants,
        )
        rules = Rules.compile(ruleset, kernel_policy=prevention is not None)
        self.ctx = Context(config, processes, rules, alerts, metrics, gpu=gpu)
        self._install(rules, None)

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def ruleset(self) -> RuleSet:
        return self.ctx.rules.ruleset

    # --- rules --------------------------------------------------------------

    def _install(self, rules: Rules, old: Rules | None) -> None:
        if self.prevention is not None and rules.policy is not None:
            apply_policy(self.prevention, rules.policy, old.policy if old else None)
        self.ctx.rules = rules
        if self.ctx.wire is not None:
            self.ctx.wire.install(rules.ruleset)
        if self.ctx.sensor is not None:
            self.ctx.sensor.set_wake_names(rules.engine.exec_names)
            self.ctx.sensor.set_exec_needles(rules.engine.exec_needles)
        self.ctx.metrics.set_rules((r.id, r.category, r.severity) for r in rules.ruleset.rules)
        self.ctx.metrics.set_mode(self.ctx.config.mode)
        if rules.ruleset.staged:
            log.info(
                "kill rules staged in monitor mode (they alert, never kill): %s",
                ", ".join(rules.ruleset.staged),
            )
        self.rules_hash = health.rules_hash(rules.ruleset)
        self.ctx.metrics.set_build(self.rules_hash, health.config_hash(self.ctx.config))

    def reload(self) -> bool:
        """SIGHUP: reopen the journal (logrotate renamed it), re-read config
        and rules; keep the old set on any error."""
        self.journal.reopen()
        current = self.ctx.config
        try:
            config = load_config(current.source or None)
            ruleset = rules_for(replace(config, rules=list(config.rules) + list(self.extra_rules)))
        except SourceError as exc:
            log.error("reload rejected, keeping %d rules in force:\n%s", len(self.ruleset), exc)
            self.ctx.metrics.rule_reload_failed()
            self.report_rejected(rejected_reload(exc))
            return False
        except Exception as exc:  # noqa: BLE001 -- a reload must never end the guard
            log.error(
                "reload failed (%s: %s), keeping %d rules in force",
                type(exc).__name__,
                one_line(str(exc), 200),
                len(self.ruleset),
            )
            self.ctx.metrics.rule_reload_failed()
            return False
        # what was fixed at start (command-line overrides, open files, the
        # sensor, the outputs' threads) stays; rules, attribution, protection,
        # web config and the journal's rotation apply
        if config.outputs != current.outputs:
            log.warning("outputs changed in %s: they apply at the next restart", config.source)
        self.ctx.config = replace(
            config,
            mode=current.mode,
            sensor=current.sensor,
            alerts_file=current.alerts_file,
            run_dir=current.run_dir,
            state_dir=current.state_dir,
            outputs=current.outputs,
        )
        self.journal.set_rotation(config.journal.rotate_bytes, config.journal.keep)
        self.ctx.processes.env_keys = tuple(self.ctx.config.attribution.env_keys)
        if self.metrics_endpoint is not None:
            try:
                self.metrics_endpoint.reload(self.ctx.config.metrics.web_config_file)
            except (OSError, ValueError, SourceError) as exc:
                log.error("metrics web config not reloaded, keeping the old one: %s", exc)
        self._install(Rules.compile(ruleset, self.prevention is not None), self.ctx.rules)
        self.report_rejected([])
        log.info("reloaded: %d rules from %d files", len(ruleset), len(ruleset.sources))
        return True

    def report_rejected(self, rejected: list[Rejection]) -> None:
        """What was left out: logged, journaled, counted, in the status."""
        self.rejected = list(rejected)
        self.ctx.metrics.set_config_rejected(len(self.rejected))
        for rejection in self.rejected:
            log.error(
                "DEGRADED: left out %s of %s, running without it:\n%s",
                rejection.what,
                rejection.path,
                "\n".join(rejection.lines()),
            )
            self.journal.write(rejection_record(rejection, self.config.mode, self.ctx.alerts.host))

    # --- start-up -----------------------------------------------------------

    def attach(self, sensor: Sensor, mode: str) -> None:
        self.ctx.sensor = sensor
        sensor.set_wake_names(self.ctx.rules.engine.exec_names)
        sensor.set_exec_needles(self.ctx.rules.engine.exec_needles)
        maps = getattr(sensor, "process_table_maps", lambda: None)()
        if maps is not None:  # the eBPF sensor: benign execs stay in its process table
            self.ctx.processes.kernel = KernelProcessTable(maps)
        self.sensor_mode = mode
        self.ctx.metrics.set_sensor(mode)

    def attach_wire(self, sensor: WireSensor) -> WireHandler:
        """Route the wire sensor's events (handlers/wire.py); its drop
        tables follow the rules in force from now on."""
        from rome_guard.handlers.wire import WireHandler

        self.wire_sensor = sensor
        self.ctx.wire = WireHandler.for_context(self.ctx, sensor)
        self.ctx.wire.install(self.ctx.rules.ruleset)
        return self.ctx.wire

    def remember_alerts(self, keys: Iterable[tuple[str, int, int, str]]) -> None:
        """Alerts the previous daemon fully handled (journal.recent_alerts):
        a restart does not alert on the same process again."""
        self.ctx.alerts.remember(keys)

    def seed(self, resync: bool = False) -> int:
        """Read every live process after the sensor is attached; evaluate
        them like a scan (pre-existing offenders are alerted on too).
        resync: the re-read after lost events (ProcessModel.seed); every
        live process is judged again, each (rule, process) still alerts once."""
        for subject in self.ctx.processes.seed(self.ctx.ssh, resync=resync):
            self.ctx.alerts.raise_alerts(self.ctx.rules.engine.evaluate(subject))
        count = len(self.ctx.processes)
        self.ctx.metrics.event("procfs", count)
        return count

    # --- the loop -----------------------------------------------------------

    def handle(self, event: object) -> None:
        self.events_seen += 1
        dispatch(self.ctx, event)

    def request_stop(self, *_args: Any) -> None:
        self._stop.set()
        self.wake()

    def request_reload(self, *_args: Any) -> None:
        self._reload.set()
        self.wake()

    def wake(self) -> None:
        """Make run() look at every source now (any thread, signal handlers)."""
        if self._poller is not None:
            self._poller.wake()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "start_ticks": self._start_ticks_of_self,
            "version": __version__,
            "started": self.started,
            "host": self.ctx.alerts.host,
            "mode": self.config.mode,
            "sensor": self.sensor_mode,
            "rules": len(self.ruleset),
            "processes_tracked": len(self.ctx.processes),
            "events": self.events_seen,
            "alerts": self.ctx.alerts.raised,
            "events_lost": dict(self.ctx.lost),
            "config_rejected": [r.to_status() for r in self.rejected],
            "metrics_unavailable": (
                self.metrics_endpoint.unavailable if self.metrics_endpoint is not None else None
            ),
            "gpu": self.ctx.gpu.status() if self.ctx.gpu is not None else None,
            "wire": self.wire_status(),
            "ssh_config": self.ctx.ssh.status(),
            "journal": {**asdict(self.journal.state()), "rotations": self.journal.rotations},
            "outputs": [asdict(state) for state in self.outputs.states()],
            "rules_hash": self.rules_hash,
            "time": time.time(),
        }

    def wire_status(self) -> dict[str, Any] | None:
        """The client streams the wire sensor follows now, and the flows
        whose stream a bound cut (bytes, segments, time): what no rule saw."""
        if self.wire_sensor is None or self.ctx.wire is None:
            return None
        streams = self.ctx.wire.streams
        return {
            "streams_open": len(streams),
            "streams_evicted": streams.evicted,
            "streams_cut": self.wire_sensor.stream_cuts(),
        }

    def check_lost(self) -> None:
        sensor = self.ctx.sensor
        if sensor is None:
            return
        totals = dict(sensor.lost_events())
        if self.prevention is not None:
            totals["prevention"] = self.prevention.lost_events()
        if self.wire_sensor is not None:
            totals.update(self.wire_sensor.lost_events())
        if self.ctx.parked_dropped:
            totals["parked"] = self.ctx.parked_dropped
        if self.ctx.failed_events:
            totals["failed"] = self.ctx.failed_events
        lost = self.ctx.lost
        new: dict[str, int] = {}
        for buffer, total in totals.items():
            previous = lost.get(buffer, 0)
            if total > previous:
                new[buffer] = total - previous
                log.error(
                    "LOST %d events in the %s buffer (total %d)",
                    total - previous,
                    buffer,
                    total,
                )
            lost[buffer] = total
            self.ctx.metrics.set_lost(buffer, total)
        if new:
            self._resync_due = True
            # the gap is evidence too: an auditor reading the journal must
            # know that events went unseen, where and how many
            self.ctx.alerts.events_lost(new, lost)

    def housekeeping(self) -> None:
        """What is pending, once a second: each step costs nothing when
        nothing waits (a spooled record, a metrics address, a /proc re-read,
        parked connects, shells to judge, kills to retry)."""
        self.journal.retry()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.retry()
        if self._resync_due and time.monotonic() >= self._next_resync:
            self._resync_due = False
            started = time.monotonic()
            judged = self.seed(resync=True)
            took = time.monotonic() - started
            # a big host under a long flood: the re-read takes at most ~1/5 of the time
            self._next_resync = time.monotonic() + max(RESYNC_EVERY_S, 4 * took)
            log.warning(
                "events were lost: re-read /proc and judged %d live processes in %.2fs",
                judged,
                took,
            )
        retry_parked(self.ctx)
        judge_pending_shells(self.ctx)
        self.ctx.alerts.retry_kills()

    def read_counters(self) -> None:
        """Every COUNTERS_EVERY_S: the kernel's counters (lost events, whose
        news journals the gap and re-reads /proc at the next housekeeping;
        the process table's bounds), exited processes forgotten, and the
        health series. Reading the counters takes a system call per map and
        program, so an idle daemon does not read them every second."""
        self.ctx.processes.expire()
        self.check_lost()
        self.ctx.metrics.set_processes_tracked(len(self.ctx.processes))
        self.export_health()

    def export_health(self) -> None:
        """The health series (kernel table, ssh -G, stdio relay deferrals, sensors up,
        NVML errors): at start, so that they exist from the first scrape, and with the
        kernel's counters (read_counters)."""
        if self.ctx.processes.kernel is not None:
            self.ctx.metrics.set_kernel_table(self.ctx.processes.kernel.stats())
        self.ctx.metrics.set_ssh_config(self.ctx.ssh.runs, self.ctx.ssh.unknown)
        self.ctx.metrics.set_stdio_deferred(self.ctx.processes.stdio_graph.deferred)
        gpu = self.ctx.gpu
        for sensor, up in health.sensors_up(self.sensor_mode, self.wire_sensor is not None, gpu):
            self.ctx.metrics.set_sensor_up(sensor, up)
        if gpu is not None:
            self.ctx.metrics.set_nvml_errors(gpu.sensor.error_counts())

    def run(self, notifier: Notifier, status_path: str | None = None) -> None:
        """Drain events until SIGTERM/SIGINT."""
        sensor, gpu = self.ctx.sensor, self.ctx.gpu
        assert sensor is not None
        poller = self._poller = RingPoller()
        for source in (sensor, self.prevention, self.wire_sensor):
            if source is not None:
                poller.watch(source.ring_fds())
        self._next_watchdog = self._next_status = self._next_counters = time.monotonic()
        busy = True
        try:
            while not self._stop.is_set():
                poller.wait(self._wait_ms(busy, notifier))
                busy = self._drain(sensor, notifier, status_path)
                if gpu is not None:
                    for snapshot in gpu.snapshots():
                        dispatch(self.ctx, snapshot)
                if self._reload.is_set():
                    self._reload.clear()
                    notifier.reloading()
                    self.reload()
                    notifier.ready(self.status_line())
                self.pulse(notifier, status_path)
        finally:
            self._poller = None
            poller.close()

    def _drain(self, sensor: Sensor, notifier: Notifier, status_path: str | None) -> bool:
        """Every ring's records, in one pass; True when there were any."""
        count = 0
        for count, event in enumerate(sensor.poll(0), 1):
            if self._stop.is_set():  # SIGTERM within a flood's backlog: stop now
                break
            self.handle(event)
            if count % PULSE_EVERY_EVENTS == 0:  # a full ring's backlog takes seconds
                self.pulse(notifier, status_path)
        if self.prevention is not None:
            for event in self.prevention.poll(0):
                count += 1
                dispatch(self.ctx, event)
        if self.wire_sensor is not None:
            for event in self.wire_sensor.poll(0):
                count += 1
                self.handle(event)
        return count > 0

    def _wait_ms(self, busy: bool, notifier: Notifier) -> int:
        """How long run() may sleep: BATCH_MS after a drain that found
        records (quiet ones may be waiting), while connects are parked, or
        when no ring can wake it (the /proc sensor); else until the next
        timer."""
        if busy or self.ctx.parked or self._poller is None or not self._poller.watching:
            return BATCH_MS
        due = self._next_status
        if notifier.watchdog_interval_s:
            due = min(due, self._next_watchdog)
        renew = self.wire_sensor.heartbeat_in_s() if self.wire_sensor is not None else None
        if renew is not None:  # enforcing: the kernel drops only while the deadline is fresh
            due = min(due, time.monotonic() + renew)
        return max(0, math.ceil((due - time.monotonic()) * 1000))

    def pulse(self, notifier: Notifier, status_path: str | None) -> None:
        """The timers: the kernel's counters (lost events), housekeeping
        (retries, the /proc re-read lost events trigger), the watchdog and
        the status file, when due; also between chunks of a large batch, so
        that a flood neither trips the watchdog nor leaves the status stale."""
        now = time.monotonic()
        if now >= self._next_counters:
            self._next_counters = now + COUNTERS_EVERY_S
            self.read_counters()
        if self.ctx.parked or now >= self._next_status:
            self.housekeeping()
        if notifier.watchdog_interval_s and now >= self._next_watchdog:
            notifier.watchdog()
            self._next_watchdog = now + notifier.watchdog_interval_s
        if now >= self._next_status:
            self._next_status = now + STATUS_EVERY_S
            written_at, events = self._status_written
            if rewrite_due(now - written_at, self.events_seen - events):
                self._status_written = (now, self.events_seen)
                notifier.status(self.status_line())
                if status_path:
                    write_status(status_path, self.status())

    def status_line(self) -> str:
        lost = sum(self.ctx.lost.values())
        return (
            f"{self.config.mode} mode, {self.sensor_mode} sensor, {len(self.ruleset)} rules, "
            f"{len(self.ctx.processes)} processes, {self.ctx.alerts.raised} alerts, "
            f"{lost} events lost"
        )


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


def _responders(config: Config) -> tuple[ProcessKiller | None, Prevention | None]:
    """The killer and the kernel prevention, in enforce mode only. Stale
    attachments of a crashed daemon are removed in every mode: a crash must
    never leave the host unable to connect."""
    from rome_guard.kernel import stale
    from rome_guard.respond import prevent

    if not in_host_pid_namespace():
        log.warning("DEGRADED: no in-kernel prevention, no stale clean-up: %s", CHILD_PID_NAMESPACE)
        if config.mode != "enforce":
            return None, None
        from rome_guard.respond.kill import Killer

        return Killer(config.protect, mode="enforce"), None
    try:
        for removed in stale.cleanup_stale():
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
    for line in prevention.degraded:
        log.warning("prevention: %s", line)
    return killer, prevention


def _wire_sensor() -> WireSensor | None:
    """The wire sensor, or None (and a DEGRADED line) where it cannot run."""
    from rome_guard.sensors.wire import open_wire_sensor

    if not in_host_pid_namespace():
        log.warning("DEGRADED COVERAGE: no wire sensor: %s", CHILD_PID_NAMESPACE)
        return None
    return open_wire_sensor()


def _gpu_watch(config: Config) -> GpuWatch | None:
    from rome_guard.gpu.watch import GpuWatch

    try:
        return GpuWatch(config)
    except SourceError as exc:
        log.error("invalid gpu.allow, GPU checks off:\n%s", exc)
        return None


def main(
    config: Config,
    extra_rules: tuple[str, ...],
    metrics_addr: str | None,
    rejected: Iterable[Rejection] = (),
) -> int:
    """The daemon's whole life; returns the exit status. rejected: what the
    config loader left out (rome_guard.siteconfig); site rule files that do
    not load are left out here, and both are reported once the journal is open."""
    from rome_guard.sdnotify import Notifier

    setup_logging()
    notifier = Notifier()
    try:
        ruleset, left_out = usable_rules(config, extra_rules)
    except SourceError as exc:
        log.error("the shipped rules do not load (a broken installation), not starting:\n%s", exc)
        return 2
    rejected = [*rejected, *left_out]
    try:
        journal = open_journal(config.alerts_file, config.journal.rotate_bytes, config.journal.keep)
    except JournalError as exc:
        log.error("not starting: %s", exc)
        return 2
    addr = config.metrics.addr if metrics_addr is None else metrics_addr
    from rome_guard.respond.metrics import GuardMetrics

    metrics = GuardMetrics()
    journal.set_error_hook(metrics.journal_error)
    metrics.watch_journal_spool(lambda: journal.state().spooled)
    outputs = Outputs.from_config(config.outputs)  # an output that cannot start is left out
    journal.set_forward(outputs.publish)
    metrics.watch_outputs(outputs.states)
    endpoint = MetricsEndpoint(metrics, addr, config.metrics.web_config_file)
    busy = endpoint.start()
    if busy is not None:
        log.error(
            "DEGRADED: cannot serve metrics on %s (%s); detection and the journal go on, "
            "retrying every %.0fs",
            addr,
            busy,
            METRICS_RETRY_S,
        )
    killer, prevention = _responders(config)
    gpu = _gpu_watch(config)
    guard = Guard(
        config, ruleset, journal, extra_rules, metrics, killer, gpu=gpu, prevention=prevention
    )
    guard.metrics_endpoint = endpoint
    guard.outputs = outputs
    guard.report_rejected(rejected)
    guard.remember_alerts(recent_alerts(config.alerts_file, config.mode))
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
            sensor.interval_s if isinstance(sensor, PollSensor) else 0.0,
        )
    for line in getattr(sensor, "degraded", ()) or ():
        log.warning("sensor: %s", line)
    guard.attach(sensor, mode)
    wire = _wire_sensor()
    if wire is not None:
        guard.attach_wire(wire)
    release_compiler_memory()  # every BPF object is compiled by now
    if gpu is not None:
        gpu.start(notify=guard.wake)
    status_path = None
    try:
        os.makedirs(config.run_dir, exist_ok=True)
        status_path = os.path.join(config.run_dir, "status.json")
    except OSError as exc:
        log.warning("no status file: %s", exc)
    try:
        seeded = guard.seed()
        guard.export_health()
        log.info(
            "rome-guard running: %s mode, %s sensor, %d rules, %d pre-existing processes, "
            "alerts to %s%s",
            config.mode,
            mode,
            len(ruleset),
            seeded,
            config.alerts_file,
            f", metrics on {addr}" if endpoint.server is not None else "",
        )
        if status_path:
            write_status(status_path, guard.status())
        notifier.ready(guard.status_line())
        guard.run(notifier, status_path)
    finally:
        notifier.stopping()
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        sensor.close()
        if wire is not None:
            wire.close()
        if prevention is not None:
            prevention.close()
        if gpu is not None:
            gpu.close()
        endpoint.close()
        outputs.close()
        journal.close()
        if status_path:
            with contextlib.suppress(OSError):
                os.unlink(status_path)
        log.info(
            "rome-guard stopped (%.2fs to detach)",
            SHUTDOWN_BUDGET_S - (deadline - time.monotonic()),
        )
    return 0
