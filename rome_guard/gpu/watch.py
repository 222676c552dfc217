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

from rome_guard.config import Config
from rome_guard.gpu import allocations
from rome_guard.gpu.registry import GpuRegistry
from rome_guard.sensors.nvml import GpuSnapshot, NvmlSensor

log = logging.getLogger(__name__)


class GpuWatch:
    def __init__(self, config: Config):
        self.registry = GpuRegistry.from_config(config)
        self.allocations = allocations.from_config(config)
        self.registry.allocations = self.allocations
        self.sensor = NvmlSensor(config.gpu.poll_interval, config.gpu.accounting)
        self._snapshots: queue.SimpleQueue[GpuSnapshot] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.available: bool | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.sensor.run, args=(self._snapshots.put, self._stop), name="nvml", daemon=True
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
                taken.append(snapshot)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sensor.close()
        self.allocations.close()
