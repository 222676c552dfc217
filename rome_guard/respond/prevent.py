"""Prevention in the kernel: deny connects, kill denylisted programs.

Enforce mode only. ``Prevention`` compiles rome_guard/bpf/prevent.c once,
attaches its cgroup ``connect4``/``connect6`` programs to the cgroup2 root
and its tracepoints (exec, connect exit, TCP SYN_SENT), and then holds the
deny lists as BPF maps that the daemon updates live. Every denial and every
in-kernel kill comes back as a ``PreventionEvent`` from ``poll()``.

Crash policy: nothing this module enforces outlives the daemon. The
connect hooks are attached through BPF links (``BPF_LINK_CREATE``) whose only
reference is a file descriptor of the daemon, so the kernel detaches them
the moment the daemon dies, kill -9 included: no port, CIDR or known-pool
block stays behind to cut the host off with no guard left to record or lift
it. The exec and SYN_SENT kills are tracepoint programs, which die with the
daemon too. (docs/install.md says why; systemd restarts the daemon, which
re-applies every list from the rules.)

Each running ``Prevention`` still pins its programs under
``/sys/fs/bpf/rome-guard/<pid>-<start time>/`` so that another rome-guard
knows they have a live owner; ``cleanup_stale()`` (run by ``start()``)
removes a dead owner's pins, and detaches any ``rgp_*`` program on the root
that no live owner pins (left by an older rome-guard, or by a kernel
without BPF links for cgroups, where attachments fall back to
``BPF_PROG_ATTACH`` and do outlive a crash until the next start).

This module must never: load anything in monitor mode; block by default
(every list starts empty and the programs allow whatever is not listed);
keep a cgroup attachment alive without a live daemon where the kernel has
BPF links; touch BPF programs that are not rome-guard's or that belong to
another live rome-guard; leave a program attached after ``close()``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import platform
import resource
import socket
import struct
from dataclasses import dataclass
from typing import Iterable

from rome_guard.events import CONNECT_BLOCKED, ConnectEvent, Endpoint
from rome_guard.sensors.procfs import start_time
from rome_guard.textsafe import from_bytes

log = logging.getLogger(__name__)

PIN_ROOT = "/sys/fs/bpf/rome-guard"
BPFFS = "/sys/fs/bpf"
# Every cgroup program of ours is named rgp_*: cleanup_stale() finds
# leftovers by this prefix and never touches anything else.
PROG_PREFIX = "rgp_"
BPF_SOURCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bpf", "prevent.c")

# Mirrors of prevent.h.
ACT_BLOCK = 1
ACT_KILL = 2
EV_BLOCKED_CONNECT = 1
EV_KILLED_EXEC = 2
EV_KILLED_CONNECT = 3
COMM_LEN = 16
PATH_LEN = 256

KIND_BLOCKED_CONNECT = "blocked_connect"
KIND_KILLED_EXEC = "killed_exec"
KIND_KILLED_CONNECT = "killed_connect"
_KINDS = {
    EV_BLOCKED_CONNECT: KIND_BLOCKED_CONNECT,
    EV_KILLED_EXEC: KIND_KILLED_EXEC,
    EV_KILLED_CONNECT: KIND_KILLED_CONNECT,
}

# uapi/linux/bpf.h
_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16
_BPF_LINK_CREATE = 28
_BPF_F_ALLOW_MULTI = 2
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
# program function in prevent.c -> (attach type, pin name)
_CONNECT_PROGRAMS = {
    "rgp_connect4": (ATTACH_INET4_CONNECT, "connect4"),
    "rgp_connect6": (ATTACH_INET6_CONNECT, "connect6"),
}
_PIN_ATTACH_TYPES = {pin: attach for attach, pin in _CONNECT_PROGRAMS.values()}
_PINNED_MAPS = ("block_ports", "block_v4", "block_v6", "exempt_cgroups", "deny_comm", "deny_path")
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


class PreventionError(Exception):
    """Prevention cannot run here; the message names the missing capability."""


class RawEvent(ctypes.Structure):
    """ctypes mirror of ``struct rg_event`` in prevent.h."""

    _fields_ = [
        ("timestamp_ns", ctypes.c_uint64),
        ("cgroup_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tgid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("action", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * COMM_LEN),
        ("filename", ctypes.c_char * PATH_LEN),
    ]


@dataclass(frozen=True)
class PreventionEvent:
    """A connect denied or a process killed in the kernel. Strings come
    from the offender: sanitise them (rome_guard.textsafe) before output."""

    kind: str  # KIND_BLOCKED_CONNECT | KIND_KILLED_EXEC | KIND_KILLED_CONNECT
    pid: int  # thread group id (the process)
    tid: int
    uid: int
    comm: str
    cgroup_id: int
    timestamp_ns: int  # CLOCK_BOOTTIME
    family: int = 0  # 4 | 6 for connects
    protocol: str = ""  # "tcp" | "udp" | "" for exec
    daddr: str = ""
    dport: int = 0
    filename: str = ""  # exec: the path given to execve
    kill_requested: bool = False  # the matching entry asked for a kill

    @property
    def action(self) -> str:
        """The journal's action: ``killed`` or ``blocked``."""
        return "blocked" if self.kind == KIND_BLOCKED_CONNECT else "killed"

    def connect_event(self) -> ConnectEvent | None:
        """The denied connect in the shared event model, for the engine."""
        if self.kind == KIND_KILLED_EXEC:
            return None
        endpoint = Endpoint(
            proto=self.protocol or "tcp",
            family=self.family,
            saddr="",
            sport=0,
            daddr=self.daddr,
            dport=self.dport,
            state=CONNECT_BLOCKED,
        )
        return ConnectEvent(
            pid=self.pid,
            endpoint=endpoint,
            outcome=CONNECT_BLOCKED,
            timestamp_ns=self.timestamp_ns,
            comm=self.comm,
            cgroup_id=self.cgroup_id,
        )


