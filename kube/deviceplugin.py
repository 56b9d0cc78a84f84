"""The kubelet's device plugin (API v1beta1) for `gpuwatch.io/gpu` and `gpuwatch.io/memory`: one gRPC server per
resource, each on its own socket in the kubelet's device-plugins directory, registered with the kubelet's
Registration service on kubelet.sock there.

A kubelet that restarts deletes every plugin socket in that directory and makes a new kubelet.sock: a watcher
thread looks every `poll_s` and serves on a new socket where ours is gone (or is another file now), and registers
again where the kubelet's socket is new or a registration has not gone through yet. ListAndWatch streams each
resource's devices, and the whole list again whenever a GPU's health or the GPUs change."""
from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from ..core import threads
from .allocate import Injection
from .api import deviceplugin_pb2 as pb
from .api import deviceplugin_pb2_grpc as pb_grpc
from .devices import RESOURCES, GpuInfo, Pairing, device_ids, gpus_of, parse_id, preferred
from .health import Health

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET = "kubelet.sock"
POLL_S = 1.0
RPC_TIMEOUT_S = 5.0
WORKERS = 8  # a kubelet holds one ListAndWatch stream per resource; the rest answer one call each


def socket_name(resource: str) -> str:
    """gpuwatch.io/memory -> gpuwatch-memory.sock"""
    return f"gpuwatch-{resource.rsplit('/', 1)[-1]}.sock"


