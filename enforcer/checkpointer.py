"""Moving processes that do not run under the interposer, with the driver's checkpoint API (core/checkpoint.py):
a lock makes the process's CUDA calls wait (its CPU threads run on), a checkpoint moves all its device memory,
its context included, into host memory the driver holds, a restore brings it back at the same addresses and an
unlock lets its calls go on.

Safety first: a lock has a timeout (a process inside a long kernel, or a rank waiting for its peers, stays
running; three timeouts in a row make it unmovable); whatever the driver refuses makes the process unmovable
with the driver's words, never retried; a restore is asked for only when the device has room for all it held
(a restore that fails for lack of memory can leave the process stuck for good). The ledger records every
process the driver holds, so that a daemon started after this one was killed takes them over."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from ..core.checkpoint import CHECKPOINTED, LOCKED, RUNNING, TIMEOUT, CheckpointError, Driver
from ..core.procfs import proc_stat
from ..core.protocol import ControlError
from .ledger import MOVE, SCHEDULER, Ledger
from .scheduler import SwitchCost

log = logging.getLogger(__name__)
TIMEOUTS_BEFORE_UNMOVABLE = 3
# A checkpoint puts what the process held into its own anonymous memory (H200, driver 580: 60 and 80 GiB
# checkpointed with about 124 GB available; in other runs 80 and 100 GiB, and once 60 GiB, failed half way with
# CUDA_ERROR_OPERATING_SYSTEM and left the process without a usable CUDA state, with less of the host spare).
# A checkpoint is asked for only where the host can spare this many times what the process holds.
HOST_FACTOR = 1.5
# Until measured: the H200's checkpoint of 20 GiB took 10-11.5 s, its restore 3.4-3.8 s (docs/validation.md).
CHECKPOINT_BYTES_PER_S = 3.2e9


class NotMoved(ControlError):
    """The process was not locked or checkpointed; it runs on as it was. `retry`: a timeout, not a refusal."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True)
class CheckpointSettings:
    move_plain: bool = True     # False: processes outside the interposer are never locked or checkpointed
    lock_timeout_ms: int = 5000


