"""What the daemon says about its own health: which rules and config it
runs (as hashes a fleet can compare) and which sensors are up.

``rules_hash`` and ``config_hash`` name the rule set and the config in
force in 12 hex digits: two nodes with the same files and the same rules
left out show the same values in ``rome_guard_build_info``, so drift
across a fleet is one PromQL count. ``sensors_up`` lists (sensor, up) for
rome_guard_sensor_up: a sensor that does not apply here (no NVML library,
no scheduler configured) is left out rather than reported down.

This module never reads a watched process and never changes what the
daemon does; it only describes it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from rome_guard.config import Config
    from rome_guard.detect.rules import RuleSet
    from rome_guard.gpu.watch import GpuWatch

HASH_DIGITS = 12
DEFAULT = "default"  # config_hash of the built-in defaults (no file)


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:HASH_DIGITS]


def _content(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return f"unreadable:{path}".encode()


def rules_hash(ruleset: RuleSet) -> str:
    """The rule files' contents in load order and the ids left in force
    (disabled_rules changes it too); not their paths."""
    ids = "\n".join(sorted(rule.id for rule in ruleset.rules)).encode()
    return _digest([*(_content(path) for path in ruleset.sources), ids])


def config_hash(config: Config) -> str:
    """The config file's content, or "default" without one."""
    if not config.source:
        return DEFAULT
    return _digest([_content(config.source)])


def sensors_up(sensor_mode: str, wire: bool, gpu: GpuWatch | None) -> list[tuple[str, bool]]:
    """(sensor, up) for rome_guard_sensor_up: the process sensor (ebpf, or
    the poll fallback in use), the wire sensor (it runs beside eBPF), NVML
    unless the host has no NVML at all, and each scheduler source asked."""
    up = [("ebpf", sensor_mode == "ebpf"), ("poll", sensor_mode == "poll")]
    if sensor_mode == "ebpf":
        up.append(("wire", wire))
    if gpu is not None:
        if not gpu.sensor.disabled:
            up.append(("nvml", gpu.sensor.available))
        up.extend(gpu.sources_live())
    return up
