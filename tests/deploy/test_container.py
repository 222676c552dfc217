"""The DaemonSet's container, built and run as the manifest says.

deploy/Dockerfile is built on a base imported from the cached Debian root
(no registry is reachable) by a private dockerd (tests/fixtures/docker.py),
and run with the pod's host PID and network namespaces, capabilities,
security options and volumes read from deploy/daemonset.yaml, and its
ConfigMap's config (only the metrics port and the mode changed). A fake
miner started on the host, outside the container, is alerted with its
host pid and, in enforce mode, killed; stopping the container leaves
nothing attached.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Callable

import pytest
import yaml

from tests.conftest import require, require_root
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import owned_bpf_programs
from tests.fixtures.debian_root import debian_root, wheelhouse, working_tree_tar
from tests.fixtures.docker import UNKNOWN_TO_OLD_RUNTIMES, Dockerd, Pod
from tests.fixtures.network import free_port
from tests.fixtures.wire import CountingServer, fake_miner

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

IMAGE = "rome-guard-test:latest"
GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
PIN_ROOT = "/sys/fs/bpf/rome-guard"


def _build_context(wheels: str) -> str:
    """The working tree as a clone has it, plus the wheels for an offline build."""
    context = tempfile.mkdtemp(prefix="rg-image-")
    tar = working_tree_tar()
    subprocess.run(["tar", "-C", context, "-x"], input=tar, check=True)
    shutil.copytree(wheels, os.path.join(context, "wheels"))
    return context


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Dockerd]:
    require_root()
    for tool in ("dockerd", "docker", "debootstrap"):
        require(shutil.which(tool) is not None, f"{tool} missing: scripts/setup-host.sh --test")
    root = debian_root()
    wheels = wheelhouse(root)
    with Dockerd() as daemon:
        base = daemon.base_image(root)
        context = _build_context(wheels)
        try:
            daemon.docker(
                "build", "--network=host", "-q", "-f", os.path.join(context, "deploy", "Dockerfile"),
                "--build-arg", f"BASE={base}",
                "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links /src/wheels",
                "-t", IMAGE, context,
            )  # fmt: skip
        finally:
            shutil.rmtree(context, ignore_errors=True)
        yield daemon


class Guard:
    """The pod's guard container and its journal on the (scratch) node."""

    def __init__(self, docker: Dockerd, mode: str, runtime_args: tuple[str, ...] = ()):
        self.docker = docker
        self.pod = Pod.shipped()
        self.node = tempfile.mkdtemp(prefix="rg-node-")
        self.name = f"rg-pod-{uuid.uuid4().hex[:8]}"
        config = self.pod.config
        config["mode"] = mode
        config.setdefault("metrics", {})["addr"] = f"127.0.0.1:{free_port()}"  # host network
        unknown = docker.unknown_capabilities(IMAGE, self.pod.capabilities())
        self.renamed = {c: UNKNOWN_TO_OLD_RUNTIMES[c] for c in unknown}
        args = self.pod.run_args(self.node, yaml.safe_dump(config), self.renamed)
        args += runtime_args  # what a runtime adds to the pod (NVIDIA's: libnvidia-ml)
        docker.docker("run", "-d", "--name", self.name, *args, IMAGE, *self.pod.container["args"])
        self.alerts = os.path.join(self.node, "var", "lib", "rome-guard", "alerts.jsonl")

    def logs(self) -> str:
        out = self.docker.docker("logs", self.name, check=False)
        return (out.stdout + out.stderr).decode(errors="replace")

    def wait_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs():
                return
            state = self.docker.docker("inspect", "-f", "{{.State.Running}}", self.name).stdout
            assert state.strip() == b"true", self.logs()
            time.sleep(0.5)
        raise AssertionError(f"no {text!r} in:\n{self.logs()}")

    def host_pid(self) -> int:
        return int(self.docker.docker("inspect", "-f", "{{.State.Pid}}", self.name).stdout)

    def records(self) -> list[dict]:
        try:
            with open(self.alerts) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def wait_record(self, predicate: Callable[[dict], bool], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                try:
                    if predicate(record):
                        return record
                except (KeyError, TypeError):
                    pass
            time.sleep(0.2)
        raise AssertionError(f"no such record in {self.records()}\n{self.logs()}")

    def stop(self) -> None:
        grace = str(self.pod.spec.get("terminationGracePeriodSeconds", 30))
        self.docker.docker("stop", "-t", grace, self.name, check=False)

    def remove(self) -> None:
        self.docker.docker("rm", "-f", self.name, check=False)
        shutil.rmtree(self.node, ignore_errors=True)


@pytest.fixture
def guard_in(dockerd) -> Iterator[Callable[[str], Guard]]:
    started: list[Guard] = []

    def start(mode: str, runtime_args: tuple[str, ...] = ()) -> Guard:
        guard = Guard(dockerd, mode, runtime_args)
        started.append(guard)
        guard.wait_log("rome-guard running:")
        return guard

    yield start
    for guard in started:
        guard.remove()


def _alert_of(pid: int, rule: str) -> Callable[[dict], bool]:
    return lambda r: (
        r["event"] == "alert"
        and r["process"]["pid"] == pid
        and rule in [x["rule"] for x in r["rules"]]
    )


def test_the_pod_guards_the_host_from_its_container(guard_in, tmp_path) -> None:
    """eBPF from inside the container (no privileged: true), a miner on the
    host alerted with its host pid and host cgroup, and what the pod's
    capability set had to be renamed to on this runtime, if anything."""
    guard = guard_in("monitor")
    assert "ebpf sensor" in guard.logs(), guard.logs()
    assert set(guard.renamed) <= {"BPF", "PERFMON"}  # Docker 20.10 knows neither name
    pool = CountingServer("127.10.18.1", 443)
    try:
        miner = fake_miner(str(tmp_path), f"{pool.host}:{pool.port}", name="kworker-sync")
        alert = guard.wait_record(_alert_of(miner.pid, "miner-stratum-login"))
        miner.wait(30)
    finally:
        pool.close()
    assert alert["process"]["comm"] == "kworker-sync"
    assert alert["lineage"][0]["pid"] == os.getpid()  # the host's process tree
    with open(f"/proc/{os.getpid()}/cgroup") as f:
        ours = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")][0]
    assert alert["process"]["cgroup"] == ours


def test_the_pod_kills_a_host_miner_in_enforce_mode(guard_in, tmp_path) -> None:
    guard = guard_in("enforce")
    pool = CountingServer("127.10.18.2", 443)
    try:
        miner = fake_miner(str(tmp_path), f"{pool.host}:{pool.port}", name="kworker-flush")
        response = guard.wait_record(
            lambda r: r["event"] == "response" and r["process"]["pid"] == miner.pid
        )
        assert miner.wait(30) == -9
    finally:
        pool.close()
    assert response["action"] == "killed"
    assert pool.bytes_received == 0  # dropped in the kernel before the pool saw the login


OPENER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
time.sleep(60)
"""


def test_the_pod_judges_a_cuda_open_on_the_host(guard_in, tmp_path) -> None:
    """The stand-in libnvidia-ml mounted as NVIDIA's container runtime
    mounts the real one: a host process opening /dev/nvidia-uvm is judged at
    the open (eBPF), by its host pid, before NVML lists it."""
    lib = fake_nvml.library_dir()
    state = tmp_path / "nvml"
    state.mkdir()
    fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0)]).write(state / "state")
    runtime = (
        "-v", f"{lib}:/usr/lib/nvidia-stand-in:ro", "-v", f"{state}:/run/nvidia-stand-in:ro",
        "-e", "LD_LIBRARY_PATH=/usr/lib/nvidia-stand-in",
        "-e", "FAKE_NVML_STATE=/run/nvidia-stand-in/state",
    )  # fmt: skip
    guard = guard_in("monitor", runtime)
    guard.wait_log("GPU features on: 1 GPU(s)")
    uvm = f"/dev/nvidia-uvm-rgtest-{uuid.uuid4().hex[:12]}"
    os.mknod(uvm, 0o600 | stat.S_IFREG)  # mknod: the test process must not be the opener
    opener = None
    try:
        opener = subprocess.Popen([sys.executable, "-c", OPENER, uvm])
        alert = guard.wait_record(_alert_of(opener.pid, "gpu-unregistered-consumer"))
        assert alert["gpu_source"] == "open" and "nvidia-uvm" in alert["reason"]
    finally:
        if opener is not None:
            opener.kill()
            opener.wait()
        os.unlink(uvm)


def test_stopping_the_pod_leaves_nothing_attached(guard_in) -> None:
    guard = guard_in("enforce")
    pid = guard.host_pid()
    programs = owned_bpf_programs(pid)
    assert programs  # it attached from inside the container
    pins = [p for p in os.listdir(PIN_ROOT) if p.startswith(f"{pid}-")]
    guard.stop()
    assert not os.path.exists(f"/proc/{pid}")
    left = (
        [p for p in os.listdir(PIN_ROOT) if p.startswith(f"{pid}-")]
        if os.path.isdir(PIN_ROOT)
        else []
    )
    assert left == [], pins
    listed = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True)
    alive = {p["id"] for p in json.loads(listed.stdout or "[]")}
    assert programs & alive == set()
