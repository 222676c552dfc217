"""The wire rules and their parsers: for each first packet a flow could
send, the exact set of rule ids expected (positives and the look-alikes
from a training host's ordinary traffic). Pure: no kernel, no sockets."""

from __future__ import annotations

import json

import pytest

from rome_guard.detect.engine import Engine
from rome_guard.detect.payload import facts_for, first_line_method, http_head, parse_dns
from rome_guard.detect.rules import load_rules
from rome_guard.detect.subject import Subject
from tests.detect.helpers import process, tcp
from tests.fixtures.network import XMRIG_LOGIN
from tests.fixtures.wire import dns_answer, dns_query


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_rules([]))


def wire_subject(
    payload: bytes, dport: int = 443, sni: str = "", remote_name: str = "", proto="tcp", **kw
):
    facts = facts_for(payload, proto, dport, sni=sni, remote_name=remote_name)
    return Subject(
        process(*kw.pop("argv", ("./svc",)), **kw), [], [tcp("10.0.0.9", dport)], wire=facts
    )


def fired(engine: Engine, s: Subject) -> set[str]:
    return {f.rule.id for f in engine.evaluate(s, trigger=s.connections[0])}


XMRIG_LINE = json.dumps(XMRIG_LOGIN).encode() + b"\n"

CASES = [
    # --- mining first lines, several spellings
    ("xmrig login", XMRIG_LINE, {"miner-stratum-login"}),
    (
        "xmr-stak login, algo only",
        b'{"method":"login","params":{"login":"w","pass":"x","algo":["cn/r"]},"id":1}\n',
        {"miner-stratum-login"},
    ),
    (
        "login with wallet, no agent",
        b'{"method": "login", "params": {"login": "4' + b"8" * 94 + b'"}, "id": 1}\n',
        {"miner-stratum-login"},
    ),
    (
        "subscribe spaced",
        b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n',
        {"miner-stratum-method"},
    ),
    (
        "authorize compact",
        b'{"params":["w","x"],"id":2,"method":"mining.authorize"}\n',
        {"miner-stratum-method"},
    ),
    (
        "nicehash subscribe",
        b'{"id":1,"method":"mining.subscribe","params":["NBMiner","EthereumStratum/1.0.0"]}\n',
        {"miner-stratum-method"},
    ),
    (
        "stratum v2 hello",
        b'{"id":1,"method":"mining.hello","params":{"proto":"EthereumStratum/2.0.0"}}\n',
        {"miner-stratum-method"},
    ),
    (
        "unknown mining.*",
        b'{"id":9,"method":"mining.capabilities","params":[]}\n',
        {"miner-stratum-method"},
    ),
    (
        "eth-proxy login",
        b'{"id":1,"jsonrpc":"2.0","method":"eth_submitLogin","params":["0xab"]}\n',
        {"miner-stratum-method"},
    ),
    ("minergate getjob", b'{"method":"getjob","params":{},"id":1}\n', {"miner-stratum-method"}),
    (
        "getblocktemplate line",
        b'{"jsonrpc":"1.0","id":1,"method":"getblocktemplate","params":[]}\n',
        {"miner-stratum-method"},
    ),
    (
        "cut by the capture",
        b'{"id":1,"method":"mining.subscribe","params":["' + b"A" * 600,
        {"miner-stratum-method"},
    ),
    # --- chisel's WebSocket
    (
        "chisel",
        b"GET / HTTP/1.1\r\nHost: 10.0.0.9:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Protocol: chisel-v3\r\nSec-WebSocket-Version: 13\r\n\r\n",
        {"tunnel-chisel-websocket"},
    ),
    (
        "chisel header case",
        b"GET / HTTP/1.1\r\nhost: h\r\nsec-websocket-protocol: chisel-v2\r\n\r\n",
        {"tunnel-chisel-websocket"},
    ),
    # --- ordinary traffic that must stay clean
    (
        "eth_blockNumber",
        b'{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":83}\n',
        set(),
    ),
    (
        "geth eth_blockNumber over http",
        b"POST / HTTP/1.1\r\nHost: localhost:8545\r\nContent-Length: 64\r\n\r\n"
        b'{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":1}',
        set(),
    ),
    (
        "language server",
        b'Content-Length: 52\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"initialize"}',
        set(),
    ),
    (
        "router login",
        b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"username":"admin","password":"x"}}\n',
        set(),
    ),
    (
        "web page naming login",
        b'<html><title>{"method":"login","params":{"agent":"x"}}</title>',
        set(),
    ),
    (
        "jupyter websocket",
        b"GET /api/kernels/1/channels HTTP/1.1\r\nHost: localhost:8888\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Protocol: v1.kernel.websocket.jupyter.org\r\n\r\n",
        set(),
    ),
    ("http 8080", b"GET /metrics HTTP/1.1\r\nHost: localhost:8080\r\n\r\n", set()),
    ("ssh banner", b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n", set()),
    ("redis", b"*1\r\n$4\r\nPING\r\n", set()),
    ("hostile bytes", b'\xff\xfe\x00{"method\x00":"mining.subscribe"}\n' + b"\x00" * 400, set()),
]


