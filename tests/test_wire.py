"""The wire end to end: a real `rome-guard run`, real clients speaking
Stratum, DNS and TLS to fake pools on loopback and from a network
namespace, and what the journal says about them. Monitor mode alerts;
enforce mode drops in the kernel and kills, and the fake pool counts how
many payload bytes ever reached it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request

import pytest

from tests.conftest import require_root
from tests.fixtures.daemon import by_pid, daemon
from tests.fixtures.network import XMRIG_LOGIN
from tests.fixtures.wire import (
    CountingServer,
    DnsServer,
    FakeProxy,
    client,
    fake_miner,
    netns_pair,
    split_client_binary,
    tls_context,
)

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

XMRIG_LINE = json.dumps(XMRIG_LOGIN, separators=(",", ":")).encode() + b"\n"
SUBSCRIBE_SPACED = b'{"id": 1, "method": "mining.subscribe", "params": ["cpuminer/2.5.1"]}\n'
AUTHORIZE_COMPACT = b'{"params":["wallet.rig1","x"],"id":2,"method":"mining.authorize"}\n'
ETH_PROXY_LOGIN = b'{"id":1,"jsonrpc":"2.0","method":"eth_submitLogin","params":["0xabc"]}\n'
POOL_NAME = "pool.supportxmr.com"
# the key that joins an alert to the agent's trajectory
ROLLOUT_CONFIG = "rules: []\nattribution:\n  env_keys: [ROME_ROLLOUT]\n"


@pytest.fixture(scope="module")
def workdir():
    path = tempfile.mkdtemp(prefix="rg-wire-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def monitor():
    require_root()
    with daemon(mode="monitor", config_text=ROLLOUT_CONFIG) as d:
        yield d


@pytest.fixture(scope="module")
def enforce():
    require_root()
    with daemon(mode="enforce") as d:
        yield d


@pytest.fixture(scope="module")
def tls():
    with tls_context() as context:
        yield context


def _done(proc, timeout: float = 20.0) -> int:
    proc.wait(timeout)
    return proc.returncode


# generous: other daemons and tests share this host's two cores
ALERT_TIMEOUT_S = 60.0


def _wire_alert(d, pid: int, rule: str) -> dict:
    return d.wait_alert(by_pid(pid, rule), timeout=ALERT_TIMEOUT_S)


# --- monitor mode: alerted, attributed --------------------------------------


def test_renamed_miner_from_config_file_is_alerted_by_its_login(monitor, workdir):
    pool = CountingServer("127.10.3.3", 443)
    try:
        miner = fake_miner(workdir, f"{pool.host}:{pool.port}")
        alert = _wire_alert(monitor, miner.pid, "miner-stratum-login")
        _done(miner)
    finally:
        pool.close()
    assert alert["category"] == "miner"
    assert alert["process"]["comm"] == "dbus-sessiond"
    assert not any("3.3" in arg or "stratum" in arg for arg in alert["process"]["cmdline"])
    assert alert["wire"]["method"] == "login"
    assert alert["network"]["daddr"] == "127.10.3.3" and alert["network"]["dport"] == 443
    assert alert["process"]["cgroup"]  # the cgroup is named with the process
    assert pool.received and pool.received[0].startswith(b'{"id":1')  # monitor: not dropped


@pytest.mark.parametrize(
    "host,line",
    [
        ("127.10.4.4", SUBSCRIBE_SPACED),
        ("127.10.4.5", AUTHORIZE_COMPACT),
        ("::1", ETH_PROXY_LOGIN),
    ],
    ids=["subscribe-spaced", "authorize-compact-v4", "eth-proxy-v6"],
)
def test_stratum_script_on_an_ordinary_port(monitor, host, line):
    pool = CountingServer(host, 0)
    try:
        proc = client("send", host, str(pool.port), line.hex())
        alert = _wire_alert(monitor, proc.pid, "miner-stratum-method")
        _done(proc)
    finally:
        pool.close()
    assert alert["category"] == "miner"
    assert alert["wire"]["method"] in line.decode()
    assert alert["network"]["dport"] == pool.port


@pytest.mark.parametrize("sni", ["gulf.moneroocean.stream", "XMR-EU1.NanoPool.ORG"])
def test_pool_named_in_tls_sni(monitor, tls, sni):
    server = CountingServer("127.10.44.4", 443, tls=tls)
    try:
        proc = client("tls", server.host, str(server.port), sni, "stratum")
        alert = _wire_alert(monitor, proc.pid, "miner-pool-sni")
        _done(proc)
    finally:
        server.close()
    assert alert["wire"]["sni"] == sni.lower()
    assert alert["wire"]["alpn"] == "stratum"
    assert alert["category"] == "miner"


def test_pool_named_only_in_dns(monitor, tls):
    resolver = DnsServer("127.10.53.53", {"supportxmr.com": "127.10.77.7"})
    pool = CountingServer("127.10.77.7", 443, tls=tls)
    try:
        proc = client("resolve", resolver.host, POOL_NAME, "443")
        query = _wire_alert(monitor, proc.pid, "miner-pool-dns-query")
        named = _wire_alert(monitor, proc.pid, "miner-pool-named-address")
        assert _done(proc) == 0
    finally:
        resolver.close()
        pool.close()
    assert query["wire"]["dns_query"] == [POOL_NAME]
    assert named["wire"]["remote_name"] == POOL_NAME
    assert "sni" not in named["wire"]  # TLS without SNI: named by the DNS answer
    assert named["network"]["daddr"] == "127.10.77.7"


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET / HTTP/1.1\r\nHost: 127.10.8.8:8080\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Protocol: chisel-v3\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET /tunnel HTTP/1.1\r\nhost: relay\r\nsec-websocket-protocol: chisel-v2\r\n"
        b"upgrade: WebSocket\r\n\r\n",
    ],
    ids=["chisel-v3", "lower-case-v2"],
)
def test_chisel_websocket_handshake(monitor, request_head):
    server = CountingServer("127.10.8.8", 0)
    try:
        proc = client("send", server.host, str(server.port), request_head.hex())
        alert = _wire_alert(monitor, proc.pid, "tunnel-chisel-websocket")
        _done(proc)
    finally:
        server.close()
    assert alert["category"] == "reverse_tunnel"
    assert alert["wire"]["http_request"].startswith("GET /")


def test_client_in_its_own_netns_and_container_cgroup(monitor):
    """A container-like client: its own network namespace over a veth
    pair, and a cgroup named like a Docker scope."""
    from rome_guard.linux import cgroup2_root

    container = "c0ffee" * 10 + "abcd"
    cgroup = os.path.join(cgroup2_root(), "rg-wire-test.slice", f"docker-{container}.scope")
    os.makedirs(cgroup, exist_ok=True)
    try:
        with netns_pair("rgwire", "10.200.7.1", "10.200.7.2") as ns:
            pool = CountingServer("10.200.7.1", 0)
            try:
                proc = client(
                    "send",
                    "10.200.7.1",
                    str(pool.port),
                    SUBSCRIBE_SPACED.hex(),
                    netns=ns,
                    cgroup=cgroup,
                )
                alert = monitor.wait_alert(
                    lambda r: (
                        r["rule"] == "miner-stratum-method"
                        and r["network"]["daddr"] == "10.200.7.1"
                    )
                )
                _done(proc)
            finally:
                pool.close()
    finally:
        for path in (cgroup, os.path.dirname(cgroup)):
            os.rmdir(path)
    assert alert["process"]["container_id"] == container
    assert alert["process"]["comm"].startswith("python")


def test_ordinary_traffic_stays_clean(monitor, tls):
    """JSON-RPC that is not mining, TLS to package indexes and model hubs,
    ordinary DNS, HTTP and WebSockets on notebook ports."""
    resolver = DnsServer("127.10.53.54", {"pypi.org": "127.10.45.5"})
    plain = CountingServer("127.10.45.6", 0)
    tls_server = CountingServer("127.10.45.5", 443, tls=tls)
    cases = [
        (
            "send",
            plain.host,
            str(plain.port),
            b'{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":83}\n'.hex(),
        ),
        (
            "send",
            plain.host,
            str(plain.port),
            # a node's own RPC over HTTP (eth_getWork there is ethminer's getwork
            # mining: tests/detect/test_wire_rules.py)
            b"POST / HTTP/1.1\r\nHost: localhost:8545\r\nContent-Type: application/json\r\n"
            b'Content-Length: 63\r\n\r\n{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":1}'.hex(),
        ),
        (
            "send",
            plain.host,
            str(plain.port),
            b'Content-Length: 85\r\n\r\n{"jsonrpc":"2.0","id":1,"method":"initialize",'
            b'"params":{"processId":1,"rootUri":null}}'.hex(),
        ),
        (
            "send",
            plain.host,
            str(plain.port),
            b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"username":"admin",'
            b'"password":"hunter2"}}\n'.hex(),
        ),
        (
            "send",
            plain.host,
            str(plain.port),
            b"GET /api/kernels/1/channels HTTP/1.1\r\nHost: localhost:8888\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Protocol: v1.kernel.websocket.jupyter.org\r\n\r\n".hex(),
        ),
        (
            "send",
            plain.host,
            str(plain.port),
            b"GET /metrics HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5\r\n\r\n".hex(),
        ),
        ("tls", tls_server.host, "443", "pypi.org", "http/1.1"),
        ("tls", tls_server.host, "443", "huggingface.co", "h2"),
        ("tls", tls_server.host, "443", "files.pythonhosted.org"),
        ("resolve", resolver.host, "pypi.org", "443"),
    ]
    try:
        procs = [client(*case) for case in cases]
        codes = [_done(p) for p in procs]
        monitor.settle(3.0)
    finally:
        resolver.close()
        plain.close()
        tls_server.close()
    assert codes == [0] * len(cases)
    pids = {p.pid for p in procs}
    assert [r["rule"] for r in monitor.records() if r.get("process", {}).get("pid") in pids] == []


def test_hostile_payload_keeps_the_journal_and_metrics_clean(monitor, workdir):
    payload = (
        b'{"id":1,"method":"mining.subscribe","params":["\xff\xfe\x00\x1b[2J\xc3('
        + b"A" * 65536
        + b'"]}\n'
    )
    path = os.path.join(workdir, "hostile.bin")
    with open(path, "wb") as f:
        f.write(payload)
    pool = CountingServer("127.10.4.9", 0)
    try:
        proc = client("send", pool.host, str(pool.port), f"@{path}")
        alert = _wire_alert(monitor, proc.pid, "miner-stratum-method")
        _done(proc)
    finally:
        pool.close()
    with open(monitor.alerts, "rb") as f:
        for line in f:
            json.loads(line.decode("utf-8"))  # strict UTF-8, one JSON value per line
    first = alert["wire"]["first_bytes"]
    assert "\\xff\\xfe" in first and "\x00" in first  # escaped or JSON-escaped, never raw
    assert len(first) < 400
    assert alert["wire"]["payload_bytes"] >= 512
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{monitor.metrics_port}/metrics").read()
    assert b"AAAAAAAA" not in metrics and b"\xff" not in metrics and b"subscribe" not in metrics


# --- client streams: pieces, preambles, framings ------------------------------

# the login in three writes, as the issue found it: the first is `{"id":1,`
LOGIN_PIECES = [XMRIG_LINE[:8], XMRIG_LINE[8:60], XMRIG_LINE[60:]]
ETH_PROXY_METHOD_LAST = (
    b'{"worker": "", "jsonrpc": "2.0", "params": ["0x52908400098527886E0F7030069857D2E4169EE7", '
    b'"x"], "id": 2, "method": "eth_submitLogin"}\n'
)
GET_BLOCK_TEMPLATE = (
    b'{"jsonrpc":"2.0","id":"0","method":"get_block_template","params":{"wallet_address":"4'
    + b"8" * 94
    + b'","reserve_size":60}}'
)


def _spawn(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _fed(argv: list[str], pieces: list[bytes], gap_s: float) -> subprocess.Popen:
    """A tool reading its stdin (socat), fed the pieces gap_s apart: each
    piece is one read for it, and so one write to its socket."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )

    def feed() -> None:
        try:
            for piece in pieces:
                proc.stdin.write(piece)
                proc.stdin.flush()
                time.sleep(gap_s)
            time.sleep(2)
            proc.stdin.close()
        except (OSError, ValueError):
            pass  # killed

    threading.Thread(target=feed, daemon=True).start()
    return proc


