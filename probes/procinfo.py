"""What /proc says about a traced process: its command, user, and container or Kubernetes pod."""
from __future__ import annotations

import pwd
import re
from dataclasses import dataclass
from pathlib import Path

_CONTAINER = re.compile(r"(?<![0-9a-f])([0-9a-f]{64})(?![0-9a-f])")
_POD = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")


@dataclass(frozen=True)
class ProcInfo:
    comm: str
    uid: int | None
    user: str
    container_id: str
    pod_uid: str


def container_of(cgroup_text: str) -> tuple[str, str]:
    """(container ID, pod UID) from /proc/PID/cgroup: Docker, containerd, CRI-O and Kubernetes paths
    (cgroup v1 and v2, cgroupfs and systemd drivers). Empty strings for a process on the host."""
    container = pod = ""
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        if not container and (m := _CONTAINER.findall(path)):
            container = m[-1]
        if not pod and (m := _POD.search(path)):
            pod = m.group(1).replace("_", "-")
    return container, pod


def _user(uid: int | None) -> str:
    if uid is None:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def read(pid: int) -> ProcInfo | None:
    """None when the process is gone or unreadable (a vanishing process is skipped, not an error)."""
    base = Path(f"/proc/{pid}")
    try:
        comm = (base / "comm").read_text().strip()
        uid = next((int(l.split()[1]) for l in (base / "status").read_text().splitlines() if l.startswith("Uid:")),
                   None)
        try:
            container, pod = container_of((base / "cgroup").read_text())
        except OSError:
            container, pod = "", ""
    except (OSError, ValueError):
        return None
    return ProcInfo(comm, uid, _user(uid), container, pod)
