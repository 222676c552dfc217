"""Wire events -> findings: what a new flow's client said, tied to its process.

The kernel reports each new TCP flow's client stream as records placed by
their stream offset (rome_guard.sensors.wire); ClientStreams puts them back
together, bounded per flow and in total, until the stream's last record
(or its time runs out). At each record the handler finds the process that
opened the flow (the pid the kernel recorded with its first payload,
checked against its start time so a reused pid is never blamed), names the destination from
recent DNS answers, parses the stream so far into WireFacts and runs the
wire rules over them: a verdict never depends on where the kernel cut.
DNS answers only teach addresses their names (for a bounded time); in
enforce mode an address named in a pool domain is handed to the kernel,
which then drops new flows to it from the SYN, and a kill verdict the
kernel could not reach itself drops the rest of its flow.

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

from rome_guard.detect.payload import dns_payload, facts_for, parse_dns
from rome_guard.detect.rules import RuleSet
from rome_guard.events import (
    WIRE_DNS_ANSWER,
    WIRE_DNS_QUERY,
    WIRE_DROPPED_CONNECT,
    ProcessInfo,
    WireEvent,
)
from rome_guard.findings import Finding, wire_record
from rome_guard.respond.enforce import WirePolicy, wire_policy
from rome_guard.respond.responses import KILL
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
# client streams being put together: the kernel reports at most
# WIRE_STREAM_MAX bytes of a flow, for at most WIRE_STREAM_NS
STREAMS_MAX = 4096
STREAM_BYTES_MAX = 4096
STREAM_TTL_S = 3.0


@dataclass
class ClientStream:
    """One flow's client stream so far: its chunks by stream offset."""

    first: WireEvent  # the flow's first record seen (process, endpoint)
    chunks: dict[int, bytes] = field(default_factory=dict)
    sni: str = ""
    alpn: str = ""
    dropped: str = ""
    proxy_name: str = ""
    judged: set = field(default_factory=set)  # rule ids already raised on it
    seen: float = 0.0
    ended: bool = False  # the kernel sent the stream's last record

    def add(self, event: WireEvent) -> None:
        if event.offset < STREAM_BYTES_MAX and event.offset not in self.chunks:
            self.chunks[event.offset] = event.payload[: STREAM_BYTES_MAX - event.offset]
        self.sni = self.sni or event.sni
        self.alpn = self.alpn or event.alpn
        self.dropped = self.dropped or event.dropped
        self.proxy_name = self.proxy_name or event.proxy_name

    def whole(self) -> bool:
        """No gap between the first chunk and the last."""
        end = max(at + len(c) for at, c in self.chunks.items()) if self.chunks else 0
        return len(self.data()) == end - (min(self.chunks) if self.chunks else 0)

    def data(self) -> bytes:
        """The stream from its first byte (or its first record seen) up to
        the first gap."""
        parts: list[bytes] = []
        at = min(self.chunks) if self.chunks else 0
        while at in self.chunks and self.chunks[at]:
            parts.append(self.chunks[at])
            at += len(self.chunks[at])
        return b"".join(parts)


class ClientStreams:
    """Cookie -> ClientStream, bounded in count (oldest first out) and in
    time (a stream the kernel stopped reporting is let go)."""

    def __init__(self, limit: int = STREAMS_MAX, ttl_s: float = STREAM_TTL_S):
        self._streams: OrderedDict[int, ClientStream] = OrderedDict()
        self._limit = limit
        self._ttl = ttl_s
        self.evicted = 0  # streams let go before their end, for the limit

    def __len__(self) -> int:
        return len(self._streams)

    def __contains__(self, cookie: int) -> bool:
        return cookie in self._streams

    def add(self, event: WireEvent, now: float) -> ClientStream:
        stream = self._streams.get(event.cookie)
        if stream is None:
            stream = ClientStream(event)
            self._streams[event.cookie] = stream
            while len(self._streams) > self._limit:
                self._streams.popitem(last=False)
                self.evicted += 1
        stream.add(event)
        stream.seen = now
        stream.ended = stream.ended or event.stream_end
        if stream.ended and stream.whole():
            del self._streams[event.cookie]  # a gap waits for its record, or the time
        return stream

    def expire(self, now: float) -> None:
        while self._streams:
            cookie, stream = next(iter(self._streams.items()))
            if now - stream.seen < self._ttl:
                break
            del self._streams[cookie]


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
        self.streams = ClientStreams()
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
        if event.kind in (WIRE_DNS_QUERY, WIRE_DROPPED_CONNECT):
            self._judge(event, event.payload, event.sni, event.alpn, event.dropped, set(), now)
            return
        if event.offset == 0 and event.stream_end and event.cookie not in self.streams:
            # a flow whose first message said all (TLS, SSH, a plain GET): no state
            self._judge(event, event.payload, event.sni, event.alpn, event.dropped, set(), now)
            return
        stream = self.streams.add(event, now)
        self._judge(
            stream.first, stream.data(), stream.sni, stream.alpn, stream.dropped, stream.judged, now
        )

    def _judge(
        self,
        event: WireEvent,
        payload: bytes,
        sni: str,
        alpn: str,
        dropped: str,
        judged: set,
        now: float,
    ) -> None:
        """Run the wire rules over what a flow has said so far; raise what
        they find that was not raised on this flow before."""
        facts = facts_for(
            payload,
            event.endpoint.proto,
            event.endpoint.dport,
            sni=sni,
            alpn=alpn,
            remote_name=self.names.name_of(event.endpoint.daddr, now),
            dropped=dropped,
        )
        info = self.process_of(event)
        # built by the process model, as for exec alerts: the same process
        # object (attribution, env keys), lineage and stdio
        subject = self.processes.subject(info, [event.endpoint], wire=facts)
        findings = [f for f in self.evaluate(subject, event.endpoint) if f.rule.id not in judged]
        if findings:
            judged.update(f.rule.id for f in findings)
            self._stop_flow(event, findings, dropped)
            record = wire_record(event, facts, payload)
            for finding in findings:
                finding.extra["wire"] = record
                self.raise_alert(finding)
        if dropped and not findings and not judged:
            log.warning(
                "kernel dropped a flow (%s) of pid %d that no rule claims: %s",
                dropped,
                event.pid,
                one_line(facts.method or facts.sni or facts.remote_name, 64),
            )

    def _stop_flow(self, event: WireEvent, findings: list[Finding], dropped: str) -> None:
        """Enforce mode: a kill verdict the kernel could not reach itself
        (a method only a later message, a WebSocket frame or an HTTP body
        names; a tunnel's upgrade) drops the rest of the flow in the kernel
        before the kill."""
        if (
            self.kernel is None
            or not self.enforce
            or dropped
            or event.endpoint.proto != "tcp"
            or not any(f.rule.action == KILL.name for f in findings)
        ):
            return
        try:
            self.kernel.drop_flow(event.cookie)
        except (ValueError, OSError, KeyError) as exc:
            log.warning("cannot drop flow %d in the kernel: %s", event.cookie, exc)

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
        self.streams.expire(now)
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