def decode_event(raw: bytes) -> PreventionEvent:
    """One ring buffer record -> PreventionEvent (pure)."""
    if len(raw) < ctypes.sizeof(RawEvent):
        raise ValueError(f"short prevention event: {len(raw)} bytes")
    ev = RawEvent.from_buffer_copy(raw[: ctypes.sizeof(RawEvent)])
    kind = _KINDS.get(ev.kind, f"unknown-{ev.kind}")
    daddr = ""
    if ev.family == 4:
        daddr = socket.inet_ntop(socket.AF_INET, bytes(ev.daddr[:4]))
    elif ev.family == 6:
        daddr = socket.inet_ntop(socket.AF_INET6, bytes(ev.daddr))
    protocol = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}.get(ev.protocol, "")
    return PreventionEvent(
        kind=kind,
        pid=ev.tgid,
        tid=ev.pid,
        uid=ev.uid,
        comm=from_bytes(ev.comm),
        cgroup_id=ev.cgroup_id,
        timestamp_ns=ev.timestamp_ns,
        family=ev.family,
        protocol=protocol if ev.family else "",
        daddr=daddr,
        dport=ev.dport,
        filename=from_bytes(ev.filename),
        kill_requested=bool(ev.action & ACT_KILL),
    )


def comm_key(name: str) -> bytes:
    """The kernel's comm for an executable basename: at most 15 bytes."""
    raw = os.fsencode(os.path.basename(name))
    if not raw:
        raise ValueError("empty executable name")
    return raw[: COMM_LEN - 1]


def path_key(path: str) -> bytes:
    raw = os.fsencode(path)
    if not raw.startswith(b"/"):
        raise ValueError(f"deny paths must be absolute: {path!r}")
    if len(raw) >= PATH_LEN:
        raise ValueError(f"deny path longer than {PATH_LEN - 1} bytes cannot match: {path!r}")
    return raw


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR or a single address; host bits are allowed and dropped."""
    return ipaddress.ip_network(text.strip(), strict=False)


# --- mounts -----------------------------------------------------------------


def _unescape_mount_field(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts_of_type(fstype: str, mounts: str = "/proc/mounts") -> list[str]:
    with open(mounts) as f:
        lines = f.read().splitlines()
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == fstype:
            found.append(_unescape_mount_field(parts[1]))
    return found


def cgroup2_root(mounts: str = "/proc/mounts") -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup or, in the
    hybrid layout, /sys/fs/cgroup/unified)."""
    found = _mounts_of_type("cgroup2", mounts)
    if not found:
        raise PreventionError("no cgroup2 mount in /proc/mounts: connects cannot be denied")
    return found[0]


def cgroup_id(cgroup: str, root: str | None = None) -> int:
    """The cgroup v2 id of a cgroup path as in /proc/PID/cgroup ("0::/a/b"):
    the inode number of its directory, what bpf_get_current_cgroup_id()
    returns."""
    base = root if root is not None else cgroup2_root()
    return os.stat(os.path.join(base, cgroup.lstrip("/"))).st_ino