class Checkpointer:
    def __init__(self, driver: Driver | None, ledger: Ledger, settings: CheckpointSettings = CheckpointSettings(),
                 why_not: str | None = None, host_room: Callable[[int, int], str | None] = lambda pid, n: None,
                 ipc_user: Callable[[int], bool] = lambda pid: False) -> None:
        """driver None: no driver library was named or found (why_not says so). host_room(pid, bytes): why the
        host cannot take so much more for the process (None: it can); ipc_user: whether the probes saw the
        process use legacy CUDA IPC."""
        self.driver, self.ledger, self.settings = driver, ledger, settings
        self.host_room, self.ipc_user = host_room, ipc_user
        self._broken: dict[int, str] = {}  # a checkpoint or restore the driver failed half way: never touched again
        self.why_not = why_not if driver is None else driver.why_not
        self.cost = SwitchCost(bytes_per_s=CHECKPOINT_BYTES_PER_S, latency=0.2, min_sample=1 << 30)
        self._unmovable: dict[int, tuple[int, str]] = {}  # pid -> (start time, why)
        self._timeouts: dict[int, int] = {}
        # a restore under way holds its room (RoomStops.claim): pid, bytes per GPU
        self.claim: Callable[[int, dict[int, int]], AbstractContextManager[None]] = lambda pid, parts: nullcontext()
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    # what it can do

    @property
    def available(self) -> bool:
        return self.driver is not None and self.driver.available

    def usable(self) -> bool:
        return self.available and self.settings.move_plain

    def status(self) -> dict[str, object]:
        why = self.why_not if not self.available else None if self.settings.move_plain else \
            "[scheduler] move_plain is false"
        return {"available": self.available, "move_plain": self.usable(), "why_not": why}

    def unmovable(self, pid: int) -> str | None:
        entry = self._unmovable.get(pid)
        if entry is None:
            return None
        stat = proc_stat(pid)
        if stat is None or stat.start_time != entry[0]:
            del self._unmovable[pid]
            return None
        return entry[1]

    def unmovable_now(self) -> dict[int, str]:
        return {pid: why for pid in list(self._unmovable) if (why := self.unmovable(pid)) is not None}

    def movable(self, pid: int) -> bool:
        if self.usable() and self.unmovable(pid) is None and self.ipc_user(pid):
            self._mark(pid, "it uses legacy CUDA IPC (cuIpcGetMemHandle or cuIpcOpenMemHandle): on the H200 "
                            "(driver 580) an importer checkpointed beside its exporter could not be restored")
        return self.usable() and self.unmovable(pid) is None

    def forget(self, pid: int) -> None:
        self._unmovable.pop(pid, None)
        self._timeouts.pop(pid, None)
        self._broken.pop(pid, None)
        with self._guard:
            self._locks.pop(pid, None)

    # moves

    def pause(self, pid: int, start_time: int, by: str, checkpoint: bool, nbytes: int = 0,
              gpus: list[int] | None = None, gpu_bytes: dict[int, int] | None = None) -> str:
        """Lock the process (and checkpoint it), held by `by`; returns its state. NotMoved where the driver did
        not, with its words: the process then runs on exactly as before. gpu_bytes: of nbytes, each GPU's."""
        assert self.driver is not None
        if checkpoint and not self.ledger.moved(pid)[0] == CHECKPOINTED and \
                (why := self.host_room(pid, int(nbytes * HOST_FACTOR))) is not None:
            raise NotMoved(f"pid {pid} was not checkpointed: {why} (a checkpoint takes what the process holds, "
                           f"{nbytes >> 20} MiB, into its own memory; it is asked for only with {HOST_FACTOR}x that "
                           "spare)", retry=True)
        with self._lock_of(pid):
            moved = self.ledger.moved(pid)[0]
            if not moved:
                self._lock(pid)
                self.ledger.hold(pid, start_time, by, signalled=False)
                self.ledger.set_moved(pid, LOCKED, 0, gpus or [])
                moved = LOCKED
            else:
                self.ledger.hold(pid, start_time, by, signalled=False)
            if checkpoint and moved != CHECKPOINTED:
                began = time.monotonic()
                try:
                    self.driver.checkpoint(pid)
                except CheckpointError as exc:
                    self._refused(pid, exc)
                    if self.ledger.holders(pid) == {by}:  # nobody else wants it held: it runs on
                        try:
                            self._unlock(pid)
                        except CheckpointError as unlock:
                            self._broke(pid, f"its checkpoint failed ({exc}) and it cannot be unlocked ({unlock})")
                        self.ledger.set_moved(pid, "")
                        self.ledger.release(pid, by)
                    raise NotMoved(f"pid {pid} could not be checkpointed: {exc}; it was not moved") from None
                self.cost.observe(nbytes, time.monotonic() - began)
                self.ledger.set_moved(pid, CHECKPOINTED, nbytes, gpus, gpu_bytes)
                log.info("pid %d checkpointed: %.1f GiB to host memory in %.2f s", pid, nbytes / (1 << 30),
                         time.monotonic() - began)
                moved = CHECKPOINTED
            return moved

    def resume(self, pid: int, room: Callable[[int, list[int]], bool], pairs: list[tuple[bytes, bytes]] | None = None,
               onto: dict[int, int] | None = None) -> str:
        """Restore (when `room(bytes, gpus)` says the GPUs have room for all it held: each GPU for its part where
        that is known) and unlock. Returns the state it is left in: running, or still checkpointed (no room yet:
        the caller keeps holding it). pairs: the driver's gpuPairs, to restore onto other GPUs; onto: the same as
        host indices (source: target), where room is looked for."""
        assert self.driver is not None
        with self._lock_of(pid):
            moved, nbytes, gpus = self.ledger.moved(pid)
            if pid in self._broken:
                return moved or RUNNING
            if moved == CHECKPOINTED:
                parts = self.ledger.moved_on(pid) or ({gpus[0]: nbytes} if len(gpus) == 1 else {})
                wanted = {(onto or {}).get(gpu, gpu): n for gpu, n in parts.items()}
                if not (all(room(n, [gpu]) for gpu, n in wanted.items()) if wanted else room(nbytes, gpus)):
                    return CHECKPOINTED
                began = time.monotonic()
                try:
                    with self.claim(pid, wanted or {gpu: nbytes for gpu in gpus}):
                        self.driver.restore(pid, pairs)
                except CheckpointError as exc:
                    # OUT_OF_MEMORY too: on the H200 (driver 580) a restore that found no room could not be
                    # restored again (CUDA_ERROR_OPERATING_SYSTEM), as NVIDIA/cuda-checkpoint issue 44 says
                    self._broke(pid, f"its restore failed: {exc}")
                    return CHECKPOINTED
                self.cost.observe(nbytes, time.monotonic() - began)
                log.info("pid %d restored: %.1f GiB back on the device in %.2f s", pid, nbytes / (1 << 30),
                         time.monotonic() - began)
                self.ledger.set_moved(pid, LOCKED)
            if self.ledger.moved(pid)[0] == LOCKED:
                self._unlock(pid)
            self.ledger.set_moved(pid, "")
            return RUNNING

    def take_over(self, room: Callable[[int, list[int]], bool]) -> None:
        """At start: what a previous daemon left to the driver. Processes still there are asked the driver for
        their state and held as they were (checkpointed ones until there is room, by the scheduler unless a
        person paused them); the rest are forgotten."""
        entries, self.ledger.recovered_moved = self.ledger.recovered_moved, []
        for entry in entries:
            try:
                pid, start = int(entry["pid"]), int(entry["start_time"])
            except (KeyError, TypeError, ValueError):
                continue
            stat = proc_stat(pid)
            if stat is None or stat.start_time != start or not self.available:
                if stat is not None and stat.start_time == start:
                    log.error("pid %d was %s by a previous daemon and the driver's API is not available (%s): "
                              "`gpuwatch resume %d` as root", pid, entry.get("moved"), self.why_not, pid)
                continue
            assert self.driver is not None
            try:
                state = self.driver.state(pid)
            except CheckpointError as exc:
                log.warning("pid %d: the driver cannot say its state (%s): left as it is", pid, exc)
                continue
            if state == RUNNING:
                continue
            # a move the previous daemon did not finish: the scheduler restores it where it was, once there is room
            by = {SCHEDULER if b == MOVE else str(b) for b in entry.get("by", [])} or {SCHEDULER}
            self.ledger.restore_moved({**entry, "moved": state if state in (LOCKED, CHECKPOINTED) else entry["moved"]},
                                      by)
            log.info("pid %d is %s (a previous daemon's doing): held by %s", pid, state, ", ".join(sorted(by)))

    def release_all(self, room: Callable[[int, list[int]], bool]) -> None:
        """The daemon is stopping: every process the driver holds that fits comes back; the others are named."""
        left = []
        for pid, by in self.ledger.stopped().items():
            if not self.ledger.moved(pid)[0]:
                continue
            try:
                state = self.resume(pid, room)
            except CheckpointError as exc:
                state = f"not unlocked ({exc})"
            if state == RUNNING:
                for holder in by:
                    self.ledger.release(pid, holder)
            else:
                left.append(f"{pid} ({state})")
        if left:
            log.warning("stopping with processes the driver still holds, for lack of device memory: %s; "
                        "`gpuwatch resume PID` as root brings each back once there is room", ", ".join(left))

    # the driver

    def _lock(self, pid: int) -> None:
        assert self.driver is not None
        try:
            self.driver.lock(pid, self.settings.lock_timeout_ms)
        except CheckpointError as exc:
            if exc.code == TIMEOUT:
                n = self._timeouts[pid] = self._timeouts.get(pid, 0) + 1
                if n >= TIMEOUTS_BEFORE_UNMOVABLE:
                    self._mark(pid, f"its CUDA calls did not stop within {self.settings.lock_timeout_ms} ms "
                                    f"{n} times (a long kernel, or a rank waiting for its peers)")
                raise NotMoved(f"pid {pid} was not locked: a CUDA call of it ran past "
                               f"{self.settings.lock_timeout_ms} ms; it runs on", retry=True) from None
            self._refused(pid, exc)
            raise NotMoved(f"pid {pid} cannot be locked: {exc}; it runs on") from None
        self._timeouts.pop(pid, None)

    def _unlock(self, pid: int) -> None:
        assert self.driver is not None
        self.driver.unlock(pid)

    def _broke(self, pid: int, why: str) -> None:
        """The driver failed half way: the process is never asked anything again, and people are told once."""
        if pid not in self._broken:
            self._broken[pid] = why
            self._mark(pid, why)
            log.error("pid %d: %s; the driver may have lost its CUDA state: gpuwatch leaves it alone", pid, why)

    def _refused(self, pid: int, exc: CheckpointError) -> None:
        self._mark(pid, f"the driver refused: {exc.name} ({exc.text}) at {exc.call}")

    def _mark(self, pid: int, why: str) -> None:
        stat = proc_stat(pid)
        if stat is not None and pid not in self._unmovable:
            self._unmovable[pid] = (stat.start_time, why)
            log.warning("pid %d is unmovable: %s", pid, why)

    def _lock_of(self, pid: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(pid, threading.Lock())
