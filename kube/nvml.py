"""NVML for the device plugin: the GPUs it offers (UUID and total memory) and the XID events that make one
unhealthy (kube/health.py says which). Without NVML, or with an NVML that has no events (the test double), the
plugin offers what it was given and health stays as set by hand."""
from __future__ import annotations

import logging
import threading
from typing import Any

from ..core import threads
from .devices import GpuInfo
from .health import Health

log = logging.getLogger(__name__)

WAIT_MS = 1000  # one wait for events; stop() takes effect within this


def open_nvml() -> Any | None:
    """pynvml, initialised; None where there is no NVML (no driver, no library)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception as exc:
        log.warning("NVML not available (%s): the device plugin offers no GPUs", exc)
        return None


def read_gpus(nv: Any) -> list[GpuInfo]:
    """Every GPU NVML shows, in index order; a GPU that cannot be read is left out (logged)."""
    out = []
    for index in range(nv.nvmlDeviceGetCount()):
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = nv.nvmlDeviceGetUUID(h)
            out.append(GpuInfo(uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                               int(nv.nvmlDeviceGetMemoryInfo(h).total), index))
        except nv.NVMLError as exc:
            log.error("GPU %d: NVML cannot read it (%s): not offered to the kubelet", index, exc)
    return out


class XidWatcher:
    """Waits for NVML's critical XID events on every GPU and hands them to Health, on its own thread."""

    def __init__(self, nv: Any, health: Health) -> None:
        self._nv, self._health = nv, health
        self._stop = threading.Event()
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-xid", self._loop, self._stop),
                                        name="gpuwatch-xid", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=WAIT_MS / 1000 + 2)

    def _loop(self) -> None:
        nv = self._nv
        try:
            events = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:  # an NVML without events (the test double): health from XIDs is off
            log.warning("NVML has no events (%s): GPU health is not watched", exc)
            return
        try:
            handles: dict[str, Any] = {}
            for index in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nv.nvmlDeviceGetUUID(h))
                try:
                    nv.nvmlDeviceRegisterEvents(h, nv.nvmlEventTypeXidCriticalError, events)
                    handles[uuid] = h
                except nv.NVMLError as exc:
                    log.warning("GPU %s: XID events not supported (%s): its health is not watched", uuid, exc)
            while handles and not self._stop.is_set():
                try:
                    data = nv.nvmlEventSetWait_v2(events, WAIT_MS)
                except nv.NVMLError_Timeout:
                    continue
                if data.eventType != nv.nvmlEventTypeXidCriticalError:
                    continue
                found = [u for u, h in handles.items() if _same(h, data.device)]
                for uuid in found or list(handles):  # no device named: the driver means all of them
                    self._health.xid(uuid, int(data.eventData))
        finally:
            nv.nvmlEventSetFree(events)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _same(a: Any, b: Any) -> bool:
    """Whether two NVML device handles (ctypes pointers) are one device."""
    try:
        import ctypes
        return bool(b) and ctypes.cast(a, ctypes.c_void_p).value == ctypes.cast(b, ctypes.c_void_p).value
    except (TypeError, ValueError):
        return False
