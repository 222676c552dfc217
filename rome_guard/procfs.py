"""Read processes from /proc.

The /proc reader is the one place that knows /proc's formats. A process can
vanish between any two reads: that is the common case, reported as
``ProcessGone`` (or ``None`` from the top-level readers), never a crash.
Unreadable fields (permissions, zombies, kernel threads) come back empty.
This module never decides anything; it only reads.
"""

from __future__ import annotations

import os
import pwd
import stat
from functools import lru_cache
from typing import Iterable, Iterator, Mapping, NamedTuple

from rome_guard.attribution import attribute, parse_environ
from rome_guard.events import ProcessInfo, ProcessKey
from rome_guard.linux import PROC, cgroup_v2_path
from rome_guard.textsafe import from_bytes

_PF_KTHREAD = 0x00200000


class ProcessGone(Exception):
    """The process exited (or its pid was reused) while we were reading it."""


def list_pids(proc: str = PROC) -> list[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except (PermissionError, FileNotFoundError, ProcessLookupError, OSError):
        return ""


class Stat:
    """The fields of /proc/PID/stat we need. comm may contain spaces and
    parentheses: it is everything between the first '(' and the last ')'."""

    __slots__ = ("comm", "state", "ppid", "flags", "start_time")

    def __init__(self, raw: bytes):
        open_paren = raw.index(b"(")
        close_paren = raw.rindex(b")")
        self.comm = from_bytes(raw[open_paren + 1 : close_paren])
        fields = raw[close_paren + 2 :].split()
        # fields[0] is field 3 (state) of proc(5)
        self.state = fields[0].decode()
        self.ppid = int(fields[1])
        self.flags = int(fields[6])
        self.start_time = int(fields[19])

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & _PF_KTHREAD)


