"""The forwards an ssh client will really set up, from every config it reads.

``ssh -F cfg -N h1`` or a host alias whose ``RemoteForward`` lives in
``~/.ssh/config`` (through ``Include``, ``Host`` or ``Match``) says nothing
on its command line. OpenSSH itself answers: ``ssh -G`` with the process's
own arguments prints the effective configuration. It is run as the
process's user (whose ``~/.ssh/config`` and permissions apply), in its
working directory (a relative ``-F``), with a minimal environment and a
timeout, and always the system's ssh, never the watched process's binary.

Costs one short ssh run per distinct (user, cwd, argv, identity of the
config file: inode, size, mtime, ctime), cached, within a
budget (5 s of ssh -G per minute; a user whose config timed out is not
asked again for 5 minutes), because the daemon's loop waits on it. Never run
for an argv that already has ``-G`` (the guard's own run is an ssh exec
too), never as root for another user's process, never with a shell.

When the configuration cannot be established the answer says so, with a
reason (``SshConfigUnknown``), instead of passing for "no forwards": ``-F``
naming a descriptor (``/dev/stdin``, ``/dev/fd/N``, process substitution)
that only the client could read; a ``-F`` file that is not a regular
file, is gone, or changed after the client started (its ctime/mtime, read
through the client's own root, later than the client's start, or differing
before and after ssh -G); a ``~/.ssh/config`` changed likewise; ssh -G
failing, timing out or not asked (over budget). A ``-F`` file is read by
the guard itself (through ``/proc/PID/root``, so a private /tmp or a
container's root does not hide it) and handed to ssh -G on its stdin;
``~/.ssh/config`` is read by ssh -G as the user, which needs CAP_SETUID and
CAP_SETGID (docs/install.md). Counts per reason are kept for the metrics
and ``rome-guard status``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

from rome_guard.detect.argv import SSH_OPTSTRING, getopt, ssh_config_file, ssh_descriptor_config
from rome_guard.events import (
    SSH_UNKNOWN_CHANGED,
    SSH_UNKNOWN_DELETED,
    SSH_UNKNOWN_DESCRIPTOR,
    SSH_UNKNOWN_FAILED,
    SSH_UNKNOWN_NO_SSH,
    SSH_UNKNOWN_NO_USER,
    SSH_UNKNOWN_NOT_A_FILE,
    SSH_UNKNOWN_SKIPPED,
    SSH_UNKNOWN_TIMEOUT,
    SSH_UNKNOWN_UNREADABLE,
    ProcessInfo,
)

TIMEOUT_S = 2.0
CACHE_SIZE = 1024
CACHE_TTL_S = 60.0
BUDGET_S = 5.0  # ssh -G wall time per minute, all users together
SLOW_USER_BACKOFF_S = 300.0
SSH_BINARIES = ("/usr/bin/ssh", "/bin/ssh", "/usr/local/bin/ssh")
MAX_CONFIG_BYTES = 1 << 20
# A config changed this long after the client started is the race of one
# who hides a forward from the guard; an edit days later is ordinary life.
CHANGE_WINDOW_S = 60.0


@dataclass(frozen=True)
class SshForwards:
    """Forwards in the effective configuration, as ``ssh -G`` prints them."""

    remote: tuple[str, ...] = ()
    dynamic: tuple[str, ...] = ()
    local: tuple[str, ...] = ()
    tunnel: str = "no"

    def kinds(self) -> dict[str, str]:
        """kind -> the first spec of that kind, for the kinds present."""
        found = {}
        for kind, specs in (
            ("remote", self.remote),
            ("dynamic", self.dynamic),
            ("local", self.local),
        ):
            if specs:
                found[kind] = specs[0]
        if self.tunnel not in ("", "no", "false"):
            found["tunnel"] = self.tunnel
        return found


@dataclass(frozen=True)
class SshConfigUnknown:
    """The effective configuration could not be established: ``reason`` is
    one of UNKNOWN_REASONS, ``detail`` says what was seen, in a line."""

    reason: str
    detail: str

    def kinds(self) -> dict[str, str]:
        return {}


def parse_effective(text: str) -> SshForwards:
    """``ssh -G`` output (lower-case keyword, space, value per line)."""
    remote, dynamic, local, tunnel = [], [], [], "no"
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key == "remoteforward":
            remote.append(value)
        elif key == "dynamicforward":
            dynamic.append(value)
        elif key == "localforward":
            local.append(value)
        elif key == "tunnel":
            tunnel = value
    return SshForwards(tuple(remote), tuple(dynamic), tuple(local), tunnel)


def _ssh_binary() -> str | None:
    for path in SSH_BINARIES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("ssh", path="/usr/bin:/bin")


def _start_wall_time(info: ProcessInfo) -> float:
    """The process's start as a time.time() value (start ticks since boot)."""
    ticks = os.sysconf("SC_CLK_TCK")
    since_start = time.clock_gettime(time.CLOCK_BOOTTIME) - info.key.start_time / ticks
    return time.time() - since_start


