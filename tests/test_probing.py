"""`rome-guard run` against probing in every protocol, end to end: UDP
datagrams (Python sendto, bash's /dev/udp, C sendmmsg, nmap -sU's raw
packets), ICMP echo (an iputils ping sweep) and TCP (a Python scanner, a
shell loop of short-lived nc -z), each blamed on the right actor; and their
benign twins from training-host life (DNS, NTP, StatsD, a job's fixed peers
on loopback, a ping of one gateway), which stay quiet.

Every scenario runs under a shell of its own, so that its parent is not the
test runner (whose other children would add up as its short-lived
children). All traffic goes to 127.x addresses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require, require_root
from tests.fixtures.daemon import Daemon, by_pid, daemon, rule_ids

pytestmark = pytest.mark.ebpf

# how long an alert may take on a host loaded by other daemons and floods
# (a patience, not a timed assertion: the daemon drains its backlog)
PATIENCE_S = 60.0


@pytest.fixture(scope="module")
def guard():
    require_root()
    with daemon() as d:
        assert "ebpf sensor" in d.log
        yield d


def run_in_shell(*argv: str) -> tuple[int, int]:
    """Run argv as the child of a shell of its own (not exec'd: "rc=$?");
    returns (shell pid, child pid)."""
    shell = subprocess.Popen(
        ["bash", "-c", '"$@" & echo $!; wait $!; rc=$?; exit $rc', "scenario", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    child = int(shell.stdout.readline())
    shell.wait(180)
    return shell.pid, child


def fanout_alerts(guard: Daemon, pids: set[int]) -> list[dict]:
    return guard.alerts_for(
        lambda r: (
            "probe-fanout" in rule_ids(r)
            and bool({r["process"]["pid"], *(p["pid"] for p in r["lineage"][:1])} & pids)
        )
    )


UDP_SWEEP = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in range(1, 61):
    s.sendto(b"\x30\x26\x02\x01\x01\x04\x06public", ("127.0.60.%d" % h, 161))
"""

SENDMMSG = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
int main(void) {
	struct sockaddr_in to[40];
	struct iovec iov = {"x", 1};
	struct mmsghdr msgs[40];
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	memset(msgs, 0, sizeof(msgs));
	for (int i = 0; i < 40; i++) {
		char ip[32];
		snprintf(ip, sizeof(ip), "127.0.63.%d", i + 1);
		to[i].sin_family = AF_INET;
		to[i].sin_port = htons(5060);
		inet_pton(AF_INET, ip, &to[i].sin_addr);
		msgs[i].msg_hdr.msg_name = &to[i];
		msgs[i].msg_hdr.msg_namelen = sizeof(to[i]);
		msgs[i].msg_hdr.msg_iov = &iov;
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	return sendmmsg(s, msgs, 40, 0) == 40 ? 0 : 1;
}
"""


def test_a_udp_sweep_in_python_is_a_probe_of_the_script(guard: Daemon) -> None:
    """60 SNMP datagrams to port 161 on 60 hosts: one alert, on the script."""
    shell, script = run_in_shell(sys.executable, "-c", UDP_SWEEP)
    alert = guard.wait_alert(by_pid(script, "probe-fanout"), timeout=PATIENCE_S)
    assert alert["actor"]["kind"] == "process" and "udp" in alert["reason"]
    assert alert["network"]["proto"] == "udp" and alert["network"]["dport"] == 161
    guard.settle()
    assert guard.alerts_for(by_pid(shell, "probe-fanout")) == []


def test_a_udp_sweep_through_bash_dev_udp_is_a_probe(guard: Daemon) -> None:
    """bash's /dev/udp (connected UDP, written by the shell itself)."""
    loop = subprocess.Popen(
        ["bash", "-c", "for h in $(seq 1 40); do echo x > /dev/udp/127.0.61.$h/53; done; true"]
    )
    loop.wait(60)
    alert = guard.wait_alert(by_pid(loop.pid, "probe-fanout"), timeout=PATIENCE_S)
    assert alert["actor"]["kind"] == "process" and "udp" in alert["reason"]


def test_sendmmsg_to_40_hosts_in_one_call_is_a_probe(guard: Daemon, tmp_path: Path) -> None:
    """One sendmmsg(2) carrying 40 datagrams to 40 hosts (C)."""
    source = tmp_path / "mmsg.c"
    source.write_text(SENDMMSG)
    binary = str(tmp_path / "mmsg")
    subprocess.run(["gcc", "-O1", "-o", binary, str(source)], check=True)
    _shell, sender = run_in_shell(binary)
    alert = guard.wait_alert(by_pid(sender, "probe-fanout"), timeout=PATIENCE_S)
    assert "udp" in alert["reason"]


def test_a_ping_sweep_is_its_loop_through_short_lived_children(guard: Daemon) -> None:
    """iputils ping -c1 over 30 hosts: each ping sees one host, the loop
    that ran them is the sweep (parent_of_short_lived), named in the alert."""
    require(shutil.which("ping") is not None, "iputils-ping not installed")
    loop = subprocess.Popen(
        ["bash", "-c", "for h in $(seq 1 30); do ping -c1 -W1 127.0.62.$h >/dev/null; done; true"]
    )
    loop.wait(120)
    alert = guard.wait_alert(by_pid(loop.pid, "probe-fanout"), timeout=PATIENCE_S)
    assert alert["actor"]["kind"] == "parent_of_short_lived"
    assert "icmp" in alert["reason"]


def test_nmap_udp_scan_sends_raw_packets_that_are_counted(guard: Daemon) -> None:
    """nmap -sU writes its own IP headers on a raw socket: 30 hosts."""
    require(shutil.which("nmap") is not None, "nmap not installed")
    _shell, nmap = run_in_shell(
        "nmap", "-sU", "-Pn", "-n", "-p", "161", "--max-retries", "0", "127.0.64.1-30"
    )
    alert = guard.wait_alert(by_pid(nmap, "probe-fanout"), timeout=PATIENCE_S)
    assert "raw" in alert["reason"] and alert["actor"]["kind"] == "process"


SCANNER = r"""
import socket, sys
for h in range(1, 81):
    s = socket.socket(); s.settimeout(0.5)
    try: s.connect(("127.0.65.%d" % h, 22))
    except OSError: pass
    finally: s.close()
"""


def test_a_python_scanner_is_blamed_not_its_parent_shell(guard: Daemon) -> None:
    """80 hosts scanned by a script that an agent's shell started: one
    alert, naming the script; the shell is not an actor."""
    shell, script = run_in_shell(sys.executable, "-c", SCANNER)
    alert = guard.wait_alert(by_pid(script, "probe-fanout"), timeout=PATIENCE_S)
    assert alert["actor"] == {"kind": "process", "id": f"{script}@{alert['process']['start_time']}"}
    guard.settle()
    alerts = fanout_alerts(guard, {shell, script})
    assert [(r["process"]["pid"], r["actor"]["kind"]) for r in alerts] == [(script, "process")]


def test_a_shell_loop_of_nc_z_children_is_the_parent_of_short_lived(guard: Daemon) -> None:
    loop = subprocess.Popen(
        ["bash", "-c", "for h in $(seq 1 40); do nc -z -w 1 127.0.66.$h 22; done; true"],
        stderr=subprocess.DEVNULL,
    )
    loop.wait(120)
    alert = guard.wait_alert(by_pid(loop.pid, "probe-fanout"), timeout=PATIENCE_S)
    assert alert["actor"]["kind"] == "parent_of_short_lived"
    assert alert["process"]["comm"] == "bash"


# --- benign twins ------------------------------------------------------------------

DNS_CLIENT = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x04pypi\x03org\x00\x00\x01\x00\x01"
for i in range(400):
    s.sendto(query, ("127.0.70.%d" % (1 + i % 2), 53))
"""

NTP_CLIENT = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(64):
    s.sendto(b"\x1b" + 47 * b"\0", ("127.0.71.%d" % (1 + i % 4), 123))
"""

STATSD_CLIENT = r"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("127.0.72.1", 8125))
for i in range(2000):
    s.send(b"train.loss:%d|g" % i)
"""

# a DDP/NCCL-like job: 8 ranks on 8 loopback "hosts"; each rank connects
# over TCP to every other rank's port and sends UDP heartbeats to them
PEERS = r"""
import socket, sys, threading, time
rank = int(sys.argv[1])
hosts = ["127.0.73.%d" % (i + 1) for i in range(8)]
server = socket.create_server((hosts[rank], 29500), backlog=16)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((hosts[rank], 29501))
def accept():
    while True:
        try: server.accept()
        except OSError: return
threading.Thread(target=accept, daemon=True).start()
time.sleep(1.0)
conns = []
for peer in hosts:
    if peer != hosts[rank]:
        for _ in range(10):
            try: conns.append(socket.create_connection((peer, 29500), timeout=1)); break
            except OSError: time.sleep(0.1)
for _ in range(50):
    for peer in hosts:
        udp.sendto(b"hb", (peer, 29501))
time.sleep(0.5)
"""


@pytest.mark.parametrize(
    "client",
    [DNS_CLIENT, NTP_CLIENT, STATSD_CLIENT],
    ids=["dns-two-resolvers", "ntp-four-servers", "statsd-one-collector"],
)
def test_everyday_datagram_clients_are_quiet(guard: Daemon, client: str) -> None:
    shell, child = run_in_shell(sys.executable, "-c", client)
    guard.settle()
    assert fanout_alerts(guard, {shell, child}) == []


def test_a_job_of_eight_ranks_talking_to_each_other_is_quiet(guard: Daemon) -> None:
    launcher = subprocess.Popen(
        [
            "bash",
            "-c",
            f"for r in $(seq 0 7); do {sys.executable} -c '{PEERS}' $r & done; wait",
        ]
    )
    launcher.wait(120)
    guard.settle()
    assert fanout_alerts(guard, {launcher.pid}) == [], "the launcher is not a scanner"
    ranks = guard.alerts_for(
        lambda r: "probe-fanout" in rule_ids(r) and "127.0.73." in r["reason"] + str(r["network"])
    )
    assert ranks == []


def test_a_loop_pinging_one_gateway_is_quiet(guard: Daemon) -> None:
    require(shutil.which("ping") is not None, "iputils-ping not installed")
    loop = subprocess.Popen(
        ["bash", "-c", "for i in $(seq 1 40); do ping -c1 -W1 127.0.74.1 >/dev/null; done; true"]
    )
    loop.wait(120)
    guard.settle()
    assert fanout_alerts(guard, {loop.pid}) == []
