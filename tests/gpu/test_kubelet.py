"""The kubelet PodResources client against a real gRPC server serving the v1
API on a unix socket, and `rome-guard gpu list` joining it with the stand-in
NVML library and real processes in pod-shaped cgroups."""

from __future__ import annotations

import json
import threading

from google.protobuf import descriptor_pb2

from rome_guard.gpu.allocations import Allocations
from rome_guard.gpu.kubelet import PodResourcesSource, file_descriptor
from tests.fixtures.fake_nvml import FakeGpu, FakeProcess, FakeState
from tests.fixtures.kubelet import FakePod, generated
from tests.gpu.test_gpu_cli import consumers, rome_guard

GPU0 = "GPU-00000000-1111-2222-3333-444444444444"
GPU1 = "GPU-11111111-1111-2222-3333-444444444444"
MIG = "MIG-aaaaaaaa-1111-2222-3333-444444444444"


def source(kubelet) -> PodResourcesSource:
    return PodResourcesSource(str(kubelet.socket), str(kubelet.pod_logs_dir), timeout=30)


def test_client_descriptors_are_the_shipped_proto(tmp_path_factory):
    """The client's messages are the .proto's, field for field (compiled
    here by grpcio-tools from rome_guard/gpu/podresources.proto)."""
    pb2, _ = generated(tmp_path_factory.getbasetemp() / "podresources-gen")
    compiled = descriptor_pb2.FileDescriptorProto()
    pb2.DESCRIPTOR.CopyToProto(compiled)
    ours = file_descriptor()
    assert compiled.package == ours.package == "v1"
    assert list(compiled.message_type) == list(ours.message_type)
    methods = [(m.name, m.input_type, m.output_type) for m in compiled.service[0].method]
    assert methods == [(m.name, m.input_type, m.output_type) for m in ours.service[0].method]
    assert compiled.service[0].name == ours.service[0].name == "PodResourcesLister"


def test_pods_containers_and_gpus_from_list_and_allocatable(kubelet):
    trainer = kubelet.add_pod(
        FakePod(
            "ml",
            "trainer-0",
            {
                "main": [("nvidia.com/gpu", [GPU0]), ("example.com/nic", ["nic0"])],
                "sidecar": [],
            },
        )
    )
    mig = kubelet.add_pod(FakePod("ml", "mig-user", {"main": [("nvidia.com/mig-1g.10gb", [MIG])]}))
    nb = kubelet.add_pod(FakePod("notebooks", "alice", {"jupyter": []}))
    kubelet.add_pod(FakePod("ml", "no-logs", {"main": []}), log_dir=False)
    kubelet.allocatable = [("nvidia.com/gpu", [GPU0, GPU1]), ("example.com/nic", ["nic0"])]
    kubelet.start()
    snap = source(kubelet).snapshot()
    assert snap.live, snap.reason
    by_uid = snap.by_owner()
    assert by_uid[trainer.uid].gpus == (GPU0,)  # the NIC is not a GPU
    assert by_uid[trainer.uid].parts == (("main", (GPU0,)), ("sidecar", ()))
    assert by_uid[trainer.uid].owner.name == "ml/trainer-0"
    assert by_uid[mig.uid].gpus == (MIG,)
    assert by_uid[nb.uid].gpus == ()
    assert len(by_uid) == 3 and "1 pod(s) without a log directory" in snap.reason
    assert snap.allocatable == (GPU0, GPU1)
    assert kubelet.calls == {"List": 1, "GetAllocatableResources": 1}


def test_socket_vanishing_and_returning(kubelet):
    src = source(kubelet)
    down = src.snapshot()
    assert not down.live and f"no socket at {kubelet.socket}" in down.reason
    pod = kubelet.add_pod(FakePod("ml", "trainer-0", {"main": [("nvidia.com/gpu", [GPU0])]}))
    kubelet.start()
    assert src.snapshot().by_owner()[pod.uid].gpus == (GPU0,)
    kubelet.stop()  # kubelet restarts: the socket goes away
    gone = src.snapshot()
    assert not gone.live and not gone.allocations
    kubelet.pods[0].containers["main"] = [("nvidia.com/gpu", [GPU1])]
    kubelet.start()  # and comes back, a new socket at the same path
    back = src.snapshot()
    assert back.live and back.by_owner()[pod.uid].gpus == (GPU1,)