def _changed_after_start(st: os.stat_result, info: ProcessInfo) -> bool:
    """ctime or mtime later than the start (its ticks round down: one tick
    of slack) and within CHANGE_WINDOW_S of it."""
    start = _start_wall_time(info) + 1.0 / os.sysconf("SC_CLK_TCK")
    changed = max(st.st_mtime, st.st_ctime)
    return start < changed < start + CHANGE_WINDOW_S


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _client_path(info: ProcessInfo, path: str) -> str:
    """path as the client sees it: relative to its cwd, under its root."""
    full = os.path.join(info.cwd or "/", path)
    root = f"/proc/{info.pid}/root"
    return root + full if os.path.isdir(root) else full


def _read_config_file(info: ProcessInfo, path: str) -> tuple[bytes, tuple] | SshConfigUnknown:
    """The -F file's text and identity, read by the guard through the
    client's root; or why it cannot stand for what the client read."""
    where = _client_path(info, path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return SshConfigUnknown(SSH_UNKNOWN_DELETED, f"-F {path} is gone")
    except OSError as exc:
        return SshConfigUnknown(SSH_UNKNOWN_UNREADABLE, f"-F {path}: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return SshConfigUnknown(SSH_UNKNOWN_NOT_A_FILE, f"-F {path} is not a regular file")
        if _changed_after_start(st, info):
            return SshConfigUnknown(SSH_UNKNOWN_CHANGED, f"-F {path} changed after ssh started")
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)[:MAX_CONFIG_BYTES], _identity(st)
    except OSError as exc:
        return SshConfigUnknown(SSH_UNKNOWN_UNREADABLE, f"-F {path}: {exc.strerror}")
    finally:
        os.close(fd)


def _stat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


# unknown reasons that depend on one client's start or the file's state now
_ABOUT_THIS_PROCESS = frozenset(
    (SSH_UNKNOWN_CHANGED, SSH_UNKNOWN_DELETED, SSH_UNKNOWN_NOT_A_FILE, SSH_UNKNOWN_UNREADABLE)
)


def _config_identity(info: ProcessInfo) -> tuple | None:
    """(dev, inode, size, mtime, ctime) of the config file the client reads:
    its -F file, else its user's ~/.ssh/config; None when there is none."""
    named = ssh_config_file(info.cmdline)
    if named is not None:
        if named.lower() == "none" or ssh_descriptor_config(info.cmdline) is not None:
            return None
        path = _client_path(info, named)
    else:
        try:
            path = os.path.join(pwd.getpwuid(info.uid).pw_dir, ".ssh", "config")
        except (KeyError, OverflowError):
            return None
    st = _stat_or_none(path)
    return _identity(st) if st is not None else None


class EffectiveSshConfig:
    """``forwards(info)`` for ssh client processes, cached."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self.runs = 0
        self.skipped = 0  # not asked: over budget, or the user's config is slow
        self.unknown: Counter[str] = Counter()  # reason -> configs not established
        self._spent: deque[tuple[float, float]] = deque()  # (when, seconds) of recent runs
        self._slow_users: dict[int, float] = {}  # uid -> monotonic time to ask again
        self._cache: OrderedDict[tuple, tuple[float, SshForwards | SshConfigUnknown | None]] = (
            OrderedDict()
        )

    def status(self) -> dict:
        """For `rome-guard status`: runs, skips and unknown configs by reason."""
        return {"runs": self.runs, "skipped": self.skipped, "unknown": dict(self.unknown)}

    def forwards(self, info: ProcessInfo) -> SshForwards | SshConfigUnknown | None:
        """The effective forwards; SshConfigUnknown (with the reason) when
        they cannot be established; None when there is nothing to ask (not
        an ssh argv, or the guard's own ssh -G)."""
        argv = info.cmdline
        if len(argv) < 2 or "G" in getopt(argv, SSH_OPTSTRING, 1).flags:
            return None
        # the config file's identity is part of the key: the same argv with a
        # rewritten file is asked again, not answered from the cache
        key = (info.uid, info.cwd, argv, _config_identity(info))
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        result = self._establish(info)
        if isinstance(result, SshConfigUnknown):
            self.unknown[result.reason] += 1
            if result.reason in _ABOUT_THIS_PROCESS:
                return result  # judged against this client's start: not for another
        self._cache[key] = (now, result)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return result

    def _over_budget(self, uid: int) -> bool:
        """At most BUDGET_S of ssh -G per minute, and none for a user whose
        config timed out recently: the daemon's loop waits on each run."""
        now = time.monotonic()
        if self._slow_users.get(uid, 0.0) > now:
            self.skipped += 1
            return True
        while self._spent and now - self._spent[0][0] > 60.0:
            self._spent.popleft()
        if sum(cost for _t, cost in self._spent) >= BUDGET_S:
            self.skipped += 1
            return True
        return False

    def _establish(self, info: ProcessInfo) -> SshForwards | SshConfigUnknown | None:
        argv = info.cmdline
        named = ssh_config_file(argv)
        if ssh_descriptor_config(argv) is not None:
            return SshConfigUnknown(
                SSH_UNKNOWN_DESCRIPTOR, f"-F {named}: a descriptor only the client could read"
            )
        ssh = _ssh_binary()
        if ssh is None:
            return SshConfigUnknown(SSH_UNKNOWN_NO_SSH, "no ssh on the host to run ssh -G")
        if info.uid < 0:
            return None
        try:
            entry = pwd.getpwuid(info.uid)
        except KeyError:
            return SshConfigUnknown(SSH_UNKNOWN_NO_USER, f"uid {info.uid} has no passwd entry")
        if os.geteuid() != 0 and info.uid != os.geteuid():
            return None  # another user's config: only root may read it as them
        text: bytes | None = None
        watched: str | None = None  # the file whose identity must hold
        before = None
        insert_at = 0
        if named is not None and named.lower() != "none":
            read = _read_config_file(info, named)
            if isinstance(read, SshConfigUnknown):
                return read
            text, before = read
            watched = _client_path(info, named)
            # ssh keeps the last -F: the text read is given (see _spawn)
            # where options still parse
            insert_at = getopt(argv, SSH_OPTSTRING, 1).stopped_at - 1
        elif named is None:
            watched = os.path.join(entry.pw_dir, ".ssh", "config")
            st = _stat_or_none(watched)
            if st is not None and _changed_after_start(st, info):
                return SshConfigUnknown(
                    SSH_UNKNOWN_CHANGED, "~/.ssh/config changed after ssh started"
                )
            before = _identity(st) if st is not None else None
        if self._over_budget(info.uid):
            return SshConfigUnknown(SSH_UNKNOWN_SKIPPED, "ssh -G not run: over its time budget")
        result = self._run_ssh_g(ssh, (insert_at, text), info, entry)
        if watched is not None and not isinstance(result, SshConfigUnknown):
            after = _stat_or_none(watched)
            if (_identity(after) if after is not None else None) != before:
                return SshConfigUnknown(
                    SSH_UNKNOWN_CHANGED, "the config changed while ssh -G read it"
                )
        return result

    def _run_ssh_g(
        self,
        ssh: str,
        config: tuple[int, bytes | None],
        info: ProcessInfo,
        entry: pwd.struct_passwd,
    ) -> SshForwards | SshConfigUnknown:
        """ssh -G with the client's arguments; config is (argv index, text):
        the -F text the guard read, given at that index, or None."""
        cwd = info.cwd if info.cwd and os.path.isdir(info.cwd) else "/"
        env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "USER": entry.pw_name}
        identity: dict = {}
        if os.geteuid() == 0:
            identity = {"user": info.uid, "group": entry.pw_gid, "extra_groups": []}
        self.runs += 1
        started = time.monotonic()
        try:
            proc = _spawn(ssh, info.cmdline[1:], config, cwd, env, identity)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            # PermissionError here: no CAP_SETUID/CAP_SETGID (see docs/install.md)
            self._spent.append((time.monotonic(), time.monotonic() - started))
            return SshConfigUnknown(SSH_UNKNOWN_FAILED, f"ssh -G could not start: {exc}")
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            # Match exec may have started children holding the pipe: the
            # whole session goes, and this user's configs are not asked
            # again for a while (a slow config must not stall the guard)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
            self._slow_users[info.uid] = time.monotonic() + SLOW_USER_BACKOFF_S
            return SshConfigUnknown(SSH_UNKNOWN_TIMEOUT, f"ssh -G ran past {self.timeout_s:g}s")
        finally:
            self._spent.append((time.monotonic(), time.monotonic() - started))
        if proc.returncode != 0:
            first = err.decode("utf-8", "replace").strip().splitlines()[:1]
            return SshConfigUnknown(
                SSH_UNKNOWN_FAILED,
                f"ssh -G exited {proc.returncode}" + (f": {first[0][:200]}" if first else ""),
            )
        return parse_effective(out.decode("utf-8", "replace"))


def _spawn(
    ssh: str,
    arguments: tuple[str, ...],
    config: tuple[int, bytes | None],
    cwd: str,
    env: dict,
    identity: dict,
) -> subprocess.Popen:
    """ssh -G with the client's arguments. The -F text the guard read is
    ssh -G's stdin, a memfd, named -F /dev/stdin: ssh closes every other
    descriptor before it reads its config, and ssh -G, running as the user,
    must reopen it (a pipe or file the root daemon made is root's and 0600;
    a memfd is 0777)."""
    insert_at, text = config
    argv = [ssh, "-G", *arguments]
    memfd = -1
    try:
        if text is not None:
            memfd = os.memfd_create("rome-guard-ssh-config")
            os.write(memfd, text)
            os.lseek(memfd, 0, os.SEEK_SET)
            argv[2 + insert_at : 2 + insert_at] = ["-F", "/dev/stdin"]
        return subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=memfd if memfd >= 0 else subprocess.DEVNULL,
            cwd=cwd,
            env=env,
            start_new_session=True,
            **identity,
        )
    finally:
        if memfd >= 0:
            os.close(memfd)
