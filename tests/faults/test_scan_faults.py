"""A scan that cannot see everything says so: without CAP_SYS_PTRACE and
CAP_DAC_READ_SEARCH (capsh drops them, and CAP_DAC_OVERRIDE, from a root
scan) another user's reverse shell is missed, and the scan prints exactly
one warning naming both capabilities and what they hide."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import require, require_root
from tests.fixtures.network import listener, reverse_shell, wait_until

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
BLIND = ("capsh", "--drop=cap_sys_ptrace,cap_dac_read_search,cap_dac_override", "--", "-c")


def scan(*wrapper: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "rome_guard", "scan", "--json"]
    if wrapper:
        argv = [*wrapper, 'exec "$0" "$@"', *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


def nobodys_stdio_findings(result: subprocess.CompletedProcess) -> list[dict]:
    """shell-stdio-socket findings on processes of uid 65534 (the shell)."""
    return [
        f
        for f in json.loads(result.stdout)["findings"]
        if f["rule"] == "shell-stdio-socket" and f["process"]["uid"] == 65534
    ]


def test_scan_without_capabilities_warns_once_and_names_them() -> None:
    require_root()
    require(shutil.which("capsh") is not None, "capsh not installed")
    with listener("127.0.8.8", 0) as attacker, reverse_shell(attacker, prefix=NOBODY) as shell:
        wait_until(lambda: attacker.accepted)
        full = scan()
        blind = scan(*BLIND)
        assert shell.poll() is None
    assert "warning" not in full.stderr
    assert nobodys_stdio_findings(full)  # root sees the shell's socket stdio
    warnings = [line for line in blind.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, blind.stderr
    assert "CAP_SYS_PTRACE" in warnings[0] and "CAP_DAC_READ_SEARCH" in warnings[0]
    assert "reverse shells" in warnings[0]
    assert not nobodys_stdio_findings(blind)  # what the warning said it would miss
