"""Capability probe: try each privileged operation rome-guard performs and
print one JSON object {operation: "ok" | "error text"}.

Run by tests/ops/test_capabilities.py under capsh with a chosen capability
set, optionally under seccomp filters that emulate the unit's
MemoryDenyWriteExecute= and SystemCallFilter=. Each operation is attempted
independently, so one run shows everything a set of capabilities allows.
Everything it creates (programs, attachments, filters, pins) is removed
before it exits.

usage: cap_probe.py --victim PID --cgroup DIR --ifname IF --pin DIR
                    [--mdwe] [--syscalls FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SYS_BPF = 321  # x86_64
SYS_PIDFD_OPEN = 434
SYS_PIDFD_SEND_SIGNAL = 424
BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_GET_FD_BY_ID = 6, 7, 13
BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 15, 16
BPF_LINK_CREATE = 28

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def syscall(*args) -> int:
    ret = libc.syscall(*[ctypes.c_long(a) if isinstance(a, int) else a for a in args])
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def bpf(cmd: int, attr) -> int:
    return syscall(SYS_BPF, cmd, attr, len(attr))


# --- seccomp emulation of the unit's filters (libseccomp through ctypes) ------


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64),
                ("b", ctypes.c_uint64)]  # fmt: skip


def _libseccomp():
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]  # fmt: skip
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    return lib


ALLOW, EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
MASKED_EQ = 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
PR_SET_NO_NEW_PRIVS = 38


def install_mdwe() -> None:
    """systemd 252's MemoryDenyWriteExecute=yes: no W+X mmap, no mprotect or
    pkey_mprotect to executable, no executable shmat."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(ALLOW)
    for name, arg, mask in (("mmap", 2, PROT_WRITE | PROT_EXEC), ("mprotect", 2, PROT_EXEC),
                            ("pkey_mprotect", 2, PROT_EXEC), ("shmat", 2, SHM_EXEC)):  # fmt: skip
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        cmp = (_ArgCmp * 1)(_ArgCmp(arg, MASKED_EQ, mask, mask))
        if lib.seccomp_rule_add_array(ctx, EPERM, nr, 1, cmp) != 0:
            raise OSError(f"seccomp rule for {name}")
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load (mdwe)")


