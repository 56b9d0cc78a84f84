"""`gpuwatch top`: a live terminal view of the daemon's processes and GPUs, for any user.

exporters/topview.py shapes the data (rows, rates, sorting, filtering, lines fitted to a width) free of
urwid; this module only lays those lines out on the terminal and maps keys. Its names are re-exported here
so that `top` stays the one module its users import."""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import urwid

from ..core.protocol import Client, ControlError, DaemonUnavailable
from ..core.vocabulary import socket_path
from .topheader import (
    describe, error_lines, footer_line, gpu_lines, gpu_summaries, GpuSummary, memory_bar, next_interval, state_line,
    ViewState)
from .topview import (
    clip, Column, COLUMNS, columns_for, CommandLines, container_label, Fetch, FETCH_TIMEOUT, filter_rows,
    fit_columns, format_row, LaunchRates, Line, make_row, plain, Row, row_line, Segment, SORT_BY_KEY, sort_rows,
    SORTS, title_line)

__all__ = [
    "plain", "filter_rows", "sort_rows", "next_interval", "fit_columns", "container_label", "memory_bar",
    "gpu_summaries", "gpu_lines", "ViewState", "Top", "LaunchRates", "GpuSummary", "make_row", "columns_for",
    "row_line", "format_row", "footer_line", "error_lines", "COLUMNS", "TopApp", "main", "parser"]


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

    def render(self, size: tuple[()] | tuple[int] | tuple[int, int], focus: bool = False) -> Any:
        width = size[0] if size else 80
        lines = [clip(line, width) for line in self._make(width)]
        return urwid.Text(markup(lines), wrap=urwid.WrapMode.CLIP).render((width,), focus)


def _row_lines(row: Row, columns: list[Column]) -> Callable[[int], list[Line]]:
    return lambda width: [[row_line(row, width, columns)]]


class TopApp:
    def __init__(self, top: Top) -> None:
        self.top = top
        self.header = WidthLines(top.header_lines)
        self.keys = WidthLines(lambda width: [footer_line(width)])
        # urwid's generic types cannot say "a footer that is sometimes a prompt": these two stay untyped
        self.walker: Any = urwid.SimpleListWalker([])
        self.frame: Any = urwid.Frame(urwid.ListBox(self.walker), header=self.header, footer=self.keys)
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
        widgets: list[urwid.Widget]
        if rows:
            widgets = [WidthLines(_row_lines(row, columns)) for row in rows]
        else:
            widgets = [urwid.Text(self.top.placeholder(), wrap=urwid.WrapMode.CLIP)]
        self.walker[:] = widgets

    def on_key(self, key: str | tuple[str, int, int, int]) -> bool:
        if not isinstance(key, str):
            return False  # a mouse event: none are handled
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
