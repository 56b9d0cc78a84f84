"""The kubelet's side, for the Kubernetes tests: a fake kubelet (its Registration service on a real unix socket, and
a client of the plugin's own socket as the kubelet dials it), a fake PodResources server, and the fake NVML loaded
into the test's own process. Real gRPC over real unix sockets throughout; no cluster."""
from __future__ import annotations

import ctypes
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from conftest import ROOT, Daemon, environment, wait_for

from gpuwatch.kube.api import deviceplugin_pb2 as dp
from gpuwatch.kube.api import deviceplugin_pb2_grpc as dp_grpc
from gpuwatch.kube.api import podresources_pb2 as pr
from gpuwatch.kube.api import podresources_pb2_grpc as pr_grpc


def short_dir(prefix: str) -> Path:
    """A fresh directory with a short path: a unix socket's path must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class FakeKubelet:
    """The kubelet's Registration service on DIR/kubelet.sock. restart() does what a restarting kubelet does: stops,
    deletes every socket in the directory (the plugins' too), and serves a new kubelet.sock."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.registrations: queue.Queue[dp.RegisterRequest] = queue.Queue()
        self.server: Any = None
        self.start()

    def start(self) -> None:
        kubelet = self

        class Registration(dp_grpc.RegistrationServicer):
            def Register(self, request: dp.RegisterRequest, context: Any) -> dp.Empty:
                kubelet.registrations.put(request)
                return dp.Empty()

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        dp_grpc.add_RegistrationServicer_to_server(Registration(), self.server)
        self.server.add_insecure_port(f"unix://{self.dir}/kubelet.sock")
        self.server.start()

    def restart(self, delete_plugins: bool = True) -> None:
        self.stop()
        for sock in self.dir.glob("*.sock"):
            if delete_plugins or sock.name == "kubelet.sock":
                sock.unlink()
        time.sleep(0.05)  # the new kubelet.sock may get the old one's inode number: not its change time too
        self.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=0).wait(2)
            self.server = None

    def registered(self, count: int, timeout: float = 10.0) -> list[dp.RegisterRequest]:
        """The next `count` registrations, in the order they came."""
        return [self.registrations.get(timeout=timeout) for _ in range(count)]

    def plugin(self, endpoint: str) -> dp_grpc.DevicePluginStub:
        """A client of a plugin's socket, as the kubelet dials it after a registration."""
        channel = grpc.insecure_channel(f"unix://{self.dir}/{endpoint}")
        return dp_grpc.DevicePluginStub(channel)


class Stream:
    """A server stream read on a thread, so that a test can wait for its next message with a timeout."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.messages: queue.Queue[Any] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
        except grpc.RpcError:
            pass
        self.messages.put(None)

    def next(self, timeout: float = 10.0) -> Any:
        return self.messages.get(timeout=timeout)

    def quiet(self, seconds: float) -> bool:
        """True when nothing comes for this long."""
        try:
            self.messages.get(timeout=seconds)
            return False
        except queue.Empty:
            return True

    def cancel(self) -> None:
        self.call.cancel()


class FakePodResources:
    """The kubelet's PodResourcesLister on a unix socket, answering List (and Get) from `pods`, which a test sets:
    [(namespace, pod, [(container, {resource: [device IDs]})])]. Counts the List calls it answered."""

    def __init__(self, path: Path, get: bool = True) -> None:
        self.pods: list[tuple[str, str, list[tuple[str, dict[str, list[str]]]]]] = []
        self.lists = 0
        fake = self

        def pod_message(namespace: str, name: str, containers: list) -> pr.PodResources:
            return pr.PodResources(name=name, namespace=namespace, containers=[
                pr.ContainerResources(name=c, devices=[pr.ContainerDevices(resource_name=r, device_ids=ids)
                                                       for r, ids in devices.items()]) for c, devices in containers])

        class Lister(pr_grpc.PodResourcesListerServicer):
            def List(self, request: pr.ListPodResourcesRequest, context: Any) -> pr.ListPodResourcesResponse:
                fake.lists += 1
                return pr.ListPodResourcesResponse(pod_resources=[pod_message(*p) for p in fake.pods])

            def Get(self, request: pr.GetPodResourcesRequest, context: Any) -> pr.GetPodResourcesResponse:
                if not get:
                    context.abort(grpc.StatusCode.UNIMPLEMENTED, "Get is not enabled")
                for p in fake.pods:
                    if (p[0], p[1]) == (request.pod_namespace, request.pod_name):
                        return pr.GetPodResourcesResponse(pod_resources=pod_message(*p))
                context.abort(grpc.StatusCode.NOT_FOUND, "no such pod")

        self.server = grpc.server(ThreadPoolExecutor(max_workers=4))
        pr_grpc.add_PodResourcesListerServicer_to_server(Lister(), self.server)
        self.server.add_insecure_port(f"unix://{path}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=0).wait(2)


def fake_nvml(out: Path, gpus: list[tuple[str, int]]) -> Any:
    """The fake NVML (tests/fakenvml) built into `out`, loaded into this process and showing `gpus` ((UUID, total
    bytes) each): pynvml, initialised. pynvml asks for libnvidia-ml.so.1 by name; the dynamic loader hands it the
    copy already loaded under that soname."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    state = out / "state"
    state.write_text("".join(f"gpu {i} {uuid} {total} 0 Fake GPU\n" for i, (uuid, total) in enumerate(gpus)))
    os.environ["FAKENVML_STATE"] = str(state)  # read by the library at every call
    ctypes.CDLL(str(out / "libnvidia-ml.so.1"), mode=ctypes.RTLD_GLOBAL)
    import pynvml
    pynvml.nvmlInit()
    return pynvml


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# Where containerd keeps a pod container's bundle (its OCI config.json, rootfs/ beside it), under the host's root:
# kube/runtime.py reads the container's namespace, pod and name from that config.json's annotations.
CONTAINERD_BUNDLES = "run/containerd/io.containerd.runtime.v2.task/k8s.io"


