"""Kubernetes on one node, as the daemon runs it: the device plugin with its GPUs from NVML and their health from
XID events, the resolver that gives each container of a pod its quota, and (in a cluster, optional) the API
server's pods for priorities. The daemon calls start() and stop(), quota_for(pid) when a process appears or
attaches, labels_for(pid) for its metrics, and forget(pid) at a process's exit.

What cannot start is said in one line (KubeStartError); the resolver runs without the plugin and without the API
server, and the plugin without NVML's events."""
from __future__ import annotations

import logging
from typing import Any

from .allocate import Injection
from .apiserver import PodWatch
from .cgroups import KubeCgroup
from .deviceplugin import DevicePlugins
from .devices import GpuInfo
from .health import Health
from .nvml import XidWatcher, open_nvml, read_gpus
from .podresources import PodResourcesClient
from .resolver import ContainerQuota, Resolver
from .runtime import Identity, identify
from .settings import KubernetesSection

log = logging.getLogger(__name__)

NO_LABELS = ("", "", "")


class KubeStartError(Exception):
    """One line: which part of the Kubernetes support could not start, and why."""


class Kubernetes:
    def __init__(self, settings: KubernetesSection, socket_path: str, gpus: list[GpuInfo] | None = None,
                 nvml: Any = None, pod_watch: PodWatch | None = None) -> None:
        """socket_path: the daemon's control socket (its directory is mounted into containers). gpus: the GPUs to
        offer (None: NVML's, read at start). nvml: pynvml, initialised (None: opened at start where gpus is None).
        pod_watch: the API server's pods (None: in-cluster where a token is mounted and api_priorities is on)."""
        self.settings = settings
        self.health = Health()
        self._gpus, self._nvml = gpus, nvml
        self._xids: XidWatcher | None = None
        self.injection = Injection.from_settings(settings, socket_path)
        self.plugins: DevicePlugins | None = None
        self.pods = pod_watch if pod_watch is not None else (
            PodWatch.in_cluster() if settings.api_priorities else None)
        self.resolver = Resolver(PodResourcesClient(settings.pod_resources_socket), self._identify,
                                 self.pods.priority_of if self.pods is not None else None)

    def start(self) -> None:
        """KubeStartError when the device plugin cannot serve (its directory missing or not writable)."""
        if self._gpus is None:
            self._nvml = self._nvml or open_nvml()
            self._gpus = read_gpus(self._nvml) if self._nvml is not None else []
        plugins = DevicePlugins(self.settings.plugin_dir, self.injection, self._gpus, self.settings.shares_per_gpu,
                                self.health)
        try:
            plugins.start()
        except (OSError, RuntimeError) as exc:
            plugins.stop()
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise KubeStartError(f"the device plugin in {self.settings.plugin_dir}: {problem}") from exc
        self.plugins = plugins
        if self._nvml is not None:
            self._xids = XidWatcher(self._nvml, self.health)
            self._xids.start()
        if self.pods is not None:
            self.pods.start()
        log.info("Kubernetes: %d GPUs offered as %d shares each and their memory in GiB; pods' quotas from %s%s",
                 len(self._gpus), self.settings.shares_per_gpu, self.settings.pod_resources_socket,
                 "; priorities from the API server" if self.pods is not None else "")

    def stop(self) -> None:
        for part in (self.pods, self._xids, self.plugins):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # the rest still stops
                    log.exception("stopping %s failed", type(part).__name__)
        self.resolver.client.close()

    def quota_for(self, pid: int) -> ContainerQuota | None:
        return self.resolver.quota_for(pid)

    def labels_for(self, pid: int) -> tuple[str, str, str]:
        """(namespace, pod, container) for the metrics; empty strings for a process in no pod's container."""
        return self.resolver.labels_for(pid) or NO_LABELS

    def forget(self, pid: int) -> None:
        self.resolver.forget(pid)

    def _identify(self, cgroup: KubeCgroup) -> Identity | None:
        if self.pods is not None and (found := self.pods.identity(cgroup)) is not None:
            return found
        return identify(cgroup.container_id, cgroup.pod_uid, self.settings.host_root)