def _pieces(spelling: str, host: str, port: int, pieces: list[bytes], workdir: str):
    if spelling == "python":
        return client("pieces", host, str(port), "0.3", *(p.hex() for p in pieces))
    if spelling == "c":
        return _spawn(
            split_client_binary(workdir), host, str(port), "300", *(p.hex() for p in pieces)
        )
    return _fed(["socat", "-u", "-", f"TCP:{host}:{port},nodelay"], pieces, 0.3)


@pytest.mark.parametrize("spelling", ["python", "c", "socat"])
def test_login_in_pieces_is_read_whole(monitor, workdir, spelling):
    pool = CountingServer("127.10.60.1", 0)
    try:
        proc = _pieces(spelling, pool.host, pool.port, LOGIN_PIECES, workdir)
        alert = _wire_alert(monitor, proc.pid, "miner-stratum-login")
        _done(proc)
    finally:
        pool.close()
    assert alert["category"] == "miner" and alert["wire"]["method"] == "login"
    # monitor mode: this daemon dropped nothing (an enforcing daemon of another
    # suite on this host may cut the rest)
    assert pool.received and pool.received[0].startswith(LOGIN_PIECES[0])


def _through_proxy(spelling: str, proxy: FakeProxy, name: str, port: int, payload: bytes):
    """A client asking proxy for name:port, then sending payload (python) or
    an HTTP request (curl). curl reads its URL and proxy from a config on
    stdin: the name is on the wire only, never in argv."""
    if spelling == "python-socks5":
        return client("socks5", proxy.host, str(proxy.port), name, str(port), payload.hex())
    if spelling == "curl-socks4a":
        option = "socks4a"
        config = f'{option} = "{proxy.host}:{proxy.port}"\nurl = "http://{name}:{port}/"\n'
        return _fed(["curl", "-s", "-m", "5", "-K", "-"], [config.encode()], 0)
    option = "socks5-hostname" if spelling == "curl-socks5h" else "proxytunnel\nproxy"
    config = f'{option} = "{proxy.host}:{proxy.port}"\nurl = "http://{name}:{port}/"\n'
    return _fed(["curl", "-s", "-m", "5", "-K", "-"], [config.encode()], 0)


