"""NVML, where the host has it: the GPUs, and what the driver says each process holds."""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Any

from ..core import threads
from ..core.view import Gpu

log = logging.getLogger(__name__)


class Nvml:
    def __init__(self, pynvml: Any) -> None:
        self._nv = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    @classmethod
    def open(cls) -> Nvml | None:
        try:
            import pynvml
            pynvml.nvmlInit()
            return cls(pynvml)
        except Exception as exc:  # no library, no driver, no device: NVML is optional
            log.info("NVML not available (%s): reporting traced bytes only", exc)
            return None

    def gpus(self) -> list[Gpu]:
        nv, out = self._nv, []
        for index, h in enumerate(self._handles):
            gpu = Gpu(index=index)
            try:
                gpu.uuid = _text(nv.nvmlDeviceGetUUID(h))
                gpu.name = _text(nv.nvmlDeviceGetName(h))
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                gpu.memory_total, gpu.memory_used = int(mem.total), int(mem.used)
                gpu.utilization = int(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except nv.NVMLError as exc:
                log.debug("NVML query of GPU %d failed: %s", index, exc)
            out.append(gpu)
        return out

    def process_bytes(self) -> dict[tuple[int, int], int]:
        """(pid, GPU index) -> used device memory, as NVML sees it."""
        nv, out = self._nv, dict[tuple[int, int], int]()
        for index, h in enumerate(self._handles):
            for query in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = query(h)
                except nv.NVMLError:
                    continue
                for p in procs:
                    used = p.usedGpuMemory
                    if used is not None and used >= 0:
                        out[(int(p.pid), index)] = max(out.get((int(p.pid), index), 0), int(used))
        return out


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


NVML_INTERVAL_S = 0.25  # NVML is read this often on its own thread, never on the scheduler's tick


class NvmlSampler:
    """The latest NVML reading, refreshed on its own thread."""

    def __init__(self, nvml: Nvml, interval: float = NVML_INTERVAL_S) -> None:
        self._nvml, self._interval = nvml, interval
        self._latest: tuple[list[Gpu], dict[tuple[int, int], int]] = ([], {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-nvml", self._loop, self._stop),
                                        name="gpuwatch-nvml", daemon=True)

    def start(self) -> None:
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def sample(self) -> None:
        try:
            self._latest = (self._nvml.gpus(), self._nvml.process_bytes())
        except Exception as exc:  # a driver hiccup must not end the sampling
            log.debug("NVML reading failed: %s", exc)

    def latest(self) -> tuple[list[Gpu], dict[tuple[int, int], int]]:
        """GPUs (fresh copies: callers may change them) and (pid, GPU index) -> bytes."""
        gpus, used = self._latest
        return [replace(g) for g in gpus], dict(used)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()
