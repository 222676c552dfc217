"""Prevention in the kernel, tested against real connects, execs and kills.

Every test that attaches uses its own Prevention and closes it in a
finally/with block; an autouse fixture then proves with bpftool that no
rgp_* program of this test process is left on the cgroup2 root. Deny
lists name only test addresses (127.0.3.x) and ports no one else uses.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rome_guard.events import (
    CONNECT_BLOCKED,
    PREVENTION_BLOCKED_CONNECT,
    PREVENTION_KILLED_CONNECT,
    PREVENTION_KILLED_EXEC,
)
from rome_guard.kernel.stale import PIN_ROOT, attached_programs, cleanup_stale
from rome_guard.layout.prevent import (
    RG_EV_BLOCKED_CONNECT,
    RG_EV_KILLED_EXEC,
    PreventRecord,
    decode_prevent_record,
)
from rome_guard.linux import cgroup2_root, cgroup_id
from rome_guard.respond.prevent import (
    ACT_BLOCK,
    ACT_KILL,
    Prevention,
    comm_key,
    parse_network,
    path_key,
)
from tests.conftest import require, require_root
from tests.fixtures.daemon import owned_bpf_programs
from tests.fixtures.network import free_port, listener, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --- pure (no root) -------------------------------------------------------------------


def test_decode_event_reads_a_blocked_ipv4_connect() -> None:
    raw = PreventRecord(
        timestamp_ns=5,
        cgroup_id=77,
        pid=10,
        tid=11,
        uid=1000,
        kind=RG_EV_BLOCKED_CONNECT,
        family=socket.AF_INET,
        dport=3333,
        action=ACT_BLOCK | ACT_KILL,
        protocol=socket.IPPROTO_TCP,
    )
    raw.daddr[:4] = list(socket.inet_aton("10.1.2.3"))
    raw.comm = b"xm\nrig\xff"
    event = decode_prevent_record(bytes(raw))
    assert (event.kind, event.pid, event.tid, event.uid) == (
        PREVENTION_BLOCKED_CONNECT,
        10,
        11,
        1000,
    )
    assert (event.daddr, event.dport, event.family, event.protocol) == ("10.1.2.3", 3333, 4, "tcp")
    assert event.kill_requested and event.action == "blocked"
    assert event.comm == "xm\nrig\udcff"  # hostile bytes survive for textsafe to render
    connect = event.connect_event()
    assert connect is not None and connect.outcome == CONNECT_BLOCKED
    assert connect.endpoint.daddr == "10.1.2.3" and connect.cgroup_id == 77


def test_decode_event_reads_an_exec_kill() -> None:
    raw = PreventRecord(pid=5, tid=5, kind=RG_EV_KILLED_EXEC, action=ACT_KILL)
    raw.filename = b"/tmp/xmrig"
    event = decode_prevent_record(bytes(raw))
    assert event.kind == PREVENTION_KILLED_EXEC and event.action == "killed"
    assert event.filename == "/tmp/xmrig" and event.daddr == "" and event.protocol == ""
    assert event.connect_event() is None


def test_deny_list_keys() -> None:
    assert comm_key("/opt/bin/xmrig") == b"xmrig"
    assert comm_key("a-very-long-miner-name") == b"a-very-long-min"  # TASK_COMM_LEN - 1
    assert str(parse_network("10.0.0.7/8")) == "10.0.0.0/8"
    assert str(parse_network("2001:db8::1")) == "2001:db8::1/128"
    with pytest.raises(ValueError):
        path_key("relative/xmrig")
    with pytest.raises(ValueError):
        path_key("/" + "a" * 300)


def test_cgroup2_root_is_read_from_the_mount_table(tmp_path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/un\\040ified cgroup2 rw 0 0\n"
    )
    assert cgroup2_root(str(mounts)) == "/sys/fs/cgroup/un ified"


def test_prevention_refuses_monitor_mode() -> None:
    for mode in ("monitor", "", "Enforce"):
        with pytest.raises(ValueError, match="enforce"):
            Prevention(mode)


# --- helpers ---------------------------------------------------------------------------


def _bpftool_root_programs() -> list[dict]:
    """What bpftool sees attached to the cgroup2 root."""
    out = subprocess.run(
        ["bpftool", "-j", "cgroup", "show", cgroup2_root()],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out) if out.strip() else []


def _ours(programs: list[dict]) -> set[int]:
    return {p["id"] for p in programs if p.get("name", "").startswith("rgp_")}


def _attached_by(pid: int) -> set[int]:
    """The rgp_* programs on the root that process pid holds (other
    rome-guards on the host have theirs)."""
    return _ours(_bpftool_root_programs()) & owned_bpf_programs(pid)


@pytest.fixture
def root_bpf():
    """Root, bpftool and BCC; afterwards no rgp_* program that appeared
    during the test may still be attached."""
    require_root()
    require(shutil.which("bpftool") is not None, "bpftool is not installed")
    try:
        import bcc  # noqa: F401
    except ImportError:
        require(False, "BCC is not importable")
    before = _ours(_bpftool_root_programs())
    yield
    # other rome-guards on this host attach theirs meanwhile: only programs
    # no live owner holds count as left behind
    left = _ours(_bpftool_root_programs()) - before - _live_owners_programs()
    if left:
        cleanup_stale()
    assert not left, f"rgp_* programs left on the cgroup2 root: {left}"


def _live_owners_programs() -> set[int]:
    """Programs pinned by a live rome-guard (its pid and start time match)."""
    from rome_guard.kernel import stale

    ids: set[int] = set()
    for name in os.listdir(PIN_ROOT) if os.path.isdir(PIN_ROOT) else ():
        if stale._owner_alive(name):
            ids |= stale._pinned_prog_ids(os.path.join(PIN_ROOT, name))
    return ids


@contextlib.contextmanager
def started(**kwargs):
    prevention = Prevention("enforce", **kwargs)
    try:
        prevention.start()
        yield prevention
    finally:
        prevention.close()


def _connect_errno(addr: tuple, family: int = socket.AF_INET) -> int:
    with socket.socket(family) as s:
        return s.connect_ex(addr)


def _run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def _drain(prevention: Prevention, want: int) -> list:
    events: list = []
    for _ in range(50):
        events += prevention.poll(100)
        if len(events) >= want:
            break
    return events


def _pending_connection(server) -> bool:
    """True if the listener's kernel queue holds a completed handshake."""
    server.sock.setblocking(False)
    try:
        conn, _ = server.sock.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.fixture
