"""The Grafana dashboard and the Prometheus alerting rules: promtool's checks
and unit tests, every queried metric exported by the daemon, and a real
Prometheus that scrapes GuardMetrics, fires an alert and accepts every
dashboard query."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rome_guard.detect.rules import SEVERITIES, load_rules
from rome_guard.respond.exposition import serve_metrics
from rome_guard.respond.metrics import HEALTH_SENSORS, KNOWN_CATEGORIES, GpuUsage, GuardMetrics
from rome_guard.respond.outputs.queue import OutputState
from tests.conftest import require
from tests.fixtures.prometheus import available, running_prometheus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DASHBOARDS = os.path.join(REPO, "dashboards")
ALERTS = os.path.join(DASHBOARDS, "alerts.yml")
ALERTS_TEST = os.path.join(DASHBOARDS, "alerts_test.yml")
DASHBOARD = os.path.join(DASHBOARDS, "rome-guard.json")
FLEET_DOC = os.path.join(REPO, "docs", "fleet.md")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# Selectors of the metrics we own and of the process collector we export.
SELECTOR = re.compile(r"\b((?:rome_guard|process)_[A-Za-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
TARGET_LABELS = {"job", "instance"}  # added by Prometheus at scrape time


def alert_rules() -> list[dict]:
    with open(ALERTS) as f:
        return [rule for group in yaml.safe_load(f)["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, as a scrape of a running daemon shows them."""
    metrics = GuardMetrics()
    metrics.set_rules((r.id, r.category, r.severity) for r in load_rules([]).rules)
    metrics.set_sensor("poll")
    metrics.set_gpu_usage([GpuUsage(0, "GPU-5d0d3a3e-1f1a-4c1b-9d2e-0123456789ab")])
    _health(metrics)
    body, _ = metrics.exposition()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def _health(metrics: GuardMetrics) -> None:
    """The health series a running daemon has: mode, build hashes, sensors,
    an output, NVML errors."""
    metrics.set_mode("enforce")
    metrics.set_build("0123456789ab", "default")
    for sensor in HEALTH_SENSORS:
        metrics.set_sensor_up(sensor, sensor != "poll")
    metrics.watch_outputs(lambda: [OutputState("siem", "webhook", "x", True, 1, 0, 0, 0, 10, "")])
    metrics.set_nvml_errors({("0", "nvmlDeviceGetComputeRunningProcesses", "GPU_IS_LOST"): 1})


def promtool(*args: str) -> subprocess.CompletedProcess:
    require(os.access(PROMTOOL, os.X_OK), "promtool (Debian package prometheus) not installed")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=DASHBOARDS)


