"""The in-kernel process table and the exec filter, with the real eBPF
sensor and real processes: a benign exec, its fork and its exit send no
record; what a rule may concern (its name, argv[0]'s name, a needle in its
command line, a command line too long to scan) is sent; a process user
space never held is read back from the kernel (lineage through a parent
that exited unseen); the exited table is bounded, its evictions counted
and exported."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
from prometheus_client import CollectorRegistry

from rome_guard.config import Config
from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import rules_for
from rome_guard.events import ExecEvent, ForkEvent
from rome_guard.respond.metrics import GuardMetrics
from rome_guard.sensors.ebpf import EbpfSensor, probe_ebpf
from rome_guard.state.kernel_table import KernelProcessTable
from rome_guard.state.processes import ProcessModel
from tests.conftest import require
from tests.fixtures.daemon import daemon, rule_ids

EXITED_TABLE = 256  # small, so that a test can overflow it (a sensor of its own)
DRAIN_S = 0.5


def _filtered(**sizes: int) -> Iterator[tuple[EbpfSensor, KernelProcessTable]]:
    """The sensor as the daemon runs it: the shipped rules' names and
    needles decide in the kernel which execs are sent."""
    reason = probe_ebpf()
    require(reason is None, f"eBPF sensor unavailable: {reason}")
    engine = Engine(rules_for(Config()))
    sensor = EbpfSensor(**sizes)
    try:
        sensor.start()
        sensor.set_wake_names(engine.exec_names)
        sensor.set_exec_needles(engine.exec_needles)
        maps = sensor.process_table_maps()
        assert maps is not None
        yield sensor, KernelProcessTable(maps)
    finally:
        sensor.close()


@pytest.fixture(scope="module")
def filtered() -> Iterator[tuple[EbpfSensor, KernelProcessTable]]:
    yield from _filtered()


@pytest.fixture
def small() -> Iterator[tuple[EbpfSensor, KernelProcessTable]]:
    yield from _filtered(exited_table_size=EXITED_TABLE)


def _drain(sensor: EbpfSensor) -> list:
    events, deadline = [], time.monotonic() + DRAIN_S
    while time.monotonic() < deadline:
        events += sensor.poll(50)
    return events


def _pids_in(events: list) -> set[int]:
    pids = set()
    for e in events:
        if isinstance(e, ForkEvent):
            pids.add(e.child_pid)
        else:
            pids.add(getattr(e, "pid", 0))
    return pids


def _scratch() -> Path:
    # no dash, dot or digit run a rule's needle could start with
    return Path(tempfile.mkdtemp(prefix="rgtable"))


def test_benign_execs_send_no_record_and_stay_in_the_kernel(filtered):
    sensor, table = filtered
    sensor.poll(0)
    before = table.stats().unsent
    argvs = [["/bin/true", "storm"], ["/bin/echo", "hello"], ["/usr/bin/env", "true"]] * 10
    pids = []
    for argv in argvs:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        child.wait()
        pids.append(child.pid)
    events = _drain(sensor)
    assert not (_pids_in(events) & set(pids))  # no exec, fork or exit record of any
    after = table.stats().unsent
    for kind in ("exec", "fork", "exit"):  # the host's own benign processes only add
        assert after[kind] - before[kind] >= len(argvs), kind
    # each of them is in the kernel's table, exited, with its identity and argv
    entry = table.lookup(pids[-3])
    assert entry is not None and entry.exit_ns and entry.exit_code == 0
    assert entry.ppid == os.getpid()
    assert entry.args == ("/bin/true", "storm") and entry.filename == "/bin/true"
    assert entry.start_ns and entry.start_ns <= entry.exec_ns <= entry.exit_ns


def test_what_a_rule_may_concern_is_sent(filtered, tmp_path):
    sensor, _ = filtered
    sensor.poll(0)
    named = tmp_path / "xmrig"
    shouted = tmp_path / "XMRIG"
    shutil.copy("/bin/true", named)
    shutil.copy("/bin/true", shouted)
    sent = {
        "a rule's name": ([str(named)], None),
        "the name in upper case": ([str(shouted)], None),
        "argv[0] a rule names": (["xmrig", "--version"], "/bin/true"),
        "a pool URL in argv": (["/bin/true", "stratum+tcp://127.0.0.2:3333"], None),
        "a miner-only flag": (["/bin/true", "--huge-pages-jit"], None),
        "a line too long to scan": (["/bin/true", "x" * 2000], None),
    }
    benign = {
        "a training launch": (["/bin/true", "train.py", "--lr", "0.1", "--epochs", "3"], None),
        "a file name": (["/bin/true", "/data/shard0001.tar"], None),
    }
    pids = {}
    for what, (argv, executable) in {**sent, **benign}.items():
        child = subprocess.Popen(argv, executable=executable)
        child.wait()
        pids[what] = child.pid
    execs = {e.pid: e for e in _drain(sensor) if isinstance(e, ExecEvent)}
    for what in sent:
        assert pids[what] in execs, what
    for what in benign:
        assert pids[what] not in execs, what
    assert execs[pids["argv[0] a rule names"]].argv == ("xmrig", "--version")


def _launcher(work: Path) -> tuple[Path, Path, Path]:
    """stage1 (a copy of sh, a name no rule knows), the script it runs
    (start the miner in the background 0.3 s later, exit now), the miner."""
    stage1 = work / "stage1"
    shutil.copy("/bin/sh", stage1)
    miner = work / "xmrig"
    shutil.copy("/bin/sleep", miner)
    script = work / "launch"
    script.write_text(f"( sleep 0.3; exec {miner} 0.1 ) &\nexit 0\n")
    return stage1, miner, script


def test_lineage_through_a_parent_that_exited_unseen(filtered):
    """stage1 (a name no rule knows) starts the miner in the background and
    exits before the miner's exec: the kernel never sent stage1, and the
    model finds it in the kernel's exited table."""
    sensor, table = filtered
    work = _scratch()
    stage1, miner, script = _launcher(work)
    model = ProcessModel()
    model.kernel = table
    model.seed()
    sensor.poll(0)
    parent = subprocess.Popen([str(stage1), str(script)])
    parent.wait()
    deadline = time.monotonic() + 10
    events: list = []
    offender = None
    while offender is None and time.monotonic() < deadline:
        events += sensor.poll(50)
        offender = next(
            (e for e in events if isinstance(e, ExecEvent) and e.filename == str(miner)), None
        )
    assert offender is not None, "the miner's exec was not sent"
    assert offender.ppid == parent.pid
    assert parent.pid not in _pids_in(events)  # stage1: never sent
    assert not os.path.exists(f"/proc/{parent.pid}")
    info = model.execed(offender)
    lineage = model.lineage(info)
    assert [p.pid for p in lineage[:2]] == [parent.pid, os.getpid()]
    assert lineage[0].comm == "stage1"
    assert lineage[0].cmdline == (str(stage1), str(script))
    shutil.rmtree(work, ignore_errors=True)


