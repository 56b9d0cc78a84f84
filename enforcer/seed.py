"""What a process held before the probes saw it: a daemon started (or restarted after a crash) while processes
already held device memory counts that memory too, in `ps` and in their quotas, instead of only what they
allocate from its start on.

For a process that was running when the probes attached, on each of its GPUs:
- under the interposer, its page's figure (`used`, less what is swapped out) is exact;
- otherwise NVML's figure less a CUDA context (`[scheduler] context_mib`) is an estimate (NVML also counts the
  context, and modules loaded since), marked `device_bytes_estimated` in the view.
The seed is that figure less what the probes counted since they attached, never below zero. It is taken at
the daemon's start from one reading, and for a process first seen later once two readings a run apart agree
(an allocation in flight is never counted twice). Afterwards it only shrinks, on agreeing readings: the
process freed memory it held before, which the probes cannot match. A page's seed replaces NVML's estimate,
and goes with the page. probes/seeds.py keeps the seeds in BPF; the exit probe drops them."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..core import threads
from ..core.procfs import proc_stat, uptime_ticks
from ..core.view import Gpu
from ..probes.model import ProbeFacts
from .records import Enforcement

log = logging.getLogger(__name__)
SEED_INTERVAL_S = 1.0  # how often the daemon looks again (readings a run apart must agree)

Resolve = Callable[[int, int, list[Gpu], dict[tuple[int, int], str]], tuple[int | None, str | None]]


class SeedMaps(Protocol):
    """probes/seeds.py"""

    def set(self, pid: int, ordinal: int, nbytes: int, estimated: bool) -> None: ...
    def hint_device(self, pid: int, ordinal: int) -> None: ...


@dataclass(frozen=True)
class _Seed:
    nbytes: int
    page: bool  # from the interposer's page (exact); else NVML's figure less a context (an estimate)


class Seeder:
    """Started by the daemon once the probes are attached; then on its own thread every SEED_INTERVAL_S."""

    def __init__(self, maps: SeedMaps, resolve: Resolve, context_bytes: int, facts: Callable[[], ProbeFacts],
                 pages: Callable[[], Mapping[int, Enforcement]]) -> None:
        self.maps, self.resolve, self.context_bytes = maps, resolve, context_bytes
        self._facts, self._pages = facts, pages
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since: int | None = None  # the probes were attached at this start_time (clock ticks since boot)
        self._seeds: dict[tuple[int, int], _Seed] = {}
        self._last: dict[tuple[int, int], tuple[int, int, bool]] = {}  # the previous run's reading
        self._hinted: dict[int, int] = {}  # pid -> its start time: told its one GPU

    def start(self) -> None:
        """What the processes running now held before the probes attached (one reading), then a look again
        every SEED_INTERVAL_S (interposers reconnect, processes free, NVML lists a process later)."""
        self._since = uptime_ticks()
        try:
            self.run(self._facts(), {}, first=True)
        except Exception:  # counting what was held before is worth a log line, never the daemon's start
            log.exception("what running processes held before the probes attached is not counted")
        self._thread = threads.start("gpuwatch-seed", self._loop, self._stop)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _loop(self) -> None:
        while not self._stop.wait(SEED_INTERVAL_S):
            self.run(self._facts(), self._pages())

    def run(self, facts: ProbeFacts, pages: Mapping[int, Enforcement], first: bool = False) -> None:
        if self._since is None:
            return
        starts: dict[int, int | None] = {}

        def before(pid: int) -> bool:
            """Running when the probes attached (not a later process with its pid)."""
            if pid not in starts:
                stat = proc_stat(pid)
                starts[pid] = stat.start_time if stat is not None and stat.start_time <= (self._since or 0) else None
            return starts[pid] is not None

        counted: dict[tuple[int, int], int] = {}
        for row in facts.rows:
            key = (row.pid, row.ordinal)
            counted[key] = counted.get(key, 0) + row.device_bytes - row.seeded_bytes
        figures = self._figures(facts, pages, before)
        gpus_of: dict[int, list[int]] = {}
        for pid, ordinal in figures:
            gpus_of.setdefault(pid, []).append(ordinal)
        for (pid, ordinal), (figure, page) in figures.items():
            one_gpu = len(gpus_of[pid]) == 1
            # allocations on no known device are this one's where the process has one GPU
            probes = counted.get((pid, ordinal), 0) + (counted.get((pid, -1), 0) if one_gpu else 0)
            self._decide((pid, ordinal), figure, probes, page, first)
            if one_gpu and self._hinted.get(pid) != starts[pid]:
                self._hinted[pid] = starts[pid] or 0
                self.maps.hint_device(pid, ordinal)
        for key, seed in list(self._seeds.items()):
            pid = key[0]
            if not before(pid):  # it exited (its exit probe dropped the seed), or the pid is another's
                del self._seeds[key]
                self._last.pop(key, None)
            elif seed.page and pid not in pages:  # its interposer went: so does what its page said
                self._set(key, 0, page=True)
                del self._seeds[key]
                self._last.pop(key, None)
        self._hinted = {pid: start for pid, start in self._hinted.items() if before(pid) and starts[pid] == start}

    def _figures(self, facts: ProbeFacts, pages: Mapping[int, Enforcement],
                 before: Callable[[int], bool]) -> dict[tuple[int, int], tuple[int, bool]]:
        """(pid, ordinal) -> (what it holds there, from its page): pages first, NVML for the others."""
        figures: dict[tuple[int, int], tuple[int, bool]] = {}
        for pid, e in pages.items():
            if not e.interposed or not before(pid):
                continue
            for d in e.devices:
                resident = d.swappable_bytes + d.unswappable_bytes - d.swapped_bytes
                if d.in_use or (pid, d.ordinal) in self._seeds:
                    figures[(pid, d.ordinal)] = (max(resident, 0), True)
        for (pid, index), used in facts.nvml_bytes.items():
            if pid in pages or not before(pid):
                continue
            ordinal = self._ordinal(pid, index, facts)
            if ordinal is not None:
                figures[(pid, ordinal)] = (max(used - self.context_bytes, 0), False)
        return figures

    def _ordinal(self, pid: int, index: int, facts: ProbeFacts) -> int | None:
        """The process's device ordinal of host GPU `index` (its CUDA_VISIBLE_DEVICES, or what it asked)."""
        for ordinal in range(max(len(facts.nvml_gpus), 1)):  # a process sees at most the host's GPUs
            if self.resolve(pid, ordinal, facts.nvml_gpus, facts.uuids)[0] == index:
                return ordinal
        return None

    def _decide(self, key: tuple[int, int], figure: int, probes: int, page: bool, first: bool) -> None:
        target = max(figure - probes, 0)
        reading = (figure, probes, page)
        agreed, self._last[key] = self._last.get(key) == reading, reading
        seed = self._seeds.get(key)
        if seed is None or seed.page != page:
            if agreed or (first and seed is None):
                self._set(key, target, page)
        elif agreed and target < seed.nbytes:
            self._set(key, target, page)  # it freed memory it held before the probes saw it

    def _set(self, key: tuple[int, int], nbytes: int, page: bool) -> None:
        seed = self._seeds.get(key)
        if seed is None or seed.nbytes != nbytes or seed.page != page:
            pid, ordinal = key
            self.maps.set(pid, ordinal, nbytes, not page)
            if nbytes != (seed.nbytes if seed is not None else 0):
                log.info("pid %d held %d bytes on its device %d before the probes saw it (%s)", pid, nbytes,
                         ordinal, "its interposer's page" if page else "NVML's figure less a context: an estimate")
        self._seeds[key] = _Seed(nbytes, page)
