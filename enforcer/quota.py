"""Quotas for processes not started under gpuwatch: `gpuwatch quota set --pid PID|--cgroup PATH SIZE`.

A quota group (one process, or every process of a cgroup subtree) may hold SIZE device bytes per GPU. The
probes reserve each allocation's bytes in the group at the call's entry and, when that would cross the
limit, stop the process with SIGSTOP before the call runs (probes/bpf/quota.h and maps.h). This enforcer, driven
by the daemon through on_event() and tick(), sees the stop (the event, or quota_stops at the next tick),
kills the process if its group says so, and otherwise continues it as soon as the allocation fits again:
first granting the bytes (so no other member's allocation can take them meanwhile), then clearing the stop
and sending SIGCONT. It continues only processes its probes stopped, and it records them in the ledger
so that a daemon that was killed has them continued by the next one.

Over 400 lines: groups, cgroup membership, stops and grants share one lock and one consistent state (a
stop is continued only against the group totals and grants of that same moment); split, each part would
reach into the others' fields."""
from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..core.procfs import PF_KTHREAD, cgroup2_root, process_cgroup, proc_stat, send_signal, thread_states
from ..core.protocol import ControlError
from ..core.vocabulary import ACTIONS, MAX_SIZE, STOPPED, size_problem
from ..probes.model import Event, EventType
from ..probes.quotamaps import QuotaStop, by_process
from .ledger import QUOTA, Ledger
from .records import Enforcement

log = logging.getLogger(__name__)
GROUP_INHERIT = 0x80000000  # a cgroup group: members' forked children join it in BPF at once
RESCAN_SECONDS = 1.0        # cgroup membership is re-read this often (and when a process opens libcuda)
GRANT_TIMEOUT = 30.0        # a granted allocation that never shows as returned stops counting after this
ABSENT_GRACE = 0.2          # a granted call gone from the calls map this long has returned
FOREIGN_CONT = 1.0          # a stopped process seen running this long was continued by someone else
BACKSTOP_MARGIN = 64 << 20  # at least this far past an interposed process's quota before the probes stop it


class QuotaMaps(Protocol):
    """The probes' quota maps (probes/quotamaps.py)."""

    def join(self, pid: int, group: int) -> bool: ...
    def leave(self, pid: int) -> None: ...
    def group_of(self, pid: int) -> int | None: ...
    def set_limit(self, group: int, limit: int) -> None: ...
    def drop_group(self, group: int) -> None: ...
    def totals(self, group: int) -> dict[int, int]: ...
    def set_granted(self, group: int, gpu: int, nbytes: int) -> None: ...
    def set_context(self, pid: int, per_ordinal: dict[int, int]) -> None: ...
    def forget_context(self, pid: int) -> None: ...
    def stops(self) -> list[QuotaStop]: ...
    def clear_stop(self, pid: int, tid: int) -> None: ...
    def call_pending(self, pid: int, tid: int) -> bool: ...
    def traced(self, pid: int) -> bool: ...


def _stopped(pid: int) -> bool:
    """Whether any thread of the process is stopped (its main thread may have exited)."""
    return any(state in ("T", "t") for state in thread_states(pid) or [])


