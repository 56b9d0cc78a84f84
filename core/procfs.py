"""The one reader of /proc: a process's command, user, container or Kubernetes pod, run state, cgroup,
namespace pids and environment. Every function returns None (or empty) for a process that is gone."""
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
    namespace: str = ""      # Kubernetes' names of its pod and container, as the daemon resolved them
    pod: str = ""
    container: str = ""


def container_of(cgroup_text: str) -> tuple[str, str]:
    """(container ID, pod UID) from /proc/PID/cgroup: Docker, containerd, CRI-O and Kubernetes paths
    (cgroup v1 and v2, cgroupfs and systemd drivers). Empty strings for a process on the host."""
    container = pod = ""
    for line in cgroup_text.splitlines():
        path = line.split(":", 2)[-1]
        if not container and (ids := _CONTAINER.findall(path)):
            container = ids[-1]
        if not pod and (found := _POD.search(path)):
            pod = found.group(1).replace("_", "-")
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
        uid = real_uid(pid, (base / "status").read_text())
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


def real_uid(pid: int, status_text: str | None = None) -> int | None:
    """The first of /proc/PID/status Uid:."""
    try:
        text = status_text if status_text is not None else Path(f"/proc/{pid}/status").read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("Uid:")), None)
    except (OSError, ValueError, IndexError):
        return None


def namespace_pids(pid: int) -> set[int]:
    """The pids a process has, ours and (in a pid namespace, as in a container) its own getpid()."""
    pids = {pid}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                pids.add(int(line.split()[-1]))
    except (OSError, ValueError):
        pass
    return pids


def cgroup_of(cgroup_text: str) -> str | None:
    """The cgroup v2 path in /proc/PID/cgroup's text ("0::/a/b" -> "/a/b"); None: no v2 line."""
    return next((line[3:].removesuffix(" (deleted)") for line in cgroup_text.splitlines()
                 if line.startswith("0::")), None)


def process_cgroup(pid: int) -> str | None:
    """A process's cgroup v2 path, as /proc/PID/cgroup shows it."""
    try:
        return cgroup_of(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts)."""
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                fields = left.split()
                if fields[3] == "/":
                    return Path(fields[4].replace("\\040", " "))
    except (OSError, IndexError):
        pass
    return None


def visible_devices(pid: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES in the process's environment at exec, split; None: not set or not readable."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"CUDA_VISIBLE_DEVICES="):
            return [d.strip() for d in item.split(b"=", 1)[1].decode(errors="replace").split(",") if d.strip()]
    return None


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T), not traced."""
    stat = proc_stat(pid)
    return stat is not None and stat.state == "T"


def pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def uptime_ticks() -> int:
    """Now, in the unit and from the origin of a process's start_time: clock ticks since boot."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


@dataclass(frozen=True)
class ProcessRecord:
    """Everything a rule may look at, read at one moment."""
    comm: str
    state: str
    flags: int
    start_time: int
    uid: int | None
    cgroup_text: str
    exe: str          # empty: not readable
    cmdline: str      # arguments joined with spaces


def read_record(pid: int) -> ProcessRecord | None:
    """None when the process is gone (or a zombie): a vanishing process is never an error."""
    base = Path(f"/proc/{pid}")
    try:
        stat = (base / "stat").read_text()
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = _after_comm(stat)
        if fields[0] in "ZX":
            return None
        uid = real_uid(pid, (base / "status").read_text())
        try:
            cgroup_text = (base / "cgroup").read_text()
        except FileNotFoundError:
            raise
        except OSError:
            cgroup_text = ""
        cmdline = (base / "cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    try:
        exe = os.readlink(base / "exe").removesuffix(" (deleted)")
    except OSError:
        exe = ""
    return ProcessRecord(comm, fields[0], int(fields[6]), int(fields[19]), uid, cgroup_text, exe,
                         cmdline.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace"))


def maps_text(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes: MemTotal, MemAvailable, ..."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def cgroup_memory_headroom(pid: int) -> tuple[int, int] | None:
    """(bytes the process's memory cgroup and every cgroup above it can still charge, the tightest limit):
    pinned memory is charged to the cgroup of the process that pins it. None: no limit anywhere (or no
    cgroup v2)."""
    root, path = cgroup2_root(), process_cgroup(pid)
    if root is None or path is None:
        return None
    best: tuple[int, int] | None = None
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), 0, -1):
        directory = root.joinpath(*parts[:depth])
        try:
            limit = (directory / "memory.max").read_text().strip()
            current = int((directory / "memory.current").read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and (best is None or int(limit) - current < best[0]):
            best = (max(int(limit) - current, 0), int(limit))
    return best


def send_signal(pid: int, sig: int) -> bool:
    """False when the process is gone: a vanishing process is never an error."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