def _ensure_bpffs() -> None:
    if BPFFS in _mounts_of_type("bpf"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(BPFFS, exist_ok=True)
    if libc.mount(b"bpf", BPFFS.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount bpffs on {BPFFS}: {os.strerror(err)}")


# --- the bpf(2) calls libbcc does not expose ---------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise PreventionError(f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _attr() -> ctypes.Array:
    return ctypes.create_string_buffer(128)


def _obj_pin(fd: int, path: str) -> None:
    attr, name = _attr(), ctypes.create_string_buffer(os.fsencode(path))
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), fd)
    _bpf(_BPF_OBJ_PIN, attr)


def _obj_get(path: str) -> int:
    attr, name = _attr(), ctypes.create_string_buffer(os.fsencode(path))
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), 0)
    return _bpf(_BPF_OBJ_GET, attr)


def _prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    attr = _attr()
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    _bpf(_BPF_PROG_ATTACH, attr)


def _link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching prog_fd to target_fd; the attachment lives as
    long as the returned fd (and its duplicates), no longer."""
    attr = _attr()
    # union bpf_attr.link_create: prog_fd, target_fd, attach_type, flags
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return _bpf(_BPF_LINK_CREATE, attr)


def _prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = _attr()
    struct.pack_into("=III", attr, 0, target_fd, prog_fd, attach_type)
    _bpf(_BPF_PROG_DETACH, attr)


def _prog_query(target_fd: int, attach_type: int) -> list[int]:
    capacity = 64
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = _attr()
        struct.pack_into(
            "=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), capacity
        )
        try:
            _bpf(_BPF_PROG_QUERY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and capacity < 65536:
                capacity *= 8
                continue
            raise
        count = struct.unpack_from("=I", attr, 24)[0]
        return list(ids[:count])


def _prog_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return _bpf(_BPF_PROG_GET_FD_BY_ID, attr)


def _prog_id_and_name(fd: int) -> tuple[int, str]:
    # struct bpf_prog_info: id at 4, name[16] at 64
    info = ctypes.create_string_buffer(80)
    attr = _attr()
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    _bpf(_BPF_OBJ_GET_INFO_BY_FD, attr)
    prog_id = struct.unpack_from("=I", info, 4)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")
    return prog_id, name


# --- stale attachments --------------------------------------------------------


def _owner_name() -> str:
    pid = os.getpid()
    return f"{pid}-{start_time(pid)}"  # bpffs refuses names with dots


def _owner_alive(name: str) -> bool:
    pid_text, _, start_text = name.partition("-")
    if not (pid_text.isdigit() and start_text.isdigit()):
        return False
    return start_time(int(pid_text)) == int(start_text)


def _pinned_prog_ids(owner_dir: str) -> set[int]:
    ids = set()
    for pin in _PIN_ATTACH_TYPES:
        try:
            fd = _obj_get(os.path.join(owner_dir, pin))
        except OSError:
            continue
        try:
            ids.add(_prog_id_and_name(fd)[0])
        finally:
            os.close(fd)
    return ids


def _remove_owner_dir(owner_dir: str, root_fd: int | None) -> list[str]:
    """Detach a dead owner's pinned programs and delete its pins."""
    removed = []
    for entry in sorted(os.listdir(owner_dir)):
        path = os.path.join(owner_dir, entry)
        attach_type = _PIN_ATTACH_TYPES.get(entry)
        if attach_type is not None and root_fd is not None:
            try:
                fd = _obj_get(path)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    prog_id, name = _prog_id_and_name(fd)
                    _prog_detach(root_fd, fd, attach_type)
                    removed.append(f"detached stale {name} (prog id {prog_id}) pinned at {path}")
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.EINVAL):
                        raise
                finally:
                    os.close(fd)
        os.unlink(path)
    os.rmdir(owner_dir)
    removed.append(f"removed stale pins {owner_dir}")
    return removed