def plain_listener():
    """A listener that never accepts by itself: the test looks at its queue."""
    sock = socket.socket()
    sock.bind(("127.0.3.1", 0))
    sock.listen(16)

    class _Server:
        pass

    server = _Server()
    server.sock, server.port = sock, sock.getsockname()[1]
    yield server
    sock.close()


# --- the layout the kernel writes ---------------------------------------------------------


def test_ctypes_mirror_matches_the_c_struct(root_bpf) -> None:
    from bcc import BPF

    src_dir = os.path.join(REPO, "rome_guard", "bpf")
    layout = BPF(
        text=b'#include "prevent.h"\nBPF_ARRAY(layout, struct rg_event, 1);\n',
        cflags=[f"-I{src_dir}"],
    )
    try:
        leaf = layout[b"layout"].Leaf
        assert ctypes.sizeof(leaf) == ctypes.sizeof(PreventRecord)
        for name, _type in PreventRecord._fields_:
            assert getattr(leaf, name).offset == getattr(PreventRecord, name).offset, name
            assert getattr(leaf, name).size == getattr(PreventRecord, name).size, name
    finally:
        layout.cleanup()


# --- connect denial -------------------------------------------------------------------------


def test_blocked_connects_fail_with_eperm_and_reach_no_listener(root_bpf, plain_listener) -> None:
    port = plain_listener.port
    with started() as prevention:
        assert {name for _id, name in attached_programs()} == {"rgp_connect4", "rgp_connect6"}
        assert _connect_errno(("127.0.3.1", port)) == 0, "nothing is blocked by default"
        assert _pending_connection(plain_listener)

        prevention.block_cidrs(["127.0.3.0/30"])
        assert _connect_errno(("127.0.3.1", port)) == errno.EPERM
        # an IPv4 destination through an IPv6 socket is the same destination
        assert _connect_errno(("::ffff:127.0.3.1", port), socket.AF_INET6) == errno.EPERM
        assert not _pending_connection(plain_listener)
        prevention.unblock_cidrs(["127.0.3.0/30"])
        assert _connect_errno(("127.0.3.1", port)) == 0
        assert _pending_connection(plain_listener)

        prevention.block_addresses(["127.0.3.1"])
        assert _connect_errno(("127.0.3.1", port)) == errno.EPERM
        prevention.unblock_addresses(["127.0.3.1"])

        prevention.block_ports([port])
        assert _connect_errno(("127.0.3.1", port)) == errno.EPERM
        assert not _pending_connection(plain_listener)

        events = _drain(prevention, 4)
        mine = [e for e in events if e.pid == os.getpid()]
        assert len(mine) == 4
        assert {e.kind for e in mine} == {PREVENTION_BLOCKED_CONNECT}
        first = mine[0]
        assert (first.daddr, first.dport, first.family, first.protocol) == (
            "127.0.3.1",
            port,
            4,
            "tcp",
        )
        assert first.uid == os.getuid() and first.tid == os.getpid()
        with open("/proc/self/comm") as f:
            assert first.comm == f.read().strip()
        assert first.cgroup_id == cgroup_id(_own_cgroup())
        assert not first.kill_requested
        assert prevention.lost_events() == 0


