"""The daemon with a scheduler: a stand-in kubelet (a real gRPC server) and
real processes in pod-shaped cgroups on the stand-in NVML library. Alerts
carry the verdict and who decided it; metrics count consumers by verdict and
GPUs by owner kind; status.json says which sources are live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon, by_pid
from tests.fixtures.kubelet import FakePod
from tests.fixtures.network import wait_until
from tests.gpu.test_daemon_gpu import OPENER

GPU0, GPU1 = "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111"


def scrape(port: int) -> dict:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_daemon_alerts_on_a_pod_without_gpus_and_counts_verdicts(
    tmp_path: Path, kubelet, pod_cgroups, uvm
) -> None:
    require_root()
    trainer_pod = kubelet.add_pod(
        FakePod("ml", "trainer-0", {"main": [("nvidia.com/gpu", [GPU0])]})
    )
    web_pod = kubelet.add_pod(FakePod("web", "api-7f9c", {"app": []}))
    kubelet.start()
    trainer_cg = pod_cgroups.container(trainer_pod.uid)
    trainer = pod_cgroups.start(trainer_cg, "sleep", "1000")
    helper = pod_cgroups.start(trainer_cg, "sleep", "1001")  # not registered, same pod
    web_cg = pod_cgroups.container(web_pod.uid)
    intruder = pod_cgroups.start(web_cg, "sleep", "1002")

    state_file = tmp_path / "nvml.state"
    state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0), fake_nvml.FakeGpu(1, GPU1)])
    state.write(state_file)
    d = Daemon(
        sensor="ebpf",
        env=fake_nvml.environment(state_file),
        config_text=(
            "rules: []\ngpu:\n  poll_interval: 0.3\n  accounting: false\n"
            "  allocation_refresh: 0.5\n"
            f"  kubelet:\n    socket: {kubelet.socket}\n    pod_logs_dir: {kubelet.pod_logs_dir}\n"
            "  slurm:\n    enabled: 'off'\n"
        ),
    )
    try:
        d.wait_ready()
        d.wait_log("GPU allocations from kubelet: 2 owner(s)")
        from tests.gpu.test_daemon_gpu import register

        register(d.run_dir, "--pid", str(trainer.pid), "--gpus", GPU0, "--job", "sft")
        # CUDA in the pod with no GPU: judged at the open, before NVML lists it
        opener = pod_cgroups.start(web_cg, sys.executable, "-c", OPENER, uvm)
        opened = d.wait_alert(by_pid(opener.pid, "gpu-unregistered-consumer"))
        assert opened["gpu_source"] == "open"
        assert opened["gpu_verdict"] == "gpu_not_allocated"
        assert opened["allocation_source"] == "kubelet"
        # in the trainer's pod (allocated a GPU) the open is judged on registration
        trainer_opener = pod_cgroups.start(trainer_cg, sys.executable, "-c", OPENER, uvm)
        opened = d.wait_alert(by_pid(trainer_opener.pid, "gpu-unregistered-consumer"))
        assert opened["gpu_verdict"] == "unregistered"

        state.processes = [
            fake_nvml.FakeProcess(0, trainer.pid),
            fake_nvml.FakeProcess(0, helper.pid),
            fake_nvml.FakeProcess(1, intruder.pid, memory=5 * 2**30),
        ]
        state.generation += 1
        state.write(state_file)
        alert = d.wait_alert(by_pid(intruder.pid, "gpu-unregistered-consumer"))
        assert alert["gpu_verdict"] == "gpu_not_allocated"
        assert alert["allocation_source"] == "kubelet"
        assert "web/api-7f9c" in alert["reason"]
        inside = d.wait_alert(by_pid(helper.pid, "gpu-unregistered-consumer"))
        assert inside["gpu_verdict"] == "unregistered"
        assert inside["allocation_source"] == "kubelet"
        assert "ml/trainer-0" in inside["reason"]

        def counted() -> bool:
            samples = scrape(d.metrics_port)
            g0 = (("UUID", GPU0), ("gpu", "0"))
            g1 = (("UUID", GPU1), ("gpu", "1"))
            return (
                samples.get(("rome_guard_gpu_consumers", (*g0, ("verdict", "allowed")))) == 1
                and samples.get(("rome_guard_gpu_consumers", (*g0, ("verdict", "unregistered"))))
                == 1
                and samples.get(
                    ("rome_guard_gpu_consumers", (*g1, ("verdict", "gpu_not_allocated")))
                )
                == 1
                and samples.get(("rome_guard_gpu_allocations", (*g0, ("owner_kind", "pod")))) == 1
                and samples.get(("rome_guard_gpu_allocations", (*g1, ("owner_kind", "pod")))) == 0
                and samples.get(("rome_guard_gpu_allocation_source_up", (("source", "kubelet"),)))
                == 1
            )

        wait_until(counted)
        assert d.alerts_for(by_pid(trainer.pid)) == []

        def status() -> dict:
            return json.loads(Path(d.run_dir, "status.json").read_text())["gpu"]

        wait_until(lambda: status()["allocation_sources"]["kubelet"] == "live", timeout=30)
        shown = subprocess.run(
            [sys.executable, "-m", "rome_guard", "status", "--run-dir", d.run_dir],
            capture_output=True,
            text=True,
            timeout=60,
        )
        gpu_line = next(line for line in shown.stdout.splitlines() if line.startswith("gpu "))
        assert json.loads(gpu_line[4:])["allocation_sources"]["kubelet"] == "live"

        # the kubelet goes away: the daemon says so and goes on
        kubelet.stop()
        d.wait_log("GPU allocations from kubelet unavailable (no socket at")
        wait_until(
            lambda: (
                scrape(d.metrics_port).get(
                    ("rome_guard_gpu_allocation_source_up", (("source", "kubelet"),))
                )
                == 0
            )
        )
        assert os.path.exists(d.run_dir)
    finally:
        d.stop()