def read_stat(pid: int, proc: str = PROC) -> Stat:
    try:
        return Stat(_read(f"{proc}/{pid}/stat"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessGone(pid) from exc


def start_time(pid: int, proc: str = PROC) -> int | None:
    """The start time of pid now, or None if it is gone."""
    try:
        return read_stat(pid, proc).start_time
    except ProcessGone:
        return None


@lru_cache(maxsize=4096)
def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _cmdline(raw: bytes) -> tuple[str, ...]:
    if not raw:
        return ()
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    return tuple(from_bytes(arg) for arg in raw.split(b"\0"))


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        chunks = []
        while chunk := os.read(fd, 131072):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _readlink_at(dir_fd: int, name: str) -> str:
    try:
        return from_bytes(os.readlink(name.encode(), dir_fd=dir_fd))
    except OSError:
        return ""


def read_process(
    pid: int,
    env_keys: Iterable[str] = (),
    proc: str = PROC,
    pre_existing: bool = False,
) -> ProcessInfo | None:
    """One consistent ProcessInfo for pid, or None if it vanished.

    Every file is opened relative to one open /proc/PID directory: if the
    process exits and its pid is reused mid-read, reads through the old
    directory fail (ESRCH) instead of mixing two processes."""
    try:
        dir_fd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        try:
            stat = Stat(_read_at(dir_fd, "stat"))
            uid = os.fstat(dir_fd).st_uid
        except (OSError, ValueError, IndexError):
            return None
        try:
            cmdline = _cmdline(_read_at(dir_fd, "cmdline"))
            cgroup_raw = _read_at(dir_fd, "cgroup")
        except PermissionError:
            cmdline, cgroup_raw = (), b""
        except OSError:
            return None
        exe = "" if stat.kernel_thread else _readlink_at(dir_fd, "exe")
        cwd = _readlink_at(dir_fd, "cwd")
        keys = tuple(env_keys)
        environ: Mapping[str, str] = {}
        if keys:
            try:
                raw_env = _read_at(dir_fd, "environ")
            except OSError:
                raw_env = b""
            environ = {from_bytes(k): from_bytes(v) for k, v in parse_environ(raw_env).items()}
    finally:
        os.close(dir_fd)
    cgroup = cgroup_v2_path(cgroup_raw)
    return ProcessInfo(
        key=ProcessKey(pid, stat.start_time),
        ppid=stat.ppid,
        uid=uid,
        user=user_name(uid),
        comm=stat.comm,
        exe=exe,
        cmdline=cmdline,
        cwd=cwd,
        cgroup=cgroup,
        attribution=attribute(cgroup, environ, keys),
        kernel_thread=stat.kernel_thread,
        zombie=stat.state == "Z",
        pre_existing=pre_existing,
    )


def read_environ(pid: int, keys: Iterable[str], proc: str = PROC) -> dict[str, str] | None:
    """The values of keys in pid's environment, None when it cannot be
    read: gone, not ours to read, or empty (a zombie's, or a process killed
    at exec, reads as empty: a live program always has some environment
    unless it was started with none, which then counts as unreadable too)."""
    try:
        raw = _read(f"{proc}/{pid}/environ")
    except OSError:
        return None
    if not raw:
        return None
    environ = parse_environ(raw)
    wanted = {key.encode(errors="surrogateescape"): key for key in keys}
    return {wanted[k]: from_bytes(v) for k, v in environ.items() if k in wanted}


def read_exe(pid: int, proc: str = PROC) -> str:
    """The exe link of pid ("" when gone or unreadable): what an exec
    changes that its fork did not already tell; "... (deleted)" once
    removed, "/memfd:NAME (deleted)" for a memfd."""
    try:
        return from_bytes(os.readlink(f"{proc}/{pid}/exe".encode()))
    except OSError:
        return ""


CONFIG_READ_LIMIT = 65536
_CONFIG_SUFFIXES = (".toml", ".ini", ".yaml", ".yml", ".json", ".conf", ".cfg")


def read_config_file(info: ProcessInfo, path: str, proc: str = PROC) -> str:
    """The first 64 KiB of a config file a process names in its argv, as
    that process sees it (its root and cwd through /proc/PID), only for
    config-looking names and regular files; "" otherwise. Never follows a
    path outside what the process itself could name."""
    if not path or not path.lower().endswith(_CONFIG_SUFFIXES) or "\0" in path:
        return ""
    base = f"{proc}/{info.pid}/root" if path.startswith("/") else f"{proc}/{info.pid}/cwd"
    try:
        fd = os.open(f"{base}/{path.lstrip('/')}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, CONFIG_READ_LIMIT).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def iter_processes(
    env_keys: Iterable[str] = (), proc: str = PROC, pre_existing: bool = False
) -> Iterator[ProcessInfo]:
    keys = tuple(env_keys)
    for pid in list_pids(proc):
        info = read_process(pid, keys, proc, pre_existing)
        if info is not None:
            yield info


def socket_inodes(pid: int, proc: str = PROC) -> dict[int, list[int]]:
    """socket inode -> the fd numbers of pid that refer to it."""
    result: dict[int, list[int]] = {}
    fd_dir = f"{proc}/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return result
    for name in names:
        target = _readlink(f"{fd_dir}/{name}")
        if target.startswith("socket:["):
            result.setdefault(int(target[8:-1]), []).append(int(name))
    return result


def stdio_socket_inodes(pid: int, proc: str = PROC) -> dict[int, int]:
    """fd (0, 1, 2) -> socket inode, for the standard fds that are sockets."""
    result = {}
    for fd in (0, 1, 2):
        target = _readlink(f"{proc}/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            result[fd] = int(target[8:-1])
    return result


# --- the stdio graph's view of a process (state.stdio) ------------------------

# What an fd can be, for the stdio graph: one end of a channel that two
# processes can share, or a socket (by inode).
END_PIPE = "pipe"  # an anonymous pipe: pipe:[INODE]
END_FIFO = "fifo"  # a named pipe (mkfifo): a path whose inode is a FIFO
END_PTY = "pty"  # either side of a pseudo-terminal pair, by its index
END_UNIX = "unix"  # an AF_UNIX socket pair, by the inode of one of its ends

Channel = tuple[str, object]  # (END_*, id): two processes holding it share it


class FdEnd(NamedTuple):
    channel: Channel
    reads: bool  # opened for reading (the fd link's mode: lr-x, lrwx)
    writes: bool


class FdTable:
    """The channel ends and sockets one process holds: ``ends`` maps an fd
    to its FdEnd -- a pty master (/dev/ptmx, its fdinfo's ``tty-index``)
    and its slave (/dev/pts/N) are the same channel N, so a shell on
    /dev/pts/3 and the relay holding the master of pty 3 share it -- and
    ``sockets`` maps an fd to its socket inode."""

    __slots__ = ("ends", "sockets")

    def __init__(self) -> None:
        self.ends: dict[int, FdEnd] = {}
        self.sockets: dict[int, int] = {}


def _pty_index(fdinfo_path: str, target: str) -> int | None:
    if target.startswith("/dev/pts/") and target[9:].isdigit():
        return int(target[9:])
    try:
        with open(fdinfo_path, "rb") as f:
            for line in f.read().splitlines():
                if line.startswith(b"tty-index:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _channel(proc: str, pid: int, fd: int, path: str, target: str) -> Channel | None:
    if target.startswith("pipe:["):
        return (END_PIPE, int(target[6:-1]))
    if target == "/dev/ptmx" or target.startswith("/dev/pts/"):
        index = _pty_index(f"{proc}/{pid}/fdinfo/{fd}", target)
        return (END_PTY, index) if index is not None else None
    if target.startswith("/") and not target.startswith("/dev/"):
        try:
            st = os.stat(path)
        except OSError:
            return None
        if stat.S_ISFIFO(st.st_mode):
            return (END_FIFO, (st.st_dev, st.st_ino))
    return None


def read_fds(pid: int, fds: Iterable[int] | None = None, proc: str = PROC) -> FdTable:
    """The pipes, fifos, pty ends and sockets among pid's fds (all of them,
    or only ``fds``); empty when the process is gone. One readlink and one
    lstat (the access mode) per fd, plus a stat for a path (is it a fifo?)
    and an fdinfo read for a pty master."""
    table = FdTable()
    fd_dir = f"{proc}/{pid}/fd"
    if fds is None:
        try:
            names = [int(n) for n in os.listdir(fd_dir)]
        except (OSError, ValueError):
            return table
    else:
        names = list(fds)
    for fd in names:
        path = f"{fd_dir}/{fd}"
        target = _readlink(path)
        if not target or target.startswith("anon_inode:"):
            continue
        if target.startswith("socket:["):
            table.sockets[fd] = int(target[8:-1])
            continue
        channel = _channel(proc, pid, fd, path, target)
        if channel is None:
            continue
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        table.ends[fd] = FdEnd(channel, bool(mode & stat.S_IRUSR), bool(mode & stat.S_IWUSR))
    return table


def children_of(pid: int, proc: str = PROC) -> list[int]:
    """pid's children now (every thread's, /proc/PID/task/TID/children),
    [] when gone: forks that have not exec'd yet included."""
    task_dir = f"{proc}/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return []
    children: list[int] = []
    for tid in tids:
        try:
            children += [int(c) for c in _read(f"{task_dir}/{tid}/children").split()]
        except (OSError, ValueError):
            continue
    return children
