"""`rome-guard gpu register|unregister|list` end to end: the real CLI in a
subprocess, real processes, and the real pynvml bindings over the stand-in
libnvidia-ml.so.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures import fake_nvml
from tests.fixtures.fake_nvml import FakeGpu, FakeProcess, FakeState

GPU0 = "GPU-00000000-1111-2222-3333-444444444444"
GPU1 = "GPU-11111111-1111-2222-3333-444444444444"


def rome_guard(
    run_dir: Path, *args: str, state: Path | None = None, variant: str = fake_nvml.FULL
) -> subprocess.CompletedProcess:
    env = fake_nvml.environment(state or run_dir / "no-state", variant)
    env["ROME_GUARD_RUN_DIR"] = str(run_dir)
    config = run_dir / "config.yaml"
    if not config.exists():
        config.write_text("gpu:\n  poll_interval: 5\n")
    env["ROME_GUARD_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "-m", "rome_guard", "gpu", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def listing(run_dir: Path, state: Path) -> tuple[int, dict]:
    out = rome_guard(run_dir, "list", "--json", state=state)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def consumers(document: dict) -> dict[int, dict]:
    return {p["pid"]: p for gpu in document["gpus"] for p in gpu["processes"]}


def test_register_and_unregister_by_pid_and_job(tmp_path, processes):
    a, b = processes.sleeper().pid, processes.sleeper().pid
    out = rome_guard(tmp_path, "register", "--pid", str(a), "--job", "sft-1", "--gpus", "0,1")
    assert out.returncode == 0, out.stderr
    assert f"pid {a}" in out.stdout and "'sft-1'" in out.stdout
    out = rome_guard(tmp_path, "register", "--pid", str(b), "--job", "sft-2", "--json")
    assert json.loads(out.stdout)["pid"] == b
    assert len(list((tmp_path / "registrations").glob("*.json"))) == 2

    out = rome_guard(tmp_path, "unregister", "--pid", str(a))
    assert out.returncode == 0 and "sft-1" in out.stdout
    out = rome_guard(tmp_path, "unregister", "--job", "sft-2")
    assert out.returncode == 0 and f"pid {b}" in out.stdout
    assert list((tmp_path / "registrations").glob("*.json")) == []
    assert "no registration matched" in rome_guard(tmp_path, "unregister", "--job", "x").stdout


def test_register_refuses_bad_requests(tmp_path, processes):
    gone = processes.exited_pid()
    out = rome_guard(tmp_path, "register", "--pid", str(gone))
    assert out.returncode == 2 and "no process with pid" in out.stderr
    live = processes.sleeper().pid
    out = rome_guard(tmp_path, "register", "--pid", str(live), "--gpus", "0,cuda1")
    assert out.returncode == 2 and "'cuda1' is not a GPU" in out.stderr
    assert rome_guard(tmp_path, "unregister").returncode == 2
    assert not (tmp_path / "registrations").exists() or not any(
        (tmp_path / "registrations").iterdir()
    )


def test_list_reports_unregistered_not_granted_and_registered_consumers(
    tmp_path, processes, fake_library
):
    trainer, child = processes.parent_with_child()
    stray = processes.sleeper().pid
    state_file = tmp_path / "state.txt"
    FakeState(
        gpus=[FakeGpu(0, GPU0), FakeGpu(1, GPU1)],
        processes=[
            FakeProcess(0, trainer.pid, memory=40 * 2**30, sm_util=95),
            FakeProcess(0, child, memory=6 * 2**30, sm_util=99),  # e.g. a miner an agent started
            FakeProcess(1, trainer.pid, memory=2**30),
            FakeProcess(1, stray, memory=2**30),
        ],
    ).write(state_file)

    code, doc = listing(tmp_path, state_file)
    assert code == 1
    assert {p["status"] for p in consumers(doc).values()} == {"unregistered"}

    out = rome_guard(tmp_path, "register", "--pid", str(trainer.pid), "--job", "rl", "--gpus", "0")
    assert out.returncode == 0, out.stderr
    code, doc = listing(tmp_path, state_file)
    assert code == 1
    by_gpu = {(g["index"], p["pid"]): p for g in doc["gpus"] for p in g["processes"]}
    assert by_gpu[(0, trainer.pid)]["status"] == "registered"
    assert by_gpu[(0, trainer.pid)]["job"] == "rl"
    assert by_gpu[(0, trainer.pid)]["sm_util"] == 95
    assert by_gpu[(1, trainer.pid)]["status"] == "gpu_not_granted"
    assert by_gpu[(0, child)]["status"] == "unregistered"
    assert by_gpu[(0, child)]["inside_job"] == "rl"
    assert by_gpu[(0, child)]["used_memory_bytes"] == 6 * 2**30
    assert by_gpu[(1, stray)]["status"] == "unregistered"
    assert doc["findings"] == 3
    assert [r["pid"] for r in doc["registrations"]] == [trainer.pid]
    assert doc["registrations"][0]["alive"] is True

    rome_guard(tmp_path, "unregister", "--pid", str(trainer.pid))
    args = ("register", "--pid", str(trainer.pid), "--job", "rl", "--include-children")
    assert rome_guard(tmp_path, *args).returncode == 0
    assert rome_guard(tmp_path, "register", "--pid", str(stray)).returncode == 0
    code, doc = listing(tmp_path, state_file)
    assert code == 0, doc
    assert consumers(doc)[child]["coverage"]["inherited"] is True

    table = rome_guard(tmp_path, "list", state=state_file)
    assert table.returncode == 0
    assert "GPU 1" in table.stdout and "registered" in table.stdout


def test_list_without_nvml_exits_2_with_a_clear_message(tmp_path, fake_library):
    out = rome_guard(tmp_path, "list", state=tmp_path / "s", variant=fake_nvml.BROKEN)
    assert out.returncode == 2
    assert "NVML unavailable: libnvidia-ml.so.1 was not found" in out.stdout
    out = rome_guard(tmp_path, "list", "--json", state=tmp_path / "s", variant=fake_nvml.BROKEN)
    assert out.returncode == 2
    assert json.loads(out.stdout)["nvml"]["available"] is False


def test_list_table_cannot_be_forged_by_a_hostile_command_line(tmp_path, processes, fake_library):
    payload = b"x\nFINDING none: all clear\x1b[2J\xff"  # \xff: not UTF-8
    # the shell waits in its builtin read: no child process to leave behind
    evil = processes.sleeper(b"sh", b"-c", b"read line", payload, stdin=subprocess.PIPE)
    state_file = tmp_path / "state.txt"
    FakeState(gpus=[FakeGpu(0, GPU0)], processes=[FakeProcess(0, evil.pid)]).write(state_file)
    # wait until the child has exec'd sh (its argv shows the payload)
    while b"FINDING" not in Path(f"/proc/{evil.pid}/cmdline").read_bytes():
        os.sched_yield()
    out = rome_guard(tmp_path, "list", state=state_file)
    assert out.returncode == 1
    assert "\x1b" not in out.stdout
    forged = [line for line in out.stdout.splitlines() if line.startswith("FINDING none")]
    assert forged == []
    assert "x\\nFINDING none: all clear\\x1b[2J" in out.stdout
    assert "\\xff" in out.stdout  # the invalid byte, shown escaped
    code, doc = listing(tmp_path, state_file)
    cmdline = consumers(doc)[evil.pid]["process"]["cmdline"]
    assert cmdline[-1].startswith("x\nFINDING none")  # JSON keeps it, escaped by json
