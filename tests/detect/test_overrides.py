"""Tuning without forking (Falco's append/override, Sigma's tags): a
rules.d file appends to shipped lists and macros, changes a shipped rule
by id (severity, action, mode, enabled, exceptions), stages a kill rule in
``mode: monitor``, disables rules by id, glob or tag, and every mistake in
it is reported at once with ``file:line:column``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rome_guard.detect import rules as rulesmod
from rome_guard.detect.engine import Engine
from rome_guard.detect.incidents import kill_rule_finding
from rome_guard.detect.rules import load_rules
from rome_guard.findings import Finding, finding_record, rules_record
from rome_guard.respond.enforce import policy_for, wire_policy
from tests.detect.helpers import subject
from tests.detect.test_rule_loader import problems, rome_guard, write

# One site file doing what a security team asks for on day one.
SITE = """\
version: 1
append:
  lists:
    pool_domains: [pool.example.net]      # our threat feed's pool
    scanners: [portprobe]                 # an in-house scanner
  macros:
    text_tool: {name: [bat]}              # bat displays text, like cat
tune:
  - rule: tunnel-ssh-remote-forward       # kill rule, staged: alert first
    mode: monitor
    examples:
      match: [[ssh, -fNR, "2222:localhost:22", jump@bastion.example.org]]
  - rule: miner-pool-domain
    examples:
      match: [[./worker, -o, "eu1.pool.example.net:4444"]]
      no_match: [[pip, download, --index-url, "https://pypi.example.net/simple", torch]]
  - rule: probe-scanner-binary
    severity: high
    examples:
      match: [[portprobe, 10.0.0.0/24]]
disable:
  - tag: mitre-t1552.005                  # the metadata-service rule: our nodes use IMDS
