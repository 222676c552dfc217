"""The eBPF sensor against real kernel events: real processes, real sockets
on loopback, a real open of a /dev/nvidia* path. Needs root and a working
BCC; skips on a laptop, fails in CI (tests.conftest.require).

One sensor (one ~5 s compile) serves the module; a second one, built as on
an older kernel without the optional tracepoints, checks the fallbacks and
that close() leaves nothing loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable, Iterator

import pytest

from rome_guard.events import (
    CONNECT_ATTEMPT,
    CONNECT_ESTABLISHED,
    CONNECT_REFUSED,
    ConnectEvent,
    ExecEvent,
    ExitEvent,
    FdDupEvent,
    ForkEvent,
    GpuOpenEvent,
)
from rome_guard.layout.sensor import ARG_MAX_LEN
from rome_guard.linux import cgroup_dir_id as cgroup_id
from rome_guard.sensors.ebpf import (
    ATTACHMENTS,
    BTF_FEATURES,
    FD_TABLE_FEATURE,
    GROUP_DEAD_FEATURE,
    PROGRAM_PREFIX,
    EbpfSensor,
    EbpfUnavailable,
    probe_ebpf,
)
from rome_guard.textsafe import from_bytes
from tests.conftest import require
from tests.fixtures.daemon import owned_bpf_maps, owned_bpf_programs

pytestmark = pytest.mark.ebpf

WAIT_S = 15.0  # events arrive in milliseconds; this only bounds a failing test


class Recorder:
    """Polls the sensor until an expected event shows up; keeps everything
    seen so a test can also assert what did not happen."""

    def __init__(self, sensor: EbpfSensor):
        self.sensor = sensor
        self.events: list = []

    def wait_for(self, predicate: Callable[[object], bool], what: str):
        deadline = time.monotonic() + WAIT_S
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen: {what}")
            self.events.extend(self.sensor.poll(100))

    def matching(self, predicate: Callable[[object], bool]) -> list:
        return [e for e in self.events if predicate(e)]


@pytest.fixture(scope="module")
def sensor() -> Iterator[EbpfSensor]:
    reason = probe_ebpf()
    require(reason is None, f"eBPF sensor unavailable: {reason}")
    s = EbpfSensor()
    try:
        s.start()
        yield s
    finally:
        s.close()


@pytest.fixture
def rec(sensor: EbpfSensor) -> Recorder:
    sensor.poll(0)  # drop what earlier tests (and the host) left behind
    return Recorder(sensor)


def _exec_of(pid: int) -> Callable[[object], bool]:
    return lambda e: isinstance(e, ExecEvent) and e.pid == pid


def _connect(pid: int, outcome: str, dport: int) -> Callable[[object], bool]:
    return lambda e: (
        isinstance(e, ConnectEvent)
        and e.pid == pid
        and e.outcome == outcome
        and e.endpoint.dport == dport
    )


# --- process lifecycle ----------------------------------------------------------


def test_exec_with_hostile_argv(rec):
    long_arg = b"A" * (100 * 1024)
    argv = [b"/bin/true", b"line1\nline2", b"\xff\xfe-not-utf8", long_arg, b"last"]
    child = subprocess.Popen(argv)
    child.wait()

    event = rec.wait_for(_exec_of(child.pid), "exec of /bin/true")
    assert event.filename == "/bin/true"
    assert event.comm == "true"
    assert event.ppid == os.getpid()
    assert event.uid == os.getuid()
    assert event.argv[:3] == tuple(from_bytes(a) for a in argv[:3])
    assert event.argv[2].encode("utf-8", "surrogateescape") == b"\xff\xfe-not-utf8"
    # the 100 KiB argument is cut, flagged, and the arguments after it kept
    assert event.argv[3] == "A" * (ARG_MAX_LEN - 1)
    assert event.argv[4] == "last"
    assert event.argv_truncated


def test_exec_with_short_argv_is_complete(rec):
    child = subprocess.Popen(["/bin/true", "--pool", "stratum+tcp://127.0.0.2:3333"])
    child.wait()
    event = rec.wait_for(_exec_of(child.pid), "exec of /bin/true")
    assert event.argv == ("/bin/true", "--pool", "stratum+tcp://127.0.0.2:3333")
    assert not event.argv_truncated


def test_exec_from_a_non_leader_thread(rec):
    code = (
        "import os, threading\n"
        "t = threading.Thread(target=lambda: os.execv('/bin/true', ['/bin/true', 'from-thread']))\n"
        "t.start(); t.join()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    child.wait()
    event = rec.wait_for(
        lambda e: isinstance(e, ExecEvent) and e.pid == child.pid and e.filename == "/bin/true",
        "exec from a thread",
    )
    assert event.argv == ("/bin/true", "from-thread")


# A freshly forked child execs with string literals: fork() does not copy
# the page tables of file-backed memory, so at execve entry those strings
# are not paged in yet and cannot be read from BPF.
FORK_EXEC_LITERAL_C = r"""
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    pid_t pid = fork();
    if (pid == 0) {
        execl("/bin/true", "/bin/true", "literal-arg-from-rodata", (char *)0);
        _exit(127);
    }
    printf("%d\n", pid);
    return waitpid(pid, 0, 0) == pid ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def fork_exec_literal(tmp_path_factory) -> str:
    require(shutil.which("gcc") is not None, "gcc is needed (apt-get install gcc)")
    build = tmp_path_factory.mktemp("literal")
    (build / "literal.c").write_text(FORK_EXEC_LITERAL_C)
    binary = str(build / "literal")
    subprocess.run(["gcc", "-O0", "-o", binary, str(build / "literal.c")], check=True)
    return binary


