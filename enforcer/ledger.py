"""The one ledger of processes the daemon stopped, and why, with the quotas set by hand: one state file beside
the socket, written atomically, so that a daemon started after this one was killed continues what it
stopped and keeps its quotas.

A process may be held for several reasons at once (paused by hand and stopped at its quota); it is continued
only when the last one lets go. Recovery at start and "continue everyone" at stop are here and nowhere else."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.procfs import proc_stat, send_signal

log = logging.getLogger(__name__)
HAND, QUOTA, SCHEDULER = "hand", "quota", "scheduler"  # who stopped a process
VERSION = 2


@dataclass
class _Held:
    start_time: int          # tells the process from a later one with its pid
    by: set[str] = field(default_factory=set)
    signalled: bool = True   # stopped with SIGSTOP; False: its interposer's gate holds it (the lease ends that)


class Ledger:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._held: dict[int, _Held] = {}
        self._quotas: list[dict[str, Any]] = []
        self._lock = threading.RLock()

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
            if entry.get("signalled", True) is False:
                continue  # an interposed process: its lease lapsed and it resumed by itself
            stat = proc_stat(pid)
            if stat is not None and stat.start_time == start and stat.state in "Tt":
                if send_signal(pid, signal.SIGCONT):
                    log.info("pid %d continued (SIGCONT): a previous daemon stopped it", pid)
        quotas = data.get("quotas", [])
        with self._lock:
            self._quotas = [q for q in quotas if isinstance(q, dict)] if isinstance(quotas, list) else []
            self.save()
            return list(self._quotas)

    def continue_all(self) -> None:
        """The daemon is stopping: nothing it stopped stays stopped."""
        with self._lock:
            held, self._held = self._held, {}
            for pid, h in held.items():
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
            if self._held.pop(pid, None) is not None:
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
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable, ignored: %s", self.path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            data = {"version": VERSION,
                    "stopped": [{"pid": pid, "start_time": h.start_time, "by": sorted(h.by), "signalled": h.signalled}
                                for pid, h in sorted(self._held.items())],
                    "quotas": self._quotas}
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                with open(tmp, "w") as f:
                    json.dump(data, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except OSError as exc:
                log.warning("cannot write %s: %s", self.path, exc)
