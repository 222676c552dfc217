"""scripts/setup-host.sh: what `make run` and `make test` install, per
distribution, read from os-release files of each (tests/fixtures/os-release).

`--print` changes nothing, so these run anywhere; the packages they name
are the distributions' own (BCC built for the system python3)."""

from __future__ import annotations

import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SCRIPT = os.path.join(REPO, "scripts", "setup-host.sh")
OS_RELEASE = os.path.join(REPO, "tests", "fixtures", "os-release")
KERNEL = os.uname().release
# test-only services: never on a production node through `make run`
TEST_ONLY = {"slurmd", "slurmctld", "munge", "prometheus", "openssh-server", "ncat", "nmap"}
TEST_ONLY |= {"iperf3", "rsyslog", "docker.io", "debootstrap", "systemd-container"}


def plan(name: str, *args: str) -> dict[str, str]:
    result = subprocess.run(
        ["bash", SCRIPT, "--print", "--os-release", os.path.join(OS_RELEASE, name), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return dict(line.split(": ", 1) for line in result.stdout.splitlines())


@pytest.mark.parametrize(
    ("name", "dist", "bcc", "headers", "tool"),
    [
        ("debian-12", "debian 12", "python3-bpfcc", f"linux-headers-{KERNEL}", "apt-get"),
        ("debian-13", "debian 13", "python3-bpfcc", f"linux-headers-{KERNEL}", "apt-get"),
        ("ubuntu-22.04", "ubuntu 22.04", "python3-bpfcc", f"linux-headers-{KERNEL}", "apt-get"),
        ("ubuntu-24.04", "ubuntu 24.04", "python3-bpfcc", f"linux-headers-{KERNEL}", "apt-get"),
        ("rhel-9", "rhel 9", "python3-bcc", f"kernel-devel-{KERNEL}", "dnf"),
        ("rocky-9", "rhel 9", "python3-bcc", f"kernel-devel-{KERNEL}", "dnf"),
        ("almalinux-9", "rhel 9", "python3-bcc", f"kernel-devel-{KERNEL}", "dnf"),
    ],
)
def test_each_distribution_gets_its_own_bcc_headers_and_bpftool(name, dist, bcc, headers, tool):
    found = plan(name)
    assert found["distribution"].startswith(dist + " ")
    guard = found["guard"].split()
    assert bcc in guard and "python3" in guard
    assert found["bcc"] == bcc and found["kernel headers"] == headers
    # bpftool: its own package on Debian and RHEL, linux-tools on Ubuntu
    assert "bpftool" in guard or f"linux-tools-{KERNEL}" in guard
    if tool == "apt-get":
        assert "python3-venv" in guard  # Debian's python3 has no venv module without it
    install = found["install with"].split()
    assert install[0] == tool and headers in install and bcc in install
    assert not TEST_ONLY & set(install)
    assert "test" not in found


def test_make_run_installs_no_test_services_and_make_test_does():
    guard = plan("debian-12")
    assert not TEST_ONLY & set(guard["guard"].split())
    test = plan("debian-12", "--test")
    assert set(test["test"].split()) >= TEST_ONLY
    assert test["guard"] == guard["guard"]


def test_an_unknown_distribution_is_an_error_naming_it():
    result = subprocess.run(
        ["bash", SCRIPT, "--print", "--os-release", os.path.join(OS_RELEASE, "alpine-3")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "setup-host: ERROR: unsupported distribution: unknown alpine"


def test_the_makefile_sets_up_the_test_bed_for_tests_only():
    with open(os.path.join(REPO, "Makefile")) as f:
        rules = {
            line.split(":", 1)[0]: line.split(":", 1)[1].split()
            for line in f
            if line and not line[0].isspace() and ":" in line and "=" not in line
        }
    assert rules["run"] == ["setup"] and rules["scan"] == ["setup"]
    assert rules["test"] == ["lint"] and rules["lint"] == ["setup-test"]
