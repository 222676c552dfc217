"""The one loader of rome-guard's BPF objects: compile, memlock, programs
on tracepoints and on cgroups (links, pins), ring buffers, and close().

Every BPF object the daemon runs (the sensor, the wire programs, the
prevention programs) is a ``BpfObject``: compiled once by ``compile()``,
its programs attached through it, its rings opened through it, and
everything it holds detached, unpinned and freed by its ``close()``, also
when start-up fails half-way. Once everything is loaded,
``release_compiler_memory()`` has every live object give back what bcc
keeps of its compile (``BpfObject.release_compiler()``: the LLVM module,
~60 MiB an object) and the process give back the compiler's pages; the
maps stay usable, nothing can be loaded into a released object.

Cgroup programs go through ``bpfsys.CgroupAttachments`` (BPF links: the
kernel detaches them when the daemon dies); a program or map that must be
found by the next start is pinned under this daemon's owner directory
(``stale.PIN_ROOT/<pid>-<start time>/``), which ``stale.cleanup_stale()``
removes once its owner is dead.

This module never decides what a program does, which lists it holds, or
what its records mean: the sensors, rome_guard.respond.prevent and
rome_guard.layout do. It never leaves a program attached or a pin behind
after ``close()``, and never removes a pin it did not make.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes as ct
import os
import resource
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Generic, Iterable, TypeVar

from rome_guard.kernel import bpfsys, stale

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"

Record = TypeVar("Record")


class LoadError(Exception):
    """A BPF object cannot be compiled or loaded here; the message says why."""


def raise_memlock() -> None:
    """Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
    to the memory cgroup, where this changes nothing."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )


# the compiler's libraries: Debian's libbcc links LLVM and clang as shared
# libraries, other builds link them into libbcc itself
COMPILER_LIBRARIES = ("libLLVM", "libclang", "libbcc")
_MADV_DONTNEED = 4


def release_compiler_memory(smaps: str = "/proc/self/smaps") -> None:
    """After the last compile: give back what compiling left resident.
    Every live BpfObject frees its compiler module (release_compiler());
    the heap LLVM freed goes back to the system (malloc_trim), and the
    compiler's code pages, read once per compile, leave this process's
    resident set (MADV_DONTNEED on its mappings that are read-only and hold
    no page of their own: a later compile reads them in again from the page
    cache). Together these were two thirds of an idle daemon's RSS. Best
    effort: nothing here can fail the daemon."""
    for obj in list(_LIVE):
        obj.release_compiler()
    libc = ct.CDLL(None, use_errno=True)
    with contextlib.suppress(AttributeError):
        libc.malloc_trim(0)  # glibc only
    libc.madvise.argtypes = [ct.c_void_p, ct.c_size_t, ct.c_int]
    for start, end in _clean_compiler_mappings(smaps):
        libc.madvise(start, end - start, _MADV_DONTNEED)


def _clean_compiler_mappings(smaps: str) -> list[tuple[int, int]]:
    """Address ranges of the compiler libraries' mappings that are not
    writable and have no anonymous (copied-on-write, e.g. relocated) page:
    dropping one of those would lose what was written into it."""
    found: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    try:
        with open(smaps) as f:
            for line in f:
                fields = line.split()
                if not fields:
                    continue
                if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                    path = fields[5] if len(fields) > 5 else ""
                    wanted = "w" not in fields[1] and any(
                        name in os.path.basename(path) for name in COMPILER_LIBRARIES
                    )
                    start, _, end = fields[0].partition("-")
                    current = (int(start, 16), int(end, 16)) if wanted else None
                elif fields[0] == "Anonymous:" and current is not None:
                    if int(fields[1]) == 0:
                        found.append(current)
                    current = None
    except (OSError, ValueError):
        return []
    return found


def bcc_bpf() -> Any:
    """bcc's BPF class; LoadError when bcc is not importable."""
    try:
        from bcc import BPF
    except ImportError as exc:
        raise LoadError(f"bcc (python3-bpfcc) is not importable: {exc}") from exc
    return BPF


class Ring(Generic[Record]):
    """One ring buffer of a BpfObject: its records decoded as they are
    consumed, kept until take(); records that do not decode are counted."""

    def __init__(
        self,
        name: str,
        decode: Callable[[bytes], Record],
        malformed: tuple[type[Exception], ...],
    ):
        self.name = name
        self._decode = decode
        self._malformed_types = malformed
        self._records: list[Record] = []
        self.malformed = 0

    def on_record(self, _ctx: Any, data: int, size: int) -> int:
        try:
            self._records.append(self._decode(ct.string_at(data, size)))
        except self._malformed_types:
            self.malformed += 1
        return 0

    def take(self) -> list[Record]:
        records, self._records = self._records, []
        return records


# every BpfObject not yet closed: release_compiler_memory() frees their compilers
_LIVE: weakref.WeakSet[BpfObject] = weakref.WeakSet()


