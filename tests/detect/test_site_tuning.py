"""Site tuning, Falco style: named conditions (macros), exceptions appended
to a shipped rule from rules.d, a format version, a rule file's own
examples run as tests, and docs/rules.md kept true to the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rome_guard.detect.conditions import CONDITION_KEYS
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import SHIPPED_CATEGORIES, load_rules, rule_files, shipped_rules_dir
from tests.detect.helpers import subject
from tests.detect.test_rule_loader import problems, rome_guard, write

DOCS = Path(__file__).resolve().parents[2] / "docs" / "rules.md"

MACROS = """\
version: 1
macros:
  launcher: {name: [torchrun, deepspeed]}
  launched: {ancestor: {macro: launcher}}
rules:
  - id: site-curl-from-job
    category: site
    severity: low
    description: curl run by a training launcher.
    match:
      all: [{name: [curl]}, {macro: launched}]
    exceptions:
      - macro: text_tool_or_shell   # a shipped macro
"""


def fired(ruleset, s) -> set[str]:
    return {f.rule.id for f in Engine(ruleset).evaluate(s)}


def test_macros_name_a_condition_once(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, MACROS)])
    launcher = subject("torchrun", "train.py", pid=10).process
    assert fired(ruleset, subject("curl", "x", lineage=[launcher])) == {"site-curl-from-job"}
    assert fired(ruleset, subject("curl", "x")) == set()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (MACROS.replace("{macro: launched}", "{macro: lunched}"), 11, "unknown macro 'lunched'"),
        (MACROS.replace("{macro: launcher}}", "{macro: launched}}"), 4, "refers to itself"),
        (MACROS.replace("launcher: {name:", "launcher: {nme:"), 3, "unknown condition 'nme'"),
        ("version: 2\n", 1, "rule format version 2 needs a newer rome-guard"),
        ("version: one\n", 1, "version must be a positive integer"),
    ],
)
def test_macro_and_version_mistakes_name_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, text)
    found = problems([path])
    assert f"{path}:{line}:" in found and message in found, found


def test_exceptions_are_appended_to_a_shipped_rule_without_copying_it(tmp_path: Path) -> None:
    """rules.d/50-site.yaml: our benchmark takes --cpu-priority, and our
    probe checks three ports on purpose."""
    site = write(
        tmp_path,
        "tune:\n"
        "  - rule: miner-only-flags\n"
        "    exceptions:\n"
        "      - name: [cpu-bench]\n"
        "  - rule: probe-netcat-zero-io\n"
        "    exceptions:\n"
        "      - {macro: health_probe}\n"
        "macros:\n"
        "  health_probe: {all: [{name: [nc]}, {arg: ['127.0.0.1']}]}\n",
    )
    shipped = load_rules([])
    tuned = load_rules([site])
    bench = subject("cpu-bench", "--cpu-priority", "5")
    assert fired(shipped, bench) == {"miner-only-flags"}
    assert fired(tuned, bench) == set()
    assert fired(tuned, subject("xmrig-alike", "--cpu-priority", "5")) == {"miner-only-flags"}
    probe = subject("nc", "-z", "127.0.0.1", "22", "80", "443")
    assert fired(shipped, probe) == {"probe-netcat-zero-io"} and fired(tuned, probe) == set()
    # the rule itself is the shipped one: same id, file and line
    assert tuned.get("miner-only-flags").location == shipped.get("miner-only-flags").location


def test_tuning_an_unknown_rule_is_an_error(tmp_path: Path) -> None:
    site = write(tmp_path, "tune:\n  - rule: miner-onyl-flags\n    exceptions: [{name: [x]}]\n")
    assert (
        f"{site}:2:5: tune: no rule 'miner-onyl-flags' to tune (did you mean 'miner-only-flags'?)"
        in problems([site])
    )


def test_rules_test_runs_a_files_own_examples(tmp_path: Path) -> None:
    good = write(
        tmp_path,
        MACROS.replace(
            "    exceptions:",
            "    examples:\n      match: [[curl, x]]\n      no_match: [[wget, x]]\n    exceptions:",
        ),
        "site.yaml",
    )
    result = rome_guard("rules", "test", good)
    # curl outside a launcher does not match: the file's own example is wrong
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAIL site-curl-from-job match: curl x did not match" in result.stdout
    assert "1/2 examples pass" in result.stdout


# Stateful detectors conclude from many events over time (a fanout of
# connects, a GPU context against the registry): no single process an
# example describes can show it (docs/rules.md, "Rules without examples").
WITHOUT_EXAMPLES = {"probe-fanout", "gpu-unregistered-consumer"}


def test_every_shipped_rule_has_passing_positive_and_negative_examples() -> None:
    files = rule_files([shipped_rules_dir()])
    result = rome_guard("rules", "test", "--json", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    examples = json.loads(result.stdout)["examples"]
    assert examples and all(e["passed"] for e in examples)
    kinds: dict[str, set[str]] = {}
    for e in examples:
        kinds.setdefault(e["rule"], set()).add(e["kind"])
    shipped = load_rules([])
    for rule in shipped.rules:
        if rule.id in WITHOUT_EXAMPLES:
            assert rule.detector is not None and rule.id not in kinds
        else:
            assert kinds.get(rule.id) == {"match", "no_match"}, rule.id
    assert {r.id for r in shipped.rules if r.detector} == WITHOUT_EXAMPLES
    documented = DOCS.read_text().split("### Rules without examples", 1)[1].split("\n#", 1)[0]
    assert set(re.findall(r"`([a-z0-9-]+)`", documented)) >= WITHOUT_EXAMPLES


def test_rules_test_runs_examples_with_connections_stdio_parents_files_and_wire(
    tmp_path: Path,
) -> None:
    """The mapping form of an example: what a rule beyond argv looks at."""
    site = write(
        tmp_path,
        "rules:\n"
        "  - id: site-shell-on-socket-under-sshd\n"
        "    category: site\n"
        "    severity: low\n"
        "    description: d\n"
        "    match:\n"
        "      all: [{stdio_socket: true}, {ancestor: {name: [sshd]}}, {remote_port: [22]}]\n"
        "    examples:\n"
        "      match:\n"
        "        - {argv: [sh], stdio: '10.0.0.1:22', connect: '10.0.0.1:22', parents: [[sshd]]}\n"
        "      no_match:\n"
        "        - {argv: [sh], stdio: '10.0.0.1:22', connect: '10.0.0.1:22'}\n"
        "        - {argv: [sh], connect: '10.0.0.1:22', parents: [[sshd]]}\n"
        "  - id: site-pool-first-line\n"
        "    category: site\n"
        "    severity: low\n"
        "    description: d\n"
        "    match: {stratum_method: [mining.subscribe]}\n"
        "    examples:\n"
        '      match: [{argv: [x], payload: \'{"id":1,"method":"mining.subscribe"}\'}]\n'
        "      no_match: [{argv: [x], payload: 'GET / HTTP/1.1'}, [x]]\n",
        "site.yaml",
    )
    result = rome_guard("rules", "test", site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6/6 examples pass (2 rules)" in result.stdout
    bad = write(tmp_path, "rules:\n  - {id: x, category: c, severity: low, description: d,"
                " match: {name: [x]}, examples: {match: [{argv: [x], stdio: nowhere}]}}\n",
                "bad.yaml")  # fmt: skip
    assert "examples.match[0].stdio: 'nowhere' is not ADDR:PORT" in problems([bad])


def _table(heading: str) -> list[list[str]]:
    text = DOCS.read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_docs_shipped_rules_table_matches_the_yaml() -> None:
    documented = {
        row[0]: (row[1], row[2].split()[0]) for row in _table("## Shipped rules") if row[0] != "---"
    }
    shipped = load_rules([])
    assert documented == {r.id: (r.category, r.action) for r in shipped.rules}
    assert {c for c, _ in documented.values()} == set(SHIPPED_CATEGORIES)


def test_docs_conditions_table_matches_the_code() -> None:
    keys = set()
    for row in _table("## Conditions"):
        keys.update(re.findall(r"`(\w+)`", row[0]))
    assert keys == set(CONDITION_KEYS)