@pytest.mark.parametrize("spelling", ["python-socks5", "curl-socks5h", "curl-http-connect"])
def test_pool_named_to_a_proxy(monitor, spelling):
    proxy = FakeProxy("127.10.61.1", 0)
    try:
        proc = _through_proxy(spelling, proxy, POOL_NAME, 3333, XMRIG_LINE)
        alert = _wire_alert(monitor, proc.pid, "miner-pool-named-address")
        _done(proc)
    finally:
        proxy.close()
    assert alert["wire"]["proxy_host"] == POOL_NAME and alert["wire"]["remote_name"] == POOL_NAME
    if spelling == "python-socks5":  # a login followed the reply
        _wire_alert(monitor, proc.pid, "miner-stratum-login")


def _jsonrpc(spelling: str, host: str, port: int):
    if spelling == "python-key-order":
        return client("send", host, str(port), ETH_PROXY_METHOD_LAST.hex(), "1")
    if spelling == "curl-monerod-http":  # the body on stdin: the wallet is not in argv
        return _fed(
            ["curl", "-s", "-m", "5", "-H", "Content-Type: application/json", "--data-binary", "@-",
             f"http://{host}:{port}/json_rpc"],
            [GET_BLOCK_TEMPLATE], 0,
        )  # fmt: skip
    # a WebSocket upgrade, then the subscribe in a masked text frame
    key = b"\x11\x22\x33\x44"
    frame = b"\x81" + bytes([0x80 | len(SUBSCRIBE_SPACED)]) + key
    frame += bytes(c ^ key[i % 4] for i, c in enumerate(SUBSCRIBE_SPACED))
    upgrade = (
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return client("pieces", host, str(port), "0.2", upgrade.hex(), frame.hex())


@pytest.mark.parametrize("spelling", ["python-key-order", "curl-monerod-http", "python-websocket"])
def test_mining_jsonrpc_in_any_order_and_framing(monitor, spelling):
    node = CountingServer("127.10.62.1", 0)
    try:
        proc = _jsonrpc(spelling, node.host, node.port)
        alert = _wire_alert(monitor, proc.pid, "miner-stratum-method")
        _done(proc)
    finally:
        node.close()
    assert alert["category"] == "miner"
    assert (
        alert["wire"]["method"] in (b"eth_submitLogin get_block_template mining.subscribe").decode()
    )


def _tls(spelling: str, host: str, sni: str):
    if spelling == "python":
        return client("tls", host, "443", sni)
    if spelling == "openssl":
        return subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{host}:443", "-servername", sni, "-quiet"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    return _spawn(
        "curl", "-s", "-k", "-m", "5", "--resolve", f"{sni}:443:{host}", f"https://{sni}/"
    )


