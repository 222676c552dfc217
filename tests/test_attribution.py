"""Attribution parsing for every cgroup layout we promise to understand."""

from __future__ import annotations

import pytest

from rome_guard.attribution import attribute, container_id, pod_uid, slurm_job, systemd_unit

CID = "3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7f8e9d0c1b2a3f4e"
POD = "0d8f2c4a-1b3e-4f5a-9c6d-7e8f9a0b1c2d"


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        (f"/system.slice/docker-{CID}.scope", CID),  # docker, systemd driver
        (f"/docker/{CID}", CID),  # docker, cgroupfs driver
        (
            f"/system.slice/containerd.service/kubepods-besteffort-pod{POD.replace('-', '_')}.slice:cri-containerd:{CID}",
            CID,
        ),
        (
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope",
            CID,
        ),
        (f"/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-{CID}.scope", CID),
        (f"/kubepods/besteffort/pod{POD}/{CID}", CID),  # cgroupfs driver
        (f"/machine.slice/libpod-{CID}.scope/container", CID),  # podman
        (f"/user.slice/user-1000.slice/user@1000.service/app.slice/libpod-{CID}.scope", CID),
        (f"/k8s.io/{CID}", CID),  # containerd namespace (nerdctl)
        ("/user.slice/user-1000.slice/session-3.scope", None),
        ("/system.slice/sshd.service", None),
        ("/", None),
    ],
)
def test_container_id(cgroup: str, expected: str | None) -> None:
    assert container_id(cgroup) == expected


def test_pod_uid_both_drivers() -> None:
    systemd = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD.replace('-', '_')}.slice/cri-containerd-{CID}.scope"
    assert pod_uid(systemd) == POD
    assert pod_uid(f"/kubepods/burstable/pod{POD}/{CID}") == POD
    assert pod_uid("/system.slice/docker.service") is None


@pytest.mark.parametrize(
    ("cgroup", "job"),
    [
        ("/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0", "4242"),
        ("/slurm/uid_1000/job_77/step_batch", "77"),  # cgroup v1 layout
        ("/slurm_node1/uid_0/job_9/step_extern", "9"),
        ("/system.slice/my_job_1.service", None),
    ],
)
def test_slurm_job(cgroup: str, job: str | None) -> None:
    assert slurm_job(cgroup) == job


def test_systemd_unit_is_innermost() -> None:
    assert systemd_unit("/system.slice/sshd.service") == "sshd.service"
    assert (
        systemd_unit("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service")
        == "foo.service"
    )
    assert systemd_unit(f"/system.slice/docker-{CID}.scope") == f"docker-{CID}.scope"
    assert systemd_unit("/") is None


def test_env_keys_only_configured_ones() -> None:
    att = attribute("/", {"ROLLOUT_ID": "r-1", "SECRET": "s"}, ["ROLLOUT_ID", "SANDBOX_ID"])
    assert dict(att.env) == {"ROLLOUT_ID": "r-1"}
