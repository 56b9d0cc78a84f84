"""A process's Kubernetes pod UID and container ID from its cgroup, as the kubelet and the container runtime
name them. Pure: it reads the text of /proc/PID/cgroup that it is given (core/procfs reads it).

The forms, with either cgroup driver, in cgroup v2 ("0::PATH") or v1 ("N:controllers:PATH") lines:

    systemd   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope
              /kubepods.slice/kubepods-pod<uid>.slice/crio-<id>.scope     (guaranteed QoS: no QoS level)

(the systemd driver writes the UID with _ for -)    cgroupfs  /kubepods/burstable/pod<uid>/<id>
              /kubepods/pod<uid>/<id>

with cri-containerd-, crio- or docker- before a 64-hex-digit container ID in .scope names. A path may sit below
other levels (a node in a container) or start above what a private cgroup namespace shows (/../../kubepods-...):
the pod level counts. A process in the pod's own cgroup (no container level) has a pod and no container; levels
below the container's (cgroups a container made itself) are the container's."""
from __future__ import annotations

import re
from dataclasses import dataclass

_POD = re.compile(r"^(?:kubepods(?:-(?:burstable|besteffort|guaranteed))?-)?pod"
                  r"([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?$")
_CONTAINER = re.compile(r"^(?:(?:cri-containerd|crio|docker|cri-o)-)?([0-9a-f]{64})(?:\.scope)?$")
_QOS = {"burstable": "Burstable", "besteffort": "BestEffort"}


@dataclass(frozen=True)
class KubeCgroup:
    pod_uid: str            # with dashes, as the API shows it
    container_id: str       # 64 hex digits; empty for a process in the pod's own cgroup
    qos: str                # Guaranteed, Burstable or BestEffort


def parse_path(path: str) -> KubeCgroup | None:
    """The pod and container of one cgroup path; None for a path outside Kubernetes' pods."""
    relative = path.startswith("/..")  # seen from a private cgroup namespace: the levels above may not show
    parts = [p for p in path.split("/") if p and p != ".."]
    pods = [i for i, p in enumerate(parts) if _POD.match(p)]
    if not pods:
        return None
    at = pods[-1]
    above = parts[:at]
    if not (relative or parts[at].startswith("kubepods-") or any(p in ("kubepods", "kubepods.slice") for p in above)):
        return None
    # the QoS level: in the pod's systemd name (kubepods-burstable-pod...), else the level above it
    level = parts[at].split("-pod")[0] if parts[at].startswith("kubepods-") else (above[-1] if above else "")
    qos = _QOS.get(level.removesuffix(".slice").removeprefix("kubepods-"), "Guaranteed")
    container = ""
    if at + 1 < len(parts):
        found = _CONTAINER.match(parts[at + 1])
        if found is None:
            return None  # something below a pod that is no container (conmon, a runtime's own scope)
        container = found.group(1)
    return KubeCgroup(_POD.match(parts[at]).group(1).replace("_", "-"), container, qos)  # type: ignore[union-attr]


def parse(cgroup_text: str) -> KubeCgroup | None:
    """The pod and container of a process, from its /proc/PID/cgroup: the v2 line first, then each v1 line."""
    lines = [line for line in cgroup_text.splitlines() if line.count(":") >= 2]
    lines.sort(key=lambda line: not line.startswith("0::"))
    for line in lines:
        found = parse_path(line.split(":", 2)[2].removesuffix(" (deleted)"))
        if found is not None:
            return found
    return None
