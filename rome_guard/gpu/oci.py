"""Which GPU registration an OCI container asks for, from the runtime's state.

For sites that keep ``gpu.trust: process`` under Kubernetes, the node's
container runtime runs scripts/oci-gpu-hook.sh as an OCI ``createRuntime``
hook (docs/gpu.md): it gets the container's state on stdin (``pid``,
``bundle``, ``annotations``), and ``rome-guard gpu register --oci-state -``
registers that process, the container's own entrypoint, for the GPUs the
device plugin gave it (``NVIDIA_VISIBLE_DEVICES`` in the bundle's
config.json), named after its pod. The pid and its start time survive the
runtime's exec into the entrypoint, so the registration does too. What the
entrypoint starts later (an agent's tool call) stays unregistered.

This module only parses; it never registers and never reads /proc.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from rome_guard.gpu.registry import parse_gpu_grants

# the device plugin's variable: the GPUs it allocated, as UUIDs or indices.
# "all" is not an allocation: CUDA images set it by default, and a pod that
# requested no GPU keeps it; registering it would allow every GPU.
VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
NO_GPU = ("", "none", "void")
NOT_AN_ALLOCATION = ("all",)
# pod names as containerd's CRI plugin and CRI-O annotate containers
POD_NAME_KEYS = ("io.kubernetes.cri.sandbox-name", "io.kubernetes.pod.name")
POD_NAMESPACE_KEYS = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.pod.namespace")


class OciStateError(ValueError):
    """The state or the bundle cannot be used; the message says why."""


@dataclass(frozen=True)
class OciRegistration:
    pid: int
    gpus: tuple[str, ...]
    job: str


def _first(annotations: dict[str, Any], keys: tuple[str, ...]) -> str:
    return next((str(annotations[k]) for k in keys if annotations.get(k)), "")


def registration_for(state: dict[str, Any]) -> tuple[OciRegistration | None, str]:
    """The registration an OCI state asks for, or None and why there is
    none. Raises OciStateError for a state that is not one."""
    pid, bundle = state.get("pid"), state.get("bundle")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise OciStateError(f"OCI state has no container pid: {state.get('pid')!r}")
    if not isinstance(bundle, str) or not bundle:
        raise OciStateError("OCI state has no bundle")
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise OciStateError(f"cannot read {bundle}/config.json: {exc}") from exc
    env = (config.get("process") or {}).get("env") or []
    visible = next(
        (e.split("=", 1)[1] for e in reversed(env) if e.startswith(VISIBLE_DEVICES + "=")), ""
    ).strip()
    if visible.lower() in NO_GPU:
        return None, "the container was given no GPU"
    if visible.lower() in NOT_AN_ALLOCATION:
        return (
            None,
            f"{VISIBLE_DEVICES}={visible} names no allocation (only the device plugin's do)",
        )
    try:
        gpus = parse_gpu_grants(visible) or ()
    except ValueError as exc:
        raise OciStateError(f"{VISIBLE_DEVICES}: {exc}") from exc
    annotations = state.get("annotations") or {}
    pod = _first(annotations, POD_NAME_KEYS)
    namespace = _first(annotations, POD_NAMESPACE_KEYS)
    job = f"{namespace}/{pod}" if pod and namespace else pod or f"oci-{state.get('id', pid)}"
    return OciRegistration(pid, gpus, job), ""
