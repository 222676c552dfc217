"""The journal rotates by size with a retention count and reopens after an
outside rename (logrotate + SIGHUP), and under a storm of 10,000 alerts
across both kinds of rotation no line is lost, doubled or torn."""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import threading

from rome_guard import procfs
from rome_guard.detect.rules import Rule
from rome_guard.events import ProcessKey
from rome_guard.findings import Finding
from rome_guard.respond.alerts import AlertSink
from rome_guard.respond.journal import Journal, recent_alerts
from rome_guard.respond.metrics import NullMetrics

RULE = Rule("miner-known-binary", "miner", "critical", "a known miner binary")


def _lines(paths: list[str]) -> list[bytes]:
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.extend(f.read().split(b"\n")[:-1])  # every file ends with a newline
    return out


def _numbered(path: str) -> list[str]:
    """path.N, oldest first, then path itself."""
    rotated = sorted(glob.glob(f"{path}.[0-9]*"), key=lambda p: -int(p.rsplit(".", 1)[1]))
    return [*rotated, path]


def test_a_storm_of_10000_alerts_across_rotations_loses_no_line_and_tears_none(tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="rome_guard")  # 10,000 ALERT lines otherwise
    path = str(tmp_path / "alerts.jsonl")
    journal = Journal(path, rotate_bytes=256 << 10, keep=100_000)
    sink = AlertSink(journal, NullMetrics(), "monitor", "gpu-node-1")
    me = procfs.read_process(os.getpid())
    assert me is not None
    hostile = dataclasses.replace(me, cmdline=("x\ny", '"]\\', os.fsdecode(b"\xff"), "A" * 3000))
    stop, due = threading.Event(), threading.Event()
    renamed: list[str] = []

    def logrotate() -> None:  # rename, then SIGHUP's reopen, while alerts are written
        while not stop.is_set():
            if not due.wait(0.05):
                continue
            due.clear()
            target = f"{path}-logrotated-{len(renamed)}"
            try:
                os.rename(path, target)
            except FileNotFoundError:  # the journal's own rotation got there first
                continue
            renamed.append(target)
            journal.reopen()

    rotator = threading.Thread(target=logrotate)
    rotator.start()
    try:
        for n in range(10_000):
            info = dataclasses.replace(hostile, key=ProcessKey(100_000 + n, n))
            assert sink.raise_alert(Finding(RULE, info, f"storm {n}")) is not None
            if n % 1000 == 500:
                due.set()
    finally:
        stop.set()
        rotator.join()
    journal.close()
    assert journal.rotations >= 5 and len(renamed) >= 5  # both kinds happened, many times
    lines = _lines(_numbered(path) + renamed)
    records = [json.loads(line) for line in lines]  # a torn line would not parse
    pids = sorted(r["process"]["pid"] for r in records)
    assert pids == list(range(100_000, 110_000))  # none lost, none twice
    assert all(r["process"]["cmdline"][0] == "x\ny" for r in records)
    assert all(os.path.getsize(p) <= 256 << 10 for p in _numbered(path))


def test_size_rotation_keeps_the_newest_files_in_order(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    journal = Journal(path, rotate_bytes=1000, keep=3)
    for n in range(200):
        journal.write({"event": "alert", "n": n, "pad": "x" * 80})
    journal.close()
    assert sorted(os.listdir(tmp_path)) == [
        "alerts.jsonl",
        "alerts.jsonl.1",
        "alerts.jsonl.2",
        "alerts.jsonl.3",
    ]
    kept = [json.loads(line)["n"] for line in _lines(_numbered(path))]
    assert kept == list(range(kept[0], 200))  # the newest, in order, none missing
    assert 200 - kept[0] >= 3 * (1000 // 100)  # three full files and the current one
    assert journal.rotations > 3


def test_rotation_off_by_default_and_reopen_follows_a_rename(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    journal = Journal(path)
    journal.write({"n": 1})
    os.rename(path, path + ".old")
    journal.write({"n": 2})  # before SIGHUP: still the renamed file
    assert journal.reopen()
    journal.write({"n": 3})
    journal.close()
    assert [json.loads(x)["n"] for x in _lines([path + ".old"])] == [1, 2]
    assert [json.loads(x)["n"] for x in _lines([path])] == [3]
    assert journal.rotations == 0


def test_a_restart_right_after_a_rotation_still_remembers_what_was_alerted(tmp_path):
    path = str(tmp_path / "alerts.jsonl")
    me = procfs.read_process(os.getpid())
    assert me is not None
    sink = AlertSink(Journal(path, rotate_bytes=1, keep=2), NullMetrics(), "monitor", "h")
    assert sink.raise_alert(Finding(RULE, me, "first")) is not None
    sink.events_lost({"process": 1}, {"process": 1})  # rotates: the alert is now in .1
    sink.journal.close()
    assert [r.get("rule") for r in map(json.loads, _lines([path + ".1"]))] == ["miner-known-binary"]
    assert [r["event"] for r in map(json.loads, _lines([path]))] == ["events_lost"]
    restarted = AlertSink(Journal(path), NullMetrics(), "monitor", "h")
    restarted.remember(recent_alerts(path, "monitor"))
    assert restarted.raise_alert(Finding(RULE, me, "again")) is None