def test_exec_argv_not_yet_paged_in_is_read(rec, sensor, fork_exec_literal):
    out = subprocess.run([fork_exec_literal], check=True, capture_output=True)
    event = rec.wait_for(_exec_of(int(out.stdout)), "exec with literal argv")
    if "HAVE_PREPARE_EXEC" in sensor.features:  # 6.10+: read again before the exec
        assert event.argv == ("/bin/true", "literal-arg-from-rodata")
        assert not event.argv_truncated
    else:  # older kernels: flagged, user space reads /proc
        assert event.argv_truncated


def test_short_lived_process_exec_and_exit(rec):
    child = subprocess.Popen(["/bin/sleep", "0.04"])
    child.wait()
    exec_ = rec.wait_for(_exec_of(child.pid), "exec of sleep")
    exit_ = rec.wait_for(lambda e: isinstance(e, ExitEvent) and e.pid == child.pid, "exit")
    assert exec_.argv == ("/bin/sleep", "0.04")
    assert exit_.exit_code == 0
    assert exit_.timestamp_ns > exec_.timestamp_ns


def test_exit_code_is_reported(rec):
    child = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
    child.wait()
    exit_ = rec.wait_for(lambda e: isinstance(e, ExitEvent) and e.pid == child.pid, "exit")
    assert exit_.exit_code == 3


def test_fork_has_the_right_parent_and_threads_are_not_processes(rec):
    thread_ids = []
    thread = threading.Thread(target=lambda: thread_ids.append(threading.get_native_id()))
    thread.start()
    thread.join()

    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

    fork = rec.wait_for(
        lambda e: isinstance(e, ForkEvent) and e.child_pid == pid, "fork of a child"
    )
    assert fork.parent_pid == os.getpid()
    exit_ = rec.wait_for(lambda e: isinstance(e, ExitEvent) and e.pid == pid, "child exit")
    assert exit_.exit_code == 0
    # the thread came and went before the fork: neither is reported
    assert not rec.matching(lambda e: isinstance(e, ForkEvent) and e.child_pid in thread_ids)
    assert not rec.matching(lambda e: isinstance(e, ExitEvent) and e.pid == os.getpid())


def test_grandchild_lineage(rec):
    child = subprocess.Popen(["/bin/sh", "-c", "/bin/true grandchild; exit 0"])
    child.wait()
    event = rec.wait_for(
        lambda e: isinstance(e, ExecEvent) and e.argv == ("/bin/true", "grandchild"),
        "exec of the grandchild",
    )
    assert event.ppid == child.pid


# --- network ----------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.socket()
    server.bind(("127.0.0.7", 0))
    server.listen(16)
    try:
        yield server
    finally:
        server.close()


