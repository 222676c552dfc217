"""`rome-guard run` end to end as root: real processes, real kernel events,
a real sshd and real peers on loopback. The eBPF tests never skip in CI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import require_root
from tests.fixtures.daemon import Daemon, by_pid, daemon, owned_bpf_programs
from tests.fixtures.network import listener, reverse_shell, sshd, write_fake_miner

WALLET = "4" + "8" * 94


@pytest.fixture(scope="module")
def guard():
    require_root()
    with daemon() as d:
        assert "ebpf sensor" in d.log
        yield d


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, timeout=30, check=False, **kw)


def test_miner_living_40ms_is_caught(guard: Daemon, tmp_path: Path) -> None:
    miner = tmp_path / "xmrig"
    shutil.copy("/bin/sleep", miner)
    proc = subprocess.Popen([str(miner), "0.04"])
    proc.wait()
    assert proc.returncode == 0  # it lived its 40 ms and left
    alert = guard.wait_alert(by_pid(proc.pid, "miner-known-binary"))
    assert alert["process"]["cmdline"] == [str(miner), "0.04"]
    assert alert["process"]["exe"].endswith("xmrig")
    assert alert["lineage"][0]["pid"] == os.getpid()
    assert alert["action"] == "alert" and alert["mode"] == "monitor"


def test_renamed_miner_with_only_pool_arguments(guard: Daemon, tmp_path: Path) -> None:
    with listener("127.0.5.5", 0, stratum=True) as pool:
        miner = write_fake_miner(str(tmp_path), "python-helper", linger_s=0.05)
        proc = subprocess.Popen([miner, "-o", f"127.0.5.5:{pool.port}", "-u", WALLET, "-p", "x"])
        proc.wait()
        assert pool.received  # it spoke Stratum to the pool
    alert = guard.wait_alert(by_pid(proc.pid, "miner-wallet-and-pool"))
    assert alert["process"]["comm"] == "python-helper"


def test_ssh_remote_forward_and_autossh(guard: Daemon) -> None:
    with sshd("127.0.0.1") as server:
        tunnel = subprocess.Popen(
            server.ssh_argv("-N", "-R", "127.0.0.1:0:localhost:22", "root@127.0.0.1"),
            stderr=subprocess.DEVNULL,
        )
        env = dict(os.environ, AUTOSSH_GATETIME="0", AUTOSSH_PATH=shutil.which("ssh") or "ssh")
        wrapped = subprocess.Popen(
            server.ssh_argv(
                "-M",
                "0",
                "-N",
                "-R",
                "127.0.0.1:0:localhost:22",
                "root@127.0.0.1",
                program="autossh",
            ),
            env=env,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            first = guard.wait_alert(by_pid(tunnel.pid, "tunnel-ssh-remote-forward"))
            assert first["category"] == "reverse_tunnel"
            guard.wait_alert(by_pid(wrapped.pid, "tunnel-ssh-remote-forward"))
            # autossh's own ssh child carries the same forward
            guard.wait_alert(
                lambda r: (
                    r["rule"] == "tunnel-ssh-remote-forward"
                    and r["lineage"]
                    and r["lineage"][0]["pid"] == wrapped.pid
                )
            )
        finally:
            tunnel.kill()
            tunnel.wait()
            os.killpg(wrapped.pid, signal.SIGKILL)  # autossh and its ssh child
            wrapped.wait()


def test_dev_tcp_reverse_shell(guard: Daemon) -> None:
    with listener("127.0.6.6", 0) as attacker, reverse_shell(attacker) as shell:
        stdio = guard.wait_reverse_shell_alerts(shell.pid, "127.0.6.6")
        assert stdio["network"]["dport"] == attacker.port


SCANNER = r"""
import socket, sys
targets = [(h, int(p)) for h, p in (t.rsplit(":", 1) for t in sys.argv[1:])]
for host, port in targets:
    s = socket.socket(); s.settimeout(0.5)
    try: s.connect((host, port))
    except OSError: pass
    finally: s.close()
