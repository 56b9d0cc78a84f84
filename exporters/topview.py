"""`gpuwatch top`'s process table, free of urwid: rows from `ps`, launch rates, sorting, filtering, and columns
fitted to a width (exporters/topheader.py: the lines above the table; exporters/top.py: the terminal)."""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from ..core.vocabulary import human_bytes

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
    Column("UNTRACKED", 9, 6, lambda r: "-" if r.nvml is None else human_bytes(r.untracked)),  # no NVML: unknown
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
    Column("REASON", 24, 10, lambda r: r.raw.get("reason") or "-", "<"),
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
