"""The GPU job registry: registrations of real processes, identity by
(pid, start time), children, live pick-up, trust of registration files, and
the allowlist schema and matching."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from rome_guard.config import load_config
from rome_guard.events import Attribution, ProcessInfo, ProcessKey
from rome_guard.gpu.registry import (
    SOURCE_ALLOW,
    SOURCE_REGISTRATION,
    GpuRef,
    GpuRegistry,
    RegistrationError,
    docker_container_name,
    gpu_granted,
    parse_allow,
    parse_gpu_grants,
)
from rome_guard.gpu.report import proc_lineage
from rome_guard.procfs import read_process
from rome_guard.yamlsrc import SourceError
from tests.conftest import require_root
from tests.fixtures.processes import process_info

GPU0 = GpuRef(0, "GPU-00000000-1111-2222-3333-444444444444")
GPU1 = GpuRef(1, "GPU-11111111-1111-2222-3333-444444444444")
MIG_ON_1 = GpuRef(1, GPU1.uuid, "MIG-aaaaaaaa-1111-2222-3333-444444444444")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def info_of(pid: int) -> ProcessInfo:
    info = read_process(pid)
    assert info is not None
    return info


def test_registered_process_is_covered_on_its_granted_gpus_only(tmp_path, processes):
    trainer = info_of(processes.sleeper().pid)
    registry = GpuRegistry(str(tmp_path))
    reg = registry.register(trainer.pid, ("0", MIG_ON_1.mig), job="sft-42")
    assert reg.key == trainer.key

    on0 = registry.covering(trainer, [], GPU0)
    assert (on0.source, on0.name, on0.granted, on0.holder) == (
        SOURCE_REGISTRATION,
        "sft-42",
        True,
        trainer.key,
    )
    assert registry.covering(trainer, [], MIG_ON_1).granted is True
    elsewhere = registry.covering(trainer, [], GPU1)
    assert elsewhere is not None and elsewhere.granted is False  # known, but not granted GPU 1


def test_registration_is_refused_for_a_pid_that_does_not_exist(tmp_path, processes):
    registry = GpuRegistry(str(tmp_path))
    with pytest.raises(RegistrationError, match="no process"):
        registry.register(processes.exited_pid())
    assert registry.registrations() == []
    with pytest.raises(RegistrationError, match="is not a GPU"):
        registry.register(os.getpid(), gpus="0,cuda:1")


def test_a_reused_pid_is_not_registered(tmp_path, processes):
    trainer = info_of(processes.sleeper().pid)
    registry = GpuRegistry(str(tmp_path))
    registry.register(trainer.pid, job="sft")
    # another process with the same pid, started later
    successor = dataclasses.replace(
        trainer, key=ProcessKey(trainer.pid, trainer.key.start_time + 1)
    )
    assert registry.covering(successor, [], GPU0) is None
    # and a registration recorded for an earlier holder of a live pid covers nobody
    live = info_of(processes.sleeper().pid)
    stale = {
        "version": 1,
        "pid": live.pid,
        "start_time": live.key.start_time - 1,
        "job": "old",
        "gpus": None,
        "include_children": True,
        "registered_at": 0,
    }
    (tmp_path / "registrations" / f"{live.pid}-{live.key.start_time - 1}.json").write_text(
        json.dumps(stale)
    )
    registry.refresh()
    assert registry.covering(live, [], GPU0) is None
    # the stale one is pruned, the live trainer's is kept
    assert [r.job for r in registry.prune()] == ["old"]
    assert [r.job for r in registry.registrations()] == ["sft"]


def test_children_are_covered_only_with_include_children(tmp_path, processes):
    shell, child_pid = processes.parent_with_child()
    parent, child = info_of(shell.pid), info_of(child_pid)
    lineage = proc_lineage(child, read_process)
    assert lineage[0].key == parent.key
    registry = GpuRegistry(str(tmp_path))

    registry.register(parent.pid, job="trainer")
    assert registry.covering(parent, proc_lineage(parent, read_process), GPU0).granted
    assert registry.covering(child, lineage, GPU0) is None
    ancestor, covers = registry.registered_ancestor(lineage)
    assert (ancestor.job, covers) == ("trainer", False)

    registry.unregister(job="trainer")
    registry.register(parent.pid, job="launcher", include_children=True, gpus="1")
    coverage = registry.covering(child, lineage, GPU1)
    assert (coverage.name, coverage.granted, coverage.inherited) == ("launcher", True, True)
    assert coverage.holder == parent.key
    assert registry.covering(child, lineage, GPU0).granted is False


def test_registrations_are_picked_up_live_and_removed_by_pid_or_job(tmp_path, processes):
    a, b = info_of(processes.sleeper().pid), info_of(processes.sleeper().pid)
    daemon_view = GpuRegistry(str(tmp_path))
    assert daemon_view.refresh() is False
    launcher = GpuRegistry(str(tmp_path))  # e.g. `rome-guard gpu register` in another process
    launcher.register(a.pid, job="job-a")
    launcher.register(b.pid, job="job-b")
    assert daemon_view.refresh() is True
    assert {r.job for r in daemon_view.registrations()} == {"job-a", "job-b"}
    assert daemon_view.refresh() is False  # nothing changed

    assert [r.key for r in launcher.unregister(pid=a.pid)] == [a.key]
    assert [r.job for r in launcher.unregister(job="job-b")] == ["job-b"]
    assert launcher.unregister(job="nobody") == []
    daemon_view.refresh()
    assert daemon_view.registrations() == []
    assert daemon_view.covering(a, [], GPU0) is None


def test_registration_files_are_trusted_by_owner(tmp_path, processes, caplog):
    require_root()
    mine = info_of(processes.sleeper().pid)
    nobody = info_of(processes.sleeper(user=65534).pid)
    registry = GpuRegistry(str(tmp_path))
    directory = tmp_path / "registrations"
    for target in (mine, nobody):
        registry.register(target.pid, job=f"by-nobody-{target.pid}")
    for path in directory.iterdir():
        os.chown(path, 65534, 65534)  # as if the user had written them
    with caplog.at_level(logging.WARNING, logger="rome_guard.gpu.registry"):
        strict = GpuRegistry(str(tmp_path))
        strict.refresh()
    assert strict.registrations() == []
    assert "not root" in caplog.text

    relaxed = GpuRegistry(str(tmp_path), user_registration=True)
    relaxed.refresh()
    assert relaxed.covering(nobody, [], GPU0) is not None  # its own process
    assert relaxed.covering(mine, [], GPU0) is None  # not someone else's


def test_malformed_and_symlinked_files_are_ignored(tmp_path, processes, caplog):
    target = info_of(processes.sleeper().pid)
    directory = tmp_path / "registrations"
    directory.mkdir()
    (directory / "a.json").write_text("{not json")
    (directory / "b.json").write_text(json.dumps({"version": 1, "pid": "1", "start_time": 0}))
    real = tmp_path / "elsewhere.json"
    real.write_text(
        json.dumps({"version": 1, "pid": target.pid, "start_time": target.key.start_time})
    )
    (directory / "c.json").symlink_to(real)
    registry = GpuRegistry(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="rome_guard.gpu.registry"):
        registry.refresh()
    assert registry.registrations() == []
    assert registry.covering(target, [], GPU0) is None
    assert caplog.text.count("ignoring GPU registration") == 3


def test_register_current_process_helper_from_training_code(tmp_path):
    code = textwrap.dedent(
        """
        import rome_guard
        reg = rome_guard.register_current_process(job="rl-run-7", gpus=[0, "GPU-abc"])
        print(reg.key.pid, reg.key.start_time)
        """
    )
    env = dict(os.environ, ROME_GUARD_RUN_DIR=str(tmp_path), PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    pid, start = map(int, out.stdout.split())
    registry = GpuRegistry(str(tmp_path))
    registry.refresh()
    [reg] = registry.registrations()
    assert (reg.key, reg.job, reg.gpus) == (ProcessKey(pid, start), "rl-run-7", ("0", "GPU-abc"))
    assert registry.prune() == [reg]  # the process has exited


# --- GPU grants -----------------------------------------------------------------


def test_gpu_grants_parse_and_match():
    assert parse_gpu_grants(None) is None
    assert parse_gpu_grants("") is None
    assert parse_gpu_grants(" 0, GPU-ab12 ") == ("0", "GPU-ab12")
    assert parse_gpu_grants([1, "MIG-x/1/0"]) == ("1", "MIG-x/1/0")
    for bad in ("cuda:0", "-1", "GPU-", "0;rm -rf /"):
        with pytest.raises(ValueError):
            parse_gpu_grants(bad)
    assert gpu_granted(("0",), GpuRef(0, "GPU-a", "MIG-m"))  # an index grants its MIGs
    assert gpu_granted(("gpu-a",), GpuRef(0, "GPU-A"))  # UUIDs compare case-insensitively
    assert gpu_granted(("MIG-m",), GpuRef(0, "GPU-a", "MIG-m"))
    assert not gpu_granted(("MIG-m",), GpuRef(0, "GPU-a", "MIG-n"))
    assert not gpu_granted(("MIG-m",), GpuRef(0, "GPU-a"))  # a MIG grant is not the whole GPU
    assert not gpu_granted(("1",), GpuRef(0, "GPU-a"))
    assert gpu_granted(None, GpuRef(3, "GPU-z"))


# --- allowlist ------------------------------------------------------------------


def process(**overrides) -> ProcessInfo:
    values = dict(
        user="alice",
        exe="/opt/conda/bin/python3.11",
        cmdline=("python3", "train.py", "--config", "sft.yaml"),
        cwd="/home/alice",
        cgroup="/system.slice/dcgm.service",
    )
    values.update(overrides)
    return process_info(**values)


def write_config(tmp_path, body: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_allowlist_from_config_file_matches_every_condition(tmp_path):
    path = write_config(
        tmp_path,
        """
        gpu:
          allow:
            - name: dcgm
              unit: "dcgm*.service"
            - name: notebooks
              exe: "/opt/conda/bin/python3*"
              argv: "jupyter|ipykernel"
              user: alice
              gpus: [1]
            - name: sandbox
              container_name: "rock-*"
            - container: 3f4e5d6c7b8a
              gpus: GPU-11111111-1111-2222-3333-444444444444
            - pod_uid: 0b6e4c1a_1d2f_4e3b_9a8c_7d6e5f4a3b2c
            - slurm_job: "12*"
              user: 1000
        """,
    )
    config = load_config(path)
    entries = parse_allow(config.gpu.allow, path)
    assert [e.name for e in entries] == [
        "dcgm",
        "notebooks",
        "sandbox",
        "gpu.allow[3]",
        "gpu.allow[4]",
        "gpu.allow[5]",
    ]
    assert entries[0].location == f"{path}:4:7"
    dcgm, notebooks, sandbox, container, pod, slurm = entries

    assert dcgm.matches(process(attribution=Attribution(unit="dcgm-exporter.service")))
    assert not dcgm.matches(process(attribution=Attribution(unit="sshd.service")))

    notebook = process(cmdline=("python3", "-m", "ipykernel_launcher", "-f", "k.json"))
    assert notebooks.matches(notebook)
    assert not notebooks.matches(process())  # argv does not match
    assert not notebooks.matches(dataclasses.replace(notebook, user="bob", uid=1001))
    assert not notebooks.matches(dataclasses.replace(notebook, exe="/tmp/python3"))

    cid = "3f4e5d6c7b8a" + "0" * 52
    in_container = process(attribution=Attribution(container_id=cid))
    assert sandbox.matches(in_container, container_name="rock-0af3")
    assert not sandbox.matches(in_container, container_name="build-1")
    assert not sandbox.matches(process())
    assert container.matches(in_container)
    assert container.gpus == ("GPU-11111111-1111-2222-3333-444444444444",)

    assert pod.matches(
        process(attribution=Attribution(pod_uid="0b6e4c1a-1d2f-4e3b-9a8c-7d6e5f4a3b2c"))
    )
    assert not pod.matches(process())
    assert slurm.matches(process(attribution=Attribution(slurm_job="1234")))
    assert not slurm.matches(process(attribution=Attribution(slurm_job="99")))

    registry = GpuRegistry(str(tmp_path / "run"), entries, container_names=lambda _: None)
    covered = registry.covering(notebook, [], GPU1)
    assert (covered.source, covered.name, covered.granted) == (SOURCE_ALLOW, "notebooks", True)
    assert registry.covering(notebook, [], GPU0).granted is False


def test_allowlist_mistakes_are_reported_with_file_and_line(tmp_path):
    path = write_config(
        tmp_path,
        """
        gpu:
          allow:
            - name: everything
              gpus: [0]
            - exe: /usr/bin/x
              colour: red
            - argv: "(unclosed"
            - container: not-hex
            - user: alice
              gpus: [cuda0]
            - just a string
        """,
    )
    config = load_config(path)
    with pytest.raises(SourceError) as err:
        parse_allow(config.gpu.allow, path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"{path}:4:7: gpu.allow[0] needs at least one of")
    assert lines[1].startswith(f"{path}:7:7: gpu.allow[1]: unknown key 'colour'")
    assert lines[2].startswith(f"{path}:8:7: gpu.allow[2].argv is not a valid regular expression")
    assert lines[3].startswith(f"{path}:9:7: gpu.allow[3].container must be a container id")
    assert lines[4].startswith(f"{path}:11:7: gpu.allow[4].gpus: 'cuda0' is not a GPU")
    assert "gpu.allow[5] must be a mapping" in lines[5]


def test_docker_container_names_come_from_its_config_on_disk(tmp_path):
    cid = "ab" * 32
    (tmp_path / "containers" / cid).mkdir(parents=True)
    (tmp_path / "containers" / cid / "config.v2.json").write_text(json.dumps({"Name": "/rock-7"}))
    assert docker_container_name(cid, str(tmp_path)) == "rock-7"
    assert docker_container_name("cd" * 32, str(tmp_path)) is None
    assert docker_container_name("../../etc", str(tmp_path)) is None