def test_a_reparented_process_keeps_its_creator_in_its_lineage(filtered):
    """stage1 starts a long-lived child and exits: /proc now names init as
    the child's parent; the model, resolving the child (never sent: a
    benign name), takes the creator from the kernel's table, and finds the
    exited creator there too."""
    sensor, table = filtered
    work = _scratch()
    stage1 = work / "stage1"
    shutil.copy("/bin/sh", stage1)
    script = work / "launch"
    script.write_text("sleep 30 >/dev/null 2>&1 &\necho $!\nexit 0\n")
    model = ProcessModel()
    model.kernel = table
    model.seed()
    parent = subprocess.run([str(stage1), str(script)], capture_output=True, text=True, check=True)
    child = int(parent.stdout)
    try:
        stage1_pid = _ppid_in_kernel(table, child)
        with open(f"/proc/{child}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[1] != str(stage1_pid)  # reparented
        info = model.resolve(child)
        assert info is not None and info.ppid == stage1_pid
        lineage = model.lineage(info)
        assert lineage[0].pid == stage1_pid
        assert lineage[0].comm == "stage1"
        assert lineage[1].pid == os.getpid()
    finally:
        os.kill(child, 9)
        shutil.rmtree(work, ignore_errors=True)


def _ppid_in_kernel(table: KernelProcessTable, pid: int) -> int:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entry = table.lookup(pid)
        if entry is not None and entry.ppid:
            return entry.ppid
        time.sleep(0.05)
    raise AssertionError(f"{pid} not in the kernel's table")


def test_the_exited_table_is_bounded_and_its_evictions_exported(small):
    _, table = small
    for _ in range(EXITED_TABLE + 50):
        subprocess.run(["/bin/true"], check=True)
    stats = table.stats()
    assert stats.exited_capacity == EXITED_TABLE
    assert stats.exited_entries == EXITED_TABLE
    assert stats.exited_evictions >= 50
    assert stats.live_capacity > 0 and stats.live_full == 0
    metrics = GuardMetrics(CollectorRegistry(), process_collector=False)
    metrics.set_kernel_table(stats)
    sample = metrics.registry.get_sample_value
    evicted = sample("rome_guard_kernel_process_table_evictions_total", {"table": "exited"})
    assert evicted == stats.exited_evictions
    labels = {"table": "exited", "of": "capacity"}
    assert sample("rome_guard_kernel_process_table_entries", labels) == EXITED_TABLE
    unsent = sample("rome_guard_kernel_records_unsent_total", {"kind": "exec"})
    assert unsent == stats.unsent["exec"] > 0


def test_daemon_alert_names_the_exited_parent_only_the_kernel_saw():
    """End to end: the alert's lineage names stage1, which the daemon was
    never sent and which was gone when the miner exec'd."""
    require(probe_ebpf() is None, "eBPF sensor unavailable")
    work = _scratch()
    stage1, miner, script = _launcher(work)
    with daemon() as d:
        parent = subprocess.Popen([str(stage1), str(script)])
        parent.wait()
        alert = d.wait_alert(
            lambda r: "miner-known-binary" in rule_ids(r) and r["process"]["exe"] == str(miner),
            timeout=60,  # the shared host's load, not a latency bound
        )
        assert alert["lineage"][0]["pid"] == parent.pid
        assert alert["lineage"][0]["comm"] == "stage1"
        assert alert["lineage"][1]["pid"] == os.getpid()
    shutil.rmtree(work, ignore_errors=True)


def test_descendants_only_the_kernel_saw_are_found_for_a_tree_kill(filtered):
    """A tree the kernel kept entirely (benign execs, unsent forks): the
    model finds the offender's children in the kernel's table, and not a
    process that merely runs beside them."""
    _, table = filtered
    model = ProcessModel()
    model.kernel = table
    model.seed()
    work = _scratch()
    stage1 = work / "stage1"
    shutil.copy("/bin/sh", stage1)
    tree = subprocess.Popen([str(stage1), "-c", "sleep 5 & sleep 5 & wait"])
    stranger = subprocess.Popen(["/bin/sleep", "5"])
    try:
        deadline = time.monotonic() + 10
        kids: set[int] = set()
        while len(kids) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            kids = {e.pid for e in table.live() if e.ppid == tree.pid}
        info = model.resolve(tree.pid)
        assert info is not None
        found = {p.pid for p in model.descendants(info)}
        assert kids and kids <= found
        assert stranger.pid not in found
    finally:
        for pid in kids:  # the sleeps this test started, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (tree, stranger):
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
