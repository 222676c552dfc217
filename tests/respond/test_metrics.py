"""GuardMetrics and its endpoint: names, bounded labels under hostile input,
TLS, mutual TLS and basic auth, against real sockets and real processes."""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rome_guard import procfs
from rome_guard.detect.rules import load_rules
from rome_guard.events import GpuProcess
from rome_guard.respond import metrics as m
from rome_guard.respond.metrics import GpuUsage, GuardMetrics, gpu_usage, parse_listen_addr
from rome_guard.respond.webconfig import BasicAuth, load_web_config, password_checker
from rome_guard.yamlsrc import SourceError
from tests.conftest import require
from tests.fixtures.prometheus import available, running_prometheus
from tests.fixtures.receivers import make_pki

# the shipped rule set, as the daemon loads it
RULES = [(r.id, r.category, r.severity) for r in load_rules([]).rules]
UUIDS = ["GPU-5d0d3a3e-1f1a-4c1b-9d2e-0123456789ab", "GPU-6e1e4b4f-2a2b-5d2c-ae3f-123456789abc"]


def samples(metrics: GuardMetrics) -> list:
    body, _ = metrics.exposition()
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def series(metrics: GuardMetrics) -> set[tuple[str, tuple]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for s in samples(metrics)}


def value(metrics: GuardMetrics, name: str, **labels: str) -> float:
    for s in samples(metrics):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name} {labels}")


# --- names and enumerations ----------------------------------------------------


def test_exports_the_documented_metrics_in_base_units():
    metrics = GuardMetrics()
    metrics.set_rules(RULES)
    metrics.set_sensor("ebpf")
    metrics.set_gpu_usage([GpuUsage(0, UUIDS[0])])
    names = {s.name for s in samples(metrics)}
    for name in (
        "rome_guard_alerts_total",
        "rome_guard_incidents_total",
        "rome_guard_events_total",
        "rome_guard_events_lost_total",
        "rome_guard_sensor_info",
        "rome_guard_rules_loaded",
        "rome_guard_rule_reload_failures_total",
        "rome_guard_processes_tracked",
        "rome_guard_kills_total",
        "rome_guard_blocked_connections_total",
        "rome_guard_gpu_processes",
        "rome_guard_gpu_unregistered_memory_bytes",
        "rome_guard_build_info",
        "rome_guard_ssh_config_unknown_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert name in names
    assert not any(n.endswith("_created") for n in names)
    assert value(metrics, "rome_guard_rules_loaded") == len(RULES)


def test_loaded_rules_start_at_zero_so_the_first_alert_is_an_increase():
    metrics = GuardMetrics()
    metrics.set_rules(RULES)
    assert value(metrics, "rome_guard_alerts_total", rule="miner-pool-url", action="kill") == 0
    metrics.alert("miner-pool-url", "miner", "critical", "kill")
    assert value(metrics, "rome_guard_alerts_total", rule="miner-pool-url", action="kill") == 1
    assert value(metrics, "rome_guard_alerts_total", rule="miner-pool-url", action="alert") == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda g: g.event("bogus"),
        lambda g: g.set_lost("ringbuf\n", 3),
        lambda g: g.kill("killed\x1b[31m"),
        lambda g: g.set_sensor("kprobe"),
        lambda g: g.alert("miner-pool-url", "miner", "critical", "nuke"),
        lambda g: g.set_ssh_config(1, {"/etc/passwd": 1}),
    ],
)
def test_fixed_enumerations_reject_unknown_values(call):
    metrics = GuardMetrics()
    before = series(metrics)
    with pytest.raises(ValueError):
        call(metrics)
    assert series(metrics) == before


def test_rule_ids_outside_the_loaded_set_fold_to_fixed_values():
    metrics = GuardMetrics()
    metrics.set_rules(RULES)
    metrics.alert("not.loaded", "miner", "critical", "alert")
    metrics.alert("evil\nrule", "miner\x00", "crit ical", "alert")
    rules = {s.labels["rule"] for s in samples(metrics) if s.name == "rome_guard_alerts_total"}
    assert rules == {r for r, _, _ in RULES} | {"unknown", "invalid"}
    assert value(metrics, "rome_guard_alerts_total", rule="invalid", category="invalid") == 1


def test_incidents_and_rule_hits_are_counted_apart():
    metrics = GuardMetrics(process_collector=False)
    metrics.set_rules(RULES)
    metrics.incident("miner", "critical", "alert")  # one incident of three rule hits
    for rule_id, category, severity in RULES[:3]:
        metrics.alert(rule_id, category, severity, "alert")
    hits = sum(s.value for s in samples(metrics) if s.name == "rome_guard_alerts_total")
    assert hits == 3
    assert (
        value(
            metrics,
            "rome_guard_incidents_total",
            category="miner",
            severity="critical",
            action="alert",
        )
        == 1
    )
    metrics.incident("evil\ncategory", "critical", "kill")
    assert value(metrics, "rome_guard_incidents_total", category="invalid") == 1


