"""The kubelet's PodResources v1 API: which pod and container got which GPU.

A gRPC client over the kubelet's unix socket (``List`` and
``GetAllocatableResources`` of ``v1.PodResourcesLister``, the service that
dcgm-exporter and the NVIDIA device plugin's users query too). The kubelet
names pods by namespace and name while cgroup paths carry pod UIDs; the
kubelet's log directories (``/var/log/pods/<namespace>_<name>_<uid>``) join
the two without an API server.

The message classes are built here from descriptors rather than generated
by protoc: generated code pins the protobuf runtime to the generator's
version (protobuf refuses older runtimes), and generating at install time
would put protoc on every GPU node. ``podresources.proto`` next to this file
is the same API as a .proto file; a test compiles it with grpcio-tools and
checks that both describe the same messages, and serves it from a real gRPC
server for the client to talk to.

This module never writes to the socket's directory, never asks the API
server, and never blocks longer than the configured timeout.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import time
from typing import Any, Iterable

from rome_guard.gpu.allocations import (
    OWNER_POD,
    SOURCE_KUBELET,
    Allocation,
    AllocationSnapshot,
    Owner,
)

SERVICE = "v1.PodResourcesLister"
LIST = f"/{SERVICE}/List"
ALLOCATABLE = f"/{SERVICE}/GetAllocatableResources"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the kubelet's own limit for this API

_POD_DIR = re.compile(
    r"^(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?)_(?P<name>[a-z0-9]([-.a-z0-9]*[a-z0-9])?)_"
    r"(?P<uid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$"
)

_CONTAINER_LOG = re.compile(
    r"^(?P<pod>[a-z0-9][-.a-z0-9]*)_(?P<ns>[a-z0-9][-a-z0-9]*)_(?P<container>[a-z0-9][-a-z0-9]*)"
    r"-(?P<id>[0-9a-f]{64})\.log$"
)

# (message, [(field, number, type, label, message type)]); see podresources.proto
_LABEL_OPTIONAL, _LABEL_REPEATED = 1, 3
_TYPE_INT64, _TYPE_STRING, _TYPE_MESSAGE = 3, 9, 11
_MESSAGES: tuple[tuple[str, tuple[tuple[str, int, int, int, str], ...]], ...] = (
    ("AllocatableResourcesRequest", ()),
    (
        "AllocatableResourcesResponse",
        (
            ("devices", 1, _TYPE_MESSAGE, _LABEL_REPEATED, ".v1.ContainerDevices"),
            ("cpu_ids", 2, _TYPE_INT64, _LABEL_REPEATED, ""),
        ),
    ),
    ("ListPodResourcesRequest", ()),
    (
        "ListPodResourcesResponse",
        (("pod_resources", 1, _TYPE_MESSAGE, _LABEL_REPEATED, ".v1.PodResources"),),
    ),
    (
        "PodResources",
        (
            ("name", 1, _TYPE_STRING, _LABEL_OPTIONAL, ""),
            ("namespace", 2, _TYPE_STRING, _LABEL_OPTIONAL, ""),
            ("containers", 3, _TYPE_MESSAGE, _LABEL_REPEATED, ".v1.ContainerResources"),
        ),
    ),
    (
        "ContainerResources",
        (
            ("name", 1, _TYPE_STRING, _LABEL_OPTIONAL, ""),
            ("devices", 2, _TYPE_MESSAGE, _LABEL_REPEATED, ".v1.ContainerDevices"),
            ("cpu_ids", 3, _TYPE_INT64, _LABEL_REPEATED, ""),
        ),
    ),
    (
        "ContainerDevices",
        (
            ("resource_name", 1, _TYPE_STRING, _LABEL_OPTIONAL, ""),
            ("device_ids", 2, _TYPE_STRING, _LABEL_REPEATED, ""),
            ("topology", 3, _TYPE_MESSAGE, _LABEL_OPTIONAL, ".v1.TopologyInfo"),
        ),
    ),
    ("TopologyInfo", (("nodes", 1, _TYPE_MESSAGE, _LABEL_REPEATED, ".v1.NUMANode"),)),
    ("NUMANode", (("ID", 1, _TYPE_INT64, _LABEL_OPTIONAL, ""),)),
)
_SERVICE_METHODS = (
    ("List", "ListPodResourcesRequest", "ListPodResourcesResponse"),
    ("GetAllocatableResources", "AllocatableResourcesRequest", "AllocatableResourcesResponse"),
)

_classes: dict[str, Any] = {}


def file_descriptor() -> Any:
    """The v1 API as a FileDescriptorProto (what protoc would produce)."""
    from google.protobuf import descriptor_pb2

    proto = descriptor_pb2.FileDescriptorProto(
        name="rome_guard/podresources.proto", package="v1", syntax="proto3"
    )
    for name, message_fields in _MESSAGES:
        message = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in message_fields:
            message.field.add(
                name=field_name,
                number=number,
                type=kind,
                label=label,
                type_name=type_name or None,
            )
    service = proto.service.add(name="PodResourcesLister")
    for name, request, response in _SERVICE_METHODS:
        service.method.add(name=name, input_type=f".v1.{request}", output_type=f".v1.{response}")
    return proto


def messages() -> dict[str, Any]:
    """Message classes by name, built once in a private descriptor pool (so
    that they never clash with another copy of this API in the process)."""
    if not _classes:
        from google.protobuf import descriptor_pool, message_factory

        pool = descriptor_pool.DescriptorPool()
        pool.Add(file_descriptor())
        for name, _ in _MESSAGES:
            _classes[name] = message_factory.GetMessageClass(
                pool.FindMessageTypeByName(f"v1.{name}")
            )
    return _classes


# --- pod names to UIDs ------------------------------------------------------


def pod_uids(pod_logs_dir: str) -> dict[tuple[str, str], str]:
    """(namespace, name) -> pod UID, from the kubelet's log directories."""
    found: dict[tuple[str, str], str] = {}
    for entry in os.listdir(pod_logs_dir):
        match = _POD_DIR.match(entry)
        if match:
            found[(match["ns"], match["name"])] = match["uid"]
    return found