def test_tcp_connect_established(rec, listener):
    port = listener.getsockname()[1]
    with socket.create_connection(("127.0.0.7", port)) as client:
        sport = client.getsockname()[1]
    me = os.getpid()
    attempt = rec.wait_for(_connect(me, CONNECT_ATTEMPT, port), "TCP attempt")
    done = rec.wait_for(_connect(me, CONNECT_ESTABLISHED, port), "TCP established")
    assert attempt.endpoint.proto == done.endpoint.proto == "tcp"
    assert attempt.endpoint.daddr == done.endpoint.daddr == "127.0.0.7"
    assert done.endpoint.sport == sport
    assert done.endpoint.saddr.startswith("127.")
    assert done.endpoint.family == 4
    assert done.comm == attempt.comm
    assert done.timestamp_ns >= attempt.timestamp_ns
    # a TCP connect() is not also reported as a datagram connect
    assert not rec.matching(
        lambda e: (
            isinstance(e, ConnectEvent) and e.endpoint.dport == port and e.endpoint.proto != "tcp"
        )
    )


def test_tcp_connect_refused(rec):
    with socket.socket() as probe:
        probe.bind(("127.0.0.8", 0))
        closed_port = probe.getsockname()[1]  # bound, not listening: RST
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.8", closed_port))
    event = rec.wait_for(_connect(os.getpid(), CONNECT_REFUSED, closed_port), "refused")
    assert event.endpoint.daddr == "127.0.0.8"
    assert not rec.matching(_connect(os.getpid(), CONNECT_ESTABLISHED, closed_port))


def test_repeated_tcp_connects_report_each_new_outcome_once(rec, listener):
    port = listener.getsockname()[1]
    for _ in range(30):  # a client pool reconnecting: nothing new after the first
        with socket.create_connection(("127.0.0.7", port)):
            listener.accept()[0].close()
    listener.close()  # now the same destination refuses: a new outcome
    for _ in range(30):
        with socket.socket() as client, pytest.raises(ConnectionRefusedError):
            client.connect(("127.0.0.7", port))
    me = os.getpid()
    rec.wait_for(_connect(me, CONNECT_REFUSED, port), "the new outcome")
    rec.events.extend(rec.sensor.poll(300))  # whatever else the storm left
    assert len(rec.matching(_connect(me, CONNECT_ESTABLISHED, port))) == 1
    assert len(rec.matching(_connect(me, CONNECT_REFUSED, port))) == 1
    assert len(rec.matching(_connect(me, CONNECT_ATTEMPT, port))) == 1


def test_tcp_connect_ipv6(rec):
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        with socket.create_connection(("::1", port)):
            pass
    event = rec.wait_for(_connect(os.getpid(), CONNECT_ESTABLISHED, port), "IPv6 connect")
    assert event.endpoint.family == 6
    assert event.endpoint.daddr == "::1"
    assert event.endpoint.is_loopback


def test_udp_sendto_reported_once_per_destination(rec):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.9", 0))
        port = sink.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(5):
                sender.sendto(b"x", ("127.0.0.9", port))
            sender.sendto(b"y", ("127.0.0.9", port + 1 if port < 65535 else port - 1))
    other = port + 1 if port < 65535 else port - 1
    first = rec.wait_for(_connect(os.getpid(), CONNECT_ATTEMPT, port), "UDP sendto")
    rec.wait_for(_connect(os.getpid(), CONNECT_ATTEMPT, other), "UDP sendto, other port")
    assert first.endpoint.proto == "udp"
    assert first.endpoint.daddr == "127.0.0.9"
    assert len(rec.matching(_connect(os.getpid(), CONNECT_ATTEMPT, port))) == 1


def test_udp_connect_and_sendmsg(rec):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.10", 0))
        port = sink.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as connected:
            connected.connect(("127.0.0.10", port))
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sender6:
            sender6.sendmsg([b"z"], [], 0, ("::ffff:127.0.0.10", port + 0))
    connected_ev = rec.wait_for(
        lambda e: _connect(os.getpid(), CONNECT_ATTEMPT, port)(e) and e.endpoint.family == 4,
        "UDP connect",
    )
    assert connected_ev.endpoint.proto == "udp"
    mapped = rec.wait_for(
        lambda e: _connect(os.getpid(), CONNECT_ATTEMPT, port)(e) and e.endpoint.family == 6,
        "UDP sendmsg on an IPv6 socket",
    )
    assert mapped.endpoint.daddr == "::ffff:127.0.0.10"


