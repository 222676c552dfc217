"""The kernel-interface parsers (rome_guard/linux.py) on real and recorded inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rome_guard.events import Endpoint
from rome_guard.linux import (
    NoCgroup2,
    cgroup2_root,
    cgroup_id,
    cgroup_path_of_id,
    cgroup_v2_path,
    has_peer,
    in_host_pid_namespace,
    is_deleted,
    mounts_of_type,
    read_cgroup,
    without_deleted,
)


def test_cgroup_v2_path_prefers_the_unified_line_then_systemd():
    hybrid = b"12:cpu,cpuacct:/a\n1:name=systemd:/user.slice/x.scope\n0::/user.slice/x.scope\n"
    assert cgroup_v2_path(hybrid) == "/user.slice/x.scope"
    legacy = b"3:memory:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert cgroup_v2_path(legacy) == "/docker/abc"
    assert cgroup_v2_path(b"") == ""


def test_a_live_process_cgroup_and_id_agree_with_the_kernel():
    child = subprocess.Popen(["sleep", "30"])
    try:
        path = read_cgroup(child.pid)
        assert path is not None and path.startswith("/")
        root = cgroup2_root()
        assert cgroup_id(path) == os.stat(os.path.join(root, path.lstrip("/"))).st_ino
    finally:
        child.kill()
        child.wait()
    assert read_cgroup(child.pid) is None  # gone: None, not an exception


def test_mounts_unescape_and_missing_cgroup2(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "cgroup2 /sys/fs/cgroup/with\\040space cgroup2 rw 0 0\nbpf /sys/fs/bpf bpf rw 0 0\n"
    )
    assert mounts_of_type("cgroup2", str(mounts)) == ["/sys/fs/cgroup/with space"]
    assert cgroup2_root(str(mounts)) == "/sys/fs/cgroup/with space"
    mounts.write_text("proc /proc proc rw 0 0\n")
    with pytest.raises(NoCgroup2):
        cgroup2_root(str(mounts))


def test_deleted_suffix():
    assert is_deleted("/tmp/x (deleted)") and without_deleted("/tmp/x (deleted)") == "/tmp/x"
    assert (
        not is_deleted("/usr/bin/python3") and without_deleted("/a (deleted) b") == "/a (deleted) b"
    )


@pytest.mark.parametrize(
    "ep,peer",
    [
        (Endpoint("tcp", 4, "10.0.0.2", 5555, "10.0.0.1", 4444, "ESTABLISHED"), True),
        (Endpoint("tcp", 4, "10.0.0.2", 5555, "10.0.0.1", 4444, "CLOSE_WAIT"), True),
        (Endpoint("tcp", 4, "0.0.0.0", 22, "0.0.0.0", 0, "LISTEN"), False),
        (Endpoint("udp", 4, "0.0.0.0", 53, "0.0.0.0", 0, "UNCONNECTED"), False),
        (Endpoint("tcp", 6, "::", 80, "::", 443, "SYN_SENT"), False),  # no address
        (Endpoint("udp", 4, "10.0.0.2", 5000, "10.0.0.9", 53, "attempt"), True),
    ],
)
def test_has_peer(ep, peer):
    assert has_peer(ep) is peer


def test_cgroup_path_of_id_walks_the_hierarchy(tmp_path):
    scope = tmp_path / "system.slice" / "docker-ab.scope"
    scope.mkdir(parents=True)
    assert cgroup_path_of_id(scope.stat().st_ino, str(tmp_path)) == "/system.slice/docker-ab.scope"
    assert cgroup_path_of_id(tmp_path.stat().st_ino, str(tmp_path)) == "/"
    assert cgroup_path_of_id(0, str(tmp_path)) == ""
    (tmp_path / "gone").mkdir()
    gone = (tmp_path / "gone").stat().st_ino
    (tmp_path / "gone").rmdir()
    assert cgroup_path_of_id(gone, str(tmp_path)) == ""
    assert cgroup_path_of_id(1, str(tmp_path)) == ""


def test_a_child_pid_namespace_is_told_from_the_hosts(root):
    """The daemon leaves eBPF alone in a PID namespace of its own: the
    kernel's pids are not its /proc's there (tests/deploy/test_booted_unit.py)."""
    assert in_host_pid_namespace()  # where the tests run
    inside = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
         "from rome_guard.linux import in_host_pid_namespace as f; print(f())"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert inside.stdout.strip() == "False", inside.stderr