class BpfObject:
    """One compiled BPF object of this daemon and everything hung on it."""

    def __init__(self, bpf: Any, source: str, pin_root: str = stale.PIN_ROOT):
        self.bpf = bpf
        self.source = source
        self._pin_root = pin_root
        self._owner_dir: str | None = None
        self._owner_dir_failed = False
        self._pins: list[str] = []
        self._cgroups: dict[str, bpfsys.CgroupAttachments] = {}
        self._rings: list[Ring[Any]] = []
        self._ring_tables: list[str] = []
        self._map_fds: list[int] = []  # duplicated by release_compiler(), closed by close()
        self.compiler_released = False
        self.degraded: list[str] = []  # what this object cannot do here, for the operator
        _LIVE.add(self)

    @classmethod
    def compile(
        cls,
        source: Path,
        *,
        text: str | None = None,
        cflags: Iterable[str] = (),
        pin_root: str = stale.PIN_ROOT,
    ) -> BpfObject:
        """Compile source (or text, the source as one string, named by
        source in messages) with BPF_DIR on the include path."""
        BPF = bcc_bpf()
        raise_memlock()
        flags = [f"-I{BPF_DIR}", *cflags]
        try:
            if text is None:
                bpf = BPF(src_file=os.fsencode(source), cflags=flags)
            else:
                bpf = BPF(text=text.encode(), cflags=flags)
        except Exception as exc:  # bcc raises bare Exception; details went to stderr
            raise LoadError(f"compiling {source} failed: {exc}") from exc
        return cls(bpf, str(source), pin_root)

    def __getitem__(self, name: str) -> Any:
        key = name.encode()
        if self.compiler_released and key not in self.bpf.tables:
            # bcc would ask the freed module (a NULL pointer into libbcc)
            raise KeyError(f"{self.source} has no table {name} bcc can read")
        return self.bpf[key]

    def release_compiler(self) -> None:
        """Free what bcc keeps of this object's compile (its BPFModule: the
        LLVM context and module, the rewritten source, the table
        descriptions; ~60 MiB), keeping every map usable: each table is
        looked up first (its ctypes key and leaf come from the module) and
        its fd duplicated (the module closes the fds it made; the loaded
        programs hold their maps in the kernel either way). From then on
        nothing more can be loaded into this object (LoadError), so the
        daemon calls it (through release_compiler_memory) once everything
        is attached and before it watches the rings' fds. Best effort and
        idempotent: an object that cannot duplicate its fds keeps its module."""
        bpf = self.bpf
        module = getattr(bpf, "module", None)
        if self.compiler_released or not module:
            return
        from bcc.libbcc import lib

        lib.bpf_num_tables.restype = ct.c_size_t
        lib.bpf_num_tables.argtypes = [ct.c_void_p]
        lib.bpf_table_name.restype = ct.c_char_p
        lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
        for index in range(lib.bpf_num_tables(module)):
            name = lib.bpf_table_name(module, index)
            # a kind bcc's Python has no class for (socket storage) is not
            # readable from here anyway
            with contextlib.suppress(Exception):
                bpf[name]
        tables = list(bpf.tables.values())
        fds: list[int] = []
        try:
            for table in tables:
                fds.append(os.dup(table.map_fd))
        except OSError:
            for fd in fds:
                os.close(fd)
            return
        for table, fd in zip(tables, fds):
            table.map_fd = fd
        self._map_fds = fds
        lib.bpf_module_destroy(module)
        bpf.module = None
        self.compiler_released = True

    def _loadable(self, what: str) -> None:
        if self.compiler_released:
            raise LoadError(
                f"cannot load {what} from {self.source}: its compiler was released "
                "(kernel.loader.release_compiler_memory runs after the last load)"
            )

    # --- rings -------------------------------------------------------------------

    def open_ring(
        self,
        table: str,
        decode: Callable[[bytes], Record],
        malformed: tuple[type[Exception], ...],
        name: str | None = None,
    ) -> Ring[Record]:
        """Records of one BPF_MAP_TYPE_RINGBUF map; poll()/consume() drain
        every ring of this object in the order they were opened."""
        ring: Ring[Record] = Ring(name or table, decode, malformed)
        self[table].open_ring_buffer(ring.on_record)
        self._rings.append(ring)
        self._ring_tables.append(table)
        return ring

    def ring_fds(self) -> list[int]:
        """The map fds of every open ring, for kernel.poller.RingPoller
        (after release_compiler(): the duplicates that stay open)."""
        if self.bpf is None:
            return []
        return [self[table].map_fd for table in self._ring_tables]

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for a record in any ring, then drain them
        (0: drain without waiting; kernel.poller.RingPoller does the waiting)."""
        if not self._rings:
            return
        if timeout_ms == 0:
            self.bpf.ring_buffer_consume()
        else:
            self.bpf.ring_buffer_poll(timeout_ms)

    def consume(self) -> None:
        """Drain every ring without waiting (records not worth a wakeup)."""
        if self._rings:
            self.bpf.ring_buffer_consume()

    # --- programs ----------------------------------------------------------------

    def attach_tracepoint(self, tracepoint: str, program: str) -> None:
        self._loadable(program)
        try:
            self.bpf.attach_tracepoint(tp=tracepoint.encode(), fn_name=program.encode())
        except Exception as exc:
            raise LoadError(
                f"attaching {program} to {tracepoint} failed (verifier log on stderr): {exc}"
            ) from exc

    def attach_raw_tracepoint(self, tracepoint: str, program: str) -> None:
        """program on the raw tracepoint named like tracepoint's event."""
        event = tracepoint.split(":")[-1]
        self._loadable(program)
        try:
            self.bpf.attach_raw_tracepoint(tp=event.encode(), fn_name=program.encode())
        except Exception as exc:
            raise LoadError(
                f"attaching {program} to raw tracepoint {event} failed (verifier log on "
                f"stderr): {exc}"
            ) from exc

    def load_func(self, program: str, prog_type: int, attach_type: int | None = None) -> Any:
        self._loadable(program)
        try:
            if attach_type is None:
                return self.bpf.load_func(program.encode(), prog_type)
            return self.bpf.load_func(program.encode(), prog_type, None, attach_type)
        except Exception as exc:
            raise LoadError(f"loading {program} failed (verifier log on stderr): {exc}") from exc

    def attach_to_cgroup(
        self,
        cgroup_dir: str,
        program: str,
        prog_type: int,
        attach_type: int,
        *,
        pin: str | None = None,
        fallback: bool = True,
    ) -> None:
        """Load program and attach it to cgroup_dir through a BPF link (or,
        where fallback allows it and the kernel has no cgroup links, a
        plain attachment; fallback_reason() then says so). pin: the name
        it is pinned under in the owner directory, so that another
        rome-guard knows it has a live owner. OSError when it cannot be
        attached."""
        fn = self.load_func(program, prog_type, attach_type)
        hooks = self._cgroups.get(cgroup_dir)
        if hooks is None:
            hooks = self._cgroups[cgroup_dir] = bpfsys.CgroupAttachments(cgroup_dir)
        if pin is not None:
            self.pin(fn.fd, pin)
        hooks.attach(fn.fd, attach_type, fallback=fallback)

    def detach_cgroups(self) -> None:
        """Detach every cgroup program of this object (the rest stays)."""
        for hooks in self._cgroups.values():
            hooks.close()
        self._cgroups.clear()

    @property
    def cgroup_attached(self) -> bool:
        return any(hooks.active for hooks in self._cgroups.values())

    def fallback_reason(self) -> str | None:
        """Why some cgroup program is attached without a link (it would
        outlive a crash until the next start), or None."""
        for hooks in self._cgroups.values():
            if hooks.fallback_reason:
                return hooks.fallback_reason
        return None

    def program_ids(self) -> dict[str, int]:
        """Kernel id of each loaded program by function name, for
        `bpftool prog show id N` and run-time statistics."""
        return {
            os.fsdecode(name): bpfsys.prog_id_and_name(fn.fd)[0]
            for name, fn in self.bpf.funcs.items()
        }

    # --- pins --------------------------------------------------------------------

    def _ensure_owner_dir(self) -> str | None:
        if self._owner_dir is None and not self._owner_dir_failed:
            try:
                bpfsys.ensure_bpffs()
                owner_dir = os.path.join(self._pin_root, stale.owner_name())
                os.makedirs(owner_dir, exist_ok=True)
                self._owner_dir = owner_dir
            except OSError as exc:
                self._owner_dir_failed = True
                self.degraded.append(
                    f"cannot pin under {self._pin_root}: {exc}; after a crash its programs "
                    "are found by name only"
                )
        return self._owner_dir

    def pin(self, fd: int, name: str) -> None:
        """Pin a program or map fd under the owner directory (skipped, and
        said in degraded, where bpffs cannot be used)."""
        owner_dir = self._ensure_owner_dir()
        if owner_dir is None:
            return
        path = os.path.join(owner_dir, name)
        bpfsys.obj_pin(fd, path)
        self._pins.append(path)

    def pin_map(self, table: str) -> None:
        self.pin(self[table].map_fd, table)

    # --- the end -----------------------------------------------------------------

    def close(self) -> None:
        """Detach every program, unpin what this object pinned and free
        every map. Idempotent."""
        self.detach_cgroups()
        for path in self._pins:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._pins = []
        if self._owner_dir:
            with contextlib.suppress(OSError):  # another object of this daemon may pin there
                os.rmdir(self._owner_dir)
            self._owner_dir = None
        bpf, self.bpf = self.bpf, None
        if bpf is not None:
            _detach_tracepoints(bpf)
            bpf.cleanup()  # tracepoints, program and map fds
            atexit.unregister(bpf.cleanup)  # bcc's own, which would run it again at exit
        for fd in self._map_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._map_fds = []
        self._rings.clear()
        self._ring_tables.clear()
        _LIVE.discard(self)


def _detach_tracepoints(bpf: Any) -> None:
    """Detach every tracepoint at once. Each detach waits for an RCU grace
    period in the kernel (~70 ms here); one after the other, 26 of them took
    1.8 s and broke the daemon's 2 s shutdown budget. The waits overlap when
    the detaches run on threads (ctypes releases the GIL)."""
    names = list(getattr(bpf, "tracepoint_fds", {}))
    if len(names) < 2:
        return
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        list(pool.map(bpf.detach_tracepoint, names))