def containerd_annotations(namespace: str, pod: str, container: str, pod_uid: str) -> dict[str, str]:
    """The annotations containerd's CRI writes into the OCI config of a pod's (non-sandbox) container."""
    return {"io.kubernetes.cri.sandbox-namespace": namespace, "io.kubernetes.cri.sandbox-name": pod,
            "io.kubernetes.cri.container-name": container, "io.kubernetes.cri.sandbox-uid": pod_uid,
            "io.kubernetes.cri.container-type": "container"}


def kube_daemon(work: Path, sockets: Path, host_root: Path, interposer_dir: Path, gpus: list[tuple[str, int]],
                preload_file: bool = False) -> Daemon:
    """A real daemon with `[kubernetes] enabled`: its device plugin in `sockets` (where the test's FakeKubelet
    serves kubelet.sock), PodResources at sockets/pr.sock, the runtime's state under `host_root`, the interposer
    directory `interposer_dir`, and the fake NVML (built in work/fakenvml) showing `gpus` ((UUID, total bytes)
    each) and no processes; no scheduler, and no context counted where NVML lists none. Its socket, log and state
    are in work/run, the directory Allocate mounts into containers as /run/gpuwatch."""
    nvml, run = work / "fakenvml", work / "run"
    run.mkdir()
    run.chmod(0o755)
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={nvml}"], check=True)
    (nvml / "state").write_text("".join(f"gpu {i} {uuid} {total} 0 Fake GPU\n" for i, (uuid, total) in enumerate(gpus)))
    config = work / "gpuwatch.toml"
    config.write_text(f"[scheduler]\nenabled = false\ncontext_mib = 0\n\n[kubernetes]\nenabled = true\n"
                      f"plugin_dir = \"{sockets}\"\npod_resources_socket = \"{sockets / 'pr.sock'}\"\n"
                      f"interposer_host_dir = \"{interposer_dir}\"\nhost_root = \"{host_root}\"\n"
                      f"preload_file = {str(preload_file).lower()}\napi_priorities = false\n")
    with environment({"LD_LIBRARY_PATH": str(nvml), "FAKENVML_STATE": str(nvml / "state")}):
        return Daemon(run, "--config", str(config), nvml=True)


def cgroup_hierarchies() -> list[Path]:
    """Where each cgroup hierarchy is mounted, v1 controllers and v2 (a hybrid host has both), each once."""
    found: list[Path] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] in (["cgroup"], ["cgroup2"]) and fields[3] == "/":
            where = Path(fields[4].replace("\\040", " "))
            if where not in found:
                found.append(where)
    return found


def remove_cgroup(path: str, timeout: float = 5.0) -> None:
    """The cgroup `path` (as /proc/PID/cgroup shows it) and every cgroup below it, in every hierarchy, deepest
    first: runc makes a container's cgroup and its parents in each hierarchy, and removes only the container's own.
    A cgroup whose last process has just exited may refuse for a moment: waited for."""
    def gone(d: Path) -> bool:
        try:
            d.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True

    for hierarchy in cgroup_hierarchies():
        top = hierarchy / path.strip("/")
        if not path.strip("/") or not top.is_dir():
            continue
        for d in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [top]:
            wait_for(lambda: gone(d), timeout, f"cgroup {d} to be removed")


__all__ = ["CONTAINERD_BUNDLES", "FakeKubelet", "FakePodResources", "Stream", "cgroup_hierarchies",
           "containerd_annotations", "fake_nvml", "kube_daemon", "remove", "remove_cgroup", "short_dir", "wait_for"]
