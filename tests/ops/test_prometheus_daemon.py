"""A real Prometheus scraping a real daemon: a detection raises the counter
and fires the matching alerting rule; a flood of distinctly named hostile
processes leaves the number of series flat."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require, require_root
from tests.fixtures import prometheus
from tests.fixtures.daemon import daemon

ALERT_RULES = str(Path(__file__).resolve().parents[2] / "dashboards" / "alerts.yml")


def series(port: int) -> set[tuple[str, tuple]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def settled_series(port: int, timeout: float = 30.0) -> set[tuple[str, tuple]]:
    """The series once two scrapes 2 s apart agree: the NVML thread reports
    its start-up errors on its own schedule, and those series are the
    daemon's, not the flood's."""
    deadline = time.monotonic() + timeout
    previous = series(port)
    while time.monotonic() < deadline:
        time.sleep(2.0)
        current = {(n, labels) for n, labels in series(port) if not n.startswith(_VOLATILE)}
        if current == {(n, labels) for n, labels in previous if not n.startswith(_VOLATILE)}:
            return previous
        previous = series(port)
    return previous


_VOLATILE = ("process_", "python_")


def test_detection_reaches_prometheus_and_fires_the_alert(tmp_path: Path) -> None:
    require_root()
    require(prometheus.available(), "Debian's prometheus is not installed")
    with (
        daemon() as guard,
        prometheus.running_prometheus(
            [f"127.0.0.1:{guard.metrics_port}"], rule_files=[ALERT_RULES]
        ) as prom,
    ):
        expr = 'sum(rome_guard_alerts_total{rule="miner-known-binary"})'
        prom.wait_for("the first scrape", lambda: prom.value(expr) is not None)
        assert prom.value(expr) == 0
        miner = tmp_path / "xmrig"
        shutil.copy("/bin/true", miner)
        proc = subprocess.run([str(miner)], check=False)
        assert proc.returncode == 0
        guard.wait_alert(
            lambda r: r["rule"] == "miner-known-binary" and r["process"]["cmdline"] == [str(miner)]
        )
        prom.wait_for("the counter to rise", lambda: (prom.value(expr) or 0) >= 1)
        firing = prom.wait_for(
            "RomeGuardMinerDetected to fire",
            lambda: prom.firing("RomeGuardMinerDetected", rule="miner-known-binary"),
        )
        assert firing[0]["labels"]["severity"] == "page"
        assert prom.value('rome_guard_sensor_info{mode="ebpf"}') == 1
        assert not prom.firing("RomeGuardDegradedSensor")


FLOOD = r"""
for i in $(seq 1 1500); do
  (exec -a "evil-$i-$RANDOM"$'\n'"forged" /bin/true --donate-level=$i "user-$i") 2>/dev/null
done
"""


def test_thousands_of_distinct_hostile_processes_leave_the_series_flat() -> None:
    require_root()
    with daemon() as guard:
        before = settled_series(guard.metrics_port)
        subprocess.run(["bash", "-c", FLOOD], check=True, timeout=300)
        guard.wait_alert(
            lambda r: (
                r["rule"] == "miner-only-flags" and r["process"]["cmdline"][-1] == "user-1500"
            ),
            timeout=60,
        )
        after = series(guard.metrics_port)
    alerts = guard.alerts_for(lambda r: r["rule"] == "miner-only-flags")
    assert len(alerts) >= 1400  # thousands of distinct processes were seen
    grown = {name for name, _ in after - before if not name.startswith(("process_", "python_"))}
    assert grown == set(), f"new series: {sorted(after - before)[:10]}"
    for _name, labels in after:
        for _key, value in labels:
            assert "evil" not in value and "\n" not in value and "user-" not in value
