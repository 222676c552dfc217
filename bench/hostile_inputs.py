"""Hostile inputs side by side: what a catastrophic rule regex and a YAML
alias bomb cost with Python's re / an unbounded line-aware YAML build
(main's behaviour) and with rome-guard's RE2 engine and bounded loader.

The re run is capped by input length (it doubles per character), so the
figure shows the trend without taking minutes; the alias bomb is loaded
plainly only up to the level that still fits in memory. Needs no root.
Run: .venv/bin/python -m bench.hostile_inputs
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import yaml

from rome_guard import yamlsrc
from rome_guard.detect.regex import compile_rule_regex

PATTERN = "(a+)+$"


def alias_bomb(levels: int, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ",".join(['"lol"'] * width) + "]"]
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * width) + "]")
    return "\n".join(lines) + "\nrules: []\n"


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def regexes() -> None:
    python_re = re.compile(PATTERN, re.IGNORECASE)
    bounded = compile_rule_regex(PATTERN)
    print(f"pattern {PATTERN!r} on 'a' * n + '!'")
    print(f"{'n':>4} {'python re s':>12} {'RE2 s':>10} {'ratio':>10}")
    for n in (16, 18, 20, 22, 30, 10_000):
        text = "a" * n + "!"
        fast = timed(bounded.search, text)
        slow = timed(python_re.search, text) if n <= 22 else float("nan")
        ratio = slow / fast if fast and slow == slow else float("nan")
        print(f"{n:>4} {slow:>12.4f} {fast:>10.6f} {ratio:>10.0f}")


def yaml_bomb() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        bomb = os.path.join(workdir, "bomb.yaml")
        with open(bomb, "w") as f:
            f.write(alias_bomb(9))
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rome_guard", "rules", "validate", bomb],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        print(
            f"rules validate of a 9x9 alias bomb: exit {os.waitstatus_to_exitcode(status)}, "
            f"{elapsed:.2f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB"
        )
    # main's line-aware loader had no size check: it expanded every alias
    for levels in (5, 6):
        nodes = yaml.compose(alias_bomb(levels), Loader=yamlsrc._Loader)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        seconds = timed(yamlsrc._build, nodes, "bomb.yaml")
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(
            f"unbounded expansion (main), {levels} levels ({9**levels:,} strings): "
            f"{seconds:.2f} s, RSS grew {grown:.0f} MiB; 9 levels is {9**9:,} strings"
        )


if __name__ == "__main__":
    regexes()
    yaml_bomb()
