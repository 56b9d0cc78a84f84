"""From a process to its container's quota: cgroup paths as the kubelet names them (both drivers, cgroup v1 and
v2), the runtime's record of a container, the API server's pods (a real HTTP server on loopback), and a real
process in a real cgroup resolved through a fake PodResources server over gRPC on a unix socket."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kube_fixtures import FakeKubelet, FakePodResources, remove, short_dir, wait_for

from gpuwatch.core.procfs import cgroup2_root
from gpuwatch.kube.apiserver import Pod, PodWatch, level, parse_pod
from gpuwatch.kube.cgroups import KubeCgroup, parse, parse_path
from gpuwatch.kube.devices import GPU_RESOURCE, MEMORY_RESOURCE, GiB, GpuInfo
from gpuwatch.kube.node import Kubernetes
from gpuwatch.kube.podresources import PodResourcesClient
from gpuwatch.kube.resolver import ContainerQuota, Resolver
from gpuwatch.kube.runtime import Identity, identify
from gpuwatch.kube.settings import KubernetesSection

UID = "0b6a7f2e-91c4-4d38-a1e2-5f6b7c8d9e0f"
CID = "4f3c2b1a9e" + "0123456789abcdef" * 3 + "012345"
OTHER = "a" * 64
A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
U_ = UID.replace("-", "_")

# ------------------------------------------------------------------------------------------------ cgroup paths


@pytest.mark.parametrize("path, expected", [
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{U_}.slice/cri-containerd-{CID}.scope",
     KubeCgroup(UID, CID, "Burstable")),
    (f"/kubepods.slice/kubepods-pod{U_}.slice/crio-{CID}.scope", KubeCgroup(UID, CID, "Guaranteed")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice/docker-{CID}.scope",
     KubeCgroup(UID, CID, "BestEffort")),
    (f"/kubepods/burstable/pod{UID}/{CID}", KubeCgroup(UID, CID, "Burstable")),
    (f"/kubepods/pod{UID}/{CID}", KubeCgroup(UID, CID, "Guaranteed")),
    (f"/kubepods/besteffort/pod{UID}/{CID}", KubeCgroup(UID, CID, "BestEffort")),
    (f"/../../kubepods-burstable-pod{U_}.slice/cri-containerd-{CID}.scope", KubeCgroup(UID, CID, "Burstable")),
    (f"/../burstable/pod{UID}/{CID}", KubeCgroup(UID, CID, "Burstable")),  # a private cgroup namespace
    (f"/kubepods/pod{UID}/{CID}/init.scope", KubeCgroup(UID, CID, "Guaranteed")),  # a cgroup the container made
    (f"/machine.slice/pod{UID}/{CID}", None),
    (f"/docker/{OTHER}/kubepods/burstable/pod{UID}/{CID}", KubeCgroup(UID, CID, "Burstable")),  # a node in a container
    (f"/kubepods/burstable/pod{UID}", KubeCgroup(UID, "", "Burstable")),
    (f"/kubepods.slice/kubepods-pod{U_}.slice/crio-conmon-{CID}.scope", None),
    (f"/system.slice/docker-{CID}.scope", None),
    ("/user.slice/user-0.slice/session-1.scope", None),
    ("/", None),
])
def test_cgroup_paths_of_both_drivers(path, expected):
    assert parse_path(path) == expected


def test_cgroup_v1_lines_and_the_v2_line_first():
    v1 = (f"12:memory:/kubepods/burstable/pod{UID}/{CID}\n11:cpu,cpuacct:/kubepods/burstable/pod{UID}/{CID}\n"
          f"1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n0::/\n")
    assert parse(v1) == KubeCgroup(UID, CID, "Burstable"), "v1 controllers' lines where the v2 line is the root"
    both = f"5:memory:/kubepods/pod{UID}/{OTHER}\n0::/kubepods/burstable/pod{UID}/{CID}\n"
    assert parse(both) == KubeCgroup(UID, CID, "Burstable")
    assert parse("0::/init.scope\n") is None and parse("") is None


# ------------------------------------------------------------------------------------------------ the runtime


def runtime_record(root: Path, container: str, annotations: dict[str, str], kind: str = "containerd") -> None:
    where = {"containerd": f"run/containerd/io.containerd.runtime.v2.task/k8s.io/{container}/config.json",
             "crio": f"run/containers/storage/overlay-containers/{container}/userdata/config.json",
             "docker": f"var/lib/docker/containers/{container}/config.v2.json"}[kind]
    body = {"Config": {"Labels": annotations}} if kind == "docker" else {"ociVersion": "1.1.0",
                                                                          "annotations": annotations}
    (root / where).parent.mkdir(parents=True, exist_ok=True)
    (root / where).write_text(json.dumps(body))


def containerd_annotations(namespace: str, pod: str, container: str, uid: str = UID) -> dict[str, str]:
    return {"io.kubernetes.cri.sandbox-namespace": namespace, "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.container-name": container, "io.kubernetes.cri.sandbox-uid": uid,
            "io.kubernetes.cri.container-type": "container"}


def test_the_runtime_names_a_container(tmp_path):
    runtime_record(tmp_path, CID, containerd_annotations("ml", "trainer-0", "main"))
    assert identify(CID, UID, str(tmp_path)) == Identity("ml", "trainer-0", "main", UID)
    assert identify(CID, "11111111-2222-3333-4444-555555555555", str(tmp_path)) is None, "another pod's UID"
    cri = {"io.kubernetes.pod.namespace": "ns", "io.kubernetes.pod.name": "p", "io.kubernetes.container.name": "c",
           "io.kubernetes.pod.uid": UID}
    runtime_record(tmp_path, OTHER, cri, "crio")
    assert identify(OTHER, UID, str(tmp_path)) == Identity("ns", "p", "c", UID)
    docker = "b" * 64
    runtime_record(tmp_path, docker, cri, "docker")
    assert identify(docker, "", str(tmp_path)) == Identity("ns", "p", "c", UID)
    sandbox = "c" * 64
    runtime_record(tmp_path, sandbox, {"io.kubernetes.cri.sandbox-name": "p", "io.kubernetes.cri.sandbox-namespace":
                                       "ns", "io.kubernetes.cri.container-type": "sandbox"})
    assert identify(sandbox, "", str(tmp_path)) is None, "a pod's sandbox is no container of it"
    assert identify("d" * 64, "", str(tmp_path)) is None and identify("../../etc", "", str(tmp_path)) is None


# ------------------------------------------------------------------------------------------------ the API server


def api_pod(uid: str, name: str, priority: int | None = None, annotation: str | None = None,
            containers: dict[str, str] | None = None) -> dict:
    meta: dict = {"uid": uid, "namespace": "ml", "name": name, "resourceVersion": "7"}
    if annotation is not None:
        meta["annotations"] = {"gpuwatch.io/priority": annotation}
    spec = {"nodeName": "node-1", **({"priority": priority} if priority is not None else {})}
    return {"metadata": meta, "spec": spec,
            "status": {"containerStatuses": [{"name": n, "containerID": f"containerd://{c}"}
                                             for c, n in (containers or {}).items()]}}


def test_a_pods_priority_comes_from_its_class_and_its_annotation_only_lowers_it():
    assert level(Pod("u", "ns", "p")) is None
    assert [level(Pod("u", "ns", "p", priority=p)) for p in (1000, 0, -5)] == ["high", "normal", "low"]
    assert level(Pod("u", "ns", "p", priority=1000, annotation="low")) == "low"
    assert level(Pod("u", "ns", "p", priority=-5, annotation="high")) == "low", "an annotation never raises it"
    assert level(Pod("u", "ns", "p", annotation="high")) == "normal"
    assert level(Pod("u", "ns", "p", priority=0, annotation="bogus")) == "normal"
    pod = parse_pod(api_pod(UID, "trainer-0", 10, " LOW ", {CID: "main"}))
    assert pod == Pod(UID, "ml", "trainer-0", 10, "low", {CID: "main"})


class FakeApiServer:
    """GET /api/v1/pods?fieldSelector=spec.nodeName=node-1: a list, then a watch that sends `events` and ends."""

    def __init__(self, pods: list[dict], events: list[dict]) -> None:
        self.requests: list[tuple[str, str]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append((self.path, self.headers.get("Authorization", "")))
                if "watch=1" in self.path:
                    body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
                else:
                    body = json.dumps({"kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": pods}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_pod_watch_lists_and_follows_this_nodes_pods(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret-token\n")
    later = "11111111-2222-3333-4444-555555555555"
    api = FakeApiServer([api_pod(UID, "trainer-0", 1000, containers={CID: "main"})],
                        [{"type": "ADDED", "object": api_pod(later, "batch-1", -1)},
                         {"type": "MODIFIED", "object": api_pod(UID, "trainer-0", 1000, "normal", {CID: "main"})}])
    watch = PodWatch(api.url, "node-1", str(token))
    watch.start()
    try:
        wait_for(lambda: watch.priority_of(later) == "low", 10, "the watch's events")
        wait_for(lambda: watch.priority_of(UID) == "normal", 10, "the annotation to lower the class's priority")
        assert watch.identity(KubeCgroup(UID, CID, "Burstable")) == Identity("ml", "trainer-0", "main", UID)
        assert watch.identity(KubeCgroup(UID, OTHER, "Burstable")) is None
        path, auth = api.requests[0]
        assert path == "/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1" and auth == "Bearer secret-token"
        assert any("watch=1" in p and "resourceVersion=7" in p for p, _ in api.requests)
    finally:
        watch.stop()
        api.stop()


def test_outside_a_cluster_there_is_no_pod_watch(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert PodWatch.in_cluster("node-1") is None


# ------------------------------------------------------------------------------------------------ a real cgroup


@pytest.fixture
def pod_process(tmp_path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A sleep in a new cgroup v2 leaf named as the kubelet (systemd driver) and containerd name theirs, below a
    test's own top level; the runtime's record of that container under a host root of the test's own."""
    root = cgroup2_root()
    if root is None or os.geteuid() != 0:
        pytest.skip("needs root and a cgroup v2 hierarchy to make a pod's cgroup")
    top = root / f"gpuwatch-test-{uuid.uuid4().hex[:8]}"
    leaf = top / "kubepods.slice/kubepods-burstable.slice" / f"kubepods-burstable-pod{U_}.slice" / \
        f"cri-containerd-{CID}.scope"
    leaf.mkdir(parents=True)
    host = tmp_path / "host"
    runtime_record(host, CID, containerd_annotations("ml", "trainer-0", "main"))
    p = subprocess.Popen(["sleep", "100"])
    try:
        (leaf / "cgroup.procs").write_text(str(p.pid))
        yield p, host
    finally:
        p.kill()
        p.wait()
        for d in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [top]:
            wait_for(lambda: not d.exists() or _rmdir(d), 5, f"cgroup {d} to be removed")


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except OSError:
        return False


