"""``rome-guard gpu ...``: list GPU consumers, register and unregister jobs.

Thin click commands: they parse options and call rome_guard.gpu.registry,
rome_guard.sensors.nvml and rome_guard.gpu.report. Exit codes follow the
project's convention: 0 clean, 1 findings (an unregistered consumer), 2 error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import click

from rome_guard.config import DEFAULT_CONFIG_FILE, Config, load_config
from rome_guard.gpu.registry import (
    RUN_DIR_ENV,
    GpuRegistry,
    Registration,
    RegistrationError,
    parse_gpu_grants,
)
from rome_guard.yamlsrc import SourceError

EXIT_FINDINGS = 1
EXIT_ERROR = 2


@dataclass
class _Options:
    config_path: str
    run_dir: str | None

    def config(self) -> Config:
        try:
            return load_config(self.config_path)
        except (SourceError, OSError) as exc:
            _fail(f"config {self.config_path}: {exc}")

    def registry(self, with_allowlist: bool, allocations: Any = None) -> GpuRegistry:
        if not with_allowlist and self.run_dir:
            return GpuRegistry(self.run_dir)
        config = self.config()
        if self.run_dir:
            config.run_dir = self.run_dir
        if not with_allowlist:
            return GpuRegistry(config.run_dir)
        try:
            return GpuRegistry.from_config(config, allocations)
        except SourceError as exc:
            _fail(str(exc))


def _fail(message: str) -> NoReturn:
    click.echo(f"rome-guard gpu: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _describe(reg: Registration) -> str:
    from rome_guard.textsafe import one_line

    gpus = ",".join(reg.gpus) if reg.gpus is not None else "any GPU"
    job = f"job {one_line(reg.job, 64)!r}" if reg.job else "no job name"
    children = "children included" if reg.include_children else "children not included"
    return f"pid {reg.key.pid} (start time {reg.key.start_time}), {job}, {gpus}, {children}"


@click.group()
@click.option(
    "--config",
    "config_path",
    envvar="ROME_GUARD_CONFIG",
    default=DEFAULT_CONFIG_FILE,
    show_default=True,
    help="Config file (for gpu.allow and run_dir).",
)
@click.option(
    "--run-dir",
    envvar=RUN_DIR_ENV,
    default=None,
    help=f"Where registrations live (default: run_dir from the config; env {RUN_DIR_ENV}).",
)
@click.pass_context
def gpu(ctx: click.Context, config_path: str, run_dir: str | None) -> None:
    """GPU consumers: which processes may use which GPUs."""
    ctx.obj = _Options(config_path, run_dir)


@gpu.command()
@click.option("--pid", type=int, default=None, help="The process to register.")
@click.option(
    "--slurm-job",
    default=None,
    help="Register this Slurm job's launcher (its batch script), found through "
    "scontrol listpids; what the prolog does (scripts/slurm-prolog.sh).",
)
@click.option(
    "--wait",
    type=float,
    default=0.0,
    help="With --slurm-job: seconds to wait for the launcher to start (a prolog runs before it).",
)
@click.option(
    "--detach",
    is_flag=True,
    help="Return at once and register from a process in a session of its own "
    "(a Slurm prolog must end before the job starts, and its process group is killed).",
)
@click.option(
    "--oci-state",
    type=click.File("r"),
    default=None,
    help="Register an OCI container's process from the runtime's state ('-': stdin), with "
    "the GPUs its bundle names; what the OCI hook does (scripts/oci-gpu-hook.sh).",
)
@click.option("--gpus", default=None, help="GPUs it may use: indices or UUIDs, comma-separated.")
@click.option("--job", default=None, help="A job name shown in alerts and listings.")
@click.option(
    "--include-children",
    is_flag=True,
    help="Also cover its descendants (off: a child on a GPU is unregistered).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the registration as JSON.")
@click.pass_obj
def register(
    opts: _Options,
    pid: int | None,
    slurm_job: str | None,
    wait: float,
    detach: bool,
    oci_state,
    gpus: str | None,
    job: str | None,
    include_children: bool,
    as_json: bool,
) -> None:
    """Register a running process (identified by pid and start time) as a GPU job."""
    try:
        grants = parse_gpu_grants(gpus) if gpus else None
    except ValueError as exc:
        _fail(f"--gpus: {exc}")
    if [pid, slurm_job, oci_state].count(None) != 2:
        _fail("register needs exactly one of --pid, --slurm-job and --oci-state")
    if oci_state is not None:
        pid, grants, job = _oci_container(oci_state, grants, job)
    if detach:
        _detach()
    if slurm_job is not None:
        pid = _slurm_launcher(opts, slurm_job, wait)
        job = job or f"slurm-{slurm_job}"
    registry = opts.registry(with_allowlist=False)
    try:
        reg = registry.register(pid, grants, job, include_children)
    except RegistrationError as exc:
        _fail(str(exc))
    except PermissionError as exc:
        _fail(
            f"cannot write {registry.directory}: {exc.strerror}; register as root (as job "
            "launchers and Slurm prologs do), or see gpu.user_registration in docs/gpu.md"
        )
    if as_json:
        click.echo(json.dumps(reg.to_json(), sort_keys=True))
    else:
        click.echo(f"registered {_describe(reg)}")


def _oci_container(stream, grants, job) -> tuple[int, tuple[str, ...] | None, str | None]:
    """pid, GPUs and job of an OCI container's state; exits 0 (and says why)
    when it asks for no registration."""
    from rome_guard.gpu.oci import OciStateError, registration_for

    try:
        wanted, why = registration_for(json.load(stream))
    except (ValueError, OciStateError) as exc:
        _fail(f"--oci-state: {exc}")
    if wanted is None:
        click.echo(f"not registered: {why}")
        sys.exit(0)
    return wanted.pid, grants or wanted.gpus, job or wanted.job


def _detach() -> None:
    """Fork; the parent exits once the child leads a session of its own."""
    import os

    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        os.read(ready_r, 1)
        os._exit(0)
    os.close(ready_r)
    os.setsid()
    os.write(ready_w, b"1")
    os.close(ready_w)


def _slurm_launcher(opts: _Options, job_id: str, wait: float) -> int:
    import contextlib
    import time

    from rome_guard import procfs
    from rome_guard.gpu.slurm import SlurmClient, SlurmError, find_launcher

    if not job_id.isdigit():
        _fail(f"--slurm-job: {job_id!r} is not a Slurm job id")
    config = opts.config().gpu.slurm
    client = SlurmClient(config.scontrol, config.conf, config.timeout)

    def ppid(pid: int) -> int | None:
        try:
            return procfs.read_stat(pid).ppid
        except procfs.ProcessGone:
            return None

    deadline = time.monotonic() + wait
    next_check = time.monotonic() + 2.0
    while True:
        # until the batch step starts, slurmd does not know the job: not yet an error
        try:
            found = find_launcher(client.listpids(job_id), job_id, ppid)
            problem = f"Slurm job {job_id} has no launcher process on this node"
        except SlurmError as exc:
            found, problem = None, str(exc)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            _fail(problem)
        if time.monotonic() >= next_check:
            # a job cancelled before its batch step ran has nothing to register
            with contextlib.suppress(SlurmError):
                state = client.job_state(job_id)
                if state not in ("PENDING", "CONFIGURING", "RUNNING"):
                    _fail(f"Slurm job {job_id} is {state or 'gone'}: nothing to register")
            next_check = time.monotonic() + 2.0
        time.sleep(0.2)


@gpu.command()
@click.option("--pid", type=int, default=None, help="Remove the registrations of this pid.")
@click.option("--job", default=None, help="Remove the registrations of this job.")
@click.pass_obj
def unregister(opts: _Options, pid: int | None, job: str | None) -> None:
    """Remove registrations by pid or by job name."""
    if pid is None and job is None:
        _fail("unregister needs --pid or --job")
    registry = opts.registry(with_allowlist=False)
    try:
        removed = registry.unregister(pid=pid, job=job)
    except PermissionError as exc:
        _fail(f"cannot remove from {registry.directory}: {exc.strerror}")
    for reg in removed:
        click.echo(f"unregistered {_describe(reg)}")
    if not removed:
        click.echo("no registration matched")


@gpu.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def list_consumers(opts: _Options, as_json: bool) -> None:
    """GPUs, the processes on them, and whether each is registered.

    Exit 0: every consumer is registered or allowed; 1: some is not; 2: NVML
    is unavailable or the config is wrong."""
    from rome_guard.gpu import allocations
    from rome_guard.gpu.report import collect, to_json, to_table
    from rome_guard.sensors.nvml import NvmlSensor

    config = opts.config()
    registry = opts.registry(with_allowlist=True, allocations=allocations.from_config(config))
    # a listing must not change device settings: accounting mode stays as it is
    with NvmlSensor(poll_interval=config.gpu.poll_interval, accounting=False) as sensor:
        snapshot = sensor.poll()
        driver = sensor.driver_version
    registry.allocations.refresh()
    try:
        listing = collect(snapshot, registry, driver=driver)
    finally:
        registry.allocations.close()
    if as_json:
        click.echo(json.dumps(to_json(listing), indent=2, sort_keys=True))
    else:
        click.echo(to_table(listing), nl=False)
    if not snapshot.available:
        sys.exit(EXIT_ERROR)
    if listing.findings:
        sys.exit(EXIT_FINDINGS)
