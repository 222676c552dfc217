"""What recording and serving metrics costs the daemon, side by side.

Recording (per call, in the event loop):
  raw        prometheus_client: Counter.labels(source=...).inc()
  guarded    GuardMetrics.event() / .alert(): the same plus the label checks
Serving (per scrape, on the server's threads; the shipped rule set loaded,
8 GPUs):
  render     GuardMetrics.exposition() in-process
  http       a scrape over plain HTTP on loopback
  https      over TLS with basic auth (bcrypt cost 12, checked once, then cached)
  bcrypt     one uncached bcrypt check (what each wrong password costs)

usage: python -m bench.metrics_overhead [--calls N] [--scrapes N]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import ssl
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry, Counter  # noqa: E402

from rome_guard.detect.rules import load_rules  # noqa: E402
from rome_guard.respond.exposition import serve_metrics  # noqa: E402
from rome_guard.respond.metrics import GpuUsage, GuardMetrics  # noqa: E402
from rome_guard.respond.webconfig import password_checker  # noqa: E402


def per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def bcrypt_hash(password: str, rounds: int) -> str:
    try:
        import bcrypt

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        return crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << rounds))


def scrape(port: int, context=None, auth: bytes | None = None) -> None:
    conn = (
        http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        if context
        else http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    )
    headers = {"Authorization": "Basic " + base64.b64encode(auth).decode()} if auth else {}
    conn.request("GET", "/metrics", headers=headers)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--scrapes", type=int, default=300)
    args = parser.parse_args()
    rules = [(r.id, r.category, r.severity) for r in load_rules([]).rules]

    raw = Counter("bench_events", "", ("source",), registry=CollectorRegistry())
    metrics = GuardMetrics()
    metrics.set_rules(rules)
    metrics.set_sensor("ebpf")
    metrics.set_gpu_usage(
        [GpuUsage(i, f"GPU-{i:08x}-0000-0000-0000-000000000000") for i in range(8)]
    )
    rule = rules[1]
    raw_event = lambda: raw.labels(source="exec").inc()  # noqa: E731
    raw_alert = lambda: raw.labels(source=rule[0]).inc()  # noqa: E731
    rows = [
        ("event: raw Counter.labels().inc()", per_call(raw_event, args.calls)),
        ("event: GuardMetrics.event()", per_call(lambda: metrics.event("exec"), args.calls)),
        ("alert: raw Counter.labels().inc()", per_call(raw_alert, args.calls)),
        ("alert: GuardMetrics.alert()", per_call(lambda: metrics.alert(*rule, "kill"), args.calls)),
    ]
    print(f"{'recording':42} {'per call':>12}")
    for name, seconds in rows:
        print(f"{name:42} {seconds * 1e9:10.0f} ns")
    print(f"{'ratio event guarded/raw':42} {rows[1][1] / rows[0][1]:10.2f} x")
    print(f"{'ratio alert guarded/raw':42} {rows[3][1] / rows[2][1]:10.2f} x")

    body, _ = metrics.exposition()
    render = per_call(metrics.exposition, args.scrapes)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", "k.pem", "-out", "c.pem"],
            cwd=tmp, check=True, capture_output=True,
        )  # fmt: skip
        hashed = bcrypt_hash("s3cret", 12)
        web = os.path.join(tmp, "web.yml")
        with open(web, "w") as f:
            f.write(
                "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n"
                f"basic_auth_users:\n  prometheus: '{hashed}'\n"
            )
        check = password_checker()
        start = time.perf_counter()
        assert check(b"s3cret", hashed.encode())
        bcrypt_once = time.perf_counter() - start
        with (
            serve_metrics(metrics, "127.0.0.1:0") as plain,
            serve_metrics(metrics, "127.0.0.1:0", web) as tls,
        ):
            context = ssl.create_default_context(cafile=os.path.join(tmp, "c.pem"))
            scrape(tls.port, context, b"prometheus:s3cret")  # the one bcrypt check
            http_s = per_call(lambda: scrape(plain.port), args.scrapes)
            https_s = per_call(
                lambda: scrape(tls.port, context, b"prometheus:s3cret"), args.scrapes
            )
    print(f"\n{'serving (' + str(len(body)) + ' bytes per scrape)':42} {'per scrape':>12}")
    for name, seconds in (("render in-process", render), ("http scrape", http_s),
                          ("https + basic auth scrape", https_s),
                          ("one uncached bcrypt check (cost 12)", bcrypt_once)):  # fmt: skip
        print(f"{name:42} {seconds * 1e3:10.2f} ms")
    print(f"{'ratio https+auth/http':42} {https_s / http_s:10.2f} x")


if __name__ == "__main__":
    main()
