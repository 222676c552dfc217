"""Wire events -> findings: what a new flow said first, tied to its process.

For each WireEvent (rome_guard.sensors.wire) the handler finds the process
that connected (the pid the kernel recorded at the SYN, checked against
its start time so a reused pid is never blamed), names the destination
from recent DNS answers, parses the captured bytes into WireFacts and runs
the wire rules over them. DNS answers only teach addresses their names
(for a bounded time); in enforce mode an address named in a pool domain
is handed to the kernel, which then drops new flows to it from the SYN.

When the process is gone or cannot be read, the finding still names the
socket's cgroup (unit, container, pod, Slurm job) from the cgroup id.

Like every handler, it never reads /proc or other kernel interfaces itself
(the process model and linux.py do), never prints payload bytes (WireFacts
carry them; the journal gets them only through findings.wire_record's
textsafe) and never acts itself: findings go to the alert sink, which
journals before any kill.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from rome_guard.detect import argv as argvlib
from rome_guard.detect.payload import dns_payload, facts_for, parse_dns
from rome_guard.detect.rules import RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import WIRE_DNS_ANSWER, ProcessInfo, WireEvent
from rome_guard.findings import Finding, wire_record
from rome_guard.textsafe import one_line

if TYPE_CHECKING:
    from rome_guard.handlers.context import Context
    from rome_guard.state.processes import ProcessModel

log = logging.getLogger(__name__)

# how long a DNS answer names its addresses: the record's TTL within these
# bounds (pool names may resolve to shared CDN addresses: keep it short)
NAME_TTL_MIN_S = 60
NAME_TTL_MAX_S = 900
NAMES_MAX = 65536


class DnsNames:
    """Address -> the name a DNS answer gave it, until it expires."""

    def __init__(self, limit: int = NAMES_MAX):
        self._names: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._names)

    def learn(self, name: str, address: str, ttl_s: int, now: float) -> None:
        ttl = min(max(ttl_s, NAME_TTL_MIN_S), NAME_TTL_MAX_S)
        self._names.pop(address, None)
        self._names[address] = (name, now + ttl)
        while len(self._names) > self._limit:
            self._names.popitem(last=False)

    def name_of(self, address: str, now: float) -> str:
        found = self._names.get(_plain(address))
        return found[0] if found is not None and found[1] > now else ""

    def expire(self, now: float) -> list[str]:
        """Forget expired addresses; returns them."""
        gone = [a for a, (_, until) in self._names.items() if until <= now]
        for address in gone:
            del self._names[address]
        return gone


def _plain(address: str) -> str:
    """::ffff:1.2.3.4 (a v4 peer of a v6 socket) is 1.2.3.4."""
    return address[7:] if address.startswith("::ffff:") and "." in address else address


@dataclass(frozen=True)
class WirePolicy:
    """What the kernel drops, from the kill rules' prevent blocks."""

    methods: dict[str, bool] = field(default_factory=dict)  # method -> needs "agent"
    hosts: tuple[str, ...] = ()  # domain suffixes (SNI and DNS-named addresses)

    def names_pool(self, name: str) -> bool:
        return any(argvlib.domain_matches(name, h) for h in self.hosts)


def wire_policy(ruleset: RuleSet) -> WirePolicy:
    methods: dict[str, bool] = {}
    hosts: set[str] = set()
    for rule in ruleset.rules:
        if not rule.enforces:
            continue  # weak evidence, or a kill rule staged in monitor mode
        for method in rule.prevent.wire_methods:
            if not any(c in method for c in "*?["):
                methods[method] = False
        for method in rule.prevent.wire_agent_methods:
            methods.setdefault(method, True)
        hosts.update(h.lower().strip(".") for h in rule.prevent.wire_hosts)
    return WirePolicy(methods, tuple(sorted(hosts)))