class DevicePlugins:
    """Both resources' plugins and the thread that keeps them served and registered."""

    def __init__(self, plugin_dir: str, injection: Injection, gpus: list[GpuInfo], shares_per_gpu: int,
                 health: Health | None = None, poll_s: float = POLL_S) -> None:
        self.plugin_dir, self.injection, self.poll_s = plugin_dir, injection, poll_s
        self.shares_per_gpu = shares_per_gpu
        self.health = health or Health()
        self.pairing = Pairing()
        self._gpus = list(gpus)
        self._changed = threading.Condition()
        self._version = 0
        self._stop = threading.Event()
        self.endpoints = [_Endpoint(self, resource) for resource in RESOURCES]
        self.health.listen(self._bump)
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-deviceplugin", self._loop, self._stop),
                                        name="gpuwatch-deviceplugin", daemon=True)

    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.plugin_dir, KUBELET_SOCKET)

    # lifecycle

    def start(self) -> None:
        """Serves both sockets and starts the watcher (which registers with the kubelet as soon as it answers).
        OSError or RuntimeError when a socket cannot be served (the directory is missing or not writable)."""
        self.injection.prepare()
        for endpoint in self.endpoints:
            endpoint.serve()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._bump()  # ends the ListAndWatch streams
        if self._thread.is_alive():
            self._thread.join(timeout=self.poll_s + RPC_TIMEOUT_S + 1)
        for endpoint in self.endpoints:
            endpoint.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self.poll_s)

    def check(self) -> None:
        """One look: serve again where our socket went, register where the kubelet is new or refused before."""
        kubelet = _socket_id(self.kubelet_socket)
        for endpoint in self.endpoints:
            if self._stop.is_set():
                return
            if not endpoint.serving():
                log.info("device plugin %s: socket %s is gone (a kubelet restart): serving it again",
                         endpoint.resource, endpoint.path)
                endpoint.serve()
            if kubelet is not None and endpoint.registered_with != (kubelet, endpoint.inode):
                endpoint.register(kubelet)

    # what the servicers read

    def set_gpus(self, gpus: list[GpuInfo]) -> None:
        with self._changed:
            self._gpus = list(gpus)
        self._bump()

    def gpus(self) -> list[GpuInfo]:
        with self._changed:
            return list(self._gpus)

    def devices(self, resource: str) -> list[pb.Device]:
        return [pb.Device(ID=device, health=self.health.state(gpu.uuid))
                for gpu in self.gpus() for device in device_ids(resource, gpu, self.shares_per_gpu)]

    def _bump(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def changes(self, context: Any) -> Iterator[None]:
        """Yields at once and then after every change, while the stream's call is active and we serve."""
        seen = -1
        while not self._stop.is_set() and context.is_active():
            with self._changed:
                if seen == self._version:
                    self._changed.wait(timeout=1.0)
                if seen == self._version:
                    continue
                seen = self._version
            yield None


class _Endpoint:
    """One resource: its socket, its gRPC server, and what it last registered with."""

    def __init__(self, plugins: DevicePlugins, resource: str) -> None:
        self.plugins, self.resource = plugins, resource
        self.path = os.path.join(plugins.plugin_dir, socket_name(resource))
        self.server: Any = None
        self.inode: tuple[int, int] | None = None
        self.registered_with: tuple[object, object] | None = None  # (kubelet.sock's _inode, our socket's)
        self._refused: str | None = None

    def serving(self) -> bool:
        return self.server is not None and self.inode is not None and _socket_id(self.path) == self.inode

    def serve(self) -> None:
        self.close()
        if _socket_id(self.path) is not None or os.path.islink(self.path):
            os.unlink(self.path)  # a socket left by an earlier daemon
        server = grpc.server(ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gpuwatch-dp"))
        pb_grpc.add_DevicePluginServicer_to_server(_Servicer(self.plugins, self.resource), server)
        server.add_insecure_port(f"unix://{self.path}")
        server.start()
        self.server, self.inode, self.registered_with = server, _socket_id(self.path), None

    def register(self, kubelet: tuple[int, int]) -> None:
        request = pb.RegisterRequest(version=API_VERSION, endpoint=os.path.basename(self.path),
                                     resource_name=self.resource,
                                     options=pb.DevicePluginOptions(get_preferred_allocation_available=True))
        try:
            with grpc.insecure_channel(f"unix://{self.plugins.kubelet_socket}") as channel:
                pb_grpc.RegistrationStub(channel).Register(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            problem = f"{exc.code().name}: {exc.details()}" if hasattr(exc, "code") else str(exc)
            if problem != self._refused:  # once per problem, not once a poll
                log.error("device plugin %s: the kubelet did not register it (%s): trying again", self.resource,
                          problem)
                self._refused = problem
            return
        self.registered_with, self._refused = (kubelet, self.inode), None
        log.info("device plugin %s: registered with the kubelet (%s, endpoint %s)", self.resource,
                 self.plugins.kubelet_socket, request.endpoint)

    def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.stop(grace=0.5).wait(2)
            if self.inode is not None and _socket_id(self.path) == self.inode:
                os.unlink(self.path)
        self.inode = None


class _Servicer(pb_grpc.DevicePluginServicer):
    def __init__(self, plugins: DevicePlugins, resource: str) -> None:
        self.plugins, self.resource = plugins, resource

    def GetDevicePluginOptions(self, request: pb.Empty, context: Any) -> pb.DevicePluginOptions:
        return pb.DevicePluginOptions(pre_start_required=False, get_preferred_allocation_available=True)

    def ListAndWatch(self, request: pb.Empty, context: Any) -> Iterator[pb.ListAndWatchResponse]:
        for _ in self.plugins.changes(context):
            yield pb.ListAndWatchResponse(devices=self.plugins.devices(self.resource))

    def GetPreferredAllocation(self, request: pb.PreferredAllocationRequest,
                               context: Any) -> pb.PreferredAllocationResponse:
        response = pb.PreferredAllocationResponse()
        for ask in request.container_requests:
            chosen = preferred(list(ask.available_deviceIDs), list(ask.must_include_deviceIDs), ask.allocation_size,
                               self.plugins.pairing.partner(self.resource))
            if on := gpus_of(chosen):
                self.plugins.pairing.chose(self.resource, on[0][0])
            response.container_responses.append(pb.ContainerPreferredAllocationResponse(deviceIDs=chosen))
        return response

    def Allocate(self, request: pb.AllocateRequest, context: Any) -> pb.AllocateResponse:
        known = {gpu.uuid for gpu in self.plugins.gpus()}
        response = pb.AllocateResponse()
        for ask in request.container_requests:
            ids = list(ask.devices_ids)
            bad = [i for i in ids if (p := parse_id(i)) is None or p[0] != self.resource or p[1] not in known]
            if bad or not ids:
                what = f"unknown device IDs {', '.join(bad[:3])}" if bad else "no device IDs"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{self.resource}: {what}")
            gpus = [uuid for uuid, _ in gpus_of(ids)]
            if len(gpus) > 1:
                log.warning("%s: a container's %d devices span %d GPUs (%s): it sees them all", self.resource,
                            len(ids), len(gpus), ", ".join(gpus))
            self.plugins.pairing.chose(self.resource, gpus[0])
            response.container_responses.append(self.plugins.injection.response(gpus))
        return response

    def PreStartContainer(self, request: pb.PreStartContainerRequest, context: Any) -> pb.PreStartContainerResponse:
        return pb.PreStartContainerResponse()  # not asked for (pre_start_required is false)


def _socket_id(path: str) -> tuple[int, int] | None:
    """Which unix socket is at path: its inode and change time (a socket made again may get the inode number of
    the one deleted before it); None when there is none (or something else is there)."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_ctime_ns) if stat.S_ISSOCK(st.st_mode) else None