TRAINER = [("ml", "trainer-0", [("main", {GPU_RESOURCE: [f"{A}-share-0", f"{A}-share-1"],
                                           MEMORY_RESOURCE: [f"{A}-gib-{k}" for k in range(4)]}),
                                 ("sidecar", {})])]


@pytest.mark.root
@pytest.mark.parametrize("get", [True, False], ids=["get", "list"])
def test_a_process_in_a_pods_cgroup_gets_its_containers_quota(pod_process, get):
    p, host = pod_process
    directory = short_dir("gwk-pr-")
    kubelet = FakePodResources(directory / "kubelet.sock", get=get)
    resolver = Resolver(PodResourcesClient(str(directory / "kubelet.sock")),
                        lambda cg: identify(cg.container_id, cg.pod_uid, str(host)), miss_ttl_s=0.2)
    try:
        assert resolver.quota_for(p.pid) is None, "the kubelet lists no such container yet"
        kubelet.pods = TRAINER + [("ml", "other", [("main", {MEMORY_RESOURCE: [f"{B}-gib-0"]})])]
        wait_for(lambda: resolver.quota_for(p.pid) is not None, 5, "the quota once the kubelet lists the container")
        assert resolver.quota_for(p.pid) == ContainerQuota(A, 4 * GiB, 2, "ml", "trainer-0", "main", UID, CID, (A,))
        assert resolver.labels_for(p.pid) == ("ml", "trainer-0", "main")
        asked = kubelet.lists
        for _ in range(5):
            resolver.quota_for(p.pid)
        assert kubelet.lists == asked, "a container's devices are asked for once"
        assert resolver.quota_for(os.getpid()) is None and resolver.labels_for(os.getpid()) is None, "not in a pod"
        kubelet.stop()
        resolver.invalidate()
        assert resolver.quota_for(p.pid) is None, "no kubelet: no quota, and no error"
        assert resolver.labels_for(p.pid) == ("ml", "trainer-0", "main"), "labels need no kubelet"
    finally:
        kubelet.stop()
        resolver.client.close()
        remove(directory)