def container_names(container_logs_dir: str) -> dict[str, tuple[str, str, str]]:
    """container id -> (namespace, pod name, container name), from the
    kubelet's links <pod>_<namespace>_<container>-<id>.log. Names in
    Kubernetes never contain "_", so the split is unambiguous."""
    found: dict[str, tuple[str, str, str]] = {}
    for entry in os.listdir(container_logs_dir):
        match = _CONTAINER_LOG.match(entry)
        if match:
            found[match["id"]] = (match["ns"], match["pod"], match["container"])
    return found


def _wanted(resource: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(resource, p) for p in patterns)


def _gpu_ids(devices: Iterable[Any], patterns: Iterable[str]) -> tuple[str, ...]:
    ids: list[str] = []
    for dev in devices:
        if _wanted(dev.resource_name, patterns):
            ids.extend(str(d) for d in dev.device_ids)
    return tuple(dict.fromkeys(ids))


def _grpc() -> Any:
    """grpc, imported on first use. gRPC's own logging writes lines in a
    format of its own to stderr (a kubelet restart, a fork while a call
    runs): unless the operator set GRPC_VERBOSITY, only errors."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import grpc

    return grpc


class PodResourcesSource:
    """An allocation source over the kubelet socket. Each ``snapshot()``
    connects afresh if the socket was replaced (a kubelet restart)."""

    name = SOURCE_KUBELET

    def __init__(
        self,
        socket: str,
        pod_logs_dir: str = "/var/log/pods",
        timeout: float = 5.0,
        resources: Iterable[str] = ("nvidia.com/gpu", "nvidia.com/mig-*"),
        container_logs_dir: str = "/var/log/containers",
    ):
        self.socket = socket
        self.pod_logs_dir = pod_logs_dir
        self.container_logs_dir = container_logs_dir
        self.timeout = timeout
        self.resources = tuple(resources)
        self._channel: Any = None
        self._socket_id: tuple[int, int] | None = None

    def _connect(self) -> Any:
        grpc = _grpc()

        st = os.stat(self.socket)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.socket} is not a socket")
        ident = (st.st_ino, st.st_dev)
        if self._channel is None or ident != self._socket_id:
            self.close()
            self._channel = grpc.insecure_channel(
                f"unix://{self.socket}",
                options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    # a restarted kubelet is a new socket: no backoff from the old one
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ],
            )
            self._socket_id = ident
        return self._channel

    def _call(self, channel: Any, method: str, request: str, response: str) -> Any:
        classes = messages()
        stub = channel.unary_unary(
            method,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=classes[response].FromString,
        )
        return stub(classes[request](), timeout=self.timeout)

    def snapshot(self) -> AllocationSnapshot:
        grpc = _grpc()

        now = time.time()
        try:
            channel = self._connect()
        except FileNotFoundError:
            self.close()
            return AllocationSnapshot(self.name, False, f"no socket at {self.socket}", taken_at=now)
        except OSError as exc:
            self.close()
            return AllocationSnapshot(self.name, False, f"{self.socket}: {exc}", taken_at=now)
        try:
            listed = self._call(
                channel, LIST, "ListPodResourcesRequest", "ListPodResourcesResponse"
            )
        except grpc.RpcError as exc:
            self.close()
            return AllocationSnapshot(
                self.name, False, f"List on {self.socket}: {exc.code().name}", taken_at=now
            )
        reason = ""
        allocatable: tuple[str, ...] = ()
        try:
            got = self._call(
                channel, ALLOCATABLE, "AllocatableResourcesRequest", "AllocatableResourcesResponse"
            )
            allocatable = _gpu_ids(got.devices, self.resources)
        except grpc.RpcError as exc:
            # kubelets before 1.23 lack it: allocations still hold
            reason = f"GetAllocatableResources: {exc.code().name}"
        try:
            uids = pod_uids(self.pod_logs_dir)
        except OSError as exc:
            return AllocationSnapshot(
                self.name,
                False,
                f"cannot join pods to cgroups: {self.pod_logs_dir}: {exc.strerror} "
                "(mount the kubelet's pod log directory read-only)",
                taken_at=now,
            )
        try:
            by_container = container_names(self.container_logs_dir)
        except OSError:
            by_container = {}  # verdicts per pod, not per container
        allocations = []
        unnamed = 0
        pods = {(pod.namespace, pod.name) for pod in listed.pod_resources}
        containers = {
            cid: name for cid, (ns, pod, name) in by_container.items() if (ns, pod) in pods
        }
        for pod in listed.pod_resources:
            uid = uids.get((pod.namespace, pod.name))
            if uid is None:
                unnamed += 1
                continue
            parts = tuple((c.name, _gpu_ids(c.devices, self.resources)) for c in pod.containers)
            gpus = tuple(dict.fromkeys(g for _, ids in parts for g in ids))
            owner = Owner(OWNER_POD, uid, f"{pod.namespace}/{pod.name}", self.name)
            allocations.append(Allocation(owner, gpus, parts))
        if unnamed:
            note = f"{unnamed} pod(s) without a log directory in {self.pod_logs_dir}"
            reason = f"{reason}; {note}" if reason else note
        return AllocationSnapshot(
            self.name,
            True,
            reason,
            tuple(allocations),
            allocatable,
            containers=containers,
            taken_at=now,
        )

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._socket_id = None
