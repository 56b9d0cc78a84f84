"""From a process to its container's quota: pid -> its cgroup (kube/cgroups.py: pod UID, container ID) -> which
container of which pod (kube/runtime.py, or the API server's pods where watched) -> the devices the kubelet
assigned to that container (PodResources) -> a ContainerQuota. Nothing the container controls is read: not its
environment, not its pod's annotations for the quota.

Caches, all bounded: per pid (with its start time and cgroup, so that a reused pid, or a process that moved into a
container's cgroup after its fork, is read again) the container it is in;
per container ID its quota (a container's devices are fixed when the kubelet admits it; a container the kubelet
has not listed yet, or that holds none of ours, is asked about again after `miss_ttl_s`). forget(pid) at a
process's exit, invalidate() to start over (a kubelet restart)."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from ..core import procfs
from .cgroups import KubeCgroup, parse
from .devices import GPU_RESOURCE, MEMORY_RESOURCE, GiB, gpus_of
from .podresources import Assignments, PodResourcesClient, PodResourcesError
from .runtime import Identity

log = logging.getLogger(__name__)

CACHE_SIZE = 4096
MISS_TTL_S = 2.0
LIST_TTL_S = 1.0       # a List answer serves the lookups of this long (a burst of new processes asks once)
BACKOFF_S = 5.0        # after the kubelet failed to answer, it is not asked again for this long

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True)
class ContainerQuota:
    gpu_uuid: str                  # the GPU holding most of the container's gpuwatch devices (memory first)
    memory_bytes: int | None       # gpuwatch.io/memory on that GPU, everything it holds there (its CUDA context
                                   # included); None: it asked for no memory, so it has no memory bound
    shares: int                    # gpuwatch.io/gpu on that GPU
    namespace: str
    pod: str
    container: str
    pod_uid: str
    container_id: str
    gpus: tuple[str, ...]          # every GPU its devices are on, gpu_uuid first
    priority: str | None = None    # high, normal or low from the API server; None: the default


def quota_of(cgroup: KubeCgroup, identity: Identity, devices: Mapping[str, tuple[str, ...]]) -> ContainerQuota | None:
    """None for a container that holds none of gpuwatch's devices."""
    memory, shares = list(devices.get(MEMORY_RESOURCE, ())), list(devices.get(GPU_RESOURCE, ()))
    by_memory, by_shares = gpus_of(memory), gpus_of(shares)
    order = list(dict.fromkeys([u for u, _ in by_memory] + [u for u, _ in by_shares]))
    if not order:
        return None
    primary = order[0]
    return ContainerQuota(primary, dict(by_memory).get(primary, 0) * GiB if memory else None,
                          dict(by_shares).get(primary, 0), identity.namespace, identity.pod, identity.container,
                          cgroup.pod_uid, cgroup.container_id, tuple(order))


class _Lru(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict[K, V]()

    def get(self, key: K) -> V | None:
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class Resolver:
    def __init__(self, client: PodResourcesClient, identify: Callable[[KubeCgroup], Identity | None],
                 priority_of: Callable[[str], str | None] | None = None, cache_size: int = CACHE_SIZE,
                 miss_ttl_s: float = MISS_TTL_S) -> None:
        """identify: a container's namespace, pod and name from its cgroup's IDs; priority_of: a pod UID's
        priority (the API server's), None for the default."""
        self.client, self._identify, self.miss_ttl_s = client, identify, miss_ttl_s
        self._priority_of = priority_of or (lambda uid: None)
        self._lock = threading.Lock()
        self._pids: _Lru[int, tuple[tuple[int, str], KubeCgroup | None, Identity | None]] = _Lru(cache_size)
        self._quotas: _Lru[str, tuple[ContainerQuota | None, float]] = _Lru(cache_size)
        self._listed: tuple[Assignments, float] | None = None
        self._quiet_until = 0.0
        self._problem: str | None = None

    def container(self, pid: int) -> tuple[KubeCgroup, Identity | None] | None:
        """The pod and container a process is in (the identity None where no runtime knows the container); None
        for a process in no pod, or gone."""
        record = procfs.read_record(pid)
        if record is None:
            return None
        with self._lock:
            cached = self._pids.get(pid)
        if cached is not None and cached[0] == (record.start_time, record.cgroup_text):
            return (cached[1], cached[2]) if cached[1] is not None else None
        cgroup = parse(record.cgroup_text)  # read again once it moved: runc forks before it joins the container's
        identity = self._identify(cgroup) if cgroup is not None and cgroup.container_id else None
        with self._lock:
            self._pids.put(pid, ((record.start_time, record.cgroup_text), cgroup, identity))
        return (cgroup, identity) if cgroup is not None else None

    def labels_for(self, pid: int) -> tuple[str, str, str] | None:
        """(namespace, pod, container) of a process in a pod's container; None for any other."""
        found = self.container(pid)
        if found is None or found[1] is None:
            return None
        identity = found[1]
        return identity.namespace, identity.pod, identity.container

    def quota_for(self, pid: int) -> ContainerQuota | None:
        """The quota of the container a process is in; None for a process in no pod, in a container that holds
        none of gpuwatch's devices, or while the kubelet cannot be asked."""
        found = self.container(pid)
        if found is None or found[1] is None:
            return None
        cgroup, identity = found[0], found[1]
        now = time.monotonic()
        with self._lock:
            cached = self._quotas.get(cgroup.container_id)
        if cached is not None and (cached[0] is not None or now < cached[1]):
            quota = cached[0]
        elif now < self._quiet_until:  # the kubelet failed a moment ago: not asked again before this
            return None
        else:
            try:
                devices = self._assigned(identity, now)
            except PodResourcesError as exc:
                self._failed(str(exc), now)
                return None
            quota = quota_of(cgroup, identity, devices) if devices is not None else None
            with self._lock:
                self._quotas.put(cgroup.container_id, (quota, now + self.miss_ttl_s))
        return replace(quota, priority=self._priority_of(cgroup.pod_uid)) if quota is not None else None

    def forget(self, pid: int) -> None:
        with self._lock:
            self._pids.items.pop(pid, None)

    def invalidate(self) -> None:
        with self._lock:
            self._pids.items.clear()
            self._quotas.items.clear()
            self._listed = None

    def _assigned(self, identity: Identity, now: float) -> Mapping[str, tuple[str, ...]] | None:
        key = (identity.namespace, identity.pod, identity.container)
        one = self.client.get(identity.namespace, identity.pod)
        if one is None:  # no Get: one List serves a burst of lookups
            with self._lock:
                listed = self._listed
            if listed is None or now - listed[1] > LIST_TTL_S or key not in listed[0]:
                listed = (self.client.list(), now)
                with self._lock:
                    self._listed = listed
            one = listed[0]
        if self._problem is not None:
            log.info("the kubelet's PodResources answers again")
            self._problem = None
        return one.get(key)

    def _failed(self, problem: str, now: float) -> None:
        self._quiet_until = now + BACKOFF_S
        if problem != self._problem:
            log.warning("%s: pods' quotas cannot be resolved (asking again in %g s)", problem, BACKOFF_S)
            self._problem = problem
