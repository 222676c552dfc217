"""GPU sharing under NVIDIA MPS, through the stand-in libnvidia-ml: NVML's
compute list names the MPS server, the clients come from the MPS query
(nvmlDeviceGetMPSComputeRunningProcesses_v3). A client is judged like any
compute process; the server, the real binary in a system directory, is not
the consumer; a look-alike elsewhere is judged like anything else."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.conftest import require, require_root
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon, by_pid
from tests.gpu.test_daemon_gpu import GPU0, register

# the MPS server as the driver installs it, in a mount namespace of its own
# (a tmpfs over /usr/local/bin) so that nothing is written to the host's
SERVER = (
    "mount -t tmpfs tmpfs /usr/local/bin && cp /bin/sleep /usr/local/bin/nvidia-cuda-mps-server"
    " && exec /usr/local/bin/nvidia-cuda-mps-server 300"
)


def test_mps_clients_are_judged_and_the_server_is_not_the_consumer(
    tmp_path: Path, sleepers
) -> None:
    require_root()
    require(shutil.which("unshare") is not None, "unshare missing")
    state_file = tmp_path / "nvml.state"
    state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0)])
    state.write(state_file)
    calls = tmp_path / "calls"
    d = Daemon(
        sensor="ebpf",
        env=fake_nvml.environment(state_file, calls_file=calls),
        config_text="rules: []\ngpu:\n  poll_interval: 0.3\n  accounting: false\n",
    )
    try:
        d.wait_ready()
        d.wait_log("GPU features on: 1 GPU(s)")
        server = sleepers("unshare", "--mount", "--propagation", "private", "sh", "-c", SERVER)
        look_alike = tmp_path / "nvidia-cuda-mps-server"
        shutil.copy("/bin/sleep", look_alike)
        impostor = sleepers(str(look_alike), "300")
        trainer, stray = sleepers(), sleepers()
        register(d.run_dir, "--pid", str(trainer.pid), "--gpus", "0", "--job", "mps-train")
        state.processes = [
            fake_nvml.FakeProcess(0, server.pid, memory=6 * 2**30),  # every client's contexts
            fake_nvml.FakeProcess(0, impostor.pid),
            fake_nvml.FakeProcess(0, trainer.pid, memory=2**30, mps=True),
            fake_nvml.FakeProcess(0, stray.pid, memory=2**30, mps=True),
        ]
        state.generation += 1
        state.write(state_file)
        alert = d.wait_alert(by_pid(stray.pid, "gpu-unregistered-consumer"))
        assert alert["gpu"]["uuid"] == GPU0 and alert["gpu_verdict"] == "unregistered"
        d.wait_alert(by_pid(impostor.pid, "gpu-unregistered-consumer"))
        d.settle(1.5)
        assert d.alerts_for(by_pid(trainer.pid)) == []
        assert d.alerts_for(by_pid(server.pid)) == []
        listed = subprocess.run(
            ["readlink", f"/proc/{server.pid}/exe"], capture_output=True, text=True
        ).stdout.strip()
        assert listed == "/usr/local/bin/nvidia-cuda-mps-server"  # the exe the guard judged
        assert "nvmlDeviceGetMPSComputeRunningProcesses_v3" in fake_nvml.read_calls(calls)
    finally:
        d.stop()