"""


def test_port_scan_of_one_address(guard: Daemon) -> None:
    targets = [f"127.0.8.8:{port}" for port in range(1, 121)]
    proc = subprocess.Popen([sys.executable, "-c", SCANNER, *targets])
    proc.wait()
    alert = guard.wait_alert(by_pid(proc.pid, "probe-fanout"))
    assert "ports on 127.0.8.8" in alert["reason"]
    assert alert["category"] == "net_probe"


def test_sweep_across_a_subnet(guard: Daemon) -> None:
    targets = [f"127.0.1.{host}:9" for host in range(1, 255)]
    proc = subprocess.Popen([sys.executable, "-c", SCANNER, *targets])
    proc.wait()
    alert = guard.wait_alert(by_pid(proc.pid, "probe-fanout"))
    assert "destinations" in alert["reason"]


def test_bash_probe_loop_is_one_scanner(guard: Daemon) -> None:
    loop = subprocess.Popen(
        [
            "bash",
            "-c",
            "for p in $(seq 1 80); do (echo >/dev/tcp/127.0.8.9/$p) 2>/dev/null && echo $p; done",
        ],
        stdout=subprocess.DEVNULL,
    )
    loop.wait()
    guard.wait_alert(by_pid(loop.pid, "probe-fanout"))


RENDEZVOUS = r"""
import socket, sys, time
peers = [socket.create_connection((f"127.0.2.{i}", 29500)) for i in range(1, 65)]
time.sleep(0.5)
"""


def test_normal_work_is_quiet(guard: Daemon) -> None:
    listeners = [socket.create_server((f"127.0.2.{i}", 29500), backlog=8) for i in range(1, 65)]
    quiet: list[int] = []
    try:
        trainer = subprocess.Popen([sys.executable, "-c", RENDEZVOUS])
        assert trainer.wait(30) == 0
        quiet.append(trainer.pid)
        with sshd("127.0.0.1") as server:
            plain = subprocess.Popen(server.ssh_argv("root@127.0.0.1", "true"))
            assert plain.wait(30) == 0
            quiet.append(plain.pid)
            repo = tempfile.mkdtemp(prefix="rg-git-")
            run(["git", "init", "-q", "--bare", f"{repo}/r.git"])
            ssh_cmd = " ".join(server.ssh_argv())
            clone = subprocess.Popen(
                [
                    "git",
                    "clone",
                    "-q",
                    f"ssh://root@127.0.0.1:{server.port}{repo}/r.git",
                    f"{repo}/c",
                ],
                env=dict(os.environ, GIT_SSH_COMMAND=ssh_cmd.replace(f" -p {server.port}", "")),
                stderr=subprocess.DEVNULL,
            )
            assert clone.wait(30) == 0
            quiet.append(clone.pid)
            shutil.rmtree(repo, ignore_errors=True)
        guard.settle()
        noisy = guard.alerts_for(
            lambda r: (
                r["process"]["pid"] in quiet
                or any(p["pid"] in quiet for p in r["lineage"])
                or str(r.get("network", {}).get("daddr", "")).startswith("127.0.2.")
            )
        )
        assert noisy == []
    finally:
        for srv in listeners:
            srv.close()


def test_hostile_argv_keeps_journal_and_log_lines_valid(guard: Daemon) -> None:
    hostile = ["line\nbreak", "\x1b[2J\x1b[31m", os.fsdecode(b"\xff\xfe\xc3("), "B" * 100 * 1024]
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(0.3)", "--donate-level=1", *hostile]
    )
    proc.wait()
    guard.wait_alert(by_pid(proc.pid, "miner-only-flags"))
    with open(guard.alerts, "rb") as f:
        lines = f.read().split(b"\n")[:-1]
    for raw in lines:
        record = json.loads(raw.decode("utf-8"))  # strict UTF-8, one object per line
        assert isinstance(record["process"]["cmdline"], list)
    record = guard.alerts_for(by_pid(proc.pid, "miner-only-flags"))[0]
    assert "line\nbreak" in record["process"]["cmdline"]
    assert "\\xff\\xfe\\xc3(" in record["process"]["cmdline"]
    assert any(
        arg.startswith("BBBB") and "more chars" in arg for arg in record["process"]["cmdline"]
    )
    alert_lines = [line for line in guard.log.splitlines() if f"pid={proc.pid}" in line]
    assert len(alert_lines) == 1
    assert "\x1b" not in guard.log


def test_sighup_with_broken_rules_keeps_the_old_ones(tmp_path: Path) -> None:
    require_root()
    rules = tmp_path / "site.yaml"
    rule = "rules:\n  - id: site-marker\n    category: custom\n    severity: low\n    description: marker\n    match: {arg: [%s]}\n"
    rules.write_text(rule % "rg-marker-one")
    with daemon("--rules", str(rules), sensor="ebpf") as d:
        rules.write_text(
            "rules:\n  - id: site-marker\n    category: custom\n    severity: sometimes\n"
        )
        d.signal(signal.SIGHUP)
        log = d.wait_log("reload rejected")
        assert f"{rules}:2:" in log or f"{rules}:4:" in log
        marker = subprocess.Popen(["/bin/sh", "-c", "true", "rg-marker-one"])
        marker.wait()
        d.wait_alert(by_pid(marker.pid, "site-marker"))
        rules.write_text(rule % "rg-marker-two")
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded:")
        second = subprocess.Popen(["/bin/sh", "-c", "true", "rg-marker-two"])
        second.wait()
        d.wait_alert(by_pid(second.pid, "site-marker"))


def _sensor_program_ids() -> set[int]:
    """Ids of loaded BPF programs named like the sensor's (rgs_*). This
    bpftool cannot list owner pids, so the daemon's are those that appear
    while it runs."""
    out = run(["bpftool", "prog", "show", "--json"]).stdout
    return {p["id"] for p in json.loads(out or "[]") if p.get("name", "").startswith("rgs_")}


def test_sigterm_detaches_everything_and_exits_zero() -> None:
    require_root()
    d = Daemon(sensor="ebpf")
    try:
        d.wait_ready()
        # exactly its programs (by its fds), whatever else runs on the host
        ours = owned_bpf_programs(d.proc.pid) & _sensor_program_ids()
        assert ours, "the running daemon should hold BPF programs"
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        elapsed = time.monotonic() - started
        assert ours.isdisjoint(_sensor_program_ids())
        assert "rome-guard stopped" in d.log
        assert elapsed < 5  # the 2 s budget is measured in bench, not asserted here
    finally:
        d.stop()


def test_systemd_notify_ready_watchdog_and_status(tmp_path: Path) -> None:
    require_root()
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1)
    env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    d = Daemon(sensor="ebpf", env=env)
    messages: list[str] = []
    try:
        d.wait_ready()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any("WATCHDOG=1" in m for m in messages):
            with contextlib.suppress(TimeoutError):
                messages.append(sock.recv(4096).decode())
        ready = [m for m in messages if "READY=1" in m]
        assert ready and "STATUS=monitor mode, ebpf sensor" in ready[0]
        assert any("WATCHDOG=1" in m for m in messages)
    finally:
        d.stop()
        sock.close()


# root without the capabilities BPF needs: what a daemon started without
# them (or in a locked-down container) sees
NO_BPF = (
    "capsh",
    "--drop=cap_bpf,cap_perfmon,cap_sys_admin",
    "--",
    "-c",
    'exec "$@"',
    "rome-guard",
)


def test_without_ebpf_auto_falls_back_loudly_and_ebpf_refuses() -> None:
    require_root()
    auto = Daemon(sensor="auto", wrapper=NO_BPF)
    try:
        auto.wait_ready()
        log = auto.log
        assert "DEGRADED COVERAGE" in log and "poll sensor" in log
    finally:
        auto.stop()
    strict = Daemon(sensor="ebpf", wrapper=NO_BPF)
    assert strict.proc.wait(60) == 2
    assert "--sensor ebpf:" in strict.log
    assert "CAP_BPF" in strict.log
    strict.stop()


def test_monitor_mode_alerts_but_never_kills_or_blocks(guard: Daemon, tmp_path: Path) -> None:
    miner = tmp_path / "xmrig"
    shutil.copy("/bin/sleep", miner)
    proc = subprocess.Popen([str(miner), "30"])
    try:
        alert = guard.wait_alert(by_pid(proc.pid, "miner-known-binary"))
        assert alert["action"] == "alert" and alert["mode"] == "monitor"
        guard.settle(0.5)
        assert proc.poll() is None  # still running
        assert not [r for r in guard.records() if r.get("event") in ("response", "prevention")]
        out = run(["bpftool", "prog", "show", "--json"]).stdout
        loaded = json.loads(out.strip() or "[]")
        # nothing that blocks or kills is loaded: no prevention program at all
        assert [p["name"] for p in loaded if p.get("name", "").startswith("rgp_")] == []
        assert "in-kernel prevention" not in guard.log
    finally:
        proc.kill()
        proc.wait()