def test_without_a_rule_set_distinct_rule_ids_are_capped():
    metrics = GuardMetrics(process_collector=False)
    for i in range(m.MAX_RULES + 500):
        metrics.alert(f"rule.{i}", "miner", "high", "alert")
    rules = {s.labels["rule"] for s in samples(metrics) if s.name == "rome_guard_alerts_total"}
    assert len(rules) == m.MAX_RULES + 1
    assert value(metrics, "rome_guard_alerts_total", rule="other") == 500


def test_lost_totals_from_a_kernel_counter_become_increments():
    metrics = GuardMetrics()
    metrics.set_lost("process", 5)
    metrics.set_lost("process", 5)
    metrics.set_lost("process", 12)
    assert value(metrics, "rome_guard_events_lost_total", buffer="process") == 12
    metrics.set_lost("process", 2)  # the map was recreated: a fresh count
    assert value(metrics, "rome_guard_events_lost_total", buffer="process") == 14
    metrics.lost("parked", 3)
    assert value(metrics, "rome_guard_events_lost_total", buffer="parked") == 3


def test_ssh_config_reader_totals_become_increments_by_reason():
    metrics = GuardMetrics()
    assert value(metrics, "rome_guard_ssh_config_unknown_total", reason="failed") == 0
    metrics.set_ssh_config(3, {"failed": 2, "descriptor": 1})
    metrics.set_ssh_config(9, {"failed": 5, "timeout": 1, "skipped": 2, "descriptor": 1})
    assert value(metrics, "rome_guard_ssh_config_unknown_total", reason="failed") == 5
    assert value(metrics, "rome_guard_ssh_config_unknown_total", reason="descriptor") == 1
    # the runs counter follows the same totals: failed counts timeouts too
    assert value(metrics, "rome_guard_ssh_config_runs_total", result="run") == 9
    assert value(metrics, "rome_guard_ssh_config_runs_total", result="failed") == 6
    assert value(metrics, "rome_guard_ssh_config_runs_total", result="skipped") == 2


def test_sensor_info_names_only_the_current_mode():
    metrics = GuardMetrics()
    metrics.set_sensor("ebpf")
    metrics.set_sensor("poll")
    modes = {s.labels["mode"] for s in samples(metrics) if s.name == "rome_guard_sensor_info"}
    assert modes == {"poll"}


def test_gpu_usage_sums_per_gpu_and_a_new_poll_replaces_the_last():
    procs = [
        GpuProcess(101, 0, UUIDS[0], None, 1 << 30, None),
        GpuProcess(102, 0, UUIDS[0], "MIG-1", 2 << 30, None),
        GpuProcess(103, 1, UUIDS[1], None, None, None),
    ]
    usage = gpu_usage(procs, lambda p: p.pid == 101, gpus=[(0, UUIDS[0]), (1, UUIDS[1])])
    assert usage == [GpuUsage(0, UUIDS[0], 1, 1, 2 << 30), GpuUsage(1, UUIDS[1], 0, 1, 0)]
    metrics = GuardMetrics()
    metrics.set_gpu_usage(usage)
    assert value(metrics, "rome_guard_gpu_processes", gpu="0", registered="false") == 1
    assert value(metrics, "rome_guard_gpu_unregistered_memory_bytes", gpu="0") == 2 << 30
    metrics.set_gpu_usage([GpuUsage(1, UUIDS[1])])  # GPU 0 fell off the bus
    gpus = {s.labels["gpu"] for s in samples(metrics) if s.name.startswith("rome_guard_gpu")}
    assert gpus == {"1"}
    metrics.set_gpu_usage([GpuUsage(2, "GPU-$(reboot)\n")])
    uuids = {s.labels["UUID"] for s in samples(metrics) if s.name.startswith("rome_guard_gpu")}
    assert uuids == {"invalid"}


def test_gpu_consumers_by_verdict_and_allocations_by_owner_kind():
    procs = [
        GpuProcess(101, 0, UUIDS[0], None, 1 << 30, None),
        GpuProcess(102, 0, UUIDS[0], None, 1 << 30, None),
        GpuProcess(103, 1, UUIDS[1], None, None, None),
    ]
    verdict = {101: "allowed", 102: "unregistered", 103: "gpu_not_allocated"}
    owners = {0: ["pod", "pod"], 1: []}  # two MIG devices of GPU 0, one pod each
    usage = gpu_usage(
        procs,
        lambda p: verdict[p.pid] == "allowed",
        [(0, UUIDS[0]), (1, UUIDS[1])],
        lambda p: verdict[p.pid],
        lambda index, uuid: owners[index],
    )
    metrics = GuardMetrics()
    metrics.set_gpu_usage(usage)
    metrics.set_allocation_sources([("kubelet", True), ("slurm", False), ("yarn\n", True)])
    assert value(metrics, "rome_guard_gpu_consumers", gpu="0", verdict="unregistered") == 1
    assert value(metrics, "rome_guard_gpu_consumers", gpu="0", verdict="gpu_not_granted") == 0
    assert value(metrics, "rome_guard_gpu_consumers", gpu="1", verdict="gpu_not_allocated") == 1
    assert value(metrics, "rome_guard_gpu_allocations", gpu="0", owner_kind="pod") == 2
    assert value(metrics, "rome_guard_gpu_allocations", gpu="1", owner_kind="slurm_job") == 0
    assert value(metrics, "rome_guard_gpu_allocation_source_up", source="slurm") == 0
    sources = {s.labels["source"] for s in samples(metrics) if s.name.endswith("source_up")}
    assert sources == {"kubelet", "slurm"}  # bounded: an unknown scheduler is no label
    metrics.set_gpu_usage([GpuUsage(1, UUIDS[1])])
    assert {s.labels["gpu"] for s in samples(metrics) if s.name == "rome_guard_gpu_consumers"} == {
        "1"
    }


