"""The GPU job registry: which processes may use which GPUs.

Two sources say a process may hold a GPU context:

- runtime registrations by job launchers (``rome-guard gpu register``, or
  ``rome_guard.register_current_process`` in training code): one JSON file
  per registration in ``<run_dir>/registrations/``, written atomically and
  picked up live by ``GpuRegistry.refresh()``;
- allowlist entries from the config (``gpu.allow``), matched on the
  process's exe, argv, user, cgroup, systemd unit, container, Kubernetes pod
  or Slurm job.

Registration is exact. Its identity is (pid, start time): a reused pid is not
registered, and a registered process's descendants are not registered unless
the registration says ``include_children``. An agent's tool call that starts
a miner inside a trainer's process tree is precisely what must stay
unregistered.

Registration files are trusted only when root owns them (or, with
``gpu.user_registration``, when their owner also owns the registered process),
so that a process cannot register itself by writing a file. The matching
(``covering``) is pure over what ``refresh()`` loaded; this module never kills,
alerts or talks to NVML.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rome_guard import procfs
from rome_guard.events import ProcessInfo, ProcessKey
from rome_guard.yamlsrc import Location, SourceError

log = logging.getLogger(__name__)

REGISTRATIONS = "registrations"
RUN_DIR_ENV = "ROME_GUARD_RUN_DIR"
FORMAT_VERSION = 1
MAX_FILE_BYTES = 64 * 1024
MAX_JOB_CHARS = 256
RACY_WINDOW_S = 1.0  # a directory changed this recently is reread even if its mtime looks old
DOCKER_ROOT = "/var/lib/docker"

SOURCE_REGISTRATION = "registration"
SOURCE_ALLOW = "allow"

_GPU_ID = re.compile(r"^(?:\d{1,4}|(?:GPU|MIG)-[A-Za-z0-9/_-]{1,120})$", re.IGNORECASE)
_CONTAINER_PREFIX = re.compile(r"^[0-9a-f]{12,64}$")
_POD_UID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class RegistrationError(Exception):
    """A registration request that cannot be honoured; the message says why."""


# --- GPUs and grants --------------------------------------------------------


@dataclass(frozen=True)
class GpuRef:
    """The GPU (or MIG device) a process was seen on."""

    index: int
    uuid: str
    mig: str | None = None


def parse_gpu_grants(value: str | Iterable[Any] | None) -> tuple[str, ...] | None:
    """ "0,1,GPU-...,MIG-..." (or a list of those) -> a normalised grant;
    None or an empty string means any GPU. Raises ValueError naming the
    item that is neither an NVML index nor a GPU/MIG UUID."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    grants = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not _GPU_ID.match(text):
            raise ValueError(
                f"{text!r} is not a GPU: use an NVML index (0, 1, ...) or a UUID (GPU-..., MIG-...)"
            )
        grants.append(text)
    return tuple(grants) or None


def gpu_granted(grants: tuple[str, ...] | None, gpu: GpuRef) -> bool:
    """A GPU index or GPU UUID grants the whole GPU, MIG devices included;
    a MIG UUID grants that MIG device only."""
    if grants is None:
        return True
    for grant in grants:
        if grant.isdigit():
            if int(grant) == gpu.index:
                return True
        elif grant.lower() == gpu.uuid.lower() or (gpu.mig and grant.lower() == gpu.mig.lower()):
            return True
    return False


# --- registrations ----------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    key: ProcessKey
    job: str | None = None
    gpus: tuple[str, ...] | None = None  # None: any GPU
    include_children: bool = False
    registered_at: float = 0.0
    owner_uid: int = 0  # who wrote the file (from the file system, not its content)
    path: str = ""

    @property
    def name(self) -> str:
        return self.job or f"pid {self.key}"

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "pid": self.key.pid,
            "start_time": self.key.start_time,
            "job": self.job,
            "gpus": list(self.gpus) if self.gpus is not None else None,
            "include_children": self.include_children,
            "registered_at": self.registered_at,
        }


