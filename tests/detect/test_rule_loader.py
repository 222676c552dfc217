"""The loader rejects bad rule files whole, with path:line: what is wrong."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import load_rules
from rome_guard.yamlsrc import SourceError
from tests.detect.helpers import process, subject

GOOD = """\
lists:
  my_tools: [frobnicate, "longtoolname-with-suffix"]
rules:
  - id: custom-tool
    category: custom
    severity: low
    description: A custom tool.
    match:
      name: $my_tools
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def problems(paths: list[str]) -> str:
    with pytest.raises(SourceError) as exc:
        load_rules(paths)
    return str(exc.value)


def test_good_extra_file_loads_and_matches(tmp_path: Path) -> None:
    ruleset = load_rules([write(tmp_path, GOOD)])
    assert ruleset.get("custom-tool") is not None
    engine = Engine(ruleset)
    assert {f.rule.id for f in engine.evaluate(subject("frobnicate"))} == {"custom-tool"}
    # comm is cut to 15 bytes by the kernel; the cut name still matches
    cut = subject("x", comm="longtoolname-wi", exe="/memfd:x (deleted)")
    assert {f.rule.id for f in engine.evaluate(cut)} == {"custom-tool"}
    assert not engine.evaluate(subject("frobnicator"))


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "rules:\n  - id: x\n    category: miner\n    severity: urgent\n    description: d\n    match: {name: [a]}\n",
            4,
            "severity must be one of critical, high, medium, low",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    match: {name: [a]}\n",
            2,
            "missing required key 'description'",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match:\n      nmae: [a]\n",
            7,
            "unknown condition 'nmae'",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match:\n      name: $nope\n",
            7,
            "unknown list '$nope'",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match:\n      cmdline_regex: '(unclosed'\n",
            7,
            "not accepted by the linear-time regex engine",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match:\n      remote_port: [70000]\n",
            7,
            "out of range",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    action: nuke\n    match: {name: [a]}\n",
            6,
            "action must be one of alert, kill",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    detector: fanout\n    params:\n      window: 3\n",
            8,
            "fanout has no parameter 'window'",
        ),
        (
            "rules:\n  - id: Bad Id\n    category: miner\n    severity: low\n    description: d\n    match: {name: [a]}\n",
            2,
            "id 'Bad Id' must match",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match:\n      getopt: {spec: 'ab:', flags: [z]}\n",
            7,
            "'z' is not an option in spec",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match: {name: [a]}\n    extra: 1\n",
            7,
            "unknown rule key 'extra'",
        ),
        ("rules: [\n", 2, "invalid YAML"),
        ("lists:\n  a: []\n", 2, "must be a non-empty list"),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match: {remote_cidr: [10.0.0.300/8]}\n",
            6,
            "is not a CIDR",
        ),
        (
            "rules:\n  - id: x\n    category: miner\n    severity: low\n    description: d\n    match: {name: [a]}\n    examples:\n      match:\n        - {argv: [sh], relay: [nc]}\n",
            9,
            "unknown key 'relay'",
        ),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    path = write(tmp_path, text)
    report = problems([path])
    assert re.search(rf"{re.escape(path)}:{line}:\d+: ", report), report
    assert message in report


def test_duplicate_rule_id_across_files_points_at_both(tmp_path: Path) -> None:
    rule = "rules:\n  - id: dup\n    category: c\n    severity: low\n    description: d\n    match: {name: [a]}\n"
    first, second = write(tmp_path, rule, "a.yaml"), write(tmp_path, rule, "b.yaml")
    report = problems([first, second])
    assert f"{second}:2:5: rule id 'dup' is already defined at {first}:2:5" in report


def test_shipped_rule_id_cannot_be_redefined_silently(tmp_path: Path) -> None:
    text = "rules:\n  - id: miner-known-binary\n    category: miner\n    severity: low\n    description: d\n    match: {name: [a]}\n"
    assert "already defined" in problems([write(tmp_path, text)])


def test_one_bad_rule_rejects_the_whole_set_and_reports_every_mistake(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD, "good.yaml")
    bad = write(
        tmp_path,
        "rules:\n  - id: a\n    category: c\n    severity: x\n    description: d\n    match: {name: [a]}\n"
        "  - id: b\n    category: c\n    severity: low\n    description: d\n    match: {bogus: 1}\n",
        "bad.yaml",
    )
    report = problems([good, bad])
    assert f"{bad}:4:" in report and f"{bad}:11:" in report


def test_disabled_rule_is_not_loaded(tmp_path: Path) -> None:
    text = GOOD.replace("    match:", "    enabled: false\n    match:")
    assert load_rules([write(tmp_path, text)]).get("custom-tool") is None


def test_exceptions_suppress(tmp_path: Path) -> None:
    text = GOOD + "    exceptions:\n      - cwd: ['/srv/*']\n"
    engine = Engine(load_rules([write(tmp_path, text)]))
    assert engine.evaluate(subject("frobnicate"))
    quiet = Engine(load_rules([write(tmp_path, text)]))
    from rome_guard.detect.subject import Subject

    assert not quiet.evaluate(Subject(process("frobnicate", cwd="/srv/app")))


def rome_guard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rome_guard", *args], capture_output=True, text=True, check=False
    )


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, GOOD, "good.yaml")
    ok = rome_guard("rules", "validate", good)
    assert ok.returncode == 0, ok.stderr
    bad = write(tmp_path, "rules:\n  - id: x\n    category: miner\n", "bad.yaml")
    result = rome_guard("rules", "validate", good, bad)
    assert result.returncode == 2
    assert f"{bad}:2:5: rule is missing required key" in result.stderr
    missing = rome_guard("rules", "validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "nope.yaml:1:" in missing.stderr


def test_shipped_rules_validate_cleanly() -> None:
    from rome_guard.detect.rules import rule_files, shipped_rules_dir

    files = rule_files([shipped_rules_dir()])
    assert len(files) >= 5
    result = rome_guard("rules", "validate", *files)
    assert result.returncode == 0, result.stderr
    assert f"from {len(files)} files" in result.stdout


def test_config_can_disable_a_shipped_rule_but_not_a_missing_one(tmp_path: Path) -> None:
    ruleset = load_rules([], disabled=["miner-known-binary"], disabled_source="c.yaml")
    assert ruleset.get("miner-known-binary") is None and ruleset.get("miner-pool-url") is not None
    assert not Engine(ruleset).evaluate(subject("/opt/xmrig"))
    with pytest.raises(SourceError) as exc:
        load_rules([], disabled=["miner-known-binry"], disabled_source="c.yaml")
    assert "c.yaml:1: disabled_rules names unknown rule 'miner-known-binry'" in str(exc.value)
