"""What /proc says about a process: its command, user, container or Kubernetes pod, and its run state."""
from __future__ import annotations

import os
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


PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class ProcStat:
    state: str  # R, S, T, Z, ...
    flags: int
    start_time: int  # clock ticks after boot: tells a process from a later one with the same pid


def _after_comm(text: str) -> list[str]:
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces and parens


def proc_stat(pid: int) -> ProcStat | None:
    try:
        fields = _after_comm(Path(f"/proc/{pid}/stat").read_text())
        return ProcStat(fields[0], int(fields[6]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def thread_states(pid: int) -> list[str] | None:
    """The run state of each of a process's threads (its main thread may have exited); None: gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            states.append(_after_comm(Path(f"/proc/{pid}/task/{tid}/stat").read_text())[0])
        except (OSError, ValueError, IndexError):
            continue
    return states
