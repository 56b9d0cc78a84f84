"""A client of the kubelet's PodResources API v1 (/var/lib/kubelet/pod-resources/kubelet.sock): which devices the
kubelet assigned to each container of each pod on the node. List answers for every pod; Get for one pod, where the
kubelet has it (the KubeletPodResourcesGet feature): the client uses Get until the kubelet says it has none."""
from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

import grpc

from .api import podresources_pb2 as pb
from .api import podresources_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
MAX_MESSAGE = 16 << 20  # the kubelet's own limit for this API

# (namespace, pod, container) -> resource name -> device IDs
Assignments = dict[tuple[str, str, str], Mapping[str, tuple[str, ...]]]


class PodResourcesError(Exception):
    """The kubelet could not be asked (no socket, not answering): one line saying why."""


class PodResourcesClient:
    def __init__(self, socket: str, timeout: float = TIMEOUT_S) -> None:
        self.socket, self.timeout = socket, timeout
        self._lock = threading.Lock()
        self._channel: Any = None
        self._stub: Any = None
        self.get_available = True  # until the kubelet answers UNIMPLEMENTED

    def _lister(self) -> Any:
        with self._lock:
            if self._stub is None:
                # one channel for the daemon's life: gRPC connects again by itself after a kubelet restart
                self._channel = grpc.insecure_channel(f"unix://{self.socket}", options=[
                    ("grpc.max_receive_message_length", MAX_MESSAGE)])
                self._stub = pb_grpc.PodResourcesListerStub(self._channel)
            return self._stub

    def list(self) -> Assignments:
        """Every container of every pod on the node with its devices (containers without devices too)."""
        try:
            answer = self._lister().List(pb.ListPodResourcesRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise PodResourcesError(f"PodResources List on {self.socket}: {_problem(exc)}") from None
        out: Assignments = {}
        for pod in answer.pod_resources:
            out.update(_containers(pod))
        return out

    def get(self, namespace: str, pod: str) -> Assignments | None:
        """One pod's containers and their devices; None where the kubelet has no Get (then use list()). An empty
        answer: no such pod (yet)."""
        if not self.get_available:
            return None
        request = pb.GetPodResourcesRequest(pod_name=pod, pod_namespace=namespace)
        try:
            answer = self._lister().Get(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                log.info("the kubelet's PodResources has no Get (%s): listing every pod instead", _problem(exc))
                self.get_available = False
                return None
            if code == grpc.StatusCode.NOT_FOUND:
                return {}
            raise PodResourcesError(f"PodResources Get on {self.socket}: {_problem(exc)}") from None
        return _containers(answer.pod_resources)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._channel = self._stub = None


def _containers(pod: pb.PodResources) -> Assignments:
    out: Assignments = {}
    for container in pod.containers:
        devices: dict[str, tuple[str, ...]] = {}
        for d in container.devices:
            devices[d.resource_name] = devices.get(d.resource_name, ()) + tuple(d.device_ids)
        out[(pod.namespace, pod.name, container.name)] = devices
    return out


def _problem(exc: grpc.RpcError) -> str:
    if hasattr(exc, "code"):
        return f"{exc.code().name}: {' '.join(str(exc.details()).split())}"
    return str(exc)
