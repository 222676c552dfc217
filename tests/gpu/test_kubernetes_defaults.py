"""The shipped DaemonSet config under a scheduler: with the stand-in kubelet
(a real PodResources gRPC server), pod-shaped cgroups and the stand-in NVML,
in enforce mode a pod's process on its own allocated GPU lives, a pod on a
GPU it was not given is killed; and for sites that keep `trust: process`,
the OCI hook (scripts/oci-gpu-hook.sh) registers a container's process so
that it lives while an unregistered process in the same pod is killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import require_root
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon, by_pid
from tests.fixtures.docker import Pod
from tests.fixtures.kubelet import FakePod

GPU0, GPU1 = "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111"
HOOK = Path(__file__).resolve().parents[2] / "scripts" / "oci-gpu-hook.sh"


def daemonset_config(kubelet, **gpu) -> str:
    """The DaemonSet's ConfigMap config, pointed at the stand-in kubelet;
    only timings and paths changed (and what a test names in gpu)."""
    config = Pod.shipped().config
    section = config.setdefault("gpu", {})
    section.update(poll_interval=0.3, accounting=False, allocation_refresh=0.5, **gpu)
    section["kubelet"].update(
        socket=str(kubelet.socket),
        pod_logs_dir=str(kubelet.pod_logs_dir),
        container_logs_dir=str(kubelet.container_logs_dir),
    )
    section["slurm"] = {"enabled": "off"}
    return yaml.safe_dump(config)


def start(tmp_path: Path, kubelet, config_text: str, processes) -> tuple[Daemon, Path]:
    state_file = tmp_path / "nvml.state"
    state = fake_nvml.FakeState(
        gpus=[fake_nvml.FakeGpu(0, GPU0), fake_nvml.FakeGpu(1, GPU1)], processes=processes
    )
    state.write(state_file)
    d = Daemon(
        sensor="ebpf",
        mode="enforce",
        env=fake_nvml.environment(state_file),
        config_text=config_text,
    )
    d.wait_ready()
    d.wait_log("GPU allocations from kubelet: 2 owner(s)")
    return d, state_file


def publish(state_file: Path, processes) -> None:
    state = fake_nvml.FakeState(
        gpus=[fake_nvml.FakeGpu(0, GPU0), fake_nvml.FakeGpu(1, GPU1)],
        processes=processes,
        generation=1,
    )
    state.write(state_file)


def killed(d: Daemon, pid: int) -> dict:
    return d.wait_alert(lambda r: r["event"] == "response" and r["process"]["pid"] == pid)


def test_an_allocated_pods_gpu_process_survives_enforce_mode(
    tmp_path, kubelet, pod_cgroups
) -> None:
    require_root()
    trainer_pod = kubelet.add_pod(
        FakePod("ml", "trainer-0", {"main": [("nvidia.com/gpu", [GPU0])]})
    )
    web_pod = kubelet.add_pod(FakePod("web", "api-7f9c", {"app": []}))
    kubelet.start()
    trainer = pod_cgroups.start(pod_cgroups.container(trainer_pod.uid), "sleep", "1000")
    worker = pod_cgroups.start(pod_cgroups.container(trainer_pod.uid), "sleep", "1001")
    intruder = pod_cgroups.start(pod_cgroups.container(web_pod.uid), "sleep", "1002")
    d, state_file = start(tmp_path, kubelet, daemonset_config(kubelet), [])
    try:
        publish(
            state_file,
            [
                fake_nvml.FakeProcess(0, trainer.pid),
                fake_nvml.FakeProcess(0, worker.pid),  # unregistered, in its pod's allocation
                fake_nvml.FakeProcess(1, intruder.pid),  # a pod on a GPU it was not given
            ],
        )
        response = killed(d, intruder.pid)
        assert response["action"] == "killed" and intruder.wait(10) == -9
        d.settle(2.0)
        assert trainer.poll() is None and worker.poll() is None
        assert d.alerts_for(by_pid(trainer.pid)) == [] and d.alerts_for(by_pid(worker.pid)) == []
    finally:
        d.stop()


def oci_hook(tmp_path: Path, run_dir: str, pid: int, visible: str, pod: FakePod) -> str:
    """Run the shipped hook as a runtime does: the OCI state on stdin."""
    bundle = tmp_path / f"bundle-{pid}"
    bundle.mkdir()
    env = ["PATH=/usr/bin:/bin", f"NVIDIA_VISIBLE_DEVICES={visible}"]
    (bundle / "config.json").write_text(
        json.dumps({"ociVersion": "1.0.2", "process": {"env": env}})
    )
    state = {
        "ociVersion": "1.0.2",
        "id": f"c{pid}",
        "status": "creating",
        "pid": pid,
        "bundle": str(bundle),
        "annotations": {
            "io.kubernetes.cri.sandbox-name": pod.name,
            "io.kubernetes.cri.sandbox-namespace": pod.namespace,
        },
    }
    log = tmp_path / f"hook-{pid}.log"
    hook_env = dict(
        os.environ,
        ROME_GUARD=f"{sys.executable} -m rome_guard",
        ROME_GUARD_RUN_DIR=run_dir,
        ROME_GUARD_OCI_LOG=str(log),
    )
    result = subprocess.run(
        ["sh", str(HOOK)],
        input=json.dumps(state),
        env=hook_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0  # a failing hook would fail the container
    return log.read_text()


def test_trust_process_sites_register_through_the_oci_hook(tmp_path, kubelet, pod_cgroups) -> None:
    require_root()
    trainer_pod = kubelet.add_pod(
        FakePod("ml", "trainer-0", {"main": [("nvidia.com/gpu", [GPU0])]})
    )
    cuda_pod = kubelet.add_pod(FakePod("dev", "notebook", {"nb": []}))  # a CUDA image, no GPU asked
    kubelet.start()
    trainer = pod_cgroups.start(pod_cgroups.container(trainer_pod.uid), "sleep", "1000")
    tool_call = pod_cgroups.start(pod_cgroups.container(trainer_pod.uid), "sleep", "1001")
    notebook = pod_cgroups.start(pod_cgroups.container(cuda_pod.uid), "sleep", "1002")
    d, state_file = start(tmp_path, kubelet, daemonset_config(kubelet, trust="process"), [])
    try:
        assert "registered" in oci_hook(tmp_path, d.run_dir, trainer.pid, GPU0, trainer_pod)
        said = oci_hook(tmp_path, d.run_dir, notebook.pid, "all", cuda_pod)
        assert said.strip() == (
            "not registered: NVIDIA_VISIBLE_DEVICES=all names no allocation (only the device plugin's do)"
        )
        publish(
            state_file,
            [
                fake_nvml.FakeProcess(0, trainer.pid),
                fake_nvml.FakeProcess(0, tool_call.pid),
                fake_nvml.FakeProcess(1, notebook.pid),
            ],
        )
        assert killed(d, tool_call.pid)["action"] == "killed"
        assert killed(d, notebook.pid)["action"] == "killed"
        d.settle(2.0)
        assert trainer.poll() is None and d.alerts_for(by_pid(trainer.pid)) == []
        listed = subprocess.run(
            [sys.executable, "-m", "rome_guard", "gpu", "--run-dir", d.run_dir, "list", "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "ml/trainer-0" in listed.stdout
    finally:
        d.stop()
