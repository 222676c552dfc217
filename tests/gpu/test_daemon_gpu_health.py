"""The daemon's GPU health metrics against the stand-in libnvidia-ml:
rome_guard_sensor_up{sensor="nvml"} and rome_guard_nvml_errors_total
from scripted NVML failures, through the real pynvml bindings."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from tests.conftest import require_root
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import daemon
from tests.fixtures.network import wait_until

GPU0 = "GPU-00000000-0000-0000-0000-000000000000"
NVML_ERROR_UNKNOWN = 999


def test_nvml_up_and_its_errors_are_exported(tmp_path: Path) -> None:
    require_root()
    state_file = tmp_path / "nvml.state"
    gpu = fake_nvml.FakeGpu(0, GPU0, fail_code=NVML_ERROR_UNKNOWN, fail_count=-1)
    fake_nvml.FakeState(gpus=[gpu]).write(state_file)
    config = (
        "rules: []\ngpu:\n  poll_interval: 0.3\n  accounting: false\n"
        "  kubelet: {enabled: 'off'}\n  slurm: {enabled: 'off'}\n"
    )
    with daemon(env=fake_nvml.environment(state_file), config_text=config) as d:
        d.wait_log("GPU features on: 1 GPU(s)")
        wait_until(lambda: d.metric("rome_guard_nvml_errors_total") >= 2, timeout=20)
        wait_until(lambda: d.metric("rome_guard_sensor_up", sensor="nvml") == 1, timeout=10)
        errors = d.metric("rome_guard_nvml_errors_total", error="UNKNOWN")
        assert errors >= 2  # a failing call counts every time it fails
        # schedulers switched off are not reported down: they have no series
        url = f"http://127.0.0.1:{d.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
        assert 'rome_guard_sensor_up{sensor="nvml"} 1.0' in body
        assert 'sensor="kubelet"' not in body and 'sensor="slurm"' not in body
