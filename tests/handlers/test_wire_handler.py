"""The wire handler without a kernel: attribution of a flow to the process
that connected (never to a reused pid), cgroup naming when the process is
gone, DNS names with bounded lifetimes, and what enforce mode hands to the
kernel. The kernel's drop tables are a recording stand-in here; the real
ones are exercised in tests/sensors/test_wire_sensor.py and tests/test_wire.py."""

from __future__ import annotations

import ctypes as ct
import json

import pytest

from rome_guard.detect.engine import Engine
from rome_guard.detect.rules import load_rules
from rome_guard.events import (
    WIRE_DNS_ANSWER,
    WIRE_DNS_QUERY,
    WIRE_FIRST_PAYLOAD,
    WIRE_STREAM_DATA,
    Endpoint,
    WireEvent,
)
from rome_guard.findings import dropped_in_kernel
from rome_guard.handlers.wire import (
    NAME_TTL_MAX_S,
    NAME_TTL_MIN_S,
    ClientStreams,
    DnsNames,
    WireHandler,
)
from rome_guard.layout import wire as layout
from rome_guard.respond.enforce import wire_policy
from rome_guard.sensors import wire
from rome_guard.state.processes import ProcessModel
from tests.fixtures.network import XMRIG_LOGIN
from tests.fixtures.processes import process_info
from tests.fixtures.wire import dns_answer, dns_query

TICK_NS = 10_000_000  # one /proc clock tick


class Kernel:
    def __init__(self):
        self.dropped: set[str] = set()
        self.policy = None
        self.enforcing = False

    def set_drop_policy(self, methods, hosts):
        self.policy = (dict(methods), tuple(hosts))

    def enforce(self, on):
        self.enforcing = on

    def drop_address(self, address):
        self.dropped.add(address)

    def undrop_address(self, address):
        self.dropped.discard(address)


class Processes(ProcessModel):
    """The real process model over a fixed table: no /proc, no cgroup walk."""

    def __init__(self, table):
        super().__init__()
        self._fixed = table or {}

    def resolve(self, pid):
        return self._fixed.get(pid)

    def lineage(self, info):
        return []

    def cgroup_path_of(self, cgroup_id):
        return {77: "/system.slice/docker-" + "ab" * 32 + ".scope"}.get(cgroup_id, "")


def event(kind=WIRE_FIRST_PAYLOAD, pid=4242, payload=b"", dport=3333, connect_ticks=2000, **kw):
    values = dict(
        kind=kind,
        pid=pid,
        uid=1000,
        comm="svc",
        cgroup_id=77,
        cookie=99,
        endpoint=Endpoint("udp" if dport == 53 else "tcp", 4, "10.0.0.2", 5353, "10.9.9.9", dport),
        timestamp_ns=connect_ticks * TICK_NS + 5,
        connect_ns=connect_ticks * TICK_NS,
        payload=payload,
        payload_len=len(payload),
    )
    values.update(kw)
    return WireEvent(**values)


def handler(table=None, kernel=None, enforce=False, now=None):
    ruleset = load_rules([])
    engine = Engine(ruleset)
    alerts = []
    clock = now or [1000.0]
    h = WireHandler(
        processes=Processes(table),
        evaluate=lambda s, trigger: engine.evaluate(s, trigger=trigger),
        raise_alert=alerts.append,
        kernel=kernel,
        enforce=enforce,
        clock=lambda: clock[0],
    )
    h.install(ruleset)
    return h, alerts, clock


SUBSCRIBE = b'{"id":1,"method":"mining.subscribe","params":[]}\n'


def test_flow_is_blamed_on_the_process_that_connected():
    info = process_info(4242, start=1990, comm="kworker")
    h, alerts, _ = handler({4242: info})
    h.handle(event(payload=SUBSCRIBE))
    assert [a.rule.id for a in alerts] == ["miner-stratum-method"]
    assert alerts[0].process is info
    assert alerts[0].network.daddr == "10.9.9.9"
    assert alerts[0].extra["wire"]["method"] == "mining.subscribe"


def test_reused_pid_is_not_blamed_the_cgroup_is_named():
    newer = process_info(4242, start=2500, comm="innocent")  # started after the connect
    h, alerts, _ = handler({4242: newer})
    h.handle(event(payload=SUBSCRIBE))
    blamed = alerts[0].process
    assert blamed.comm == "svc" and blamed.key.start_time == 0
    assert blamed.attribution.container_id == "ab" * 32