"""


def fired(ruleset, s) -> set[str]:
    return {f.rule.id for f in Engine(ruleset).evaluate(s)}


@pytest.fixture(scope="module")
def shipped():
    return load_rules([])


@pytest.fixture
def tuned(tmp_path: Path):
    return load_rules([write(tmp_path, SITE, "50-site.yaml")])


def test_appending_to_a_shipped_list_reaches_every_rule_and_the_kernel(shipped, tuned) -> None:
    worker = subject("worker", "-o", "eu1.pool.example.net:4444")
    assert fired(shipped, worker) == set()
    assert fired(tuned, worker) == {"miner-pool-domain"}
    assert "pool.example.net" in tuned.lists["pool_domains"]
    assert set(shipped.lists["pool_domains"]) < set(tuned.lists["pool_domains"])
    # the wire rules' kernel drop list is the same list
    assert "pool.example.net" in wire_policy(tuned).hosts
    assert "pool.example.net" not in wire_policy(shipped).hosts
    assert fired(tuned, subject("portprobe", "10.0.0.0/24")) == {"probe-scanner-binary"}
    assert fired(shipped, subject("portprobe", "10.0.0.0/24")) == set()


def test_appending_to_a_shipped_macro_widens_every_rule_that_uses_it(shipped, tuned) -> None:
    shown = subject("bat", "-a", "rx/0", "-o", "pool.example.org:3333")
    assert fired(shipped, shown) == {"miner-algorithm-and-pool"}
    assert fired(tuned, shown) == set()  # text_tool now covers bat
    miner = subject("kworker", "-a", "rx/0", "-o", "pool.example.org:3333")
    assert fired(tuned, miner) == {"miner-algorithm-and-pool"}


def test_tune_changes_a_shipped_rule_by_id_without_copying_it(shipped, tuned) -> None:
    rule, before = tuned.get("probe-scanner-binary"), shipped.get("probe-scanner-binary")
    assert (before.severity, rule.severity) == ("medium", "high")
    assert rule.location == before.location  # still the shipped rule, from its file
    assert rule.tuned_at and rule.tuned_at[0].path.endswith("50-site.yaml")


def test_tune_sets_action_enabled_and_appends_or_replaces_exceptions(tmp_path: Path) -> None:
    site = write(
        tmp_path,
        "tune:\n"
        "  - rule: tunnel-socat-forward\n"
        "    action: kill\n"
        "    kill_scope: tree\n"
        "  - rule: miner-only-flags\n"
        "    replace_exceptions: []\n"  # the shipped text-tool exception is gone
        "  - rule: probe-netcat-zero-io\n"
        "    enabled: false\n",
    )
    ruleset = load_rules([site])
    socat = ruleset.get("tunnel-socat-forward")
    assert (socat.action, socat.kill_scope, socat.enforces) == ("kill", "tree", True)
    assert fired(ruleset, subject("grep", "--donate-level", "notes.txt")) == {"miner-only-flags"}
    assert fired(load_rules([]), subject("grep", "--donate-level", "notes.txt")) == set()
    assert ruleset.get("probe-netcat-zero-io") is None
    assert [r.id for r in ruleset.left_out] == ["probe-netcat-zero-io"]


def test_a_monitor_mode_kill_rule_alerts_but_never_kills_or_fills_the_kernel(
    shipped, tmp_path: Path
) -> None:
    site = write(tmp_path, "tune:\n  - rule: miner-known-binary\n    mode: monitor\n")
    staged = load_rules([site])
    rule = staged.get("miner-known-binary")
    assert rule.action == "kill" and rule.mode == "monitor" and not rule.enforces
    xmrig = subject("xmrig", "--config", "c.json")
    assert fired(staged, xmrig) == {"miner-known-binary"}  # it still alerts
    # no kernel deny-list entry for it, while the shipped rule has one
    assert "xmrig" in policy_for(shipped, resolve=lambda _h: []).deny_names
    assert "xmrig" not in policy_for(staged, resolve=lambda _h: []).deny_names
    finding = Finding(rule=rule, process=xmrig.process, reason="name xmrig")
    assert kill_rule_finding([finding]) is None
    record = finding_record(finding, "alert", 0.0, "host")
    assert record["rule_mode"] == "monitor"
    assert rules_record([finding])[0]["mode"] == "monitor"
    assert "rule_mode" not in finding_record(
        Finding(rule=shipped.get("miner-known-binary"), process=xmrig.process, reason="x"),
        "kill",
        0.0,
        "host",
    )


def test_a_rule_may_ship_in_monitor_mode_and_a_site_promotes_it(tmp_path: Path) -> None:
    staged = write(
        tmp_path,
        "rules:\n"
        "  - id: site-new-killer\n"
        "    category: miner\n"
        "    severity: high\n"
        "    description: A new kill rule, staged.\n"
        "    action: kill\n"
        "    mode: monitor\n"
        "    match: {name: [newminer]}\n",
        "10-staged.yaml",
    )
    assert not load_rules([staged]).get("site-new-killer").enforces
    promote = write(tmp_path, "tune:\n  - rule: site-new-killer\n    mode: enforce\n", "20-go.yaml")
    assert load_rules([staged, promote]).get("site-new-killer").enforces


@pytest.mark.parametrize(
    ("selector", "chosen", "among"),
    [
        ("{rule: tunnel-ssh-unusual-port}", lambda r: r.id == "tunnel-ssh-unusual-port",
         {"tunnel-ssh-unusual-port"}),
        ("{rule: 'tunnel-ssh-*'}", lambda r: r.id.startswith("tunnel-ssh-"),
         {"tunnel-ssh-remote-forward", "tunnel-ssh-dynamic-or-tun", "tunnel-ssh-unusual-port"}),
        ("{tag: mitre-t1046}", lambda r: "mitre-t1046" in r.tags,
         {"probe-fanout", "probe-scanner-binary", "probe-netcat-zero-io"}),
    ],
)  # fmt: skip
def test_disable_by_id_glob_or_tag(
    shipped, tmp_path: Path, selector: str, chosen, among: set
) -> None:
    ruleset = load_rules([write(tmp_path, f"disable:\n  - {selector}\n")])
    gone = {r.id for r in shipped.rules} - {r.id for r in ruleset.rules}
    assert gone == {r.id for r in shipped.rules if chosen(r)} and among <= gone
    assert {r.id for r in ruleset.left_out} == gone


def test_a_later_file_re_enables_what_an_earlier_one_disabled(tmp_path: Path) -> None:
    off = write(tmp_path, "disable:\n  - {tag: mitre-t1046}\n", "10-off.yaml")
    back = write(tmp_path, "tune:\n  - {rule: probe-scanner-binary, enabled: true}\n", "20-on.yaml")
    ruleset = load_rules([str(tmp_path)])
    assert ruleset.sources[-2:] == [off, back]
    assert ruleset.get("probe-scanner-binary") is not None
    assert ruleset.get("probe-netcat-zero-io") is None


MISTAKES = """\
append:
  lists:
    pool_domain: [pool.example.net]
    scanners: {portprobe: yes}
tune:
  - rule: miner-pool-domian
    severity: urgent
  - rule: tunnel-tool
    mode: audit
    enabled: "no"
    exceptions: [{nmae: [x]}]
disable:
  - tag: mitre-t9999
  - rule: "probe-zz*"