@pytest.mark.parametrize(
    "spelling,sni",
    [
        ("python", "connect.ngrok-agent.com"),
        ("openssl", "region1.v2.argotunnel.com"),
        ("curl", "a.pinggy.io"),
    ],
)
def test_tunnel_service_named_in_tls(monitor, tls, spelling, sni):
    server = CountingServer("127.10.63.1", 443, tls=tls)
    try:
        proc = _tls(spelling, server.host, sni)
        alert = _wire_alert(monitor, proc.pid, "tunnel-service-sni")
        proc.kill()
        proc.wait(10)
    finally:
        server.close()
    assert alert["category"] == "reverse_tunnel" and alert["wire"]["sni"] == sni


def test_stream_twins_stay_clean(monitor, tls, workdir):
    """Proxies to package indexes and model hubs, a node's RPC in pieces and
    over HTTP, TLS to a model hub: nothing fires."""
    plain = CountingServer("127.10.64.1", 0)
    proxy = FakeProxy("127.10.64.2", 0)
    hub = CountingServer("127.10.64.3", 443, tls=tls)
    block_number = b'{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":83}\n'
    try:
        procs = [
            _pieces("c", plain.host, plain.port, [block_number[:9], block_number[9:]], workdir),
            _spawn("curl", "-s", "-m", "5", "--data-binary", block_number.decode(), f"http://{plain.host}:{plain.port}/"),
            _through_proxy("curl-socks5h", proxy, "pypi.org", 443, b""),
            _through_proxy("curl-http-connect", proxy, "huggingface.co", 443, b""),
            _tls("curl", hub.host, "huggingface.co"),
        ]  # fmt: skip
        for proc in procs:
            proc.wait(30)
        monitor.settle(3.0)
    finally:
        plain.close()
        proxy.close()
        hub.close()
    assert len(proxy.requests) == 2
    pids = {p.pid for p in procs}
    assert [r["rule"] for r in monitor.records() if r.get("process", {}).get("pid") in pids] == []