class WireHandler:
    """The wire events' collaborator, held by the handler Context
    (``ctx.wire``): what persists between wire events (DNS names, the drop
    policy, the addresses handed to the kernel) and turns each event into
    findings. Collaborators, all passed in:

    - processes: the process model (``connected_by``: the process that
      opened a flow, or what the kernel said of it and its cgroup;
      ``lineage``);
    - evaluate(subject, trigger) -> findings: the engine's wire rules;
    - raise_alert(finding): the alert sink (journal, count, kill in enforce
      mode);
    - kernel: the WireSensor (drop tables), or None;
    - clock: monotonic seconds (tests)."""

    def __init__(
        self,
        processes: ProcessModel,
        evaluate: Callable[..., list[Finding]],
        raise_alert: Callable[[Finding], Any],
        kernel: Any = None,
        enforce: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.processes = processes
        self.evaluate = evaluate
        self.raise_alert = raise_alert
        self.kernel = kernel
        self.enforce = enforce
        self.clock = clock
        self.names = DnsNames()
        self.policy = WirePolicy()
        self._dropped_addresses: set[str] = set()
        self._next_expiry = 0.0

    @classmethod
    def for_context(cls, ctx: Context, kernel: Any) -> WireHandler:
        """The daemon's: its process model, the rules in force (read at each
        event, so a reload applies at once) and its alert sink."""
        return cls(
            ctx.processes,
            lambda subject, trigger: ctx.rules.engine.evaluate(subject, trigger=trigger),
            ctx.alerts.raise_alert,
            kernel=kernel,
            enforce=ctx.config.mode == "enforce",
        )

    # --- rules ---------------------------------------------------------------

    def install(self, ruleset: RuleSet) -> None:
        """New rules: the kernel's drop tables follow them (enforce mode)."""
        self.policy = wire_policy(ruleset)
        if self.kernel is None or not self.enforce:
            return
        self.kernel.set_drop_policy(self.policy.methods, self.policy.hosts)
        for address in list(self._dropped_addresses):
            name = self.names.name_of(address, self.clock())
            if not name or not self.policy.names_pool(name):
                self._undrop(address)
        self.kernel.enforce(True)

    # --- events ----------------------------------------------------------------

    def handle(self, event: WireEvent) -> None:
        now = self.clock()
        if now >= self._next_expiry:
            self._expire(now)
        if event.kind == WIRE_DNS_ANSWER:
            self._learn(event, now)
            return
        facts = facts_for(
            event.payload,
            event.endpoint.proto,
            event.endpoint.dport,
            sni=event.sni,
            alpn=event.alpn,
            remote_name=self.names.name_of(event.endpoint.daddr, now),
            dropped=event.dropped,
        )
        info = self.process_of(event)
        subject = Subject(info, lambda: self.processes.lineage(info), [event.endpoint], wire=facts)
        findings = self.evaluate(subject, event.endpoint)
        if findings:
            record = wire_record(event, facts)
            for finding in findings:
                finding.extra["wire"] = record
                self.raise_alert(finding)
        if event.dropped and not findings:
            log.warning(
                "kernel dropped a flow (%s) of pid %d that no rule claims: %s",
                event.dropped,
                event.pid,
                one_line(facts.method or facts.sni or facts.remote_name, 64),
            )

    def process_of(self, event: WireEvent) -> ProcessInfo:
        """The process that opened the flow (see ProcessModel.connected_by)."""
        return self.processes.connected_by(
            event.pid,
            event.connect_ns or event.timestamp_ns,
            event.uid,
            event.comm,
            event.cgroup_id,
        )

    # --- DNS names -------------------------------------------------------------

    def _learn(self, event: WireEvent, now: float) -> None:
        message = parse_dns(dns_payload(event.payload, event.endpoint.proto))
        for name, address, ttl in message.answers:
            self.names.learn(name, address, ttl, now)
            if (
                self.kernel is not None
                and self.enforce
                and address not in self._dropped_addresses
                and self.policy.names_pool(name)
            ):
                try:
                    self.kernel.drop_address(address)
                except (ValueError, OSError, KeyError) as exc:
                    log.warning("cannot drop flows to %s: %s", one_line(address, 64), exc)
                    continue
                self._dropped_addresses.add(address)
                log.warning(
                    "dropping new flows to %s: DNS named it %s", address, one_line(name, 128)
                )

    def _expire(self, now: float) -> None:
        self._next_expiry = now + 1.0
        for address in self.names.expire(now):
            if address in self._dropped_addresses:
                self._undrop(address)

    def _undrop(self, address: str) -> None:
        self._dropped_addresses.discard(address)
        if self.kernel is not None:
            try:
                self.kernel.undrop_address(address)
            except (ValueError, OSError, KeyError) as exc:
                log.warning("cannot stop dropping flows to %s: %s", address, exc)


def on_wire(ctx: Context, event: WireEvent) -> None:
    """A wire event: handed to the wire collaborator the daemon set up
    with the wire sensor (none: the sensor is not running)."""
    if ctx.wire is not None:
        ctx.wire.handle(event)
