"""No wire program outlives its owner: close() detaches both; an owner
killed without close() takes its BPF links (and so its programs) with it,
and on the PROG_ATTACH fallback the next start's cleanup_stale() detaches
them, while a live owner's are left alone."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from rome_guard.kernel import stale
from rome_guard.sensors.wire import WireSensor
from tests.conftest import require_root
from tests.fixtures.network import wait_until

pytestmark = [pytest.mark.root, pytest.mark.ebpf]


def _wire_programs() -> set[int]:
    return {pid for pid, _ in stale.attached_programs(prefix=stale.WIRE_PROG_PREFIX)}


OWNER = """
import errno, sys, time
from rome_guard.kernel import bpfsys
from rome_guard.sensors.wire import WireSensor
if "--no-links" in sys.argv:  # a kernel without BPF links for cgroups (< 5.7)
    def _no_links(*_args):
        raise OSError(errno.EINVAL, "Invalid argument")
    bpfsys.link_create = _no_links
s = WireSensor(); s.start(); print("ready", flush=True); time.sleep(60)
"""


def test_close_detaches_both_programs():
    require_root()
    with WireSensor() as sensor:
        mine = set(sensor.program_ids().values())
        assert len(mine) == 2 and mine <= _wire_programs()
    assert not mine & _wire_programs()


@pytest.mark.parametrize("links", [True, False], ids=["links", "no-links"])
def test_a_killed_owner_leaves_nothing_attached(links: bool):
    """Through BPF links the kernel detaches a killed owner's programs at
    once; on the PROG_ATTACH fallback they stay until the next start's
    cleanup_stale(), which leaves a live owner's alone."""
    require_root()
    before = _wire_programs()
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER] + ([] if links else ["--no-links"]),
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
    if links:
        wait_until(lambda: _wire_programs() <= before)  # gone with the owner
        removed = stale.cleanup_stale()
        assert not any("detached stale rgw_wire" in line for line in removed)
    else:
        assert len(_wire_programs() - before) == 2  # still attached
        removed = stale.cleanup_stale()
        assert sum("detached stale rgw_wire" in line for line in removed) == 2
    assert _wire_programs() <= before
