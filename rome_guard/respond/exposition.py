"""The /metrics endpoint: an HTTP or HTTPS server on its own threads that
serves GuardMetrics' scrape body, with basic auth and TLS from a Prometheus
web config (rome_guard.respond.webconfig), a bounded number of connections,
and a listen address parsed in one place.

What is counted lives in rome_guard.respond.metrics; this module only
serves it. It never records a metric, never logs what a client sent except
as one sanitised debug line, and never blocks the daemon: a busy port is
reported and tried again (``MetricsEndpoint``) while detection goes on.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Callable

from rome_guard import __version__
from rome_guard.config import DEFAULT_METRICS_PORT
from rome_guard.respond.webconfig import BasicAuth, WebConfig, load_web_config
from rome_guard.textsafe import one_line

if TYPE_CHECKING:
    from rome_guard.respond.metrics import GuardMetrics

log = logging.getLogger(__name__)

RETRY_S = 10.0  # an address in use is tried again this often


def serve_metrics(
    metrics: GuardMetrics, addr: str, web_config_file: str = ""
) -> MetricsServer | None:
    """Serve metrics on addr ("HOST:PORT", ":PORT", "[v6]:PORT"); None when
    addr is "" (disabled). TLS and basic auth come from web_config_file
    (Prometheus exporter --web.config.file format). Raises OSError when the
    address cannot be bound, ValueError for a malformed address."""
    listen = parse_listen_addr(addr)
    if listen is None:
        return None
    config = load_web_config(web_config_file) if web_config_file else WebConfig()
    return MetricsServer(metrics, listen[0], listen[1], config)


class MetricsEndpoint:
    """The daemon's endpoint over its life: served at start or, when the
    address is taken, tried again at most every RETRY_S (``retry()``, from
    the daemon's housekeeping: detection and the journal never wait for
    it); its web config re-read on SIGHUP; closed at stop."""

    def __init__(
        self,
        metrics: GuardMetrics,
        addr: str,
        web_config_file: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.metrics = metrics
        self.addr = addr
        self.web_config_file = web_config_file
        self.server: MetricsServer | None = None
        self.busy: OSError | None = None  # why addr is not served yet
        self._clock = clock
        self._next_try = 0.0

    def start(self) -> OSError | None:
        """Serve addr now ("" serves nothing); the error when it is taken,
        and then retry() tries again. A malformed address raises ValueError."""
        try:
            self.server = serve_metrics(self.metrics, self.addr, self.web_config_file)
        except OSError as exc:
            self.busy = exc
            self._next_try = self._clock() + RETRY_S
            return exc
        return None

    def retry(self) -> None:
        """When the address was taken and a retry is due, try it again."""
        if self.busy is None or self._clock() < self._next_try:
            return
        try:
            self.server = serve_metrics(self.metrics, self.addr, self.web_config_file)
        except OSError as exc:
            self.busy = exc
            self._next_try = self._clock() + RETRY_S
            log.debug("metrics on %s still unavailable: %s", self.addr, exc)
            return
        self.busy = None
        log.warning("metrics served on %s now (it was unavailable at start)", self.addr)

    @property
    def unavailable(self) -> str | None:
        """The address not served yet because it was taken, else None."""
        return self.addr if self.busy is not None else None

    def reload(self, web_config_file: str) -> None:
        """A new web config for the next connection (and the next retry);
        on error the old settings stay and the error is raised."""
        if self.server is not None:
            self.server.reload(web_config_file)
        self.web_config_file = web_config_file

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None


def parse_listen_addr(addr: str) -> tuple[str, int] | None:
    """(host, port) from "HOST:PORT"; host "" means every address; None for
    "" (metrics disabled). Raises ValueError naming the expected form."""
    addr = addr.strip()
    if not addr:
        return None
    if addr.startswith("["):
        host, sep, port = addr[1:].partition("]:")
    else:
        host, sep, port = addr.rpartition(":")
        if ":" in host:
            sep = ""  # a bare IPv6 address needs brackets
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"metrics address {addr!r} is not HOST:PORT (e.g. :{DEFAULT_METRICS_PORT}, "
            f"127.0.0.1:{DEFAULT_METRICS_PORT}, [::1]:{DEFAULT_METRICS_PORT}; '' disables)"
        )
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    server_version = f"rome-guard/{__version__}"
    sys_version = ""
    timeout = 10  # seconds to send a request: slow clients cannot hold a thread
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._respond(with_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._respond(with_body=False)

    def _respond(self, with_body: bool) -> None:
        owner = self.server.owner
        if not owner.authorized(self.headers.get("Authorization", "")):
            self._send(401, b"Unauthorized\n", "text/plain; charset=utf-8", with_body, auth=True)
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = owner.metrics.exposition(self.headers.get("Accept", ""))
            self._send(200, body, content_type, with_body)
        elif path == "/":
            page = b"<html><body><h1>rome-guard</h1><a href='/metrics'>metrics</a></body></html>"
            self._send(200, page, "text/html; charset=utf-8", with_body)
        else:
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8", with_body)

    def _send(self, code: int, body: bytes, ctype: str, with_body: bool, auth: bool = False):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if auth:
            self.send_header("WWW-Authenticate", 'Basic realm="rome-guard"')
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        # the request line is the client's text: sanitised, and debug only
        log.debug("metrics %s: %s", self.client_address[0], one_line(format % args))


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    MAX_CONCURRENT = 32

    def __init__(self, owner: MetricsServer, address: tuple[str, int], family: int):
        self.address_family = family
        self.owner = owner
        self._slots = threading.BoundedSemaphore(self.MAX_CONCURRENT)
        self._closing_read, self._closing_write = os.pipe2(os.O_CLOEXEC)
        self._closed = False
        super().__init__(address, _Handler, bind_and_activate=False)
        if family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise

    def serve_until_stopped(self) -> None:
        """Accept connections until stop_serving(): one blocking select over
        the listening socket and a pipe, so an idle server never wakes
        (serve_forever's poll interval, 50 ms for the 2 s SIGTERM budget,
        woke it 20 times a second) and a stop is seen at once."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._closing_read, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._closing_read in ready:
                    return
                self._handle_request_noblock()  # what serve_forever does per connection

    def stop_serving(self) -> None:
        if not self._closed:
            os.write(self._closing_write, b"\0")

    def server_close(self) -> None:
        """Idempotent: the pipe's fd numbers are never written or closed
        again once another file may have them."""
        super().server_close()
        if not self._closed:
            self._closed = True
            os.close(self._closing_read)
            os.close(self._closing_write)

    def process_request(self, request, client_address) -> None:
        # a flood of connections is refused, not turned into threads
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:
        context = self.owner.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        # the TLS handshake runs here, on the connection's own thread
        request.settimeout(_Handler.timeout)
        with context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request, client_address) -> None:
        # failed handshakes, resets and timeouts are the client's business
        log.debug("metrics connection from %s failed", client_address[0], exc_info=True)


