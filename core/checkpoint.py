"""The driver's process checkpoint API (r570 and later), called from another process: lock a process's CUDA
calls, checkpoint its device memory into host memory, restore it and unlock it. The daemon moves plain
processes with it; `gpuwatch resume` calls it itself where no daemon runs.

Every call blocks until the driver answers (a checkpoint of 20 GiB takes about 10 s on the H200): ctypes lets
go of the GIL meanwhile."""
from __future__ import annotations

import ctypes
from typing import Any

from .vocabulary import CHECKPOINTED, RUNNING

LOCKED, FAILED = "locked", "failed"
PROCESS_STATES = (RUNNING, LOCKED, CHECKPOINTED, FAILED)  # CUprocessState's numbering
TIMEOUT = 909  # CUDA_ERROR_TIMEOUT: a lock that did not get the process's calls in time
OUT_OF_MEMORY = 2
FUNCTIONS = ("cuCheckpointProcessGetState", "cuCheckpointProcessLock", "cuCheckpointProcessCheckpoint",
             "cuCheckpointProcessRestore", "cuCheckpointProcessUnlock")


class _LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


class _Reserved(ctypes.Structure):  # the checkpoint and unlock arguments
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class _Uuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_char * 16)]


class GpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", _Uuid), ("newUuid", _Uuid)]


class _RestoreArgs(ctypes.Structure):
    _fields_ = [("gpuPairs", ctypes.POINTER(GpuPair)), ("gpuPairsCount", ctypes.c_uint),
                ("reserved", ctypes.c_char * 44), ("reserved1", ctypes.c_uint64)]


class CheckpointError(Exception):
    """The driver refused: `code` is its CUresult, `name` the code's name, `call` what was asked."""

    def __init__(self, call: str, code: int, name: str, text: str) -> None:
        super().__init__(f"{call}: {name} ({text})")
        self.call, self.code, self.name, self.text = call, code, name, text


class Driver:
    """The checkpoint API of one driver library. `why_not` says why it cannot be used (None: it can)."""

    def __init__(self, path: str) -> None:
        self.path, self.why_not = path, None
        self._lib: Any = None
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            self.why_not = f"cannot load the driver {path}: {exc}"
            return
        missing = [name for name in FUNCTIONS if not hasattr(lib, name)]
        if missing:
            self.why_not = f"the driver {path} has no checkpoint API ({missing[0]} is missing: it needs r570 or later)"
            return
        self._lib = lib
        try:
            self._call("cuInit", lib.cuInit, ctypes.c_uint(0))
        except CheckpointError as exc:
            self._lib, self.why_not = None, f"the driver {path} did not initialise: {exc}"

    @property
    def available(self) -> bool:
        return self._lib is not None

    def state(self, pid: int) -> str:
        value = ctypes.c_int(-1)
        self._call("cuCheckpointProcessGetState", self._lib.cuCheckpointProcessGetState, pid, ctypes.byref(value))
        return PROCESS_STATES[value.value] if 0 <= value.value < len(PROCESS_STATES) else f"state {value.value}"

    def lock(self, pid: int, timeout_ms: int) -> None:
        args = _LockArgs(timeoutMs=timeout_ms)
        self._call("cuCheckpointProcessLock", self._lib.cuCheckpointProcessLock, pid, ctypes.byref(args))

    def checkpoint(self, pid: int) -> None:
        self._call("cuCheckpointProcessCheckpoint", self._lib.cuCheckpointProcessCheckpoint, pid,
                   ctypes.byref(_Reserved()))

    def restore(self, pid: int, pairs: list[tuple[bytes, bytes]] | None = None) -> None:
        """pairs: (old UUID, new UUID) of every GPU the driver sees, to restore onto other GPUs (r580)."""
        args = _RestoreArgs()
        if pairs:
            array = (GpuPair * len(pairs))(*[GpuPair(_Uuid(old), _Uuid(new)) for old, new in pairs])
            args.gpuPairs, args.gpuPairsCount = ctypes.cast(array, ctypes.POINTER(GpuPair)), len(pairs)
        self._call("cuCheckpointProcessRestore", self._lib.cuCheckpointProcessRestore, pid, ctypes.byref(args))

    def uuids(self) -> list[bytes]:
        """The 16-byte UUID of every GPU this driver sees (in the daemon: every GPU of the host)."""
        count = ctypes.c_int(0)
        self._call("cuDeviceGetCount", self._lib.cuDeviceGetCount, ctypes.byref(count))
        get = getattr(self._lib, "cuDeviceGetUuid_v2", None) or self._lib.cuDeviceGetUuid
        found = []
        for ordinal in range(count.value):
            uuid = _Uuid()
            self._call("cuDeviceGetUuid", get, ctypes.byref(uuid), ordinal)
            found.append(bytes(uuid))  # all 16 bytes: `.bytes` would stop at a zero byte
        return found

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", self._lib.cuCheckpointProcessUnlock, pid,
                   ctypes.byref(_Reserved()))

    def _call(self, name: str, function: Any, *args: Any) -> None:
        if self._lib is None:
            raise CheckpointError(name, -1, "unavailable", self.why_not or "no driver")
        function.restype = ctypes.c_int
        code = function(*args)
        if code != 0:
            raise CheckpointError(name, code, *self._describe(code))

    def _describe(self, code: int) -> tuple[str, str]:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        lib = self._lib
        if lib is None or not hasattr(lib, "cuGetErrorName") or lib.cuGetErrorName(code, ctypes.byref(name)) != 0:
            return f"CUresult {code}", "no description"
        if not hasattr(lib, "cuGetErrorString") or lib.cuGetErrorString(code, ctypes.byref(text)) != 0:
            return (name.value or b"?").decode(errors="replace"), "no description"
        return (name.value or b"?").decode(errors="replace"), (text.value or b"?").decode(errors="replace")
