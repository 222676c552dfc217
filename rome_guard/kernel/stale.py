"""Find and remove what a rome-guard that died without close() left behind.

Prevention attaches its connect programs through BPF links, which the
kernel detaches when the daemon dies; a plain cgroup attachment (an older
rome-guard, or a kernel without cgroup BPF links, < 5.7) outlives the
process that made it. Each running Prevention pins its connect programs
under PIN_ROOT/<pid>-<start time>/ as a mark of ownership;
cleanup_stale() detaches whatever is still attached of owners no longer
alive (pid and start time no longer match) and deletes their pins, then
detaches any rgp_* (or the wire sensor's rgw_*) program on the cgroup2 root
that no live owner pins
(pins lost with a bpffs remount). A crashed guard must never leave the
host cut off.

This module never touches a program not named rgp_* or rgw_*, nor one
pinned by a live rome-guard.
"""

from __future__ import annotations

import errno
import os

from rome_guard.kernel.bpfsys import (
    obj_get,
    prog_detach,
    prog_fd_by_id,
    prog_id_and_name,
    prog_query,
)
from rome_guard.linux import NoCgroup2, cgroup2_root
from rome_guard.procfs import start_time

PIN_ROOT = "/sys/fs/bpf/rome-guard"
# Every cgroup program of ours is named rgp_*: cleanup_stale() finds
# leftovers by this prefix and never touches anything else.
PROG_PREFIX = "rgp_"
# the wire sensor's programs (rome_guard/sensors/wire.py) observe, and drop
# only while their live owner says so: a prefix of their own, same cleanup
WIRE_PROG_PREFIX = "rgw_"
_CLEANED_PREFIXES = (PROG_PREFIX, WIRE_PROG_PREFIX)
ATTACH_INET4_CONNECT = 10
ATTACH_INET6_CONNECT = 11
# program function in prevent.c -> (attach type, pin name)
CONNECT_PROGRAMS = {
    "rgp_connect4": (ATTACH_INET4_CONNECT, "connect4"),
    "rgp_connect6": (ATTACH_INET6_CONNECT, "connect6"),
}
PIN_ATTACH_TYPES = {pin: attach for attach, pin in CONNECT_PROGRAMS.values()}
# the wire sensor's cgroup_skb programs pin into the same owner directory
ATTACH_INET_INGRESS = 0
ATTACH_INET_EGRESS = 1
WIRE_PROGRAMS = {
    "rgw_wire_out": (ATTACH_INET_EGRESS, "wire_out"),
    "rgw_wire_in": (ATTACH_INET_INGRESS, "wire_in"),
}
PIN_ATTACH_TYPES.update({pin: attach for attach, pin in WIRE_PROGRAMS.values()})


def owner_name() -> str:
    pid = os.getpid()
    return f"{pid}-{start_time(pid)}"  # bpffs refuses names with dots


def _owner_alive(name: str) -> bool:
    pid_text, _, start_text = name.partition("-")
    if not (pid_text.isdigit() and start_text.isdigit()):
        return False
    return start_time(int(pid_text)) == int(start_text)


def _pinned_prog_ids(owner_dir: str) -> set[int]:
    ids = set()
    for pin in PIN_ATTACH_TYPES:
        try:
            fd = obj_get(os.path.join(owner_dir, pin))
        except OSError:
            continue
        try:
            ids.add(prog_id_and_name(fd)[0])
        finally:
            os.close(fd)
    return ids


def _remove_owner_dir(owner_dir: str, root_fd: int | None) -> list[str]:
    """Detach a dead owner's pinned programs and delete its pins."""
    removed = []
    for entry in sorted(os.listdir(owner_dir)):
        path = os.path.join(owner_dir, entry)
        attach_type = PIN_ATTACH_TYPES.get(entry)
        if attach_type is not None and root_fd is not None:
            try:
                fd = obj_get(path)
            except OSError:
                fd = -1
            if fd >= 0:
                try:
                    prog_id, name = prog_id_and_name(fd)
                    prog_detach(root_fd, fd, attach_type)
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
    is every program not named rgp_* or rgw_*."""
    try:
        root = cgroup_root if cgroup_root is not None else cgroup2_root()
    except NoCgroup2:
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
        for attach_type in PIN_ATTACH_TYPES.values():
            for prog_id in prog_query(root_fd, attach_type):
                if prog_id in live_ids:
                    continue
                try:
                    fd = prog_fd_by_id(prog_id)
                except OSError:
                    continue  # detached and freed meanwhile
                try:
                    name = prog_id_and_name(fd)[1]
                    if name.startswith(_CLEANED_PREFIXES):
                        prog_detach(root_fd, fd, attach_type)
                        removed.append(f"detached stale {name} (prog id {prog_id}) from {root}")
                finally:
                    os.close(fd)
        return removed
    finally:
        if root_fd is not None:
            os.close(root_fd)


def attached_programs(
    cgroup_root: str | None = None, prefix: str = PROG_PREFIX
) -> list[tuple[int, str]]:
    """(prog id, name) of every rgp_* (or prefix*) program of ours on the
    cgroup2 root."""
    root = cgroup_root if cgroup_root is not None else cgroup2_root()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    found = []
    try:
        for attach_type in PIN_ATTACH_TYPES.values():
            for prog_id in prog_query(fd, attach_type):
                try:
                    prog_fd = prog_fd_by_id(prog_id)
                except OSError:
                    continue
                try:
                    name = prog_id_and_name(prog_fd)[1]
                finally:
                    os.close(prog_fd)
                if name.startswith(prefix):
                    found.append((prog_id, name))
    finally:
        os.close(fd)
    return found
