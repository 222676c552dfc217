"""The /metrics endpoint (rome_guard.respond.exposition) over real sockets:
listen address forms, plain HTTP, dual stack, a connection flood, TLS,
mutual TLS, basic auth with bcrypt hashes, web config mistakes as
file:line, and a real Prometheus scraping through all of it."""

from __future__ import annotations

import base64
import http.client
import select
import socket
import ssl
import threading
import time
import warnings
from pathlib import Path

import pytest

from rome_guard.respond.exposition import (
    RETRY_S,
    MetricsEndpoint,
    parse_listen_addr,
    serve_metrics,
)
from rome_guard.respond.metrics import GuardMetrics
from rome_guard.respond.webconfig import BasicAuth, load_web_config, password_checker
from rome_guard.yamlsrc import SourceError
from tests.conftest import require
from tests.fixtures.prometheus import available, running_prometheus
from tests.fixtures.receivers import make_pki

# --- listen addresses ---------------------------------------------------------


@pytest.mark.parametrize(
    "addr, expected",
    [
        ("", None),
        (":9985", ("", 9985)),
        ("127.0.0.1:9985", ("127.0.0.1", 9985)),
        ("[::1]:9985", ("::1", 9985)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addresses(addr, expected):
    assert parse_listen_addr(addr) == expected


@pytest.mark.parametrize("addr", ["9985", "::1:9985", "127.0.0.1:http", "[::1]", ":70000"])
def test_bad_listen_addresses_name_the_expected_form(addr):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_listen_addr(addr)


# --- the endpoint over real sockets ---------------------------------------------


def get(port: int, path: str = "/metrics", *, context=None, auth=None, method="GET"):
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth).decode()
    try:
        conn.request(method, path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("WWW-Authenticate")
    finally:
        conn.close()


def test_empty_address_disables_the_endpoint():
    assert serve_metrics(GuardMetrics(), "") is None


def test_plain_http_serves_metrics_and_nothing_else():
    metrics = GuardMetrics()
    with serve_metrics(metrics, "127.0.0.1:0") as server:
        metrics.alert("miner-pool-url", "miner", "critical", "kill")
        status, body, _ = get(server.port)
        assert status == 200
        assert b'rome_guard_alerts_total{action="kill"' in body
        assert get(server.port, "/etc/passwd")[0] == 404
        assert get(server.port, method="HEAD")[:2] == (200, b"")


def test_every_address_form_listens_dual_stack():
    metrics = GuardMetrics()
    with serve_metrics(metrics, ":0") as server:
        assert get(server.port)[0] == 200  # IPv4 loopback reaches the wildcard socket


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_a_connection_flood_is_refused_not_turned_into_threads():
    metrics = GuardMetrics()
    with serve_metrics(metrics, "127.0.0.1:0") as server:
        slots = server._server.MAX_CONCURRENT
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(150)]
        try:
            open_ = set(idle)
            deadline = time.monotonic() + 60
            # the server closes what it has no slot for; wait until it has
            while len(open_) > slots and time.monotonic() < deadline:
                readable, _, _ = select.select(list(open_), [], [], 1)
                for sock in readable:
                    try:
                        data = sock.recv(1)
                    except OSError:
                        data = b""
                    if data == b"":
                        open_.discard(sock)
            assert len(open_) == slots
            assert _handler_threads() <= slots
        finally:
            for sock in idle:
                sock.close()
        # idle connections gone, their slots come back
        deadline = time.monotonic() + 60
        while _handler_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert get(server.port)[0] == 200


# --- TLS, mutual TLS, basic auth ------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    return Path(make_pki(str(tmp_path_factory.mktemp("pki"))))


def bcrypt_hash(password: str) -> str:
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))


