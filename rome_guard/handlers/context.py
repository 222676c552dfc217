"""What every handler works with: the process model, the rules in force,
the alert sink, metrics, the ssh effective-config reader, the optional
GPU watch and wire collaborator, in one object.

Handlers receive a Context and one event; they never hold state of their
own between events (what must persist lives here or in the process model),
and they never write the journal except through ``alerts``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol

from rome_guard.config import Config
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import Rule, RuleSet
from rome_guard.detect.stateful import FanoutDetector
from rome_guard.events import ConnectEvent, ProcessKey
from rome_guard.respond.alerts import AlertSink
from rome_guard.respond.enforce import KernelPolicy, policy_for
from rome_guard.respond.metrics import MetricsSink
from rome_guard.sensors.sshconfig import EffectiveSshConfig
from rome_guard.state.processes import ProcessModel

if TYPE_CHECKING:
    from rome_guard.gpu.watch import GpuWatch
    from rome_guard.handlers.wire import WireHandler


class Sensor(Protocol):
    """A source of kernel events: rome_guard.sensors.ebpf or .poll."""

    def start(self) -> None: ...

    def poll(self, timeout_ms: int) -> list: ...

    def ring_fds(self) -> list[int]: ...

    def lost_events(self) -> dict[str, int]: ...

    def set_loopback_ignore_cgroups(self, cgroup_ids: Iterable[int]) -> None: ...

    def set_wake_names(self, names: Iterable[str] | None) -> None: ...

    def set_exec_needles(self, needles: Iterable[str] | None) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Rules:
    """The rule set in force, compiled for the event path."""

    ruleset: RuleSet
    engine: Engine
    fanout: tuple[FanoutDetector, ...]
    gpu: tuple[Rule, ...]  # gpu_unregistered rules
    policy: KernelPolicy | None  # what the kernel enforces, when prevention is on

    @classmethod
    def compile(cls, ruleset: RuleSet, kernel_policy: bool) -> Rules:
        return cls(
            ruleset,
            Engine(ruleset),
            tuple(FanoutDetector(rule) for rule in ruleset.detector_rules("fanout")),
            tuple(ruleset.detector_rules("gpu_unregistered")),
            policy_for(ruleset) if kernel_policy else None,
        )


@dataclass
class Parked:
    """A connect of a pid not known yet, retried until its exec/fork arrives."""

    event: ConnectEvent
    until: float  # time.monotonic()


@dataclass
class Context:
    config: Config
    processes: ProcessModel
    rules: Rules
    alerts: AlertSink
    metrics: MetricsSink
    sensor: Sensor | None = None
    gpu: GpuWatch | None = None
    # ssh clients' effective forwards (ssh -G as the process's user), cached
    ssh: EffectiveSshConfig = field(default_factory=EffectiveSshConfig)
    parked: deque[Parked] = field(default_factory=deque)
    # key -> (alert id, rule id) of GPU-open alerts awaiting NVML's confirmation
    gpu_alerts: dict[ProcessKey, tuple[str, str]] = field(default_factory=dict)
    loopback_ignored: set[int] = field(default_factory=set)  # cgroup ids the sensor drops
    # the wire sensor's handler state (DNS names, drop policy), while it runs
    wire: WireHandler | None = None
    lost: dict[str, int] = field(default_factory=dict)  # per buffer, as last reported
    parked_dropped: int = 0  # parked connects dropped unresolved (the "parked" buffer's total)
    failed_events: int = 0  # events a handler raised on (handlers.table.dispatch)
    failed_kinds: set[type] = field(default_factory=set)  # logged in full once each