def test_ignored_pids_are_not_reported(rec, sensor, listener):
    port = listener.getsockname()[1]
    sensor.set_ignored_pids([os.getpid()])
    try:
        with socket.create_connection(("127.0.0.7", port)):
            pass
        marker = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import socket; socket.create_connection(('127.0.0.7', {port}))",
            ],
            check=True,
        )
        del marker
        rec.wait_for(
            lambda e: (
                isinstance(e, ConnectEvent)
                and e.pid != os.getpid()
                and e.endpoint.dport == port
                and e.outcome == CONNECT_ESTABLISHED
            ),
            "the marker child's connect",
        )
        assert not rec.matching(lambda e: isinstance(e, ConnectEvent) and e.pid == os.getpid())
    finally:
        sensor.set_ignored_pids([])


def _cgroup2_mount() -> str | None:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "cgroup2":
                return fields[1]
    return None


@pytest.fixture
def job_cgroup() -> Iterator[str]:
    """A fresh cgroup v2 directory with a child cgroup (a job and its step)."""
    mount = _cgroup2_mount()
    require(mount is not None, "no cgroup2 mount")
    top = os.path.join(mount, f"rg-test-{uuid.uuid4().hex[:8]}")
    step = os.path.join(top, "step_0")
    os.makedirs(step)
    try:
        yield top
    finally:
        for path in (step, top):
            for _ in range(50):  # the last member may still be exiting
                try:
                    os.rmdir(path)
                    break
                except OSError:
                    time.sleep(0.05)


def _connect_from_cgroup(cgroup_dir: str, host: str, port: int) -> int:
    def enter() -> None:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write("0")

    code = f"import socket; socket.create_connection(({host!r}, {port})).close()"
    child = subprocess.Popen([sys.executable, "-c", code], preexec_fn=enter)
    assert child.wait() == 0
    return child.pid


def test_loopback_of_registered_cgroups_is_not_reported(rec, sensor, listener, job_cgroup):
    port = listener.getsockname()[1]
    step = os.path.join(job_cgroup, "step_0")
    sensor.set_loopback_ignore_cgroups([cgroup_id(job_cgroup)])
    try:
        quiet = _connect_from_cgroup(step, "127.0.0.7", port)
    finally:
        sensor.set_loopback_ignore_cgroups([])
    loud = _connect_from_cgroup(step, "127.0.0.7", port)
    event = rec.wait_for(_connect(loud, CONNECT_ESTABLISHED, port), "unregistered connect")
    assert event.cgroup_id == cgroup_id(step)
    assert not rec.matching(lambda e: isinstance(e, ConnectEvent) and e.pid == quiet)


# --- GPU ---------------------------------------------------------------------------


@pytest.fixture
def fake_gpu_device() -> Iterator[str]:
    path = f"/dev/nvidia-test-{uuid.uuid4().hex[:8]}"
    os.mknod(path, 0o600 | 0o100000)  # a regular file: there is no GPU here
    try:
        yield path
    finally:
        os.unlink(path)


def test_gpu_open_is_seen_and_dev_null_is_not(rec, fake_gpu_device):
    child = subprocess.run(["/bin/cat", "/dev/null", fake_gpu_device], check=True)
    del child
    event = rec.wait_for(
        lambda e: isinstance(e, GpuOpenEvent) and e.path == fake_gpu_device, "GPU open"
    )
    assert event.comm == "cat"
    assert event.pid != os.getpid()
    assert not rec.matching(lambda e: isinstance(e, GpuOpenEvent) and e.path == "/dev/null")


def test_failed_gpu_open_is_not_reported(rec, fake_gpu_device):
    missing = fake_gpu_device + "-missing"
    subprocess.run(["/bin/cat", missing, fake_gpu_device], capture_output=True)
    rec.wait_for(lambda e: isinstance(e, GpuOpenEvent) and e.path == fake_gpu_device, "GPU open")
    assert not rec.matching(lambda e: isinstance(e, GpuOpenEvent) and e.path == missing)


# --- accounting and teardown -----------------------------------------------------


# --- an inet socket duplicated onto stdio ----------------------------------------

