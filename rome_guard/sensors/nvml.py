"""The NVML sensor: which processes hold contexts on which GPUs, right now.

It initialises NVML once, keeps every device handle (full GPUs and MIG
devices) and polls them: compute and graphics processes with their memory,
per-process SM utilization where the GPU supports it, power draw and, where
permitted, accounting records of processes that started and ended between
two polls. It produces ``rome_guard.events.GpuProcess`` records inside a
``GpuSnapshot``; it decides nothing about whether a process may be there.

NVML failing is a normal condition, never a crash: no library or no driver
turns GPU features off with one log line; a GPU lost mid-run, a driver
reload or a function an older driver lacks is logged, counted per
(GPU, call, error) and retried with back-off. This module must never raise
out of ``poll()`` or ``run()`` because of NVML, never change a GPU setting
other than accounting mode (and it restores that on close), and never hold
the library open for a one-shot caller after ``close()``.

NVML reports host pids: the daemon must run in the host PID namespace.
GPU indices are NVML's (PCI order, as nvidia-smi shows them), not CUDA's.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

from rome_guard.events import FinishedGpuProcess, GpuDevice, GpuProcess, GpuSnapshot, MigDevice

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 300.0  # longest wait between retries of a failing GPU or driver
MIG_REFRESH_S = 60.0  # MIG instances can be reconfigured at run time

# How one NVML error is handled (the names are pynvml's NVML_ERROR_* less the prefix).
_LIBRARY_ERRORS = {"UNINITIALIZED", "DRIVER_NOT_LOADED", "LIB_RM_VERSION_MISMATCH"}
_FEATURE_ERRORS = {"NOT_SUPPORTED", "FUNCTION_NOT_FOUND", "NO_PERMISSION"}
_NO_VALUE_ERRORS = frozenset({"NOT_FOUND", "NO_DATA", "NO_SAMPLES", "INSUFFICIENT_SIZE"})
_EMPTY_SLOT = frozenset({"NOT_FOUND", "INVALID_ARGUMENT"})
# anything else (GPU_IS_LOST, RESET_REQUIRED, UNKNOWN, TIMEOUT, ...) puts the GPU into back-off


@dataclass
class _Backoff:
    delay: float
    initial: float
    retry_at: float = 0.0
    failures: int = 0

    def fail(self, now: float) -> None:
        self.failures += 1
        self.retry_at = now + self.delay
        self.delay = min(self.delay * 2, MAX_BACKOFF_S)

    def succeed(self) -> None:
        self.failures = 0
        self.delay = self.initial
        self.retry_at = 0.0

    def due(self, now: float) -> bool:
        return now >= self.retry_at

    @property
    def failing(self) -> bool:
        return self.failures > 0


@dataclass
class _Mig:
    info: MigDevice
    handle: Any


@dataclass
class _Device:
    index: int
    handle: Any
    uuid: str
    name: str
    backoff: _Backoff
    mig_enabled: bool = False
    migs: list[_Mig] = field(default_factory=list)
    mig_read_at: float = 0.0
    off: set[str] = field(default_factory=set)  # features this GPU or driver lacks
    compute_call: str = "nvmlDeviceGetComputeRunningProcesses_v3"
    graphics_call: str = "nvmlDeviceGetGraphicsRunningProcesses_v3"
    # under MPS the compute list names the MPS server; its clients only here
    mps_call: str = "nvmlDeviceGetMPSComputeRunningProcesses_v3"
    util_since_us: int = 0
    accounting: bool = False
    accounting_enabled_by_us: bool = False
    accounting_baseline: bool = False
    accounting_handled: Counter = field(default_factory=Counter)  # pid -> entries handled
    seen_running: dict[int, float] = field(default_factory=dict)  # pid -> last wall time seen
    last: GpuDevice | None = None


class _CallFailed(Exception):
    """Raised inside the sensor only; its message is the NVML error name."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlSensor:
    """Polls NVML. ``poll()`` is safe to call from one thread at a time;
    ``run()`` calls it every ``poll_interval`` seconds until stopped."""

    def __init__(
        self,
        poll_interval: float = 5.0,
        accounting: bool = True,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        nvml: ModuleType | None = None,
    ):
        self.poll_interval = max(float(poll_interval), 0.1)
        self.want_accounting = accounting
        self._clock = clock
        self._wall = wall
        self._nvml = nvml
        self._names: dict[int, str] = {}
        self._devices: list[_Device] = []
        self._started = False
        self._initialised = False  # nvmlInit succeeded and no shutdown since
        self._disabled = False  # for good: no bindings or no library
        self._library = _Backoff(delay=self.poll_interval, initial=self.poll_interval)
        self._reason = "not started"
        self._driver = ""
        self._errors: Counter = Counter()
        self._logged: set[tuple[str, str, str]] = set()
        self.polls_total = 0
        self.last_poll_seconds = 0.0
        self._lock = threading.Lock()  # one poll at a time
        self._counts_lock = threading.Lock()  # metrics never wait for a slow poll

    # --- public surface ---------------------------------------------------

    @property
    def available(self) -> bool:
        return self._initialised and not self._disabled

    @property
    def disabled(self) -> bool:
        """Off for good: no bindings or no library (a host without GPUs)."""
        return self._disabled

    @property
    def unavailable_reason(self) -> str:
        return "" if self.available else self._reason

    @property
    def driver_version(self) -> str:
        return self._driver

    def error_counts(self) -> dict[tuple[str, str, str], int]:
        """(GPU index or "", NVML call, error name) -> count. Every part
        comes from a bounded set, so they can be metric labels."""
        with self._counts_lock:
            return dict(self._errors)

    def devices(self) -> tuple[GpuDevice, ...]:
        """The GPUs as last polled (without readings before the first poll)."""
        return tuple(d.last or self._describe(d, measure=False) for d in list(self._devices))

    def start(self) -> bool:
        """Initialise NVML and enumerate GPUs. False (logged once) when NVML
        is not usable; the sensor then stays harmless."""
        with self._lock:
            if not self._started:
                self._started = True
                self._try_init(first=True)
            return self.available

    def poll(self) -> GpuSnapshot:
        """One poll of every GPU. Never raises because of NVML."""
        with self._lock:
            began = time.perf_counter()
            try:
                return self._poll()
            finally:
                self.polls_total += 1
                self.last_poll_seconds = time.perf_counter() - began

    def run(self, on_snapshot: Callable[[GpuSnapshot], None], stop: threading.Event) -> None:
        """Poll every poll_interval until stop is set. Exceptions from
        on_snapshot or bugs here are logged and counted, never raised.
        Disabled for good (no bindings, no library: a host without GPUs),
        it hands over one snapshot that says so and then only waits for
        stop: no later poll could say anything else."""
        self.start()
        while not stop.is_set():
            began = self._clock()
            try:
                on_snapshot(self.poll())
            except Exception:
                self._count("", "poll", "EXCEPTION")
                log.exception("GPU poll failed; continuing")
            if self._disabled:
                stop.wait()
                return
            stop.wait(max(0.0, self.poll_interval - (self._clock() - began)))

    def close(self) -> None:
        """Restore accounting mode where we turned it on, and shut NVML down."""
        with self._lock:
            if self._initialised:
                for dev in self._devices:
                    if dev.accounting_enabled_by_us and not dev.backoff.failing:
                        self._safe(dev, "nvmlDeviceSetAccountingMode", dev.handle, 0)
                self._shutdown()
            self._devices = []

    def __enter__(self) -> NvmlSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- initialisation -----------------------------------------------------

    def _bindings(self) -> ModuleType | None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return None
            self._nvml = pynvml
        if not self._names:
            prefix = "NVML_ERROR_"
            for attr in dir(self._nvml):
                value = getattr(self._nvml, attr)
                if attr.startswith(prefix) and isinstance(value, int):
                    self._names.setdefault(value, attr[len(prefix) :])
        return self._nvml

    def _error_name(self, exc: BaseException) -> str:
        value = getattr(exc, "value", None)
        if value == 0:
            # pynvml raises a bare NVMLError(0) when a sample query succeeds with no samples
            return "NO_SAMPLES"
        return self._names.get(value, f"CODE_{value}")

    def _count(self, gpu: str, call: str, error: str) -> None:
        with self._counts_lock:
            self._errors[(gpu, call, error)] += 1

    def _try_init(self, first: bool) -> None:
        nvml = self._bindings()
        if nvml is None:
            self._disable("the nvidia-ml-py package (module pynvml) is not installed")
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            name = self._error_name(exc)
            self._count("", "nvmlInit", name)
            if name == "LIBRARY_NOT_FOUND":
                self._disable("libnvidia-ml.so.1 was not found or could not be loaded")
                return
            self._reason = f"nvmlInit failed: {name}"
            if not self._library.failing:
                log.warning(
                    "NVML unavailable (%s): GPU consumer checks are off; retrying with "
                    "back-off up to every %.0f s",
                    name,
                    MAX_BACKOFF_S,
                )
            self._library.fail(self._clock())
            return
        self._initialised = True
        try:
            self._driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            self._driver = ""
        try:
            self._enumerate()
        except _CallFailed as exc:
            self._library_failed(str(exc))
            return
        state = "ready" if first and not self._library.failing else "recovered"
        self._library.succeed()
        self._reason = ""
        migs = "".join(f", GPU {d.index} in MIG mode" for d in self._devices if d.mig_enabled)
        log.info("NVML %s: driver %s, %d GPU(s)%s", state, self._driver, len(self._devices), migs)

    def _disable(self, why: str) -> None:
        self._disabled = True
        self._reason = why
        log.warning("NVML disabled: %s; GPU consumer checks are off, the guard keeps running", why)

    def _shutdown(self) -> None:
        self._initialised = False
        nvml = self._nvml
        if nvml is not None:
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()

    def _library_failed(self, name: str) -> None:
        self._count("", "library", name)
        self._reason = f"NVML stopped answering: {name}"
        if not self._library.failing:
            log.warning("NVML stopped answering (%s); re-initialising with back-off", name)
        self._library.fail(self._clock())
        self._shutdown()
        self._devices = []

    def _call(
        self, dev: _Device | None, name: str, *args: Any, expected: frozenset[str] = frozenset()
    ) -> Any:
        """One NVML call; an NVML error is raised as _CallFailed and, unless
        it is an expected answer (an empty MIG slot, no samples), counted."""
        nvml = self._nvml
        try:
            return getattr(nvml, name)(*args)
        except nvml.NVMLError as exc:
            error = self._error_name(exc)
            if error not in expected:
                self._count("" if dev is None else str(dev.index), name, error)
            raise _CallFailed(error) from exc

    def _safe(self, dev: _Device, name: str, *args: Any) -> Any:
        try:
            return self._call(dev, name, *args)
        except _CallFailed:
            return None

    def _enumerate(self) -> None:
        count = self._call(None, "nvmlDeviceGetCount")
        devices = []
        now = self._clock()
        for index in range(count):
            backoff = _Backoff(delay=self.poll_interval, initial=self.poll_interval)
            dev = _Device(index=index, handle=None, uuid="", name="", backoff=backoff)
            dev.util_since_us = int((self._wall() - self.poll_interval) * 1e6)
            devices.append(dev)
            try:
                self._open_device(dev, now)
            except _CallFailed as exc:
                if str(exc) in _LIBRARY_ERRORS:
                    raise
                self._device_failed(dev, str(exc), now)
        self._devices = devices

    def _open_device(self, dev: _Device, now: float) -> None:
        """(Re)acquire dev's handle, identity, MIG layout and accounting."""
        dev.handle = self._call(dev, "nvmlDeviceGetHandleByIndex", dev.index)
        uuid = _text(self._call(dev, "nvmlDeviceGetUUID", dev.handle))
        if dev.uuid and uuid != dev.uuid:
            log.warning("GPU %d changed UUID %s -> %s", dev.index, dev.uuid, uuid)
            dev.accounting_handled.clear()
            dev.seen_running.clear()
            dev.accounting_baseline = False
        dev.uuid = uuid
        dev.name = _text(self._optional(dev, "name", "nvmlDeviceGetName", dev.handle) or "")
        self._read_mig(dev, now)
        if self.want_accounting and not dev.mig_enabled:
            self._enable_accounting(dev)

    def _read_mig(self, dev: _Device, now: float) -> None:
        dev.mig_read_at = now
        mode = self._optional(dev, "mig", "nvmlDeviceGetMigMode", dev.handle)
        dev.mig_enabled = bool(mode and mode[0])
        dev.migs = []
        if not dev.mig_enabled:
            return
        dev.accounting = False  # accounting is unavailable under MIG
        slots = self._call(dev, "nvmlDeviceGetMaxMigDeviceCount", dev.handle)
        for slot in range(slots):
            try:
                handle = self._call(
                    dev,
                    "nvmlDeviceGetMigDeviceHandleByIndex",
                    dev.handle,
                    slot,
                    expected=_EMPTY_SLOT,
                )
            except _CallFailed as exc:
                if str(exc) in _EMPTY_SLOT:
                    continue
                raise
            uuid = _text(self._call(dev, "nvmlDeviceGetUUID", handle))
            gi = self._optional(dev, "mig_ids", "nvmlDeviceGetGpuInstanceId", handle)
            ci = self._optional(dev, "mig_ids", "nvmlDeviceGetComputeInstanceId", handle)
            dev.migs.append(_Mig(MigDevice(slot, uuid, gi, ci), handle))

    def _enable_accounting(self, dev: _Device) -> None:
        try:
            if not self._call(dev, "nvmlDeviceGetAccountingMode", dev.handle):
                self._call(dev, "nvmlDeviceSetAccountingMode", dev.handle, 1)
                dev.accounting_enabled_by_us = True
            dev.accounting = True
        except _CallFailed as exc:
            if str(exc) in _LIBRARY_ERRORS:
                raise
            dev.accounting = False
            self._note_once(
                dev,
                "accounting",
                str(exc),
                "GPU %d: accounting mode unavailable (%s); processes that start and end "
                "between two polls go unseen",
            )

    # --- polling ------------------------------------------------------------

    def _poll(self) -> GpuSnapshot:
        now = self._clock()
        wall = self._wall()
        if not self._started:
            self._started = True
            self._try_init(first=True)
        elif not self._initialised and not self._disabled and self._library.due(now):
            self._try_init(first=False)
        if not self.available:
            return GpuSnapshot(taken_at=wall, available=False, reason=self._reason)
        processes: list[GpuProcess] = []
        finished: list[FinishedGpuProcess] = []
        failing: list[int] = []
        try:
            for dev in self._devices:
                if dev.backoff.failing:
                    if not dev.backoff.due(now):
                        failing.append(dev.index)
                        continue
                    try:
                        self._open_device(dev, now)
                    except _CallFailed as exc:
                        self._device_error(dev, exc, now)
                        failing.append(dev.index)
                        continue
                try:
                    found, done = self._poll_device(dev, now, wall)
                except _CallFailed as exc:
                    self._device_error(dev, exc, now)
                    failing.append(dev.index)
                    continue
                if dev.backoff.failing:
                    log.warning("GPU %d (%s) answers again", dev.index, dev.uuid)
                    dev.backoff.succeed()
                processes.extend(found)
                finished.extend(done)
        except _CallFailed as exc:  # library-level: every handle is gone
            self._library_failed(str(exc))
            return GpuSnapshot(taken_at=wall, available=False, reason=self._reason)
        return GpuSnapshot(
            taken_at=wall,
            available=True,
            devices=self.devices(),
            processes=tuple(processes),
            finished=tuple(finished),
            failing=tuple(failing),
        )

    def _device_error(self, dev: _Device, exc: _CallFailed, now: float) -> None:
        if str(exc) in _LIBRARY_ERRORS:
            raise exc
        self._device_failed(dev, str(exc), now)

    def _device_failed(self, dev: _Device, error: str, now: float) -> None:
        if not dev.backoff.failing:
            log.warning(
                "GPU %d (%s) failed with %s; skipping it, retrying with back-off",
                dev.index,
                dev.uuid or "?",
                error,
            )
        dev.backoff.fail(now)
        dev.last = None  # no stale readings for a GPU that does not answer

    def _poll_device(
        self, dev: _Device, now: float, wall: float
    ) -> tuple[list[GpuProcess], list[FinishedGpuProcess]]:
        if now - dev.mig_read_at >= MIG_REFRESH_S:
            was_mig = dev.mig_enabled
            self._read_mig(dev, now)
            if was_mig and not dev.mig_enabled and self.want_accounting:
                self._enable_accounting(dev)
        found: list[GpuProcess] = []
        if dev.mig_enabled:
            # each MIG device answers for its own processes; none has SM samples
            for mig in dev.migs:
                for pid, (memory, mps) in self._processes(dev, mig.handle).items():
                    found.append(
                        GpuProcess(pid, dev.index, dev.uuid, mig.info.uuid, memory, None, mps)
                    )
        else:
            util = self._utilization(dev, wall)
            for pid, (memory, mps) in self._processes(dev, dev.handle).items():
                found.append(GpuProcess(pid, dev.index, dev.uuid, None, memory, util.get(pid), mps))
        for proc in found:
            dev.seen_running[proc.pid] = wall
        horizon = max(600.0, 10 * self.poll_interval)
        for pid, seen in list(dev.seen_running.items()):
            if wall - seen > horizon:
                del dev.seen_running[pid]
        done = self._accounting(dev) if dev.accounting else []
        dev.last = self._describe(dev, measure=True)
        return found, done

    def _describe(self, dev: _Device, measure: bool) -> GpuDevice:
        """dev's inventory record; with measure, power, memory and
        utilization are read now (NVML errors propagate to the poll)."""
        power = memory = rates = None
        if measure:
            power = self._optional(dev, "power", "nvmlDeviceGetPowerUsage", dev.handle)
            memory = self._optional(dev, "memory", "nvmlDeviceGetMemoryInfo", dev.handle)
            rates = self._optional(dev, "utilization", "nvmlDeviceGetUtilizationRates", dev.handle)
        return GpuDevice(
            index=dev.index,
            uuid=dev.uuid,
            name=dev.name,
            mig_devices=tuple(m.info for m in dev.migs),
            power_mw=None if power is None else int(power),
            memory_total_bytes=None if memory is None else int(memory.total),
            memory_used_bytes=None if memory is None else int(memory.used),
            utilization=None if rates is None else int(rates.gpu),
            accounting=dev.accounting,
            mig_enabled=dev.mig_enabled,
        )

    def _optional(self, dev: _Device, feature: str, name: str, *args: Any) -> Any:
        """A call whose failure only loses a value: NOT_SUPPORTED,
        FUNCTION_NOT_FOUND and NO_PERMISSION turn the feature off for this
        GPU for good; "no data" answers give None this time."""
        if feature in dev.off:
            return None
        try:
            return self._call(dev, name, *args, expected=_NO_VALUE_ERRORS)
        except _CallFailed as exc:
            error = str(exc)
            if error in _FEATURE_ERRORS:
                dev.off.add(feature)
                self._note_once(dev, feature, error, f"GPU %d: {feature} unavailable (%s)")
                return None
            if error in _NO_VALUE_ERRORS:
                return None
            raise

    def _note_once(self, dev: _Device, feature: str, error: str, message: str) -> None:
        key = (str(dev.index), feature, error)
        if key not in self._logged:
            self._logged.add(key)
            log.info(message, dev.index, error)

    def _processes(self, dev: _Device, handle: Any) -> dict[int, tuple[int | None, bool]]:
        """pid -> (used memory, MPS client?), from the compute, graphics and
        MPS lists. Under MPS the compute list holds the MPS server
        (nvidia-cuda-mps-server) with the clients' contexts; the clients,
        the processes that asked for the GPU, are in the MPS list."""
        result: dict[int, tuple[int | None, bool]] = {}
        for kind in ("compute", "graphics", "mps"):
            for proc in self._process_list(dev, handle, kind):
                pid = int(proc.pid)
                memory = None if proc.usedGpuMemory is None else int(proc.usedGpuMemory)
                known, mps = result.get(pid, (None, False))
                if known is not None:
                    memory = max(known, memory or 0)
                result[pid] = (memory, mps or kind == "mps")
        return result

    def _process_list(self, dev: _Device, handle: Any, kind: str) -> list[Any]:
        if kind in dev.off:
            return []
        attr = f"{kind}_call"
        while True:
            name = getattr(dev, attr)
            try:
                return self._call(dev, name, handle)
            except _CallFailed as exc:
                error = str(exc)
                if error == "FUNCTION_NOT_FOUND" and name.endswith("_v3"):
                    # drivers before R510 have only the _v2 query
                    setattr(dev, attr, name[:-3] + "_v2")
                    self._note_once(dev, kind, "v2", f"GPU %d: {kind} processes via the %s query")
                    continue
                if error in _FEATURE_ERRORS:
                    dev.off.add(kind)
                    self._note_once(
                        dev, kind, error, f"GPU %d: {kind} process list unavailable (%s)"
                    )
                    return []
                raise

    def _utilization(self, dev: _Device, wall: float) -> dict[int, int]:
        """pid -> mean SM percent over the samples since the last poll."""
        since = dev.util_since_us
        dev.util_since_us = int(wall * 1e6)
        samples = self._optional(
            dev, "process_utilization", "nvmlDeviceGetProcessUtilization", dev.handle, since
        )
        if not samples:
            return {}
        per_pid: dict[int, list[int]] = {}
        for sample in samples:
            per_pid.setdefault(int(sample.pid), []).append(int(sample.smUtil))
        return {pid: round(sum(values) / len(values)) for pid, values in per_pid.items()}

    def _accounting(self, dev: _Device) -> list[FinishedGpuProcess]:
        """Processes that used the GPU and ended without a poll seeing them."""
        pids = self._optional(dev, "accounting", "nvmlDeviceGetAccountingPids", dev.handle)
        if pids is None:
            dev.accounting = "accounting" not in dev.off
            return []
        entries = Counter(int(pid) for pid in pids)
        if not dev.accounting_baseline:
            # records from before we started are history, not news
            dev.accounting_baseline = True
            dev.accounting_handled = entries
            return []
        done = []
        for pid, count in entries.items():
            if count <= dev.accounting_handled.get(pid, 0):
                continue
            stats = self._optional(
                dev, "accounting", "nvmlDeviceGetAccountingStats", dev.handle, pid
            )
            if stats is None:
                continue
            if stats.isRunning:
                if pid in dev.seen_running:
                    dev.accounting_handled[pid] = count
                continue  # the next poll sees it, or a later accounting read does
            dev.accounting_handled[pid] = count
            seen = dev.seen_running.get(pid)
            if seen is not None and seen * 1e6 >= stats.startTime:
                continue  # a poll saw it while it ran
            memory = stats.maxMemoryUsage
            done.append(
                FinishedGpuProcess(
                    pid=pid,
                    gpu_index=dev.index,
                    gpu_uuid=dev.uuid,
                    max_memory_bytes=None if memory is None else int(memory),
                    gpu_start_us=int(stats.startTime),
                    gpu_time_ms=int(stats.time),
                )
            )
        return done
