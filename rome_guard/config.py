"""Daemon and scan configuration: /etc/rome-guard/config.yaml.

Every key is optional with a safe default; unknown keys and wrong types are
errors with ``file:line:column``, every one of them reported at once. The
keys and types are also in rome_guard/schema/config.schema.json (editors;
tests keep the two the same). Parsing is pure: nothing here opens sockets,
loads BPF or touches /proc.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from rome_guard.yamlsrc import LineDict, LineList, Location, SourceError, load_file

DEFAULT_CONFIG_FILE = "/etc/rome-guard/config.yaml"
DEFAULT_RULES_DIR = "/etc/rome-guard/rules.d"
DEFAULT_ALERTS_FILE = "/var/lib/rome-guard/alerts.jsonl"
DEFAULT_STATE_DIR = "/var/lib/rome-guard"
DEFAULT_RUN_DIR = "/run/rome-guard"
# 9985 is not taken in Prometheus' default port allocations list.
DEFAULT_METRICS_PORT = 9985


@dataclass
class AttributionConfig:
    env_keys: list[str] = field(default_factory=list)


@dataclass
class ProtectConfig:
    """Processes never killed, in addition to the built-in ones (pid 1,
    kernel threads, the daemon and its ancestors, sshd's listener)."""

    exe: list[str] = field(default_factory=list)  # glob patterns on the exe path
    comm: list[str] = field(default_factory=list)
    unit: list[str] = field(default_factory=list)  # glob patterns on the systemd unit


@dataclass
class KubeletConfig:
    """The kubelet PodResources API (docs/gpu.md). auto: used while the
    socket exists; off: never asked."""

    enabled: str = "auto"  # auto | off
    socket: str = "/var/lib/kubelet/pod-resources/kubelet.sock"
    # the kubelet names pods namespace/name; cgroups carry UIDs. The kubelet's
    # log directories (<namespace>_<name>_<uid>) join the two.
    pod_logs_dir: str = "/var/log/pods"
    # <pod>_<namespace>_<container>-<id>.log links: which container a
    # process's cgroup names; verdicts per container where readable
    container_logs_dir: str = "/var/log/containers"
    timeout: float = 5.0
    resources: list[str] = field(default_factory=lambda: ["nvidia.com/gpu", "nvidia.com/mig-*"])


@dataclass
class SlurmConfig:
    """slurmctld through scontrol (docs/gpu.md). auto: used when scontrol is
    on PATH and a slurm.conf exists; off: never asked."""

    enabled: str = "auto"  # auto | off
    scontrol: str = "scontrol"
    conf: str = ""  # slurm.conf, when not the default (SLURM_CONF)
    node: str = ""  # this node's Slurm name, when not the short host name
    timeout: float = 10.0


@dataclass
class GpuConfig:
    poll_interval: float = 5.0
    accounting: bool = True
    allow: list[dict] = field(default_factory=list)  # allowlist entries, see docs/gpu.md
    # trust registration files that a process's own user wrote (not only root's); docs/gpu.md
    user_registration: bool = False
    # process: inside a pod's or job's allocation a consumer still needs a
    # registration or allowlist entry; allocation: the allocation suffices
    trust: str = "process"
    allocation_refresh: float = 30.0  # seconds between scheduler queries
    kubelet: KubeletConfig = field(default_factory=KubeletConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class MetricsConfig:
    addr: str = f":{DEFAULT_METRICS_PORT}"
    web_config_file: str = ""


@dataclass
class SensorFilterConfig:
    # Loopback connects of registered GPU jobs are dropped in the kernel:
    # distributed-training rendezvous makes thousands and no rule needs them.
    ignore_registered_loopback: bool = True
    park_unknown_ms: int = 200  # how long events for unknown pids wait


@dataclass
class JournalConfig:
    """The alert journal's own rotation (docs/alerts.md)."""

    rotate_bytes: int = 256 << 20  # rotate before a record would pass this size; 0: never
    keep: int = 8  # rotated files kept (alerts.jsonl.1 newest ... alerts.jsonl.<keep>)


OUTPUT_TYPES = ("syslog", "webhook", "journald")
OUTPUT_SEVERITIES = ("low", "medium", "high", "critical")  # rules' severities, least first
SYSLOG_FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
    "uucp", "cron", "authpriv", "ftp", "ntp", "security", "console", "solaris-cron",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)  # fmt: skip
JOURNALD_SOCKET = "/run/systemd/journal/socket"


@dataclass
class OutputConfig:
    """One alert output beside the journal (docs/alerts.md, "Outputs")."""

    type: str = ""  # syslog | webhook | journald
    name: str = ""  # the metrics/status label; the type when unset
    # syslog: udp://HOST:PORT, tcp://HOST:PORT or unix:PATH; journald: the socket
    address: str = ""
    url: str = ""  # webhook: http:// or https://
    facility: str = "authpriv"  # syslog facility
    app_name: str = "rome-guard"  # syslog APP-NAME, journald SYSLOG_IDENTIFIER
    ca_file: str = ""  # webhook: CA bundle for https (the system's when unset)
    bearer_token_file: str = ""  # webhook: file holding the token (never the config itself)
    timeout: float = 5.0  # seconds per connect or send
    queue_size: int = 1000  # records waiting; past it new records are dropped and counted
    max_backoff: float = 30.0  # seconds between retries at most (doubling from 0.5 s)
    min_severity: str = "low"  # alerts below this severity are not sent


@dataclass
class Config:
    mode: str = "monitor"  # monitor | enforce
    sensor: str = "auto"  # auto | ebpf | poll
    alerts_file: str = DEFAULT_ALERTS_FILE
    state_dir: str = DEFAULT_STATE_DIR
    run_dir: str = DEFAULT_RUN_DIR
    rules: list[str] = field(default_factory=lambda: [DEFAULT_RULES_DIR])
    disabled_rules: list[str] = field(default_factory=list)  # rule ids left out
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    protect: ProtectConfig = field(default_factory=ProtectConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sensor_filter: SensorFilterConfig = field(default_factory=SensorFilterConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    outputs: list[OutputConfig] = field(default_factory=list, metadata={"items": OutputConfig})

    source: str = ""  # file it came from, "" for the built-in defaults


_CHOICES = {
    "mode": ("monitor", "enforce"),
    "sensor": ("auto", "ebpf", "poll"),
    "gpu.trust": ("process", "allocation"),
    "gpu.kubelet.enabled": ("auto", "off"),
    "gpu.slurm.enabled": ("auto", "off"),
}


def _coerce(value: Any, default: Any, loc: Location, name: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise SourceError([(loc, f"{name} must be true or false, got {value!r}")])
        return value
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SourceError([(loc, f"{name} must be a number, got {value!r}")])
        if value < 0:
            raise SourceError([(loc, f"{name} must not be negative")])
        return type(default)(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise SourceError([(loc, f"{name} must be a string, got {value!r}")])
        if name in _CHOICES and value not in _CHOICES[name]:
            allowed = ", ".join(_CHOICES[name])
            raise SourceError([(loc, f"{name} must be one of {allowed}, got {value!r}")])
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise SourceError([(loc, f"{name} must be a list")])
        return list(value)
    raise SourceError([(loc, f"{name}: unsupported value")])


def _fill(target: Any, raw: LineDict, prefix: str, problems: list) -> None:
    """Set target's fields from raw; every mistake is added to problems
    (the field keeps its default) so that all are reported together."""
    known = {f.name: f for f in fields(target) if f.name != "source"}
    for key, value in raw.items():
        loc = raw.where(key)
        name = f"{prefix}{key}"
        if key not in known:
            problems.append((loc, f"unknown key {name!r} (known: {', '.join(known)})"))
            continue
        current = getattr(target, key)
        items = known[key].metadata.get("items")
        if items is not None:
            try:
                setattr(target, key, _fill_items(items, value, loc, name))
            except SourceError as exc:
                problems.extend(exc.problems)
            continue
        if hasattr(current, "__dataclass_fields__"):
            if not isinstance(value, LineDict):
                problems.append((loc, f"{name} must be a mapping"))
            else:
                _fill(current, value, f"{name}.", problems)
            continue
        try:
            setattr(target, key, _coerce(value, current, loc, name))
        except SourceError as exc:
            problems.extend(exc.problems)


def _fill_items(kind: type, raw: Any, loc: Location, name: str) -> list:
    """A list of mappings, each filled into a fresh ``kind`` and checked."""
    if not isinstance(raw, LineList):
        raise SourceError([(loc, f"{name} must be a list of mappings")])
    out = []
    for index, item in enumerate(raw):
        where, item_name = raw.where(index), f"{name}[{index}]"
        if not isinstance(item, LineDict):
            raise SourceError([(where, f"{item_name} must be a mapping")])
        entry = kind()
        problems: list = []
        _fill(entry, item, f"{item_name}.", problems)
        if problems:
            raise SourceError(problems)
        if kind is OutputConfig:
            _check_output(entry, item, item_name)
        out.append(entry)
    if kind is OutputConfig:
        names = [entry.name for entry in out]
        for index, entry in enumerate(out):
            if names.index(entry.name) != index:
                where = raw.where(index)
                raise SourceError(
                    [(where, f"{name}[{index}]: a second output named {entry.name!r}")]
                )
    return out


def _check_output(out: OutputConfig, raw: LineDict, name: str) -> None:
    """What an output of its type needs; the name defaults to the type."""

    def fail(key: str, why: str) -> None:
        raise SourceError([(raw.where(key if key in raw else None), f"{name}.{key}: {why}")])

    if out.type not in OUTPUT_TYPES:
        fail("type", f"must be one of {', '.join(OUTPUT_TYPES)}, got {out.type!r}")
    out.name = out.name or out.type
    if not (0 < len(out.name) <= 32 and all(c.isalnum() or c in "_-" for c in out.name)):
        fail("name", "must be 1-32 letters, digits, '_' or '-' (it is a metric label)")
    if out.min_severity not in OUTPUT_SEVERITIES:
        fail("min_severity", f"must be one of {', '.join(OUTPUT_SEVERITIES)}")
    if out.queue_size < 1:
        fail("queue_size", "must be at least 1")
    if out.timeout <= 0:
        fail("timeout", "must be more than 0 seconds")
    if out.type == "syslog":
        scheme, sep, rest = out.address.partition(":")
        if not sep or scheme not in ("udp", "tcp", "unix") or not rest.strip("/"):
            fail("address", "syslog needs udp://HOST:PORT, tcp://HOST:PORT or unix:PATH")
        if scheme != "unix" and not rest.rpartition(":")[2].isdigit():
            fail("address", f"no port in {out.address!r} (udp://HOST:PORT)")
        if out.facility not in SYSLOG_FACILITIES:
            fail("facility", f"must be one of {', '.join(SYSLOG_FACILITIES)}")
    elif out.type == "webhook":
        if not out.url.startswith(("http://", "https://")):
            fail("url", "a webhook needs an http:// or https:// url")
    else:
        out.address = out.address or JOURNALD_SOCKET


def parse_config(raw: Any, path: str, problems: list | None = None) -> Config:
    """The config raw describes; raises SourceError with every mistake, or,
    given a problems list, adds them to it and returns the config with the
    defaults where a value was wrong (``rome-guard config check``)."""
    found: list = []
    config = Config(source=path)
    if raw is not None and not isinstance(raw, LineDict):
        found.append((Location(path, 1), "the config file must be a mapping"))
    elif raw is not None:
        _fill(config, raw, "", found)
    if problems is not None:
        problems.extend(found)
    elif found:
        raise SourceError(found)
    return config


def load_config(path: str | None) -> Config:
    """The config at path; the built-in defaults when path is None, or when
    it is the default path and does not exist."""
    if path is None:
        return Config()
    try:
        docs = load_file(path)
    except SourceError:
        if path == DEFAULT_CONFIG_FILE:
            import os

            if not os.path.exists(path):
                return Config()
        raise
    if len(docs) > 1:
        raise SourceError([(Location(path, 1), "expected one YAML document")])
    return parse_config(docs[0] if docs else None, path)
