"""Kubernetes containers' quotas and priorities, applied: what kube/ resolved for a process (the devices the kubelet
assigned to its container) becomes a cgroup quota group of the container's cgroup, shared by all its processes,
and the terms PolicyState gives each process (its interposer's quota, its priority). Nothing the container controls
is read: kube/resolver.py goes from the process's cgroup to the kubelet's record."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from ..core.procfs import process_cgroup
from ..core.protocol import ControlError
from ..core.vocabulary import Priority
from ..enforcer.policy import PodTerms

log = logging.getLogger(__name__)

RETRY_FOR_S = 60.0  # a process in a pod's container is asked about this long after the kubelet did not list it


class _Kube(Protocol):  # kube.node.Kubernetes
    def quota_for(self, pid: int) -> Any: ...  # ContainerQuota | None
    def labels_for(self, pid: int) -> tuple[str, str, str]: ...


class _CgroupQuotas(Protocol):  # enforcer.quota.QuotaEnforcer
    def set_cgroup(self, path: str, nbytes: int, action: str = "pause", by_hand: bool = False) -> dict[str, Any]: ...


def container_cgroup(process_path: str, container_id: str) -> str | None:
    """The container's own cgroup from a process's (which may be one the container made below it)."""
    parts = process_path.split("/")
    at = next((i for i, part in enumerate(parts) if container_id and container_id in part), None)
    return "/".join(parts[:at + 1]) if at is not None else None


class PodQuotas:
    """`terms(pid)` is PolicyState's `pods`; `retry()` runs every second for processes in a pod whose container the
    kubelet had not listed yet."""

    def __init__(self, kube: _Kube, quotas: _CgroupQuotas) -> None:
        self.kube, self.quotas = kube, quotas
        self._lock = threading.Lock()
        self._cgroups: dict[str, tuple[str, int]] = {}   # container ID -> (its cgroup, the quota set on it)
        self._unresolved: dict[int, float] = {}           # in a pod's container, no quota known yet: since when
        self.reapply: Any = None                          # PolicyState.apply, for retry()

    def terms(self, pid: int) -> PodTerms | None:
        quota = self.kube.quota_for(pid)
        with self._lock:
            if quota is None:
                if self.kube.labels_for(pid) != ("", "", ""):
                    self._unresolved.setdefault(pid, time.monotonic())
                return None
            self._unresolved.pop(pid, None)
        if quota.memory_bytes:
            self._cgroup_quota(pid, quota.container_id, quota.memory_bytes)
        return PodTerms(quota.memory_bytes, Priority.parse(quota.priority) if quota.priority else None)

    def retry(self) -> None:
        now = time.monotonic()
        with self._lock:
            for pid in [pid for pid, since in self._unresolved.items() if now - since > RETRY_FOR_S]:
                del self._unresolved[pid]  # a container without gpuwatch's devices, most likely
            waiting = sorted(self._unresolved)
        for pid in waiting:
            if self.reapply is not None:
                self.reapply(pid)

    def forget(self, pid: int) -> None:
        with self._lock:
            self._unresolved.pop(pid, None)

    def _cgroup_quota(self, pid: int, container_id: str, nbytes: int) -> None:
        path = process_cgroup(pid)
        cgroup = container_cgroup(path, container_id) if path is not None else None
        if cgroup is None:
            return
        with self._lock:
            if self._cgroups.get(container_id) == (cgroup, nbytes):
                return
            self._cgroups[container_id] = (cgroup, nbytes)
        try:
            self.quotas.set_cgroup(cgroup, nbytes)
            log.info("container %s: quota %d bytes per GPU on its cgroup %s, from the kubelet", container_id[:12],
                     nbytes, cgroup)
        except ControlError as exc:
            with self._lock:
                self._cgroups.pop(container_id, None)
            log.warning("container %s: quota not set on its cgroup %s: %s", container_id[:12], cgroup, exc)