def _own_cgroup(pid: str = "self") -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise AssertionError("no cgroup v2 line")


def test_blocked_ipv6_port(root_bpf) -> None:
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        with started() as prevention:
            prevention.block_ports([port])
            assert _connect_errno(("::1", port), socket.AF_INET6) == errno.EPERM
            event = _drain(prevention, 1)[0]
            assert (event.family, event.daddr, event.dport) == (6, "::1", port)


@pytest.fixture
def test_cgroup():
    require_root()
    root = cgroup2_root()
    rel = f"rg-test-{secrets.token_hex(4)}"
    inner = os.path.join(root, rel, "inner")
    os.makedirs(inner)
    yield rel
    for path in (inner, os.path.join(root, rel)):
        for _ in range(500):
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.01)


def _connect_from_cgroup(cgroup_dir: str, port: int) -> int:
    """errno of a connect made by a fresh process inside cgroup_dir."""

    def join() -> None:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import socket; print(socket.socket().connect_ex(('127.0.3.1', {port})))",
        ],
        capture_output=True,
        text=True,
        preexec_fn=join,
        timeout=120,
    )
    return int(result.stdout)


def test_exempt_cgroups_and_their_children_may_connect(
    root_bpf, test_cgroup, plain_listener
) -> None:
    root = cgroup2_root()
    port = plain_listener.port
    with started() as prevention:
        prevention.block_ports([port])
        job_dir = os.path.join(root, test_cgroup)
        assert _connect_from_cgroup(job_dir, port) == errno.EPERM
        prevention.exempt_cgroups([cgroup_id(test_cgroup)])
        assert _connect_from_cgroup(job_dir, port) == 0
        assert _connect_from_cgroup(os.path.join(job_dir, "inner"), port) == 0
        assert _connect_errno(("127.0.3.1", port)) == errno.EPERM, "not exempt outside"
        prevention.unexempt_cgroups([cgroup_id(test_cgroup)])
        assert _connect_from_cgroup(job_dir, port) == errno.EPERM


# --- in-kernel kills ---------------------------------------------------------------------------


def test_denylisted_program_dies_before_its_first_instruction(root_bpf, tmp_path) -> None:
    name = f"rgx{secrets.token_hex(4)}"
    by_name = tmp_path / name
    by_path = tmp_path / "rg-deny-by-path"
    control = tmp_path / "rg-allowed-touch"
    for copy in (by_name, by_path, control):
        shutil.copy("/bin/touch", copy)
    with started() as prevention:
        prevention.deny_exec(names=[name], paths=[str(by_path)])
        for binary in (by_name, by_path):
            marker = tmp_path / f"{binary.name}.created"
            proc = subprocess.run([str(binary), str(marker)])
            assert proc.returncode == -signal.SIGKILL
            assert not marker.exists(), "the denylisted program ran user code"
        allowed_marker = tmp_path / "allowed.created"
        assert subprocess.run([str(control), str(allowed_marker)]).returncode == 0
        assert allowed_marker.exists()

        kills = [e for e in _drain(prevention, 2) if e.kind == PREVENTION_KILLED_EXEC]
        assert {e.filename for e in kills} == {str(by_name), str(by_path)}
        assert {e.comm for e in kills} == {name, by_path.name[:15]}
        assert all(e.action == "killed" and e.uid == os.getuid() for e in kills)

        prevention.allow_exec(names=[name])
        assert subprocess.run([str(by_name), str(tmp_path / "later")]).returncode == 0


