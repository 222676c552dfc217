"""Findings and their one serialised form.

A Finding is what the engine concludes: a rule matched a process, with the
reason, lineage and the network or GPU context that made it match. Every
record the journal holds is built here and nowhere else: the finding
record (`scan --json`), and the daemon's alert (one per incident),
incident update, response, prevention and confirmation records that
extend it (with the wire object of a wire alert), its events_lost
records, and the config_rejected record of a file the daemon left out
(docs/alerts.md). Every
attacker-controlled string passes through textsafe on the way out.

This module never writes, sends or acts: it only builds dicts.
"""

from __future__ import annotations

import datetime as _dt
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rome_guard.detect.rules import Rule
from rome_guard.events import Endpoint, GpuProcess, ProcessInfo
from rome_guard.textsafe import for_json, from_bytes, one_line

if TYPE_CHECKING:
    from rome_guard.detect.payload import WireFacts
    from rome_guard.events import WireEvent
    from rome_guard.siteconfig import Rejection

LINEAGE_IN_RECORD = 16
CMDLINE_ARGS_IN_RECORD = 256
FIRST_BYTES_IN_RECORD = 256  # characters of a flow's captured payload in an alert


@dataclass(frozen=True)
class Finding:
    rule: Rule
    process: ProcessInfo
    reason: str
    lineage: tuple[ProcessInfo, ...] = ()
    network: Endpoint | None = None
    gpu: GpuProcess | None = None
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def summary(self) -> str:
        """One readable, bounded, single-line sentence."""
        name = self.process.comm or "?"
        return one_line(
            f"{self.rule.category}: {self.rule.id} matched {name} (pid {self.process.pid}): "
            f"{self.reason}",
            400,
        )


