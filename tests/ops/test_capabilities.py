"""The unit's capability set, measured: each privileged operation rome-guard
performs (tests/ops/cap_probe.py) runs under capsh with exactly the
capabilities of systemd/rome-guard.service, with each of them removed in
turn, and under seccomp filters that emulate the unit's
MemoryDenyWriteExecute= and SystemCallFilter=.

Needs root, BCC, capsh and libseccomp; never skipped in CI.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from tests.conftest import require, require_root

pytestmark = pytest.mark.ebpf

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
UNIT = os.path.join(REPO, "systemd", "rome-guard.service")
PROBE = os.path.join(HERE, "cap_probe.py")

# What fails without each capability of the unit (a subset: without CAP_BPF
# nothing BPF-related works at all).
NEEDED_FOR = {
    "cap_bpf": {"bpf_compile_and_attach_tracepoint"},
    "cap_perfmon": {"bpf_compile_and_attach_tracepoint"},
    "cap_net_admin": {"load_cgroup_connect_filter", "load_tc_classifier"},
    "cap_kill": {"kill_other_user", "pidfd_signal_other_user"},
    # /proc/PID/environ passes the ptrace check with CAP_PERFMON as well
    "cap_sys_ptrace": {"readlink_exe_other_user", "readlink_fd_other_user"},
    # /proc/PID/fd and environ are mode 0500/0400 of the process's owner
    "cap_dac_read_search": {
        "list_fds_other_user",
        "readlink_fd_other_user",
        "read_environ_other_user",
    },
    # ssh -G as the ssh client's user (sensors/sshconfig.py)
    "cap_setuid": {"spawn_as_other_user"},
    "cap_setgid": {"spawn_as_other_user"},
}
# What the unit's set deliberately cannot do (docs/install.md):
#   raise_memlock  CAP_SYS_RESOURCE; the unit sets LimitMEMLOCK=infinity instead
#   prog_fd_by_id  CAP_SYS_ADMIN; only the sweep for orphaned programs needs it
EXPECTED_FAILURES = {"raise_memlock", "prog_fd_by_id"}


def unit_setting(name: str) -> list[str]:
    with open(UNIT) as f:
        return [line.split("=", 1)[1].strip() for line in f if line.startswith(f"{name}=")]


def unit_capabilities() -> set[str]:
    (line,) = unit_setting("CapabilityBoundingSet")
    return {cap.lower() for cap in line.split()}


def bounding_set() -> set[str]:
    out = subprocess.run(["capsh", "--print"], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("Bounding set ="))
    return set(line.split("=", 1)[1].strip().split(","))


def _expand(group: str, seen: set[str]) -> set[str]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                calls |= _expand(item, seen)
        else:
            calls.add(item)
    return calls


def unit_syscall_allowlist() -> set[str]:
    """The system calls SystemCallFilter= lines allow: the first line is the
    allow list, later ~lines remove from it (systemd's semantics)."""
    allowed: set[str] = set()
    for n, line in enumerate(unit_setting("SystemCallFilter")):
        deny = line.startswith("~")
        items = line.lstrip("~").split()
        calls = set()
        for item in items:
            calls |= _expand(item, {item}) if item.startswith("@") else {item}
        assert n > 0 or not deny, "the first SystemCallFilter= line must be an allow list"
        allowed = allowed - calls if deny else allowed | calls
    return allowed


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A process of another user, an empty cgroup, a network namespace (its
    lo gets the TC filter) and a bpffs directory; all removed afterwards."""
    require_root()
    for tool in ("capsh", "nsenter", "ip", "systemd-analyze"):
        require(shutil.which(tool) is not None, f"{tool} not installed")
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "BCC (python3-bpfcc) not importable")
    require(ctypes.util.find_library("seccomp") is not None, "libseccomp not installed")
    with open("/proc/mounts") as mounts:
        cgroup2 = next((ln.split()[1] for ln in mounts if ln.split()[2] == "cgroup2"), None)
    require(cgroup2 is not None, "no cgroup2 mount")
    require(os.path.isdir("/sys/fs/bpf"), "bpffs not mounted")
    tag = f"rg-capprobe-{uuid.uuid4().hex[:8]}"
    cgroup = os.path.join(cgroup2, tag)
    pin = os.path.join("/sys/fs/bpf", tag)
    victim = None
    netns = False
    try:
        os.mkdir(cgroup)
        os.mkdir(pin)
        subprocess.run(["ip", "netns", "add", tag], check=True)
        netns = True
        subprocess.run(["ip", "netns", "exec", tag, "ip", "link", "set", "lo", "up"], check=True)
        victim = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "600"],
            stdin=subprocess.PIPE,
        )
        yield {"victim": victim.pid, "cgroup": cgroup, "pin": pin, "netns": tag}
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()
        if netns:
            subprocess.run(["ip", "netns", "del", tag], check=False)
        for path in (cgroup, pin):
            if os.path.isdir(path):
                os.rmdir(path)


def run_probe(sandbox, caps: set[str], tmp_path, *, sandboxed: bool = False) -> dict[str, str]:
    drop = sorted(bounding_set() - caps)
    args = [
        "--victim", str(sandbox["victim"]), "--cgroup", sandbox["cgroup"],
        "--ifname", "lo", "--pin", sandbox["pin"],
    ]  # fmt: skip
    if sandboxed:
        allow = tmp_path / "syscalls.txt"
        allow.write_text("\n".join(sorted(unit_syscall_allowlist())) + "\n")
        args += ["--mdwe", "--syscalls", str(allow)]
    # nsenter changes only the network namespace (ip netns exec would also
    # remount /sys, hiding tracefs and bpffs); capsh then drops capabilities
    command = [
        "nsenter", f"--net=/run/netns/{sandbox['netns']}",
        "capsh", f"--drop={','.join(drop)}", f"--shell={sys.executable}", "--", PROBE, *args,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def failures(results: dict[str, str]) -> dict[str, str]:
    return {op: outcome for op, outcome in results.items() if outcome != "ok"}


def test_the_unit_declares_the_measured_set_and_no_sys_admin():
    caps = unit_capabilities()
    assert caps == set(NEEDED_FOR)
    assert "cap_sys_admin" not in caps
    (ambient,) = unit_setting("AmbientCapabilities")
    assert {c.lower() for c in ambient.split()} == caps


def test_the_units_capabilities_suffice(sandbox, tmp_path):
    caps = unit_capabilities()
    require(caps <= bounding_set(), f"this host lacks some of {sorted(caps)}")
    results = run_probe(sandbox, caps, tmp_path)
    assert set(failures(results)) == EXPECTED_FAILURES, failures(results)
    assert "Operation not permitted" in results["prog_fd_by_id"]


def test_the_same_under_the_units_seccomp_filters(sandbox, tmp_path):
    """MemoryDenyWriteExecute=yes (BCC's LLVM and ctypes callbacks) and
    SystemCallFilter= (everything the probe does is in the allow list)."""
    caps = unit_capabilities()
    require(caps <= bounding_set(), f"this host lacks some of {sorted(caps)}")
    results = run_probe(sandbox, caps, tmp_path, sandboxed=True)
    assert set(failures(results)) == EXPECTED_FAILURES, failures(results)


@pytest.mark.parametrize("cap", sorted(NEEDED_FOR))
def test_each_capability_is_needed(sandbox, tmp_path, cap):
    caps = unit_capabilities()
    require(caps <= bounding_set(), f"this host lacks some of {sorted(caps)}")
    results = run_probe(sandbox, caps - {cap}, tmp_path)
    failed = set(failures(results))
    assert NEEDED_FOR[cap] <= failed, results
    # and nothing that another capability covers broke
    others = set().union(*(NEEDED_FOR[c] for c in NEEDED_FOR if c != cap)) - NEEDED_FOR[cap]
    assert not (failed & others), results


def test_unit_syscall_filter_includes_what_bcc_needs():
    allowed = unit_syscall_allowlist()
    assert {"bpf", "perf_event_open", "pidfd_open", "pidfd_send_signal", "kill"} <= allowed
    assert not {"mount", "umount2", "init_module", "finit_module", "reboot"} & allowed


# --- the daemon itself, with only the unit's capabilities -------------------------


def test_the_daemon_detects_with_only_the_units_capabilities():
    """`rome-guard run --sensor ebpf` under capsh with the unit's set: the
    eBPF sensor starts (no fallback to polling), and a reverse shell run by
    another user is seen through its /proc/PID/fd (CAP_DAC_READ_SEARCH and
    CAP_SYS_PTRACE) and counted in the metrics."""
    require_root()
    require(shutil.which("capsh") is not None, "capsh not installed")
    caps = unit_capabilities()
    require(caps <= bounding_set(), f"this host lacks some of {sorted(caps)}")
    import urllib.request

    from tests.fixtures.daemon import Daemon
    from tests.fixtures.network import listener, reverse_shell

    drop = ",".join(sorted(bounding_set() - caps))
    guard = Daemon(wrapper=("capsh", f"--drop={drop}", "--", "-c", 'exec "$0" "$@"'))
    try:
        guard.wait_ready()
        with open(f"/proc/{guard.proc.pid}/status") as f:
            effective = next(line for line in f if line.startswith("CapEff:")).split()[1]
        assert int(effective, 16).bit_count() == len(caps)  # capsh did drop the rest

        with listener("127.0.6.7", 0) as attacker:
            nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
            with reverse_shell(attacker, prefix=nobody) as shell:
                stdio = guard.wait_reverse_shell_alerts(shell.pid, "127.0.6.7")
                assert stdio["process"]["uid"] == 65534

        url = f"http://127.0.0.1:{guard.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as resp:
            body = resp.read().decode()
        assert 'rome_guard_sensor_info{mode="ebpf"} 1.0' in body
        assert 'action="alert",category="reverse_shell",rule="shell-stdio-socket"' in body
        assert "wire sensor unavailable" not in guard.log  # cgroup_skb needs no more
    finally:
        status = guard.stop()
    assert status == 0, guard.log[-3000:]
    assert "DEGRADED" not in guard.log and "Traceback" not in guard.log, guard.log[-3000:]