@pytest.mark.parametrize("name,payload,expected", CASES, ids=[c[0] for c in CASES])
def test_first_payload(engine, name, payload, expected):
    assert fired(engine, wire_subject(payload)) == expected


@pytest.mark.parametrize(
    "sni,expected",
    [
        ("gulf.moneroocean.stream", {"miner-pool-sni"}),
        ("donate.ssl.xmrig.com", {"miner-pool-sni"}),
        ("pypi.org", set()),
        ("huggingface.co", set()),
        ("cdn-lfs.huggingface.co", set()),
        ("notsupportxmr.com", set()),  # a suffix, not a substring
    ],
)
def test_tls_sni(engine, sni, expected):
    hello = b"\x16\x03\x01\x02\x00\x01" + b"\0" * 100
    assert fired(engine, wire_subject(hello, sni=sni.lower())) == expected


@pytest.mark.parametrize(
    "name,argv,expected",
    [
        ("pool.supportxmr.com", ("./svc",), {"miner-pool-dns-query"}),
        ("XMR.2Miners.com", ("./svc",), {"miner-pool-dns-query"}),
        ("pypi.org", ("./svc",), set()),
        ("files.pythonhosted.org", ("pip",), set()),
        ("pool.supportxmr.com", ("/lib/systemd/systemd-resolved",), set()),  # asks on behalf
    ],
)
def test_dns_query(engine, name, argv, expected):
    s = wire_subject(dns_query(name), dport=53, argv=argv, proto="udp")
    assert fired(engine, s) == expected
    # DNS over TCP: the same question after its two-byte length
    query = dns_query(name)
    s = wire_subject(len(query).to_bytes(2, "big") + query, dport=53, argv=argv)
    assert fired(engine, s) == expected


def test_tls_without_sni_to_a_pool_named_address(engine):
    hello = b"\x16\x03\x01\x02\x00\x01" + b"\0" * 100
    assert fired(engine, wire_subject(hello, remote_name="pool.supportxmr.com")) == {
        "miner-pool-named-address"
    }
    assert fired(engine, wire_subject(hello, remote_name="pypi.org")) == set()


def test_wire_rules_never_run_without_wire_facts(engine):
    """A process whose argv merely quotes a Stratum line is not judged by
    the wire rules (those need bytes seen on the wire)."""
    s = Subject(process("python3", "-c", XMRIG_LINE.decode()), [], [])
    assert not {f.rule.id for f in engine.evaluate(s)} & {
        r.id for r in load_rules([]).rules if r.needs_wire
    }


# --- parsers ----------------------------------------------------------------


def test_dns_questions_and_answers_with_compression():
    query = dns_query("Pool.SupportXMR.com")
    assert parse_dns(query).queries == ("pool.supportxmr.com",)
    answer = parse_dns(dns_answer(query, ["10.1.2.3", "10.1.2.4"], ttl=30))
    assert answer.response
    assert answer.answers == (
        ("pool.supportxmr.com", "10.1.2.3", 30),
        ("pool.supportxmr.com", "10.1.2.4", 30),
    )


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x00" * 11,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c",
        b"\x12\x34\x81\x80\x00\x01\x00\x05" + b"\x00" * 4 + b"\x3f" + b"a" * 10,
        b"\xff" * 512,
    ],
)
def test_dns_garbage_never_raises(garbage):
    parse_dns(garbage)  # pointer loops, cut labels, absurd counts


def test_first_line_and_http_head():
    assert first_line_method(b'  {"id":1,"method":"mining.submit"}\n') == (True, "mining.submit")
    assert first_line_method(b'{"id":1,"result":true}\n') == (True, "")
    assert first_line_method(b"GET / HTTP/1.1\r\n") == (False, "")
    line, headers = http_head(b"GET /x HTTP/1.1\r\nHost: a\r\nUpgrade:  websocket \r\n\r\nbody")
    assert line == "GET /x HTTP/1.1"
    assert headers == (("host", "a"), ("upgrade", "websocket"))
    assert http_head(b"HTTP/1.1 200 OK\r\n\r\n") == ("", ())