def test_missing_pod_log_directory_says_how_to_fix_it(kubelet, tmp_path):
    kubelet.start()
    src = PodResourcesSource(str(kubelet.socket), str(tmp_path / "absent"), timeout=30)
    snap = src.snapshot()
    assert not snap.live and "mount the kubelet's pod log directory" in snap.reason


def test_a_new_pod_triggers_a_refresh_before_the_interval(kubelet):
    kubelet.start()
    allocations = Allocations([source(kubelet)], interval=3600)
    try:
        allocations.start()
        # the first refresh runs at once; the next only when asked (interval: an hour)
        while kubelet.calls["List"] < 1:
            threading.Event().wait(0.05)
        pod = kubelet.add_pod(FakePod("ml", "new", {"main": [("nvidia.com/gpu", [GPU0])]}))
        allocations.request_refresh()
        while pod.uid not in allocations.snapshots()[0].by_owner():
            threading.Event().wait(0.05)
        assert kubelet.calls["List"] >= 2
    finally:
        allocations.close()


def _config(tmp_path, kubelet, trust: str = "process") -> None:
    (tmp_path / "config.yaml").write_text(
        "gpu:\n"
        f"  trust: {trust}\n"
        "  kubelet:\n"
        f"    socket: {kubelet.socket}\n"
        f"    pod_logs_dir: {kubelet.pod_logs_dir}\n"
        f"    container_logs_dir: {kubelet.container_logs_dir}\n"
        "  slurm:\n"
        "    enabled: 'off'\n"
    )


def test_gpu_list_judges_pods_against_their_allocations(
    tmp_path, kubelet, pod_cgroups, fake_library
):
    trainer_pod = kubelet.add_pod(
        FakePod("ml", "trainer-0", {"main": [("nvidia.com/gpu", [GPU0])]})
    )
    notebook_pod = kubelet.add_pod(FakePod("notebooks", "alice", {"jupyter": []}))
    kubelet.allocatable = [("nvidia.com/gpu", [GPU0, GPU1])]
    kubelet.start()
    trainer_cg = pod_cgroups.container(trainer_pod.uid)
    trainer = pod_cgroups.start(trainer_cg, "sleep", "1000")
    tool_call = pod_cgroups.start(trainer_cg, "sleep", "1001")  # an agent's tool call, same pod
    notebook = pod_cgroups.start(pod_cgroups.container(notebook_pod.uid), "sleep", "1002")
    state = tmp_path / "state.txt"
    FakeState(
        gpus=[FakeGpu(0, GPU0), FakeGpu(1, GPU1)],
        processes=[
            FakeProcess(0, trainer.pid),
            FakeProcess(0, tool_call.pid),
            FakeProcess(1, notebook.pid),  # a pod without a GPU request, privileged
            FakeProcess(1, trainer.pid),  # the trainer on a GPU its pod was not given
        ],
    ).write(state)
    _config(tmp_path, kubelet)
    out = rome_guard(
        tmp_path, "register", "--pid", str(trainer.pid), "--job", "sft", "--gpus", GPU0
    )
    assert out.returncode == 0, out.stderr

    out = rome_guard(tmp_path, "list", "--json", state=state)
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    by = {(g["index"], p["pid"]): p for g in doc["gpus"] for p in g["processes"]}
    assert by[(0, trainer.pid)]["status"] == "registered"
    assert by[(0, tool_call.pid)]["status"] == "unregistered"
    assert by[(0, tool_call.pid)]["owner"]["name"] == "ml/trainer-0"
    assert by[(1, notebook.pid)]["status"] == "gpu_not_allocated"
    assert by[(1, notebook.pid)]["source"] == "kubelet"
    assert by[(1, notebook.pid)]["owner"] == {
        "kind": "pod",
        "id": notebook_pod.uid,
        "name": "notebooks/alice",
        "source": "kubelet",
    }
    assert by[(1, trainer.pid)]["status"] == "gpu_not_granted"
    allocated = {g["index"]: [o["name"] for o in g["allocated_to"]] for g in doc["gpus"]}
    assert allocated == {0: ["ml/trainer-0"], 1: []}
    [kube] = doc["allocation_sources"]
    assert kube["source"] == "kubelet" and kube["live"] and kube["allocatable"] == [GPU0, GPU1]

    table = rome_guard(tmp_path, "list", state=state).stdout
    assert "allocations from kubelet: live" in table
    assert "allocated to: pod ml/trainer-0" in table
    assert "gpu_not_allocated" in table

    # gpu.trust: allocation lets the tool call in; the scheduler's "no" still holds
    _config(tmp_path, kubelet, trust="allocation")
    doc = json.loads(rome_guard(tmp_path, "list", "--json", state=state).stdout)
    statuses = {pid: p["status"] for pid, p in consumers(doc).items() if pid != trainer.pid}
    assert statuses == {tool_call.pid: "allocated", notebook.pid: "gpu_not_allocated"}

    # the kubelet goes away: verdicts as without a scheduler, and the listing says so
    kubelet.stop()
    _config(tmp_path, kubelet)
    doc = json.loads(rome_guard(tmp_path, "list", "--json", state=state).stdout)
    assert consumers(doc)[notebook.pid]["status"] == "unregistered"
    [kube] = doc["allocation_sources"]
    assert not kube["live"] and "no socket" in kube["reason"]
    assert "allocations from kubelet: down" in rome_guard(tmp_path, "list", state=state).stdout


