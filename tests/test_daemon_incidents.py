"""The daemon's side of incidents, without a kernel: one alert record per
offender listing every rule, later hits as updates, one kill."""

from __future__ import annotations

import json
from pathlib import Path

from rome_guard.config import Config
from rome_guard.daemon import Guard
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import load_rules
from rome_guard.findings import Finding
from rome_guard.respond.journal import Journal
from rome_guard.respond.kill import KillResult
from tests.detect.helpers import subject

WALLET = "4" + "8" * 94


class CountingKiller:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def kill(self, target, scope="process", descendants=()) -> KillResult:
        self.calls.append((target.pid, scope))
        return KillResult("killed", "", (target.pid,))


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_enforce_kills_once_per_incident(tmp_path: Path) -> None:
    ruleset = load_rules([])
    journal_path = tmp_path / "alerts.jsonl"
    killer = CountingKiller()
    guard = Guard(Config(mode="enforce"), ruleset, Journal(str(journal_path)), killer=killer)
    miner = subject("./w", "-o", "stratum+tcp://10.0.0.9:3333", "-u", WALLET, "-a", "rx/0")
    findings = Engine(ruleset).evaluate(miner)
    assert len(findings) >= 3
    first, rest = findings[:1], findings[1:]
    guard.ctx.alerts.raise_alerts(first)
    guard.ctx.alerts.raise_alerts(rest + first)  # more rules of the same incident, and a repeat
    written = records(journal_path)
    alerts = [r for r in written if r["event"] == "alert"]
    updates = [r for r in written if r["event"] == "incident_update"]
    responses = [r for r in written if r["event"] == "response"]
    assert len(alerts) == 1 and len(updates) == 1 and len(responses) == 1
    assert killer.calls == [(miner.process.pid, "process")]
    assert updates[0]["alert_id"] == alerts[0]["id"]
    assert {h["rule"] for h in updates[0]["rules"]} == {f.rule.id for f in findings}
    # another category on the same process is another incident
    shell_rule = ruleset.get("shell-stdio-socket")
    guard.ctx.alerts.raise_alerts([Finding(shell_rule, miner.process, "fd 0 is a socket")])
    assert len([r for r in records(journal_path) if r["event"] == "alert"]) == 2
    assert len(killer.calls) == 2 and killer.calls[1][1] == "tree"
