"""The lines above `gpuwatch top`'s table, free of urwid: a memory bar and figures per GPU, the daemon's state,
errors and the key help, each fitted to a width."""
from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.vocabulary import human_bytes
from .topview import Line, INTERVAL_STEPS, plain, clip, printable, SORTS


@dataclass(frozen=True)
class GpuSummary:
    index: int | None
    traced: int
    untracked: int
    name: str | None = None
    total: int | None = None
    used: int | None = None
    utilization: int | None = None


def gpu_summaries(ps: list[dict[str, Any]], gpus: list[dict[str, Any]]) -> list[GpuSummary]:
    traced: dict[int | None, int] = {}
    untracked: dict[int | None, int] = {}
    for r in ps:
        traced[r["gpu"]] = traced.get(r["gpu"], 0) + r["device_bytes"]
        untracked[r["gpu"]] = untracked.get(r["gpu"], 0) + (r.get("untracked_bytes") or 0)
    out = [GpuSummary(g["index"], traced.get(g["index"], 0), untracked.get(g["index"], 0), g.get("name"),
                      g.get("memory_total"), g.get("memory_used"), g.get("utilization")) for g in gpus]
    known = {g["index"] for g in gpus}
    for index in sorted((i for i in traced if i not in known), key=lambda i: (i is None, i or 0)):
        out.append(GpuSummary(index, traced[index], untracked[index]))
    return out


BAR_CHARS = {"traced": "#", "untracked": "+", "other": "-", "free": "."}
MIN_BAR = 10


def bar_cells(values: Sequence[int], total: int, width: int) -> list[int]:
    """Cells of a bar `width` wide for each part of `total`; a part above zero gets at least one."""
    if total <= 0:
        return [0] * len(values)
    cells = [max(1 if v > 0 else 0, round(max(0, v) * width / total)) for v in values]
    while sum(cells) > width:
        cells[cells.index(max(cells))] -= 1
    return cells


def memory_bar(s: GpuSummary, width: int) -> Line:
    parts = {"traced": s.traced, "untracked": s.untracked, "other": (s.used or 0) - s.traced - s.untracked}
    cells = bar_cells(list(parts.values()), s.total or 0, width)
    line: Line = [(attr, BAR_CHARS[attr] * n) for attr, n in zip(parts, cells) if n]
    return [*line, ("free", BAR_CHARS["free"] * (width - sum(cells)))]


def gpu_numbers(s: GpuSummary, form: int) -> Line:
    """What the bar shows, in words; `form` 0 is the longest."""
    t, u, total = human_bytes(s.traced), human_bytes(s.untracked), human_bytes(s.total)
    free = human_bytes((s.total or 0) - (s.used or 0))
    util = "-" if s.utilization is None else f"{s.utilization}%"
    if form == 0:
        return [("traced", f"traced {t}"), "  ", ("untracked", f"untracked {u}"), "  ",
                ("free", f"free {free} of {total}"), f"  util {util}"]
    if form == 1:
        return [("traced", f"traced {t}"), " ", ("untracked", f"untracked {u}"), " ", ("free", f"free {free}"),
                f" {util}"]
    return [("traced", t), " ", ("untracked", u), " ", ("free", free), f" {util}"]


def gpu_label(s: GpuSummary, with_name: bool) -> str:
    label = f"GPU {'-' if s.index is None else s.index}"
    name = printable(s.name or "")[:24]
    return f"{label} {name}" if with_name and name else label


def gpu_lines(summaries: Sequence[GpuSummary], width: int) -> list[Line]:
    """One line per GPU; the bars of GPUs NVML knows start at one column and have one width."""
    measured = [s for s in summaries if s.total is not None] or [GpuSummary(0, 0, 0, total=0)]
    for with_name, form in ((True, 0), (False, 0), (False, 1), (False, 2)):
        label_width = max(len(gpu_label(s, with_name)) for s in measured)
        numbers_width = max(len(plain(gpu_numbers(s, form))) for s in measured)
        bar_width = width - label_width - numbers_width - 4
        if bar_width >= MIN_BAR:
            break
    bar_width = max(bar_width, MIN_BAR)
    lines: list[Line] = []
    for s in summaries:
        if s.total is None:
            note = "no NVML" if s.index is not None else "GPU not known"
            line: Line = [gpu_label(s, False) + "  ", ("traced", f"traced {human_bytes(s.traced)}"), f"  ({note})"]
        else:
            line = [f"{gpu_label(s, with_name):<{label_width}} [", *memory_bar(s, bar_width), "] ",
                    *gpu_numbers(s, form)]
        lines.append(clip(line, width))
    return lines


@dataclass
class ViewState:
    interval: float = 1.0
    sort: str = "memory"
    reverse: bool = False
    filter: str = ""


def counted(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def state_line(status: dict[str, Any] | None, view: ViewState, processes: int, width: int) -> Line:
    """gpuwatch's own state in the longest of three wordings that fits."""
    health = (status or {}).get("health", {})
    mode = health.get("launch_mode", "?")
    libraries = len(health.get("libraries", []))
    lost = health.get("events_lost", 0)
    direction = "asc" if SORTS[view.sort].descending == view.reverse else "desc"
    parts: list[tuple[str, str, str]] = [
        (f"launches {mode}", f"launches {mode}", f"launches:{mode}"),
        (counted(libraries, "library", "libraries"), counted(libraries, "lib", "libs"), f"libs:{libraries}"),
        (f"{lost} events lost", f"{lost} lost", f"lost:{lost}"),
        (counted(processes, "process", "processes"), counted(processes, "proc", "procs"), f"procs:{processes}"),
        (f"every {view.interval:g}s", f"every {view.interval:g}s", f"{view.interval:g}s"),
        (f"sort {view.sort} {direction}", f"sort {view.sort} {direction}", f"sort:{view.sort}({direction})"),
    ]
    if health.get("waiting_for_driver"):
        parts.insert(1, ("waiting for libcuda", "waiting for libcuda", "waiting"))
    if view.filter:
        parts.append((f"filter: {view.filter}", f"filter: {view.filter}", f"/{view.filter}"))
    texts = ["gpuwatch  " + "  ".join(p[form] for p in parts) for form in (0, 1)]
    texts.append("gpuwatch " + " ".join(p[2] for p in parts))
    return clip([("state", next((t for t in texts if len(t) <= width), texts[-1]))], width)


def error_lines(error: str, view: ViewState, width: int) -> list[Line]:
    text = f"gpuwatch  daemon unavailable: {error} (retrying every {view.interval:g}s)"
    return [[("error", part)] for part in textwrap.wrap(text, max(width, 1))]


FOOTERS = ("q quit  sort: m memory  p pid  l launches/s  f failed  n name  c container  r reverse  "
           "/ filter  +/- interval",
           "q quit  m p l f n c sort  r reverse  / filter  +/- interval",
           "q m p l f n c r / + -")


def footer_line(width: int) -> Line:
    text = next((f for f in FOOTERS if len(f) <= width), FOOTERS[-1])
    return clip([("footer", f"{text:<{width}}")], width)


# ---------------------------------------------------------------- the view's state


def next_interval(current: float, longer: bool) -> float:
    """The next step up or down; never below the first step, 0.2 s."""
    if longer:
        return next((s for s in INTERVAL_STEPS if s > current + 1e-9), current)
    return next((s for s in reversed(INTERVAL_STEPS) if s < current - 1e-9), current)


def describe(exc: BaseException) -> str:
    if isinstance(exc, (KeyError, TypeError)):
        return f"unexpected answer from the daemon ({type(exc).__name__}: {exc})"
    return str(exc) or type(exc).__name__
