"""`gpuwatch resume PID` where no daemon runs: the driver's checkpoint API called from here, as root, to bring
back a process a daemon left locked or checkpointed (the README's recovery by hand). A restore is asked for
only when NVML shows room for all the process held (the state file beside the socket says how much and on
which GPUs): a restore that fails for lack of memory can leave the process stuck for good."""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from ..core.checkpoint import LOCKED, CheckpointError, Driver
from ..core.vocabulary import CHECKPOINTED, DEFAULT_CONFIG, RUNNING, STATE_FILE_NAME, GiB, human_bytes

MARGIN = GiB  # beside what the process held, as the daemon's reserve (at most 1/16 of the GPU)


class RecoverError(Exception):
    """One line: why the process was not brought back, and what to do."""


def resume_without_daemon(pid: int, socket: str, config: str = DEFAULT_CONFIG, force: bool = False) -> str:
    """Restore (where it is checkpointed and there is room, or `force`) and unlock; returns what happened."""
    if os.geteuid() != 0:
        raise RecoverError("no daemon answers, and only root may call the driver's checkpoint API for another "
                           "process: run it as root")
    driver = Driver(_driver_path(config))
    if not driver.available:
        raise RecoverError(f"no daemon answers and {driver.why_not}")
    try:
        state = driver.state(pid)
    except CheckpointError as exc:
        raise RecoverError(f"pid {pid}: the driver cannot say its state ({exc}): no process of that pid uses "
                           "CUDA, or it has exited") from None
    if state == RUNNING:
        return "running (the driver does not hold it)"
    try:
        if state == CHECKPOINTED:
            held, gpus = _recorded(pid, socket)
            if not force:
                _check_room(held, gpus)
            driver.restore(pid)
            state = LOCKED
        if state == LOCKED:
            driver.unlock(pid)
    except CheckpointError as exc:
        raise RecoverError(f"pid {pid}: {exc}") from None
    return "running (restored and unlocked by this command: no daemon answered)"


def _driver_path(config: str) -> str:
    try:
        with open(config, "rb") as f:
            daemon = tomllib.loads(f.read(1 << 20).decode()).get("daemon", {})
    except (OSError, ValueError):
        daemon = {}
    path = daemon.get("driver") if isinstance(daemon, dict) else None
    return path if isinstance(path, str) and path.startswith("/") else "libcuda.so.1"


def _recorded(pid: int, socket: str) -> tuple[int, list[int]]:
    """What the daemon recorded the process held when it checkpointed it, and on which GPUs (0, []: unknown)."""
    try:
        data: Any = json.loads((Path(socket).parent / STATE_FILE_NAME).read_bytes()[:16 << 20])
        entry = next(e for e in data.get("stopped", []) if isinstance(e, dict) and e.get("pid") == pid)
        return int(entry.get("moved_bytes", 0)), [int(g) for g in entry.get("gpus", [])]
    except (OSError, ValueError, TypeError, StopIteration, AttributeError):
        return 0, []


def _check_room(held: int, gpus: list[int]) -> None:
    try:
        import pynvml  # only here: the rest of the client never loads NVML
        pynvml.nvmlInit()
        try:
            memory = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i))
                      for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVMLError, or no pynvml: nothing tells whether the restore fits
        raise RecoverError(f"cannot tell from NVML whether the GPU has room for the restore ({exc}); a restore "
                           "without room can leave the process stuck: free memory first, or --force") from None
    where = [memory[g] for g in gpus if 0 <= g < len(memory)] or memory
    free = min((m.free for m in where), default=0)
    need = held + min(MARGIN, min((m.total for m in where), default=0) // 16)
    if not held:
        raise RecoverError("the state file does not say how much the process held, so whether its restore fits "
                           "is unknown: --force restores anyway")
    if not where or free < need:
        raise RecoverError(f"the GPU has {human_bytes(free)} free, the restore needs "
                           f"{human_bytes(need)} ({human_bytes(held)} and a margin): free memory first, or --force")