def _below(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


@dataclass
class QuotaGroup:
    id: int
    limit: int                      # device bytes per GPU
    action: str                     # pause or kill
    pid: int | None = None          # a --pid group ...
    start_time: int = 0             # ... of this process (not a later one with its pid)
    cgroup: str | None = None       # a --cgroup group: the path below the cgroup2 root, "/a/b"
    members: dict[int, int] = field(default_factory=dict)  # pid -> start time
    by_hand: bool = False           # set with `gpuwatch quota set`: kept in the state file across restarts

    @property
    def name(self) -> str:
        return f"pid {self.pid}" if self.pid is not None else f"cgroup {self.cgroup}"

    def to_json(self) -> dict[str, Any]:
        return {"group": self.id, "pid": self.pid, "cgroup": self.cgroup, "bytes": self.limit, "action": self.action,
                "members": sorted(self.members)}


@dataclass
class _Stopped:
    start_time: int
    group: int | None
    since: float
    stops: list[QuotaStop]
    killed: bool = False


@dataclass
class _Grant:
    pid: int
    tid: int
    group: int
    gpu: int
    size: int
    at_ns: int                      # CLOCK_MONOTONIC, as the probes' event times
    deadline: float
    absent_since: float | None = None


class QuotaEnforcer:
    """Owned by the daemon; every method may be called from any thread."""

    def __init__(self, maps: QuotaMaps, ledger: Ledger) -> None:
        self.maps, self.ledger = maps, ledger
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._groups: dict[int, QuotaGroup] = {}
        self._stopped: dict[int, _Stopped] = {}
        self._grants: list[_Grant] = []
        self._granted: Counter[tuple[int, int]] = Counter()  # (group, gpu) -> bytes, mirrored in quota_granted
        self._pauses: Counter[int] = Counter()
        self._last_rescan = 0.0
        self._pending_restore: list[dict] = []
        self._contexts: dict[int, dict[int, int]] = {}

    # lifecycle

    def held_elsewhere(self, pid: int) -> bool:
        """Stopped by `gpuwatch pause` or the scheduler too: that one continues it."""
        return bool(self.ledger.holders(pid) - {QUOTA})

    def restore(self, saved: list[dict[str, Any]]) -> None:
        """Once the probes run: the quotas set by hand before a restart (the ledger's), for the processes and
        cgroups that are still there."""
        self._pending_restore = saved
        for entry in saved:
            try:
                nbytes, action = int(entry["bytes"]), str(entry.get("action", "pause"))
                if entry.get("cgroup") is not None:
                    self.set_cgroup(str(entry["cgroup"]), nbytes, action, by_hand=True)
                    log.info("quota of cgroup %s restored: %d bytes per GPU", entry["cgroup"], nbytes)
                    continue
                pid, start = int(entry["pid"]), int(entry["start_time"])
                stat = proc_stat(pid)
                if stat is not None and stat.start_time == start:
                    self.set_pid(pid, nbytes, action, by_hand=True)
                    log.info("quota of pid %d restored: %d bytes per GPU", pid, nbytes)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: a quota entry ignored: %r (%s)", self.ledger.path, entry, exc)
            except ControlError as exc:
                log.warning("a quota set before the restart is not restored: %s", exc)
        self._pending_restore = []
        with self._lock:
            self._save()

    def close(self) -> None:
        """The daemon is stopping: its stops are cleared (the ledger continues everyone it holds) and nothing
        stops again meanwhile; the quotas set by hand stay in the ledger for the next daemon."""
        with self._lock:
            stopped, self._stopped = self._stopped, {}
            for pid, rec in stopped.items():
                stat = proc_stat(pid)
                if not rec.killed and stat is not None and stat.start_time == rec.start_time:
                    for s in rec.stops:
                        self.maps.clear_stop(pid, s.tid)
            for g in self._groups.values():
                self.maps.drop_group(g.id)
            self._groups.clear()

    # control

    def set_pid(self, pid: int, nbytes: int, action: str = "pause", by_hand: bool = False) -> dict[str, Any]:
        """A quota for one process (0 bytes: none). It holds until the process exits."""
        self._check(nbytes, action)
        stat = proc_stat(pid)
        if stat is None:
            raise ControlError(f"no process with pid {pid}")
        what = "init" if pid == 1 else "the gpuwatch daemon" if pid == os.getpid() else \
            "a kernel thread" if stat.flags & PF_KTHREAD else None
        if what:
            raise ControlError(f"will not set a quota on pid {pid}: it is {what}")
        with self._lock:
            group = next((g for g in self._groups.values() if g.pid == pid and g.start_time == stat.start_time), None)
            if nbytes == 0:
                if group is not None:
                    self._drop(group)
                    self.process_started(pid)  # back into its cgroup's group, if it has one
                return {"pid": pid, "bytes": 0}
            if group is None:
                group = QuotaGroup(next(self._ids), nbytes, action, pid=pid, start_time=stat.start_time)
                self._groups[group.id] = group
                for other in self._groups.values():
                    other.members.pop(pid, None)
                self.maps.set_limit(group.id, nbytes)
                self.maps.join(pid, group.id)
                group.members[pid] = stat.start_time
                if pid in self._stopped:
                    self._stopped[pid].group = group.id
            else:
                group.limit, group.action = nbytes, action
                self.maps.set_limit(group.id, nbytes)
            group.by_hand = group.by_hand or by_hand
            self._reconcile(time.monotonic())
            if group.by_hand:
                self._save()
            return {"pid": pid, "bytes": nbytes, "action": action, "held": self._held(group)}

    def set_backstop(self, pid: int, quota: int, action: str = "pause", by_hand: bool = False) -> dict[str, Any]:
        """For a process under the interposer, which refuses allocations past `quota` itself: the probes stop it
        only if it gets further anyway, by a margin (its page is its own memory: a process can rewrite its
        quota there, or attach without any library). The backstop never drops below an earlier one while the
        process lives: memory a swap-in brings back after a quota was lowered is not tampering."""
        if not quota:
            return self.set_pid(pid, 0, by_hand=by_hand)
        limit = quota + max(BACKSTOP_MARGIN, quota // 64)
        stat = proc_stat(pid)
        with self._lock:
            earlier = next((g.limit for g in self._groups.values()
                            if g.pid == pid and stat is not None and g.start_time == stat.start_time), 0)
        return self.set_pid(pid, min(max(limit, earlier), MAX_SIZE), action, by_hand)

    def set_cgroup(self, path: str, nbytes: int, action: str = "pause", by_hand: bool = False) -> dict[str, Any]:
        """A quota shared by every process of a cgroup and the cgroups below it (0 bytes: none)."""
        self._check(nbytes, action)
        root = cgroup2_root()
        if root is None:
            raise ControlError("no cgroup v2 hierarchy is mounted: --cgroup needs one")
        rel = path
        if path.startswith(str(root) + "/") or path == str(root):
            rel = path[len(str(root)):] or "/"
        if not rel.startswith("/"):
            raise ControlError(f"cgroup {path!r}: give its path as /proc/PID/cgroup shows it, like /user.slice/job")
        rel = "/" + "/".join(p for p in rel.split("/") if p)
        if ".." in rel.split("/") or not (root / rel.lstrip("/")).is_dir():
            raise ControlError(f"no cgroup {rel} (looked for the directory {root / rel.lstrip('/')})")
        with self._lock:
            group = next((g for g in self._groups.values() if g.cgroup == rel), None)
            if nbytes == 0:
                if group is not None:
                    self._drop(group)
                    self._rescan()
                return {"cgroup": rel, "bytes": 0}
            if group is None:
                group = QuotaGroup(next(self._ids) | GROUP_INHERIT, nbytes, action, cgroup=rel)
                self._groups[group.id] = group
            group.limit, group.action = nbytes, action
            group.by_hand = group.by_hand or by_hand
            self.maps.set_limit(group.id, nbytes)
            self._rescan()
            self._reconcile(time.monotonic())
            if group.by_hand:
                self._save()
            return {"cgroup": rel, "bytes": nbytes, "action": action, "members": sorted(group.members),
                    "held": self._held(group)}

    def groups(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{**g.to_json(), "held": self._held(g)} for g in self._groups.values()]

    def set_contexts(self, contexts: dict[int, dict[int, int]]) -> None:
        """Each process's CUDA context per device ordinal (enforcer/contexts.py): counted in its group, so that a
        quota bounds everything the group holds on the GPU. Stopped processes whose allocation fits again go on."""
        with self._lock:
            changed = False
            for pid, per_ordinal in contexts.items():
                if self._contexts.get(pid) != per_ordinal:
                    self._contexts[pid] = per_ordinal
                    self.maps.set_context(pid, per_ordinal)
                    changed = True
            if changed and self._stopped:
                self._reconcile(time.monotonic())

    def holds(self, pid: int) -> bool:
        with self._lock:
            return pid in self._stopped

    # driven by the daemon

    def process_started(self, pid: int) -> None:
        """A new process (or one that opened libcuda): into its cgroup's group, if a rule covers it."""
        with self._lock:
            if not any(g.cgroup for g in self._groups.values()):
                return
            if any(g.pid == pid for g in self._groups.values()):
                return
            path = process_cgroup(pid)
            stat = proc_stat(pid)
            if path is not None and stat is not None:
                self._place(pid, stat.start_time, path)

    def forget(self, pid: int) -> None:
        """The process exited (the daemon's process events): its stop, grants and --pid rule go."""
        with self._lock:
            self._exited(pid)

    def on_event(self, event: Event) -> None:
        with self._lock:
            if not self._groups and not self._stopped and not self._grants:
                return
            now = time.monotonic()
            if event.type == EventType.QUOTA_STOP:
                self._reconcile(now)
            elif event.type in (EventType.ALLOC, EventType.ALLOC_FAIL):
                done = [g for g in self._grants if g.pid == event.pid and g.tid == event.tid and event.ts_ns >= g.at_ns]
                for g in done:
                    self._release(g)
            elif event.type == EventType.FREE:
                if self._stopped and any(event.pid in g.members for g in self._groups.values()):
                    self._reconcile(now)
            elif event.type == EventType.EXIT:
                self._exited(event.pid)
                self._reconcile(now)
            elif event.type == EventType.LIB_OPEN:
                self.process_started(event.pid)

    def tick(self, now: float) -> None:
        with self._lock:
            if not self._groups and not self._stopped and not self._grants:
                return
            for g in list(self._grants):
                if now > g.deadline or proc_stat(g.pid) is None:
                    self._release(g)
                elif self.maps.call_pending(g.pid, g.tid):
                    g.absent_since = None
                elif g.absent_since is None:
                    g.absent_since = now
                elif now - g.absent_since >= ABSENT_GRACE:
                    self._release(g)
            if now - self._last_rescan >= RESCAN_SECONDS:
                self._last_rescan = now
                self._rescan()
            self._reconcile(now)

    def enforcement(self) -> dict[int, Enforcement]:
        """Members the probes know (or with an explicit --pid rule) and whom the quota stopped."""
        with self._lock:
            out: dict[int, Enforcement] = {}
            for g in self._groups.values():
                for pid in g.members:
                    if g.pid is not None or pid in self._stopped or self.maps.traced(pid):
                        out[pid] = Enforcement(pid=pid, interposed=False,
                                               state=STOPPED if pid in self._stopped else "running",
                                               mem_limit=g.limit, quota_pauses=self._pauses[pid])
            for pid in self._stopped:
                out.setdefault(pid, Enforcement(pid=pid, interposed=False, state=STOPPED,
                                                quota_pauses=self._pauses[pid]))
            return out

    # inside

    @staticmethod
    def _check(nbytes: int, action: str) -> None:
        if size_problem(nbytes) is not None:
            raise ControlError(f"quota: bytes must be a number of bytes from 0 (no quota) to {MAX_SIZE}")
        if action not in ACTIONS:
            raise ControlError(f"quota: action must be one of {', '.join(ACTIONS)}")

    def _held(self, group: QuotaGroup) -> dict[str, int]:
        return {str(gpu): n for gpu, n in sorted(self.maps.totals(group.id).items()) if n}

    def _drop(self, group: QuotaGroup) -> None:
        del self._groups[group.id]
        self.maps.drop_group(group.id)
        for g in [g for g in self._grants if g.group == group.id]:
            self._grants.remove(g)
            self._granted.pop((g.group, g.gpu), None)
        for rec in self._stopped.values():
            if rec.group == group.id:
                rec.group = None  # no quota now: it is continued at once
        self._reconcile(time.monotonic())
        if group.by_hand:
            self._save()
        log.info("quota of %s removed", group.name)

    def _cgroup_group(self, path: str) -> QuotaGroup | None:
        """The group of the deepest cgroup rule that covers this cgroup."""
        return max((g for g in self._groups.values() if g.cgroup is not None and _below(path, g.cgroup)),
                   key=lambda g: len(g.cgroup or ""), default=None)

    def _place(self, pid: int, start: int, path: str) -> None:
        best = self._cgroup_group(path)
        for g in self._groups.values():
            if g is not best and g.cgroup is not None and pid in g.members:
                del g.members[pid]
                if best is None and self.maps.group_of(pid) == g.id:
                    self.maps.leave(pid)
        if best is not None and best.members.get(pid) != start:
            self.maps.join(pid, best.id)
            best.members[pid] = start

    def _rescan(self) -> None:
        """Cgroup members from cgroup.procs of every cgroup below a rule's; pid rules whose process exited."""
        for g in [g for g in self._groups.values() if g.pid is not None]:
            stat = proc_stat(g.pid) if g.pid is not None else None
            if stat is None or stat.start_time != g.start_time:
                self._drop(g)
        cgroups = [g for g in self._groups.values() if g.cgroup is not None]
        if not cgroups:
            return
        root = cgroup2_root()
        found: dict[int, str] = {}
        if root is not None:
            for top in {g.cgroup for g in cgroups if g.cgroup}:
                for directory, _, _ in os.walk(root / top.lstrip("/")):
                    rel = "/" if Path(directory) == root else "/" + os.path.relpath(directory, root)
                    try:
                        pids = Path(directory, "cgroup.procs").read_text().split()
                    except OSError:
                        continue
                    for p in pids:
                        found[int(p)] = rel
        pinned = {g.pid for g in self._groups.values() if g.pid is not None}
        for g in cgroups:
            for pid in [p for p in g.members if p not in found or p in pinned]:
                del g.members[pid]
                if pid not in pinned and proc_stat(pid) is not None and self.maps.group_of(pid) == g.id:
                    self.maps.leave(pid)  # it moved out of the cgroup
        for pid, path in found.items():
            if pid in pinned:
                continue
            best = self._cgroup_group(path)
            if best is not None and pid in best.members and self.maps.group_of(pid) == best.id:
                continue  # the common case, without reading /proc
            stat = proc_stat(pid)
            if stat is not None:
                self._place(pid, stat.start_time, path)

    def _exited(self, pid: int) -> None:
        if self._contexts.pop(pid, None) is not None:
            self.maps.forget_context(pid)
        if self._stopped.pop(pid, None) is not None:
            self.ledger.forget(pid)
        for grant in [g for g in self._grants if g.pid == pid]:
            self._release(grant)
        for group in list(self._groups.values()):
            group.members.pop(pid, None)
            if group.pid == pid:
                self._drop(group)
        self._pauses.pop(pid, None)

    def _group_of(self, pid: int) -> int | None:
        for g in self._groups.values():
            if pid in g.members:
                return g.id
        group = self.maps.group_of(pid)  # a forked child the probes put in its parent's group
        if group in self._groups:
            stat = proc_stat(pid)
            if stat is not None:
                self._groups[group].members[pid] = stat.start_time
            return group
        return None

    def _reconcile(self, now: float) -> None:
        """Take up new stops (kill, or wait), then continue every stopped process whose allocation fits."""
        changed = False
        by_pid = by_process(self.maps.stops(), self.maps.clear_stop)
        for pid, (stat, stops) in by_pid.items():
            rec = self._stopped.get(pid)
            if rec is None or rec.start_time != stat.start_time:
                rec = _Stopped(stat.start_time, self._group_of(pid), now, stops)
                self._stopped[pid] = rec
                self.ledger.hold(pid, stat.start_time, QUOTA)
                self._pauses[pid] += 1
                changed = True
                group = self._groups.get(rec.group) if rec.group is not None else None
                log.info("pid %d stopped (SIGSTOP) before allocating %d bytes on %s: %s holds %d of %d",
                         pid, stops[0].size, f"device {stops[0].gpu}" if stops[0].gpu >= 0 else "an unknown device",
                         group.name if group else "its group",
                         stops[0].group_used, stops[0].limit)
                if group is not None and group.action == "kill":
                    send_signal(pid, signal.SIGKILL)
                    self.ledger.forget(pid)
                    rec.killed = True
                    log.info("pid %d killed (SIGKILL): it reached the quota of %s", pid, group.name)
            rec.stops = stops
        for pid, rec in list(self._stopped.items()):
            now_stat = proc_stat(pid)
            if pid not in by_pid or now_stat is None or now_stat.start_time != rec.start_time:
                del self._stopped[pid]  # it exited (the exit probe dropped its stops)
                self.ledger.forget(pid)
                changed = True
        for pid, rec in sorted(self._stopped.items(), key=lambda item: item[1].since):
            if rec.killed or self.held_elsewhere(pid):
                continue
            if now - rec.since >= FOREIGN_CONT and not _stopped(pid):
                log.warning("pid %d was continued by someone else while stopped at its quota", pid)
                self._continue(pid, rec, grant=False)
                changed = True
                continue
            group = self._groups.get(rec.group) if rec.group is not None else None
            if group is not None:
                totals = self.maps.totals(group.id)
                need: Counter[int] = Counter()
                for s in rec.stops:
                    need[s.gpu] += s.size
                if any(totals.get(gpu, 0) + n > group.limit for gpu, n in need.items()):
                    continue
            self._continue(pid, rec, grant=group is not None)
            changed = True
        if changed:
            self._save()

    def _continue(self, pid: int, rec: _Stopped, grant: bool) -> None:
        """Grant its allocations' bytes, clear its stops, then SIGCONT: in this order, so that no other
        member's allocation takes the room meanwhile and a new stop is never cleared unseen."""
        now_ns, now = time.monotonic_ns(), time.monotonic()
        for s in rec.stops:
            if grant and rec.group is not None:
                g = _Grant(pid, s.tid, rec.group, s.gpu, s.size, now_ns, now + GRANT_TIMEOUT)
                self._grants.append(g)
                self._granted[(g.group, g.gpu)] += g.size
                self.maps.set_granted(g.group, g.gpu, self._granted[(g.group, g.gpu)])
            self.maps.clear_stop(pid, s.tid)
        del self._stopped[pid]
        if self.ledger.release(pid, QUOTA) and send_signal(pid, signal.SIGCONT):
            log.info("pid %d continued (SIGCONT): its allocation fits its quota", pid)

    def _release(self, g: _Grant) -> None:
        if g not in self._grants:
            return
        self._grants.remove(g)
        key = (g.group, g.gpu)
        self._granted[key] -= g.size
        if self._granted[key] <= 0:
            del self._granted[key]
        if g.group in self._groups:
            self.maps.set_granted(g.group, g.gpu, self._granted.get(key, 0))

    def _save(self) -> None:
        """The quotas set by hand, into the ledger: a daemon started after this one keeps them."""
        self.ledger.set_quotas(
            [{"cgroup": g.cgroup, "bytes": g.limit, "action": g.action} if g.cgroup is not None else
             {"pid": g.pid, "start_time": g.start_time, "bytes": g.limit, "action": g.action}
             for g in self._groups.values() if g.by_hand] + self._pending_restore)
