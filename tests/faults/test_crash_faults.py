"""The crash policy end to end: kill -9 of the daemon in enforce mode must
not leave the host cut off. Blocked ports and CIDRs work again at once (the
connect hooks hang on the daemon's BPF link fds), and the next start finds
nothing attached, only ownership pins to remove, and catches a miner."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys

from tests.conftest import require_root
from tests.faults.conftest import miner_still_caught
from tests.fixtures.daemon import Daemon, daemon
from tests.fixtures.network import listener, wait_until
from tests.test_enforce import _prevention_attachments

BLOCKED_PORT = 47998
BLOCKED_NET = "127.0.77.0/24"
CRASH_RULES = f"""
rules:
  - id: site-blocked-port
    category: miner
    severity: critical
    description: a pool port this site blocks in the kernel
    action: kill
    match: {{remote_port: [{BLOCKED_PORT}]}}
    prevent:
      block_ports: [{BLOCKED_PORT}]
  - id: site-blocked-net
    category: miner
    severity: critical
    description: a pool network this site blocks in the kernel
    action: kill
    match: {{remote_cidr: ["{BLOCKED_NET}"]}}
    prevent:
      block_cidrs: ["{BLOCKED_NET}"]
"""


def connect_errno(host: str, port: int) -> int:
    """errno of a connect from a child process (a kill rule may kill the
    caller: never this test), or -9 when it was killed."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(); s.settimeout(5)\n"
        f"sys.stdout.write(str(s.connect_ex(({host!r}, {port}))))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    return int(child.stdout) if child.returncode == 0 else child.returncode


def test_kill_9_in_enforce_mode_leaves_the_host_connected(tmp_path) -> None:
    require_root()
    rules = tmp_path / "site.yaml"
    rules.write_text(CRASH_RULES)
    before = _prevention_attachments()
    with listener("127.0.3.4", BLOCKED_PORT) as port_peer, listener("127.0.77.7", 0) as net_peer:
        crashed = Daemon("--rules", str(rules), mode="enforce")
        try:
            crashed.wait_ready()
            ours = _prevention_attachments() - before
            assert ours  # connect4 and connect6 on the cgroup2 root
            # blocked while it runs (this test process is not exempt)
            assert connect_errno("127.0.3.4", BLOCKED_PORT) in (errno.EPERM, -signal.SIGKILL)
            assert connect_errno("127.0.77.7", net_peer.port) in (errno.EPERM, -signal.SIGKILL)
            crashed.proc.send_signal(signal.SIGKILL)
            crashed.proc.wait()
        finally:
            crashed.stop()
        assert ours.isdisjoint(_prevention_attachments())  # gone with the daemon
        assert connect_errno("127.0.3.4", BLOCKED_PORT) == 0
        assert connect_errno("127.0.77.7", net_peer.port) == 0
        wait_until(lambda: port_peer.accepted and net_peer.accepted)
    with daemon("--rules", str(rules), mode="enforce") as restarted:
        assert "removed stale pins" in restarted.log
        assert "detached stale" not in restarted.log  # nothing was left attached
        miner_still_caught(restarted, str(tmp_path))
