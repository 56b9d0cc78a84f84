"""Which pod and container a container ID is, from the container runtime's own state on the host: the OCI
config.json that containerd and CRI-O write for every container (annotations the CRI sets), or Docker's
config.v2.json (labels) under cri-dockerd. The kubelet's PodResources API names containers by namespace, pod and
container name, while a process's cgroup gives only the pod's UID and the container's ID: this joins the two.

These files are the runtime's, under the host's /run and /var/lib: a container cannot write them, unlike its own
environment or its pod's annotations, so what they say can be trusted. `root` is where the host's / is seen (the
DaemonSet: /proc/1/root, through hostPID)."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_BYTES = 8 << 20  # a container's config.json is tens of KiB; anything this large is not one

# (file under the host's root, the keys path to the string map in it, the keys of: namespace, pod, container, pod UID)
_CRI = ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name", "io.kubernetes.container.name",
        "io.kubernetes.pod.uid")
_CONTAINERD = ("io.kubernetes.cri.sandbox-namespace", "io.kubernetes.cri.sandbox-name",
               "io.kubernetes.cri.container-name", "io.kubernetes.cri.sandbox-uid")
SOURCES: tuple[tuple[str, tuple[str, ...], tuple[str, str, str, str]], ...] = (
    ("run/containerd/io.containerd.runtime.v2.task/k8s.io/{id}/config.json", ("annotations",), _CONTAINERD),
    ("run/containerd/io.containerd.runtime.v1.linux/k8s.io/{id}/config.json", ("annotations",), _CONTAINERD),
    ("run/containers/storage/overlay-containers/{id}/userdata/config.json", ("annotations",), _CRI),
    ("var/lib/docker/containers/{id}/config.v2.json", ("Config", "Labels"), _CRI),
)


@dataclass(frozen=True)
class Identity:
    namespace: str
    pod: str
    container: str
    pod_uid: str = ""


def identify(container_id: str, pod_uid: str = "", root: str = "/") -> Identity | None:
    """The container's namespace, pod and name; None where no runtime knows it (or it is a pod's sandbox). A
    runtime that names another pod than the cgroup's `pod_uid` is not believed (logged)."""
    if not container_id or not all(c in "0123456789abcdef" for c in container_id):
        return None
    for template, path, keys in SOURCES:
        data = _read(os.path.join(root, template.format(id=container_id)))
        for key in path:
            data = data.get(key) if isinstance(data, dict) else None
        if not isinstance(data, dict):
            continue
        namespace, pod, container, uid = (data.get(k) for k in keys)
        if not (isinstance(namespace, str) and isinstance(pod, str) and isinstance(container, str) and container):
            return None  # a sandbox (pause) container, or not one of the kubelet's
        uid = uid if isinstance(uid, str) else ""
        if pod_uid and uid and uid != pod_uid:
            log.warning("container %s: the runtime says pod %s, its cgroup says pod %s: not resolved", container_id,
                        uid, pod_uid)
            return None
        return Identity(namespace, pod, container, uid or pod_uid)
    return None


def _read(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_BYTES:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None
