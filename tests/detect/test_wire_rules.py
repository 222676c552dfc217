"""The wire rules and their parsers: for each first packet a flow could
send, the exact set of rule ids expected (positives and the look-alikes
from a training host's ordinary traffic). Pure: no kernel, no sockets."""

from __future__ import annotations

import json

import pytest

from rome_guard.detect.engine import Engine
from rome_guard.detect.payload import (
    Preamble,
    facts_for,
    first_line_method,
    http_head,
    jsonrpc_methods,
    parse_dns,
    peel_preamble,
    websocket_messages,
)
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


def socks5(host: bytes, port: int = 3333, auth: bool = False) -> bytes:
    """A SOCKS5 client's greeting (and RFC 1929 login), then CONNECT by name."""
    greeting = b"\x05\x01\x02" + b"\x01\x04user\x04pass" if auth else b"\x05\x01\x00"
    return greeting + b"\x05\x01\x00\x03" + bytes([len(host)]) + host + port.to_bytes(2, "big")


def ws_frame(text: bytes, key: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """One masked client text frame (RFC 6455)."""
    head = b"\x81" + (
        bytes([0x80 | len(text)]) if len(text) < 126 else b"\xfe" + len(text).to_bytes(2, "big")
    )
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(text))


WS_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: 10.0.0.9\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SUBSCRIBE_LINE = b'{"id":1,"method":"mining.subscribe","params":["x"]}\n'
GBT = b'{"method":"get_block_template","params":{"wallet_address":"4abc","reserve_size":60}}'
JUPYTER = b'{"header":{"msg_type":"execute_request"},"content":{"code":"1+1"}}'

STREAMS = [
    # --- key order, framing, batches
    (
        "eth-proxy, method last",
        b'{"worker": "", "jsonrpc": "2.0", "params": ["0xab", "x"], "id": 2, '
        b'"method": "eth_submitLogin"}\n',
        {"miner-stratum-method"},
    ),
    (
        "monerod over HTTP",
        b"POST /json_rpc HTTP/1.1\r\nHost: 10.0.0.9:18081\r\nContent-Length: %d\r\n\r\n%s"
        % (len(GBT), GBT),
        {"miner-stratum-method"},
    ),
    (
        "bitcoind chunked",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(SUBSCRIBE_LINE), SUBSCRIBE_LINE.replace(b"mining.subscribe", b"getblocktemplate")),
        {"miner-stratum-method"},
    ),
    (
        "stratum in WebSocket frames",
        WS_UPGRADE + ws_frame(SUBSCRIBE_LINE),
        {"miner-stratum-method"},
    ),
    # the login's "agent" lies past the first 512 characters of what was read
    ("xmrig login in WebSocket frames", WS_UPGRADE + ws_frame(XMRIG_LINE), {"miner-stratum-login"}),
    (
        "ethminer getwork over HTTP",
        b"POST / HTTP/1.1\r\nHost: localhost:8545\r\n\r\n"
        b'{"jsonrpc":"2.0","method":"eth_getWork","params":[],"id":1}',
        {"miner-stratum-method"},
    ),
    (
        "batch array",
        b'[{"jsonrpc":"2.0","id":1,"method":"eth_chainId"},'
        b'{"jsonrpc":"2.0","id":2,"method":"eth_getWork"}]\n',
        {"miner-stratum-method"},
    ),
    (
        "a second message mines",
        b'{"id":1,"method":"eth_blockNumber"}\n{"id":2,"method":"mining.authorize","params":[]}\n',
        {"miner-stratum-method"},
    ),
    # --- preambles
    ("socks5 then login", socks5(b"10.0.0.9") + XMRIG_LINE, {"miner-stratum-login"}),
    (
        "socks5 with a login, to a pool name",
        socks5(b"pool.supportxmr.com", auth=True) + XMRIG_LINE,
        {"miner-stratum-login", "miner-pool-named-address"},
    ),
    (
        "socks4a to a pool name",
        b"\x04\x01\x0d\x05\x00\x00\x00\x01\x00xmr.2miners.com\x00" + SUBSCRIBE_LINE,
        {"miner-stratum-method", "miner-pool-named-address"},
    ),
    (
        "socks4 by address",
        b"\x04\x01\x0d\x05\x0a\x00\x00\x09user\x00" + SUBSCRIBE_LINE,
        {"miner-stratum-method"},
    ),
    (
        "http connect",
        b"CONNECT 10.0.0.9:3333 HTTP/1.1\r\nHost: 10.0.0.9:3333\r\n\r\n" + SUBSCRIBE_LINE,
        {"miner-stratum-method"},
    ),
    (
        "socks5 to a tunnel service",
        socks5(b"connect.ngrok-agent.com", 443),
        {"tunnel-service-named-address"},
    ),
    # --- the benign twins
    ("socks5 to a package index", socks5(b"pypi.org", 443) + b"\x16\x03\x01\x02\x00\x01", set()),
    (
        "http connect to a model hub",
        b"CONNECT huggingface.co:443 HTTP/1.1\r\nHost: huggingface.co:443\r\n\r\n",
        set(),
    ),
    ("jupyter frames", WS_UPGRADE + ws_frame(JUPYTER), set()),
    (
        "node RPC batch",
        b'[{"jsonrpc":"2.0","id":1,"method":"eth_blockNumber"},'
        b'{"jsonrpc":"2.0","id":2,"method":"eth_getBalance","params":["0x0","latest"]}]',
        set(),
    ),
    (
        "monerod get_info",
        b"POST /json_rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 42\r\n\r\n"
        b'{"jsonrpc":"2.0","id":0,"method":"get_info"}',
        set(),
    ),
    ("deep nesting", b'{"method":"login","params":' + b"[" * 5000 + b"]" * 5000 + b"}\n", set()),
]


@pytest.mark.parametrize("name,stream,expected", STREAMS, ids=[c[0] for c in STREAMS])
def test_client_stream(engine, name, stream, expected):
    assert fired(engine, wire_subject(stream, dport=1080)) == expected


def test_preamble_peeled_and_named():
    preamble, rest = peel_preamble(socks5(b"Pool.SupportXMR.com", 443, auth=True) + b"hi")
    assert preamble == Preamble("socks5", "pool.supportxmr.com", 443) and rest == b"hi"
    assert peel_preamble(b"\x05\x01\x00")[0] == Preamble("socks5")  # request not sent yet
    assert peel_preamble(b"CONNECT [::1]:22 HTTP/1.1\r\n\r\nSSH-2.0-x") == (
        Preamble("http-connect", "::1", 22),
        b"SSH-2.0-x",
    )
    assert peel_preamble(b"GET / HTTP/1.1\r\n\r\n")[0] is None


def test_websocket_frames_are_unmasked_each_with_its_key():
    frames = ws_frame(b'{"a":', key=b"\x01\x02\x03\x04")
    frames = b"\x01" + frames[1:]  # not FIN: the message goes on
    frames += b"\x89\x00"  # a ping in between
    frames += ws_frame(b"1}", key=b"\xff\xee\xdd\xcc")
    frames = frames[: len(frames) - 3] + frames[len(frames) - 3 :]
    assert websocket_messages(frames) == [b'{"a":1}']


def test_jsonrpc_methods_bounded():
    assert jsonrpc_methods([b'{"id":1,"result":true}\n']) == (True, ())
    assert jsonrpc_methods([b"[" * 100_000]) == (False, ())
    many = b"".join(b'{"id":%d,"method":"m%d"}\n' % (i, i) for i in range(500))
    assert len(jsonrpc_methods([many])[1]) <= 32


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