def test_gone_process_still_names_its_cgroup():
    h, alerts, _ = handler({})
    h.handle(event(payload=SUBSCRIBE))
    assert alerts[0].process.cgroup.startswith("/system.slice/docker-")
    assert alerts[0].extra["wire"]["cgroup_id"] == 77


def test_dns_answer_names_the_address_for_a_bounded_time():
    h, alerts, clock = handler({4242: process_info(4242, start=1990)})
    query = dns_query("eu.supportxmr.com")
    h.handle(event(WIRE_DNS_ANSWER, pid=0, dport=53, payload=dns_answer(query, ["10.9.9.9"], 5)))
    hello = b"\x16\x03\x01\x00\x10\x01" + b"\0" * 60
    h.handle(event(payload=hello, tls=True))
    assert [a.rule.id for a in alerts] == ["miner-pool-named-address"]
    assert alerts[0].extra["wire"]["remote_name"] == "eu.supportxmr.com"
    clock[0] += NAME_TTL_MIN_S + 1  # a 5 s TTL still counts for the minimum
    assert h.names.name_of("10.9.9.9", clock[0]) == ""


def test_dns_names_expire_and_are_bounded():
    names = DnsNames(limit=2)
    names.learn("a.example", "10.0.0.1", 10**9, now=0)
    assert names.name_of("::ffff:10.0.0.1", NAME_TTL_MAX_S - 1) == "a.example"
    assert names.expire(NAME_TTL_MAX_S + 1) == ["10.0.0.1"]
    for i in range(3):
        names.learn("b.example", f"10.0.1.{i}", 60, now=0)
    assert len(names) == 2


def test_enforce_hands_pool_addresses_to_the_kernel_and_takes_them_back():
    kernel = Kernel()
    h, _, clock = handler(kernel=kernel, enforce=True)
    assert kernel.enforcing
    methods, hosts = kernel.policy
    assert methods["mining.subscribe"] is False and methods["login"] is True
    assert "supportxmr.com" in hosts and not any("*" in m for m in methods)
    for name, address in (("pool.supportxmr.com", "10.9.9.9"), ("pypi.org", "10.8.8.8")):
        answer = dns_answer(dns_query(name), [address], 60)
        h.handle(event(WIRE_DNS_ANSWER, pid=0, dport=53, payload=answer))
    assert kernel.dropped == {"10.9.9.9"}
    clock[0] += NAME_TTL_MIN_S + 1
    h.handle(event(payload=b"x"))
    assert kernel.dropped == set()


def test_monitor_mode_gives_the_kernel_nothing():
    kernel = Kernel()
    h, _, _ = handler(kernel=kernel, enforce=False)
    answer = dns_answer(dns_query("pool.supportxmr.com"), ["10.9.9.9"], 60)
    h.handle(event(WIRE_DNS_ANSWER, pid=0, dport=53, payload=answer))
    assert kernel.policy is None and kernel.dropped == set()


def test_policy_takes_only_kill_rules():
    ruleset = load_rules([])
    for rule in ruleset.rules:
        rule.action = "alert"
    assert wire_policy(ruleset).methods == {} and wire_policy(ruleset).hosts == ()


def test_kernel_hashes():
    # wire.c walks a SNI from its end: the key of a suffix is its reverse
    assert wire.suffix_key("SupportXMR.com.") == wire.fnv1a(b"moc.rmxtroppus")
    assert wire.method_key("login") == wire.fnv1a(b"login")
    assert wire.fnv1a(b"") == 0xCBF29CE484222325


def test_record_decodes():
    rec = layout.WireRecord(kind=layout.WIRE_FIRST_PAYLOAD, pid=7, family=6, protocol=6, dport=443)
    rec.flags = layout.WIRE_TLS_HELLO | layout.WIRE_DROPPED
    rec.drop_reason = layout.WIRE_DROP_SNI
    rec.daddr[15] = 1
    ct.memmove(rec.sni, b"x.example", 9)
    rec.sni_len = 9
    ct.memmove(rec.data, b"\x16\x03\x01", 3)
    rec.captured = 3
    decoded = layout.decode_wire_record(bytes(rec))
    assert (decoded.sni, decoded.tls, decoded.dropped) == ("x.example", True, "sni")
    assert decoded.endpoint.daddr == "::1" and decoded.payload == b"\x16\x03\x01"
    rec.captured = layout.WIRE_CAPTURE + 1
    with pytest.raises(layout.MalformedWireRecord):
        layout.decode_wire_record(bytes(rec))


