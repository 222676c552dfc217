"""Stateful detectors: conclusions that need a history of events.

``FanoutDetector`` is internal probing (rule detector ``fanout``): one
actor touching many distinct hosts, or many distinct ports on one host,
within a window, in any protocol (Zeek's scan.zeek: hosts per port and
ports per host; a port here is (protocol, port), so a UDP and a TCP probe
of port 53 are two). Each attempt is weighted by its outcome, where the
guard can see one: a TCP connect refused (RST) or failed (timeout, ICMP
unreachable) counts fully, an established one a small fraction. Datagrams
(UDP, UDP-Lite, ICMP/ICMPv6 echo from ping or raw sockets, raw IP packets
as nmap sends them) have no outcome the guard sees -- neither an ICMP port
unreachable nor a reply -- so each distinct destination counts
``datagram_weight`` (1: unanswered until shown otherwise); benign datagram
traffic (DNS, NTP, StatsD, a job's fixed peers, a ping of one gateway) goes
to few destinations and stays below the thresholds by itself.

Who is blamed (the "actor"): a connect counts against the process that
made it. Its parent is an actor only through the children that did not
cross a threshold themselves (a shell loop of short-lived ``nc -z``): a
child that fires on its own takes its attempts out of its parent's (and
its container's) count. The container, pod or Slurm job counts what its
processes did that no process or parent was blamed for. The verdict names
the process to blame and the actor's kind (ACTOR_* below).

Memory is bounded: per-actor history is cut to the window and capped.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from rome_guard.detect.rules import Rule
from rome_guard.events import (
    CONNECT_ATTEMPT,
    CONNECT_BLOCKED,
    CONNECT_ESTABLISHED,
    CONNECT_FAILED,
    CONNECT_REFUSED,
    ProcessInfo,
    ProcessKey,
)

# What an actor is, in the verdict and the alert record (``actor.kind``).
ACTOR_PROCESS = "process"  # the process that made the connects
ACTOR_PARENT = "parent_of_short_lived"  # a parent, through its children together
# and "container", "pod", "slurm": a workload, through its processes (group_of)

MAX_ATTEMPTS_PER_ACTOR = 20000
MAX_ACTORS = 4096


def _top(weights: Counter) -> float:
    return max(weights) if weights else 0.0


@dataclass
class _History:
    """One actor's attempts in the window, with running scores kept up to
    date as attempts enter and leave: scoring is O(1) per event, whatever
    the window holds (a connect storm must not make the daemon quadratic).

    A destination port -- (protocol, port) -- counts with the worst
    (highest) weight of its attempts; a destination with the worst weight
    of its ports. Each attempt remembers its contributor (the process that
    made it), so that a contributor blamed on its own can be taken out."""

    # (t, daddr, port, weight, contributor); port is (protocol, port number)
    attempts: deque = field(default_factory=deque)
    port_weights: dict = field(default_factory=dict)  # (daddr, port) -> Counter{weight: n}
    port_maxima: dict = field(default_factory=dict)  # daddr -> Counter{port max weight: ports}
    port_score: dict = field(default_factory=dict)  # daddr -> sum of its ports' max weights
    destination_score: float = 0.0  # sum over destinations of their max weight
    fired: bool = False

    def add(
        self, now: float, daddr: str, port, weight: float, contributor: ProcessKey | None = None
    ) -> None:
        self.attempts.append((now, daddr, port, weight, contributor))
        self._change(daddr, port, weight, +1)

    def expire(self, now: float, window: float, cap: int) -> None:
        attempts = self.attempts
        while attempts and (now - attempts[0][0] > window or len(attempts) > cap):
            _t, daddr, port, weight, _who = attempts.popleft()
            self._change(daddr, port, weight, -1)

    def remove(self, contributor: ProcessKey) -> None:
        """Take out every attempt of one contributor (O(window), rare)."""
        kept = deque()
        for attempt in self.attempts:
            if attempt[4] == contributor:
                self._change(attempt[1], attempt[2], attempt[3], -1)
            else:
                kept.append(attempt)
        self.attempts = kept

    def contributors(self) -> set:
        return {attempt[4] for attempt in self.attempts}

    def protocols(self) -> str:
        """hosts per protocol, for the reason: "udp 58, icmp 2"."""
        hosts: dict[str, set] = {}
        for _t, daddr, port, _w, _who in self.attempts:
            hosts.setdefault(port[0], set()).add(daddr)
        ranked = sorted(hosts.items(), key=lambda item: -len(item[1]))
        return ", ".join(f"{proto} {len(daddrs)}" for proto, daddrs in ranked)

    def _change(self, daddr: str, port, weight: float, delta: int) -> None:
        key = (daddr, port)
        weights = self.port_weights.setdefault(key, Counter())
        old_port_max = _top(weights)
        weights[weight] += delta
        if weights[weight] <= 0:
            del weights[weight]
        new_port_max = _top(weights)
        if not weights:
            del self.port_weights[key]
        if new_port_max == old_port_max:
            return
        maxima = self.port_maxima.setdefault(daddr, Counter())
        old_destination_max = _top(maxima)
        if old_port_max:
            maxima[old_port_max] -= 1
            if maxima[old_port_max] <= 0:
                del maxima[old_port_max]
        if new_port_max:
            maxima[new_port_max] += 1
        self.port_score[daddr] = self.port_score.get(daddr, 0.0) + new_port_max - old_port_max
        self.destination_score += _top(maxima) - old_destination_max
        if not maxima:
            del self.port_maxima[daddr]
            self.port_score.pop(daddr, None)


@dataclass(frozen=True)
class FanoutVerdict:
    rule: Rule
    reason: str
    destinations: float
    worst_destination: str
    worst_ports: float
    actor_kind: str = ACTOR_PROCESS  # ACTOR_PROCESS, ACTOR_PARENT or a group kind
    actor_id: str = ""  # "pid@start" of the process or parent; the group's id

    @property
    def actor(self) -> dict[str, str]:
        """For the alert record: who was counted, as what."""
        return {"kind": self.actor_kind, "id": self.actor_id}


def group_of(info: ProcessInfo) -> tuple[str, str] | None:
    """The workload a process belongs to: (kind, id) of its container, pod
    or Slurm job, the first that is known."""
    att = info.attribution
    for kind, value in (
        ("container", att.container_id),
        ("pod", att.pod_uid),
        ("slurm", att.slurm_job),
    ):
        if value:
            return kind, value
    return None


class FanoutDetector:
    def __init__(self, rule: Rule):
        self.rule = rule
        p = rule.params
        self.window = float(p["window_s"])
        self.max_ports = float(p["max_ports_per_destination"])
        self.max_destinations = float(p["max_destinations"])
        self.per_container = bool(p["per_container"])
        self.weights = {
            CONNECT_REFUSED: float(p["refused_weight"]),
            CONNECT_FAILED: float(p["failed_weight"]),
            CONNECT_BLOCKED: float(p["failed_weight"]),
            CONNECT_ESTABLISHED: float(p["established_weight"]),
        }
        self.datagram_weight = float(p["datagram_weight"])
        self._actors: dict[tuple, _History] = {}
        # processes (and parents) blamed on their own in the window: their
        # attempts no longer count for their parent's or group's actor
        self._blamed: dict[ProcessKey, float] = {}

    def weight(self, proto: str, outcome: str) -> float:
        """What one attempt counts: TCP by its outcome (an attempt counts
        when its outcome is known), a datagram by datagram_weight."""
        if proto == "tcp" or outcome != CONNECT_ATTEMPT:
            return self.weights.get(outcome, 0.0)
        return self.datagram_weight

    def observe(
        self,
        info: ProcessInfo,
        parent: ProcessInfo | None,
        daddr: str,
        dport: int,
        outcome: str,
        now: float | None = None,
        proto: str = "tcp",
    ) -> list[tuple[FanoutVerdict, ProcessInfo]]:
        """Record one finished connect or one datagram destination; a
        verdict (with the process to blame) the first time an actor crosses
        a threshold in the current window."""
        weight = self.weight(proto, outcome)
        if not weight:
            return []
        now = time.monotonic() if now is None else now
        port = (proto, dport)
        verdicts = []
        key = info.key
        group = group_of(info) if self.per_container else None
        own = self._record(("process", key), now, daddr, port, weight, key)
        if own is not None:
            above = [group] + ([("children", parent.key)] if parent is not None else [])
            self._blame(key, now, {key}, above)
            verdicts.append((self._as(own, ACTOR_PROCESS, str(key)), info))
        if key in self._blamed:
            return verdicts
        counted_parent = (
            parent is not None
            and parent.pid > 1
            and not parent.kernel_thread
            and parent.key not in self._blamed
        )
        if counted_parent:
            through = self._record(("children", parent.key), now, daddr, port, weight, key)
            if through is not None:
                children = self._actors[("children", parent.key)].contributors()
                above = [group, group_of(parent) if self.per_container else None]
                self._blame(parent.key, now, {parent.key, *children}, above)
                verdicts.append((self._as(through, ACTOR_PARENT, str(parent.key)), parent))
                return verdicts
        if group is not None and (parent is None or parent.key not in self._blamed):
            contributed = self._record(group, now, daddr, port, weight, key)
            if contributed is not None:
                verdicts.append((self._as(contributed, group[0], group[1]), info))
        return verdicts

    def _as(self, verdict: FanoutVerdict, kind: str, actor_id: str) -> FanoutVerdict:
        return FanoutVerdict(
            verdict.rule,
            verdict.reason,
            verdict.destinations,
            verdict.worst_destination,
            verdict.worst_ports,
            kind,
            actor_id,
        )

    def _blame(self, key: ProcessKey, now: float, gone: set, above: list) -> None:
        """key crossed a threshold itself: the attempts of gone (key, and a
        parent's children) leave the actors above it (its parent's children
        count, its workload's). Only those histories are touched: O(window),
        never O(every actor)."""
        self._blamed[key] = now
        for actor in above:
            history = self._actors.get(actor) if actor is not None else None
            if history is None:
                continue
            for who in gone & history.contributors():
                history.remove(who)
        if len(self._blamed) > MAX_ACTORS:
            for old in [k for k, t in self._blamed.items() if now - t > self.window]:
                del self._blamed[old]

    def _record(
        self, key: tuple, now: float, daddr: str, port, weight: float, contributor: ProcessKey
    ) -> FanoutVerdict | None:
        history = self._actors.get(key)
        if history is None:
            if len(self._actors) >= MAX_ACTORS:
                self._expire(now)
                if len(self._actors) >= MAX_ACTORS:
                    self._actors.pop(next(iter(self._actors)))
            history = self._actors[key] = _History()
        history.expire(now, self.window, MAX_ATTEMPTS_PER_ACTOR)
        if not history.attempts:
            history.fired = False  # a quiet window: the actor may fire again
        history.add(now, daddr, port, weight, contributor)
        if history.fired:
            return None
        verdict = self._score(history, daddr)
        if verdict is not None:
            history.fired = True
        return verdict

    def _score(self, history: _History, daddr: str) -> FanoutVerdict | None:
        destinations = history.destination_score
        ports = history.port_score.get(daddr, 0.0)
        if destinations >= self.max_destinations:
            reason = (
                f"{len(history.port_maxima)} destinations in {self.window:g}s "
                f"(weighted {destinations:.0f} >= {self.max_destinations:g}; "
                f"hosts by protocol: {history.protocols()})"
            )
        elif ports >= self.max_ports:
            count = sum(history.port_maxima.get(daddr, Counter()).values())
            reason = (
                f"{count} ports on {daddr} in {self.window:g}s "
                f"(weighted {ports:.0f} >= {self.max_ports:g}; "
                f"hosts by protocol: {history.protocols()})"
            )
        else:
            return None
        return FanoutVerdict(self.rule, reason, destinations, daddr, ports)

    def _expire(self, now: float) -> None:
        for key in [
            k
            for k, h in self._actors.items()
            if not h.attempts or now - h.attempts[-1][0] > self.window
        ]:
            del self._actors[key]

    def forget(self, info: ProcessInfo) -> None:
        """The process exited: its own history goes (what it contributed to
        its parent's and group's stays: short-lived children are the point)."""
        self._actors.pop(("process", info.key), None)
