"""The journal as a unit: a disk that refuses writes never raises into the
caller, never leaves a torn line, and the spool is bounded and ordered."""

from __future__ import annotations

import errno
import json
import os

import pytest

from rome_guard.respond import journal as journal_mod
from rome_guard.respond.journal import Journal, JournalError, open_journal, recent_alerts


class RefusingDisk:
    """os.write that writes `allow` bytes of a record then fails ENOSPC,
    while `full` is set (a disk that fills in the middle of a record)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, allow: int = 5):
        self.full = True
        self.allow = allow
        real = os.write

        def write(fd: int, data: bytes) -> int:
            if not self.full:
                return real(fd, data)
            if self.allow and len(data) > self.allow:
                return real(fd, data[: self.allow])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(journal_mod.os, "write", write)


def lines(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_refused_write_spools_prints_and_counts(tmp_path, monkeypatch, capsys) -> None:
    path = str(tmp_path / "alerts.jsonl")
    errors = []
    j = Journal(path, on_error=lambda: errors.append(1))
    j.write({"n": 0})
    disk = RefusingDisk(monkeypatch)
    assert j.write({"n": 1}) is False
    assert j.write({"n": 2}) is False
    assert '"n":1' in capsys.readouterr().err
    assert [r["n"] for r in lines(path)] == [0]  # the half-written record was cut back
    state = j.state()
    assert (state.ok, state.spooled, state.last_error[:6]) == (False, 2, "ENOSPC")
    assert len(errors) == state.errors >= 2
    disk.full = False
    assert j.retry() is True
    assert j.write({"n": 3}) is True
    assert [r["n"] for r in lines(path)] == [0, 1, 2, 3]  # in order
    assert j.state().ok and j.state().spooled == 0
    j.close()


def test_spool_is_bounded_and_counts_what_it_dropped(tmp_path, monkeypatch) -> None:
    j = Journal(str(tmp_path / "alerts.jsonl"), spool_records=3)
    RefusingDisk(monkeypatch, allow=0)
    for n in range(10):
        j.write({"n": n})
    state = j.state()
    assert (state.spooled, state.dropped) == (3, 7)
    j.close()


def test_failed_fsync_is_a_refused_write(tmp_path, monkeypatch) -> None:
    path = str(tmp_path / "alerts.jsonl")
    j = Journal(path)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_mod.os, "fsync", eio)
    assert j.write({"n": 1}) is False
    assert lines(path) == []  # not claimed as durable: cut back, kept in memory
    assert j.state().last_error.startswith("EIO")
    monkeypatch.undo()
    assert j.retry() and [r["n"] for r in lines(path)] == [1]
    j.close()


def test_open_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(JournalError, match="is a directory") as info:
        open_journal(str(tmp_path))
    assert "\n" not in str(info.value)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError, match="ENOTDIR") as info:
        open_journal(str(blocker / "sub" / "alerts.jsonl"))
    assert str(blocker) in str(info.value) and "\n" not in str(info.value)


def test_recent_alerts_are_those_fully_handled_in_this_mode(tmp_path) -> None:
    path = tmp_path / "alerts.jsonl"

    def alert(id_: str, pid: int, mode: str = "enforce", action: str = "alert") -> dict:
        process = {"pid": pid, "start_time": 7, "exe": "/usr/bin/x"}
        return {"event": "alert", "id": id_, "rule": "r", "mode": mode, "action": action,
                "process": process}  # fmt: skip

    records = [
        alert("a", 1),  # alert-only: done
        alert("b", 2, action="kill"),
        {"event": "response", "alert_id": "b", "action": "killed"},  # killed: done
        alert("c", 3, action="kill"),  # no response: the daemon died before acting
        alert("d", 4, mode="monitor"),  # another mode: judge again
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn": ')
    assert recent_alerts(str(path), "enforce") == {
        ("r", 1, 7, "/usr/bin/x"),
        ("r", 2, 7, "/usr/bin/x"),
    }
    # only the tail is read, and its first (cut) line is skipped
    assert recent_alerts(str(path), "enforce", tail_bytes=len(path.read_text()) - 5) == {
        ("r", 2, 7, "/usr/bin/x")
    }
    assert recent_alerts(str(tmp_path / "absent"), "enforce") == set()
