"""Stateful detectors: conclusions that need a history of events.

``FanoutDetector`` is internal probing (rule detector ``fanout``): one
actor (a process, or a whole container/job) touching many distinct
destinations, or many distinct ports on one destination, within a window.
Each attempt is weighted by its outcome -- refused and failed count fully,
established counts a quarter by default -- so a port scan or a sweep
stands out while distributed-training fan-out (hundreds of successful
connects to a rendezvous port) does not. Thresholds come from the rule.

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
)

MAX_ATTEMPTS_PER_ACTOR = 20000
MAX_ACTORS = 4096


def _top(weights: Counter) -> float:
    return max(weights) if weights else 0.0


@dataclass
class _History:
    """One actor's attempts in the window, with running scores kept up to
    date as attempts enter and leave: scoring is O(1) per event, whatever
    the window holds (a connect storm must not make the daemon quadratic).

    A destination port counts with the worst (highest) weight of its
    attempts; a destination with the worst weight of its ports."""

    attempts: deque = field(default_factory=deque)  # (t, daddr, dport, weight)
    port_weights: dict = field(default_factory=dict)  # (daddr, dport) -> Counter{weight: n}
    port_maxima: dict = field(default_factory=dict)  # daddr -> Counter{port max weight: ports}
    port_score: dict = field(default_factory=dict)  # daddr -> sum of its ports' max weights
    destination_score: float = 0.0  # sum over destinations of their max weight
    fired: bool = False

    def add(self, now: float, daddr: str, dport: int, weight: float) -> None:
        self.attempts.append((now, daddr, dport, weight))
        self._change(daddr, dport, weight, +1)

    def expire(self, now: float, window: float, cap: int) -> None:
        attempts = self.attempts
        while attempts and (now - attempts[0][0] > window or len(attempts) > cap):
            _t, daddr, dport, weight = attempts.popleft()
            self._change(daddr, dport, weight, -1)

    def _change(self, daddr: str, dport: int, weight: float, delta: int) -> None:
        key = (daddr, dport)
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


def actors(
    info: ProcessInfo, parent: ProcessInfo | None, per_container: bool
) -> list[tuple[tuple, ProcessInfo]]:
    """Who a connect counts against: the process itself; its parent, so a
    shell loop that runs one short-lived probe per port (subshells, nc -z)
    is seen as the one scanner it is; and its container, pod or Slurm job."""
    result = [(("process", info.key), info)]
    if parent is not None and parent.pid > 1 and not parent.kernel_thread:
        result.append((("process", parent.key), parent))
    att = info.attribution
    if per_container:
        for kind, value in (
            ("container", att.container_id),
            ("pod", att.pod_uid),
            ("slurm", att.slurm_job),
        ):
            if value:
                result.append(((kind, value), info))
                break
    return result


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
        self._actors: dict[tuple, _History] = {}

    def observe(
        self,
        info: ProcessInfo,
        parent: ProcessInfo | None,
        daddr: str,
        dport: int,
        outcome: str,
        now: float | None = None,
    ) -> list[tuple[FanoutVerdict, ProcessInfo]]:
        """Record one finished connect; a verdict (with the process to blame)
        the first time an actor crosses a threshold in the current window."""
        if outcome == CONNECT_ATTEMPT:
            return []  # counted when its outcome is known
        weight = self.weights.get(outcome)
        if not weight:
            return []
        now = time.monotonic() if now is None else now
        verdicts = []
        for key, blamed in actors(info, parent, self.per_container):
            verdict = self._record(key, now, daddr, dport, weight)
            if verdict is not None:
                verdicts.append((verdict, blamed))
        return verdicts

    def _record(
        self, key: tuple, now: float, daddr: str, dport: int, weight: float
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
        history.add(now, daddr, dport, weight)
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
                f"(weighted {destinations:.0f} >= {self.max_destinations:g})"
            )
        elif ports >= self.max_ports:
            count = sum(history.port_maxima.get(daddr, Counter()).values())
            reason = (
                f"{count} ports on {daddr} in {self.window:g}s "
                f"(weighted {ports:.0f} >= {self.max_ports:g})"
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
        self._actors.pop(("process", info.key), None)
