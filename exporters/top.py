"""`gpuwatch top`: a live terminal view of the daemon's processes and GPUs, for any user.

The data shaping (rows, launch rates, sorting, filtering, fitting columns and header lines to a width) is
plain functions and `Top`, free of urwid; `TopApp` only lays their lines out on the terminal and maps keys."""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import urwid

from ..core.protocol import Client, ControlError, DaemonUnavailable
from ..core.vocabulary import human_bytes, socket_path

# A line is urwid text markup: plain strings and (attribute, text) pairs.
Segment = Union[str, tuple[str, str]]
Line = list[Segment]
Fetch = Callable[[], tuple[list[dict[str, Any]], dict[str, Any]]]

INTERVAL_STEPS = (0.2, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)
# In sample mode the daemon counts launches 40 ms of every 4 s, so the estimate moves once per 4 s:
# a rate over a shorter span would swing between 0 and bursts.
ESTIMATED_RATE_WINDOW = 4.0
FETCH_TIMEOUT = 2.0


def plain(line: Line) -> str:
    return "".join(s if isinstance(s, str) else s[1] for s in line)


def clip(line: Line, width: int) -> Line:
    out: Line = []
    left = width
    for seg in line:
        attr, text = (None, seg) if isinstance(seg, str) else seg
        if left <= 0:
            break
        text = text[:left]
        left -= len(text)
        out.append(text if attr is None else (attr, text))
    return out


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class Row:
    pid: int
    gpu: int | None
    user: str
    container: str
    command: str
    device: int
    nvml: int | None
    untracked: int
    launch_rate: float | None
    estimated: bool
    failed: int
    raw: dict[str, Any]
    state: str = "running"
    interposed: bool = False

    @property
    def key(self) -> tuple[int, int | None]:
        return self.pid, self.gpu


def container_label(container_id: str, pod_uid: str) -> str:
    if container_id:
        return container_id[:12]
    if pod_uid:
        return "pod:" + pod_uid[:8]
    return "-"


def format_rate(rate: float | None, estimated: bool) -> str:
    if rate is None:
        return "-"
    if rate < 1000:
        text = f"{rate:.1f}"
    elif rate < 1e6:
        text = f"{rate:.0f}"
    else:
        text = f"{rate / 1e6:.1f}M"
    return ("~" if estimated else "") + text


class LaunchRates:
    """Launches per second of each (pid, gpu) between refreshes."""

    def __init__(self) -> None:
        self._history: dict[tuple[int, int | None], deque[tuple[float, int]]] = {}

    def update(self, key: tuple[int, int | None], launches: int, now: float, estimated: bool) -> float | None:
        history = self._history.setdefault(key, deque())
        if history and (launches < history[-1][1] or now <= history[-1][0]):
            history.clear()  # a counter going back is a new process under a reused pid
        history.append((now, launches))
        window = ESTIMATED_RATE_WINDOW if estimated else 0.0
        # keep the newest sample at least `window` old as the base
        while len(history) > 2 and now - history[1][0] >= window:
            history.popleft()
        if len(history) < 2:
            return None
        then, before = history[0]
        return (launches - before) / (now - then)

    def keep_only(self, keys: Iterable[tuple[int, int | None]]) -> None:
        keep = set(keys)
        for key in [k for k in self._history if k not in keep]:
            del self._history[key]


