"""The daemon under the shipped unit's own privileges and sandbox
(tests/fixtures/unit_sandbox.py reads them from systemd/rome-guard.service),
judging ssh clients whose forwards hide in a config: a user's
~/.ssh/config, and configs the guard cannot read at all (a pipe, a
descriptor, a file deleted or rewritten right after the client started).
Real ssh against a real sshd on loopback; the forwards really listen."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require, require_root
from tests.fixtures import ssh_client
from tests.fixtures.daemon import Daemon, by_pid, daemon, rule_ids
from tests.fixtures.network import free_port, sshd, wait_until
from tests.fixtures.ssh_client import (
    SSH_HOST,
    install_client_key,
    listening,
    until_listening,
    write_as,
)
from tests.fixtures.unit_sandbox import UnitSandbox

pytestmark = pytest.mark.ebpf

# how long an alert may take on a host loaded by other daemons and floods
# (a patience, not a timed assertion: a daemon behind drains its backlog,
# and a process whose exec was lost is judged at the re-read that follows)
PATIENCE_S = 60.0


def _host_bounding_set() -> set[str]:
    with open("/proc/self/status") as f:
        mask = int(next(ln for ln in f if ln.startswith("CapBnd:")).split()[1], 16)
    names = subprocess.run(
        ["capsh", f"--decode={mask:x}"], capture_output=True, text=True, check=True
    ).stdout
    return {n.removeprefix("cap_") for n in names.split("=", 1)[1].strip().split(",")}


@pytest.fixture(scope="module")
def unit():
    require_root()
    for tool in ("unshare", "setpriv", "capsh", "mount"):
        require(shutil.which(tool) is not None, f"{tool} not installed")
    sandbox = UnitSandbox.from_unit()
    require(
        set(sandbox.bounding) <= _host_bounding_set(),
        f"this host's bounding set lacks some of {sorted(sandbox.bounding)}",
    )
    return sandbox


@pytest.fixture(scope="module")
def guard(unit: UnitSandbox):
    with daemon(wrapper=lambda workdir: unit.wrapper((workdir,))) as d:
        assert "ebpf sensor" in d.log
        # every sensor works with the unit's privileges (the wire sensor's and
        # the UDP hooks' cgroup attachments included)
        assert "DEGRADED COVERAGE" not in d.log and "unseen" not in d.log, d.log
        yield d


@pytest.fixture
def home_user():
    """A throwaway user whose home is under /home, where ProtectHome= acts."""
    name = f"rgunit{os.getpid() % 100000}"
    home = f"/home/{name}"
    subprocess.run(["useradd", "-m", "-d", home, "-s", "/bin/sh", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", "-r", name], check=False, stderr=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def _running(*procs: subprocess.Popen):
    try:
        yield procs
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _start(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, stderr=subprocess.DEVNULL, start_new_session=True, **kw)


# --- the harness follows the unit -------------------------------------------------


def test_the_harness_reads_a_unit_as_systemd_does(tmp_path: Path) -> None:
    """Pure: repeated list settings add up, an empty one resets, the last
    scalar wins; and the shipped unit grants what the ssh reader needs."""
    unit = tmp_path / "x.service"
    unit.write_text(
        "[Unit]\nProtectHome=tmpfs\n[Service]\n"
        "CapabilityBoundingSet=CAP_SYS_ADMIN\nCapabilityBoundingSet=\n"
        "CapabilityBoundingSet=CAP_BPF CAP_KILL\nCapabilityBoundingSet=CAP_SETUID\n"
        "ProtectHome=yes\nProtectHome=read-only\nReadWritePaths=/a -/b\nReadWritePaths=/c\n"
        "NoNewPrivileges=yes\n"
    )
    parsed = UnitSandbox.from_unit(str(unit))
    assert parsed.bounding == ("bpf", "kill", "setuid")
    assert parsed.protect_home == "read-only" and parsed.protect_system == "no"
    assert parsed.read_write_paths == ("/a", "-/b", "/c")
    assert parsed.no_new_privileges and not parsed.private_tmp
    shipped = UnitSandbox.from_unit()
    assert {"setuid", "setgid"} <= set(shipped.bounding) and shipped.protect_home == "read-only"


def test_the_harness_applies_what_the_unit_says(unit: UnitSandbox, tmp_path: Path) -> None:
    """Capabilities, no_new_privs and the file system as the unit file says:
    change the unit and this (and every test below) follows."""
    writable = tmp_path / "state"
    writable.mkdir()
    probe = (
        "grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status; "
        "for d in /etc /usr /home /root; do "
        "  if touch $d/.rg-probe 2>/dev/null; then rm $d/.rg-probe; echo $d rw; else echo $d ro; fi;"
        "done; ls -A /home | wc -l; "
        f"touch {writable}/ok && echo state rw"
    )
    out = subprocess.run(
        [*unit.wrapper((str(writable),)), "sh", "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(ln.split(None, 1) for ln in out.stdout.splitlines() if len(ln.split()) == 2)
    caps = subprocess.run(
        ["capsh", f"--decode={lines['CapBnd:'].strip()}"], capture_output=True, text=True
    ).stdout
    assert {c.removeprefix("cap_") for c in caps.split("=", 1)[1].strip().split(",")} == set(
        unit.bounding
    )
    assert lines["CapEff:"] == lines["CapBnd:"]  # uid 0: effective is the bounding set
    assert lines["NoNewPrivs:"].strip() == ("1" if unit.no_new_privileges else "0")
    if unit.protect_system == "strict":
        assert lines["/etc"] == lines["/usr"] == "ro"
    if unit.protect_home in ("yes", "read-only", "tmpfs"):
        assert lines["/home"] == "ro" or unit.protect_home == "tmpfs"
    assert lines["state"] == "rw"
    assert (writable / "ok").exists()


# --- a RemoteForward hidden in the user's ~/.ssh/config ---------------------------


def test_a_remote_forward_in_the_users_home_config_is_alerted_under_the_unit(
    guard: Daemon, home_user
) -> None:
    """`ssh -N devbox` says nothing; ~/.ssh/config opens the forward. Under
    the unit the reader must run ssh -G as the user and see that home: with
    ProtectHome=yes or without CAP_SETUID/CAP_SETGID it cannot, and this
    fails."""
    forward = free_port()
    home = home_user.pw_dir
    with sshd("127.0.0.1") as server:
        key = install_client_key(home_user, server)
        write_as(
            home_user,
            os.path.join(home, ".ssh", "config"),
            SSH_HOST.format(alias="devbox", port=server.port, key=key)
            + f"  RemoteForward 127.0.0.1:{forward} localhost:22\n"
            + SSH_HOST.format(alias="devbox-plain", port=server.port, key=key),
        )
        as_user = ssh_client.as_user(home_user)
        with _running(
            _start(["ssh", "-N", "devbox"], **as_user),
            _start(["ssh", "devbox-plain", "true"], **as_user),
        ) as (tunnel, quiet):
            until_listening(forward, tunnel)
            alert = guard.wait_alert(
                by_pid(tunnel.pid, "tunnel-ssh-remote-forward"), timeout=PATIENCE_S
            )
            assert alert["process"]["uid"] == home_user.pw_uid
            assert "effective ssh config has remote forward" in alert["reason"]
            assert quiet.wait(30) == 0
            guard.settle()
            assert guard.alerts_for(by_pid(quiet.pid)) == []


def test_in_enforce_mode_the_hidden_forward_is_killed_under_the_unit(
    unit: UnitSandbox, home_user
) -> None:
    """The same hidden RemoteForward, the guard enforcing under the unit:
    the alert is journaled, then the user's ssh is killed (CAP_KILL on
    another user's process) and its forward closes."""
    forward = free_port()
    home = home_user.pw_dir
    with contextlib.ExitStack() as stack:  # no parenthesised with-items: Python 3.9
        server = stack.enter_context(sshd("127.0.0.1"))
        enforcing = stack.enter_context(
            daemon(mode="enforce", wrapper=lambda workdir: unit.wrapper((workdir,)))
        )
        key = install_client_key(home_user, server)
        write_as(
            home_user,
            os.path.join(home, ".ssh", "config"),
            SSH_HOST.format(alias="devbox", port=server.port, key=key)
            + f"  RemoteForward 127.0.0.1:{forward} localhost:22\n",
        )
        tunnel = _start(
            ["ssh", "-N", "devbox"],
            **ssh_client.as_user(home_user),
        )
        with _running(tunnel):
            assert tunnel.wait(30) == -signal.SIGKILL
            records = enforcing.alerts_for(by_pid(tunnel.pid))
            alert = next(r for r in records if "tunnel-ssh-remote-forward" in rule_ids(r))
            response = next(r for r in records if r.get("event") == "response")
            assert alert["action"] == "kill" and response["action"] == "killed"
            assert records.index(alert) < records.index(response)
            assert not listening(forward)