def test_wire_and_dns_alerts_carry_the_process_attribution(monitor, tls):
    """The same process object as exec alerts: the configured env keys
    (the rollout id) included, on a wire alert and on a DNS alert."""
    pool = CountingServer("127.10.69.1", 0)
    resolver = DnsServer("127.10.53.70", {})
    rollout = {"ROME_ROLLOUT": "rollout-4711"}
    try:
        wire = client("send", pool.host, str(pool.port), SUBSCRIBE_SPACED.hex(), "1", env=rollout)
        dns = client("resolve", resolver.host, "xmr.2miners.com", "443", env=rollout)
        wire_alert = _wire_alert(monitor, wire.pid, "miner-stratum-method")
        dns_alert = _wire_alert(monitor, dns.pid, "miner-pool-dns-query")
        _done(wire)
        _done(dns)
    finally:
        pool.close()
        resolver.close()
    for alert in (wire_alert, dns_alert):
        assert alert["process"]["env"] == rollout
        assert alert["process"]["cmdline"][1].endswith("wire_client.py")


# --- enforce mode: dropped in the kernel, killed ----------------------------


def _killed(d, pid: int, rule: str) -> dict:
    d.wait_alert(by_pid(pid, rule), timeout=ALERT_TIMEOUT_S)
    return d.wait_alert(
        lambda r: r["event"] == "response" and r["process"]["pid"] == pid, timeout=ALERT_TIMEOUT_S
    )


