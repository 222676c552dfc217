"""Prometheus metrics: what rome-guard counts (the endpoint that serves it is
rome_guard.respond.exposition).

``GuardMetrics`` owns a dedicated CollectorRegistry and is the only way the
daemon records a metric, so every label value passes through one place:
enumerations (event source, lost-event buffer, kill result, action, sensor
mode) reject unknown values with ValueError; rule ids, categories and
severities, which come from the loaded rule set, are checked against a safe
pattern and folded to "invalid" (or "other" past a fixed number of distinct
values). The series count therefore stays bounded whatever the watched
processes do.

This module must never put a pid, user name, command line, path or any other
string a watched process controls into a label, and never blocks the caller:
recording is a dictionary update (serving is rome_guard.respond.exposition's).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from rome_guard import __version__
from rome_guard.detect.rules import SHIPPED_CATEGORIES
from rome_guard.events import (
    SSH_UNKNOWN_FAILED,
    SSH_UNKNOWN_REASONS,
    SSH_UNKNOWN_SKIPPED,
    SSH_UNKNOWN_TIMEOUT,
    GpuProcess,
)
from rome_guard.gpu import allocations, consumers
from rome_guard.layout.sensor import LOST_SLOT_NAMES
from rome_guard.respond.kill import ALREADY_EXITED, KILL_FAILED, KILLED, PROTECTED
from rome_guard.respond.outputs.queue import OutputState
from rome_guard.respond.responses import ALERT, BLOCK, DROP, KILL

if TYPE_CHECKING:
    from rome_guard.state.kernel_table import TableStats

PREFIX = "rome_guard"

# --- bounded label values ----------------------------------------------------

# What produced an event (sensors and their event kinds).
EVENT_SOURCES = (
    "exec",  # eBPF sched_process_exec
    "fork",
    "exit",
    "connect",  # eBPF connect attempts and outcomes
    "gpu_open",  # eBPF opens of /dev/nvidia*
    "payload",  # wire sensor: first bytes of new flows, DNS questions and answers
    "fd",  # eBPF: an inet socket duplicated onto stdio
    "rename",  # eBPF: a process renamed itself after exec
    "nvml",  # NVML compute-process polls
    "procfs",  # /proc snapshots (seeding, poll mode, scan)
)
# Where events can be lost: the sensor's kernel ring buffers, prevention's,
# and the daemon's parking of events for pids not known yet.
LOST_BUFFERS = (
    *LOST_SLOT_NAMES,  # "process", "network"
    "prevention",  # the prevention programs' ring buffer
    "wire",  # the wire sensor's ring buffer (and records it could not decode)
    "parked",  # events for not-yet-known pids dropped after park_unknown_ms
    "failed",  # events a handler raised on (a bug; logged, the guard goes on)
)
# The outcomes of rome_guard.respond.kill.
KILL_RESULTS = (KILLED, ALREADY_EXITED, PROTECTED, KILL_FAILED)
ALERT_ACTIONS = (ALERT.name, KILL.name, BLOCK.name, DROP.name)  # what was done about an alert
SENSOR_MODES = ("ebpf", "poll")
GUARD_MODES = ("monitor", "enforce")
# What rome_guard_sensor_up names: the process sensor (ebpf, or its poll
# fallback), the wire sensor, NVML and the schedulers' allocation sources.
# A sensor that does not apply here (no NVML library, no kubelet socket) has
# no series; one that should work and does not is 0.
HEALTH_SENSORS = ("ebpf", "poll", "wire", "nvml", "kubelet", "slurm")
# `ssh -G` asked for a client's effective config (rome_guard.sensors.sshconfig):
# run (asked), failed (it ran but gave no answer), skipped (over budget, slow user).
SSH_CONFIG_RESULTS = ("run", "failed", "skipped")
MAX_NVML_ERROR_KINDS = 64  # distinct (call, error) pairs of rome_guard_nvml_errors
# The categories the alerting rules and dashboard know (dashboards/alerts.yml).
KNOWN_CATEGORIES = SHIPPED_CATEGORIES

# What rome_guard.gpu.consumers says of a GPU consumer ("allowed": no finding).
GPU_VERDICTS = consumers.VERDICTS
# Who a scheduler gave a GPU to (rome_guard.gpu.allocations), and the schedulers.
GPU_OWNER_KINDS = allocations.OWNER_KINDS
ALLOCATION_SOURCES = allocations.SOURCES

INVALID = "invalid"  # a value that failed the safe-label check
OTHER = "other"  # a safe value past the distinct-value limit
UNKNOWN = "unknown"  # a rule id that is not in the loaded rule set
SAFE_LABEL_MAX = 128
MAX_RULES = 1024
MAX_CATEGORIES = 32
MAX_SEVERITIES = 16
MAX_GPUS = 256
_SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
_HEX = frozenset("0123456789abcdefABCDEF-")


def safe_label(value: object) -> str:
    """value when it is a short string of [A-Za-z0-9_.:-], else "invalid"."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= SAFE_LABEL_MAX
        and _SAFE_CHARS.issuperset(value)
    ):
        return value
    return INVALID