def test_a_sidecar_of_a_gpu_pod_is_judged_by_its_own_container(
    tmp_path, kubelet, pod_cgroups, fake_library
):
    """The kubelet gives GPUs to containers: a pod's sidecar was given none,
    even though its pod was. Where the container log links are readable the
    verdict is per container; where not, per pod."""
    pod = kubelet.add_pod(
        FakePod("ml", "trainer-0", {"main": [("nvidia.com/gpu", [GPU0])], "metrics": []})
    )
    kubelet.start()
    main_id, sidecar_id = "a" * 64, "b" * 64
    kubelet.container_log(pod, "main", main_id)
    kubelet.container_log(pod, "metrics", sidecar_id)
    trainer = pod_cgroups.start(pod_cgroups.container(pod.uid, main_id), "sleep", "1000")
    sidecar = pod_cgroups.start(pod_cgroups.container(pod.uid, sidecar_id), "sleep", "1001")
    state = tmp_path / "state.txt"
    FakeState(
        gpus=[FakeGpu(0, GPU0)],
        processes=[FakeProcess(0, trainer.pid), FakeProcess(0, sidecar.pid)],
    ).write(state)
    _config(tmp_path, kubelet, trust="allocation")
    doc = json.loads(rome_guard(tmp_path, "list", "--json", state=state).stdout)
    by = consumers(doc)
    assert by[trainer.pid]["status"] == "allocated"
    assert by[trainer.pid]["owner"]["name"] == "ml/trainer-0/main"
    assert by[sidecar.pid]["status"] == "gpu_not_allocated"
    assert by[sidecar.pid]["owner"]["name"] == "ml/trainer-0/metrics"
    assert by[sidecar.pid]["owner"]["id"] == pod.uid

    # without the links, the pod is the unit: both are inside its allocation
    for link in kubelet.container_logs_dir.iterdir():
        link.unlink()
    doc = json.loads(rome_guard(tmp_path, "list", "--json", state=state).stdout)
    assert {p["status"] for p in consumers(doc).values()} == {"allocated"}
