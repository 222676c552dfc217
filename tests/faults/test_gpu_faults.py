"""GPU-side faults with the stand-in libnvidia-ml: the library and driver
vanishing mid-run, and the job registry directory becoming unreadable. The
guard keeps running, keeps catching miners, and the GPU checks come back."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import require_root
from tests.faults.conftest import miner_still_caught
from tests.fixtures import fake_nvml
from tests.fixtures.daemon import Daemon, by_pid
from tests.gpu.test_daemon_gpu import GPU0, GPU1, register

GPU_CONFIG = "rules: []\ngpu:\n  poll_interval: 0.3\n  accounting: false\n"


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def gpu_daemon(tmp_path: Path, state: fake_nvml.FakeState) -> tuple[Daemon, Path, Path]:
    """A daemon in enforce mode on a private copy of the stand-in library
    (so that the test can delete it); returns it, the state file and the copy."""
    state_file = tmp_path / "nvml.state"
    state.write(state_file)
    library = tmp_path / "nvml-lib"
    shutil.copytree(fake_nvml.library_dir(), library)
    env = fake_nvml.environment(state_file)
    env["LD_LIBRARY_PATH"] = str(library) + ":" + env["LD_LIBRARY_PATH"]
    d = Daemon(mode="enforce", env=env, config_text=GPU_CONFIG)
    d.wait_ready()
    d.wait_log("GPU features on: 2 GPU(s)")
    return d, state_file, library


def test_nvml_vanishing_mid_run_keeps_the_guard_and_comes_back(tmp_path: Path) -> None:
    require_root()
    state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0), fake_nvml.FakeGpu(1, GPU1)])
    d, state_file, library = gpu_daemon(tmp_path, state)
    before = after = None
    try:
        before = sleeper()
        state.processes = [fake_nvml.FakeProcess(0, before.pid)]
        state.write(state_file)
        assert before.wait(30) < 0  # an unregistered GPU consumer, killed
        # the driver goes away and the library file with it
        shutil.rmtree(library)
        state.processes = []
        state.generation += 1
        state.init_error = fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED
        state.write(state_file)
        d.wait_log("NVML stopped answering")
        miner_still_caught(d, str(tmp_path))
        assert d.proc.poll() is None
        # the driver is back: GPU checks resume on their own
        state.init_error = 0
        after = sleeper()
        state.processes = [fake_nvml.FakeProcess(1, after.pid)]
        state.write(state_file)
        d.wait_log("NVML recovered", timeout=60)
        d.wait_alert(by_pid(after.pid, "gpu-unregistered-consumer"), timeout=30)
    finally:
        stop(*(p for p in (before, after) if p is not None))
        assert d.stop() == 0


def test_unreadable_registry_keeps_the_known_jobs_and_the_guard(tmp_path: Path) -> None:
    require_root()
    state = fake_nvml.FakeState(gpus=[fake_nvml.FakeGpu(0, GPU0), fake_nvml.FakeGpu(1, GPU1)])
    d, state_file, _ = gpu_daemon(tmp_path, state)
    trainer = stray = None
    registrations = Path(d.run_dir) / "registrations"
    try:
        trainer = sleeper()
        register(d.run_dir, "--pid", str(trainer.pid), "--gpus", "0", "--job", "rl-train")
        state.processes = [fake_nvml.FakeProcess(0, trainer.pid)]
        state.write(state_file)
        d.settle(1.0)
        # the registry becomes unreadable: its directory replaced by a link
        # through a file, so that even stat() fails (ENOTDIR)
        shutil.rmtree(registrations)
        blocker = tmp_path / "a-file"
        blocker.write_text("not a directory")
        registrations.symlink_to(blocker / "registrations")
        stray = sleeper()
        state.processes = [
            fake_nvml.FakeProcess(0, trainer.pid),
            fake_nvml.FakeProcess(1, stray.pid),
        ]
        state.write(state_file)
        assert stray.wait(30) < 0  # unregistered consumers are still judged and killed
        d.wait_log(f"cannot read the GPU job registry {registrations}")
        miner_still_caught(d, str(tmp_path))
        assert trainer.poll() is None  # the job registered before the fault keeps its grant
        assert d.alerts_for(by_pid(trainer.pid)) == []
        assert d.proc.poll() is None
    finally:
        stop(*(p for p in (trainer, stray) if p is not None))
        os.unlink(registrations)
        assert d.stop() == 0