def test_decoder_format_matches_the_mirror():
    raw = bytes((i * 7 + 3) % 251 for i in range(ct.sizeof(layout.WireRecord)))
    record = layout.WireRecord.from_buffer_copy(raw)
    flat = []
    for name, *_ in layout.WireRecord._fields_:
        value = getattr(record, name)
        flat.append(bytes(value) if isinstance(value, ct.Array) else value)
    assert layout.WIRE_FORMAT.size == ct.sizeof(layout.WireRecord)
    assert list(layout.WIRE_FORMAT.unpack(raw)) == flat


# --- client streams ----------------------------------------------------------

LOGIN = json.dumps(XMRIG_LOGIN, separators=(",", ":")).encode() + b"\n"


def stream_events(data: bytes, cuts: list[int], cookie: int = 99, **kw) -> list[WireEvent]:
    """data as the kernel reports it when the client writes it in pieces
    ending at cuts: one record per piece, placed by its stream offset."""
    ends = [*cuts, len(data)]
    events, start = [], 0
    for i, end in enumerate(ends):
        piece = data[start:end]
        events.append(
            event(
                kind=WIRE_FIRST_PAYLOAD if start == 0 else WIRE_STREAM_DATA,
                payload=piece,
                offset=start,
                segment=i + 1,
                cookie=cookie,
                stream_end=i == len(ends) - 1,
                **kw,
            )
        )
        start = end
    return events


@pytest.mark.parametrize("cuts", [[8], [8, 40], [1, 2, 3, 200], [len(LOGIN) - 1]])
def test_a_login_written_in_pieces_is_judged_whole(cuts):
    h, alerts, _ = handler({4242: process_info(4242, start=1990)})
    for e in stream_events(LOGIN, cuts):
        h.handle(e)
    assert [a.rule.id for a in alerts] == ["miner-stratum-login"]  # once, not per piece
    assert alerts[0].extra["wire"]["first_bytes"].startswith('{"id":1,"jsonrpc"')
    assert len(h.streams) == 0  # the stream's last record lets it go


def test_pieces_out_of_order_and_retransmitted_still_make_the_stream():
    h, alerts, _ = handler({4242: process_info(4242, start=1990)})
    first, second, third = stream_events(LOGIN, [10, 30])
    for e in (first, third, first, second):
        h.handle(e)
    assert [a.rule.id for a in alerts] == ["miner-stratum-login"]


def test_streams_are_bounded_in_count_and_time():
    h, _, clock = handler({4242: process_info(4242, start=1990)})
    h.streams = ClientStreams(limit=3, ttl_s=2.0)
    for cookie in range(5):
        h.handle(event(payload=b'{"id":1,', cookie=cookie))
    assert len(h.streams) == 3 and h.streams.evicted == 2
    clock[0] += 5
    h.handle(event(payload=b"x", cookie=77, stream_end=True))
    assert len(h.streams) == 0


def test_a_quiet_stream_gives_no_alert_while_it_grows():
    h, alerts, _ = handler({4242: process_info(4242, start=1990)})
    body = b'{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber","params":[]}\n' * 3
    for e in stream_events(body, [20, 64, 100]):
        h.handle(e)
    assert alerts == []


class DroppingKernel(Kernel):
    def __init__(self):
        super().__init__()
        self.flows: list[int] = []

    def drop_flow(self, cookie):
        self.flows.append(cookie)


def test_enforce_a_verdict_the_kernel_could_not_reach_drops_the_rest_of_the_flow():
    kernel = DroppingKernel()
    h, alerts, _ = handler({4242: process_info(4242, start=1990)}, kernel=kernel, enforce=True)
    upgrade = (
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Protocol: chisel-v3\r\n\r\n"
    )
    h.handle(event(payload=upgrade, cookie=5))
    assert [a.rule.id for a in alerts] == ["tunnel-chisel-websocket"]
    assert kernel.flows == [5]
    # a flow the kernel dropped itself needs nothing more
    h.handle(event(payload=SUBSCRIBE, cookie=6, dropped="method", pid=4242))
    assert kernel.flows == [5]


def test_dns_question_dropped_in_the_kernel_is_marked_on_the_finding():
    h, alerts, _ = handler({4242: process_info(4242, start=1990)})
    h.handle(event(kind=WIRE_DNS_QUERY, dport=53, payload=dns_query("a.pinggy.io"), dropped="dns"))
    assert [a.rule.id for a in alerts] == ["tunnel-service-dns-query"]
    assert dropped_in_kernel(alerts[0])