# Each spelling prints the pid that dup2()s the socket onto fd 0, then exits.
# The socket comes to it a different way each time.
DUP_MADE = """
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print(os.getpid(), flush=True)
os.dup2(s.fileno(), 0)
"""
# made by the parent, duplicated by a forked child (a daemonising reverse shell)
DUP_INHERITED = """
import os, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
pid = os.fork()
if pid == 0:
    print(os.getpid(), flush=True)
    os.dup2(s.fileno(), 0)
    os._exit(0)
os.waitpid(pid, 0)
"""
# made by one process, handed to another over a unix socket (SCM_RIGHTS)
DUP_RECEIVED = """
import os, socket, sys
a, b = socket.socketpair()
pid = os.fork()
if pid == 0:
    a.close()
    msg, fds, _, _ = socket.recv_fds(b, 1, 1)
    print(os.getpid(), flush=True)
    os.dup2(fds[0], 0)
    os._exit(0)
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
socket.send_fds(a, [b"x"], [s.fileno()])
os.waitpid(pid, 0)
"""
# a shell pipeline and node's stdio: a pipe and a unix socket pair onto 0-2
DUP_NOT_INET = """
import os, socket
r, w = os.pipe()
a, b = socket.socketpair()
print(os.getpid(), flush=True)
os.dup2(r, 0)
os.dup2(a.fileno(), 1)
"""


def _dup_pid(code: str, listener) -> int:
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, listener.getsockname())],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return int(out.stdout.split()[0])


def _dup_onto_stdin(pid: int) -> Callable[[object], bool]:
    return lambda e: isinstance(e, FdDupEvent) and e.pid == pid and e.newfd == 0


@pytest.mark.parametrize(
    "code", [DUP_MADE, DUP_INHERITED, DUP_RECEIVED], ids=["made", "inherited", "received"]
)
def test_inet_socket_onto_stdio_is_seen_however_the_socket_came(rec, sensor, listener, code):
    require(FD_TABLE_FEATURE in sensor.features, "kernel BTF names the fd table")
    pid = _dup_pid(code, listener)
    dup = rec.wait_for(_dup_onto_stdin(pid), "dup2 of an inet socket onto fd 0")
    assert dup.via == "dup2"
    # socket() and accept() are not traced where the fd table is read
    assert not {"rgs_socket", "rgs_accept4"} & {a.program for a in sensor.attached}


def test_pipe_and_unix_socket_onto_stdio_are_not_reported(rec, listener):
    pid = _dup_pid(DUP_NOT_INET, listener)
    marker = _dup_pid(DUP_MADE, listener)  # reported after it: the ring got that far
    rec.wait_for(_dup_onto_stdin(marker), "the marker's dup2")
    assert rec.matching(lambda e: isinstance(e, FdDupEvent) and e.pid == pid) == []


def test_lost_counters_exist_and_are_zero_under_light_load(sensor, rec):
    subprocess.run(["/bin/true"], check=True)
    sensor.poll(100)
    lost = sensor.lost_events()
    assert set(lost) == {"process", "network"}
    # Skipped program runs (another BPF program, perhaps not ours, was
    # running on that CPU) depend on the whole host; the rest must be 0.
    stats = sensor.program_stats()
    assert set(stats) == {a.program for a in sensor.attached}
    for ring in lost:
        skipped = sum(stats[a.program].recursion_misses for a in sensor.attached if a.ring == ring)
        assert lost[ring] - skipped == 0, ring


def _bpftool(kind: str) -> list[dict]:
    out = subprocess.run(["bpftool", "-j", kind, "show"], check=True, capture_output=True)
    return json.loads(out.stdout or b"[]")


