"""The one view: a pure function from what the probes counted, NVML, the interposers' pages, the ledger, the
quotas, the policy and the scheduler to the rows that `ps`, `status`, the metrics, `top` and the enforcer read.

It reads nothing itself: whatever it needs from /proc comes in through `ViewSources`' functions, so tests
build views from plain values."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from ..core.procfs import ProcInfo
from ..core.view import Gpu, HostMemory, ProcessGpu, SchedulerSummary, Snapshot
from ..core.vocabulary import (CHECKPOINTED, PAUSED, PAUSED_BY_HAND, QUOTA_STOP, STOPPED,
                               WAITING_FOR_DEVICE_MEMORY, Priority)
from ..probes.model import ProbeFacts
from .ledger import HAND, QUOTA, ROOM
from .records import DeviceEnforcement, Enforcement

Resolve = Callable[[int, int, list[Gpu], dict[tuple[int, int], str]], tuple[int | None, str | None]]


@dataclass(frozen=True)
class SchedulingFigures:
    slice_seconds: float = 0.0
    wait_seconds: float = 0.0
    preemptions: int = 0


@dataclass
class ViewSources:
    """Everything build_view merges. The functions are the only way it learns about /proc."""
    facts: ProbeFacts
    pages: Mapping[int, Enforcement] = field(default_factory=dict)      # interposed processes, read once
    stopped: Mapping[int, set[str]] = field(default_factory=dict)       # the ledger: pid -> who holds it
    moved: Mapping[int, str] = field(default_factory=dict)              # ... and "locked" or "checkpointed"
    unmovable: Mapping[int, str] = field(default_factory=dict)          # why the driver's API cannot move it
    reasons: Mapping[int, str] = field(default_factory=dict)            # the scheduler's: why it waits
    plans: Mapping[tuple[int, int], str] = field(default_factory=dict)  # its verdicts: (pid, GPU) -> run, swap...
    quotas: Mapping[int, Enforcement] = field(default_factory=dict)     # quota members and quota stops
    scheduling: Mapping[int, SchedulingFigures] = field(default_factory=dict)
    summary: SchedulerSummary | None = None
    host: HostMemory | None = None
    priority_of: Callable[[int], Priority | None] = lambda pid: None    # the policy's word, if it has one
    resolve: Resolve = lambda pid, ordinal, gpus, uuids: (ordinal if ordinal >= 0 else None, None)
    describe: Callable[[int], ProcInfo | None] = lambda pid: None
    alive: Callable[[int], bool] = lambda pid: True
    placement: Callable[[int], dict[int, int]] = lambda pid: {}  # `gpuwatch move`: {GPU it left: GPU it is on}
    # the quota a rule or a pod gave an interposed process: its interposer enforces it less the context
    quota_of: Callable[[int], int | None] = lambda pid: None


def enforcement_records(sources: ViewSources) -> dict[int, Enforcement]:
    """One record per process the enforcer knows: quota members, the ledger's stopped processes, interposed
    processes' pages (a page's process the probes stopped past its backstop is `stopped`), and what the
    scheduler did to each."""
    merged = dict(sources.quotas)
    for pid in sources.stopped:
        if pid in sources.pages:
            continue  # paused by hand through its interposer: its page says its state
        how = sources.moved.get(pid)
        state = CHECKPOINTED if how == CHECKPOINTED else PAUSED if how else STOPPED
        merged[pid] = replace(merged[pid], state=state) if pid in merged else \
            Enforcement(pid=pid, interposed=False, state=state)
    for pid, page in sources.pages.items():
        held = pid in merged and merged[pid].state == STOPPED
        merged[pid] = replace(page, state=STOPPED, quota_pauses=merged[pid].quota_pauses) if held else page
    for pid, s in sources.scheduling.items():
        if not (s.slice_seconds or s.wait_seconds or s.preemptions):
            continue
        base = merged.get(pid) or Enforcement(pid=pid, interposed=False, state="running")
        merged[pid] = replace(base, slice_seconds=s.slice_seconds, wait_seconds=s.wait_seconds,
                              preemptions=s.preemptions)
    return merged


def build_view(sources: ViewSources) -> Snapshot:
    facts = sources.facts
    gpus = facts.nvml_gpus
    rows: dict[tuple[int, int | None], ProcessGpu] = {}

    def new_row(pid: int, index: int | None, uuid: str | None) -> ProcessGpu:
        info = sources.describe(pid)
        if info is None:
            return ProcessGpu(pid=pid, comm="?", gpu=index, gpu_uuid=uuid)
        return ProcessGpu(pid=pid, comm=info.comm, gpu=index, gpu_uuid=uuid, user=info.user,
                          container_id=info.container_id, pod_uid=info.pod_uid, namespace=info.namespace,
                          pod=info.pod, container=info.container)

    def row(pid: int, ordinal: int) -> ProcessGpu:
        index, uuid = sources.resolve(pid, ordinal, gpus, facts.uuids)
        key = (pid, index)
        if key not in rows:
            rows[key] = new_row(pid, index, uuid)
            rows[key].launches_estimated = facts.launches_estimated
        return rows[key]

    for p in facts.rows:
        r = row(p.pid, p.ordinal)
        r.device_bytes += p.device_bytes
        r.device_bytes_estimated = r.device_bytes_estimated or p.device_bytes_estimated
        r.managed_bytes += p.managed_bytes
        r.host_pinned_bytes += p.host_pinned_bytes
        r.allocs += p.allocs
        r.frees += p.frees
        r.failed_allocs += p.failed_allocs
        r.launches += p.launches
        r.graph_launches += p.graph_launches
        for direction, n in p.copy_bytes.items():
            r.copy_bytes[direction] += n
    for (pid, index), used in facts.nvml_bytes.items():
        if sources.placement(pid).get(index, index) != index:
            continue  # a reading from before `gpuwatch move` took the process off this GPU (NVML is sampled)
        key = (pid, index)
        if key not in rows:
            rows[key] = new_row(pid, index, next((g.uuid for g in gpus if g.index == index), None))
        rows[key].nvml_bytes = used
    for r in rows.values():
        if r.nvml_bytes is not None:
            r.untracked_bytes = max(r.nvml_bytes - r.device_bytes, 0)
    _add_enforcement(rows, enforcement_records(sources), row, new_row, sources, facts.exact_launches)
    live = [r for r in rows.values() if sources.alive(r.pid)]
    for r in live:  # the priority the scheduler uses: set with `gpuwatch priority`, its rule's, or its own
        if (chosen := sources.priority_of(r.pid)) is not None:
            r.priority = chosen.label
        r.unmovable = sources.unmovable.get(r.pid)
        r.plan = sources.plans.get((r.pid, r.gpu)) if r.gpu is not None else None
        if r.state == CHECKPOINTED and not r.interposed:  # all it had on the device is in host memory now
            r.swapped_bytes = r.device_bytes
        r.reason = _reason(r, sources)
    live.sort(key=lambda r: (r.pid, -1 if r.gpu is None else r.gpu))
    return Snapshot(live, gpus, facts.health, sources.summary, sources.host)


def _reason(row: ProcessGpu, sources: ViewSources) -> str | None:
    by = sources.stopped.get(row.pid, set())
    if HAND in by:
        return PAUSED_BY_HAND
    if QUOTA in by or (row.state == STOPPED and row.quota_bytes is not None and not by):
        return QUOTA_STOP
    if ROOM in by:
        return WAITING_FOR_DEVICE_MEMORY
    reason = sources.reasons.get(row.pid)
    return reason if reason is not None or row.state != CHECKPOINTED else WAITING_FOR_DEVICE_MEMORY


def _add_enforcement(rows: dict[tuple[int, int | None], ProcessGpu], enforcement: dict[int, Enforcement],
                     row: Callable[[int, int], ProcessGpu],
                     new_row: Callable[[int, int | None, str | None], ProcessGpu],
                     sources: ViewSources, exact_launches: bool) -> None:
    """Interposed and stopped processes get rows even where the probes saw nothing yet."""
    gpus, uuids = sources.facts.nvml_gpus, sources.facts.uuids
    by_pid: dict[int, list[ProcessGpu]] = {}
    for (pid, _), r in rows.items():
        by_pid.setdefault(pid, []).append(r)
    for pid, e in enforcement.items():
        mine = by_pid.setdefault(pid, [])
        records: dict[int | None, DeviceEnforcement] = {}
        for d in e.devices:
            index = sources.resolve(pid, d.ordinal, gpus, uuids)[0]
            records.setdefault(index, d)
            if d.in_use and not any(r.gpu == index for r in mine):
                mine.append(row(pid, d.ordinal))
        if not mine:
            mine.append(rows.setdefault((pid, None), new_row(pid, None, None)))
        for r in mine:
            record = records.get(r.gpu)
            r.interposed, r.state, r.priority = e.interposed, e.state, e.priority
            r.quota_bytes = sources.quota_of(pid) or (record.quota_bytes if record and record.quota_bytes
                                                      else e.mem_limit)
            r.swapped_bytes, r.swappable_bytes, r.unswappable_bytes = (
                (record.swapped_bytes, record.swappable_bytes, record.unswappable_bytes) if record else (0, 0, 0))
        # process-wide counters go on one row, so that sums over rows stay right: its first GPU's
        on_gpus = sorted((r for r in mine if r.gpu is not None), key=lambda r: r.gpu or 0)
        main = on_gpus[0] if on_gpus else mine[0]
        main.swap_out_bytes_total, main.swap_in_bytes_total = e.swap_out_bytes_total, e.swap_in_bytes_total
        main.swap_pinned_bytes = e.pinned_bytes
        main.waiting_threads = e.waiting_threads
        main.quota_pauses = e.quota_pauses
        main.slice_seconds, main.wait_seconds, main.preemptions = e.slice_seconds, e.wait_seconds, e.preemptions
        # the page counts every launch exactly at no cost, the probes only while attached: prefer the page
        # unless the probes count everything too (its counts are per process: only with one GPU)
        if e.launches is not None and len(on_gpus) <= 1 and not exact_launches:
            main.launches, main.graph_launches = e.launches, e.graph_launches or 0
            main.launches_estimated = False
