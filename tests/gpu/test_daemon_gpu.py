"""The daemon against the stand-in libnvidia-ml with real processes: who
holds a GPU, who registered, who was granted what, and a CUDA-style
/dev/nvidia-uvm open judged before NVML lists the process."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_root
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon, by_pid
from tests.fixtures.network import wait_until

GPU0, GPU1 = "GPU-00000000-0000-0000-0000-000000000000", "GPU-11111111-1111-1111-1111-111111111111"


def register(run_dir: str, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rome_guard", "gpu", "--run-dir", run_dir, "register", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_daemon_judges_gpu_consumers_through_real_pynvml(sleepers, tmp_path: Path) -> None:
    require_root()
    state_file = tmp_path / "nvml.state"
    state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0), fake_nvml.FakeGpu(1, GPU1)])
    state.write(state_file)
    env = fake_nvml.environment(state_file)
    d = Daemon(
        sensor="ebpf",
        env=env,
        config_text="rules: []\ngpu:\n  poll_interval: 0.3\n  accounting: false\n",
    )
    try:
        d.wait_ready()
        d.wait_log("GPU features on: 2 GPU(s)")
        stray = sleepers()
        trainer = sleepers("sh", "-c", "sleep 300 & wait")
        wait_until(
            lambda: (
                len(
                    subprocess.run(
                        ["pgrep", "-P", str(trainer.pid)], capture_output=True, text=True
                    ).stdout.split()
                )
                == 1
            )
        )
        child = int(
            subprocess.run(
                ["pgrep", "-P", str(trainer.pid)], capture_output=True, text=True
            ).stdout.split()[0]
        )
        granted = sleepers()
        register(d.run_dir, "--pid", str(trainer.pid), "--gpus", "0,1", "--job", "rl-train")
        register(d.run_dir, "--pid", str(granted.pid), "--gpus", "0", "--job", "eval")
        state.processes = [
            fake_nvml.FakeProcess(0, stray.pid, memory=3 * 2**30, sm_util=97),
            fake_nvml.FakeProcess(0, trainer.pid),
            fake_nvml.FakeProcess(1, child),  # the agent's tool call, inside the trainer's tree
            fake_nvml.FakeProcess(0, granted.pid),
            fake_nvml.FakeProcess(1, granted.pid),  # not granted GPU 1
        ]
        state.generation += 1
        state.write(state_file)
        unregistered = d.wait_alert(by_pid(stray.pid, "gpu-unregistered-consumer"))
        assert unregistered["category"] == "gpu_unregistered"
        gpu = unregistered["gpu"]
        assert (gpu["index"], gpu["uuid"], gpu["mig"], gpu["used_memory_bytes"]) == (
            0,
            GPU0,
            None,
            3 * 2**30,
        )
        assert gpu["sm_util"] in (
            None,
            97,
        )  # utilization needs a sample window: maybe not on the first poll
        inside = d.wait_alert(by_pid(child, "gpu-unregistered-consumer"))
        assert "rl-train" in inside["reason"] and inside["gpu"]["index"] == 1
        wrong_gpu = d.wait_alert(by_pid(granted.pid, "gpu-unregistered-consumer"))
        assert wrong_gpu["gpu_verdict"] == "gpu_not_granted" and wrong_gpu["gpu"]["uuid"] == GPU1
        d.settle(1.0)
        assert d.alerts_for(by_pid(trainer.pid)) == []
        body = (
            urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        labels = (("UUID", GPU0), ("gpu", "0"))
        assert samples[("rome_guard_gpu_processes", (*labels, ("registered", "false")))] == 1
        assert samples[("rome_guard_gpu_unregistered_memory_bytes", labels)] == 3 * 2**30
    finally:
        d.stop()


OPENER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
time.sleep(30)
"""


def test_cuda_context_open_is_judged_before_nvml_lists_it(tmp_path: Path, uvm: str) -> None:
    require_root()
    state_file = tmp_path / "nvml.state"
    state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0)])
    state.write(state_file)
    d = Daemon(
        sensor="ebpf",
        env=fake_nvml.environment(state_file),
        config_text="rules: []\ngpu:\n  poll_interval: 0.3\n  accounting: false\n",
    )
    opener = None
    try:
        d.wait_ready()
        d.wait_log("GPU features on")
        opener = subprocess.Popen([sys.executable, "-c", OPENER, uvm])
        alert = d.wait_alert(by_pid(opener.pid, "gpu-unregistered-consumer"))
        assert alert["gpu_source"] == "open" and "nvidia-uvm" in alert["reason"]
        state.processes = [fake_nvml.FakeProcess(0, opener.pid, memory=2**30)]
        state.generation += 1
        state.write(state_file)
        confirmed = d.wait_alert(
            lambda r: r.get("event") == "confirmed" and r["alert_id"] == alert["id"]
        )
        assert confirmed["gpu"]["uuid"] == GPU0 and confirmed["gpu"]["used_memory_bytes"] == 2**30
        records = d.alerts_for(by_pid(opener.pid, "gpu-unregistered-consumer"))
        assert [r["event"] for r in records] == ["alert", "confirmed"]  # one alert, confirmed once
    finally:
        if opener is not None:
            opener.kill()
            opener.wait()
        d.stop()
