"""Each process's CUDA context: device memory NVML shows a process hold beyond what the probes saw it allocate
(the context itself, the driver's own buffers). A quota bounds everything a process holds on the GPU, so the
context counts against it: in its quota group's base for the probes (probes/quotamaps.py), and taken off the limit
its interposer enforces (enforcer/policy.py).

Where NVML lists the process on a GPU the context is NVML's bytes less the traced ones (the view's
`untracked_bytes`); where NVML runs but does not list it, `[scheduler] context_mib`; without NVML nothing is known
and nothing is counted."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ..core import threads
from ..probes.model import ProbeFacts
from .view import Resolve

log = logging.getLogger(__name__)

LEARN_EVERY_S = 1.0

Contexts = dict[int, dict[int, int]]  # pid -> device ordinal -> context bytes


def learn_contexts(facts: ProbeFacts, resolve: Resolve, default_bytes: int) -> Contexts:
    """The context of every process the probes see on a GPU, per device ordinal; empty without NVML."""
    if not facts.nvml_gpus:
        return {}
    traced: dict[tuple[int, int | None], int] = {}
    index_of: dict[tuple[int, int], int | None] = {}
    for row in facts.rows:
        if row.ordinal < 0:
            continue
        index = resolve(row.pid, row.ordinal, facts.nvml_gpus, facts.uuids)[0]
        index_of[(row.pid, row.ordinal)] = index
        traced[(row.pid, index)] = traced.get((row.pid, index), 0) + row.device_bytes
    contexts: Contexts = {}
    counted: set[tuple[int, int | None]] = set()
    for (pid, ordinal), index in sorted(index_of.items()):
        if (pid, index) in counted:
            continue  # two ordinals of one GPU: its context once
        counted.add((pid, index))
        nvml = facts.nvml_bytes.get((pid, index)) if index is not None else None
        context = max(nvml - traced[(pid, index)], 0) if nvml is not None else default_bytes
        contexts.setdefault(pid, {})[ordinal] = context
    return contexts


def largest(per_ordinal: dict[int, int] | None) -> int:
    """What an interposer, whose quota is one figure for every GPU, takes off it."""
    return max(per_ordinal.values(), default=0) if per_ordinal else 0


class ContextLearner:
    """Learns the contexts every LEARN_EVERY_S on a thread of its own and hands them to `sinks`; `each_round`
    are other callbacks that want the same pace (a pod's quota the kubelet had not listed yet)."""

    def __init__(self, facts: Callable[[], ProbeFacts], resolve: Resolve, default_bytes: Callable[[], int],
                 sinks: Iterable[Callable[[Contexts], Any]] = ()) -> None:
        self._facts, self._resolve, self._default = facts, resolve, default_bytes
        self.sinks = list(sinks)
        self.each_round: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self._nvml = False  # whether the last round had NVML
        self._traced: dict[int, int] = {}   # pid -> what the probes saw it hold, last round
        self._settled: dict[int, int] = {}  # pid -> its context, learnt while its allocations stood still
        self._stop = threading.Event()
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-contexts", self._loop, self._stop),
                                        name="gpuwatch-contexts", daemon=True)

    def expected(self, pid: int) -> int:
        """What an interposer takes off its quota: the process's largest context, learnt in a round when what
        the probes saw it hold had not changed since the round before; until then (a process that attached a
        moment ago and allocates at once) the default, where NVML runs at all. NVML is read every 0.25 s: while
        a process allocates, NVML's figure lags the probes' and the difference is no context (on the H200, 0)."""
        with self._lock:
            settled, nvml = self._settled.get(pid), self._nvml
        return settled if settled is not None else self._default() if nvml else 0

    def start(self) -> None:
        """A first round at once: a process that attaches in the first second gets its limit from it (whether
        NVML runs, so whether a context is taken off)."""
        self.learn_once()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def learn_once(self) -> Contexts:
        facts = self._facts()
        contexts = learn_contexts(facts, self._resolve, self._default())
        traced: dict[int, int] = {}
        for row in facts.rows:
            traced[row.pid] = traced.get(row.pid, 0) + row.device_bytes
        with self._lock:
            still = {pid for pid in contexts if traced.get(pid) == self._traced.get(pid)}
            self._settled = {pid: largest(c) if pid in still else self._settled[pid] for pid, c in contexts.items()
                             if pid in still or pid in self._settled}
            self._nvml, self._traced = bool(facts.nvml_gpus), traced
        for sink in self.sinks:
            sink(contexts)
        return contexts

    def _loop(self) -> None:
        while not self._stop.wait(LEARN_EVERY_S):
            self.learn_once()
            for callback in self.each_round:
                callback()
