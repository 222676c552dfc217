"""Hostile rule files: a catastrophic regex and a YAML alias bomb, on
`rules validate`, at start and on a SIGHUP reload. The guard keeps its
rules, stays responsive, and still catches a miner afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import require_root
from tests.faults.conftest import miner_still_caught
from tests.fixtures.daemon import by_pid, daemon

CATASTROPHIC = """rules:
  - id: site-catastrophic
    category: custom
    severity: low
    description: a pattern that backtracks exponentially in Python's re
    match:
      cmdline_regex: "(a+)+$"
"""

# "billion laughs": 9 levels of 9 aliases each, 9**9 strings once expanded
ALIAS_BOMB = "\n".join(
    [
        "lists:",
        '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(f"  l{n}: &l{n} [{','.join([f'*l{n - 1}'] * 9)}]" for n in range(1, 9)),
        "rules: []",
        "",
    ]
)
BACKREF_RULE = """rules:
  - id: site-backref
    category: custom
    severity: low
    description: a backreference cannot run in linear time
    match:
      arg_regex: "^(a|b)\\\\1$"
"""


def validate(path: Path) -> tuple[int, str, int]:
    """rome-guard rules validate: exit status, stderr, its own peak RSS (KiB)."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rome_guard", "rules", "validate", str(path)],
            stderr=err,
            stdout=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read(), usage.ru_maxrss


def test_validate_refuses_an_alias_bomb_with_its_line_and_small_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    status, err, peak_kib = validate(bomb)
    assert status == 2
    assert f"{bomb}:" in err and "alias" in err
    line = int(err.split(f"{bomb}:", 1)[1].split(":", 1)[0])
    assert 2 <= line <= 10  # one of the bomb's levels
    assert peak_kib < 300 * 1024  # main took 5.3 GB


def test_validate_reports_an_unboundable_pattern_with_its_line(tmp_path: Path) -> None:
    rules = tmp_path / "backref.yaml"
    rules.write_text(BACKREF_RULE)
    status, err, _ = validate(rules)
    assert status == 2
    assert f"{rules}:7:7: arg_regex: not accepted by the linear-time regex engine" in err


def test_catastrophic_regex_costs_nothing_and_the_miner_after_it_is_caught(
    tmp_path: Path,
) -> None:
    require_root()
    rules = tmp_path / "site.yaml"
    rules.write_text(CATASTROPHIC)
    with daemon("--rules", str(rules), mode="enforce") as d:
        # the input that kept main's daemon at 99% CPU for 55 s, several times
        for _ in range(3):
            subprocess.run(["/bin/echo", "a" * 30 + "!"], stdout=subprocess.DEVNULL, check=True)
        miner_still_caught(d, str(tmp_path))
        # the rule is live, not dropped: a command line that ends in a's matches
        subprocess.run(["/bin/echo", "aaaa"], stdout=subprocess.DEVNULL, check=True)
        d.wait_alert(lambda r: r["rule"] == "site-catastrophic")
        assert d.proc.poll() is None


def test_alias_bomb_on_sighup_keeps_the_old_rules_and_the_daemon_responsive(
    tmp_path: Path,
) -> None:
    require_root()
    rules_dir = tmp_path / "rules.d"
    rules_dir.mkdir()
    marker_rule = (
        "rules:\n  - id: site-marker\n    category: custom\n    severity: low\n"
        "    description: marker\n    match: {arg: [rg-fault-marker]}\n"
    )
    (rules_dir / "site.yaml").write_text(marker_rule)
    with daemon("--rules", str(rules_dir), mode="enforce") as d:
        (rules_dir / "zz-bomb.yaml").write_text(ALIAS_BOMB)
        d.signal(signal.SIGHUP)
        log = d.wait_log("reload rejected", timeout=20)
        assert f"{rules_dir / 'zz-bomb.yaml'}:" in log
        marker = subprocess.Popen(["/bin/sh", "-c", "true", "rg-fault-marker"])
        marker.wait()
        d.wait_alert(by_pid(marker.pid, "site-marker"))  # the old rules are in force
        miner_still_caught(d, str(tmp_path))
        (rules_dir / "zz-bomb.yaml").unlink()
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded:")
        status = d.stop()
        assert status == 0  # SIGTERM still ends it promptly and cleanly
