"""The one ledger of processes the daemon stopped, and why, with the quotas set by hand: one state file beside
the socket, written atomically, so that a daemon started after this one was killed continues what it
stopped and keeps its quotas.

A process may be held for several reasons at once (paused by hand and stopped at its quota); it is continued
only when the last one lets go. Recovery at start and "continue everyone" at stop are here and nowhere else.

The file decides whom the daemon signals, so it is trusted only when nobody else could have written it: it is
opened without following a link and read only if it is a regular file owned by root (or the daemon's user)
that group and others cannot write; it is replaced atomically (a new file of an unguessable name made with
O_EXCL in the same directory, synced, renamed over it), never written through."""
from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import signal
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.procfs import proc_stat, send_signal

log = logging.getLogger(__name__)
HAND, QUOTA, SCHEDULER, ROOM, MOVE = "hand", "quota", "scheduler", "room", "move"  # who stopped a process (ROOM:
# the probe, at an allocation that did not fit the device, while the daemon makes room; MOVE: `gpuwatch move`)
VERSION = 2
MAX_BYTES = 16 << 20  # a state file larger than this is not read


@dataclass
class _Held:
    start_time: int          # tells the process from a later one with its pid
    by: set[str] = field(default_factory=set)
    signalled: bool = True   # stopped with SIGSTOP; False: its interposer's gate or the driver's lock holds it
    moved: str = ""          # "locked" or "checkpointed": the driver's checkpoint API holds it (enforcer/checkpointer)
    moved_bytes: int = 0     # what it held on the device when checkpointed: its restore needs that much room
    gpus: list[int] = field(default_factory=list)  # the GPUs it was on
    gpu_bytes: dict[int, int] = field(default_factory=dict)  # of moved_bytes, what each GPU held (empty: unknown)