def gpu_uuid_label(value: object) -> str:
    """An NVML UUID ("GPU-<hex and dashes>"), else "invalid"."""
    if (
        isinstance(value, str)
        and 4 < len(value) <= 80
        and value.startswith("GPU-")
        and _HEX.issuperset(value[4:])
    ):
        return value
    return INVALID


def _member(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: one of {', '.join(allowed)}")
    return value


class _BoundedValues:
    """Remembers the distinct values of one label; past the limit, new
    values fold to "other" so that no input can grow the series count."""

    def __init__(self, limit: int):
        self._limit = limit
        self._seen: set[str] = set()

    def admit(self, value: object) -> str:
        label = safe_label(value)
        if label in self._seen or label == INVALID:
            return label
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(label)
        return label


class _RunningTotals:
    """Totals counted elsewhere (a BPF map's counter, a reader's or a
    graph's count), read now and then, as counter increments. A total below
    the last one means that count restarted: all of it is new."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], int] = {}
        self._lock = threading.Lock()

    def delta(self, key: tuple[str, ...], total: int) -> int:
        """How much the total under key grew since the last reading."""
        with self._lock:
            last = self._last.get(key, 0)
            self._last[key] = total
        return total - last if total >= last else total


# --- GPU snapshot (pure) -----------------------------------------------------


@dataclass(frozen=True)
class GpuUsage:
    """One GPU's consumers at one poll, as the metrics show them."""

    gpu: int  # NVML index
    uuid: str  # NVML UUID of the physical GPU (MIG devices count on their parent)
    registered: int = 0  # processes belonging to registered jobs
    unregistered: int = 0
    unregistered_memory_bytes: int = 0
    verdicts: tuple[tuple[str, int], ...] = ()  # (GPU_VERDICTS member, consumers)
    owner_kinds: tuple[tuple[str, int], ...] = ()  # (GPU_OWNER_KINDS member, owners)


def gpu_usage(
    processes: Iterable[GpuProcess],
    is_registered: Callable[[GpuProcess], bool],
    gpus: Iterable[tuple[int, str]] = (),
    verdict_of: Callable[[GpuProcess], str] | None = None,
    owner_kinds: Callable[[int, str], Iterable[str]] | None = None,
) -> list[GpuUsage]:
    """Sum NVML's per-process view per GPU. ``gpus`` lists every (index,
    uuid) present so that idle GPUs show zero instead of no series.
    ``verdict_of`` names each consumer's verdict (GPU_VERDICTS);
    ``owner_kinds`` the kinds of the pods or jobs a GPU is allocated to."""
    totals: dict[tuple[int, str], list[int]] = {(i, u): [0, 0, 0] for i, u in gpus}
    verdicts: dict[tuple[int, str], dict[str, int]] = {}
    for proc in processes:
        gpu = (proc.gpu_index, proc.gpu_uuid)
        entry = totals.setdefault(gpu, [0, 0, 0])
        if is_registered(proc):
            entry[0] += 1
        else:
            entry[1] += 1
            entry[2] += max(proc.used_memory_bytes or 0, 0)
        if verdict_of is not None:
            counts = verdicts.setdefault(gpu, {})
            verdict = verdict_of(proc)
            counts[verdict] = counts.get(verdict, 0) + 1
    out = []
    for (i, u), (r, n, m) in sorted(totals.items()):
        kinds: dict[str, int] = {}
        for kind in owner_kinds(i, u) if owner_kinds is not None else ():
            kinds[kind] = kinds.get(kind, 0) + 1
        seen = verdicts.get((i, u), {})
        verdict_counts, kind_counts = tuple(sorted(seen.items())), tuple(sorted(kinds.items()))
        out.append(GpuUsage(i, u, r, n, m, verdict_counts, kind_counts))
    return out


# --- the metrics ---------------------------------------------------------------


class GuardMetrics:
    """Every metric rome-guard exports, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None, process_collector: bool = True):
        # _created samples would double the series of every counter and no
        # dashboard uses them (global switch; the daemon is the only user).
        prometheus_client.disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._rules = _BoundedValues(MAX_RULES)
        self._categories = _BoundedValues(MAX_CATEGORIES)
        self._severities = _BoundedValues(MAX_SEVERITIES)
        self._loaded_rules: frozenset[str] | None = None
        self._totals = _RunningTotals()
        self._gpu_labels: set[tuple[str, str]] = set()
        self._sensor_mode = ""

        def metric(kind, name, doc, labels=()):
            return kind(f"{PREFIX}_{name}", doc, labels, registry=self.registry)

        self.alerts = metric(
            Counter,
            "alerts",
            "Rule hits, by rule and what was done about them (one incident may hold several).",
            ("rule", "category", "severity", "action"),
        )
        self.incidents = metric(
            Counter,
            "incidents",
            "Incidents raised: rule hits on one process in one category, grouped.",
            ("category", "severity", "action"),
        )
        self.events = metric(Counter, "events", "Events received from sensors.", ("source",))
        self.events_lost = metric(
            Counter, "events_lost", "Events lost before the engine saw them.", ("buffer",)
        )
        self.sensor_info = metric(
            Gauge, "sensor_info", "The sensor in use: ebpf, or poll (degraded).", ("mode",)
        )
        self.rules_loaded = metric(Gauge, "rules_loaded", "Rules in the loaded rule set.")
        self.rule_reload_failures = metric(
            Counter, "rule_reload_failures", "Rule reloads rejected (the old set stays)."
        )
        self.config_rejected = metric(
            Gauge,
            "config_rejected_files",
            "Config and rule files (or config keys) left out at start or at the last reload.",
        )
        self.processes_tracked = metric(
            Gauge, "processes_tracked", "Live processes in the process table."
        )
        self.stdio_relay_deferred = metric(
            Counter,
            "stdio_relay_judgements_deferred",
            "Shells on pipes whose relay search was put off: that second's /proc read "
            "budget was spent (the 1 s sweep judges them).",
        )
        self.kernel_table_entries = metric(
            Gauge,
            "kernel_process_table_entries",
            "Processes in the eBPF sensor's process table (live, exited) and its bound.",
            ("table", "of"),
        )
        self.kernel_table_evictions = metric(
            Counter,
            "kernel_process_table_evictions",
            "Processes the kernel's table dropped: exited ones beyond its bound, "
            "new ones not tracked because the live table was full, processes user "
            "space could not mark held (held: their exit is not sent).",
            ("table",),
        )
        self.kernel_records_unsent = metric(
            Counter,
            "kernel_records_unsent",
            "Records the exec filter kept in the kernel: no rule could concern them.",
            ("kind",),
        )
        self.kills = metric(Counter, "kills", "Kill attempts by outcome.", ("result",))
        self.journal_errors = metric(
            Counter,
            "journal_errors",
            "Alert journal writes or fsyncs the disk refused (records wait in memory).",
        )
        self.journal_spooled = metric(
            Gauge, "journal_spooled_records", "Records waiting in memory for the journal's disk."
        )
        self.blocked_connections = metric(
            Counter, "blocked_connections", "Connections denied in the kernel."
        )
        self.gpu_processes = metric(
            Gauge,
            "gpu_processes",
            "Processes holding a context on a GPU, by registration.",
            ("gpu", "UUID", "registered"),
        )
        self.gpu_unregistered_memory = metric(
            Gauge,
            "gpu_unregistered_memory_bytes",
            "GPU memory used by processes of no registered job.",
            ("gpu", "UUID"),
        )
        self.gpu_consumers = metric(
            Gauge,
            "gpu_consumers",
            "Processes holding a context on a GPU, by verdict (allowed, unregistered, "
            "gpu_not_allocated, gpu_not_granted, process_not_visible).",
            ("gpu", "UUID", "verdict"),
        )
        self.gpu_allocations = metric(
            Gauge,
            "gpu_allocations",
            "Pods or Slurm jobs a scheduler allocated the GPU (or one of its MIG devices) to.",
            ("gpu", "UUID", "owner_kind"),
        )
        self.gpu_allocation_source_up = metric(
            Gauge,
            "gpu_allocation_source_up",
            "1 while a scheduler's GPU allocations (kubelet, slurm) can be read.",
            ("source",),
        )
        self.ssh_config_unknown = metric(
            Counter,
            "ssh_config_unknown",
            "ssh clients whose effective configuration could not be established "
            "(ssh -G failed or was skipped, -F from a descriptor, a changed or deleted file).",
            ("reason",),
        )
        for reason in SSH_UNKNOWN_REASONS:
            self.ssh_config_unknown.labels(reason=reason)
        self.build_info = metric(
            Gauge,
            "build_info",
            "rome-guard version and hashes of the loaded rules and config (drift across nodes).",
            ("version", "rules_hash", "config_hash"),
        )
        self._build_labels = (safe_label(__version__), UNKNOWN, UNKNOWN)
        self.build_info.labels(*self._build_labels).set(1)
        self.mode_info = metric(Gauge, "mode", "1 for the mode in force.", ("mode",))
        self.sensor_up = metric(
            Gauge,
            "sensor_up",
            "1 while a sensor or source works, 0 while it should and does not "
            "(ebpf, poll fallback, wire, nvml, kubelet, slurm).",
            ("sensor",),
        )
        self.ssh_config_runs = metric(
            Counter,
            "ssh_config_runs",
            "ssh -G runs for clients' effective configs: run, failed, skipped.",
            ("result",),
        )
        self.nvml_errors = metric(
            Counter, "nvml_errors", "NVML calls that failed, by call and error.", ("call", "error")
        )
        self._nvml_kinds: set[tuple[str, str]] = set()
        if process_collector:
            ProcessCollector(registry=self.registry)
        # Bounded enumerations start at zero, so that increase() sees the
        # first event and dashboards show a flat line rather than no data.
        # (the per-event path is a dict lookup: children are made once)
        self._event_children = {s: self.events.labels(source=s) for s in EVENT_SOURCES}
        for buffer in LOST_BUFFERS:
            self.events_lost.labels(buffer=buffer)
        for result in KILL_RESULTS:
            self.kills.labels(result=result)
        for result in SSH_CONFIG_RESULTS:
            self.ssh_config_runs.labels(result=result)

    # rules

    def set_rules(self, rules: Iterable[tuple[str, str, str]]) -> None:
        """The loaded rule set as (rule id, category, severity). Its alert
        series start at zero, and alert() then accepts only these ids."""
        loaded = []
        for rule_id, category, severity in rules:
            labels = self._alert_labels(rule_id, category, severity, only_loaded=False)
            loaded.append(rule_id)
            for action in ALERT_ACTIONS:
                self.alerts.labels(*labels, action)
                self.incidents.labels(labels[1], labels[2], action)
        with self._lock:
            self._loaded_rules = frozenset(loaded)
        self.rules_loaded.set(len(loaded))

    def rule_reload_failed(self) -> None:
        self.rule_reload_failures.inc()

    def set_config_rejected(self, count: int) -> None:
        self.config_rejected.set(count)

    def _alert_labels(
        self, rule: str, category: str, severity: str, only_loaded: bool = True
    ) -> tuple[str, str, str]:
        with self._lock:
            loaded = self._loaded_rules
            if only_loaded and loaded is not None and rule not in loaded:
                rule_label = INVALID if safe_label(rule) == INVALID else UNKNOWN
            else:
                rule_label = self._rules.admit(rule)
            return rule_label, self._categories.admit(category), self._severities.admit(severity)

    def alert(self, rule: str, category: str, severity: str, action: str) -> None:
        """One alert of a loaded rule; action is what was done: alert (recorded
        only), kill or block."""
        _member(action, ALERT_ACTIONS, "action")
        self.alerts.labels(*self._alert_labels(rule, category, severity), action).inc()

    def incident(self, category: str, severity: str, action: str) -> None:
        """One incident opened (its rule hits are counted by alert())."""
        _member(action, ALERT_ACTIONS, "action")
        with self._lock:
            labels = (self._categories.admit(category), self._severities.admit(severity))
        self.incidents.labels(*labels, action).inc()

    # sensors

    def event(self, source: str, count: int = 1) -> None:
        child = self._event_children.get(source)
        if child is None:
            _member(source, EVENT_SOURCES, "event source")  # raises ValueError
        child.inc(count)

    def set_lost(self, buffer: str, total: int) -> None:
        """The running total of lost events a buffer reports (e.g. a BPF map
        counter); a total below the last one means the counter restarted."""
        _member(buffer, LOST_BUFFERS, "buffer")
        delta = self._totals.delta(("lost", buffer), total)
        if delta > 0:
            self.events_lost.labels(buffer=buffer).inc(delta)

    def lost(self, buffer: str, count: int = 1) -> None:
        """Events dropped by the daemon itself (queues), counted as they go."""
        self.events_lost.labels(buffer=_member(buffer, LOST_BUFFERS, "buffer")).inc(count)

    def set_sensor(self, mode: str) -> None:
        _member(mode, SENSOR_MODES, "sensor mode")
        with self._lock:
            previous, self._sensor_mode = self._sensor_mode, mode
            self.sensor_info.labels(mode=mode).set(1)
            if previous and previous != mode:
                self.sensor_info.remove(previous)

    def set_processes_tracked(self, count: int) -> None:
        self.processes_tracked.set(count)

    def set_stdio_deferred(self, total: int) -> None:
        """The stdio graph's running count of relay judgements it put off
        for want of its read budget (state.stdio.StdioGraph.deferred)."""
        delta = self._totals.delta(("stdio", "deferred"), total)
        if delta > 0:
            self.stdio_relay_deferred.inc(delta)

    def set_kernel_table(self, stats: TableStats) -> None:
        """The eBPF sensor's process table (state.kernel_table.TableStats)."""
        for table, entries, bound in (
            ("live", stats.live_entries, stats.live_capacity),
            ("exited", stats.exited_entries, stats.exited_capacity),
        ):
            self.kernel_table_entries.labels(table=table, of="entries").set(entries)
            self.kernel_table_entries.labels(table=table, of="capacity").set(bound)
        totals = {
            ("evicted", "live"): stats.live_full,
            ("evicted", "exited"): stats.exited_evictions,
            ("evicted", "held"): stats.held_full,
        }
        totals.update({("unsent", kind): n for kind, n in stats.unsent.items()})
        for (what, label), total in totals.items():
            # every series exists from the first call on, at 0 until it counts
            if what == "evicted":
                child = self.kernel_table_evictions.labels(table=label)
            else:
                child = self.kernel_records_unsent.labels(kind=label)
            delta = self._totals.delta(("kernel", what, label), total)
            if delta > 0:
                child.inc(delta)

    def set_ssh_config(self, runs: int, unknown: Mapping[str, int]) -> None:
        """The ssh config reader's running totals (sensors.sshconfig): its
        ssh -G runs, and the configs it could not establish by reason. Both
        rome_guard_ssh_config_runs_total (run, failed, skipped) and
        rome_guard_ssh_config_unknown_total (by reason) follow them."""
        for reason in unknown:
            _member(reason, SSH_UNKNOWN_REASONS, "ssh config reason")
        totals = {("unknown", reason): count for reason, count in unknown.items()}
        totals[("runs", "run")] = runs
        totals[("runs", "failed")] = unknown.get(SSH_UNKNOWN_FAILED, 0) + unknown.get(
            SSH_UNKNOWN_TIMEOUT, 0
        )
        totals[("runs", "skipped")] = unknown.get(SSH_UNKNOWN_SKIPPED, 0)
        for (family, label), total in totals.items():
            delta = self._totals.delta(("ssh", family, label), total)
            if delta <= 0:
                continue
            if family == "runs":
                self.ssh_config_runs.labels(result=label).inc(delta)
            else:
                self.ssh_config_unknown.labels(reason=label).inc(delta)

    # responders

    def journal_error(self) -> None:
        self.journal_errors.inc()

    def watch_journal_spool(self, spooled: Callable[[], int]) -> None:
        """The spool gauge reads spooled() at each scrape."""
        self.journal_spooled.set_function(spooled)

    def kill(self, result: str) -> None:
        self.kills.labels(result=_member(result, KILL_RESULTS, "kill result")).inc()

    def blocked_connection(self, count: int = 1) -> None:
        self.blocked_connections.inc(count)

    # health

    def set_build(self, rules_hash: str, config_hash: str) -> None:
        """The hashes of the rule set and config in force (at start and
        after each reload): one build_info series at a time."""
        with self._lock:
            labels = (self._build_labels[0], safe_label(rules_hash), safe_label(config_hash))
            if labels != self._build_labels:
                self.build_info.remove(*self._build_labels)
                self._build_labels = labels
            self.build_info.labels(*labels).set(1)

    def set_mode(self, mode: str) -> None:
        _member(mode, GUARD_MODES, "mode")
        for each in GUARD_MODES:
            self.mode_info.labels(mode=each).set(1 if each == mode else 0)

    def set_sensor_up(self, sensor: str, up: bool) -> None:
        self.sensor_up.labels(sensor=_member(sensor, HEALTH_SENSORS, "sensor")).set(1 if up else 0)

    def set_nvml_errors(self, totals: dict[tuple[str, str, str], int]) -> None:
        """NVML's running error counts, (gpu, call, error) -> count
        (NvmlSensor.error_counts()), summed over GPUs."""
        summed: dict[tuple[str, str], int] = {}
        for (_gpu, call, error), count in totals.items():
            summed[(call, error)] = summed.get((call, error), 0) + count
        with self._lock:
            for key, total in summed.items():
                delta = self._totals.delta(("nvml", *key), total)
                if delta > 0:
                    labels = (safe_label(key[0]), safe_label(key[1]))
                    if labels not in self._nvml_kinds:
                        if len(self._nvml_kinds) >= MAX_NVML_ERROR_KINDS:
                            labels = (OTHER, OTHER)
                        self._nvml_kinds.add(labels)
                    self.nvml_errors.labels(*labels).inc(delta)

    def watch_outputs(self, states: Callable[[], Iterable[OutputState]]) -> None:
        """The outputs' counters and queues, read from states() at each scrape."""
        self.registry.register(_OutputCollector(states))

    # GPUs

    def set_gpu_usage(self, usage: Iterable[GpuUsage]) -> None:
        """Replace the GPU series with this poll's (see gpu_usage())."""
        current: dict[tuple[str, str], GpuUsage] = {}
        for entry in usage:
            if len(current) >= MAX_GPUS:
                break
            index = str(entry.gpu) if 0 <= entry.gpu < 4096 else INVALID
            current[(index, gpu_uuid_label(entry.uuid))] = entry
        with self._lock:
            for (index, uuid), entry in current.items():
                verdicts = dict(entry.verdicts)
                for verdict in GPU_VERDICTS:
                    self.gpu_consumers.labels(index, uuid, verdict).set(verdicts.get(verdict, 0))
                kinds = dict(entry.owner_kinds)
                for kind in GPU_OWNER_KINDS:
                    self.gpu_allocations.labels(index, uuid, kind).set(kinds.get(kind, 0))
                self.gpu_processes.labels(index, uuid, "true").set(entry.registered)
                self.gpu_processes.labels(index, uuid, "false").set(entry.unregistered)
                self.gpu_unregistered_memory.labels(index, uuid).set(
                    entry.unregistered_memory_bytes
                )
            for index, uuid in self._gpu_labels - current.keys():
                self.gpu_processes.remove(index, uuid, "true")
                self.gpu_processes.remove(index, uuid, "false")
                self.gpu_unregistered_memory.remove(index, uuid)
                for verdict in GPU_VERDICTS:
                    self.gpu_consumers.remove(index, uuid, verdict)
                for kind in GPU_OWNER_KINDS:
                    self.gpu_allocations.remove(index, uuid, kind)
            self._gpu_labels = set(current)

    def set_allocation_sources(self, live: Iterable[tuple[str, bool]]) -> None:
        """(source, live) of each scheduler the daemon asks."""
        with self._lock:
            for source, up in live:
                if source in ALLOCATION_SOURCES:
                    self.gpu_allocation_source_up.labels(source).set(1 if up else 0)

    # exposition

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape body and its content type for an Accept header."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _OutputCollector:
    """rome_guard_output_*: the outputs' own counters at scrape time (the
    output names are the config's, checked there as label-safe)."""

    def __init__(self, states: Callable[[], Iterable[OutputState]]):
        self._states = states

    def describe(self) -> list:
        return []  # families depend on the config: collected, not described

    def collect(self) -> Iterable:
        labels = ["output", "type"]
        sent = CounterMetricFamily(
            f"{PREFIX}_output_sent", "Records an output delivered.", labels=labels
        )
        failed = CounterMetricFamily(
            f"{PREFIX}_output_failed",
            "Delivery attempts that failed (each retry counts).",
            labels=labels,
        )
        dropped = CounterMetricFamily(
            f"{PREFIX}_output_dropped",
            "Records an output gave up: its queue was full, or the receiver refused them.",
            labels=labels,
        )
        queued = GaugeMetricFamily(
            f"{PREFIX}_output_queue_depth", "Records waiting in an output's queue.", labels=labels
        )
        limit = GaugeMetricFamily(
            f"{PREFIX}_output_queue_size", "The bound of an output's queue.", labels=labels
        )
        up = GaugeMetricFamily(
            f"{PREFIX}_output_up", "1 while an output's last attempt was delivered.", labels=labels
        )
        for state in self._states():
            names = [safe_label(state.name), safe_label(state.type)]
            sent.add_metric(names, state.sent)
            failed.add_metric(names, state.failed)
            dropped.add_metric(names, state.dropped)
            queued.add_metric(names, state.queued)
            limit.add_metric(names, state.queue_size)
            up.add_metric(names, 1 if state.up else 0)
        return [sent, failed, dropped, queued, limit, up]


# What the daemon's parts record into: GuardMetrics, or NullMetrics when no
# metrics are served. One class, so the two cannot drift apart.
MetricsSink = GuardMetrics


class NullMetrics(GuardMetrics):
    """Records into a registry nobody exposes: callers record
    unconditionally instead of asking whether metrics are on."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry(), process_collector=False)
