"""The journal never decides whether the guard runs: a full or read-only
journal disk, end to end as root with a real tmpfs, plus the journal's own
behaviour on a disk that refuses writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import require_root
from tests.faults.conftest import fill, miner_still_caught, small_tmpfs
from tests.fixtures.daemon import Daemon, by_pid
from tests.fixtures.network import wait_until


def status_json(d: Daemon) -> dict:
    status = subprocess.run(
        [sys.executable, "-m", "rome_guard", "status", "--json", "--run-dir", d.run_dir],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(status.stdout)


def test_full_journal_disk_keeps_detecting_and_killing_then_catches_up(tmp_path) -> None:
    require_root()
    with small_tmpfs("1m") as disk:
        alerts = os.path.join(disk, "alerts.jsonl")
        d = Daemon(mode="enforce", alerts_file=alerts)
        try:
            d.wait_ready()
            filler = fill(disk)
            first = miner_still_caught(d, str(tmp_path))  # alerted and killed
            second = miner_still_caught(d, str(tmp_path), host="127.0.9.10")
            assert d.proc.poll() is None  # the daemon is alive
            log = d.log
            assert "JOURNAL WRITE FAILED" in log and "ENOSPC" in log
            # the records themselves are on stderr, whole and parseable
            spooled = [
                json.loads(line.split("record follows: ", 1)[1])
                for line in log.splitlines()
                if "record follows: " in line
            ]
            assert any(r["process"]["pid"] == first["pid"] for r in spooled)
            assert d.metric("rome_guard_journal_errors_total") >= 2
            assert d.metric("rome_guard_journal_spooled_records") >= 2
            journal = wait_until(
                lambda: status_json(d)["journal"]["spooled"] >= 2 and status_json(d)["journal"]
            )
            assert journal["ok"] is False
            assert journal["last_error"].startswith("ENOSPC")
            # room again: the spool is written, in order, with no torn line
            os.unlink(filler)
            for pid in (first["pid"], second["pid"]):
                d.wait_alert(by_pid(pid), timeout=15)
            wait_until(lambda: d.metric("rome_guard_journal_spooled_records") == 0)
        finally:
            d.stop()
        with open(alerts, encoding="utf-8") as f:
            lines = f.read().splitlines()
        assert all(json.loads(line) for line in lines)  # every line whole


def test_read_only_journal_is_one_line_and_exit_2(tmp_path) -> None:
    require_root()
    with small_tmpfs("1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        d = Daemon(alerts_file=os.path.join(disk, "alerts.jsonl"))
        assert d.proc.wait(60) == 2
        d.stop()
        errors = [line for line in d.log.splitlines() if line.strip()]
        assert len(errors) == 1, errors
        assert "EROFS" in errors[0] and disk in errors[0]
        assert "Traceback" not in d.log


def test_missing_parent_on_read_only_disk_and_directory_are_one_line(tmp_path) -> None:
    require_root()
    with small_tmpfs("1m") as disk:
        os.mkdir(os.path.join(disk, "journal-dir"))
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
        for path, expected in (
            (os.path.join(disk, "missing", "alerts.jsonl"), "EROFS"),
            (os.path.join(disk, "journal-dir"), "is a directory"),
        ):
            d = Daemon(alerts_file=path)
            assert d.proc.wait(60) == 2
            d.stop()
            lines = [line for line in d.log.splitlines() if line.strip()]
            assert len(lines) == 1 and expected in lines[0], lines
