"""Slurm's GRES allocations on this node, from Slurm itself.

``scontrol show job -d -o`` (one job a line, detail on) names for every
running job the GPUs it holds on each node (``Nodes=gpu07 ... GRES=gpu:2(IDX:0-1)``,
indices in gres.conf order, which is the NVML order when gres.conf uses
``AutoDetect=nvml`` or lists ``/dev/nvidia<N>`` in order). The job of a
process comes from its cgroup path where Slurm uses cgroups
(``.../job_<id>/...``, see rome_guard.attribution) and from
``scontrol listpids`` (slurmd's own view) where it does not
(``ProctrackType=proctrack/linuxproc`` or ``pgid``).

Parsing is pure and tested on Slurm's real output; running scontrol is the
only I/O, with a timeout. Nothing here submits, cancels or changes a job.
``find_launcher`` serves the prolog (scripts/slurm-prolog.sh): the batch
script's process, which ``rome-guard gpu register --slurm-job`` registers.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from rome_guard.gpu.allocations import (
    OWNER_SLURM_JOB,
    SOURCE_SLURM,
    Allocation,
    AllocationSnapshot,
    Owner,
)

ACTIVE_STATES = ("RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STOPPED")
_FIELD = re.compile(r"(?:^|\s)([A-Za-z_:/]+)=(\S*)")
_GPU_GRES = re.compile(r"gpu(?::[^:(,\s]+)?(?::\d+)?\(IDX:([0-9,\-]+)\)")
_BRACKETS = re.compile(r"^(?P<prefix>[^\[]*)\[(?P<ranges>[^\]]+)\](?P<suffix>.*)$")
MAX_HOSTS = 65536


class SlurmError(Exception):
    """scontrol is missing, failed or said something unexpected."""


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    name: str
    state: str
    user: str
    gpus: tuple[str, ...]  # GPU indices on this node, gres.conf order
    on_node: bool  # the job has this node in its allocation


def expand_indices(text: str) -> list[int]:
    """'0-1,3' -> [0, 1, 3]."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first or last - first > 4096:
            raise ValueError(f"bad index range {part!r}")
        out.extend(range(first, last + 1))
    return out


def expand_hostlist(expr: str) -> list[str]:
    """A Slurm hostlist ('gpu[01-03,07],login1') -> host names."""
    hosts: list[str] = []
    depth, start = 0, 0
    items = []
    for i, ch in enumerate(expr):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(expr[start:i])
            start = i + 1
    items.append(expr[start:])
    for item in items:
        match = _BRACKETS.match(item)
        if not match:
            if item:
                hosts.append(item)
            continue
        for part in match["ranges"].split(","):
            low, _, high = part.partition("-")
            width = len(low)
            for n in range(int(low), int(high or low) + 1):
                hosts.append(f"{match['prefix']}{n:0{width}d}{match['suffix']}")
                if len(hosts) > MAX_HOSTS:
                    raise ValueError("hostlist too long")
    return hosts


def parse_jobs(text: str, node: str) -> list[SlurmJob]:
    """``scontrol show job -d -o`` output -> the active jobs, with the GPU
    indices each holds on node."""
    jobs = []
    for line in text.splitlines():
        if not line.startswith("JobId="):
            continue
        fields = _FIELD.findall(line)
        head = dict(fields)
        state = head.get("JobState", "")
        if state not in ACTIVE_STATES:
            continue
        gpus: list[int] = []
        on_node = False
        # the detail pairs come in order: Nodes=<hostlist> CPU_IDs=... GRES=...
        current_nodes: list[str] | None = None
        for key, value in fields:
            if key == "Nodes" and not value.isdigit():
                try:
                    current_nodes = expand_hostlist(value)
                except ValueError:
                    current_nodes = []
                if node in current_nodes:
                    on_node = True
            elif key == "GRES" and current_nodes is not None and node in current_nodes:
                for match in _GPU_GRES.finditer(value):
                    gpus.extend(expand_indices(match.group(1)))
        if not on_node:
            on_node = node in _safe_hostlist(head.get("NodeList", ""))
        user = head.get("UserId", "").split("(", 1)[0]
        jobs.append(
            SlurmJob(
                head["JobId"],
                head.get("JobName", ""),
                state,
                user,
                tuple(str(i) for i in dict.fromkeys(gpus)),
                on_node,
            )
        )
    return jobs