def test_enforce_renamed_miner_is_stopped_before_the_pool_sees_its_login(enforce, workdir):
    pool = CountingServer("127.10.3.4", 443)
    try:
        miner = fake_miner(workdir, f"{pool.host}:{pool.port}", name="kworker-helper")
        response = _killed(enforce, miner.pid, "miner-stratum-login")
        assert _done(miner) == -9
        enforce.settle(1.0)
    finally:
        pool.close()
    assert response["action"] == "killed"
    assert response["wire"]["dropped"] == "method"
    assert pool.accepted == 1  # the handshake completed...
    assert pool.bytes_received == 0  # ...and not one payload byte arrived
    assert pool.bytes_received < len(XMRIG_LINE)


def test_enforce_stratum_script_is_stopped(enforce):
    pool = CountingServer("127.10.4.6", 0)
    try:
        proc = client("send", pool.host, str(pool.port), AUTHORIZE_COMPACT.hex())
        response = _killed(enforce, proc.pid, "miner-stratum-method")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        pool.close()
    assert response["wire"]["method"] == "mining.authorize"
    assert pool.bytes_received == 0


def test_enforce_pool_sni_is_stopped(enforce, tls):
    server = CountingServer("127.10.44.5", 443, tls=tls)
    try:
        proc = client("tls", server.host, "443", "donate.ssl.xmrig.com")
        response = _killed(enforce, proc.pid, "miner-pool-sni")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        server.close()
    assert response["wire"]["dropped"] == "sni"
    assert server.bytes_received == 0  # not even the ClientHello


def test_enforce_pool_name_never_resolves(enforce, tls):
    resolver = DnsServer("127.10.53.55", {"supportxmr.com": "127.10.77.8"})
    pool = CountingServer("127.10.77.8", 443, tls=tls)
    try:
        proc = client("resolve", resolver.host, "Pool.SupportXMR.com", "443")
        alert = _wire_alert(enforce, proc.pid, "miner-pool-dns-query")
        assert _done(proc) == 3  # the question was dropped: no answer
    finally:
        resolver.close()
        pool.close()
    assert alert["action"] == "drop" and alert["wire"]["dropped"] == "dns"
    assert resolver.questions == []
    assert pool.accepted == 0


def test_enforce_lets_ordinary_flows_through(enforce, tls):
    plain = CountingServer("127.10.45.7", 0)
    tls_server = CountingServer("127.10.45.8", 443, tls=tls)
    lines = [
        b'{"jsonrpc":"2.0","method":"eth_blockNumber","params":[],"id":83}\n',
        b'{"id":1,"jsonrpc":"2.0","method":"login","params":{"username":"admin"}}\n',
    ]
    try:
        procs = [client("send", plain.host, str(plain.port), line.hex(), "1") for line in lines]
        procs.append(client("tls", tls_server.host, "443", "huggingface.co"))
        codes = [_done(p) for p in procs]
    finally:
        plain.close()
        tls_server.close()
    assert codes == [0, 0, 0]
    assert sorted(plain.received) == sorted(lines)
    assert tls_server.bytes_received > 0
    pids = {p.pid for p in procs}
    assert [r["rule"] for r in enforce.records() if r["process"]["pid"] in pids] == []