class Ledger:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._held: dict[int, _Held] = {}
        self._quotas: list[dict[str, Any]] = []
        self._placed: dict[int, tuple[int, dict[int, int]]] = {}  # pid -> (start time, {started on: now on})
        self._lock = threading.RLock()
        self.save_error: str | None = None  # why the last save failed; None: it succeeded (or none was needed)
        self.recovered_moved: list[dict[str, Any]] = []  # entries a previous daemon left to the driver's API

    # start and stop

    def recover(self) -> list[dict[str, Any]]:
        """At start: continue what a previous daemon stopped and could not continue (it was killed); return
        the quotas it had set by hand, which the quota enforcer restores once the probes run."""
        data = self._read()
        for entry in data.get("stopped", []) if isinstance(data.get("stopped"), list) else []:
            try:
                pid, start = int(entry["pid"]), int(entry["start_time"])
            except (KeyError, TypeError, ValueError):
                continue
            if entry.get("moved") in ("locked", "checkpointed"):
                self.recovered_moved.append(entry)  # the driver still holds it: the checkpointer decides
                continue
            if entry.get("signalled", True) is False:
                continue  # an interposed process: its lease lapsed and it resumed by itself
            stat = proc_stat(pid)
            if stat is not None and stat.start_time == start and stat.state in "Tt":
                if send_signal(pid, signal.SIGCONT):
                    log.info("pid %d continued (SIGCONT): a previous daemon stopped it", pid)
        quotas = data.get("quotas", [])
        placed = _placements(data.get("placed"))
        with self._lock:
            self._placed = {pid: (start, gpus) for pid, (start, gpus) in placed.items() if self._same(pid, start)}
            self._quotas = [q for q in quotas if isinstance(q, dict)] if isinstance(quotas, list) else []
            self.save()
            return list(self._quotas)

    def continue_all(self) -> None:
        """The daemon is stopping: nothing it stopped stays stopped."""
        with self._lock:
            held, self._held = self._held, {}
            for pid, h in held.items():
                if h.moved:
                    log.warning("pid %d stays %s by the driver: `gpuwatch resume %d` as root brings it back", pid,
                                h.moved, pid)
                    continue
                stat = proc_stat(pid)
                if h.signalled and stat is not None and stat.start_time == h.start_time and \
                        send_signal(pid, signal.SIGCONT):
                    log.info("pid %d continued (SIGCONT): the daemon is stopping", pid)
            self.save()

    # the record

    def hold(self, pid: int, start_time: int, by: str, signalled: bool = True) -> None:
        """Record that `by` stopped the process: with SIGSTOP (the caller sent or will send it), or through its
        interposer's gate (`signalled` False)."""
        with self._lock:
            h = self._held.get(pid)
            if h is None or h.start_time != start_time:
                h = self._held[pid] = _Held(start_time, signalled=signalled)
            h.by.add(by)
            self.save()

    def moved_on(self, pid: int) -> dict[int, int]:
        """What the driver took from each GPU when it checkpointed the process (empty: not known per GPU)."""
        with self._lock:
            h = self._held.get(pid)
            return dict(h.gpu_bytes) if h is not None else {}

    def moved(self, pid: int) -> tuple[str, int, list[int]]:
        """How the driver holds the process: ("", 0, []) when it does not."""
        with self._lock:
            h = self._held.get(pid)
            return (h.moved, h.moved_bytes, list(h.gpus)) if h is not None else ("", 0, [])

    def set_moved(self, pid: int, moved: str, nbytes: int = 0, gpus: list[int] | None = None,
                  gpu_bytes: dict[int, int] | None = None) -> None:
        with self._lock:
            h = self._held.get(pid)
            if h is not None:
                h.moved, h.moved_bytes = moved, nbytes
                if gpus is not None:
                    h.gpus = list(gpus)
                if gpu_bytes is not None or not moved:
                    h.gpu_bytes = dict(gpu_bytes or {})
                self.save()

    def placement(self, pid: int) -> dict[int, int]:
        """Where `gpuwatch move` put the process: {host GPU it started on: host GPU it is on now}."""
        with self._lock:
            entry = self._placed.get(pid)
            return dict(entry[1]) if entry is not None else {}

    def set_placement(self, pid: int, start_time: int, gpus: dict[int, int]) -> None:
        with self._lock:
            moved = {old: new for old, new in gpus.items() if old != new}
            if moved:
                self._placed[pid] = (start_time, moved)
            else:
                self._placed.pop(pid, None)
            self.save()

    def restore_moved(self, entry: dict[str, Any], by: set[str]) -> None:
        """A previous daemon's driver-held process, taken over as it was."""
        with self._lock:
            self._held[int(entry["pid"])] = _Held(int(entry["start_time"]), set(by), False, str(entry["moved"]),
                                                  int(entry.get("moved_bytes", 0)),
                                                  [int(g) for g in entry.get("gpus", []) if type(g) is int],
                                                  _gpu_map(entry.get("gpu_bytes")))
            self.save()

    def release(self, pid: int, by: str) -> bool:
        """`by` lets go; True when nobody holds the process now and it is still there (the caller continues it)."""
        with self._lock:
            h = self._held.get(pid)
            if h is None:
                return self._same(pid, None)
            h.by.discard(by)
            if h.by:
                return False
            del self._held[pid]
            self.save()
            return self._same(pid, h.start_time)

    def holders(self, pid: int) -> set[str]:
        """Who holds the process now (empty: nobody, or it exited and its pid is another's)."""
        with self._lock:
            h = self._held.get(pid)
            if h is None:
                return set()
            if not self._same(pid, h.start_time):
                del self._held[pid]
                self.save()
                return set()
            return set(h.by)

    def holds(self, pid: int, by: str | None = None) -> bool:
        holders = self.holders(pid)
        return bool(holders) if by is None else by in holders

    def forget(self, pid: int) -> None:
        """The process exited."""
        with self._lock:
            if self._held.pop(pid, None) is not None or self._placed.pop(pid, None) is not None:
                self.save()

    def stopped(self) -> dict[int, set[str]]:
        """Every process held now, with who holds it."""
        with self._lock:
            pids = list(self._held)
        return {pid: by for pid in pids if (by := self.holders(pid))}

    def set_quotas(self, quotas: list[dict[str, Any]]) -> None:
        with self._lock:
            if quotas != self._quotas:
                self._quotas = list(quotas)
                self.save()

    # the file

    @staticmethod
    def _same(pid: int, start_time: int | None) -> bool:
        stat = proc_stat(pid)
        return stat is not None and (start_time is None or stat.start_time == start_time)

    def _read(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else f"cannot be opened ({exc.strerror})"
            log.warning("%s %s: ignored, nothing in it is continued or restored; remove it", self.path, why)
            return {}
        try:
            with os.fdopen(fd, "rb") as f:
                if (problem := unsafe(os.fstat(f.fileno()))) is not None:
                    log.warning("%s %s: ignored, nothing in it is continued or restored; remove it", self.path,
                                problem)
                    return {}
                data = json.loads(f.read(MAX_BYTES))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, ignored: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> bool:
        """Whether the file now holds the record; the last failure's reason stays in save_error (None once a
        save succeeds): commands tell their user that what they changed would not survive a crash."""
        if self.path is None:
            return True
        with self._lock:
            data = {"version": VERSION,
                    "stopped": [{"pid": pid, "start_time": h.start_time, "by": sorted(h.by), "signalled": h.signalled,
                                 "moved": h.moved, "moved_bytes": h.moved_bytes, "gpus": h.gpus,
                                 "gpu_bytes": {str(g): n for g, n in sorted(h.gpu_bytes.items())}}
                                for pid, h in sorted(self._held.items())],
                    "quotas": self._quotas,
                    "placed": [{"pid": pid, "start_time": start, "gpus": {str(o): n for o, n in sorted(gpus.items())}}
                               for pid, (start, gpus) in sorted(self._placed.items())]}
            try:
                self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                write_atomically(self.path, json.dumps(data).encode())
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)
                self.save_error = f"{self.path}: {exc.strerror or exc}"
                return False
            self.save_error = None
            return True


def _gpu_map(value: Any) -> dict[int, int]:
    """{"0": 1, ...} as the file keeps it (JSON keys are strings); anything malformed is left out."""
    if not isinstance(value, dict):
        return {}
    return {int(k): v for k, v in value.items() if isinstance(k, str) and k.isdigit() and type(v) is int and v >= 0}


def _placements(value: Any) -> dict[int, tuple[int, dict[int, int]]]:
    """The file's "placed" list (absent in files of daemons before `gpuwatch move`: nothing was moved)."""
    found: dict[int, tuple[int, dict[int, int]]] = {}
    for entry in value if isinstance(value, list) else []:
        if isinstance(entry, dict) and type(entry.get("pid")) is int and type(entry.get("start_time")) is int and \
                (gpus := _gpu_map(entry.get("gpus"))):
            found[entry["pid"]] = (entry["start_time"], gpus)
    return found


def unsafe(st: os.stat_result) -> str | None:
    """Why a state file with this status cannot be trusted, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid not in (0, os.geteuid()):
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def write_atomically(path: Path, data: bytes) -> None:
    """`path` replaced by a file holding `data`: written under a new, unguessable name in the same directory
    (O_EXCL, no link followed), synced, renamed over it, and the directory synced. OSError when it fails (the
    old file stays as it was)."""
    for _ in range(8):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise OSError(errno.EEXIST, "no free temporary name", str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
