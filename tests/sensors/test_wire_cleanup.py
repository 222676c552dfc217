"""No wire program outlives its owner: close() detaches both, and the
programs of an owner killed without close() are found and detached by the
next start's cleanup_stale(), while a live owner's are left alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from rome_guard.respond import stale
from rome_guard.sensors.wire import WireSensor
from tests.conftest import require_root

pytestmark = [pytest.mark.root, pytest.mark.ebpf]


def _wire_programs() -> set[int]:
    return {pid for pid, _ in stale.attached_programs(prefix=stale.WIRE_PROG_PREFIX)}


def test_close_detaches_and_a_killed_owner_is_cleaned_up():
    require_root()
    before = _wire_programs()
    with WireSensor() as sensor:
        mine = set(sensor.program_ids().values())
        assert len(mine) == 2 and mine <= _wire_programs()
    assert not mine & _wire_programs()
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
            import sys, time
            from rome_guard.sensors.wire import WireSensor
            s = WireSensor(); s.start(); print("ready", flush=True); time.sleep(60)
            """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "ready"
        assert len(_wire_programs() - before) == 2
        removed = stale.cleanup_stale()  # the owner is alive: nothing of it goes
        assert not any("rgw_wire" in line for line in removed)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    removed = stale.cleanup_stale()
    assert sum("rgw_wire" in line for line in removed) == 2
    assert _wire_programs() == before
