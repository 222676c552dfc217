"""The daemon's GPU side: NVML polled on its own thread, judged on the loop.

NVML calls are slow and may hang on a sick driver, so the sensor runs on a
thread of its own and hands snapshots over a queue; the daemon's loop
judges them against the job registry with its process table in hand.
The schedulers' allocations (kubelet, Slurm) are refreshed on a thread of
their own too (rome_guard.gpu.allocations) and read by the registry's
verdicts. Without a driver or a scheduler the watch says so once and the
daemon goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

from rome_guard.config import Config
from rome_guard.events import GpuSnapshot
from rome_guard.gpu import allocations
from rome_guard.gpu.allocations import gpu_matches
from rome_guard.gpu.registry import GpuRef, GpuRegistry
from rome_guard.sensors.nvml import NvmlSensor

log = logging.getLogger(__name__)


def on_gpu(grant: str, index: int, uuid: str, migs: tuple[str, ...]) -> bool:
    """A scheduler's device id names this GPU or one of its MIG devices."""
    return gpu_matches(grant, GpuRef(index, uuid)) or any(
        gpu_matches(grant, GpuRef(index, uuid, mig)) for mig in migs
    )


class GpuWatch:
    def __init__(self, config: Config):
        self.allocations = allocations.from_config(config)
        self.registry = GpuRegistry.from_config(config, self.allocations)
        self.sensor = NvmlSensor(config.gpu.poll_interval, config.gpu.accounting)
        self._snapshots: queue.SimpleQueue[GpuSnapshot] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available: bool | None = None
        self._migs: dict[str, tuple[str, ...]] = {}  # GPU UUID -> its MIG devices' UUIDs

    def start(self, notify: Callable[[], None] = lambda: None) -> None:
        """Poll NVML on a thread of its own; notify() is called (on that
        thread) after each snapshot is queued for snapshots()."""

        def queue_snapshot(snapshot: GpuSnapshot) -> None:
            self._snapshots.put(snapshot)
            notify()

        self._thread = threading.Thread(
            target=self.sensor.run, args=(queue_snapshot, self._stop), name="nvml", daemon=True
        )
        self._thread.start()
        self.allocations.start()

    def snapshots(self) -> list[GpuSnapshot]:
        taken = []
        while True:
            try:
                snapshot = self._snapshots.get_nowait()
            except queue.Empty:
                return taken
            if snapshot.available != self.available:
                # the sensor itself says once, loudly, why NVML is off
                if snapshot.available:
                    log.info("GPU features on: %d GPU(s) through NVML", len(snapshot.devices))
                self.available = snapshot.available
            if snapshot.available:
                self._migs = {
                    d.uuid: tuple(m.uuid for m in d.mig_devices) for d in snapshot.devices
                }
                taken.append(snapshot)

    def owner_kinds(self, index: int, uuid: str) -> list[str]:
        """Kinds (pod, slurm_job) of the owners GPU index/uuid, or one of its
        MIG devices, is allocated to."""
        kinds = []
        for snap in self.allocations.snapshots():
            if snap.live:
                for alloc in snap.allocations:
                    if any(on_gpu(g, index, uuid, self._migs.get(uuid, ())) for g in alloc.gpus):
                        kinds.append(alloc.owner.kind)
        return kinds

    def sources_live(self) -> list[tuple[str, bool]]:
        return [(snap.source, snap.live) for snap in self.allocations.snapshots()]

    def status(self) -> dict:
        """For status.json and `rome-guard status`: which sources are live."""
        return {
            "nvml": self.available,
            "allocation_sources": {
                snap.source: "live" if snap.live else f"down: {snap.reason}"
                for snap in self.allocations.snapshots()
            },
        }

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sensor.close()
        self.allocations.close()
