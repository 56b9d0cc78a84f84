"""GPU health for the device plugin: which XID errors take a GPU out of service, and the state the plugin's
ListAndWatch streams from. Events come from NVML (kube/nvml.py, XidWatcher) or from a test (Health.xid, .mark).

An XID is the driver's report of an error on a GPU. Most are the application's doing (a bad kernel, an illegal
address) and end only that process: marking the GPU unhealthy for them would let one pod's bug take the GPU away
from every pod on it. Only XIDs that say the GPU itself needs a reset, a reboot or service mark it unhealthy (the
"RESET_GPU", "RESTART_BM" and "CONTACT_SUPPORT" resolutions of NVIDIA's XID catalog):

| XID | what | why it is the GPU's |
| --- | --- | --- |
| 48 | double-bit ECC error | memory returned wrong data: nothing on the GPU can be trusted until it is reset |
| 62 | internal micro-controller halt | the GPU's firmware stopped; it needs a reset |
| 64 | ECC page retirement or row remapping failed | a bad memory row could not be taken out of use |
| 74 | NVLink error | the link between GPUs failed; work spanning them fails |
| 79 | GPU has fallen off the bus | the GPU is gone from PCIe until a reboot |
| 95 | uncontained ECC error | an ECC error reached beyond one process: every process on the GPU is affected |
| 119 | GSP RPC timeout | the GPU system processor stopped answering the driver |
| 120 | GSP error | the GPU system processor failed |
| 140 | unrecovered ECC error | ECC errors the GPU could not recover from |
| 154 | recovery action changed | the driver says the GPU needs a reset, a reboot or a drain |

Left out on purpose: 13, 31, 43, 45 and 68 (application errors, end the process only), 63 (a memory row was
remapped as designed: the remapping takes effect at the next reset) and 94 (a contained ECC error: only the
process using that memory is ended). A GPU once unhealthy stays so until the daemon restarts: these errors do not
clear by themselves."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

HARDWARE_XIDS: dict[int, str] = {
    48: "double-bit ECC error",
    62: "internal micro-controller halt",
    64: "ECC page retirement or row remapping failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
    140: "unrecovered ECC error",
    154: "GPU recovery action changed",
}

HEALTHY = "Healthy"      # the kubelet's words (deviceplugin/v1beta1 constants)
UNHEALTHY = "Unhealthy"


class Health:
    """GPU UUID -> why it is unhealthy (absent: healthy). Listeners are called after every change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unhealthy: dict[str, str] = {}
        self._listeners: list[Callable[[], None]] = []

    def listen(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def xid(self, uuid: str, xid: int) -> bool:
        """An XID on a GPU: True when it made the GPU unhealthy (a hardware XID), False when it is ignored."""
        reason = HARDWARE_XIDS.get(xid)
        if reason is None:
            log.info("GPU %s: XID %d is an application's error: the GPU stays healthy", uuid, xid)
            return False
        self.mark(uuid, f"XID {xid}: {reason}")
        return True

    def mark(self, uuid: str, reason: str | None) -> None:
        """reason None: healthy again (a test, or a GPU back after a reset that the daemon saw)."""
        with self._lock:
            before = self._unhealthy.get(uuid)
            if reason is None:
                self._unhealthy.pop(uuid, None)
            elif before is None:
                self._unhealthy[uuid] = reason
            changed = before != self._unhealthy.get(uuid)
            listeners = list(self._listeners)
        if not changed:
            return
        if reason is None:
            log.warning("GPU %s is healthy again", uuid)
        else:
            log.error("GPU %s is unhealthy: %s: its devices are reported Unhealthy to the kubelet", uuid, reason)
        for callback in listeners:
            callback()

    def state(self, uuid: str) -> str:
        with self._lock:
            return UNHEALTHY if uuid in self._unhealthy else HEALTHY

    def unhealthy(self) -> dict[str, str]:
        with self._lock:
            return dict(self._unhealthy)
