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

from conftest import ROOT, wait_for

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


__all__ = ["FakeKubelet", "FakePodResources", "Stream", "fake_nvml", "short_dir", "remove", "wait_for"]