def test_fallbacks_work_and_close_leaves_nothing_loaded(fork_exec_literal, listener):
    """Built as on a kernel without the optional tracepoints (5.x): exits
    from the leader, datagrams reported at syscall exit. Then close()."""
    require(shutil.which("bpftool") is not None, "bpftool is needed (apt-get install bpftool)")
    progs_before = {p["id"] for p in _bpftool("prog")}
    maps_before = {m["id"] for m in _bpftool("map")}
    optional = {a.feature for a in ATTACHMENTS if a.feature} | {GROUP_DEAD_FEATURE}
    optional |= {feature.name for feature in BTF_FEATURES}
    s = EbpfSensor(disable_features=optional)
    try:
        s.start()
        assert s.features == set()
        ours = {
            p["id"]
            for p in _bpftool("prog")
            if p.get("name", "").startswith(PROGRAM_PREFIX)
            and p["id"] in owned_bpf_programs(os.getpid())
        }
        ours -= progs_before
        assert s.linked  # the cgroup udp_sendmsg hooks (io_uring datagrams)
        assert len(ours) == len(s.attached) + len(s.linked) + len(s.tail_called)
        our_maps = ({m["id"] for m in _bpftool("map")} - maps_before) & owned_bpf_maps(os.getpid())
        assert our_maps

        child = subprocess.Popen(["/bin/sh", "-c", "exit 5"])
        child.wait()
        literal = subprocess.run([fork_exec_literal], check=True, capture_output=True)
        literal_pid = int(literal.stdout)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"x", ("127.0.0.11", 9))
        r = Recorder(s)
        exit_ = r.wait_for(lambda e: isinstance(e, ExitEvent) and e.pid == child.pid, "exit")
        assert exit_.exit_code == 5
        udp = r.wait_for(
            lambda e: isinstance(e, ConnectEvent) and e.endpoint.daddr == "127.0.0.11", "UDP"
        )
        assert udp.endpoint.proto == "udp"

        # without the fd table: a socket the process made itself is known
        # from socket(); one inherited from its parent is not (the degraded
        # line). dup3: dup2 is one of the optional tracepoints left out here.
        def dup3(code: str) -> str:
            return code.replace("os.dup2(s.fileno(), 0)", "os.dup2(s.fileno(), 0, False)")

        inherited = _dup_pid(dup3(DUP_INHERITED), listener)
        made = _dup_pid(dup3(DUP_MADE), listener)
        assert r.wait_for(_dup_onto_stdin(made), "dup3 of a socket the process made").via == "dup3"
        assert r.matching(_dup_onto_stdin(inherited)) == []
        # without sched_prepare_exec an argv not yet paged in stays unread,
        # and the event says so
        cut = r.wait_for(_exec_of(literal_pid), "exec with literal argv")
        assert cut.argv_truncated
        assert cut.filename == "/bin/true"
    finally:
        s.close()
    s.close()  # idempotent
    assert not s.running
    assert not ({p["id"] for p in _bpftool("prog")} & ours)
    # maps go once the kernel's deferred free has run (an RCU grace period)
    deadline = time.monotonic() + WAIT_S
    while {m["id"] for m in _bpftool("map")} & our_maps and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ({m["id"] for m in _bpftool("map")} & our_maps)
    attached = [
        link for link in _bpftool("perf") if link.get("prog_id") in ours
    ]  # tracepoint attachments
    assert attached == []


def test_start_without_privileges_says_what_is_missing(sensor):
    del sensor  # only where the sensor works as root
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, then try
        try:
            os.close(read_end)
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            lines = [str(probe_ebpf())]
            try:
                EbpfSensor().start()
                lines.append("started")
            except EbpfUnavailable as exc:
                lines.append(f"raised {exc}")
            os.write(write_end, "\n".join(lines).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        lines = f.read().splitlines()
    os.waitpid(pid, 0)
    assert lines[0].startswith("not root")
    assert lines[1].startswith("raised not root")


def test_poll_after_close_is_an_error():
    s = EbpfSensor()
    s.close()
    with pytest.raises(RuntimeError):
        s.poll(0)


def test_quiet_lifecycle_delivers_every_event_on_the_next_poll(rec, sensor, tmp_path):
    """With wake names set, forks, exits and unnamed execs do not wake the
    poller, but none is lost: each arrives by the next poll."""
    named = tmp_path / "rgnamed"
    shutil.copy("/bin/true", named)
    sensor.set_wake_names(["rgnamed", "rgpre*"])
    try:
        quiet = subprocess.Popen(["/bin/true", "quiet-one"])
        quiet.wait()
        loud = subprocess.Popen([str(named), "loud-one"])
        loud.wait()
        exec_quiet = rec.wait_for(_exec_of(quiet.pid), "the unnamed exec")
        rec.wait_for(_exec_of(loud.pid), "the named exec")
        rec.wait_for(
            lambda e: isinstance(e, ForkEvent) and e.child_pid == quiet.pid, "the unnamed fork"
        )
        rec.wait_for(lambda e: isinstance(e, ExitEvent) and e.pid == quiet.pid, "its exit")
        assert exec_quiet.argv == ("/bin/true", "quiet-one")
    finally:
        sensor.set_wake_names(None)