@pytest.mark.root
def test_the_node_serves_the_plugin_and_resolves_quotas(pod_process, tmp_path):
    p, host = pod_process
    directory = short_dir("gwk-node-")
    kubelet, pod_resources = FakeKubelet(directory), FakePodResources(directory / "pr.sock")
    pod_resources.pods = TRAINER
    settings = KubernetesSection(enabled=True, plugin_dir=str(directory),
                                 pod_resources_socket=str(directory / "pr.sock"),
                                 interposer_host_dir=str(tmp_path / "lib"), host_root=str(host), api_priorities=False)
    node = Kubernetes(settings, "/run/gpuwatch/gpuwatch.sock", gpus=[GpuInfo(A, 16 * GiB)])
    node.start()
    try:
        assert {r.resource_name for r in kubelet.registered(2)} == {GPU_RESOURCE, MEMORY_RESOURCE}
        quota = node.quota_for(p.pid)
        assert quota is not None and (quota.gpu_uuid, quota.memory_bytes, quota.shares) == (A, 4 * GiB, 2)
        assert node.labels_for(p.pid) == ("ml", "trainer-0", "main") and node.labels_for(os.getpid()) == ("", "", "")
    finally:
        node.stop()
        kubelet.stop()
        pod_resources.stop()
        remove(directory)
    assert not list(directory.glob("gpuwatch-*.sock"))