def test_a_config_file_in_tmp_is_read_through_the_clients_root(
    guard: Daemon, tmp_path: Path
) -> None:
    """The unit's PrivateTmp= hides the host's /tmp from the daemon: a -F
    file there is read through /proc/PID/root, and its forward is seen."""
    forward = free_port()
    with sshd("127.0.0.1") as server:
        cfg = tmp_path / "tunnels.cfg"
        cfg.write_text(
            SSH_HOST.format(alias="h1", port=server.port, key=server.client_key)
            + f"  RemoteForward 127.0.0.1:{forward} localhost:22\n"
        )
        with _running(_start(["ssh", "-F", str(cfg), "-N", "h1"])) as (tunnel,):
            until_listening(forward, tunnel)
            guard.wait_alert(by_pid(tunnel.pid, "tunnel-ssh-remote-forward"), timeout=PATIENCE_S)


# --- configs the guard cannot read ----------------------------------------------


# spelling: (bash command line, {cfg} the config file, {text} its text;
# whether the tunnel comes up). ssh runs as bash's child (no exec of the
# last command: "rc=$?"), so that ssh is the process the guard judges.
SPELLINGS = {
    "stdin-redirect": ("ssh -F /dev/stdin -N h1 < {cfg}; rc=$?; exit $rc", True),
    "stdin-pipe": ("cat {cfg} | ssh -F /dev/stdin -N h1; rc=$?; exit $rc", True),
    "fd-2": ("ssh -F /dev/fd/2 -N h1 2< {cfg}; rc=$?; exit $rc", True),
    "process-substitution-on-stdin": (
        "ssh -F /proc/self/fd/0 -N h1 < <(printf %s {text}); rc=$?; exit $rc",
        True,
    ),
    # OpenSSH closes descriptors above 2 before reading its config: these
    # fail in ssh itself, and are still alerted (another client may not)
    "fd-3": ("ssh -F /dev/fd/3 -N h1 3< {cfg}; rc=$?; exit $rc", False),
    "process-substitution": ("ssh -F <(printf %s {text}) -N h1; rc=$?; exit $rc", False),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_an_ssh_config_from_a_descriptor_is_a_probable_tunnel(
    guard: Daemon, tmp_path: Path, spelling: str
) -> None:
    command, comes_up = SPELLINGS[spelling]
    forward = free_port()
    with sshd("127.0.0.1") as server:
        text = SSH_HOST.format(alias="h1", port=server.port, key=server.client_key)
        text += f"  RemoteForward 127.0.0.1:{forward} localhost:22\n"
        cfg = tmp_path / "cfg"
        cfg.write_text(text)
        line = command.format(cfg=cfg, text=_bash_quote(text))
        with _running(_start(["bash", "-c", line])) as (shell,):
            if comes_up:
                wait_until(lambda: listening(forward), timeout=20)
            alert = guard.wait_alert(
                lambda r: (
                    "tunnel-ssh-config-unknown" in rule_ids(r)
                    and r["process"]["comm"] == "ssh"
                    and r["lineage"][0]["pid"] == shell.pid
                ),
                timeout=PATIENCE_S,
            )
            assert alert["category"] == "reverse_tunnel" and alert["severity"] == "high"
            assert "descriptor" in alert["reason"]
            if not comes_up:
                assert shell.wait(30) != 0 and not listening(forward)


def test_a_command_with_a_config_on_stdin_is_not_tunnel_shaped(
    guard: Daemon, tmp_path: Path
) -> None:
    """The benign twin: a one-shot command with its config on stdin."""
    with sshd("127.0.0.1") as server:
        cfg = tmp_path / "cfg"
        cfg.write_text(SSH_HOST.format(alias="h1", port=server.port, key=server.client_key))
        with open(cfg) as stdin:
            once = subprocess.Popen(["ssh", "-F", "/dev/stdin", "h1", "true"], stdin=stdin)
            assert once.wait(30) == 0
    guard.settle()
    assert guard.alerts_for(by_pid(once.pid)) == []


@pytest.mark.parametrize("change", ["deleted", "rewritten"])
def test_a_config_gone_or_rewritten_right_after_the_start_is_a_probable_tunnel(
    guard: Daemon, tmp_path: Path, change: str
) -> None:
    """The client reads its config and the file goes (or loses its forward)
    before the guard reads it. The guard is stopped meanwhile, so that the
    change lands before it looks, every time."""
    forward = free_port()
    with sshd("127.0.0.1") as server:
        cfg = tmp_path / "cfg"
        plain = SSH_HOST.format(alias="h1", port=server.port, key=server.client_key)
        cfg.write_text(plain + f"  RemoteForward 127.0.0.1:{forward} localhost:22\n")
        guard.signal(signal.SIGSTOP)
        try:
            tunnel = _start(["ssh", "-F", str(cfg), "-N", "h1"])
            with _running(tunnel):
                until_listening(forward, tunnel)
                if change == "deleted":
                    cfg.unlink()
                else:
                    cfg.write_text(plain)  # no forward left to see
                guard.signal(signal.SIGCONT)
                alert = guard.wait_alert(
                    by_pid(tunnel.pid, "tunnel-ssh-config-unknown"), timeout=PATIENCE_S
                )
                assert ("is gone" if change == "deleted" else "changed after") in alert["reason"]
        finally:
            guard.signal(signal.SIGCONT)


def test_every_unknown_config_is_counted_in_metrics_and_status(guard: Daemon) -> None:
    """A client with its config on stdin (it fails at once: nothing listens
    on that loopback port) is counted by reason in the metrics and in
    `rome-guard status`."""
    client = subprocess.run(
        ["ssh", "-F", "/dev/stdin", "-N", "-p", str(free_port()), "127.0.0.1"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=30,
    )
    assert client.returncode != 0
    wait_until(
        lambda: guard.metric("rome_guard_ssh_config_unknown_total", reason="descriptor") >= 1,
        timeout=30,
    )
    wait_until(lambda: _status(guard)["ssh_config"]["unknown"].get("descriptor", 0) >= 1)
    shown = subprocess.run(
        [sys.executable, "-m", "rome_guard", "status", "--run-dir", guard.run_dir],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "ssh configs:" in shown.stdout and "descriptor" in shown.stdout


def _status(guard: Daemon) -> dict:
    with open(os.path.join(guard.run_dir, "status.json")) as f:
        return json.load(f)


def _bash_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_a_notebook_port_forward_is_low_and_counted_as_low(guard: Daemon, tmp_path: Path) -> None:
    """`ssh -N -L 18888:127.0.0.1:8888 host`: the notebook forward of
    everyday life is the low rule alone (dashboards/alerts.yml makes low a
    ticket, never a page: tests/ops/test_dashboards.py), and its metric
    series says low."""
    local = free_port()
    with sshd("127.0.0.1") as server:
        cfg = tmp_path / "cfg"
        cfg.write_text(SSH_HOST.format(alias="gpu-box", port=server.port, key=server.client_key))
        argv = ["ssh", "-F", str(cfg), "-N", "-L", f"{local}:127.0.0.1:{server.port}", "gpu-box"]
        with _running(_start(argv)) as (forward,):
            until_listening(local, forward)
            alert = guard.wait_alert(
                by_pid(forward.pid, "tunnel-ssh-local-forward-persistent"), timeout=PATIENCE_S
            )
            assert alert["severity"] == "low"
            assert rule_ids(alert) == {"tunnel-ssh-local-forward-persistent"}
            assert (
                guard.metric(
                    "rome_guard_alerts_total",
                    rule="tunnel-ssh-local-forward-persistent",
                    severity="low",
                )
                >= 1
            )