def cleanup_stale(cgroup_root: str | None = None, pin_root: str = PIN_ROOT) -> list[str]:
    """Detach and unpin what a rome-guard that died without close() left
    behind; returns one line per thing removed. Programs pinned by a live
    rome-guard (its pid and start time still match) are left alone, and so
    is every program not named rgp_*."""
    try:
        root = cgroup_root if cgroup_root is not None else cgroup2_root()
    except PreventionError:
        root = None
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY) if root else None
    removed: list[str] = []
    live_ids: set[int] = set()
    try:
        if os.path.isdir(pin_root):
            for name in sorted(os.listdir(pin_root)):
                owner_dir = os.path.join(pin_root, name)
                if _owner_alive(name):
                    live_ids |= _pinned_prog_ids(owner_dir)
                elif os.path.isdir(owner_dir):
                    removed += _remove_owner_dir(owner_dir, root_fd)
        if root_fd is None:
            return removed
        for attach_type in _PIN_ATTACH_TYPES.values():
            for prog_id in _prog_query(root_fd, attach_type):
                if prog_id in live_ids:
                    continue
                try:
                    fd = _prog_fd_by_id(prog_id)
                except OSError:
                    continue  # detached and freed meanwhile
                try:
                    name = _prog_id_and_name(fd)[1]
                    if name.startswith(PROG_PREFIX):
                        _prog_detach(root_fd, fd, attach_type)
                        removed.append(f"detached stale {name} (prog id {prog_id}) from {root}")
                finally:
                    os.close(fd)
        return removed
    finally:
        if root_fd is not None:
            os.close(root_fd)


def attached_programs(cgroup_root: str | None = None) -> list[tuple[int, str]]:
    """(prog id, name) of every rgp_* connect program on the cgroup2 root."""
    root = cgroup_root if cgroup_root is not None else cgroup2_root()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    found = []
    try:
        for attach_type in _PIN_ATTACH_TYPES.values():
            for prog_id in _prog_query(fd, attach_type):
                try:
                    prog_fd = _prog_fd_by_id(prog_id)
                except OSError:
                    continue
                try:
                    name = _prog_id_and_name(prog_fd)[1]
                finally:
                    os.close(prog_fd)
                if name.startswith(PROG_PREFIX):
                    found.append((prog_id, name))
    finally:
        os.close(fd)
    return found


# --- the live programs ----------------------------------------------------------