@pytest.mark.parametrize("spelling", ["python", "c", "socat"])
def test_enforce_login_in_pieces_never_arrives_whole(enforce, workdir, spelling):
    pool = CountingServer("127.10.65.1", 0)
    try:
        proc = _pieces(spelling, pool.host, pool.port, LOGIN_PIECES, workdir)
        response = _killed(enforce, proc.pid, "miner-stratum-login")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        pool.close()
    assert response["action"] == "killed" and response["wire"]["dropped"] == "method"
    # the piece that makes it a miner's login (its "agent") never left
    assert pool.received == [LOGIN_PIECES[0] + LOGIN_PIECES[1]]
    assert b'"agent"' in LOGIN_PIECES[2] and len(pool.received[0]) < len(XMRIG_LINE)


@pytest.mark.parametrize(
    "spelling", ["python-socks5", "curl-socks5h", "curl-socks4a", "curl-http-connect"]
)
def test_enforce_pool_named_to_a_proxy_is_stopped_at_the_request(enforce, spelling):
    proxy = FakeProxy("127.10.66.1", 0)
    try:
        proc = _through_proxy(spelling, proxy, POOL_NAME, 3333, XMRIG_LINE)
        response = _killed(enforce, proc.pid, "miner-pool-named-address")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        proxy.close()
    assert response["wire"]["dropped"] == "proxy"
    assert proxy.requests == [] and proxy.bytes_received == 0  # the request never arrived


def test_enforce_tunnel_service_sni_is_stopped(enforce, tls):
    server = CountingServer("127.10.67.1", 443, tls=tls)
    try:
        proc = _tls("openssl", server.host, "connect.ngrok-agent.com")
        response = _killed(enforce, proc.pid, "tunnel-service-sni")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        server.close()
    assert response["wire"]["dropped"] == "sni" and server.bytes_received == 0


def test_enforce_chisel_upgrade_is_dropped_and_killed(enforce):
    server = CountingServer("127.10.68.1", 0)
    upgrade = (
        b"GET / HTTP/1.1\r\nHost: 127.10.68.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chisel-v3\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        proc = client(
            "pieces", server.host, str(server.port), "1.0", upgrade.hex(), (b"x" * 64).hex()
        )
        response = _killed(enforce, proc.pid, "tunnel-chisel-websocket")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        server.close()
    assert response["action"] == "killed"
    assert server.received == [upgrade]  # what followed the verdict never left


def test_enforce_dns_question_dropped_is_journaled_as_a_drop(enforce):
    resolver = DnsServer("127.10.53.69", {"pinggy.io": "127.10.77.9"})
    try:
        proc = client("resolve", resolver.host, "a.pinggy.io", "443")
        alert = _wire_alert(enforce, proc.pid, "tunnel-service-dns-query")
        assert _done(proc) == 3
    finally:
        resolver.close()
    assert alert["action"] == "drop" and alert["wire"]["dropped"] == "dns"
    assert resolver.questions == []


@pytest.mark.parametrize("spelling", ["python-key-order", "curl-monerod-http"])
def test_enforce_mining_jsonrpc_in_any_order_and_framing_never_arrives(enforce, spelling):
    node = CountingServer("127.10.70.1", 0)
    try:
        proc = _jsonrpc(spelling, node.host, node.port)
        response = _killed(enforce, proc.pid, "miner-stratum-method")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        node.close()
    assert response["wire"]["dropped"] == "method"
    received = b"".join(node.received)
    assert b"eth_submitLogin" not in received and b"get_block_template" not in received


def test_enforce_drops_after_the_daemon_sat_idle(enforce):
    """The loop sleeps in one epoll while nothing happens; it still wakes to
    keep the kernel's drop deadline fresh, so the first flow after a quiet
    spell (longer than the deadline's 3 s and the 5 s status timer) is
    dropped, not let through."""
    pool = CountingServer("127.10.71.1", 0)
    try:
        enforce.settle(7.0)  # this suite sends nothing meanwhile
        proc = client("send", pool.host, str(pool.port), AUTHORIZE_COMPACT.hex())
        response = _killed(enforce, proc.pid, "miner-stratum-method")
        assert _done(proc) == -9
        enforce.settle(1.0)
    finally:
        pool.close()
    assert response["wire"]["dropped"] == "method" and pool.bytes_received == 0
