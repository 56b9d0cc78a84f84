"""Finding every libcuda.so.1 in use: the host's and any copy a process maps (containers, compat)."""
from __future__ import annotations

import glob
import os
import subprocess
from dataclasses import dataclass

from ..core.procfs import maps_text

DRIVER_DIRS = [
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
    "/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/wsl/lib",
    "/run/nvidia/driver/usr/lib/x86_64-linux-gnu", "/usr/local/cuda/compat",
]
LIB_PREFIX = "libcuda.so"


@dataclass(frozen=True)
class Library:
    """One driver library file, identified by inode: a uprobe on it covers every process mapping it."""
    path: str        # a path this process can open (for a container's copy: via /proc/PID/root)
    dev: int
    ino: int

    @property
    def key(self) -> tuple[int, int]:
        return (self.dev, self.ino)


def _library(path: str) -> Library | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):
        return None
    return Library(path=os.path.realpath(path) if not path.startswith("/proc/") else path,
                   dev=st.st_dev, ino=st.st_ino)


def _is_stub(path: str) -> bool:
    return "/stubs/" in path


def host_libraries() -> list[Library]:
    """The host's driver: what ldconfig knows plus the usual driver directories."""
    candidates: list[str] = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
        candidates += [line.split("=>")[-1].strip() for line in out.splitlines() if LIB_PREFIX in line]
    except (OSError, subprocess.SubprocessError):
        pass
    for d in DRIVER_DIRS:
        candidates += glob.glob(os.path.join(d, LIB_PREFIX + "*"))
    return _unique(c for c in candidates if not _is_stub(c))


def process_libraries(pid: int) -> list[Library]:
    """Driver libraries mapped by one process, opened through its root (works across mount namespaces)."""
    text = maps_text(pid)
    if text is None:
        return []
    root = "" if _shares_our_root(pid) else f"/proc/{pid}/root"
    paths = set()
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.basename(parts[5]).startswith(LIB_PREFIX):
            paths.add(root + parts[5].removesuffix(" (deleted)"))
    return _unique(p for p in paths if not _is_stub(p))


def _shares_our_root(pid: int) -> bool:
    try:
        theirs, ours = os.stat(f"/proc/{pid}/root/"), os.stat("/")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def all_process_libraries() -> list[Library]:
    found: list[Library] = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            found += process_libraries(int(entry.name))
    return _unique_libs(found)


def _unique(paths) -> list[Library]:
    return _unique_libs(lib for lib in map(_library, paths) if lib is not None)


def _unique_libs(libs) -> list[Library]:
    seen: dict[tuple[int, int], Library] = {}
    for lib in libs:
        seen.setdefault(lib.key, lib)
    return list(seen.values())
