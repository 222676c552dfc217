"""Fixtures for the GPU tests: real processes to stand in as GPU consumers,
the stand-in libnvidia-ml.so.1, and a worker process that runs the NVML
sensor through the real pynvml bindings against it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from rome_guard.linux import cgroup2_root
from tests.conftest import require
from tests.fixtures import fake_nvml
from tests.fixtures.kubelet import FakeKubelet
from tests.fixtures.slurm import SlurmCluster

REPO = Path(__file__).resolve().parents[2]


class Processes:
    """Real processes started by a test, each ended by its own pid."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.extra_pids: list[int] = []

    def sleeper(self, *argv: str, **kwargs) -> subprocess.Popen:
        cmd = list(argv) or ["sleep", "1000"]
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, **kwargs)
        self.started.append(proc)
        return proc

    def parent_with_child(self) -> tuple[subprocess.Popen, int]:
        """A shell and its child (a sleep); returns (shell, child pid)."""
        proc = subprocess.Popen(
            ["sh", "-c", "sleep 1000 & echo $!; wait"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        self.started.append(proc)
        child = int(proc.stdout.readline())
        self.extra_pids.append(child)
        return proc, child

    def exited_pid(self) -> int:
        """The pid of a process that has already exited."""
        proc = subprocess.Popen(["true"])
        proc.wait()
        return proc.pid

    def stop(self) -> None:
        for pid in self.extra_pids:
            # the shell still waits for it, so the pid cannot have been reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream:
                    stream.close()


@pytest.fixture
def processes() -> Iterator[Processes]:
    procs = Processes()
    try:
        yield procs
    finally:
        procs.stop()


@pytest.fixture(scope="session")
def fake_library() -> None:
    """Build the stand-in libraries once per session."""
    require(
        shutil.which("gcc") is not None or shutil.which("cc") is not None,
        "gcc is needed to build the stand-in libnvidia-ml.so.1",
    )
    for variant in (fake_nvml.FULL, fake_nvml.OLD, fake_nvml.BROKEN):
        fake_nvml.library_dir(variant)


WORKER = r"""
import json, logging, sys
from dataclasses import asdict
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(levelname)s %(message)s")
from rome_guard.sensors.nvml import NvmlSensor
now = [1000.0]
sensor = NvmlSensor(poll_interval=5.0, accounting=ACCOUNTING, clock=lambda: now[0])
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "advance":
        now[0] += cmd["seconds"]
        out = None
    elif cmd["op"] == "start":
        out = sensor.start()
    elif cmd["op"] == "poll":
        out = asdict(sensor.poll())
    elif cmd["op"] == "errors":
        out = [[*key, n] for key, n in sensor.error_counts().items()]
    elif cmd["op"] == "close":
        sensor.close()
        out = None
    print(json.dumps(out), flush=True)
"""


class NvmlWorker:
    """A process that loads the stand-in library and runs an NvmlSensor
    with a clock the test advances."""

    def __init__(self, state_file: Path, variant: str, accounting: bool, calls_file: Path):
        code = WORKER.replace("ACCOUNTING", repr(accounting))
        env = fake_nvml.environment(state_file, variant, calls_file)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            cwd=REPO,
        )
        self.calls_file = calls_file
        self.stderr = ""

    def _ask(self, op: str, **args) -> object:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.finish()
            raise AssertionError(f"NVML worker died:\n{self.stderr}")
        return json.loads(line)

    def start(self) -> bool:
        return self._ask("start")

    def poll(self) -> dict:
        return self._ask("poll")

    def advance(self, seconds: float) -> None:
        self._ask("advance", seconds=seconds)

    def errors(self) -> dict[tuple[str, str, str], int]:
        return {(g, c, e): n for g, c, e, n in self._ask("errors")}

    def close(self) -> None:
        self._ask("close")

    def calls(self) -> dict[str, int]:
        """NVML calls per symbol, as the library counted them (after close)."""
        return fake_nvml.read_calls(self.calls_file)

    def finish(self) -> str:
        """End the worker; its log (stderr)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr += self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.stderr


@pytest.fixture
def nvml_worker(fake_library, tmp_path):
    """Factory: nvml_worker(state, variant=FULL, accounting=True)."""
    workers: list[NvmlWorker] = []

    def start(
        state: fake_nvml.FakeState, variant: str = fake_nvml.FULL, accounting: bool = True
    ) -> tuple[NvmlWorker, Path]:
        state_file = tmp_path / f"state-{len(workers)}.txt"
        state.write(state_file)
        worker = NvmlWorker(state_file, variant, accounting, tmp_path / f"calls-{len(workers)}")
        workers.append(worker)
        return worker, state_file

    try:
        yield start
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait()
            for stream in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr):
                if stream and not stream.closed:
                    stream.close()


# --- schedulers: a stand-in kubelet and a real Slurm ---------------------------


@pytest.fixture
def kubelet(tmp_path_factory) -> Iterator[FakeKubelet]:
    """A real gRPC server speaking kubelet's PodResources v1 on a unix
    socket (started by the test: kubelet.start()), with its pod log dirs."""
    root = tmp_path_factory.mktemp("kubelet")
    gen = tmp_path_factory.getbasetemp() / "podresources-gen"
    fake = FakeKubelet(root / "kubelet.sock", root / "pods", gen)
    try:
        yield fake
    finally:
        fake.stop()


class PodCgroups:
    """cgroup v2 directories shaped like a kubelet's (systemd driver), each
    with real processes in them."""

    def __init__(self, processes: Processes) -> None:
        mount = cgroup2_root()
        self.top = os.path.join(mount, f"rg-test-{uuid.uuid4().hex[:8]}")
        self.processes = processes
        self.dirs: list[str] = []

    def container(self, pod_uid: str, container_id: str | None = None) -> str:
        pod = pod_uid.replace("-", "_")
        container_id = container_id or uuid.uuid4().hex + uuid.uuid4().hex
        path = os.path.join(
            self.top,
            "kubepods.slice",
            f"kubepods-pod{pod}.slice",
            f"cri-containerd-{container_id}.scope",
        )
        os.makedirs(path)
        self.dirs.append(path)
        return path

    def start(self, cgroup: str, *argv: str) -> subprocess.Popen:
        def enter() -> None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                f.write("0")

        return self.processes.sleeper(*argv, preexec_fn=enter)

    def remove(self) -> None:
        self.processes.stop()
        for path in sorted(self.dirs, key=len, reverse=True):
            while path.startswith(self.top):
                for _ in range(100):  # the last member may still be exiting
                    try:
                        os.rmdir(path)
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)
                path = os.path.dirname(path)


@pytest.fixture
def pod_cgroups(processes) -> Iterator[PodCgroups]:
    require(os.geteuid() == 0, "pod cgroups need root")
    cgroups = PodCgroups(processes)
    try:
        yield cgroups
    finally:
        cgroups.remove()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Iterator[SlurmCluster]:
    """A real single-node Slurm with 4 GRES GPUs and the shipped prolog and
    epilog; torn down (jobs cancelled, daemons stopped) after the module."""
    require(os.geteuid() == 0, "slurmd runs jobs as root here")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def uvm() -> Iterator[str]:
    """No GPU here: a stand-in file under the UVM device's name. Made with
    mknod, not open: a guard running on this host sees opens of
    /dev/nvidia-uvm*, and the test process must not be the one that opens it."""
    require(os.geteuid() == 0, "creating a file in /dev needs root")
    path = f"/dev/nvidia-uvm-rgtest-{uuid.uuid4().hex[:12]}"
    os.mknod(path, 0o600 | stat.S_IFREG)
    try:
        yield path
    finally:
        os.unlink(path)


@pytest.fixture
def sleepers():
    """Start real processes (sleep 300 by default), killed after the test."""
    started: list[subprocess.Popen] = []

    def start(*argv: str) -> subprocess.Popen:
        proc = subprocess.Popen(list(argv) or ["sleep", "300"], stdin=subprocess.DEVNULL)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()