def install_allowlist(path: str) -> None:
    """SystemCallFilter= as an allow list: every other system call fails."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(EPERM)
    with open(path) as f:
        names = [line.strip() for line in f if line.strip()]
    for name in names:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            continue  # not a system call on this architecture
        if lib.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) != 0:
            raise OSError(f"seccomp allow {name}")
    if lib.seccomp_load(ctx) != 0:
        raise OSError("seccomp_load (allow list)")


# --- the operations -----------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--victim", type=int, required=True)  # a process of another user
    parser.add_argument("--cgroup", required=True)  # an empty cgroup2 directory
    parser.add_argument("--ifname", required=True)  # a dummy interface
    parser.add_argument("--pin", required=True)  # a path on bpffs to pin under
    parser.add_argument("--mdwe", action="store_true")
    parser.add_argument("--syscalls")
    args = parser.parse_args()
    results: dict[str, str] = {}

    def attempt(name: str, operation) -> tuple[bool, object]:
        try:
            value = operation()
        except Exception as exc:  # noqa: BLE001 - every failure is a result here
            text = str(exc).strip().splitlines()
            results[name] = f"{type(exc).__name__}: {text[0] if text else ''}"
            return False, None
        results[name] = "ok"
        return True, value

    if args.mdwe or args.syscalls:
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # NoNewPrivileges=yes
    if args.mdwe:
        install_mdwe()
    if args.syscalls:
        install_allowlist(args.syscalls)

    victim = args.victim
    attempt("kill_other_user", lambda: os.kill(victim, 0))
    attempt("pidfd_signal_other_user", lambda: pidfd_signal(victim))
    attempt("read_environ_other_user", lambda: read(f"/proc/{victim}/environ"))
    attempt("readlink_exe_other_user", lambda: os.readlink(f"/proc/{victim}/exe"))
    attempt("list_fds_other_user", lambda: os.listdir(f"/proc/{victim}/fd"))
    attempt("readlink_fd_other_user", lambda: os.readlink(f"/proc/{victim}/fd/0"))
    attempt("write_cgroup_kill", lambda: write(os.path.join(args.cgroup, "cgroup.kill"), b"1"))
    attempt("raise_memlock", lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (-1, -1)))
    # how sensors/sshconfig.py runs ssh -G as a client's user
    attempt("spawn_as_other_user", lambda: spawn_as(65534))

    from bcc import BPF

    source = os.path.join(HERE, "cap_probe.c")
    ok, b = attempt("bpf_compile_and_attach_tracepoint", lambda: BPF(src_file=source))
    if ok:
        probe_bpf(b, args, attempt, results)
    print(json.dumps(results))


def probe_bpf(b, args, attempt, results: dict[str, str]) -> None:
    from bcc import BPF, BPFAttachType

    seen = []
    attempt("ring_buffer_callback", lambda: b["events"].open_ring_buffer(
        lambda ctx, data, size: seen.append(size)))  # fmt: skip
    pid = os.fork()
    if pid == 0:
        os.execv("/bin/true", ["true"])
    os.waitpid(pid, 0)
    for _ in range(50):
        if seen:
            break
        b.ring_buffer_poll(100)
    results["ring_buffer_event"] = "ok" if seen else "no event arrived"

    connect4 = BPFAttachType.CGROUP_INET4_CONNECT
    ok, fn = attempt("load_cgroup_connect_filter", lambda: b.load_func(
        "probe_connect", BPF.CGROUP_SOCK_ADDR, None, connect4))  # fmt: skip
    if ok:
        cg = os.open(args.cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            ok, _ = attempt("attach_cgroup_connect_filter",
                            lambda: BPF.attach_func(fn, cg, connect4))  # fmt: skip
            if ok:
                ok, ids = attempt("query_cgroup_programs", lambda: prog_query(cg, connect4))
                if ok and ids:
                    attempt("prog_fd_by_id", lambda: os.close(prog_fd_by_id(ids[0])))
                BPF.detach_func(fn, cg, connect4)
            # the crash policy's attachment: a link that dies with its fd
            attempt(
                "link_cgroup_connect_filter", lambda: os.close(link_create(fn.fd, cg, connect4))
            )
        finally:
            os.close(cg)
        pin = os.path.join(args.pin, "probe_connect")
        ok, _ = attempt("pin_program", lambda: pin_obj(fn.fd, pin))
        if ok:
            attempt("get_pinned_program", lambda: os.close(obj_get(pin)))
            os.unlink(pin)

    ok, cls = attempt("load_tc_classifier", lambda: b.load_func("probe_egress", BPF.SCHED_CLS))
    if ok:
        attempt("attach_tc_egress_filter", lambda: tc_attach_detach(args.ifname, cls))
    b.cleanup()


def spawn_as(uid: int) -> None:
    subprocess.run(["true"], user=uid, group=uid, extra_groups=[], check=True, timeout=30)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def pidfd_signal(pid: int) -> None:
    fd = syscall(SYS_PIDFD_OPEN, pid, 0)
    try:
        syscall(SYS_PIDFD_SEND_SIGNAL, fd, 0, None, 0)
    finally:
        os.close(fd)


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    ids = (ctypes.c_uint32 * 64)()
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIIIQI", attr, 0, target_fd, attach_type, 0, 0, ctypes.addressof(ids), 64)
    bpf(BPF_PROG_QUERY, attr)
    return list(ids[: struct.unpack_from("=I", attr, 24)[0]])


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIII", attr, 0, prog_fd, target_fd, int(attach_type), 0)
    return bpf(BPF_LINK_CREATE, attr)


def prog_fd_by_id(prog_id: int) -> int:
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=I", attr, 0, prog_id)
    return bpf(BPF_PROG_GET_FD_BY_ID, attr)


def pin_obj(fd: int, path: str) -> None:
    attr, name = ctypes.create_string_buffer(128), ctypes.create_string_buffer(os.fsencode(path))
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), fd)
    bpf(BPF_OBJ_PIN, attr)


def obj_get(path: str) -> int:
    attr, name = ctypes.create_string_buffer(128), ctypes.create_string_buffer(os.fsencode(path))
    struct.pack_into("=QI", attr, 0, ctypes.addressof(name), 0)
    return bpf(BPF_OBJ_GET, attr)


def tc_attach_detach(ifname: str, fn) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        index = ip.link_lookup(ifname=ifname)[0]
        ip.tc("add", "clsact", index)
        try:
            ip.tc("add-filter", "bpf", index, ":1", fd=fn.fd, name=fn.name,
                  parent="ffff:fff3", classid=1, direct_action=True)  # fmt: skip
        finally:
            ip.tc("del", "clsact", index)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(2)