"""


def test_every_mistake_of_a_tuning_file_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, MISTAKES)
    lines = problems([path]).splitlines()
    expected = [
        (3, 5, "append.lists: no list 'pool_domain' to append to (did you mean 'pool_domains'?)"),
        (4, 5, "append.lists: list 'scanners' must be a non-empty list"),
        (6, 5, "tune: no rule 'miner-pool-domian' to tune (did you mean 'miner-pool-domain'?)"),
        (7, 5, "tune miner-pool-domian: severity must be one of critical, high, medium, low"),
        (9, 5, "tune tunnel-tool: mode must be one of enforce, monitor, got 'audit'"),
        (10, 5, "tune tunnel-tool: enabled must be true or false, got 'no'"),
        (11, 19, "unknown condition 'nmae'"),
        (13, 5, "disable: no rule has tag 'mitre-t9999'"),
        (14, 5, "disable: no rule matches 'probe-zz*'"),
    ]
    assert len(lines) == len(expected), lines
    for index, (row, column, message) in enumerate(expected):
        line = lines[index]
        assert line.startswith(f"{path}:{row}:{column}: ") and message in line, (line, message)


def test_a_shipped_list_or_rule_defined_again_says_how_to_tune_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "lists:\n  pool_domains: [x.example]\n"
        "rules:\n  - {id: miner-pool-domain, category: miner, severity: low,"
        " description: d, match: {name: [x]}}\n",
    )
    found = problems([path])
    assert "append: {lists: {pool_domains: [...]}}" in found
    assert "tune: [{rule: miner-pool-domain, ...}]" in found


def test_rules_test_proves_each_effect_of_a_site_file(tmp_path: Path) -> None:
    """Done-when: the site file adds a pool domain, downgrades a kill rule
    to monitor and disables a tag; `rules test` shows each effect."""
    site = write(tmp_path, SITE, "50-site.yaml")
    result = rome_guard("rules", "test", "--json", site)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    examples = {(e["rule"], e["kind"], tuple(e["argv"])): e for e in report["examples"]}
    # the appended pool domain: the site's example matches the tuned rule
    pool = examples[("miner-pool-domain", "match", ("./worker", "-o", "eu1.pool.example.net:4444"))]
    assert pool["passed"] and pool["response"] == "kill"
    # the downgraded rule matches and, in enforce mode, only alerts
    staged = [e for e in report["examples"] if e["rule"] == "tunnel-ssh-remote-forward"]
    assert staged and all(e["passed"] for e in staged)
    assert {e["response"] for e in staged if e["kind"] == "match"} == {"alert"}
    tuned = {t["rule"]: t for t in report["tuned"]}
    assert tuned["tunnel-ssh-remote-forward"]["enforce_response"] == "alert"
    assert tuned["tunnel-ssh-remote-forward"]["mode"] == "monitor"
    # the disabled tag's rule is reported as left out, by this file's line
    assert [d["rule"] for d in report["disabled"]] == ["probe-metadata-service"]
    assert report["disabled"][0]["by"].startswith(f"{site}:")
    text = rome_guard("rules", "test", str(tmp_path))  # rules.d as a directory
    assert "tuned tunnel-ssh-remote-forward at" in text.stdout
    assert "mode monitor (in enforce mode it alerts only)" in text.stdout
    assert re.search(r"disabled probe-metadata-service by .*50-site.yaml:\d+:\d+", text.stdout)
    # without the append the same example fails: the test proves the effect
    unappended = SITE.replace(
        "    pool_domains: [pool.example.net]      # our threat feed's pool\n", ""
    )
    bare = write(tmp_path, unappended, "51-bare.yaml")
    failing = rome_guard("rules", "test", bare)
    assert failing.returncode == 1
    assert "FAIL miner-pool-domain match: ./worker -o eu1.pool.example.net:4444" in failing.stdout


def _docs_table(after: str) -> list[str]:
    """The first column of the first table after a line of docs/rules.md."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "rules.md").read_text()
    rows = text.split(after, 1)[1].lstrip().split("\n\n", 1)[0].splitlines()[2:]
    return [row.strip("|").split("|")[0].strip() for row in rows]


def test_docs_tuning_tables_match_the_code() -> None:
    sections = _docs_table("Sigma's tags, in this file format's words:")
    assert sections == ["`append.lists`", "`append.macros`", "`tune`", "`disable`"]
    assert {s.strip("`").split(".")[0] for s in sections} == set(rulesmod._TOP_KEYS) - {
        "version", "lists", "macros", "rules"
    }  # fmt: skip
    assert [k.strip("`") for k in _docs_table("A `tune` entry's keys:")] == list(
        rulesmod._TUNE_KEYS
    )
    example_keys = [
        k.strip("`") for k in _docs_table("for rules that look further than the command line:")
    ]
    assert example_keys == list(rulesmod.EXAMPLE_KEYS)