def _family_for(host: str) -> tuple[int, str]:
    if host == "":
        return (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr[0]


class MetricsServer:
    """The /metrics endpoint on its own threads; close() stops it."""

    def __init__(self, metrics: GuardMetrics, host: str, port: int, config: WebConfig):
        self.metrics = metrics
        self._apply(config)
        family, bind_host = _family_for(host)
        try:
            self._server = _HttpServer(self, (bind_host, port), family)
        except OSError:
            if host != "" or family != socket.AF_INET6:
                raise
            # no IPv6 on this host: every IPv4 address instead
            self._server = _HttpServer(self, ("0.0.0.0", port), socket.AF_INET)
        self._thread = threading.Thread(
            target=self._server.serve_until_stopped,
            name="rome-guard-metrics",
            daemon=True,
        )
        self._thread.start()

    def _apply(self, config: WebConfig) -> None:
        context = config.ssl_context()
        auth = BasicAuth(config.users) if config.users else None
        self.ssl_context: ssl.SSLContext | None = context
        self._auth = auth
        self.config = config

    def reload(self, web_config_file: str = "") -> None:
        """Re-read the web config (SIGHUP): new certificates and users apply
        to the next connection; on error the old settings stay."""
        self._apply(load_web_config(web_config_file) if web_config_file else WebConfig())

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def authorized(self, header: str) -> bool:
        auth = self._auth
        if auth is None:
            return True
        kind, _, encoded = header.partition(" ")
        if kind.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        return auth.verify(user.decode("utf-8", "surrogateescape"), password)

    def close(self) -> None:
        self._server.stop_serving()
        self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
