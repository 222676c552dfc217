"""`rome-guard rules validate` and `rome-guard config check`: every mistake
in one run, each as file:line:column, exit 2; a clean set exits 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from rome_guard.detect.rules import load_rules

ERROR_LINE = re.compile(r"^(?P<path>/[^:]+):(?P<line>\d+):(?P<column>\d+): (?P<message>.+)$")

FIVE_MISTAKES = """\
rules:
  - id: site-curl
    category: site
    severity: urgent
    description: curl from a job.
    action: slay
    match: {name: [curl]}
  - id: site-wget
    category: site
    severity: low
    description: wget from a job.
    match: {nmae: [wget]}
  - id: site-fetch
    category: site
    severity: low
    description: a fetcher.
    match: {name: $fetchers}
tune:
  - rule: miner-pool-domian
    mode: monitor
"""
# line, column, message of each (two in one rule: no longer one per rule per pass)
EXPECTED = [
    (4, 5, "rule site-curl: severity must be one of critical, high, medium, low, got 'urgent'"),
    (6, 5, "rule site-curl: action must be one of alert, kill, got 'slay'"),
    (12, 13, "unknown condition 'nmae'"),
    (17, 13, "name: unknown list '$fetchers'"),
    (19, 5, "tune: no rule 'miner-pool-domian' to tune (did you mean 'miner-pool-domain'?)"),
]


def rome_guard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rome_guard", *args], capture_output=True, text=True, check=False
    )


def errors(stderr: str) -> list[tuple[str, int, int, str]]:
    found = []
    for line in stderr.splitlines():
        m = ERROR_LINE.match(line)
        if m:
            found.append((m["path"], int(m["line"]), int(m["column"]), m["message"]))
    return found


def test_rules_validate_reports_five_mistakes_in_one_run(tmp_path: Path) -> None:
    path = tmp_path / "50-site.yaml"
    path.write_text(FIVE_MISTAKES)
    result = rome_guard("rules", "validate", str(path))
    assert result.returncode == 2, result.stderr
    found = errors(result.stderr)
    assert [(line, column) for _p, line, column, _m in found] == [(r, c) for r, c, _ in EXPECTED]
    for (p, _line, _column, message), (_r, _c, expected) in zip(found, EXPECTED):  # noqa: B905
        assert p == str(path) and expected in message, (message, expected)
    assert result.stderr.rstrip().endswith("5 errors")


def test_rules_validate_names_a_missing_path_beside_the_other_errors(tmp_path: Path) -> None:
    path = tmp_path / "50-site.yaml"
    path.write_text(FIVE_MISTAKES)
    missing = tmp_path / "nope.yaml"
    result = rome_guard("rules", "validate", str(path), str(missing))
    assert result.returncode == 2
    assert f"{missing}:1: no such file or directory" in result.stderr
    assert len(errors(result.stderr)) == 5  # and still every mistake of the other file


def test_rules_validate_accepts_a_clean_file(tmp_path: Path) -> None:
    path = tmp_path / "50-site.yaml"
    path.write_text(
        "rules:\n  - {id: site-curl, category: site, severity: low, description: d,"
        " match: {name: [curl]}}\n"
    )
    result = rome_guard("rules", "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"ok: {len(load_rules([])) + 1} rules")  # shipped + this


def test_config_check_reports_the_config_and_its_rules_at_once(tmp_path: Path) -> None:
    rules_d = tmp_path / "rules.d"
    rules_d.mkdir()
    (rules_d / "50-site.yaml").write_text("disable:\n  - {tag: mitre-t9999}\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "mode: enforcing\n"
        f"rules: [{rules_d}]\n"
        "gpu:\n"
        "  poll_interval: often\n"
        "  allow:\n"
        "    - {name: nightly, exe: /opt/nightly/bin/*, colour: blue}\n"
        "metrics:\n"
        "  adr: ':9985'\n"
    )
    result = rome_guard("config", "check", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    found = {(Path(p).name, line, column): m for p, line, column, m in errors(result.stderr)}
    assert found.keys() == {
        ("config.yaml", 1, 1),
        ("config.yaml", 4, 3),
        ("config.yaml", 6, 48),
        ("config.yaml", 8, 3),
        ("50-site.yaml", 2, 6),
    }, result.stderr
    assert "mode must be one of monitor, enforce, got 'enforcing'" in found[("config.yaml", 1, 1)]
    assert "gpu.poll_interval must be a number" in found[("config.yaml", 4, 3)]
    assert "gpu.allow[0]: unknown key 'colour'" in found[("config.yaml", 6, 48)]
    assert "unknown key 'metrics.adr'" in found[("config.yaml", 8, 3)]
    assert "disable: no rule has tag 'mitre-t9999'" in found[("50-site.yaml", 2, 6)]
    assert result.stderr.rstrip().endswith("5 errors")


def test_config_check_passes_the_shipped_config_and_says_what_it_loads() -> None:
    shipped = Path(__file__).resolve().parents[1] / "systemd" / "config.yaml"
    result = rome_guard("config", "check", str(shipped))
    assert result.returncode == 0, result.stderr
    assert re.match(r"ok: .*config\.yaml: mode monitor, \d+ rules from \d+ files", result.stdout)


def test_every_mistake_inside_prevent_and_params_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "50-site.yaml"
    path.write_text(
        "rules:\n"
        "  - id: site-pool\n"
        "    category: site\n"
        "    severity: low\n"
        "    description: d\n"
        "    action: kill\n"
        "    match: {name: [x]}\n"
        "    prevent:\n"
        "      block_ports: [70000]\n"
        "      block_cidrs: [10.0.0.300/8]\n"
        "      kill_on_connect: maybe\n"
        "  - id: site-fanout\n"
        "    category: site\n"
        "    severity: low\n"
        "    description: d\n"
        "    detector: fanout\n"
        "    params: {window: 3, max_destinations: -1}\n"
    )
    result = rome_guard("rules", "validate", str(path))
    assert result.returncode == 2
    assert [(line, column) for _p, line, column, _m in errors(result.stderr)] == [
        (9, 7),
        (10, 7),
        (11, 7),
        (17, 14),
        (17, 25),
    ], result.stderr
