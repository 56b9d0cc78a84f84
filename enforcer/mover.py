"""`gpuwatch move PID --to GPU`: a process not under the interposer moves to another GPU of the host with the
driver's checkpoint API (r580): locked, checkpointed, restored onto the target with gpuPairs, unlocked. Its own
device ordinal stays the same; the ledger records where it went, so that the view shows its new GPU (after a
daemon restart too).

gpuPairs: the driver's reference asks for every checkpointed GPU, and restores onto another GPU failed on r580
with fewer (NVIDIA/cuda-checkpoint issue 35), so the pairs name every GPU the driver sees as a permutation: the
source onto the target, the target onto the source, every other GPU onto itself."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..core.checkpoint import RUNNING
from ..core.procfs import proc_stat
from ..core.protocol import ControlError
from ..core.view import Gpu
from ..core.vocabulary import human_bytes
from ..probes.devices import uuid_bytes
from .ledger import MOVE, SCHEDULER
from .pause import Pauser, Room

log = logging.getLogger(__name__)


class Mover:
    def __init__(self, pauser: Pauser, gpus: Callable[[], list[Gpu]], free: Callable[[], dict[int, int]],
                 room: Room, interposed: Callable[[int], bool]) -> None:
        """gpus: the host's GPUs (NVML); free: what each GPU can still give beside its processes and the
        reserve; room: whether GPUs have room for a restore now; interposed: whether a pid runs the interposer."""
        self.pauser, self.gpus, self.free, self.room, self.interposed = pauser, gpus, free, room, interposed

    def move(self, pid: int, to: int | str) -> dict[str, Any]:
        """Move the process onto GPU `to` (host index or UUID); ControlError, with the process untouched, where
        it cannot be."""
        stat = proc_stat(pid)
        if stat is None:
            raise ControlError(f"no process with pid {pid}")
        checkpointer, ledger = self.pauser.checkpointer, self.pauser.ledger
        if self.interposed(pid):
            raise ControlError(f"pid {pid} runs under gpuwatch exec: moving an interposed process to another GPU is "
                               "not done (the README says what it would need)")
        if not checkpointer.usable():
            raise ControlError(f"pid {pid} cannot be moved: {checkpointer.status()['why_not']}")
        if not checkpointer.movable(pid):
            raise ControlError(f"pid {pid} cannot be moved: {checkpointer.unmovable(pid)}")
        if holders := ledger.holders(pid):
            raise ControlError(f"pid {pid} is held ({', '.join(sorted(holders))}): resume it before moving it")
        gpus = self.gpus()
        target = _gpu(to, gpus)
        nbytes, on_gpus = self.pauser.describe(pid)
        if not on_gpus:
            raise ControlError(f"pid {pid} holds nothing on a GPU the daemon knows: there is nothing to move")
        if len(on_gpus) > 1:
            raise ControlError(f"pid {pid} uses GPUs {', '.join(map(str, sorted(on_gpus)))}: only a process on one "
                               "GPU is moved")
        (source,) = on_gpus
        if source == target.index:
            raise ControlError(f"pid {pid} is on GPU {source} already")
        origin = next(g for g in gpus if g.index == source)
        if origin.name != target.name:
            raise ControlError(f"GPU {target.index} is a {target.name} and GPU {source} a {origin.name}: the driver "
                               "restores a process only onto a GPU of the same kind")
        pairs = self._pairs(origin, target)
        free = self.free().get(target.index, 0)
        if free < nbytes:
            raise ControlError(f"pid {pid} was not moved: it holds {human_bytes(nbytes)} and GPU {target.index} has "
                               f"{human_bytes(max(free, 0))} free beside its processes and the reserve; it runs on "
                               f"GPU {source} untouched")
        began = time.monotonic()
        checkpointer.pause(pid, stat.start_time, MOVE, True, nbytes, [source], {source: nbytes})
        state = checkpointer.resume(pid, self.room, pairs, {source: target.index})
        if state != RUNNING:
            raise ControlError(self._back_home(pid, stat.start_time, source, target.index))
        placement = ledger.placement(pid)
        started_on = next((old for old, now in placement.items() if now == source), source)
        ledger.set_placement(pid, stat.start_time, {**placement, started_on: target.index})
        ledger.release(pid, MOVE)
        seconds = time.monotonic() - began
        log.info("pid %d moved from GPU %d to GPU %d (%s) in %.2f s", pid, source, target.index,
                 human_bytes(nbytes), seconds)
        return {"pid": pid, "from": source, "to": target.index, "uuid": target.uuid, "bytes": nbytes,
                "seconds": round(seconds, 3)}

    def _pairs(self, source: Gpu, target: Gpu) -> list[tuple[bytes, bytes]]:
        """Every GPU the driver sees, as (old UUID, new UUID): source and target swapped, the others kept."""
        driver = self.pauser.checkpointer.driver
        assert driver is not None
        seen = driver.uuids()
        old, new = uuid_bytes(source.uuid or ""), uuid_bytes(target.uuid or "")
        for gpu, raw in ((source, old), (target, new)):
            if raw is None or raw not in seen:
                raise ControlError(f"the driver does not see GPU {gpu.index} ({gpu.uuid}): nothing was moved")
        assert old is not None and new is not None
        return [(u, new if u == old else old if u == new else u) for u in seen]

    def _back_home(self, pid: int, start_time: int, source: int, target: int) -> str:
        """The restore onto the target did not happen (its room went meanwhile): back onto the source if it has
        room, else the scheduler restores it there once it has. Returns what happened, in words."""
        checkpointer, ledger = self.pauser.checkpointer, self.pauser.ledger
        if checkpointer.resume(pid, self.room) == RUNNING:
            ledger.release(pid, MOVE)
            return f"pid {pid} was not moved: GPU {target} had no room for it after all; it runs on GPU {source}"
        ledger.hold(pid, start_time, SCHEDULER, signalled=False)
        ledger.release(pid, MOVE)
        return (f"pid {pid} was not moved: GPU {target} had no room for it after all, and GPU {source} has none "
                "now; it stays checkpointed and the scheduler restores it as soon as there is room")


def _gpu(to: int | str, gpus: list[Gpu]) -> Gpu:
    """The host's GPU named by its index or its UUID."""
    found = next((g for g in gpus if (g.index == to if isinstance(to, int) else g.uuid == to)), None)
    if found is None:
        known = ", ".join(f"{g.index} ({g.uuid})" for g in gpus) or "none (no NVML?)"
        raise ControlError(f"no GPU {to} on this host; its GPUs: {known}")
    return found
