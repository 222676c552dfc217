"""`rome-guard status` as a unit: a live file is shown as tables with human
times; a stale file or a dead pid is exit 2, and --json keeps its keys."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rome_guard.procfs import start_time
from rome_guard.status import (
    IDLE_WRITE_EVERY_S,
    STALE_AFTER_S,
    StatusUnavailable,
    human_duration,
    problem,
    read_status,
    render,
    rewrite_due,
    write_status,
)

STATE = {
    "pid": os.getpid(),
    "start_ticks": start_time(os.getpid()),
    "version": "0.1.0",
    "started": 1_700_000_000.0,
    "host": "gpu-node-7",
    "mode": "enforce",
    "sensor": "ebpf",
    "rules": 31,
    "processes_tracked": 412,
    "events": 123456,
    "alerts": 4,
    "events_lost": {"process": 0, "network": 17},
    "ssh_config": {"runs": 12, "skipped": 1, "unknown": {"descriptor": 2, "failed": 5}},
    "journal": {
        "path": "/var/lib/rome-guard/alerts.jsonl",
        "ok": False,
        "errors": 3,
        "spooled": 2,
        "dropped": 0,
        "last_error": "ENOSPC: No space left on device",
    },
}


def status_file(tmp_path: Path, age_s: float = 0.2, **changes) -> str:
    path = str(tmp_path / "status.json")
    write_status(path, {**STATE, **changes, "time": time.time() - age_s})
    return path


def test_live_status_is_tables_and_human_times(tmp_path: Path) -> None:
    reading = read_status(status_file(tmp_path))
    assert reading.healthy and problem(reading) is None
    text = render(reading)
    assert re.search(r"^events\s+123,456$", text, re.M)  # a table row, digits grouped
    assert "FAILING (ENOSPC" in text and "2 record(s) waiting" in text
    assert "UTC" in text and "{" not in text  # no dict reprs, no raw epoch
    assert "network" in text and "17" in text
    # every ssh config the guard could not establish is counted where operators look
    assert "12 ssh -G run(s), 1 skipped; not established: descriptor 2, failed 5" in text


def test_stale_status_names_the_age(tmp_path: Path) -> None:
    reading = read_status(status_file(tmp_path, age_s=STALE_AFTER_S + 60))
    assert reading.running and reading.stale
    assert "stale" in problem(reading) and "1m 05s ago" in problem(reading)


def test_a_dead_pid_is_no_daemon(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    reading = read_status(status_file(tmp_path, pid=child.pid))
    assert not reading.running and "gone" in problem(reading)


def test_missing_or_garbage_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StatusUnavailable, match="no running daemon"):
        read_status(str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(StatusUnavailable, match="unreadable"):
        read_status(str(tmp_path / "bad.json"))


@pytest.mark.parametrize("age, status", [(0.1, 0), (STALE_AFTER_S + 1, 2)])
def test_cli_exit_status_and_stable_json(tmp_path: Path, age: float, status: int) -> None:
    status_file(tmp_path, age_s=age)
    result = subprocess.run(
        [sys.executable, "-m", "rome_guard", "status", "--json", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == status
    document = json.loads(result.stdout)
    assert {"schema", "pid", "time", "age_s", "running", "stale", "events_lost", "journal"} <= set(
        document
    )
    assert document["stale"] is (status == 2)


def test_human_duration() -> None:
    assert [human_duration(s) for s in (0, 59, 61, 3600 * 2 + 60 * 3, 86400 * 3 + 3600)] == [
        "0s",
        "59s",
        "1m 01s",
        "2h 03m",
        "3d 1h",
    ]


def test_an_idle_daemon_rewrites_the_file_less_often_but_well_before_it_is_stale() -> None:
    # while events come: every tick (the ticks are a second apart, give or take)
    assert rewrite_due(0.98, events_since_write=3)
    # none since the last write: every other tick, never so late that a
    # reader calls a live daemon stale
    assert not rewrite_due(1.02, events_since_write=0)
    assert rewrite_due(1.98, events_since_write=0)
    assert IDLE_WRITE_EVERY_S * 2 < STALE_AFTER_S
