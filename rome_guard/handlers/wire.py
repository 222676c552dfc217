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
carry them; the journal gets them only through textsafe) and never acts
itself: findings go to the alert sink, which journals before any kill.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from rome_guard import linux
from rome_guard.attribution import attribute
from rome_guard.detect import argv as argvlib
from rome_guard.detect.payload import WireFacts, dns_payload, facts_for, parse_dns
from rome_guard.detect.rules import RuleSet
from rome_guard.detect.subject import Subject
from rome_guard.events import (
    WIRE_DNS_ANSWER,
    ProcessInfo,
    ProcessKey,
    WireEvent,
    boottime_ns_to_ticks,
)
from rome_guard.findings import Finding
from rome_guard.textsafe import for_json, from_bytes, one_line

log = logging.getLogger(__name__)

# how long a DNS answer names its addresses: the record's TTL within these
# bounds (pool names may resolve to shared CDN addresses: keep it short)
NAME_TTL_MIN_S = 60
NAME_TTL_MAX_S = 900
NAMES_MAX = 65536
FIRST_BYTES_IN_RECORD = 256  # characters of the captured payload in an alert


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
        if rule.action != "kill":
            continue  # weak evidence never reaches the kernel
        for method in rule.prevent.wire_methods:
            if not any(c in method for c in "*?["):
                methods[method] = False
        for method in rule.prevent.wire_agent_methods:
            methods.setdefault(method, True)
        hosts.update(h.lower().strip(".") for h in rule.prevent.wire_hosts)
    return WirePolicy(methods, tuple(sorted(hosts)))


class CgroupPaths:
    """cgroup v2 id -> path, cached: the hierarchy is walked (linux.py)
    once per unknown id, and only for alerts whose process is gone."""

    def __init__(self, root: str | None = None, limit: int = 4096):
        self._root = root
        self._cache: dict[int, str] = {}
        self._limit = limit

    def path_of(self, cgroup_id: int) -> str:
        if not cgroup_id:
            return ""
        if cgroup_id not in self._cache:
            try:
                found = linux.cgroup_path_of_id(cgroup_id, self._root)
            except OSError:  # NoCgroup2 included
                return ""
            if len(self._cache) >= self._limit:
                self._cache.clear()
            self._cache[cgroup_id] = found
        return self._cache[cgroup_id]


def wire_record(event: WireEvent, facts: WireFacts) -> dict[str, Any]:
    """The "wire" object of an alert: what was seen, escaped and cut."""
    record: dict[str, Any] = {"kind": event.kind, "cookie": event.cookie}
    if facts.method:
        record["method"] = for_json(facts.method, 64)
    if facts.sni:
        record["sni"] = for_json(facts.sni, 256)
    if event.alpn:
        record["alpn"] = for_json(event.alpn, 64)
    if facts.dns_queries:
        record["dns_query"] = [for_json(q, 256) for q in facts.dns_queries[:8]]
    if facts.remote_name:
        record["remote_name"] = for_json(facts.remote_name, 256)
    if facts.http_request:
        record["http_request"] = for_json(facts.http_request, 256)
    if facts.dropped:
        record["dropped"] = facts.dropped
    record["payload_bytes"] = event.payload_len
    # the bytes as sent: invalid UTF-8 shows as \xNN (facts.text is latin-1)
    record["first_bytes"] = for_json(from_bytes(event.payload), FIRST_BYTES_IN_RECORD)
    record["cgroup_id"] = event.cgroup_id
    return record


class WireHandler:
    """Turns wire events into findings. Collaborators, all passed in:

    - resolve(pid) -> ProcessInfo | None: the daemon's process table, read
      from /proc on a miss;
    - lineage(info) -> ancestors;
    - evaluate(subject, trigger) -> findings: the engine's wire rules;
    - raise_alert(finding): journal, count, and kill in enforce mode;
    - kernel: the WireSensor (drop tables), or None;
    - clock: monotonic seconds (tests)."""

    def __init__(
        self,
        resolve: Callable[[int], ProcessInfo | None],
        lineage: Callable[[ProcessInfo], list[ProcessInfo]],
        evaluate: Callable[..., list[Finding]],
        raise_alert: Callable[[Finding], Any],
        kernel: Any = None,
        enforce: bool = False,
        cgroups: CgroupPaths | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.resolve = resolve
        self.lineage = lineage
        self.evaluate = evaluate
        self.raise_alert = raise_alert
        self.kernel = kernel
        self.enforce = enforce
        self.cgroups = cgroups or CgroupPaths()
        self.clock = clock
        self.names = DnsNames()
        self.policy = WirePolicy()
        self._dropped_addresses: set[str] = set()
        self._next_expiry = 0.0

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
        subject = Subject(info, lambda: self.lineage(info), [event.endpoint], wire=facts)
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
        """The process that opened the flow; when it is gone (or its pid
        was reused since), what the event says plus its cgroup."""
        when = event.connect_ns or event.timestamp_ns
        info = self.resolve(event.pid) if event.pid else None
        if info is not None and info.key.start_time > boottime_ns_to_ticks(when) + 1:
            info = None  # started after the connect: the pid was reused
        if info is not None:
            return info
        cgroup = self.cgroups.path_of(event.cgroup_id)
        return ProcessInfo(
            key=ProcessKey(event.pid, 0),
            ppid=0,
            uid=event.uid,
            user="",
            comm=event.comm,
            exe="",
            cmdline=(),
            cwd="",
            cgroup=cgroup,
            attribution=attribute(cgroup),
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


def on_wire(ctx: Any, event: WireEvent) -> None:
    """The handler table's entry: the context's WireHandler, when the wire
    sensor runs (it is the only producer of wire events)."""
    if ctx.wire is not None:
        ctx.wire.handle(event)
