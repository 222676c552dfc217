"""What kernel/loader.py gives back once everything is loaded: a BPF
object's compiler module (BpfObject.release_compiler, through
release_compiler_memory), with its maps, rings and programs still working,
nothing more loadable into it, and nothing left open after close()."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rome_guard.events import ExecEvent
from rome_guard.kernel.loader import LoadError, release_compiler_memory
from rome_guard.kernel.poller import RingPoller
from rome_guard.sensors.ebpf import EbpfSensor, probe_ebpf
from tests.conftest import require

WAIT_MS = 10_000  # an upper bound on a loaded host, never a timing assertion
FREED_AT_LEAST_MIB = 50  # what bcc keeps of the sensor's compile: ~150 MiB measured


def _anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_released_sensor_frees_its_compiler_and_keeps_working(tmp_path: Path) -> None:
    reason = probe_ebpf()
    require(reason is None, f"eBPF sensor unavailable: {reason}")
    fds_before = _open_fds()
    sensor = EbpfSensor()
    poller = RingPoller()
    try:
        sensor.start()
        held = _anon_mib()
        release_compiler_memory()
        freed = held - _anon_mib()
        assert freed >= FREED_AT_LEAST_MIB, f"only {freed:.0f} MiB given back"
        bpf = sensor._bpf
        assert bpf is not None and bpf.compiler_released
        # maps written after the release (the rules' wake names), rings read
        sensor.set_wake_names({"rg-loader-wake"})
        poller.watch(sensor.ring_fds())
        program = tmp_path / "rg-loader-wake"
        shutil.copy("/bin/true", program)
        sensor.poll(0)
        proc = subprocess.Popen([str(program)])
        proc.wait()
        seen = False
        for _ in range(50):  # other processes on the host wake it too
            if not poller.wait(WAIT_MS):
                break
            if any(isinstance(e, ExecEvent) and e.pid == proc.pid for e in sensor.poll(0)):
                seen = True
                break
        assert seen, "no exec record from the released sensor's ring"
        assert set(sensor.lost_events()) >= {"process", "network"}  # counters still read
        with pytest.raises(LoadError, match="compiler was released"):
            bpf.load_func("rgs_execve", 0)
        with pytest.raises(KeyError):
            bpf["no_such_table"]
    finally:
        poller.close()
        sensor.close()
    # the duplicated map fds went with close(); a new sensor still compiles
    assert _open_fds() - fds_before == set()
    again = EbpfSensor()
    try:
        again.start()
        assert again.ring_fds()
    finally:
        again.close()