def _safe_hostlist(expr: str) -> list[str]:
    try:
        return expand_hostlist(expr) if expr and expr != "(null)" else []
    except ValueError:
        return []


@dataclass(frozen=True)
class StepPid:
    pid: int
    job_id: str
    step: str
    local_id: str


def parse_listpids(text: str) -> list[StepPid]:
    """``scontrol listpids`` output -> (pid, job, step, local task id)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        out.append(StepPid(int(parts[0]), parts[1], parts[2], parts[3]))
    return out


def find_launcher(pids: list[StepPid], job_id: str, ppid_of) -> int | None:
    """The job's launcher: its batch script (task 0 of the batch step), or
    for a job without one (salloc + srun) task 0 of its first step. A
    process whose parent is itself in the job is not a launcher."""
    mine = [p for p in pids if p.job_id == job_id]
    in_job = {p.pid for p in mine}
    for step in ("batch", *sorted({p.step for p in mine} - {"batch", "extern"})):
        for p in mine:
            if p.step == step and p.local_id == "0" and ppid_of(p.pid) not in in_job:
                return p.pid
    return None


class SlurmClient:
    """scontrol, run with a timeout and (optionally) a given slurm.conf."""

    def __init__(self, scontrol: str = "scontrol", conf: str = "", timeout: float = 10.0):
        self.scontrol = scontrol
        self.conf = conf
        self.timeout = timeout

    def available(self) -> str | None:
        """None when Slurm can be asked, else why not."""
        if shutil.which(self.scontrol) is None:
            return f"{self.scontrol} not found"
        conf = self.conf or os.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"
        if not os.path.exists(conf):
            return f"no {conf}"
        return None

    def run(self, *args: str) -> str:
        env = dict(os.environ)
        if self.conf:
            env["SLURM_CONF"] = self.conf
        try:
            done = subprocess.run(
                [self.scontrol, *args],
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SlurmError(f"scontrol {' '.join(args)}: {exc}") from None
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0][:200]
            raise SlurmError(f"scontrol {' '.join(args)}: {first}")
        return done.stdout

    def jobs(self, node: str) -> list[SlurmJob]:
        return parse_jobs(self.run("show", "job", "-d", "-o"), node)

    def job_state(self, job_id: str) -> str | None:
        """PENDING, RUNNING, COMPLETED...; None when slurmctld no longer knows it."""
        try:
            text = self.run("show", "job", job_id, "-o")
        except SlurmError as exc:
            if "invalid job id" in str(exc).lower():
                return None
            raise
        for line in text.splitlines():
            if line.startswith(f"JobId={job_id} "):
                return dict(_FIELD.findall(line)).get("JobState")
        return None

    def listpids(self, job_id: str | None = None) -> list[StepPid]:
        try:
            text = self.run("listpids", *([job_id] if job_id else []))
        except SlurmError as exc:
            if "no steps" in str(exc).lower() or "no job" in str(exc).lower():
                return []
            raise
        return parse_listpids(text)


def local_node_name() -> str:
    return socket.gethostname().split(".", 1)[0]


class SlurmSource:
    """An allocation source over scontrol."""

    name = SOURCE_SLURM

    def __init__(self, client: SlurmClient, node: str = ""):
        self.client = client
        self.node = node or local_node_name()

    def snapshot(self) -> AllocationSnapshot:
        now = time.time()
        why = self.client.available()
        if why is not None:
            return AllocationSnapshot(self.name, False, why, taken_at=now)
        try:
            jobs = [j for j in self.client.jobs(self.node) if j.on_node]
        except SlurmError as exc:
            return AllocationSnapshot(self.name, False, str(exc), taken_at=now)
        reason = ""
        pids: dict[int, str] = {}
        try:
            pids = {p.pid: p.job_id for p in self.client.listpids()}
        except SlurmError as exc:
            # slurmd down or not on this node: cgroup paths still name jobs
            reason = f"no pids from slurmd: {exc}"
        allocations = tuple(
            Allocation(
                Owner(OWNER_SLURM_JOB, j.job_id, _job_label(j), self.name),
                j.gpus,
            )
            for j in jobs
        )
        return AllocationSnapshot(self.name, True, reason, allocations, pids=pids, taken_at=now)

    def close(self) -> None:
        pass


def _job_label(job: SlurmJob) -> str:
    return f"{job.job_id} ({job.name})" if job.name else job.job_id