# --- alert rules --------------------------------------------------------------


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", ALERTS_TEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_shows_it_firing():
    with open(ALERTS_TEST) as f:
        tests = yaml.safe_load(f)["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    names = {rule["alert"] for rule in alert_rules()}
    required = {
        "RomeGuardMinerDetected",
        "RomeGuardReverseTunnel",
        "RomeGuardReverseShell",
        "RomeGuardNetProbe",
        "RomeGuardUnregisteredGPUConsumer",
        "RomeGuardEventsLost",
        "RomeGuardDegradedSensor",
        "RomeGuardDown",
        # operations (issue 19)
        "RomeGuardJournalFailing",
        "RomeGuardKillFailed",
        "RomeGuardSensorDown",
        "RomeGuardOutputFailing",
        "RomeGuardRulesDrift",
    }
    assert required <= names
    assert fired == names


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_alerts_page_or_ticket_and_link_to_a_runbook_section():
    with open(FLEET_DOC) as f:
        anchors = {_slug(line.lstrip("#")) for line in f if line.startswith("#")}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, f"{rule['alert']}: docs/fleet.md has no section #{anchor}"
    paging = {r["alert"] for r in alert_rules() if r["labels"]["severity"] == "page"}
    assert {"RomeGuardMinerDetected", "RomeGuardReverseTunnel", "RomeGuardDown"} <= paging
    assert "RomeGuardDegradedSensor" not in paging


# --- what the dashboard and rules query exists ---------------------------------


def test_every_queried_metric_and_label_is_exported():
    names = exported()
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules()]
    queried = set()
    for expr in exprs:
        for name, selector in SELECTOR.findall(expr):
            queried.add(name)
            assert name in names, f"{name} (in {expr!r}) is not exported"
            for label, op, value in MATCHER.findall(selector or ""):
                assert label in names[name] | TARGET_LABELS, f"{name} has no label {label}"
                if label == "category":
                    values = value.split("|") if op in ("=~", "!~") else [value]
                    for one in values:
                        assert one in KNOWN_CATEGORIES, f"unknown category {one!r}"
                if label == "severity":
                    values = value.split("|") if op in ("=~", "!~") else [value]
                    assert set(values) <= set(SEVERITIES), f"unknown severity {value!r}"
    # the dashboard covers what the issue asks for
    for name in (
        "rome_guard_alerts_total",
        "rome_guard_gpu_processes",
        "rome_guard_gpu_unregistered_memory_bytes",
        "rome_guard_kills_total",
        "rome_guard_blocked_connections_total",
        "rome_guard_events_lost_total",
        "rome_guard_sensor_info",
        # the health row (issue 19)
        "rome_guard_mode",
        "rome_guard_build_info",
        "rome_guard_sensor_up",
        "rome_guard_output_sent_total",
        "rome_guard_output_failed_total",
        "rome_guard_output_dropped_total",
        "rome_guard_output_queue_depth",
        "rome_guard_nvml_errors_total",
        "rome_guard_ssh_config_runs_total",
        "rome_guard_journal_errors_total",
    ):
        assert name in queried


def test_detections_page_by_severity_for_every_category():
    """critical and high page, medium and low open a ticket, in the shipped
    categories and in a site's own; the -L notebook forward (low) never
    pages (promtool's cases in alerts_test.yml show each firing)."""
    assert load_rules([]).get("tunnel-ssh-local-forward-persistent").severity == "low"
    by_name = {rule["alert"]: rule for rule in alert_rules()}
    for name in ("RomeGuardMinerDetected", "RomeGuardReverseTunnel", "RomeGuardReverseShell"):
        assert 'severity=~"critical|high"' in by_name[name]["expr"], name
    assert by_name["RomeGuardSiteDetection"]["labels"]["severity"] == "page"
    assert 'category!~"' in by_name["RomeGuardSiteDetection"]["expr"]
    assert by_name["RomeGuardLowSeverityDetection"]["labels"]["severity"] == "ticket"
    assert 'severity!~"critical|high"' in by_name["RomeGuardLowSeverityDetection"]["expr"]


def test_the_shipped_rule_categories_each_have_an_alert():
    shipped = {rule.category for rule in load_rules([]).rules}
    alerted = set()
    for rule in alert_rules():
        for _, selector in SELECTOR.findall(rule["expr"]):
            alerted.update(v for k, _, v in MATCHER.findall(selector) if k == "category")
    alerted.add("gpu_unregistered")  # alerted on the gauge, not on the counter
    assert shipped <= alerted


def test_dashboard_has_variables_and_the_asked_for_panels():
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["host"]["multi"] and variables["host"]["includeAll"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            if "rome_guard_" in target["expr"]:
                assert 'instance=~"$host"' in target["expr"], panel["title"]
    titles = {p["title"] for p in panels}
    for title in (
        "Alerts over time by category",
        "Top rules",
        "Unregistered GPU consumers",
        "Unregistered GPU memory",
        "Kills by result",
        "Connections blocked in the kernel",
        "Lost events",
        "Sensor mode per host",
        "Hosts not reporting",
        # the health row (issue 19)
        "Distinct rule sets",
        "Mode, rules and config per host",
        "Sensors per host",
        "Output deliveries",
        "Output queues",
        "NVML errors",
    ):
        assert title in titles


# --- a real Prometheus ----------------------------------------------------------

GRAFANA_MACROS = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$__interval": "15s",
    "$job": "rome-guard",
    "$host": ".*",
}