class Prevention:
    """The prevention programs of one daemon, attached from ``start()`` to
    ``close()``. All deny lists start empty."""

    def __init__(
        self,
        mode: str,
        cgroup_root: str | None = None,
        connect_hooks: bool = True,
        pin_root: str = PIN_ROOT,
    ):
        if mode != "enforce":
            raise ValueError(
                f"prevention blocks and kills, so it runs only in enforce mode, not {mode!r}"
            )
        self._cgroup_root = cgroup_root
        self._connect_hooks = connect_hooks
        self._pin_root = pin_root
        self._bpf = None
        self._root_fd: int | None = None
        self._attached: list[tuple[int, int]] = []  # (prog fd, attach type), PROG_ATTACH only
        self._links: list[int] = []  # BPF link fds: closing one detaches its program
        self._owner_dir: str | None = None
        self._received: list[PreventionEvent] = []
        self._closed = False
        self.degraded: list[str] = []  # what this host cannot do, for the operator

    def __enter__(self) -> Prevention:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def denies_connects(self) -> bool:
        """True when the connect hooks are attached (connects get EPERM);
        otherwise kill destinations are only killed at SYN_SENT."""
        return bool(self._attached or self._links)

    @property
    def dies_with_daemon(self) -> bool:
        """True when every connect hook is held by a BPF link only (the
        crash policy); False on the PROG_ATTACH fallback."""
        return not self._attached

    def start(self) -> list[str]:
        """Remove stale attachments, compile once, attach. Returns what
        cleanup_stale() removed, for the log."""
        if self._bpf is not None or self._closed:
            raise RuntimeError("a Prevention starts once")
        if os.geteuid() != 0:
            raise PreventionError("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_KILL)")
        try:
            from bcc import BPF
        except ImportError as exc:
            raise PreventionError(f"BCC (python3-bpfcc) is not importable: {exc}") from exc
        root = None
        if self._connect_hooks:
            try:
                root = self._cgroup_root or cgroup2_root()
            except PreventionError as exc:
                self.degraded.append(f"{exc}; kill destinations are killed at SYN_SENT instead")
        try:
            _ensure_bpffs()
        except OSError as exc:
            self.degraded.append(f"{exc}: a crash would leave attachments unpinned")
        stale = cleanup_stale(root, self._pin_root)
        # 6.x kernels account BPF memory to the memcg; older ones need this.
        with contextlib.suppress(ValueError, OSError):
            limit = resource.RLIM_INFINITY
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
        src = os.path.dirname(BPF_SOURCE)
        self._bpf = BPF(src_file=os.fsencode(BPF_SOURCE), cflags=[f"-I{src}"])
        try:
            self._bpf[b"settings"][ctypes.c_int(0)] = ctypes.c_uint32(os.getpid())
            if root is not None:
                self._attach_connect_hooks(root)
            self._bpf[b"events"].open_ring_buffer(self._on_event)
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)
        return stale

    def _attach_connect_hooks(self, root: str) -> None:
        from bcc import BPF

        self._root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            owner_dir = os.path.join(self._pin_root, _owner_name())
            os.makedirs(owner_dir, exist_ok=True)
            self._owner_dir = owner_dir
        except OSError as exc:
            self.degraded.append(f"cannot pin under {self._pin_root}: {exc}")
        for func, (attach_type, pin) in _CONNECT_PROGRAMS.items():
            fn = self._bpf.load_func(func.encode(), BPF.CGROUP_SOCK_ADDR, None, attach_type)
            if self._owner_dir:
                # marks the program as owned by a live rome-guard; pinning a
                # program keeps no attachment alive (the link does)
                _obj_pin(fn.fd, os.path.join(self._owner_dir, pin))
            self._attach_one(fn.fd, attach_type)
        if self._owner_dir:
            for name in _PINNED_MAPS:
                _obj_pin(self._bpf[name.encode()].map_fd, os.path.join(self._owner_dir, name))

    def _attach_one(self, prog_fd: int, attach_type: int) -> None:
        """Through a BPF link (detached by the kernel when the daemon dies),
        or, on kernels without cgroup links (< 5.7), PROG_ATTACH with
        ALLOW_MULTI (never replaces another program on the root), which
        outlives a crash until cleanup_stale() at the next start."""
        assert self._root_fd is not None
        try:
            self._links.append(_link_create(prog_fd, self._root_fd, attach_type))
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.E2BIG):
                raise
            if not self.degraded or "BPF links" not in self.degraded[-1]:
                self.degraded.append(
                    f"this kernel has no BPF links for cgroups ({exc.strerror}): after a crash "
                    "the connect hooks stay attached until rome-guard starts again"
                )
        _prog_attach(self._root_fd, prog_fd, attach_type, _BPF_F_ALLOW_MULTI)
        self._attached.append((prog_fd, attach_type))

    def _on_event(self, _ctx: object, data: int, size: int) -> int:
        self._received.append(decode_event(ctypes.string_at(data, size)))
        return 0

    def poll(self, timeout_ms: int = 0) -> list[PreventionEvent]:
        """Events reported since the last poll; waits up to timeout_ms for
        the first one (-1: forever)."""
        if self._bpf is None:
            return []
        self._bpf.ring_buffer_poll(timeout_ms)
        events, self._received = self._received, []
        return events

    def program_ids(self) -> dict[str, int]:
        """Kernel id of each loaded program by function name, for
        `bpftool prog show id N` and run-time statistics."""
        if self._bpf is None:
            return {}
        ids = {}
        for name, fn in self._bpf.funcs.items():
            ids[os.fsdecode(name)] = _prog_id_and_name(fn.fd)[0]
        return ids

    def lost_events(self) -> int:
        """Events the kernel could not report because the ring buffer was full."""
        if self._bpf is None:
            return 0
        return int(self._bpf[b"lost_events"][ctypes.c_int(0)].value)

    # --- deny lists (live) ---

    def _map(self, name: str):
        if self._bpf is None:
            raise RuntimeError("Prevention is not started")
        return self._bpf[name.encode()]

    def block_ports(self, ports: Iterable[int], kill: bool = False) -> None:
        """Deny connects to these destination ports on every address."""
        table = self._map("block_ports")
        action = ACT_BLOCK | (ACT_KILL if kill else 0)
        for port in ports:
            if not 0 < int(port) < 65536:
                raise ValueError(f"not a port: {port!r}")
            table[table.Key(int(port))] = table.Leaf(action)

    def unblock_ports(self, ports: Iterable[int]) -> None:
        table = self._map("block_ports")
        for port in ports:
            _discard(table, table.Key(int(port)))

    def block_cidrs(self, cidrs: Iterable[str], kill: bool = False) -> None:
        """Deny connects to these networks ("10.0.0.0/8", "2001:db8::/32",
        or a bare address), on every port."""
        action = ACT_BLOCK | (ACT_KILL if kill else 0)
        for text in cidrs:
            table, key = self._network_key(parse_network(text))
            table[key] = table.Leaf(action)

    def unblock_cidrs(self, cidrs: Iterable[str]) -> None:
        for text in cidrs:
            table, key = self._network_key(parse_network(text))
            _discard(table, key)

    def block_addresses(self, addresses: Iterable[str], kill: bool = False) -> None:
        """Deny single addresses, e.g. those a pool name in a rule resolved to."""
        self.block_cidrs((str(ipaddress.ip_address(a.strip())) for a in addresses), kill)

    def unblock_addresses(self, addresses: Iterable[str]) -> None:
        self.unblock_cidrs(str(ipaddress.ip_address(a.strip())) for a in addresses)

    def kill_on_connect(self, ports: Iterable[int] = (), cidrs: Iterable[str] = ()) -> None:
        """Deny these destinations and SIGKILL whoever tries them, in the
        kernel: the connect never sends a SYN."""
        self.block_ports(ports, kill=True)
        self.block_cidrs(cidrs, kill=True)

    def _network_key(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network):
        if network.version == 4:
            table = self._map("block_v4")
            key = table.Key()
            key.prefixlen = network.prefixlen
            key.addr = int.from_bytes(network.network_address.packed, "little")
            return table, key
        table = self._map("block_v6")
        key = table.Key()
        key.prefixlen = network.prefixlen
        packed = network.network_address.packed
        for i in range(4):
            key.addr[i] = int.from_bytes(packed[4 * i : 4 * i + 4], "little")
        return table, key

    def exempt_cgroups(self, ids: Iterable[int]) -> None:
        """Never deny connects from these cgroups or their descendants
        (e.g. registered jobs). Ids come from cgroup_id()."""
        table = self._map("exempt_cgroups")
        for cid in ids:
            table[table.Key(int(cid))] = table.Leaf(1)

    def unexempt_cgroups(self, ids: Iterable[int]) -> None:
        table = self._map("exempt_cgroups")
        for cid in ids:
            _discard(table, table.Key(int(cid)))

    def deny_exec(self, names: Iterable[str] = (), paths: Iterable[str] = ()) -> None:
        """SIGKILL these programs at exec, before their first instruction.
        names match the executable's basename (the kernel keeps its first
        15 bytes); paths match the path given to execve exactly, so each
        path is entered as given and as resolved."""
        comm_table, path_table = self._map("deny_comm"), self._map("deny_path")
        for name in names:
            key = comm_table.Key()
            key.comm = comm_key(name)
            comm_table[key] = comm_table.Leaf(1)
        for path in paths:
            for variant in {path, os.path.realpath(path)}:
                key = path_table.Key()
                key.path = path_key(variant)
                path_table[key] = path_table.Leaf(1)

    def allow_exec(self, names: Iterable[str] = (), paths: Iterable[str] = ()) -> None:
        comm_table, path_table = self._map("deny_comm"), self._map("deny_path")
        for name in names:
            key = comm_table.Key()
            key.comm = comm_key(name)
            _discard(comm_table, key)
        for path in paths:
            for variant in {path, os.path.realpath(path)}:
                key = path_table.Key()
                key.path = path_key(variant)
                _discard(path_table, key)

    def close(self) -> None:
        """Detach and unpin everything this Prevention made. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for prog_fd, attach_type in self._attached:
            try:
                _prog_detach(self._root_fd, prog_fd, attach_type)
            except OSError as exc:
                log.warning("detaching rome-guard connect program failed: %s", exc)
        self._attached = []
        for link_fd in self._links:
            os.close(link_fd)  # the kernel detaches the program with its last link fd
        self._links = []
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None
        if self._owner_dir and os.path.isdir(self._owner_dir):
            for entry in os.listdir(self._owner_dir):
                os.unlink(os.path.join(self._owner_dir, entry))
            os.rmdir(self._owner_dir)
        self._owner_dir = None
        if self._bpf is not None:
            self._bpf.cleanup()  # tracepoints, program and map fds
            atexit.unregister(self._bpf.cleanup)  # BCC's own, which pins the object
            self._bpf = None


def _discard(table, key) -> None:
    with contextlib.suppress(KeyError):
        del table[key]
