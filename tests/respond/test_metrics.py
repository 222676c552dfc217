"""GuardMetrics: names, base units, bounded labels under hostile input from
real processes (the endpoint serving them: test_exposition.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rome_guard import procfs
from rome_guard.detect.rules import load_rules
from rome_guard.events import GpuProcess
from rome_guard.respond import metrics as m
from rome_guard.respond.metrics import GpuUsage, GuardMetrics, gpu_usage

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


def test_running_totals_kept_elsewhere_become_increments_once():
    metrics = GuardMetrics()
    name = "rome_guard_stdio_relay_judgements_deferred_total"
    for total in (0, 4, 4, 9):
        metrics.set_stdio_deferred(total)
    assert value(metrics, name) == 9
    metrics.set_stdio_deferred(2)  # the count restarted (a new graph): all of it is new
    assert value(metrics, name) == 11