def _as_promql(expr: str) -> str:
    for macro in sorted(GRAFANA_MACROS, key=len, reverse=True):
        expr = expr.replace(macro, GRAFANA_MACROS[macro])
    return expr


@pytest.fixture
def guard():
    metrics = GuardMetrics()
    metrics.set_rules((r.id, r.category, r.severity) for r in load_rules([]).rules)
    metrics.set_sensor("ebpf")
    _health(metrics)
    server = serve_metrics(metrics, "127.0.0.1:0")
    try:
        yield metrics, server
    finally:
        server.close()


def test_a_real_prometheus_fires_the_miner_alert_and_runs_every_query(guard):
    require(available(), "prometheus (Debian package) not installed")
    metrics, server = guard
    target = f"127.0.0.1:{server.port}"
    with running_prometheus([target], rule_files=[ALERTS]) as prom:
        prom.wait_for("a scrape with the zeroed rule series", lambda: prom.query(
            'rome_guard_alerts_total{rule="miner-pool-url", action="kill"} == 0'
        ))  # fmt: skip
        assert prom.value('up{job="rome-guard"}') == 1
        assert not prom.firing("RomeGuardMinerDetected")

        metrics.alert("miner-pool-url", "miner", "critical", "kill")
        (alert,) = prom.wait_for(
            "RomeGuardMinerDetected to fire",
            lambda: prom.firing("RomeGuardMinerDetected", rule="miner-pool-url"),
        )
        assert alert["labels"]["severity"] == "page"
        assert alert["labels"]["instance"] == target
        assert not prom.firing("RomeGuardReverseTunnel")
        assert not prom.firing("RomeGuardDegradedSensor")

        for expr in dashboard_exprs():
            prom.query(_as_promql(expr))  # raises with Prometheus' parse error
        top = prom.query(
            _as_promql(next(e for e in dashboard_exprs() if "topk(10, sum by (rule" in e))
        )
        assert [r["metric"]["rule"] for r in top] == ["miner-pool-url"]


def test_a_real_prometheus_tickets_the_notebook_forward_and_pages_a_site_rule(guard):
    """The severity routing end to end through Prometheus' rule engine: the
    shipped -L forward (low) opens a ticket and pages nobody; a site's own
    category at high severity pages."""
    require(available(), "prometheus (Debian package) not installed")
    metrics, server = guard
    metrics.set_rules(
        [(r.id, r.category, r.severity) for r in load_rules([]).rules]
        + [("site-dataset-exfil", "exfiltration", "high")]
    )
    with running_prometheus([f"127.0.0.1:{server.port}"], rule_files=[ALERTS]) as prom:
        prom.wait_for("a scrape with the zeroed site rule", lambda: prom.query(
            'rome_guard_alerts_total{rule="site-dataset-exfil", action="alert"} == 0'
        ))  # fmt: skip
        metrics.alert("tunnel-ssh-local-forward-persistent", "reverse_tunnel", "low", "alert")
        metrics.alert("site-dataset-exfil", "exfiltration", "high", "alert")
        (ticket,) = prom.wait_for(
            "the low forward's ticket",
            lambda: prom.firing("RomeGuardLowSeverityDetection", detection_severity="low"),
        )
        assert ticket["labels"]["severity"] == "ticket"
        (page,) = prom.wait_for(
            "the site rule's page",
            lambda: prom.firing("RomeGuardSiteDetection", rule="site-dataset-exfil"),
        )
        assert page["labels"]["severity"] == "page" and page["labels"]["category"] == "exfiltration"
        assert not prom.firing("RomeGuardReverseTunnel")
