"""GPU consumers: the job registry, verdicts on what NVML sees, listings.

``register_current_process`` is the helper for training code: call it once
the process that will hold the GPU contexts is running, e.g.

    import rome_guard
    rome_guard.register_current_process(job="llama-sft-42", gpus=["0", "1"])

It registers exactly this process (pid and start time); a child it starts
is not registered unless ``include_children=True``. It needs write access to
the registrations directory (root, or ``gpu.user_registration``; see
docs/gpu.md). This package never imports NVML at import time.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from rome_guard.gpu.registry import Registration


def register_current_process(
    job: str | None = None,
    gpus: Iterable[str | int] | str | None = None,
    include_children: bool = False,
    run_dir: str | None = None,
) -> Registration:
    """Register this process as a GPU job. Raises RegistrationError for a
    malformed request and PermissionError when the registrations directory
    is not writable by this user."""
    from rome_guard.config import DEFAULT_RUN_DIR
    from rome_guard.gpu.registry import GpuRegistry, run_dir_from_env

    registry = GpuRegistry(run_dir or run_dir_from_env(DEFAULT_RUN_DIR))
    return registry.register(os.getpid(), gpus, job, include_children)


__all__ = ["register_current_process"]
