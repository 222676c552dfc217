"""deploy/daemonset.yaml: host namespaces, the measured capabilities and no
more, the host paths BCC and the responders need, and a config that the
daemon's own parser accepts."""

from __future__ import annotations

import os

import yaml

from rome_guard.config import DEFAULT_METRICS_PORT, parse_config
from rome_guard.respond.exposition import parse_listen_addr
from rome_guard.yamlsrc import load_documents

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
MANIFEST = os.path.join(REPO, "deploy", "daemonset.yaml")
UNIT = os.path.join(REPO, "systemd", "rome-guard.service")


def documents() -> dict[str, dict]:
    with open(MANIFEST) as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f) if doc}


def pod() -> dict:
    return documents()["DaemonSet"]["spec"]["template"]


def container() -> dict:
    (only,) = pod()["spec"]["containers"]
    return only


def mounts() -> dict[str, tuple[str, bool]]:
    """mount path in the container -> (host path, read-only)."""
    volumes = {v["name"]: v for v in pod()["spec"]["volumes"]}
    found = {}
    for mount in container()["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "hostPath" in volume:
            found[mount["mountPath"]] = (volume["hostPath"]["path"], mount.get("readOnly", False))
    return found


def unit_capabilities() -> set[str]:
    with open(UNIT) as f:
        line = next(x for x in f if x.startswith("CapabilityBoundingSet="))
    return {cap.removeprefix("CAP_") for cap in line.split("=", 1)[1].split()}


def test_selector_matches_the_pod_labels():
    daemonset = documents()["DaemonSet"]
    selector = daemonset["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod()["metadata"]["labels"].items()
    assert daemonset["metadata"]["namespace"] == documents()["Namespace"]["metadata"]["name"]


def test_runs_in_the_host_pid_and_network_namespaces():
    spec = pod()["spec"]
    assert spec["hostPID"] is True  # NVML reports host pids; kills are by host pid
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]


def test_capabilities_are_the_measured_set_not_privileged():
    security = container()["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    added = set(security["capabilities"]["add"])
    assert {"BPF", "PERFMON", "NET_ADMIN", "KILL", "SYS_PTRACE", "DAC_READ_SEARCH"} <= added
    assert "SYS_ADMIN" not in added
    # the unit's set: no SYS_RESOURCE (memlock only matters before 5.11),
    # which this VM's bounding set lacks (tests/deploy/test_container.py runs it)
    assert added == unit_capabilities()


def test_mounts_what_bcc_and_the_responders_need():
    found = mounts()
    # BCC: kernel headers (and where their symlinks point), tracepoints
    assert found["/lib/modules"] == ("/lib/modules", True)
    assert found["/usr/src"] == ("/usr/src", True)
    assert found["/sys/kernel/tracing"] == ("/sys/kernel/tracing", True)
    # pinned programs; cgroup.kill; registrations and the journal on the node
    assert found["/sys/fs/bpf"] == ("/sys/fs/bpf", False)
    assert found["/sys/fs/cgroup"] == ("/sys/fs/cgroup", False)
    assert found["/run/rome-guard"] == ("/run/rome-guard", False)
    assert found["/var/lib/rome-guard"] == ("/var/lib/rome-guard", False)


def test_the_config_map_is_a_valid_config_on_the_scraped_port():
    config_map = documents()["ConfigMap"]
    text = config_map["data"]["config.yaml"]
    (raw,) = load_documents(text, "configmap:config.yaml")
    config = parse_config(raw, "configmap:config.yaml")
    _, port = parse_listen_addr(config.metrics.addr)
    assert port == DEFAULT_METRICS_PORT
    assert container()["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    annotations = pod()["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    volumes = {v["name"]: v for v in pod()["spec"]["volumes"]}
    config_mount = next(
        m for m in container()["volumeMounts"] if m["mountPath"] == "/etc/rome-guard"
    )
    assert volumes[config_mount["name"]]["configMap"]["name"] == config_map["metadata"]["name"]
    assert container()["args"] == ["run", "--config", "/etc/rome-guard/config.yaml"]


def test_the_kubelet_socket_and_pod_logs_are_mounted_where_the_config_looks():
    """The GPU allocation source (docs/gpu.md): the PodResources socket's
    directory and the pod log directories, read-only, at the configured paths."""
    config_map = documents()["ConfigMap"]
    (raw,) = load_documents(config_map["data"]["config.yaml"], "configmap:config.yaml")
    kubelet = parse_config(raw, "configmap:config.yaml").gpu.kubelet
    assert kubelet.enabled == "auto"
    found = mounts()
    socket_dir = os.path.dirname(kubelet.socket)
    assert found[socket_dir] == (socket_dir, True)
    assert found[kubelet.pod_logs_dir] == (kubelet.pod_logs_dir, True)
    assert found[kubelet.container_logs_dir] == (kubelet.container_logs_dir, True)