class CommandLines:
    """The command line of a pid for the COMMAND column: comm followed by the arguments from /proc, or
    comm alone where /proc does not show the same process (exited, hidden, another pid namespace)."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._cache: dict[tuple[int, str], str] = {}

    def get(self, pid: int, comm: str) -> str:
        key = (pid, comm)
        if key not in self._cache:
            self._cache[key] = self._read(pid, comm)
        return self._cache[key]

    def _read(self, pid: int, comm: str) -> str:
        try:
            with open(f"{self._proc}/{pid}/comm", "rb") as f:
                if f.read().decode(errors="replace").rstrip("\n") != comm:
                    return printable(comm)
            with open(f"{self._proc}/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            return printable(comm)
        args = [a for a in argv[1:] if a]
        return printable(" ".join([comm, *args]))

    def keep_only(self, pids: Iterable[int]) -> None:
        keep = set(pids)
        for key in [k for k in self._cache if k[0] not in keep]:
            del self._cache[key]


def make_row(d: dict[str, Any], launch_rate: float | None, command: str) -> Row:
    return Row(pid=d["pid"], gpu=d["gpu"], user=printable(str(d.get("user", "?"))),
               container=printable(container_label(d.get("container_id", ""), d.get("pod_uid", ""))),
               command=command, device=d["device_bytes"], nvml=d.get("nvml_bytes"),
               untracked=d.get("untracked_bytes", 0), launch_rate=launch_rate,
               estimated=bool(d.get("launches_estimated")), failed=d.get("failed_allocs", 0), raw=d,
               state=printable(str(d.get("state", "running"))), interposed=bool(d.get("interposed")))


# ---------------------------------------------------------------- sorting and filtering


@dataclass(frozen=True)
class Sort:
    key: str  # the key that selects it
    value: Callable[[Row], Any]
    descending: bool  # the natural order; `r` reverses it


SORTS: dict[str, Sort] = {
    "memory": Sort("m", lambda r: r.device, True),
    "pid": Sort("p", lambda r: r.pid, False),
    "launches": Sort("l", lambda r: -1.0 if r.launch_rate is None else r.launch_rate, True),
    "failed": Sort("f", lambda r: r.failed, True),
    "command": Sort("n", lambda r: r.command.lower(), False),
    "container": Sort("c", lambda r: r.container, False),
}
SORT_BY_KEY = {s.key: name for name, s in SORTS.items()}


def sort_rows(rows: Iterable[Row], sort: str, reverse: bool = False) -> list[Row]:
    spec = SORTS[sort]
    ordered = sorted(rows, key=lambda r: (r.pid, -1 if r.gpu is None else r.gpu))
    return sorted(ordered, key=spec.value, reverse=spec.descending != reverse)


def matches(row: Row, text: str) -> bool:
    needle = text.lower()
    haystacks = (row.command, row.user, row.container, row.raw.get("container_id", ""),
                 row.raw.get("pod_uid", ""), str(row.pid))
    return any(needle in h.lower() for h in haystacks)


def filter_rows(rows: Iterable[Row], text: str | None) -> list[Row]:
    return [r for r in rows if not text or matches(r, text)]


# ---------------------------------------------------------------- columns


@dataclass(frozen=True)
class Column:
    title: str
    width: int  # the flexible column's minimum
    priority: int  # 0: always shown; at narrow widths the highest numbers go first
    cell: Callable[[Row], str]
    align: str = ">"
    flex: bool = False  # takes the width left over
    sort: str | None = None  # the sort it shows


COLUMNS: list[Column] = [
    Column("PID", 7, 0, lambda r: str(r.pid), sort="pid"),
    Column("USER", 8, 4, lambda r: r.user, "<"),
    Column("CONTAINER", 12, 7, lambda r: r.container, "<", sort="container"),
    Column("GPU", 3, 3, lambda r: "-" if r.gpu is None else str(r.gpu)),
    Column("DEVICE", 9, 0, lambda r: human_bytes(r.device), sort="memory"),
    Column("NVML", 9, 5, lambda r: human_bytes(r.nvml)),
    Column("UNTRACKED", 9, 6, lambda r: human_bytes(r.untracked)),
    Column("LAUNCH/S", 8, 1, lambda r: format_rate(r.launch_rate, r.estimated), sort="launches"),
    Column("FAILED", 6, 2, lambda r: str(r.failed), sort="failed"),
    Column("COMMAND", 15, 0, lambda r: r.command, "<", flex=True, sort="command"),
]

# Shown only while some row is interposed or not running, so that plain use keeps its columns.
STATE_NAMES = {"running": "running", "paused": "paused", "swapping_out": "swap-out", "swapped": "swapped",
               "swapping_in": "swap-in", "stopped": "stopped"}
STATE_COLUMN = Column("STATE", 8, 1, lambda r: STATE_NAMES.get(r.state, r.state), "<")


# What the enforcer did, shown with STATE; at narrow widths these go first.
ENFORCEMENT_COLUMNS = [
    Column("QUOTA", 9, 8, lambda r: human_bytes(r.raw.get("quota_bytes"))),
    Column("SWAPPED", 9, 8, lambda r: human_bytes(r.raw.get("swapped_bytes", 0))),
    Column("SLICE", 7, 9, lambda r: f"{r.raw.get('slice_seconds', 0.0):.0f}s"),
    Column("WAIT", 7, 9, lambda r: f"{r.raw.get('wait_seconds', 0.0):.0f}s"),
    Column("PREEMPT", 7, 9, lambda r: str(r.raw.get("preemptions", 0))),
    Column("QSTOPS", 6, 9, lambda r: str(r.raw.get("quota_pauses", 0))),
]


def columns_for(rows: Iterable[Row]) -> list[Column]:
    """COLUMNS, with STATE after GPU and the enforcement columns before COMMAND while any row is under the
    interposer, paused or under a quota."""
    rows = list(rows)
    if not any(r.interposed or r.state != "running" or r.raw.get("quota_bytes") is not None for r in rows):
        return COLUMNS
    at = COLUMNS.index(next(c for c in COLUMNS if c.title == "GPU")) + 1
    return [*COLUMNS[:at], STATE_COLUMN, *COLUMNS[at:-1], *ENFORCEMENT_COLUMNS, COLUMNS[-1]]


Fitted = list[tuple[Column, int]]


def table_width(columns: Sequence[Column]) -> int:
    return sum(c.width for c in columns) + len(columns) - 1


def fit_columns(width: int, columns: Sequence[Column] = COLUMNS) -> Fitted:
    """The columns that fit in `width`, each with its width; the first flexible one takes what is left."""
    kept = list(columns)
    for col in sorted(columns, key=lambda c: -c.priority):
        if table_width(kept) <= width or col.priority == 0:
            break
        kept.remove(col)
    spare = max(0, width - table_width(kept))
    flex = next((c for c in kept if c.flex), None)
    return [(c, c.width + spare if c is flex else c.width) for c in kept]


def format_row(row: Row, fitted: Fitted) -> str:
    return " ".join(f"{col.cell(row)[:w]:{col.align}{w}}" for col, w in fitted)


def row_line(row: Row, width: int, columns: Sequence[Column] = COLUMNS) -> str:
    return format_row(row, fit_columns(width, columns))[:width]


def title_line(fitted: Fitted, sort: str, width: int) -> Line:
    line: Line = []
    for i, (col, w) in enumerate(fitted):
        if i:
            line.append(("title", " "))
        line.append(("sorted" if col.sort == sort else "title", f"{col.title[:w]:{col.align}{w}}"))
    used = len(plain(line))
    if used < width:
        line.append(("title", " " * (width - used)))
    return clip(line, width)


# ---------------------------------------------------------------- header


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


class Top:
    """What top shows: the latest rows and status from the daemon, or why there are none."""

    def __init__(self, fetch: Fetch, view: ViewState, clock: Callable[[], float] = time.monotonic,
                 commands: Callable[[int, str], str] | None = None) -> None:
        self.fetch, self.view, self.clock = fetch, view, clock
        self._commandlines = CommandLines()
        self.command = commands or self._commandlines.get
        self.rates = LaunchRates()
        self.ps: list[dict[str, Any]] = []
        self.status: dict[str, Any] | None = None
        self.rows: list[Row] = []
        self.error: str | None = None

    def refresh(self, strict: bool = False) -> None:
        """Fetch from the daemon; a failure becomes `error` (raised with `strict`) and clears the rows."""
        try:
            ps, status = self.fetch()
            rows = self._shape(ps)
        except (DaemonUnavailable, ControlError, OSError, ValueError, KeyError, TypeError) as exc:
            if strict:
                raise
            self.error = describe(exc)
            self.ps, self.status, self.rows = [], None, []
            self.rates = LaunchRates()
            return
        self.error, self.ps, self.status, self.rows = None, ps, status, rows
        self.rates.keep_only(r.key for r in rows)
        self._commandlines.keep_only(r.pid for r in rows)

    def _shape(self, ps: list[dict[str, Any]]) -> list[Row]:
        now = self.clock()
        return [make_row(d, self.rates.update((d["pid"], d["gpu"]), d.get("launches", 0), now,
                                              bool(d.get("launches_estimated"))),
                         self.command(d["pid"], d["comm"])) for d in ps]

    def visible(self) -> list[Row]:
        return sort_rows(filter_rows(self.rows, self.view.filter), self.view.sort, self.view.reverse)

    def header_lines(self, width: int) -> list[Line]:
        if self.error is not None:
            lines = error_lines(self.error, self.view, width)
        else:
            processes = len({d["pid"] for d in self.ps})
            lines = [state_line(self.status, self.view, processes, width)]
            gpus = (self.status or {}).get("gpus", [])
            lines += gpu_lines(gpu_summaries(self.ps, gpus), width)
        return [*lines, title_line(fit_columns(width, self.columns()), self.view.sort, width)]

    def columns(self) -> list[Column]:
        return columns_for(self.rows)

    def placeholder(self) -> str:
        if self.error is not None:
            return ""
        if not self.rows:
            return "no traced CUDA process"
        return f"no process matches {self.view.filter!r}"

    def select_sort(self, name: str) -> None:
        self.view.sort, self.view.reverse = name, False

    def reverse(self) -> None:
        self.view.reverse = not self.view.reverse

    def set_filter(self, text: str) -> None:
        self.view.filter = text.strip()

    def change_interval(self, longer: bool) -> None:
        self.view.interval = next_interval(self.view.interval, longer)


class DaemonSource:
    """ps and status over one connection, reconnecting after any failure."""

    def __init__(self, path: str, timeout: float = FETCH_TIMEOUT) -> None:
        self.path, self.timeout = path, timeout
        self._client: Client | None = None

    def __call__(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if self._client is None:
            self._client = Client(self.path, self.timeout)
        try:
            return self._client.call("ps"), self._client.call("status")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.close()
            except OSError:
                pass


# ---------------------------------------------------------------- the terminal


def markup(lines: list[Line]) -> list[Segment]:
    out: list[Segment] = []
    for i, line in enumerate(lines):
        if i:
            out.append("\n")
        out.extend(line)
    return out or [""]


PALETTE = [
    ("state", "bold", ""),
    ("error", "light red,bold", ""),
    ("title", "black", "light gray"),
    ("sorted", "black,bold", "light cyan"),
    ("footer", "black", "light gray"),
    ("traced", "light green", ""),
    ("untracked", "yellow", ""),
    ("other", "light magenta", ""),
    ("free", "dark gray", ""),
    ("prompt", "bold", ""),
]


class WidthLines(urwid.Widget):
    """Lines made for the width the widget gets, so columns follow resizes; never wider."""
    _sizing = frozenset([urwid.Sizing.FLOW])

    def __init__(self, make: Callable[[int], list[Line]]) -> None:
        super().__init__()
        self._make = make

    def changed(self) -> None:
        self._invalidate()

    def rows(self, size: tuple[int], focus: bool = False) -> int:
        return max(1, len(self._make(size[0])))

    def render(self, size: tuple[int], focus: bool = False) -> Any:
        lines = [clip(line, size[0]) for line in self._make(size[0])]
        return urwid.Text(markup(lines), wrap=urwid.WrapMode.CLIP).render(size, focus)


class TopApp:
    def __init__(self, top: Top) -> None:
        self.top = top
        self.header = WidthLines(top.header_lines)
        self.keys = WidthLines(lambda width: [footer_line(width)])
        self.walker = urwid.SimpleListWalker([])
        self.frame = urwid.Frame(urwid.ListBox(self.walker), header=self.header, footer=self.keys)
        self.prompt: urwid.Edit | None = None
        self.loop: urwid.MainLoop | None = None
        self._alarm: Any = None
        self.show()

    def run(self) -> None:
        self.loop = urwid.MainLoop(self.frame, PALETTE, unhandled_input=self.on_key, handle_mouse=False)
        self._schedule()
        self.loop.run()

    def tick(self, _loop: Any = None, _data: Any = None) -> None:
        self.top.refresh()
        self.show()
        self._schedule()

    def _schedule(self) -> None:
        if self.loop is None:
            return
        if self._alarm is not None:
            self.loop.remove_alarm(self._alarm)
        self._alarm = self.loop.set_alarm_in(self.top.view.interval, self.tick)

    def show(self) -> None:
        self.header.changed()
        rows = self.top.visible()
        columns = self.top.columns()
        if rows:
            widgets = [WidthLines(lambda w, row=row: [[row_line(row, w, columns)]]) for row in rows]
        else:
            widgets = [urwid.Text(self.top.placeholder(), wrap=urwid.WrapMode.CLIP)]
        self.walker[:] = widgets

    def on_key(self, key: str) -> bool:
        if self.prompt is not None:
            return self._on_prompt_key(key)
        if key in ("q", "Q", "esc"):
            raise urwid.ExitMainLoop()
        if key in SORT_BY_KEY:
            self.top.select_sort(SORT_BY_KEY[key])
        elif key == "r":
            self.top.reverse()
        elif key in ("+", "-"):
            self.top.change_interval(longer=key == "+")
            self.tick()
            return True
        elif key == "/":
            self.prompt = urwid.Edit(("prompt", "filter (Enter applies, Esc cancels): "), self.top.view.filter)
            self.frame.footer = self.prompt
            self.frame.focus_position = "footer"
        else:
            return False
        self.show()
        return True

    def _on_prompt_key(self, key: str) -> bool:
        if key == "ctrl u" and self.prompt is not None:
            self.prompt.set_edit_text("")
            return True
        if key not in ("enter", "esc"):
            return False
        if key == "enter" and self.prompt is not None:
            self.top.set_filter(self.prompt.edit_text)
        self.prompt = None
        self.frame.footer = self.keys
        self.frame.focus_position = "body"
        self.show()
        return True


def main(socket: str | None, interval: float, sort: str, filter_text: str | None) -> int:
    """Run top until q. A daemon that cannot be reached at start raises DaemonUnavailable before the
    terminal is touched; one that goes away later is shown in the header and retried."""
    if not interval > 0 or math.isinf(interval):
        raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
    if sort not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
    source = DaemonSource(socket or socket_path())
    top = Top(source, ViewState(interval=interval, sort=sort, filter=(filter_text or "").strip()))
    try:
        top.refresh(strict=True)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            print("gpuwatch: top needs a terminal; `gpuwatch ps` prints the same rows once", file=sys.stderr)
            return 1
        TopApp(top).run()
    finally:
        source.close()
    return 0


def interval_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpuwatch top", description="A live view of the daemon's processes and GPUs.")
    p.add_argument("--socket", help=f"daemon control socket (default: $GPUWATCH_SOCKET or {socket_path()})")
    p.add_argument("--interval", type=interval_seconds, default=1.0, metavar="SECONDS",
                   help="refresh interval (default: 1; + and - change it while running)")
    p.add_argument("--sort", choices=list(SORTS), default="memory", help="sort key (default: memory)")
    p.add_argument("--filter", metavar="TEXT", help="show only rows whose command, user, container or pid "
                                                    "contains TEXT")
    return p


def _standalone(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return main(args.socket, args.interval, args.sort, args.filter)
    except (DaemonUnavailable, ControlError) as exc:
        print(f"gpuwatch: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_standalone())