CONNECTING_CHILD = """
import socket, sys
s = socket.socket()
s.connect(("127.0.3.1", {port}))
print("connected", flush=True)
"""


def test_pool_connect_is_killed_and_never_completes_its_handshake(root_bpf) -> None:
    with listener("127.0.3.1", stratum=True) as pool:
        with started() as prevention:
            prevention.kill_on_connect(cidrs=["127.0.3.1/32"])
            child = subprocess.Popen(
                [sys.executable, "-c", CONNECTING_CHILD.format(port=pool.port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            out, _ = child.communicate(timeout=120)
            assert child.returncode == -signal.SIGKILL
            assert "connected" not in out
            events = [e for e in _drain(prevention, 2) if e.pid == child.pid]
            assert [e.kind for e in events] == [
                PREVENTION_BLOCKED_CONNECT,
                PREVENTION_KILLED_CONNECT,
            ]
            assert all(e.kill_requested and e.dport == pool.port for e in events)
        # after close the same destination works again, and the listener's
        # accept loop (running all along) sees exactly that one connection
        with socket.create_connection(("127.0.3.1", pool.port)) as s:
            wait_until(lambda: pool.accepted)
            assert pool.accepted == [s.getsockname()]


def test_listener_never_sees_a_killed_pool_connect(root_bpf) -> None:
    with listener("127.0.3.1", stratum=True) as pool:
        with started() as prevention:
            prevention.kill_on_connect(ports=[pool.port])
            for _ in range(20):
                child = _run_python(CONNECTING_CHILD.format(port=pool.port))
                assert child.returncode == -signal.SIGKILL
        assert pool.accepted == []


def test_syn_sent_kill_where_no_connect_hook_runs(root_bpf) -> None:
    """Hosts without a cgroup2 mount: no EPERM, the kill comes at SYN_SENT."""
    with listener("127.0.3.1") as pool, started(connect_hooks=False) as prevention:
        mine = owned_bpf_programs(os.getpid())
        assert not {i for i, _ in attached_programs()} & mine, "nothing attached to the root"
        assert not prevention.denies_connects
        prevention.kill_on_connect(cidrs=["127.0.3.1/32"])
        child = _run_python(CONNECTING_CHILD.format(port=pool.port))
        assert child.returncode == -signal.SIGKILL
        assert "connected" not in child.stdout
        events = [e for e in _drain(prevention, 1) if e.kind == PREVENTION_KILLED_CONNECT]
        assert events and events[0].daddr == "127.0.3.1"


# --- nothing left behind -------------------------------------------------------------------------


def test_close_removes_every_program_map_and_pin(root_bpf, plain_listener) -> None:
    prevention = Prevention("enforce")
    before_progs = owned_bpf_programs(os.getpid())
    prevention.start()
    try:
        ours = owned_bpf_programs(os.getpid()) - before_progs  # this process's, exactly
        ids = {i for i, _ in attached_programs()} & ours
        assert len(ids) >= 2
        owner = os.listdir(PIN_ROOT)
        assert any(name.startswith(f"{os.getpid()}-") for name in owner)
        prevention.block_ports([plain_listener.port])
    finally:
        prevention.close()
    prevention.close()  # idempotent
    assert not (ours & _bpftool_prog_ids()), "a program outlived close()"
    assert not any(n.startswith(f"{os.getpid()}-") for n in os.listdir(PIN_ROOT))
    assert _connect_errno(("127.0.3.1", plain_listener.port)) == 0


def _bpftool_prog_ids() -> set[int]:
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True
    ).stdout
    return {p["id"] for p in json.loads(out)}


ATTACHER = """
import errno, sys, time
from rome_guard.kernel import bpfsys
from rome_guard.respond.prevent import Prevention
if "--no-links" in sys.argv:  # a kernel without BPF links for cgroups (< 5.7)
    def _no_links(*_args):
        raise OSError(errno.EINVAL, "Invalid argument")
    bpfsys.link_create = _no_links
p = Prevention("enforce")
p.start()
p.block_ports([int(sys.argv[1])])
print("ready", flush=True)
sys.stdin.read()
"""


def _start_attacher(port: int, links: bool = True) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", ATTACHER, str(port), *([] if links else ["--no-links"])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def test_kill_9_detaches_every_block_at_once(root_bpf, plain_listener) -> None:
    """The crash policy: the connect hooks hang on the daemon's link fds,
    so a dead prevention blocks nothing, with no restart needed."""
    port = plain_listener.port
    child = _start_attacher(port)
    try:
        theirs = _attached_by(child.pid)
        assert len(theirs) >= 2
        assert _connect_errno(("127.0.3.1", port)) == errno.EPERM
    finally:
        child.kill()
        child.wait()
    assert not (_ours(_bpftool_root_programs()) & theirs), "detached by the kernel"
    assert _connect_errno(("127.0.3.1", port)) == 0
    pins = _pins_of(child.pid)
    assert pins  # the ownership marks stay for the next start to remove
    removed = cleanup_stale()
    assert [f"removed stale pins {owner}" for owner in pins] == [
        line for line in removed if str(child.pid) in line
    ]  # pins only: there was nothing left to detach


def _pins_of(pid: int) -> list[str]:
    return [os.path.join(PIN_ROOT, n) for n in os.listdir(PIN_ROOT) if n.startswith(f"{pid}-")]


def test_without_links_kill_9_leaves_attachments_that_the_next_start_removes(
    root_bpf, plain_listener
) -> None:
    port = plain_listener.port
    child = _start_attacher(port, links=False)
    try:
        theirs = _attached_by(child.pid)
        assert len(theirs) >= 2
        cleanup_stale()
        assert theirs <= _ours(_bpftool_root_programs()), "a live owner's programs are not stale"
    finally:
        child.kill()
        child.wait()
    stale = _ours(_bpftool_root_programs()) & theirs
    assert stale == theirs, "cgroup attachments persist after kill -9"
    assert _connect_errno(("127.0.3.1", port)) == errno.EPERM
    assert _connect_errno(("127.0.3.2", free_port("127.0.3.2"))) in (
        0,
        errno.ECONNREFUSED,
    ), "a stale copy blocks only what was on its lists"

    with started() as prevention:
        assert not (_ours(_bpftool_root_programs()) & theirs), "start() removed them"
        assert len(_ours(_bpftool_root_programs())) >= 2
        assert _connect_errno(("127.0.3.1", port)) == 0
        assert prevention.denies_connects


def test_cleanup_stale_finds_unpinned_leftovers_by_name(root_bpf) -> None:
    child = _start_attacher(free_port("127.0.3.1"), links=False)
    owner = os.path.join(
        PIN_ROOT, next(n for n in os.listdir(PIN_ROOT) if n.startswith(f"{child.pid}-"))
    )
    try:
        theirs = _attached_by(child.pid)
    finally:
        child.kill()
        child.wait()
    for entry in os.listdir(owner):  # as if /sys/fs/bpf had been remounted
        os.unlink(os.path.join(owner, entry))
    os.rmdir(owner)
    assert _ours(_bpftool_root_programs()) & theirs
    removed = cleanup_stale()
    assert any("rgp_connect4" in line for line in removed)
    assert not (_ours(_bpftool_root_programs()) & theirs)


def test_normal_exit_without_close_leaves_nothing(root_bpf) -> None:
    child = _start_attacher(free_port("127.0.3.1"))
    theirs = _attached_by(child.pid)
    child.communicate("")  # stdin EOF: the interpreter exits, atexit runs
    assert child.returncode == 0
    assert not (_ours(_bpftool_root_programs()) & theirs)
    assert not any(n.startswith(f"{child.pid}-") for n in os.listdir(PIN_ROOT))


def test_refused_monitor_mode_attaches_nothing(root_bpf) -> None:
    before = _bpftool_prog_ids()
    with pytest.raises(ValueError):
        Prevention("monitor").start()
    assert _bpftool_prog_ids() == before