def rfc3339(timestamp: float) -> str:
    return (
        _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _cmdline(argv: tuple[str, ...]) -> list[str]:
    kept = [for_json(arg) for arg in argv[:CMDLINE_ARGS_IN_RECORD]]
    if len(argv) > CMDLINE_ARGS_IN_RECORD:
        kept.append(f"...[{len(argv) - CMDLINE_ARGS_IN_RECORD} more args]")
    return kept


def process_record(info: ProcessInfo) -> dict[str, Any]:
    att = info.attribution
    return {
        "pid": info.pid,
        "start_time": info.key.start_time,
        "ppid": info.ppid,
        "uid": info.uid,
        "user": for_json(info.user),
        "exe": for_json(info.exe),
        "comm": for_json(info.comm),
        "cmdline": _cmdline(info.cmdline),
        "cwd": for_json(info.cwd),
        "cgroup": for_json(info.cgroup),
        "unit": for_json(att.unit) if att.unit else None,
        "container_id": att.container_id,
        "pod_uid": att.pod_uid,
        "slurm_job": att.slurm_job,
        "env": {for_json(k): for_json(v) for k, v in att.env.items()},
        "env_inherited_from": att.env_inherited_from or None,
        "pre_existing": info.pre_existing,
    }


def lineage_record(lineage: tuple[ProcessInfo, ...]) -> list[dict[str, Any]]:
    return [
        {
            "pid": p.pid,
            "start_time": p.key.start_time,
            "exe": for_json(p.exe),
            "comm": for_json(p.comm),
            "cmdline": _cmdline(p.cmdline),
        }
        for p in lineage[:LINEAGE_IN_RECORD]
    ]


def network_record(ep: Endpoint) -> dict[str, Any]:
    return {
        "proto": ep.proto,
        "saddr": ep.saddr,
        "sport": ep.sport,
        "daddr": ep.daddr,
        "dport": ep.dport,
        "state": ep.state,
    }


def gpu_record(gpu: GpuProcess) -> dict[str, Any]:
    return {
        "index": gpu.gpu_index,
        "uuid": gpu.gpu_uuid,
        "mig": gpu.mig,
        "used_memory_bytes": gpu.used_memory_bytes,
        "sm_util": gpu.sm_util,
    }


def dropped_in_kernel(finding: Finding) -> bool:
    """The kernel already stopped what the finding is about: the wire
    sensor dropped the flow or the DNS question it was found in."""
    return bool(finding.extra.get("wire", {}).get("dropped"))


def wire_record(event: WireEvent, facts: WireFacts, stream: bytes | None = None) -> dict[str, Any]:
    """The "wire" object of an alert: what a flow was seen to say (stream:
    the client stream so far, else the event's bytes), escaped and cut
    (payload bytes belong to the sender)."""
    payload = event.payload if stream is None else stream
    record: dict[str, Any] = {"kind": event.kind, "cookie": event.cookie}
    if facts.method:
        record["method"] = for_json(facts.method, 64)
    if len(facts.methods) > 1:
        record["methods"] = [for_json(m, 64) for m in facts.methods[:8]]
    if facts.proxy:
        record["proxy"] = facts.proxy
        record["proxy_host"] = for_json(facts.proxy_host, 256)
    if facts.sni:
        record["sni"] = for_json(facts.sni, 256)
    if event.alpn:
        record["alpn"] = for_json(event.alpn, 64)
    if facts.dns_queries:
        record["dns_query"] = [for_json(q, 256) for q in facts.dns_queries[:8]]
    if facts.remote_name:
        record["remote_name"] = for_json(facts.remote_name, 256)
    if facts.http_request:
        record["http_request"] = for_json(facts.http_request, 256)
    if facts.dropped:
        record["dropped"] = facts.dropped
    record["payload_bytes"] = max(event.payload_len, len(payload))
    # the bytes as sent: invalid UTF-8 shows as \xNN (facts.text is latin-1)
    record["first_bytes"] = for_json(from_bytes(payload), FIRST_BYTES_IN_RECORD)
    record["cgroup_id"] = event.cgroup_id
    return record


def finding_record(
    finding: Finding, action: str, timestamp: float, host: str | None = None
) -> dict[str, Any]:
    """The alert/finding record (docs/alerts.md)."""
    rule = finding.rule
    record: dict[str, Any] = {
        "time": rfc3339(timestamp),
        "host": host or socket.gethostname(),
        "rule": rule.id,
        "category": rule.category,
        "severity": rule.severity,
        "action": action,
        "summary": finding.summary,
        "reason": for_json(finding.reason, 2000),
        "process": process_record(finding.process),
        "lineage": lineage_record(finding.lineage),
    }
    if finding.network is not None:
        record["network"] = network_record(finding.network)
    if finding.gpu is not None:
        record["gpu"] = gpu_record(finding.gpu)
    if rule.mode == "monitor":  # staged: alerts, never kills or blocks (docs/rules.md)
        record["rule_mode"] = "monitor"
    for key, value in finding.extra.items():
        record.setdefault(key, value)
    return record


# --- the daemon's journal records ----------------------------------------------


def event_record(finding: Finding, event: str, action: str, mode: str, host: str) -> dict[str, Any]:
    """An "alert" (a rule matched) or "prevention" (the kernel already
    blocked or killed) record: the finding record with a fresh id."""
    record = finding_record(finding, action, time.time(), host)
    record.update(id=uuid.uuid4().hex, event=event, mode=mode)
    return record


def rules_record(findings: list[Finding]) -> list[dict[str, str]]:
    """Every rule of an incident with its reason and the process it hit
    (an incident spans the offender's tree)."""
    return [
        {
            "rule": f.rule.id,
            "severity": f.rule.severity,
            "reason": for_json(f.reason, 500),
            "pid": f.process.pid,
            **({"mode": "monitor"} if f.rule.mode == "monitor" else {}),
        }
        for f in findings
    ]


def incident_record(
    lead: Finding,
    new: list[Finding],
    every: list[Finding],
    incident_id: str,
    opened: bool,
    action: str,
    mode: str,
    host: str,
) -> dict[str, Any]:
    """An incident's "alert" record (opened: the lead finding's record,
    with the incident's id) or an "incident_update" (new rules joined it,
    alert_id naming the incident's alert); ``rules`` lists every rule of
    the incident so far with its reason (docs/alerts.md)."""
    record = finding_record(lead, action, time.time(), host)
    if opened:
        record.update(id=incident_id, event="alert", mode=mode)
    else:
        record.update(id=uuid.uuid4().hex, event="incident_update", mode=mode)
        record["alert_id"] = incident_id
    record["rules"] = rules_record(every)
    if "network" not in record:  # the peer another of its rules saw
        peer = next((f.network for f in new if f.network is not None), None)
        if peer is not None:
            record["network"] = network_record(peer)
    return record


def response_record(
    alert: dict[str, Any], scope: str, outcome: str, reason: str, pids: tuple[int, ...]
) -> dict[str, Any]:
    """What the user-space killer did about an alert: the alert repeated,
    with the outcome."""
    record = dict(alert)
    record.update(
        event="response",
        alert_id=alert["id"],
        id=uuid.uuid4().hex,
        action=outcome,
        response={"scope": scope, "reason": reason, "pids": list(pids)},
    )
    return record


def confirmation_record(
    alert_id: str, rule_id: str, info: ProcessInfo, gpu: GpuProcess, host: str
) -> dict[str, Any]:
    """NVML now lists the process an earlier GPU-open alert named: which
    GPU and how much memory, against the same alert."""
    return {
        "event": "confirmed",
        "alert_id": alert_id,
        "rule": rule_id,
        "time": rfc3339(time.time()),
        "host": host,
        "process": {"pid": info.pid, "start_time": info.key.start_time},
        "gpu": gpu_record(gpu),
    }


def _daemon_record(event: str, mode: str, host: str, **fields: Any) -> dict[str, Any]:
    """A record about the daemon itself (no finding): the journal's envelope
    (event, id, time, host, mode) and fields."""
    return {
        "event": event,
        "id": uuid.uuid4().hex,
        "time": rfc3339(time.time()),
        "host": host,
        "mode": mode,
        **fields,
    }


def lost_record(
    lost: dict[str, int], totals: dict[str, int], mode: str, host: str
) -> dict[str, Any]:
    """Events the daemon never saw since the last report, per ring or queue
    (and the running totals): the gap is evidence too."""
    return _daemon_record("events_lost", mode, host, lost=dict(lost), totals=dict(totals))


def rejection_record(rejection: Rejection, mode: str, host: str) -> dict[str, Any]:
    """A rule or config file (or some config keys) the daemon left out at
    start or at a reload, with each problem by line: the guard runs without
    it, and the journal says so."""
    return _daemon_record(
        "config_rejected",
        mode,
        host,
        file=rejection.path,
        left_out=rejection.what,
        problems=[{"line": line, "problem": problem} for line, problem in rejection.problems],
    )
