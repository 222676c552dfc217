"""The bpf(2) calls libbcc does not expose: pin and get pinned objects,
attach (as a BPF link or a plain attachment), detach and query cgroup
programs, look programs up by id; and mounting bpffs. ``CgroupAttachments``
is the one way rome-guard attaches a program to a cgroup (the prevention
connect hooks, the sensor's UDP-send hooks, the wire sensor's skb programs).

Thin wrappers over the syscall with the uapi attribute layouts; an error
is an OSError with the kernel's errno. This module never decides what to
attach or detach: rome_guard.kernel.loader's callers and .stale do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import struct

from rome_guard.linux import mounts_of_type

log = logging.getLogger("rome_guard")

BPFFS = "/sys/fs/bpf"
# uapi/linux/bpf.h
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_ATTACH = 8
BPF_PROG_DETACH = 9
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_F_ALLOW_MULTI = 2
SYS_BPF = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351}


def ensure_bpffs() -> None:
    if BPFFS in mounts_of_type("bpf"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    os.makedirs(BPFFS, exist_ok=True)
    if libc.mount(b"bpf", BPFFS.encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount bpffs on {BPFFS}: {os.strerror(err)}")


LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long


def bpf(cmd: int, attr: ctypes.Array) -> int:
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown on {platform.machine()}")
    ret = LIBC.syscall(ctypes.c_long(number), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def new_attr() -> ctypes.Array:
    """A zeroed union bpf_attr, large enough for every command used here."""
    return ctypes.create_string_buffer(128)


def obj_pin(fd: int, path: str) -> None:
    attr, name = new_attr(), ctypes.create_string_buffer(os.fsencode(path))
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), fd)
    bpf(BPF_OBJ_PIN, attr)


def obj_get(path: str) -> int:
    attr, name = new_attr(), ctypes.create_string_buffer(os.fsencode(path))
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), 0)
    return bpf(BPF_OBJ_GET, attr)


def prog_attach(target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
    attr = new_attr()
    struct.pack_into("=IIII", attr, 0, target_fd, prog_fd, attach_type, flags)
    bpf(BPF_PROG_ATTACH, attr)


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching prog_fd to target_fd; the attachment lives as
    long as the returned fd (and its duplicates), no longer."""
    attr = new_attr()
    # union bpf_attr.link_create: prog_fd, target_fd, attach_type, flags
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, attach_type, 0)
    return bpf(BPF_LINK_CREATE, attr)


def prog_detach(target_fd: int, prog_fd: int, attach_type: int) -> None:
    attr = new_attr()
    struct.pack_into("=III", attr, 0, target_fd, prog_fd, attach_type)
    bpf(BPF_PROG_DETACH, attr)


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    capacity = 64
    while True:
        ids = (ctypes.c_uint32 * capacity)()
        attr = new_attr()
        struct.pack_into(
            "=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), capacity
        )
        try:
            bpf(BPF_PROG_QUERY, attr)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and capacity < 65536:
                capacity *= 8
                continue
            raise
        count = struct.unpack_from("=I", attr, 24)[0]
        return list(ids[:count])


def prog_fd_by_id(prog_id: int) -> int:
    attr = new_attr()
    struct.pack_into("=I", attr, 0, prog_id)
    return bpf(BPF_PROG_GET_FD_BY_ID, attr)


def prog_id_and_name(fd: int) -> tuple[int, str]:
    # struct bpf_prog_info: id at 4, name[16] at 64
    info = ctypes.create_string_buffer(80)
    attr = new_attr()
    struct.pack_into("=IIQ", attr, 0, fd, len(info), ctypes.addressof(info))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    prog_id = struct.unpack_from("=I", info, 4)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode("ascii", "replace")
    return prog_id, name


# what link_create() fails with where the kernel has no BPF links for cgroups (< 5.7)
_NO_CGROUP_LINKS = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.E2BIG)


class CgroupAttachments:
    """Programs attached to one cgroup for as long as this object is open.

    Each program is attached through a BPF link, whose only reference is a
    file descriptor of this process: the kernel detaches it when the process
    dies, kill -9 included, so a crashed guard leaves nothing attached. On a
    kernel without cgroup BPF links, and only where the caller allows it,
    the fallback is BPF_PROG_ATTACH with ALLOW_MULTI (never replacing
    another program), which outlives a crash until
    rome_guard.kernel.stale.cleanup_stale() at the next start;
    ``fallback_reason`` then says so. close() detaches everything. Never
    replaces or detaches a program it did not attach.
    """

    def __init__(self, cgroup_dir: str):
        self.cgroup_dir = cgroup_dir
        self._fd: int | None = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        self._links: list[int] = []
        self._attached: list[tuple[int, int]] = []  # (prog fd, attach type): fallback only
        self.fallback_reason: str | None = None

    def attach(self, prog_fd: int, attach_type: int, fallback: bool = True) -> None:
        """Attach prog_fd; OSError when neither a link nor (if allowed) the
        fallback can be made."""
        if self._fd is None:
            raise ValueError(f"attachments to {self.cgroup_dir} are closed")
        try:
            self._links.append(link_create(prog_fd, self._fd, attach_type))
            return
        except OSError as exc:
            if not fallback or exc.errno not in _NO_CGROUP_LINKS:
                raise
            self.fallback_reason = f"this kernel has no BPF links for cgroups ({exc.strerror})"
        prog_attach(self._fd, prog_fd, attach_type, BPF_F_ALLOW_MULTI)
        self._attached.append((prog_fd, attach_type))

    @property
    def active(self) -> bool:
        return bool(self._links or self._attached)

    def close(self) -> None:
        """Detach everything attached here. Idempotent."""
        for prog_fd, attach_type in self._attached:
            try:
                prog_detach(self._fd, prog_fd, attach_type)
            except OSError as exc:
                log.warning(
                    "detaching a rome-guard program from %s failed: %s", self.cgroup_dir, exc
                )
        self._attached = []
        for link_fd in self._links:
            with contextlib.suppress(OSError):
                os.close(link_fd)  # the kernel detaches the program with its last link fd
        self._links = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
