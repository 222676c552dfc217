"""The forwards an ssh client will really set up, from every config it reads.

``ssh -F cfg -N h1`` or a host alias whose ``RemoteForward`` lives in
``~/.ssh/config`` (through ``Include``, ``Host`` or ``Match``) says nothing
on its command line. OpenSSH itself answers: ``ssh -G`` with the process's
own arguments prints the effective configuration. It is run as the
process's user (whose ``~/.ssh/config`` and permissions apply), in its
working directory (a relative ``-F``), with a minimal environment and a
timeout, and always the system's ssh, never the watched process's binary.

Costs one short ssh run per distinct (user, cwd, argv), cached, within a
budget (5 s of ssh -G per minute; a user whose config timed out is not
asked again for 5 minutes), because the daemon's loop waits on it. Never run
for an argv that already has ``-G`` (the guard's own run is an ssh exec
too), never as root for another user's process, never with a shell.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

from rome_guard.detect.argv import getopt
from rome_guard.events import ProcessInfo

TIMEOUT_S = 2.0
CACHE_SIZE = 1024
CACHE_TTL_S = 60.0
BUDGET_S = 5.0  # ssh -G wall time per minute, all users together
SLOW_USER_BACKOFF_S = 300.0
SSH_BINARIES = ("/usr/bin/ssh", "/bin/ssh", "/usr/local/bin/ssh")
# OpenSSH's getopt string (ssh.c), as in rules/reverse_tunnel.yaml
SSH_OPTSTRING = "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:M:NO:P:Q:R:S:TVw:W:XYy"


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


class EffectiveSshConfig:
    """``forwards(info)`` for ssh client processes, cached."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s = timeout_s
        self.runs = 0
        self.skipped = 0  # not asked: over budget, or the user's config is slow
        self._spent: deque[tuple[float, float]] = deque()  # (when, seconds) of recent runs
        self._slow_users: dict[int, float] = {}  # uid -> monotonic time to ask again
        self._cache: OrderedDict[tuple, tuple[float, SshForwards | None]] = OrderedDict()

    def forwards(self, info: ProcessInfo) -> SshForwards | None:
        """None when it cannot be known (not an ssh argv, ssh missing, the
        user unknown, the config unreadable, ssh -G failed or timed out)."""
        argv = info.cmdline
        if len(argv) < 2 or "G" in getopt(argv, SSH_OPTSTRING, 1).flags:
            return None
        key = (info.uid, info.cwd, argv)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        result = self._ask_ssh(info)
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

    def _ask_ssh(self, info: ProcessInfo) -> SshForwards | None:
        ssh = _ssh_binary()
        if ssh is None or info.uid < 0:
            return None
        try:
            entry = pwd.getpwuid(info.uid)
        except KeyError:
            return None
        cwd = info.cwd if info.cwd and os.path.isdir(info.cwd) else "/"
        env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "USER": entry.pw_name}
        identity: dict = {}
        if os.geteuid() == 0:
            identity = {"user": info.uid, "group": entry.pw_gid, "extra_groups": []}
        elif info.uid != os.geteuid():
            return None  # another user's config: only root may read it as them
        if self._over_budget(info.uid):
            return None
        self.runs += 1
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                [ssh, "-G", *info.cmdline[1:]],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
                start_new_session=True,
                **identity,
            )
        except (OSError, subprocess.SubprocessError, ValueError):
            return None
        try:
            out, _ = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            # Match exec may have started children holding the pipe: the
            # whole session goes, and this user's configs are not asked
            # again for a while (a slow config must not stall the guard)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
            self._slow_users[info.uid] = time.monotonic() + SLOW_USER_BACKOFF_S
            return None
        finally:
            self._spent.append((time.monotonic(), time.monotonic() - started))
        if proc.returncode != 0:
            return None
        return parse_effective(out.decode("utf-8", "replace"))
