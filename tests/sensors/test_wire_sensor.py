"""The wire sensor against the real kernel: each client stream by offset, blamed on
the task that sent it; only flows this host opened, from their first byte
(a server's replies, a flow older than the sensor and a reused socket's
old flow are not client streams); drops only while the owner keeps its
deadline fresh. (Detaching: tests/sensors/test_wire_cleanup.py, in a process
holding no other sensor.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from rome_guard.events import WIRE_DROPPED_CONNECT, WIRE_FIRST_PAYLOAD, WIRE_STREAM_DATA
from rome_guard.sensors.wire import DROP_GRACE_NS, WireSensor
from tests.conftest import require_root
from tests.fixtures.network import free_port
from tests.fixtures.wire import CLIENT, CountingServer, client

pytestmark = [pytest.mark.root, pytest.mark.ebpf]


@pytest.fixture(scope="module")
def sensor():
    require_root()
    with WireSensor() as s:
        yield s


def _events(sensor, predicate, want: int = 1, timeout: float = 10.0) -> list:
    found, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < want:
        found += [e for e in sensor.poll(100) if predicate(e)]
    return found


@pytest.mark.parametrize("host", ["127.10.20.1", "::1"])
def test_one_record_per_flow_blamed_on_the_connecting_process(sensor, host):
    server = CountingServer(host, 0)
    try:
        proc = client("send", host, str(server.port), (b"first\n" * 3).hex(), "0.5")
        proc.wait(20)
        events = _events(sensor, lambda e: e.endpoint.dport == server.port, want=2, timeout=3)
    finally:
        server.close()
    assert len(events) == 1  # the segments after the first are not reported
    (e,) = events
    assert e.kind == WIRE_FIRST_PAYLOAD and e.pid == proc.pid
    assert e.payload == b"first\n" * 3 and e.payload_len == 18
    assert 0 < e.connect_ns <= e.timestamp_ns and e.cookie and e.cgroup_id
    assert e.endpoint.family == (6 if ":" in host else 4)


def test_drops_only_while_the_owner_keeps_its_deadline(sensor):
    """(The sensor ignores its owner's own connects: clients are children.)"""
    server = CountingServer("127.10.20.2", 0)
    seen = []
    outcomes = []  # (exit status, stderr) of each client, for the failure message

    def connects(poll: bool = True) -> bool:
        proc = client("send", server.host, str(server.port), b"hi".hex(), "0")
        while proc.poll() is None:  # the owner alive: polling, so the deadline moves
            if poll:
                seen.extend(sensor.poll(100))
            else:
                time.sleep(0.1)
        outcomes.append((proc.returncode, proc.stderr.read()[-300:]))
        return proc.returncode == 0

    try:
        sensor.drop_address(server.host)
        sensor.enforce(True)
        sensor.poll(0)  # the deadline is pushed forward by polls
        assert not connects()
        dropped = [e for e in seen if e.kind == WIRE_DROPPED_CONNECT]
        assert dropped and dropped[0].dropped == "address"
        # an owner that stops polling (hung, or dead) stops every drop
        time.sleep(DROP_GRACE_NS / 1e9 + 1.5)
        assert connects(poll=False), outcomes
        sensor.enforce(False)
        sensor.poll(0)
        assert connects(), outcomes  # monitor mode: listed, yet never dropped
    finally:
        sensor.enforce(False)
        sensor.undrop_address(server.host)
        server.close()
    assert server.accepted == 2


def test_client_stream_reported_by_offset_until_its_bound(sensor):
    """Nine small writes: the first eight segments come back in order,
    placed by their stream offset, the eighth marked as the end; the ninth
    is cut by the segment bound, and counted."""
    server = CountingServer("127.10.20.3", 0)
    pieces = [bytes([0x61 + i]) * 10 for i in range(9)]
    cut_before = sensor.stream_cuts()["segments"]
    try:
        proc = client("pieces", server.host, str(server.port), "0.1", *(p.hex() for p in pieces))
        proc.wait(30)
        events = _events(sensor, lambda e: e.endpoint.dport == server.port, want=9, timeout=3)
    finally:
        server.close()
    assert [e.kind for e in events] == [WIRE_FIRST_PAYLOAD] + [WIRE_STREAM_DATA] * 7
    assert [(e.offset, e.segment, e.payload) for e in events] == [
        (10 * i, i + 1, pieces[i]) for i in range(8)
    ]
    assert [e.stream_end for e in events] == [False] * 7 + [True]
    assert all(e.pid == proc.pid and e.cookie == events[0].cookie for e in events)
    assert sensor.stream_cuts()["segments"] == cut_before + 1


def test_a_first_message_that_says_all_is_one_record(sensor):
    """An HTTP GET that upgrades nothing: one record, the stream's end; the
    request after it on the same connection is not followed."""
    server = CountingServer("127.10.20.4", 0)
    get = b"GET /simple/torch/ HTTP/1.1\r\nHost: pypi.org\r\n\r\n"
    try:
        proc = client("pieces", server.host, str(server.port), "0.2", get.hex(), get.hex())
        proc.wait(30)
        events = _events(sensor, lambda e: e.endpoint.dport == server.port, want=2, timeout=3)
    finally:
        server.close()
    assert [(e.payload, e.stream_end) for e in events] == [(get, True)]


STRATUM = b'{"id":1,"method":"mining.subscribe","params":["xmrig/6.21"]}\n'
# what clients send here: a line no guard drops (other daemons on this host
# may enforce, and would drop a miner's line in their kernel window)
LINE = b'{"id":2,"method":"status","params":[]}\n'


def test_a_servers_replies_are_no_client_stream(sensor):
    """The accepted side of a flow (a server this host runs) sends one
    byte, then, once it is acked, a line that would be a miner's: neither
    is a client stream. The client answering after the server spoke first
    is one, from its own first byte."""
    host = "127.10.20.5"
    port = free_port(host)
    server = client("answer", host, str(port), b"+".hex(), "0.3", STRATUM.hex())
    try:
        assert server.stdout.readline().strip() == "listening"
        proc = client("pieces", host, str(port), "0.6", b"".hex(), b"ok\n".hex())
        proc.wait(30)
        server.wait(30)
        events = _events(sensor, lambda e: port in (e.endpoint.sport, e.endpoint.dport), 3, 3)
    finally:
        for p in (server, proc):
            if p.poll() is None:
                p.kill()
    assert [(e.pid, e.endpoint.dport, e.offset, e.payload) for e in events] == [
        (proc.pid, port, 0, b"ok\n")
    ]
    assert events[0].kind == WIRE_FIRST_PAYLOAD


def test_a_reused_socket_starts_a_new_stream(sensor):
    """A socket disconnected (connect AF_UNSPEC) while its first stream is
    still followed, then connected to another host: the new flow is
    reported from its own first byte, not placed by the old flow's
    sequence numbers."""
    first, second = CountingServer("127.10.20.6", 0), CountingServer("127.10.20.7", 0)
    try:
        proc = client(
            "reconnect", first.host, str(first.port), b"hello\n".hex(),
            second.host, str(second.port), LINE.hex(),
        )  # fmt: skip
        proc.wait(30)
        events = _events(sensor, lambda e: e.endpoint.dport == second.port, 1, 5)
    finally:
        first.close()
        second.close()
    assert proc.returncode == 0, proc.stderr.read()
    assert [(e.kind, e.offset, e.payload, e.pid) for e in events] == [
        (WIRE_FIRST_PAYLOAD, 0, LINE, proc.pid)
    ]


def test_a_flow_older_than_the_sensor_is_not_a_stream():
    """A connection that spoke before this sensor started: its later bytes
    are not reported as a first payload (their offset is unknown)."""
    require_root()
    pin_root = f"/sys/fs/bpf/rome-guard-test-late-{os.getpid()}"
    listener = socket.socket()
    listener.bind(("127.10.20.8", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    received = bytearray()

    def serve() -> None:  # no idle timeout: the sensor's compile takes seconds
        conn, _ = listener.accept()
        with conn:
            data = conn.recv(65536)
            while data:
                received.extend(data)
                data = conn.recv(65536)

    reader = threading.Thread(target=serve, daemon=True)
    reader.start()
    proc = subprocess.Popen(
        [sys.executable, CLIENT, "later", "127.10.20.8", str(port), b"hello\n".hex(), LINE.hex()],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while len(received) < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        # pinned apart from the module's sensor, which this process holds too
        os.makedirs(pin_root, exist_ok=True)
        with WireSensor(pin_root=pin_root) as late:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            proc.wait(30)
            reader.join(10)
            events = _events(late, lambda e: e.endpoint.dport == port, 1, 2)
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
        shutil.rmtree(pin_root, ignore_errors=True)
    assert bytes(received) == b"hello\n" + LINE
    assert events == []