def _registration_from_json(raw: Any, owner_uid: int, path: str) -> Registration:
    if not isinstance(raw, dict) or raw.get("version") != FORMAT_VERSION:
        raise ValueError(f"not a version {FORMAT_VERSION} registration")
    pid, start = raw.get("pid"), raw.get("start_time")
    if not (type(pid) is int and type(start) is int and pid > 0 and start >= 0):
        raise ValueError("pid and start_time must be non-negative integers")
    job = raw.get("job")
    if job is not None:
        _check_job(job)
    include = raw.get("include_children", False)
    if not isinstance(include, bool):
        raise ValueError("include_children must be true or false")
    at = raw.get("registered_at", 0.0)
    if isinstance(at, bool) or not isinstance(at, (int, float)):
        raise ValueError("registered_at must be a number")
    return Registration(
        key=ProcessKey(pid, start),
        job=job,
        gpus=parse_gpu_grants(raw.get("gpus")),
        include_children=include,
        registered_at=float(at),
        owner_uid=owner_uid,
        path=path,
    )


def _check_job(job: Any) -> None:
    if not isinstance(job, str) or not job or len(job) > MAX_JOB_CHARS:
        raise ValueError(f"a job name is 1 to {MAX_JOB_CHARS} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in job):
        raise ValueError("a job name must not contain control characters")


def run_dir_from_env(default: str) -> str:
    """ROME_GUARD_RUN_DIR when set (tests, unprivileged setups), else default."""
    return os.environ.get(RUN_DIR_ENV) or default


# --- allowlist entries (config gpu.allow) ------------------------------------

_ALLOW_MATCH_KEYS = (
    "exe",
    "argv",
    "user",
    "cgroup",
    "unit",
    "container",
    "container_name",
    "pod_uid",
    "slurm_job",
)
_ALLOW_KEYS = ("name", *_ALLOW_MATCH_KEYS, "gpus")


@dataclass(frozen=True)
class AllowEntry:
    """One ``gpu.allow`` entry. Every condition given must hold (AND); a
    condition left out matches anything. Conditions on the cgroup, unit,
    container, pod or Slurm job hold for everything inside it, an agent's
    tool calls included: prefer exact registrations for training jobs."""

    name: str
    exe: str | None = None  # glob on the resolved exe path
    argv: re.Pattern[str] | None = None  # regex searched in the space-joined argv
    user: str | None = None  # user name, or uid as digits
    cgroup: str | None = None  # glob on the cgroup v2 path
    unit: str | None = None  # glob on the systemd unit
    container: str | None = None  # container id or a prefix of at least 12 hex digits
    container_name: str | None = None  # glob on the Docker container name
    pod_uid: str | None = None  # Kubernetes pod UID (from the cgroup path)
    slurm_job: str | None = None  # glob on the Slurm job id (from the cgroup path)
    gpus: tuple[str, ...] | None = None
    location: str = ""  # file:line of the entry

    def matches(self, info: ProcessInfo, container_name: str | None = None) -> bool:
        att = info.attribution
        if self.exe is not None and not fnmatch.fnmatchcase(info.exe, self.exe):
            return False
        if self.argv is not None and not self.argv.search(" ".join(info.cmdline)):
            return False
        if self.user is not None and self.user not in (info.user, str(info.uid)):
            return False
        if self.cgroup is not None and not fnmatch.fnmatchcase(info.cgroup, self.cgroup):
            return False
        if self.unit is not None and not (att.unit and fnmatch.fnmatchcase(att.unit, self.unit)):
            return False
        if self.container is not None and not (
            att.container_id and att.container_id.startswith(self.container)
        ):
            return False
        if self.container_name is not None and not (
            container_name and fnmatch.fnmatchcase(container_name, self.container_name)
        ):
            return False
        if self.pod_uid is not None and att.pod_uid != self.pod_uid:
            return False
        return self.slurm_job is None or bool(
            att.slurm_job and fnmatch.fnmatchcase(att.slurm_job, self.slurm_job)
        )


def _where(raw: Any, key: str | None, fallback: Location) -> Location:
    where = getattr(raw, "where", None)
    return where(key) if where is not None else fallback


def parse_allow(entries: list[Any], source: str = "gpu.allow") -> list[AllowEntry]:
    """Validate ``gpu.allow`` (a list of mappings, with line numbers when
    they come from rome_guard.yamlsrc). Raises SourceError listing every
    mistake as file:line."""
    problems: list[tuple[Location, str]] = []
    result = []
    for number, raw in enumerate(entries):
        here = _where(raw, None, Location(source, 0))
        label = f"gpu.allow[{number}]"

        def bad(key: str | None, message: str, raw: Any = raw, here: Location = here) -> None:
            problems.append((_where(raw, key, here), message))

        if not isinstance(raw, dict):
            bad(None, f"{label} must be a mapping of conditions")
            continue
        unknown = [key for key in raw if key not in _ALLOW_KEYS]
        for key in unknown:
            bad(key, f"{label}: unknown key {key!r} (known: {', '.join(_ALLOW_KEYS)})")
        if not any(key in raw for key in _ALLOW_MATCH_KEYS):
            bad(None, f"{label} needs at least one of: {', '.join(_ALLOW_MATCH_KEYS)}")
            continue
        values: dict[str, Any] = {}
        for key in _ALLOW_KEYS:
            if key not in raw:
                continue
            value = raw[key]
            if key in ("user", "slurm_job") and type(value) is int:
                value = str(value)
            if key == "gpus":
                try:
                    if isinstance(value, (str, int)) and not isinstance(value, bool):
                        value = [value]
                    if not isinstance(value, list):
                        raise ValueError("gpus must be a list of GPU indices or UUIDs")
                    values[key] = parse_gpu_grants(value)
                except ValueError as exc:
                    bad(key, f"{label}.gpus: {exc}")
                continue
            if not isinstance(value, str) or not value:
                bad(key, f"{label}.{key} must be a non-empty string")
                continue
            if key == "argv":
                try:
                    values[key] = re.compile(value)
                except re.error as exc:
                    bad(key, f"{label}.argv is not a valid regular expression: {exc}")
                continue
            if key == "container" and not _CONTAINER_PREFIX.match(value):
                bad(key, f"{label}.container must be a container id (12 to 64 hex digits)")
                continue
            if key == "pod_uid":
                value = value.lower().replace("_", "-")
                if not _POD_UID.match(value):
                    bad(key, f"{label}.pod_uid must be a pod UID (8-4-4-4-12 hex digits)")
                    continue
            values[key] = value
        name = values.pop("name", None) or label
        result.append(AllowEntry(name=name, location=str(here), **values))
    if problems:
        raise SourceError(problems)
    return result


# --- coverage -----------------------------------------------------------------


@dataclass(frozen=True)
class Coverage:
    """Why a process may be on a GPU, or (granted=False) that it is a known
    job that was not granted this GPU."""

    source: str  # SOURCE_REGISTRATION | SOURCE_ALLOW
    name: str  # the job name or allowlist entry name
    granted: bool
    gpus: tuple[str, ...] | None  # the grant; None: any GPU
    holder: ProcessKey | None = None  # the registered process: itself or an ancestor
    inherited: bool = False  # via an ancestor registered with include_children


def docker_container_name(container_id: str, root: str = DOCKER_ROOT) -> str | None:
    """The Docker name of a container, from its config on disk (no API call)."""
    if not _CONTAINER_PREFIX.match(container_id) or len(container_id) != 64:
        return None
    try:
        with open(os.path.join(root, "containers", container_id, "config.v2.json"), "rb") as f:
            raw = json.loads(f.read(4 * 1024 * 1024))
    except (OSError, ValueError):
        return None
    name = raw.get("Name") if isinstance(raw, dict) else None
    return name.lstrip("/") if isinstance(name, str) and name else None


class GpuRegistry:
    """Registrations (live, from run_dir) and allowlist entries (from the
    config). ``refresh()`` is cheap when nothing changed: call it before
    each use in a long-running process."""

    def __init__(
        self,
        run_dir: str,
        allow: Iterable[AllowEntry] = (),
        *,
        user_registration: bool = False,
        container_names: Callable[[str], str | None] = docker_container_name,
        proc: str = procfs.PROC,
        allocations: Any = None,
        trust: str = "process",
    ):
        self.run_dir = run_dir
        self.directory = os.path.join(run_dir, REGISTRATIONS)
        self.allow = list(allow)
        self.user_registration = user_registration
        self._container_names = container_names
        self._names_cache: dict[str, str | None] = {}
        self._proc = proc
        self._stamp: tuple[int, int] | None = None
        self._scanned_at = 0.0
        self._files: dict[str, tuple[tuple[int, int, int], Registration | None]] = {}
        self._by_key: dict[ProcessKey, list[Registration]] = {}
        self._rejected: set[tuple[str, int]] = set()
        # the schedulers' word (rome_guard.gpu.allocations.Allocations), run by
        # whoever built this registry: the daemon's GpuWatch, `gpu list`
        self.allocations: Any = allocations
        self.trust = trust
        self._unreadable_since: float | None = None  # the directory could not be read

    @classmethod
    def from_config(cls, config: Any, allocations: Any = None) -> GpuRegistry:
        """From a rome_guard.config.Config, judging with allocations (the
        schedulers' sources) when given; raises SourceError for a bad
        gpu.allow."""
        return cls(
            run_dir_from_env(config.run_dir),
            parse_allow(config.gpu.allow, config.source or "gpu.allow"),
            user_registration=bool(getattr(config.gpu, "user_registration", False)),
            allocations=allocations,
            trust=config.gpu.trust,
        )

    # --- reading --------------------------------------------------------

    def registrations(self) -> list[Registration]:
        return sorted((r for regs in self._by_key.values() for r in regs), key=lambda r: r.key)

    def refresh(self) -> bool:
        """Reread the registrations if the directory changed. True if it did."""
        try:
            st = os.stat(self.directory)
        except FileNotFoundError:
            changed = bool(self._by_key)
            self._files, self._by_key, self._stamp = {}, {}, None
            return changed
        except OSError as exc:
            self._unreadable(exc)
            return False
        stamp = (st.st_ino, st.st_mtime_ns)
        settled = self._scanned_at - st.st_mtime_ns / 1e9 > RACY_WINDOW_S
        if stamp == self._stamp and settled:
            return False
        self._scanned_at = time.time()
        self._stamp = stamp
        return self._rescan()

    def _rescan(self) -> bool:
        try:
            names = [n for n in os.listdir(self.directory) if n.endswith(".json")]
        except OSError as exc:
            self._unreadable(exc)
            return False
        self._unreadable_since = None
        files: dict[str, tuple[tuple[int, int, int], Registration | None]] = {}
        changed = set(names) != set(self._files)
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
            old = self._files.get(name)
            if old is not None and old[0] == ident:
                files[name] = old
                continue
            changed = True
            files[name] = (ident, self._load(path))
        self._files = files
        by_key: dict[ProcessKey, list[Registration]] = {}
        for _, reg in files.values():
            if reg is not None:
                by_key.setdefault(reg.key, []).append(reg)
        self._by_key = by_key
        return changed

    def _unreadable(self, exc: OSError) -> None:
        """The registrations cannot be read: keep the ones already known (a
        registered job must not turn into a stray because a directory broke),
        say so once, and retry at the next refresh."""
        self._stamp = None  # rescan as soon as it is readable again
        if self._unreadable_since is None:
            self._unreadable_since = time.time()
            log.error(
                "cannot read the GPU job registry %s (%s): keeping the %d registration(s) "
                "already known; jobs registered from now on are not seen until it is readable",
                self.directory,
                exc.strerror or exc,
                sum(len(regs) for regs in self._by_key.values()),
            )

    def _load(self, path: str) -> Registration | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                self._reject(path, 0, f"cannot open: {exc.strerror}")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
                self._reject(path, st.st_mtime_ns, "not a regular file of at most 64 KiB")
                return None
            if st.st_uid != 0 and not self.user_registration:
                self._reject(
                    path,
                    st.st_mtime_ns,
                    f"owned by uid {st.st_uid}, not root (gpu.user_registration is off)",
                )
                return None
            raw = os.read(fd, MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        try:
            return _registration_from_json(json.loads(raw), st.st_uid, path)
        except ValueError as exc:
            self._reject(path, st.st_mtime_ns, str(exc))
            return None

    def _reject(self, path: str, version: int, why: str) -> None:
        if (path, version) not in self._rejected:
            self._rejected.add((path, version))
            log.warning("ignoring GPU registration %s: %s", path, why)

    # --- matching (pure over what refresh() loaded) ------------------------

    def _trusted(self, reg: Registration, holder: ProcessInfo) -> bool:
        return reg.owner_uid == 0 or reg.owner_uid == holder.uid

    def registered(self, info: ProcessInfo) -> list[Registration]:
        """Registrations of exactly this process (same pid and start time)."""
        return [r for r in self._by_key.get(info.key, ()) if self._trusted(r, info)]

    def registered_ancestor(self, lineage: list[ProcessInfo]) -> tuple[Registration, bool] | None:
        """The nearest registered ancestor and whether it covers its descendants."""
        for ancestor in lineage:
            regs = self.registered(ancestor)
            if regs:
                covering = [r for r in regs if r.include_children]
                return (covering or regs)[0], bool(covering)
        return None

    def container_name(self, container_id: str | None) -> str | None:
        if not container_id or not any(e.container_name for e in self.allow):
            return None
        if container_id not in self._names_cache:
            if len(self._names_cache) > 4096:
                self._names_cache.clear()
            self._names_cache[container_id] = self._container_names(container_id)
        return self._names_cache[container_id]

    def covering(
        self, info: ProcessInfo, lineage: list[ProcessInfo], gpu: GpuRef
    ) -> Coverage | None:
        """Which registration or allowlist entry lets info use gpu. A
        coverage with granted=False means the process is known but was not
        granted this GPU; None means nothing covers it at all."""
        found: list[Coverage] = []
        for reg in self.registered(info):
            found.append(self._coverage(reg, gpu, inherited=False))
        for ancestor in lineage:
            for reg in self.registered(ancestor):
                if reg.include_children:
                    found.append(self._coverage(reg, gpu, inherited=True))
        name = self.container_name(info.attribution.container_id)
        for entry in self.allow:
            if entry.matches(info, name):
                granted = gpu_granted(entry.gpus, gpu)
                found.append(Coverage(SOURCE_ALLOW, entry.name, granted, entry.gpus))
        for coverage in found:
            if coverage.granted:
                return coverage
        return found[0] if found else None

    @staticmethod
    def _coverage(reg: Registration, gpu: GpuRef, inherited: bool) -> Coverage:
        return Coverage(
            SOURCE_REGISTRATION,
            reg.name,
            gpu_granted(reg.gpus, gpu),
            reg.gpus,
            holder=reg.key,
            inherited=inherited,
        )

    # --- writing ------------------------------------------------------------

    def register(
        self,
        pid: int,
        gpus: str | Iterable[Any] | None = None,
        job: str | None = None,
        include_children: bool = False,
    ) -> Registration:
        """Register the process that has pid now, identified by its start
        time. Raises RegistrationError if it does not exist or the request is
        malformed, PermissionError if run_dir is not writable."""
        if job is not None:
            try:
                _check_job(job)
            except ValueError as exc:
                raise RegistrationError(str(exc)) from None
        try:
            grants = parse_gpu_grants(gpus)
        except ValueError as exc:
            raise RegistrationError(str(exc)) from None
        start = procfs.start_time(pid, self._proc) if pid > 0 else None
        if start is None:
            raise RegistrationError(f"no process with pid {pid}")
        reg = Registration(
            key=ProcessKey(pid, start),
            job=job,
            gpus=grants,
            include_children=include_children,
            registered_at=time.time(),
            owner_uid=os.geteuid(),
        )
        self._write(reg)
        if procfs.start_time(pid, self._proc) != start:
            # it exited (and the pid may be someone else's) while we wrote
            self._remove(self._file_path(reg.key))
            raise RegistrationError(f"process {pid} exited during registration")
        self.refresh()
        return reg

    def unregister(self, pid: int | None = None, job: str | None = None) -> list[Registration]:
        """Remove the registrations of pid (any start time) and/or of job."""
        if pid is None and job is None:
            raise RegistrationError("say which registrations: a pid or a job")
        self._stamp = None
        self.refresh()
        removed = []
        for reg in self.registrations():
            by_pid = pid is not None and reg.key.pid == pid
            wanted = by_pid or (job is not None and reg.job == job)
            if wanted and self._remove(reg.path):
                removed.append(reg)
        self._stamp = None
        self.refresh()
        return removed

    def prune(self) -> list[Registration]:
        """Remove registrations whose process has exited (or whose pid now
        belongs to another process)."""
        self.refresh()
        gone = [
            r
            for r in self.registrations()
            if procfs.start_time(r.key.pid, self._proc) != r.key.start_time
        ]
        for reg in gone:
            self._remove(reg.path)
        if gone:
            self._stamp = None
            self.refresh()
        return gone

    def _file_path(self, key: ProcessKey) -> str:
        return os.path.join(self.directory, f"{key.pid}-{key.start_time}.json")

    def _ensure_directory(self) -> None:
        os.makedirs(self.run_dir, 0o755, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory, 0o755)
        for path in (self.run_dir, self.directory):
            st = os.stat(path)
            if not stat.S_ISDIR(st.st_mode):
                raise RegistrationError(f"{path} is not a directory")

    def _write(self, reg: Registration) -> None:
        self._ensure_directory()
        target = self._file_path(reg.key)
        tmp = f"{target}.{os.getpid()}.tmp"
        data = json.dumps(reg.to_json(), sort_keys=True).encode() + b"\n"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, target)

    def _remove(self, path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
