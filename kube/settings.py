"""The `[kubernetes]` section of the configuration file, in the form of daemon/config.py's sections (a frozen
dataclass whose fields carry `check`, `doc` and `range` metadata), so that daemon/config.py can add it to its
Config as it is: `kubernetes: KubernetesSection = field(default_factory=KubernetesSection)`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PLUGIN_DIR = "/var/lib/kubelet/device-plugins"
POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
INTERPOSER_HOST_DIR = "/var/lib/gpuwatch/lib"


def _absolute(v: str) -> str | None:
    return None if v.startswith("/") else f"must be an absolute path, not {v!r}"


def _key(default: Any, check: Callable[[Any], str | None] | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "doc": doc, "range": None})


def _number(default: int, low: int, high: int, doc: str) -> Any:
    """An integer key from low to high (both included): a value out of range is refused, never clipped."""
    def check(v: int) -> str | None:
        return None if low <= v <= high else f"must be from {low} to {high}, not {v}"
    return field(default=default, metadata={"check": check, "doc": doc, "range": (low, high)})


@dataclass(frozen=True)
class KubernetesSection:
    enabled: bool = _key(False, None, "serve the device plugin and give pods' containers their quotas")
    shares_per_gpu: int = _number(10, 1, 1000, "gpuwatch.io/gpu devices that each GPU offers")
    plugin_dir: str = _key(PLUGIN_DIR, _absolute, "the kubelet's device-plugins directory (its kubelet.sock, and "
                                                  "the plugin's own sockets)")
    pod_resources_socket: str = _key(POD_RESOURCES_SOCKET, _absolute, "the kubelet's PodResources API socket")
    interposer_host_dir: str = _key(INTERPOSER_HOST_DIR, _absolute, "host directory holding libgpuwatch.so (the "
                                    "DaemonSet's init container fills it), mounted read-only into containers")
    preload_file: bool = _key(False, None, "also mount an /etc/ld.so.preload naming the library, for images that "
                                           "clear the environment")
    cdi: bool = _key(False, None, "name the GPU as a CDI device (nvidia.com/gpu=UUID) instead of setting "
                                  "NVIDIA_VISIBLE_DEVICES")
    host_root: str = _key("/", _absolute, "where the host's / is seen, for the container runtime's state "
                                          "(the DaemonSet: /proc/1/root)")
    api_priorities: bool = _key(True, None, "read pods' priorities from the API server (a node-scoped watch), where "
                                            "a service account token is mounted")
