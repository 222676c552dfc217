"""Parse a process's cgroup path into who owns it.

Pure functions over strings: no /proc access here, so every pattern is
testable without root. Patterns covered: systemd units, Docker, containerd
(incl. Kubernetes cri-containerd), CRI-O, Podman/libpod, Kubernetes pod
UIDs (cgroupfs and systemd drivers), Slurm jobs (cgroup v1 and v2).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from rome_guard.events import Attribution

_CONTAINER_PATTERNS = (
    re.compile(r"docker-([0-9a-f]{64})\.scope"),
    re.compile(r"/docker/([0-9a-f]{64})(?:/|$)"),
    re.compile(r"cri-containerd-([0-9a-f]{64})\.scope"),
    # containerd with the systemd driver, no scope: ...slice:cri-containerd:<id>
    re.compile(r":(?:cri-containerd|crio|docker):([0-9a-f]{64})(?:/|$)"),
    re.compile(r"crio-(?:conmon-)?([0-9a-f]{64})(?:\.scope)?"),
    re.compile(r"libpod-(?:conmon-)?([0-9a-f]{64})(?:\.scope)?"),
    re.compile(r"/containerd/([0-9a-f]{64})(?:/|$)"),
    # kubepods with the cgroupfs driver: .../pod<uid>/<container id>
    re.compile(r"/pod[0-9a-f_-]{36}/([0-9a-f]{64})(?:/|$)"),
    # nerdctl / containerd namespaces: /<namespace>/<id>
    re.compile(r"/(?:k8s\.io|moby|default)/([0-9a-f]{64})(?:/|$)"),
)
_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)
_SLURM_JOB = re.compile(r"(?:^|/)job_(\d+)(?:/|$)")
_UNIT = re.compile(r"([^/]+\.(?:service|scope|socket|mount|swap|timer|path))(?:/|$)")


def container_id(cgroup: str) -> str | None:
    for pattern in _CONTAINER_PATTERNS:
        match = pattern.search(cgroup)
        if match:
            return match.group(1)
    return None


def pod_uid(cgroup: str) -> str | None:
    match = _POD_UID.search(cgroup)
    return match.group(1).replace("_", "-") if match else None


def slurm_job(cgroup: str) -> str | None:
    match = _SLURM_JOB.search(cgroup)
    return match.group(1) if match else None


def systemd_unit(cgroup: str) -> str | None:
    """The innermost systemd unit named in the path, if any. Container
    scopes (docker-<id>.scope) count as units too: that is what systemd
    calls them."""
    units = _UNIT.findall(cgroup)
    return units[-1] if units else None


def parse_environ(raw: bytes) -> dict[bytes, bytes]:
    env: dict[bytes, bytes] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key] = value
    return env


def attribute(
    cgroup: str, environ: Mapping[str, str] | None = None, env_keys: Iterable[str] = ()
) -> Attribution:
    """Everything we can say about a process's owner from its cgroup path
    and (as a hint only; a process can write its own) its environment."""
    env = {key: environ[key] for key in env_keys if environ and key in environ}
    return Attribution(
        unit=systemd_unit(cgroup),
        container_id=container_id(cgroup),
        pod_uid=pod_uid(cgroup),
        slurm_job=slurm_job(cgroup),
        env=env,
    )