def client_context(pki, with_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if with_cert:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    return context


def test_tls_with_basic_auth(pki, tmp_path):
    config = tmp_path / "web.yml"
    # relative paths resolve against the web config's own directory
    for name in ("server.crt", "server.key"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    config.write_text(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        f"basic_auth_users:\n  prometheus: '{bcrypt_hash('s3cret')}'\n"
    )
    metrics = GuardMetrics()
    with serve_metrics(metrics, "127.0.0.1:0", str(config)) as server:
        assert server.scheme == "https"
        ctx = client_context(pki)
        assert get(server.port, context=ctx, auth=b"prometheus:s3cret")[0] == 200
        assert get(server.port, context=ctx, auth=b"prometheus:s3cret")[0] == 200  # cached
        status, body, challenge = get(server.port, context=ctx, auth=b"prometheus:wrong")
        assert (status, challenge) == (401, 'Basic realm="rome-guard"')
        assert b"rome_guard" not in body
        assert get(server.port, context=ctx, auth=b"nobody:s3cret")[0] == 401
        assert get(server.port, context=ctx)[0] == 401
        assert get(server.port, context=ctx, auth=b"prometheus")[0] == 401
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            get(server.port)  # plain HTTP to the TLS port gets no metrics

        # SIGHUP path: a new password applies to the next connection
        config.write_text(config.read_text().replace("prometheus:", "scraper:"))
        server.reload(str(config))
        assert get(server.port, context=ctx, auth=b"prometheus:s3cret")[0] == 401
        assert get(server.port, context=ctx, auth=b"scraper:s3cret")[0] == 200


def test_mutual_tls_requires_a_client_certificate(pki, tmp_path):
    config = tmp_path / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        f"  client_ca_file: {pki}/ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n"
        "  min_version: TLS13\n"
    )
    with serve_metrics(GuardMetrics(), "127.0.0.1:0", str(config)) as server:
        assert get(server.port, context=client_context(pki, with_cert=True))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(server.port, context=client_context(pki))


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("tls_server_config:\n  cert_file: a\n  keyfile: b\n", 3, "unsupported key"),
        ("tls_server_config:\n  cert_file: a\n", 1, "key_file is required"),
        ("basic_auth_users:\n  u: hunter2\n", 2, "not a bcrypt hash"),
        ("tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n", 4, "TLS12"),
        ("http_server_config:\n  headers: {}\n", 2, "unsupported key"),
        ("tls_server_config:\n  cert_file: /nonexistent.crt\n  key_file: /x.key\n", 1, "cert"),
    ],
)
def test_web_config_mistakes_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "web.yml"
    path.write_text(text)
    with pytest.raises(SourceError) as err:
        load_web_config(str(path))
    assert f"{path}:{line}:" in str(err.value)
    assert message in str(err.value)
    assert "hunter2" not in str(err.value)


def test_bcrypt_is_verifiable_on_this_host():
    check = password_checker()
    hashed = bcrypt_hash("pw").encode()
    assert check(b"pw", hashed)
    assert not check(b"pW", hashed)
    assert not check(b"p\x00w", hashed)
    auth = BasicAuth({"u": hashed.decode()})
    assert auth.verify("u", b"pw") and not auth.verify("v", b"pw")


def test_a_real_prometheus_scrapes_through_mutual_tls_and_basic_auth(pki, tmp_path):
    require(available(), "prometheus (Debian package) not installed")
    config = tmp_path / "web.yml"
    config.write_text(
        f"tls_server_config:\n  cert_file: {pki}/server.crt\n  key_file: {pki}/server.key\n"
        f"  client_ca_file: {pki}/ca.crt\n  client_auth_type: RequireAndVerifyClientCert\n"
        f"basic_auth_users:\n  prometheus: '{bcrypt_hash('s3cret')}'\n"
    )
    scrape = {
        "scheme": "https",
        "tls_config": {
            "ca_file": f"{pki}/ca.crt",
            "cert_file": f"{pki}/client.crt",
            "key_file": f"{pki}/client.key",
        },
        "basic_auth": {"username": "prometheus", "password": "s3cret"},
    }
    metrics = GuardMetrics()
    metrics.set_sensor("ebpf")
    with serve_metrics(metrics, "127.0.0.1:0", str(config)) as server:
        target = f"127.0.0.1:{server.port}"
        with running_prometheus([target], scrape=scrape) as prom:
            prom.wait_for("a scrape", lambda: prom.query('rome_guard_sensor_info{mode="ebpf"}'))
            assert prom.value('up{job="rome-guard"}') == 1
        wrong = {**scrape, "basic_auth": {"username": "prometheus", "password": "guess"}}
        with running_prometheus([target], scrape=wrong) as prom:
            (down,) = prom.wait_for(
                "a failed scrape", lambda: [t for t in prom.targets() if t["health"] == "down"]
            )
            assert "401" in down["lastError"]
            assert prom.query("rome_guard_sensor_info") == []


def test_an_address_in_use_is_tried_again_when_due_and_then_served():
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    now = [100.0]
    endpoint = MetricsEndpoint(GuardMetrics(), f"127.0.0.1:{port}", clock=lambda: now[0])
    try:
        assert isinstance(endpoint.start(), OSError)
        assert endpoint.unavailable == f"127.0.0.1:{port}" and endpoint.server is None
        taken.close()
        endpoint.retry()  # not due yet: nothing tried
        assert endpoint.server is None
        now[0] += RETRY_S
        endpoint.retry()
        assert endpoint.unavailable is None and endpoint.server is not None
        assert get(port)[0] == 200
    finally:
        taken.close()
        endpoint.close()
    assert endpoint.server is None
