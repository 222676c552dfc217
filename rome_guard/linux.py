"""The kernel's small interfaces, parsed in one place.

Every format the kernel exposes outside /proc/PID's process files lives
here, once: the cgroup v2 line of /proc/PID/cgroup and a cgroup's id, the
mount table, effective capabilities, the boot-time clock, the " (deleted)" suffix of an exe
link, the listening TCP sockets of /proc/PID/net/tcp and what makes a
socket "have a peer". Readers return plain values and treat a vanished
process or file as normal (None, empty); pure parsers take bytes or text
and never touch the host.

This module never decides anything about a process and never acts on
one; it only reads and parses.
"""

from __future__ import annotations

import os
import time

from rome_guard.events import Endpoint
from rome_guard.textsafe import from_bytes

PROC = "/proc"
MOUNTS = "/proc/mounts"


def boottime_ns() -> int:
    """Now on CLOCK_BOOTTIME, the clock of every kernel record's timestamp."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME)


# --- exe links ----------------------------------------------------------------

DELETED_SUFFIX = " (deleted)"  # readlink(/proc/PID/exe) of an unlinked binary


def without_deleted(exe: str) -> str:
    """The exe path without the kernel's " (deleted)" marker."""
    return exe.removesuffix(DELETED_SUFFIX)


def is_deleted(exe: str) -> bool:
    return exe.endswith(DELETED_SUFFIX)


def is_memfd(exe: str) -> bool:
    """An image run from memfd_create(2): /proc/PID/exe reads "/memfd:NAME (deleted)"."""
    return exe.startswith("/memfd:")


# --- cgroups ----------------------------------------------------------------------


def cgroup_v2_path(raw: bytes) -> str:
    """The unified hierarchy's path ("0::/...") of a /proc/PID/cgroup text,
    else the name=systemd one (hybrid hosts without a unified line)."""
    fallback = ""
    for line in raw.splitlines():
        hierarchy, _, rest = line.partition(b":")
        controllers, _, path = rest.partition(b":")
        if hierarchy == b"0" and controllers == b"":
            return from_bytes(path)
        if controllers == b"name=systemd":
            fallback = from_bytes(path)
    return fallback


def read_cgroup(pid: int, proc: str = PROC) -> str | None:
    """The cgroup v2 path of pid now, or None if it is gone."""
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            return cgroup_v2_path(f.read())
    except OSError:
        return None


def cgroup_dir_id(directory: str) -> int:
    """The cgroup v2 id of a directory under the cgroup2 mount, as the kernel
    reports it (bpf_get_current_cgroup_id): its inode number."""
    return os.stat(directory).st_ino


def cgroup_id(cgroup: str, root: str | None = None) -> int:
    """The cgroup v2 id of a cgroup path as in /proc/PID/cgroup ("/a/b").
    OSError when the cgroup is gone; NoCgroup2 when there is no hierarchy."""
    base = root if root is not None else cgroup2_root()
    return cgroup_dir_id(os.path.join(base, cgroup.lstrip("/")))


def cgroup_path_of_id(cgroup_id: int, root: str | None = None) -> str:
    """The cgroup v2 path ("/system.slice/x.service") whose id is cgroup_id,
    by walking the hierarchy; "" when no cgroup has it (any more).
    NoCgroup2 when there is no hierarchy."""
    base = root if root is not None else cgroup2_root()
    for directory, _dirs, _files in os.walk(base):
        try:
            if cgroup_dir_id(directory) == cgroup_id:
                relative = os.path.relpath(directory, base)
                return "/" if relative == "." else "/" + relative
        except OSError:
            continue  # removed while walking
    return ""


# --- mounts ------------------------------------------------------------------------


class NoCgroup2(OSError):
    """No cgroup v2 hierarchy is mounted."""


def unescape_mount_field(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_of_type(fstype: str, mounts: str = MOUNTS) -> list[str]:
    """Mount points of every filesystem of type fstype, in mount order."""
    with open(mounts) as f:
        lines = f.read().splitlines()
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == fstype:
            found.append(unescape_mount_field(parts[1]))
    return found


def cgroup2_root(mounts: str = MOUNTS) -> str:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup or, in the
    hybrid layout, /sys/fs/cgroup/unified)."""
    found = mounts_of_type("cgroup2", mounts)
    if not found:
        raise NoCgroup2(f"no cgroup2 mount in {mounts}")
    return found[0]


# --- capabilities ----------------------------------------------------------------

CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


def effective_capabilities(proc: str = PROC) -> int:
    """The CapEff bit mask of this process (0 when unreadable)."""
    try:
        with open(f"{proc}/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def can_load_bpf(caps: int | None = None) -> bool:
    """CAP_SYS_ADMIN, or CAP_BPF with CAP_PERFMON (5.8+)."""
    caps = effective_capabilities() if caps is None else caps
    if caps & (1 << CAP_SYS_ADMIN):
        return True
    return bool(caps & (1 << CAP_BPF)) and bool(caps & (1 << CAP_PERFMON))


# --- PID namespaces ---------------------------------------------------------------

INIT_PID_NS_INODE = 0xEFFFFFFC  # PROC_PID_INIT_INO: the kernel's initial PID namespace


def in_host_pid_namespace(proc: str = PROC) -> bool:
    """Whether this process runs in the kernel's initial PID namespace, the
    one whose pids eBPF programs report and whose liveness says which pinned
    attachment is stale. True where /proc cannot tell (no ns links)."""
    try:
        return os.stat(f"{proc}/self/ns/pid").st_ino == INIT_PID_NS_INODE
    except OSError:
        return True


# --- sockets ------------------------------------------------------------------------

_NOT_A_PEER = ("LISTEN", "UNCONNECTED", "CLOSE")
_ANY_ADDRESS = ("0.0.0.0", "::", "")
_TCP_LISTEN = "0A"  # st column of /proc/net/tcp


def has_peer(ep: Endpoint) -> bool:
    """A socket talking to a remote end: a destination port and address,
    and not listening, unconnected or closed."""
    return ep.dport != 0 and ep.daddr not in _ANY_ADDRESS and ep.state not in _NOT_A_PEER


def listening_tcp_inodes(pid: int, proc: str = PROC) -> set[int]:
    """Socket inodes of the TCP listeners in pid's network namespace
    (/proc/PID/net/tcp{,6}: the namespace of pid, which sock_diag from
    the daemon's own namespace would not see)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == _TCP_LISTEN:
                inodes.add(int(fields[9]))
    return inodes