# --- the flood: hostile processes through the public API ---------------------

HOSTILE_NAMES = [
    b"xmrig\nFAKE rome_guard_alerts_total 1",
    b"\x1b[2J\xff\xfe",
    b'bad"label}=1',
    b"A" * 200,
    b"miner-pool-url",
]


def _spawn_named(directory: bytes, count: int, offset: int) -> list[subprocess.Popen]:
    """count real sleep processes, each exec'd through a symlink with a
    distinct hostile name (so comm, argv[0] and exe path all differ)."""
    procs = []
    for i in range(offset, offset + count):
        name = b"%d-" % i + HOSTILE_NAMES[i % len(HOSTILE_NAMES)]
        link = os.path.join(directory, name.replace(b"/", b"_"))
        os.symlink(b"/bin/sleep", link)
        procs.append(subprocess.Popen([link, b"60"]))
    return procs


def _feed(metrics: GuardMetrics, infos: list) -> None:
    rule_ids = [r for r, _, _ in RULES]
    gpu_procs = []
    for n, info in enumerate(infos):
        metrics.event("exec")
        metrics.event("procfs")
        rule, category, severity = RULES[n % len(RULES)]
        metrics.alert(rule_ids[n % len(rule_ids)], category, severity, m.ALERT_ACTIONS[n % 3])
        # a careless caller passing process strings where rule ids go
        metrics.alert(info.comm, info.exe, info.user, "alert")
        metrics.alert(" ".join(info.cmdline), category, severity, "kill")
        metrics.kill(m.KILL_RESULTS[n % len(m.KILL_RESULTS)])
        metrics.blocked_connection()
        gpu_procs.append(GpuProcess(info.pid, n % 2, UUIDS[n % 2], None, 1 << 20, 90))
    metrics.set_gpu_usage(gpu_usage(gpu_procs, lambda p: p.pid % 3 == 0, [(0, UUIDS[0])]))
    metrics.set_processes_tracked(len(infos))


def test_thousands_of_hostile_processes_leave_the_series_count_flat(tmp_path):
    metrics = GuardMetrics()
    metrics.set_rules(RULES)
    metrics.set_sensor("ebpf")
    counts = []
    seen_comms = set()
    batch, batches = 250, 8
    for b in range(batches):
        procs = _spawn_named(bytes(tmp_path), batch, b * batch)
        try:
            infos = []
            for p in procs:
                with contextlib.suppress(procfs.ProcessGone):
                    infos.append(procfs.read_process(p.pid))
            assert len(infos) > batch // 2
            seen_comms.update(i.comm for i in infos)
            _feed(metrics, infos)
        finally:
            for p in procs:
                p.send_signal(signal.SIGKILL)
            for p in procs:
                p.wait()
        counts.append(len(series(metrics)))
    assert len(seen_comms) > 1000  # they really were thousands of distinct processes
    assert counts == [counts[0]] * batches
    for sample in samples(metrics):
        for label in sample.labels.values():
            assert m.safe_label(label) == label
    rules = {s.labels["rule"] for s in samples(metrics) if s.name == "rome_guard_alerts_total"}
    assert rules == {r for r, _, _ in RULES} | {"unknown", "invalid"}


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
    assert GuardMetrics().serve("") is None


def test_plain_http_serves_metrics_and_nothing_else():
    metrics = GuardMetrics()
    with metrics.serve("127.0.0.1:0") as server:
        metrics.alert("miner-pool-url", "miner", "critical", "kill")
        status, body, _ = get(server.port)
        assert status == 200
        assert b'rome_guard_alerts_total{action="kill"' in body
        assert get(server.port, "/etc/passwd")[0] == 404
        assert get(server.port, method="HEAD")[:2] == (200, b"")


def test_every_address_form_listens_dual_stack():
    metrics = GuardMetrics()
    with metrics.serve(":0") as server:
        assert get(server.port)[0] == 200  # IPv4 loopback reaches the wildcard socket


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def test_a_connection_flood_is_refused_not_turned_into_threads():
    metrics = GuardMetrics()
    with metrics.serve("127.0.0.1:0") as server:
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
    with metrics.serve("127.0.0.1:0", str(config)) as server:
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
    with GuardMetrics().serve("127.0.0.1:0", str(config)) as server:
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
    with metrics.serve("127.0.0.1:0", str(config)) as server:
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
